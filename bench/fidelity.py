"""Fidelity of llama.cpp and Python ONNX Runtime against the fp32 reference, measured as the converter measures.

    python bench/fidelity.py --gguf PATH --model-dir DIR [--threads N]    # prints one JSON line

Both engines go through model-artifacts/measure.py's own `fidelity()`: the 4 FIDELITY_PROMPTS cut to 32 tokens
(the artifact's tokenizer, so identical ids for both), teacher-forced by `ort_teacher_forced` (positions 0..6 from
separate prefills of the growing prefixes 1..7, position 7 from an 8-token prefill, then one token per step), against
the numpy fp32 reference (model-artifacts/reference.py) of the GGUF. llama.cpp is bench/engines.py's LlamaCpp (the
same llama-cpp-python settings as the timed runs), python-ort the artifact's model.onnx (model-artifacts/run_ort.py).
Per engine: agreement = positions whose argmax is the reference's (measure.py), logit RMS over all positions and
the whole vocabulary (measure.py), and the max |difference| of the reference's winning logit (as tests/kernels.rs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ARTIFACTS = os.path.join(os.path.dirname(HERE), "model-artifacts")
for _p in (HERE, ARTIFACTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import engines  # noqa: E402
import measure  # noqa: E402
import run_ort  # noqa: E402


class Recorder:
    """measure.fidelity's runner (reset, step, tokenizer, vocab) over an engine; keeps every row of logits it returns.

    `ort_teacher_forced` turns each step into one position's row, prompt after prompt, so the rows line up with the
    reference's."""

    def __init__(self, reset, step, tokenizer, vocab: int):
        self._reset, self._step = reset, step
        self.tokenizer, self.vocab = tokenizer, vocab
        self.rows = []

    def reset(self, needed: int) -> None:
        self._reset(needed)

    def step(self, ids) -> np.ndarray:
        row = np.array(self._step([int(i) for i in ids]), dtype=np.float32, copy=True)  # llama.cpp: a view
        self.rows.append(row)
        return row


class CachedReference:
    """The fp32 reference's logits per prompt, computed once for both engines; rows in the order asked for."""

    def __init__(self, reference):
        self.reference = reference
        self.cache = {}
        self.rows = []

    def logits(self, ids) -> np.ndarray:
        key = tuple(int(i) for i in ids)
        if key not in self.cache:
            self.cache[key] = self.reference.logits(list(key))
        self.rows.append(self.cache[key])
        return self.cache[key]


def measure_engine(name: str, model_dir: str, ref, runner: Recorder) -> dict:
    ref.rows = []
    t0 = time.perf_counter()
    res = measure.fidelity(model_dir, ref, runner=runner)
    seconds = time.perf_counter() - t0
    o, r = np.stack(runner.rows), np.concatenate(ref.rows)
    if o.shape != r.shape or o.shape[0] != res["positions"]:
        raise RuntimeError(f"{name}: {o.shape} logits rows against the reference's {r.shape}")
    win = r.argmax(-1)
    pos = np.arange(len(win))
    agree = int((o.argmax(-1) == win).sum())
    if agree != res["agreement"]:  # the recorded rows are the ones measure.fidelity compared
        raise RuntimeError(f"{name}: recorded rows agree at {agree}, measure.fidelity says {res['agreement']}")
    return {"engine": name, **res, "max_win_diff": float(np.abs(o[pos, win] - r[pos, win]).max()),
            "max_diff": float(np.abs(o - r).max()), "seconds": seconds}


def llama_runner(gguf: str, threads: int, tokenizer) -> Recorder:
    job = {"gguf": gguf, "threads": threads, "new_tokens": 0,
           "prompts": [{"ids": [0] * measure.POSITIONS_PER_PROMPT}]}
    engine = engines.LlamaCpp(job)
    return Recorder(engine.reset, engine.forward, tokenizer, engine.n_vocab)


def ort_runner(model_dir: str, threads: int) -> Recorder:
    r = run_ort.load(model_dir, threads=threads)
    return Recorder(r.reset, r.step, r.tokenizer, r.vocab)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the GGUF llama.cpp runs and the reference dequantizes")
    ap.add_argument("--model-dir", required=True, help="the artifact (manifest.json, model.onnx, tokenizer.json)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        from reference import Reference
        t0 = time.perf_counter()
        ref = CachedReference(Reference(a.gguf))
        ref_load_s = time.perf_counter() - t0
        ort = ort_runner(a.model_dir, a.threads)  # its tokenizer gives both engines the same ids
        t0 = time.perf_counter()
        for ids in measure.fidelity_ids(ort.tokenizer).values():  # outside the engines' seconds
            ref.logits(ids)
        ref_s = time.perf_counter() - t0
    except Exception as e:  # one concise line, as bench/engines.py
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    results = []
    for name, make in [("llama.cpp", lambda: llama_runner(a.gguf, a.threads, ort.tokenizer)),
                       ("python-ort", lambda: ort)]:
        try:
            results.append(measure_engine(name, a.model_dir, ref, make()))
        except Exception as e:  # the other engine's row still counts
            results.append({"engine": name, "error": f"{type(e).__name__}: {e}"})
    print(json.dumps({"threads": a.threads, "reference_load_s": ref_load_s, "reference_s": ref_s, "engines": results}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
