"""model.fast.onnx: model.onnx with each exact Q4_1 linear layer as one `ai.lambda_llm.MatMulQ4_1` node.

In model.onnx a Q4_1 layer is `MatMulNBits(x, q4, scales, zero points 0)` plus `Gemm(blocksum(x), mins_t, that)`.
The fast graph replaces the pair by `MatMulQ4_1(x, q4, dm)`, whose kernel ships in the lambda-llm binary
(src/engine/custom_op.rs), drops the block sums nobody reads any more, and folds the SwiGLU after a gate/up projection
(`Split` + `QuickGelu` + `Mul`) into that projection's node (`activation="swiglu"`). With no `Gemm` left, which
wanted 2-D inputs, the body runs on [batch, seq, hidden] throughout: the reshapes between 2-D and 3-D go. The Q8_0
LM head (8-bit `MatMulNBits` at accuracy level 4 plus the exact rescoring of its top 8) becomes one exact
`MatMulQ8_0` over the same weights and scales. Each `GroupQueryAttention` (packed QKV, interleaved rotary, the
shared KV buffer) becomes `ai.lambda_llm.Attention` on the same inputs, which computes every query row on its own, so a
token gets the same bits in a prompt and in a one-token step (ONNX Runtime's sums a one-row product in another
order). Each `SkipSimplifiedLayerNormalization` before a projection folds into that `MatMulQ4_1` (`skip`, `gamma`,
`epsilon`; the residual sum as its second output): one node less each for ONNX Runtime's executor. `dm` holds each block's scale and minimum
side by side as f16 bit patterns (uint16 [N, K/32, 2]; the GGUF's own f16 values, so the round trip is checked to be
exact); it is the only new data and goes to model.fast.onnx.data. Every other initializer, the packed nibbles
included, stays model.onnx's own in model.onnx.data, which both graphs reference.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ConversionError
from .graph import BLOCK, MS

DOMAIN = "ai.lambda_llm"
OP = "MatMulQ4_1"
OP_Q8 = "MatMulQ8_0"
OP_ATTENTION = "Attention"


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _raw_bytes(t: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """The initializer's bytes, inline or external (read directly: onnx's reader refuses hard-linked data files,
    and the artifact cache hard-links them)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t).view(np.uint8)
    info = {e.key: e.value for e in t.external_data}
    path = os.path.join(base_dir, info["location"])
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(base_dir):
        raise ConversionError(f"initializer {t.name}: external data outside the artifact ({info['location']})")
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return np.frombuffer(f.read(int(info["length"])), dtype=np.uint8)


def _dm(scales: np.ndarray, mins_t: np.ndarray, name: str) -> np.ndarray:
    """[N, K/32, 2] f16 bit patterns of (scale, minimum); refuses values f16 cannot hold exactly."""
    n = mins_t.shape[1]
    d = scales.reshape(n, -1)
    m = mins_t.T
    dm = np.stack([d, m], axis=-1).astype(np.float16)
    if not np.array_equal(dm.astype(np.float32), np.stack([d, m], axis=-1)):
        raise ConversionError(f"{name}: scales or minimums are not f16 values (not a Q4_1 source)")
    return np.ascontiguousarray(dm).view(np.uint16)


def rewrite(model: onnx.ModelProto, base_dir: str, data_file: str) -> int:
    """Rewrites `model` (loaded without its external data) in place, appending the new `dm` tensors to
    `base_dir/data_file`; returns how many layers now use the kernel."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    replace: dict[int, onnx.NodeProto] = {}  # id(Gemm) -> new node
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    data = open(os.path.join(base_dir, data_file), "wb")
    try:
        _rewrite_nodes(g, inits, consumers, replace, drop, new_inits, base_dir, data, data_file)
        data.flush()
        os.fsync(data.fileno())
    finally:
        data.close()
    _apply(model, replace, drop, new_inits)
    _fuse_swiglu(model.graph)
    _stay_3d(model.graph)
    _exact_head(model.graph)
    _row_attention(model.graph)
    _prune(model.graph)  # the block sums read the norms' outputs too until they go
    _fuse_norms(model.graph)
    _prune(model.graph)
    return len(replace)


def _external(arr: np.ndarray, name: str, data, data_file: str) -> onnx.TensorProto:
    """`arr` appended (64-byte aligned) to the open data file, as an initializer that points there."""
    pad = (-data.tell()) % 64
    data.write(b"\0" * pad)
    offset = data.tell()
    raw = arr.tobytes()
    data.write(raw)
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _rewrite_nodes(g, inits, consumers, replace, drop, new_inits, base_dir, data, data_file) -> None:
    def is_zero(name: str) -> bool:
        t = inits.get(name)
        return t is not None and not np.any(_raw_bytes(t, base_dir))

    for n in g.node:
        if n.domain != MS or n.op_type != "MatMulNBits" or len(n.input) != 4:
            continue
        a = _attrs(n)
        if a.get("bits") != 4 or a.get("block_size") != BLOCK or not is_zero(n.input[3]):
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Gemm" or list(users[0].input[2:]) != [n.output[0]]:
            continue
        gemm = users[0]
        ga = _attrs(gemm)
        if ga.get("alpha", 1.0) != 1.0 or ga.get("beta", 1.0) != 1.0 or ga.get("transA", 0) or ga.get("transB", 0):
            continue
        mins_t = gemm.input[1]
        k, nn = int(a["K"]), int(a["N"])
        if mins_t not in inits or list(inits[mins_t].dims) != [k // BLOCK, nn]:
            continue
        name = n.name.replace("MatMulNBits", OP) if "MatMulNBits" in n.name else f"{n.name}/{OP}"
        scales = _raw_bytes(inits[n.input[2]], base_dir).view(np.float32)
        mins = _raw_bytes(inits[mins_t], base_dir).view(np.float32).reshape(k // BLOCK, nn)
        dm_name = f"{n.input[1].removesuffix('.q4')}.dm_f16"
        new_inits.append(_external(_dm(scales, mins, n.input[1]), dm_name, data, data_file))
        replace[id(gemm)] = helper.make_node(OP, [n.input[0], n.input[1], dm_name], [gemm.output[0]],
                                             name=name, domain=DOMAIN, K=k, N=nn)
        drop.add(id(n))


def _apply(model, replace, drop, new_inits) -> None:
    g = model.graph
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _prune(g) -> None:
    """Drops nodes whose outputs nobody reads any more (the block sums, the LM head's rescoring), then initializers
    no node reads."""
    nodes = list(g.node)
    graph_outputs = {o.name for o in g.output}
    while True:
        read = {i for n in nodes for i in n.input} | graph_outputs
        kept = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    read = {i for n in nodes for i in n.input}
    del g.node[:]
    g.node.extend(nodes)
    kept_inits = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept_inits)


def _exact_head(g) -> int:
    """The Q8_0 LM head — 8-bit `MatMulNBits` (accuracy level 4, int8 activations) producing the logits, directly or
    through the exact rescoring of its top k (`ScatterElements`) — becomes one exact `MatMulQ8_0` over the same
    weights and scales; returns 1 if rewritten."""
    producers = {o: n for n in g.node for o in n.output}
    for out in (o.name for o in g.output):
        last = producers.get(out)
        head = last
        if last is not None and last.op_type == "ScatterElements":
            head = producers.get(last.input[0])
        if head is None or head.domain != MS or head.op_type != "MatMulNBits" or len(head.input) != 3:
            continue
        a = _attrs(head)
        if a.get("bits") != 8 or a.get("block_size") != BLOCK:
            continue
        exact = helper.make_node(OP_Q8, list(head.input), [out], name="lm_head/MatMulQ8_0", domain=DOMAIN,
                                 K=int(a["K"]), N=int(a["N"]))
        nodes = [exact if n is last else n for n in g.node if n is not head or n is last]
        del g.node[:]
        g.node.extend(nodes)
        return 1
    return 0


# GroupQueryAttention's attributes other than the head counts and rotary: (absent means, accepted values). ONNX
# Runtime's optimizer writes their defaults out; qk_norm_epsilon only matters with norm inputs (there are none).
_GQA_DEFAULTS = {"causal": (1, 1), "local_window_size": (-1, -1), "softcap": (0.0, 0.0), "scale": (0.0, 0.0),
                 "smooth_softmax": (-1, -1, 0), "sliding_window_cache": (0, 0), "qk_output": (0, 0),
                 "k_quant_type": (b"NONE", b"NONE"), "v_quant_type": (b"NONE", b"NONE")}
_GQA_KNOWN = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "qk_norm_epsilon", *_GQA_DEFAULTS}


def _row_attention(g) -> int:
    """`GroupQueryAttention(qkv, "", "", past_key, past_value, seqlens_k, total_len, cos, sin)` with rotary
    (interleaved) and nothing else set -> `Attention(qkv, past_key, past_value, seqlens_k, cos, sin)`, the same
    outputs; returns how many were rewritten. The total length goes (the kernel reads each sequence's from
    seqlens_k), and with it the nodes computing it."""
    done = 0
    for i, n in enumerate(g.node):
        if n.domain != MS or n.op_type != "GroupQueryAttention" or len(n.input) != 9 or any(n.input[1:3]):
            continue
        a = _attrs(n)
        if a.get("do_rotary") != 1 or a.get("rotary_interleaved") != 1:
            continue
        if any(a.get(name, value) not in allowed for name, (value, *allowed) in _GQA_DEFAULTS.items()):
            continue
        if set(a) - _GQA_KNOWN:  # an attribute this rewrite does not know may change the result: keep the node
            continue
        inputs = [n.input[0], n.input[3], n.input[4], n.input[5], n.input[7], n.input[8]]
        g.node[i].CopyFrom(helper.make_node(OP_ATTENTION, inputs, list(n.output),
                                            name=n.name.replace("GroupQueryAttention", OP_ATTENTION), domain=DOMAIN,
                                            num_heads=a["num_heads"], kv_num_heads=a["kv_num_heads"]))
        done += 1
    return done


def _fuse_swiglu(g) -> int:
    """`y = MatMulQ4_1(x)`, `a, b = Split(y)`, `Mul(QuickGelu(a), b)` (alpha 1: SiLU) -> one node with
    activation="swiglu"; returns how many were fused."""
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    only = lambda name: consumers.get(name, [None])[0] if len(consumers.get(name, [])) == 1 else None  # noqa: E731
    outputs = {o.name for o in g.output}
    fused: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    for n in g.node:
        if n.domain != DOMAIN or n.op_type != OP or "activation" in _attrs(n):
            continue
        split = only(n.output[0])
        if split is None or split.op_type != "Split" or len(split.input) != 1 or len(split.output) != 2:
            continue
        if _attrs(split).get("axis", 0) != -1 or _attrs(n)["N"] % 2:
            continue
        gate, up = split.output
        act = only(gate)
        if act is None or act.op_type != "QuickGelu" or _attrs(act).get("alpha", 1.0) != 1.0:
            continue
        mul = only(act.output[0])
        if mul is None or mul.op_type != "Mul" or sorted(mul.input) != sorted([act.output[0], up]) or only(up) is not mul:
            continue
        if {n.output[0], gate, up, act.output[0]} & outputs:
            continue
        a = _attrs(n)
        fused[id(n)] = helper.make_node(OP, list(n.input), [mul.output[0]], name=n.name, domain=DOMAIN,
                                        K=a["K"], N=a["N"], activation="swiglu")
        gone |= {id(split), id(act), id(mul)}
    nodes = [fused.get(id(n), n) for n in g.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(nodes)
    return len(fused)


# The norms whose arithmetic the kernel repeats bit for bit (ONNX Runtime 1.31's `SkipSimplifiedLayerNormalization`
# sums the squares one by one in f32; its `SimplifiedLayerNormalization` does not, so the first layer's stays a node).
_NORMS = {(MS, "SkipSimplifiedLayerNormalization"): 3}


def _fuse_norms(g) -> int:
    """`SkipSimplifiedLayerNormalization(x, skip, gamma)` whose normalized output only a `MatMulQ4_1` reads -> that node
    on `(x, q4, dm, skip, gamma)` with the norm's epsilon, its second output the norm's sum `x + skip` where the graph
    reads it (the kernel computes the norm as ONNX Runtime does, bit for bit); returns how many were fused. One node
    less per norm for ONNX Runtime's executor to run."""
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producers = {o: n for n in g.node for o in n.output if o}
    outputs = {o.name for o in g.output}
    fused: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    for n in g.node:
        if n.domain != DOMAIN or n.op_type != OP or len(n.input) != 3 or len(n.output) != 1:
            continue
        norm = producers.get(n.input[0])
        arity = _NORMS.get((norm.domain, norm.op_type)) if norm is not None else None
        if arity is None or len(norm.input) != arity or len(consumers[n.input[0]]) != 1 or n.input[0] in outputs:
            continue
        a = _attrs(norm)
        if set(a) != {"epsilon"} or any(norm.output[1:3]):  # mean and inverse deviation: never read in practice
            continue
        total = norm.output[3] if len(norm.output) > 3 else ""
        inputs = [norm.input[0], n.input[1], n.input[2], norm.input[1], norm.input[2]]
        fused[id(n)] = helper.make_node(OP, inputs, [n.output[0]] + ([total] if total else []), name=n.name,
                                        domain=DOMAIN, **_attrs(n), epsilon=float(a["epsilon"]))
        gone.add(id(norm))
    nodes = [fused.get(id(n), n) for n in g.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(nodes)
    return len(fused)


def _stay_3d(g) -> int:
    """The embedding reshaped to [batch, seq, hidden] instead of [batch * seq, hidden], and the reshapes to 3-D
    before attention, around the last layer's residual slice and before the LM head, and back to 2-D after attention
    dropped (their consumers read their input);
    returns how many were dropped. Matches the builder's node names (graph.py), and leaves the graph as it is if
    they are not all there."""
    by_name = {n.name: n for n in g.node}
    embed = by_name.get("embed/reshape")
    producers = {o: n for n in g.node for o in n.output}
    bs = "ids/shape_b_s_any/out"
    if embed is None or bs not in producers or producers[bs].input[0] != "ids/shape/out":
        return 0
    dropped = [n for n in g.node if n.op_type == "Reshape" and
               n.name.endswith(("/qkv_3d", "/attn_2d", "/resid_3d", "/resid_2d", "output_norm/3d"))]
    rename = {n.output[0]: n.input[0] for n in dropped}
    if set(rename) & {o.name for o in g.output}:
        return 0
    embed.input[1] = bs
    first = [producers["ids/shape/out"], producers[bs]]
    gone = {id(n) for n in dropped} | {id(n) for n in first}
    nodes = first + [n for n in g.node if id(n) not in gone]
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del g.node[:]
    g.node.extend(nodes)
    return len(dropped)


def write_fast_graph(model_path: str, out_path: str, required: bool = True) -> int:
    """Writes the fast graph of `model_path` (which must reference its weights as external data) to `out_path` and
    its new tensors to `out_path` + ".data", in the same directory; returns the number of rewritten layers. A model
    with no Q4_1 layer to rewrite is refused, or with `required=False` gets no fast graph (0, nothing written)."""
    base = os.path.dirname(os.path.abspath(model_path))
    if os.path.dirname(os.path.abspath(out_path)) != base:
        raise ConversionError("the fast graph must sit beside model.onnx (it shares its weights file)")
    model = onnx.load(model_path, load_external_data=False)
    count = rewrite(model, base, os.path.basename(out_path) + ".data")
    if count == 0:
        os.remove(out_path + ".data")
        if not required:
            return 0
        raise ConversionError("no exact Q4_1 layer (MatMulNBits + mins Gemm) to rewrite")
    with open(out_path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    return count
