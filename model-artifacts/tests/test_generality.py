"""Tiny synthetic Llama GGUFs (mixed F32/F16/Q8_0/Q4_1 tensors, tied and untied heads) convert, and their ONNX
logits match the numpy reference."""

import json
import os

import numpy as np
import pytest

import run_ort
import synth
from lambda_llm_convert.cli import convert
from reference import Reference
from synth import QT

VARIANTS = {
    # explicit Q4_1 output.weight, Q8_0 embedding, per-layer mix of all four types
    "mixed-untied": dict(types=synth.MIXED_TYPES),
    # tied Q8_0 embedding: GatherBlockQuantized + the shared 8-bit head with exact top-k rescoring
    "tied-q8_0": dict(tied=True),
    # tied F32 embedding (plain Gather + MatMul head), all-Q8_0 body
    "tied-f32-q8_0-body": dict(tied=True, embd_type=QT.F32, default_type=QT.Q8_0),
    # Q4_1 embedding and F16 output head
    "q4_1-embd-f16-head": dict(embd_type=QT.Q4_1, output_type=QT.F16),
    # tied Q4_1 embedding: f32 Gather table + lossless Q4_1 head
    "tied-q4_1": dict(tied=True, embd_type=QT.Q4_1, default_type=QT.F16),
}
TEXT = "<|im_start|>user\nThe cat sat on the mat; 1234 dogs ran at the bar.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("acc", [0, 4])
def test_tiny_llama(tmp_path, variant, acc):
    gguf_path = tmp_path / "tiny.gguf"
    synth.write_tiny_llama(str(gguf_path), **VARIANTS[variant])
    out = tmp_path / "art"
    convert(str(gguf_path), str(out), model_id="tiny", accuracy_level=acc, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == 2 and manifest["kv_heads"] == 2 and manifest["head_dim"] == 16
    assert manifest["vocab_size"] == len(synth.tiny_vocab()[0])

    ref = Reference(str(gguf_path))
    runner = run_ort.load(str(out))
    ids = runner.tokenizer.encode(TEXT).ids
    assert ids[0] == 1 and len(ids) > 20
    r = ref.logits(ids)
    runner.reset(len(ids) + 4)
    first = 6
    o = [runner.step(ids[:first])]
    o += [runner.step([t]) for t in ids[first:]]
    o = np.stack(o)
    r = r[first - 1:]
    rms = float(np.sqrt(np.mean((o - r) ** 2)))
    print(f"\n{variant} acc {acc}: argmax {int((o.argmax(-1) == r.argmax(-1)).sum())}/{len(r)}, RMS {rms:.2e}, "
          f"logit std {r.std():.2f}")
    if acc == 0:  # exact weights and fp32 activations
        assert (o.argmax(-1) == r.argmax(-1)).all()
        top = r.argmax(-1)
        rows = np.arange(len(top))
        assert np.abs(o[rows, top] - r[rows, top]).max() < 1e-3  # the top logits are exact in every variant
        if manifest["quantization"]["lm_head_mode"] == "rescore":
            assert rms < 0.01 * r.std()  # 8-bit head with int8 activations; its top 8 recomputed exactly
        else:
            assert rms < 1e-3
    else:
        # int8 activations everywhere; random tiny models amplify that error more than trained ones
        assert rms < 0.15 * r.std()
        assert (o.argmax(-1) == r.argmax(-1)).mean() >= 0.8


def test_tiny_tokenizer_roundtrip(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    synth.write_tiny_llama(str(gguf_path))
    convert(str(gguf_path), str(tmp_path / "art"), show_progress=False)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tmp_path, "art", "tokenizer.json"))
    for text in ["the theater", "Ünïcödé 文字 🙂", TEXT, " 12 345\n\t"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.encode(" the").ids == [tok.token_to_id("Ġthe")]
