"""model.fast.onnx: the Q4_1 layers as lambda-llm's MatMulQ4_1, everything else model.onnx's own, weights shared."""

import collections
import os

import numpy as np
import onnx
import pytest
from onnx import helper

from lambda_llm_convert import ConversionError
from lambda_llm_convert.fast import DOMAIN, OP, OP_ATTENTION, OP_Q8, _raw_bytes, write_fast_graph
from lambda_llm_convert.gguf_source import load_gguf
from lambda_llm_convert.quant import q4_1_parts


def _load(path):
    return onnx.load(path, load_external_data=False)


def test_every_q4_1_layer_runs_on_the_kernel_and_the_rest_is_unchanged(artifact):
    fast = _load(os.path.join(artifact.path, "model.fast.onnx"))
    base = _load(os.path.join(artifact.path, "model.onnx"))
    ops = collections.Counter((n.domain or "", n.op_type) for n in fast.graph.node)
    assert ops[(DOMAIN, OP)] == 120  # q/k/v, o, gate/up, down in each of 30 layers
    assert ops[("", "Gemm")] == 0 and ops[("", "Split")] == 0 and ops[("com.microsoft", "QuickGelu")] == 0
    # The LM head: one exact MatMulQ8_0 instead of the 8-bit MatMulNBits and the rescoring of its top 8.
    assert ops[("com.microsoft", "MatMulNBits")] == 0 and ops[(DOMAIN, OP_Q8)] == 1
    assert ops[("", "TopK")] == 0 and ops[("", "ScatterElements")] == 0
    head = next(n for n in fast.graph.node if n.op_type == OP_Q8)
    assert list(head.input) == ["output_norm/out", "token_embd.q8", "lm_head.scales"] and list(head.output) == ["logits"]
    assert ops[("", "Reshape")] == 1  # the embedding to [batch, seq, hidden]
    swiglu = [n for n in fast.graph.node if n.op_type == OP and
              {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("activation") == b"swiglu"]
    assert len(swiglu) == 30
    # Attention: lambda-llm's row-by-row operator on GroupQueryAttention's inputs (less the total length) and outputs.
    assert ops[("com.microsoft", "GroupQueryAttention")] == 0 and ops[(DOMAIN, OP_ATTENTION)] == 30
    attention = {n.name: n for n in fast.graph.node if n.op_type == OP_ATTENTION}
    producers = {o: n for n in fast.graph.node for o in n.output}
    gqa = [n for n in base.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 30
    for n in gqa:
        new = attention[n.name.replace("GroupQueryAttention", OP_ATTENTION)]
        # The packed QKV straight from its projection (the 3-D reshape is gone), the rest as GroupQueryAttention's.
        assert producers[new.input[0]].op_type == OP
        assert list(new.input[1:]) == [*n.input[3:6], *n.input[7:9]] and new.output == n.output
        attrs = {a.name: helper.get_attribute_value(a) for a in new.attribute}
        assert attrs == {"num_heads": 9, "kv_num_heads": 3}
    # Each residual norm before a projection is that projection's: MatMulQ4_1(x, q4, dm, skip, gamma) with the norm's
    # epsilon, its second output the norm's sum. The first layer's plain norm and the final one (before the LM head)
    # stay nodes.
    base_norms = [n for n in base.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    base_producers = {o: n for n in base.graph.node for o in n.output}
    # A name of model.onnx before the reshapes between 2-D and 3-D that the fast graph drops.
    unshaped = lambda name: (base_producers[name].input[0] if name in base_producers and  # noqa: E731
                             base_producers[name].name.endswith("/resid_2d") else name)
    assert len(base_norms) == 60
    normed = [n for n in fast.graph.node if n.op_type == OP and len(n.input) == 5]
    assert len(normed) == 59
    for n in normed:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        norm = next(b for b in base_norms if [*map(unshaped, b.input[:2]), b.input[2]] == [n.input[0], *n.input[3:]])
        assert attrs["epsilon"] == 9.999999747378752e-06  # SmolLM2's, as a float32
        assert list(n.output[1:]) == [norm.output[3]]
        assert norm.output[0] not in {i for m in fast.graph.node for i in m.input}
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 1
    assert ops[("", "SimplifiedLayerNormalization")] == 1
    # Nodes that are neither rewritten nor dropped keep their names, inputs and attributes.
    kept = {n.name: n for n in fast.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"}
    assert list(kept) == ["output_norm"]
    for n in base.graph.node:
        if n.name in kept:
            assert kept[n.name].attribute == n.attribute and kept[n.name].input == n.input
    assert {o.domain: o.version for o in fast.opset_import}[DOMAIN] == 1
    assert [o.name for o in fast.graph.output] == [o.name for o in base.graph.output]
    assert [i.name for i in fast.graph.input] == [i.name for i in base.graph.input]


@pytest.mark.parametrize("graph", ["model.onnx", "model.fast.onnx"])
def test_after_the_last_attention_only_each_sequences_last_position_goes_on(artifact, graph):
    """The last layer's keys and values need every position, but only the last position's state reaches the LM head:
    its attention output and the residual stream are cut to that position ([batch, 1, ...]) before the output
    projection and the MLP, which then run one row per sequence instead of one per prompt token."""
    g = _load(os.path.join(artifact.path, graph)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in g.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    producers = {o: n for n in g.node for o in n.output}

    def through_reshapes(name):  # the tensor a node reads, before any reshape
        while producers.get(name) is not None and producers[name].op_type == "Reshape":
            name = producers[name].input[0]
        return name

    def last_position(n):  # Slice(x, [-1], [INT64_MAX], axes [1])
        return n.op_type == "Slice" and [consts.get(i) for i in n.input[1:]] == [[-1], [2**63 - 1], [1]]

    slices = {n.name: n for n in g.node if last_position(n)}
    assert sorted(slices) == ["blk.29/attn_last", "blk.29/resid_last"]
    attention = [n for n in g.node if n.op_type in ("GroupQueryAttention", OP_ATTENTION)]
    assert len(attention) == 30
    # The last attention's output goes on only through its slice: the output projection reads the slice.
    assert [c.name for c in consumers[attention[-1].output[0]]] == ["blk.29/attn_last"]
    o_proj = next(n for n in g.node if n.name.startswith("blk.29.attn_output/") and n.op_type in (OP, "MatMulNBits"))
    assert through_reshapes(o_proj.input[0]) == slices["blk.29/attn_last"].output[0]
    # The residual stream entering the last layer reaches its MLP's norm only cut to the last position.
    norm = next(n for n in g.node if n.name in ("blk.29/ffn_norm", "blk.29.ffn_gate_up/MatMulQ4_1"))
    skip = norm.input[1] if norm.op_type == "SkipSimplifiedLayerNormalization" else norm.input[3]
    assert through_reshapes(skip) == slices["blk.29/resid_last"].output[0]
    whole = through_reshapes(slices["blk.29/resid_last"].input[0])
    nodes = list(g.node)
    after = {n.name for n in nodes[nodes.index(attention[-1]) + 1:]}
    assert [c.op_type for c in consumers[whole] if c.name in after] in (["Slice"], ["Reshape"])


def test_weights_are_shared_and_scales_are_the_ggufs_f16_values(artifact, gguf_path):
    fast = _load(os.path.join(artifact.path, "model.fast.onnx"))
    base = {t.name: t for t in _load(os.path.join(artifact.path, "model.onnx")).graph.initializer}
    locations = collections.Counter()
    for t in fast.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            locations[info["location"]] += 1
            if info["location"] == "model.onnx.data":  # the same bytes model.onnx reads, not a copy
                assert t.external_data == base[t.name].external_data, t.name
    assert set(locations) == {"model.onnx.data", "model.fast.onnx.data"}
    assert locations["model.fast.onnx.data"] == 120
    # model.fast.onnx.data holds only the (scale, minimum) pairs: 4 bytes per 32 weights of the 120 layers.
    assert os.path.getsize(os.path.join(artifact.path, "model.fast.onnx.data")) < 14_000_000
    # One layer checked against the GGUF itself.
    inits = {t.name: t for t in fast.graph.initializer}
    dm = _raw_bytes(inits["blk.0.ffn_down.dm_f16"], artifact.path).view(np.float16).reshape(576, 48, 2)
    src = q4_1_parts(load_gguf(gguf_path).tensor("blk.0.ffn_down.weight"))
    assert np.array_equal(dm[..., 0].astype(np.float32), src.scales)
    assert np.array_equal(dm[..., 1].astype(np.float32), src.mins)
    q4 = _raw_bytes(inits["blk.0.ffn_down.q4"], artifact.path).reshape(src.packed.shape)
    assert np.array_equal(q4, src.packed)


def test_a_model_without_q4_1_layers_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(ConversionError, match="no exact Q4_1 layer"):
        write_fast_graph(str(tmp_path / "model.onnx"), str(tmp_path / "model.fast.onnx"))
    with pytest.raises(ConversionError, match="beside model.onnx"):
        os.makedirs(tmp_path / "elsewhere")
        write_fast_graph(str(tmp_path / "model.onnx"), str(tmp_path / "elsewhere" / "model.fast.onnx"))


def test_an_accuracy_level_4_body_gets_no_fast_graph(tmp_path):
    """The kernel is exact; an artifact converted to quantize activations (level 4) keeps ORT's kernels."""
    import synth
    from lambda_llm_convert.cli import convert

    gguf = tmp_path / "tiny.gguf"
    synth.write_tiny_llama(str(gguf))
    m0 = convert(str(gguf), str(tmp_path / "a0"), show_progress=False)
    m4 = convert(str(gguf), str(tmp_path / "a4"), accuracy_level=4, show_progress=False)
    assert "fast_model" in m0["files"] and os.path.exists(tmp_path / "a0" / "model.fast.onnx")
    assert "fast_model" not in m4["files"] and not os.path.exists(tmp_path / "a4" / "model.fast.onnx")
