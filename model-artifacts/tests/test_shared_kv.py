"""GroupQueryAttention's shared-buffer mode (the Rust engine's way): one preallocated buffer per layer bound as both
past and present through IOBinding, attention_mask at the real length; same logits as passing new arrays."""

import numpy as np
import onnxruntime as ort

import run_ort


def _plain_run(session, manifest, chunks):
    """Reference driver without IOBinding: past = exactly the previous present arrays."""
    L, kvh, hd = manifest["layers"], manifest["kv_heads"], manifest["head_dim"]
    kv = [(np.zeros((1, kvh, 0, hd), np.float32), np.zeros((1, kvh, 0, hd), np.float32)) for _ in range(L)]
    outs = []
    for ids in chunks:
        past = kv[0][0].shape[2]
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, past + len(ids)), np.int64)}
        for i, (k, v) in enumerate(kv):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        res = session.run(None, feeds)
        names = [o.name for o in session.get_outputs()]
        d = dict(zip(names, res))
        assert d["logits"].shape == (1, 1, manifest["vocab_size"])
        assert d["present.0.key"].shape == (1, kvh, past + len(ids), hd)
        outs.append(d["logits"][0, -1])
        kv = [(d[f"present.{i}.key"], d[f"present.{i}.value"]) for i in range(L)]
    return outs


def test_shared_buffers_match_plain_run(runner):
    ids = runner.tokenizer.encode("Ceci n'est pas une pipe. 这不是烟斗。 This is not a pipe.").ids
    chunks = [ids[:9], ids[9:10], ids[10:14], ids[14:15], ids[15:16]]
    plain = _plain_run(runner.session, runner.manifest, chunks)
    for buf_len in (len(ids), 300):
        runner.reset(buf_len)
        shared = [runner.step(c) for c in chunks]
        assert runner.kv[0][0].numpy().shape == (1, runner.kv_heads, buf_len, runner.head_dim)
        for a, b in zip(plain, shared):
            assert np.abs(a - b).max() < 1e-3
            assert int(a.argmax()) == int(b.argmax())


def test_graph_io(runner):
    m = runner.manifest
    s = runner.session
    ins = {i.name: i for i in s.get_inputs()}
    outs = [o.name for o in s.get_outputs()]
    assert list(ins)[:2] == ["input_ids", "attention_mask"]
    assert ins["input_ids"].type == "tensor(int64)" and ins["attention_mask"].type == "tensor(int64)"
    assert all(isinstance(d, str) for d in ins["input_ids"].shape + ins["attention_mask"].shape)
    assert outs[0] == "logits"
    for i in range(m["layers"]):
        for kind in ("key", "value"):
            p = ins[f"past_key_values.{i}.{kind}"]
            assert p.type == "tensor(float)"
            assert isinstance(p.shape[0], str) and isinstance(p.shape[2], str)
            assert p.shape[1] == m["kv_heads"] and p.shape[3] == m["head_dim"]
            assert f"present.{i}.{kind}" in outs
    assert len(ins) == 2 + 2 * m["layers"] and len(outs) == 1 + 2 * m["layers"]
    assert ort.__version__ == m["ort_version"]


def test_stale_buffer_contents_are_ignored(runner):
    """A new sequence may reuse the buffers without clearing them: rows past the valid length are never read."""
    ids = runner.tokenizer.encode("The capital of France is Paris. The capital of Germany is").ids
    runner.reset(40)
    clean = [runner.step(ids[:5])] + [runner.step([t]) for t in ids[5:]]
    shape = (1, runner.kv_heads, 40, runner.head_dim)
    for fill in (1e4, np.nan):
        runner.kv = [(ort.OrtValue.ortvalue_from_numpy(np.full(shape, fill, np.float32)),
                      ort.OrtValue.ortvalue_from_numpy(np.full(shape, fill, np.float32)))
                     for _ in range(runner.layers)]
        runner.length = 0
        dirty = [runner.step(ids[:5])] + [runner.step([t]) for t in ids[5:]]
        for a, b in zip(clean, dirty):
            assert np.array_equal(a, b)
    runner.kv = None
