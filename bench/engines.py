"""Reference engines for bench/compare.py, each measured in its own process (so load time and peak RSS are its own).

    python bench/engines.py < job.json      # prints one JSON line, same shape as `lambda-llm bench --json`

The job (JSON on stdin): {"engine": "llama" | "ort", "threads": N, "new_tokens": N, "gguf": PATH,
"model_dir": DIR, "prompts": [{"name": ..., "ids": [...]}]}.

Measurements follow `lambda-llm bench` (src/cli/bench.rs) exactly:
- load: constructing the model object (weights, tokenizer/vocab, session or context), excluding interpreter start-up
  and `import`; then an untimed-for-load warm-up (a 2-token and a 1-token forward, as the Rust engine does).
- per prompt, on an empty cache: prefill = forward of all prompt ids until the last position's logits are readable;
  TTFT = prefill + argmax; decode tok/s = (new_tokens - 1) / time of new_tokens - 1 one-token forwards + argmax
  (greedy, EOS ignored).
- peak RSS: getrusage(RUSAGE_SELF).ru_maxrss (the same counter as the Rust engine's VmHWM), Python included.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ORT = os.path.join(HERE, os.pardir, "model-artifacts", "run_ort.py")


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level `eval` (no sampler, no Python-side logits copy)."""

    name = "llama.cpp"

    def __init__(self, job: dict):
        from llama_cpp import Llama

        longest = max(len(p["ids"]) for p in job["prompts"])
        t = job["threads"]
        self.llm = Llama(model_path=job["gguf"], n_threads=t, n_threads_batch=t,
                         n_ctx=max(512, longest + job["new_tokens"] + 8), n_batch=max(512, longest),
                         logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self, needed: int) -> None:
        self.llm.reset()  # n_tokens = 0; the next eval drops the cached positions

    def forward(self, ids) -> np.ndarray:
        self.llm.eval(ids)  # the batch's last position always gets logits
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))


class PythonOrt:
    """The artifact's model.onnx in Python ONNX Runtime: model-artifacts/run_ort.py (IOBinding, shared KV buffers)."""

    name = "python-ort"

    def __init__(self, job: dict):
        spec = importlib.util.spec_from_file_location("run_ort", RUN_ORT)
        if spec is None or not os.path.isfile(RUN_ORT):
            raise RuntimeError(f"{RUN_ORT} not found")
        run_ort = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_ort)
        self.runner = run_ort.load(job["model_dir"], threads=job["threads"])

    def reset(self, needed: int) -> None:
        self.runner.reset(needed)

    def forward(self, ids) -> np.ndarray:
        return self.runner.step(ids)


ENGINES = {"llama": LlamaCpp, "ort": PythonOrt}


def measure(job: dict) -> dict:
    cls = ENGINES[job["engine"]]
    if job["engine"] == "ort":
        import onnxruntime  # noqa: F401  (import outside the timed load, like `from llama_cpp import Llama` below)
    else:
        import llama_cpp  # noqa: F401
    t0 = time.perf_counter()
    engine = cls(job)
    load_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    engine.reset(8)
    engine.forward([0, 0])
    engine.forward([0])
    warm_up_ms = (time.perf_counter() - t0) * 1e3
    new = max(job["new_tokens"], 2)
    prompts = []
    for p in job["prompts"]:
        ids = [int(i) for i in p["ids"]]
        engine.reset(len(ids) + new)
        t0 = time.perf_counter()
        logits = engine.forward(ids)
        t_prefill = time.perf_counter() - t0
        tok = int(np.argmax(logits))
        t_first = time.perf_counter() - t0
        out = [tok]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            tok = int(np.argmax(engine.forward([tok])))
            out.append(tok)
        t_decode = time.perf_counter() - t1
        prompts.append({"name": p["name"], "prompt_tokens": len(ids), "new_tokens": new,
                        "prefill_tok_s": len(ids) / t_prefill, "decode_tok_s": (new - 1) / t_decode,
                        "ttft_ms": t_first * 1e3, "output_ids": out})
    return {"engine": cls.name, "threads": job["threads"], "load_ms": load_ms, "warm_up_ms": warm_up_ms,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "rounds": 1,
            "prompts": prompts}


def main() -> int:
    try:
        result = measure(json.load(sys.stdin))
    except Exception as e:  # one concise line for the report; the parent records it as this run's error
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
