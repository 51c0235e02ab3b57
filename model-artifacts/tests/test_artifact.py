"""The converter's outputs: manifest contents and format, ONNX header, byte-identical reconversion."""

import json
import os

import onnx

from lambda_llm_convert.cli import convert
from lambda_llm_convert.gguf_source import file_digest

MANIFEST_KEYS = {"id", "architecture", "layers", "heads", "kv_heads", "head_dim", "hidden_size", "vocab_size",
                 "context_length", "rope_theta", "bos_id", "add_bos", "eos_ids", "chat_template", "quantization",
                 "source", "converter_version", "ort_version", "onnx_ir_version", "files", "graph_optimized", "io"}
FILES = ("model.onnx", "model.onnx.data", "model.fast.onnx", "model.fast.onnx.data", "tokenizer.json", "manifest.json")


def test_manifest(artifact, gguf_path):
    path = os.path.join(artifact.path, "manifest.json")
    raw = open(path, encoding="utf-8").read()
    m = json.loads(raw)
    assert raw == json.dumps(m, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert set(m) == MANIFEST_KEYS
    assert m["id"] == "smollm2-135m-instruct" and m["architecture"] == "llama"
    assert (m["layers"], m["heads"], m["kv_heads"], m["head_dim"], m["hidden_size"]) == (30, 9, 3, 64, 576)
    assert (m["vocab_size"], m["context_length"], m["rope_theta"]) == (49152, 8192, 100000.0)
    assert m["bos_id"] == 1 and m["add_bos"] is False and m["eos_ids"] == [2]
    assert m["chat_template"].startswith("{% for message in messages %}")
    assert m["quantization"]["scheme"] == "q4_1-lossless"
    assert isinstance(m["quantization"]["body_accuracy_level"], int)
    sha, size = file_digest(gguf_path)
    assert m["source"] == {"file": os.path.basename(gguf_path), "sha256": sha, "size": size}
    assert m["converter_version"] == "0.1.0" and m["ort_version"] == "1.31.1" and m["onnx_ir_version"] == 10
    assert m["files"] == {"model": "model.onnx", "weights": "model.onnx.data", "tokenizer": "tokenizer.json",
                          "fast_model": "model.fast.onnx", "fast_weights": "model.fast.onnx.data"}
    assert m["quantization"]["fast_kernel"].startswith("120 Q4_1 layers as ai.lambda_llm.MatMulQ4_1")
    assert m["graph_optimized"] is True
    assert m["io"]["past_key"] == "past_key_values.{i}.key" and m["io"]["present_value"] == "present.{i}.value"


def test_onnx_header(artifact):
    m = onnx.load(os.path.join(artifact.path, "model.onnx"), load_external_data=False)
    assert m.ir_version == 10
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets[""] == 17 and opsets["com.microsoft"] == 1
    ops = {n.op_type for n in m.graph.node}
    for op in ("GatherBlockQuantized", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
               "MatMulNBits", "GroupQueryAttention"):
        assert op in ops
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 30
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 1
    # Optimized at build time: ORT's fusions are in the graph, the weights in the external file the runtime maps.
    assert "QuickGelu" in ops and "Sigmoid" not in ops
    assert len(m.graph.initializer) > 500
    assert sum(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer) > 500
    assert os.path.getsize(os.path.join(artifact.path, "model.onnx")) < 1_000_000
    assert os.path.getsize(os.path.join(artifact.path, "model.onnx.data")) > 100_000_000


def test_deterministic(artifact, gguf_path, tmp_path):
    """The same input gives byte-identical files."""
    acc = artifact.manifest["quantization"]["body_accuracy_level"]
    a = tmp_path / "a"
    convert(gguf_path, str(a), accuracy_level=acc, show_progress=False)
    if artifact.built_here:
        b = artifact.path
    else:
        b = tmp_path / "b"
        convert(gguf_path, str(b), accuracy_level=acc, show_progress=False)
    for name in FILES:
        assert (a / name).read_bytes() == open(os.path.join(b, name), "rb").read(), name
    assert sorted(os.listdir(a)) == sorted(FILES)  # no temp files left behind


def test_interrupted_write_keeps_no_half_artifact(tmp_path, monkeypatch):
    """A failure while writing leaves no temp files, and no manifest.json next to mixed old/new files."""
    import synth
    from lambda_llm_convert import cli

    gguf_path = tmp_path / "tiny.gguf"
    synth.write_tiny_llama(str(gguf_path))
    out = tmp_path / "art"
    convert(str(gguf_path), str(out), show_progress=False)
    before = {n: (out / n).read_bytes() for n in FILES}

    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        with open(path, "wb") as f:
            f.write(data)

    monkeypatch.setattr(cli, "_write_tmp", failing_write)
    try:
        convert(str(gguf_path), str(out), accuracy_level=4, show_progress=False)
    except KeyboardInterrupt:
        pass
    assert sorted(os.listdir(out)) == sorted(FILES)  # temp files removed, old artifact untouched
    assert {n: (out / n).read_bytes() for n in FILES} == before
