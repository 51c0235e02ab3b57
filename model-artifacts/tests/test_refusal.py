"""Inputs the converter must refuse: one clear line on stderr, exit code 2, nothing written."""

import os
import subprocess
import sys

import pytest

import synth
from synth import QT

CONVERT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert.py")


def _run(gguf, out):
    return subprocess.run([sys.executable, CONVERT, "--gguf", str(gguf), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)


CASES = {
    "other-architecture": (dict(arch="gpt2"), "unsupported architecture 'gpt2'"),
    "q4_k-tensor": (dict(hidden=256, ffn=256, heads=4, kv_heads=2, types={"blk.0.attn_q.weight": QT.Q4_K}),
                    "unsupported type Q4_K"),
    "q5_0-tensor": (dict(types={"blk.1.ffn_down.weight": QT.Q5_0}), "unsupported type Q5_0"),
    "missing-metadata": (dict(skip_keys=("context_length",)), "'llama.context_length' is missing"),
    "other-pre-tokenizer": (dict(pre="llama-bpe"), "unsupported tokenizer pre-tokenizer 'llama-bpe'"),
    "sentencepiece-tokenizer": (dict(tokenizer_model="llama"), "unsupported tokenizer model 'llama'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused(tmp_path, case, monkeypatch):
    kwargs, message = CASES[case]
    if case == "q5_0-tensor":  # quantizable by gguf.quants, written like any other quantized tensor
        orig = synth._add_weight

        def add(w, name, arr, qtype):
            if qtype == QT.Q5_0:
                w.add_tensor(name, __import__("gguf").quants.quantize(arr, qtype), raw_dtype=qtype)
            else:
                orig(w, name, arr, qtype)
        monkeypatch.setattr(synth, "_add_weight", add)
    path = tmp_path / f"{case}.gguf"
    synth.write_tiny_llama(str(path), **kwargs)
    out = tmp_path / "out"
    r = _run(path, out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("convert.py: error: ") and message in lines[0], lines[0]
    assert not out.exists() or not os.listdir(out)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    r = _run(bad, tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot read bad.gguf as GGUF" in r.stderr


def test_missing_file(tmp_path):
    r = _run(tmp_path / "nope.gguf", tmp_path / "out")
    assert r.returncode == 2 and "GGUF file not found" in r.stderr
