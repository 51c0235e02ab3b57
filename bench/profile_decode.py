"""Where a decode step's time goes: ONNX Runtime's own per-operator profile of the artifact's model.onnx.

    python bench/profile_decode.py --model-dir DIR [--threads 2] [--steps 64]

Runs a 37-token prompt, then `--steps` one-token decode steps with ORT profiling on (model-artifacts/run_ort.py, the
same shared-KV binding as the engine), and prints the share of kernel time per operator type over the decode steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "model-artifacts"))
import run_ort  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args(argv)
    base = ort.SessionOptions

    class Profiled(base):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = "/tmp/lambda-llm-decode-profile"

    run_ort.ort.SessionOptions = Profiled
    r = run_ort.Runner(a.model_dir, threads=a.threads, max_len=512)
    r.reset()
    r.step(list(range(100, 137)))
    for i in range(a.steps):
        r.step([200 + i])
    path = r.session.end_profiling()
    events = json.load(open(path))
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_start = runs[1]["ts"] if len(runs) > 1 else 0
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            per_op[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(per_op.values())
    step_us = sum(e["dur"] for e in runs[1:]) / max(len(runs) - 1, 1)
    print(f"decode step: {step_us / 1e3:.2f} ms wall ({1e6 / step_us:.1f} tok/s), {a.threads} threads, "
          f"{len(runs) - 1} steps; kernel time by operator:")
    for op, us in per_op.most_common():
        print(f"  {op:<36} {100 * us / total:5.1f} %  {us / max(len(runs) - 1, 1) / 1e3:6.3f} ms/step")
    os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
