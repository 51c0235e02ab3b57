"""Python ONNX Runtime driver for a lambda-llm artifact: shared KV-cache buffers via IOBinding, greedy decoding."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


class Runner:
    """One ORT session over DIR/model.onnx with per-layer preallocated KV buffers [1, kv_heads, max_len, head_dim].

    Shared-buffer mode of GroupQueryAttention: the same OrtValue is bound as past_key_values.{i}.* input and as
    present.{i}.* output; attention_mask always has the real total length (past + new tokens), all ones.
    """

    def __init__(self, model_dir: str, threads: int | None = None, max_len: int | None = None):
        with open(os.path.join(model_dir, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        m = self.manifest
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(os.path.join(model_dir, m["files"]["model"]), so,
                                            providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t0
        self.tokenizer = None
        tok_path = os.path.join(model_dir, m["files"]["tokenizer"])
        if os.path.exists(tok_path):
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_file(tok_path)
        self.layers, self.kv_heads, self.head_dim = m["layers"], m["kv_heads"], m["head_dim"]
        self.vocab = m["vocab_size"]
        self.max_len = min(max_len or m["context_length"], m["context_length"])
        io = m["io"]
        self.names = [(io["past_key"].format(i=i), io["present_key"].format(i=i),
                       io["past_value"].format(i=i), io["present_value"].format(i=i)) for i in range(self.layers)]
        self.kv = None
        self.logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, self.vocab), dtype=np.float32))
        self.length = 0

    def reset(self, max_len: int | None = None) -> None:
        """Start a new sequence; (re)allocate the KV buffers if needed (contents need not be cleared)."""
        n = min(max_len or self.max_len, self.manifest["context_length"])
        if self.kv is None or self.kv_len != n:
            shape = (1, self.kv_heads, n, self.head_dim)
            self.kv = [(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)),
                        ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))) for _ in range(self.layers)]
            self.kv_len = n
        self.length = 0

    def step(self, ids) -> np.ndarray:
        """Feed new token ids (1-D); return the logits [vocab] of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = self.length + ids.shape[1]
        if total > self.kv_len:
            raise ValueError(f"sequence length {total} exceeds the KV buffer length {self.kv_len}")
        io = self.session.io_binding()
        io.bind_ortvalue_output("logits", self.logits)  # bind logits first: outputs come back in bind order
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        for (pk, ck, pv, cv), (k, v) in zip(self.names, self.kv):
            io.bind_ortvalue_input(pk, k)
            io.bind_ortvalue_output(ck, k)
            io.bind_ortvalue_input(pv, v)
            io.bind_ortvalue_output(cv, v)
        self.session.run_with_iobinding(io)
        self.length = total
        return np.array(self.logits.numpy()[0, -1], copy=True)  # numpy() may alias the bound buffer

    def generate(self, prompt_ids, max_new: int, eos_ids=None, prefill_chunk: int | None = None) -> dict:
        """Greedy decoding. Returns {"ids": new ids (without the stop token), "stopped": bool, "stop_id",
        "prompt_tokens", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"}."""
        eos = set(self.manifest["eos_ids"] if eos_ids is None else eos_ids)
        prompt_ids = list(prompt_ids)
        self.reset(min(len(prompt_ids) + max_new, self.manifest["context_length"]))
        t0 = time.perf_counter()
        chunk = prefill_chunk or len(prompt_ids)
        for s in range(0, len(prompt_ids), chunk):
            logits = self.step(prompt_ids[s:s + chunk])
        t1 = time.perf_counter()
        out, stopped, stop_id = [], False, None
        for _ in range(max_new):
            nxt = int(np.argmax(logits))
            if nxt in eos:
                stopped, stop_id = True, nxt
                break
            out.append(nxt)
            if len(out) == max_new or self.length >= self.kv_len:
                break
            logits = self.step([nxt])
        t2 = time.perf_counter()
        n_dec = max(len(out) - 1 + int(stopped), 0)  # forward passes after the prefill
        return {"ids": out, "stopped": stopped, "stop_id": stop_id, "prompt_tokens": len(prompt_ids),
                "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "prefill_tok_s": len(prompt_ids) / (t1 - t0) if t1 > t0 else 0.0,
                "decode_tok_s": n_dec / (t2 - t1) if n_dec and t2 > t1 else 0.0}


def load(model_dir: str, threads: int | None = None, max_len: int | None = None) -> Runner:
    return Runner(model_dir, threads=threads, max_len=max_len)


def chat_prompt(manifest: dict, user: str) -> str:
    """Render the manifest's chat template for one user message (jinja2 if installed, else ChatML by hand)."""
    try:
        import jinja2
        env = jinja2.Environment(loader=jinja2.BaseLoader(), keep_trailing_newline=True)
        return env.from_string(manifest["chat_template"]).render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=True)
    except ImportError:
        return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Greedy generation with a lambda-llm ONNX artifact.")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("prompt")
    a = ap.parse_args(argv)
    r = load(a.model_dir, threads=a.threads or None)
    text = chat_prompt(r.manifest, a.prompt) if a.chat else a.prompt
    ids = r.tokenizer.encode(text, add_special_tokens=True).ids
    res = r.generate(ids, a.max_new)
    print(r.tokenizer.decode(res["ids"], skip_special_tokens=True))
    print(f"[{res['prompt_tokens']} prompt tokens, prefill {res['prefill_tok_s']:.0f} tok/s, "
          f"{len(res['ids'])} new tokens, decode {res['decode_tok_s']:.0f} tok/s, load {r.load_s:.2f} s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
