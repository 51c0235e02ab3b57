"""Fidelity of the default artifact: ONNX (KV-cache path) next-token argmax vs the numpy fp32 reference."""

import json

import numpy as np

import measure


def test_fidelity_128_positions(runner, reference, artifact_dir, results_dir):
    res = measure.fidelity(artifact_dir, reference, runner=runner)
    res["body_accuracy_level"] = runner.manifest["quantization"]["body_accuracy_level"]
    path = results_dir / "fidelity.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nfidelity: {res['agreement']}/{res['positions']} argmax agreement, logit RMS {res['logit_rms']:.4f}, "
          f"per prompt {res['per_prompt']} -> {path}")
    assert res["positions"] == 128
    assert res["agreement"] >= 125
    assert res["logit_rms"] < 0.5


def test_prefill_equals_steps(runner):
    """Whole-prompt prefill, chunked prefill (several tokens over a non-empty cache) and single steps agree."""
    ids = runner.tokenizer.encode("Le petit prince demanda: dessine-moi un mouton, s'il te plaît.").ids
    runner.reset(64)
    full = runner.step(ids)
    runner.reset(64)
    for s in range(0, len(ids), 5):
        chunked = runner.step(ids[s:s + 5])
    runner.reset(64)
    for t in ids:
        step = runner.step([t])
    assert np.abs(full - chunked).max() < 1e-2
    assert np.abs(full - step).max() < 1e-2
    assert int(full.argmax()) == int(chunked.argmax()) == int(step.argmax())
