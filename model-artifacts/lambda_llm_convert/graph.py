"""ONNX graph builder: a Llama decoder on ONNX Runtime CPU contrib ops (MatMulNBits, GroupQueryAttention, ...)."""

from __future__ import annotations

import numpy as np
import onnx
from gguf import GGMLQuantizationType as QT
from onnx import TensorProto, helper, numpy_helper

from . import ONNX_IR_VERSION, ConversionError
from .gguf_source import GgufModel
from .quant import BLOCK, float_weight, q4_1_parts, q8_0_parts

MS = "com.microsoft"
OPSET = 17
# 8-bit MatMulNBits at accuracy_level 0..3 hits a fallback ~50x slower than level 4 (ORT 1.31 CPU). So Q8_0 weights
# use 8-bit MatMulNBits only at level 4 (activations quantized to int8 per 32-block); at the other levels they are
# split exactly into two 4-bit MatMulNBits (see _Builder.q8_split).
Q8_ACCURACY_LEVEL = 4

IO_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
    "logits": "logits",
}


def rope_cache(context: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [context, head_dim/2] for pair i of head dims (2i, 2i+1) (ggml's adjacent-pair rope)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Builder:
    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()
        self._const_cache: dict = {}
        self._blocksum_cache: dict = {}

    def name(self, base: str) -> str:
        n, k = base, 1
        while n in self._names:
            k += 1
            n = f"{base}_{k}"
        self._names.add(n)
        return n

    def init(self, base: str, arr: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def const_i64(self, values) -> str:
        key = ("i64", tuple(values) if isinstance(values, (list, tuple)) else values)
        if key not in self._const_cache:
            arr = np.array(values, dtype=np.int64)
            self._const_cache[key] = self.init(f"const_i64_{'_'.join(str(v) for v in np.atleast_1d(arr))}"
                                               .replace("-", "m"), arr)
        return self._const_cache[key]

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        nname = self.name(name or op)
        if outputs is None:
            outputs = [f"{nname}/out{j}" if n_out > 1 else f"{nname}/out" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=nname, domain=domain or None, **attrs))
        return outputs

    # -------- linear layers --------
    def blocksum(self, x: str, k: int) -> str:
        """Sum of x over each 32-wide block of its last axis, [..., K] -> [..., K/32], as one MatMul with a 0/1
        block-indicator matrix (fewer, cheaper nodes than Reshape + ReduceSum)."""
        if x not in self._blocksum_cache:
            key = ("blocks", k)
            if key not in self._const_cache:
                ind = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32))
                self._const_cache[key] = self.init(f"block_indicator_{k}", ind)
            s = self.node("MatMul", [x, self._const_cache[key]], name=f"{x}/blocksum")[0]
            self._blocksum_cache[x] = s
        return self._blocksum_cache[x]

    def linear(self, x: str, tensors: list, k: int, name: str, acc: int, two_d: bool = True) -> str:
        """x [T, K] (two_d) or [b, s, K] times the concatenation (along N) of the given GGUF weights."""
        types = {t.tensor_type for t in tensors}
        if len(types) > 1:
            parts = [self.linear(x, [t], k, f"{name}.{j}", acc, two_d) for j, t in enumerate(tensors)]
            return self.node("Concat", parts, name=f"{name}/concat", axis=-1)[0]
        qtype = types.pop()
        if qtype == QT.Q4_1:
            ps = [q4_1_parts(t) for t in tensors]
            packed = np.concatenate([p.packed for p in ps], axis=0)
            scales = np.concatenate([p.scales for p in ps], axis=0)
            mins = np.concatenate([p.mins for p in ps], axis=0)
            n, blocks = scales.shape
            zp = np.zeros((n, (blocks * 4 + 7) // 8), dtype=np.uint8)
            b = self.init(f"{name}.q4", packed)
            s = self.init(f"{name}.scales", scales)
            z = self.init(f"{name}.zero_points", zp)
            y = self.node("MatMulNBits", [x, b, s, z], name=f"{name}/MatMulNBits", domain=MS,
                          K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=acc)[0]
            mt = self.init(f"{name}.mins_t", np.ascontiguousarray(mins.T))
            bsum = self.blocksum(x, k)
            if two_d:  # y + blocksum(x) @ mins^T in one Gemm
                return self.node("Gemm", [bsum, mt, y], name=f"{name}/mins")[0]
            corr = self.node("MatMul", [bsum, mt], name=f"{name}/mins")[0]
            return self.node("Add", [y, corr], name=f"{name}/add_mins")[0]
        if qtype == QT.Q8_0:
            ps = [q8_0_parts(t) for t in tensors]
            values = np.concatenate([p.values for p in ps], axis=0)
            scales = np.concatenate([p.scales for p in ps], axis=0)
            if acc != Q8_ACCURACY_LEVEL:
                return self.q8_split(x, values, scales, k, name, acc)
            n = scales.shape[0]
            b = self.init(f"{name}.q8", values)
            s = self.init(f"{name}.scales", scales)
            return self.node("MatMulNBits", [x, b, s], name=f"{name}/MatMulNBits", domain=MS,
                             K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=Q8_ACCURACY_LEVEL)[0]
        if qtype in (QT.F32, QT.F16):
            w = np.concatenate([float_weight(t) for t in tensors], axis=0)  # (N, K)
            wt = self.init(f"{name}.weight_t", np.ascontiguousarray(w.T))
            return self.node("MatMul", [x, wt], name=f"{name}/MatMul")[0]
        raise ConversionError(f"unsupported tensor type {qtype.name}")

    def q8_split(self, x: str, values: np.ndarray, scales: np.ndarray, k: int, name: str, acc: int,
                 output: str | None = None) -> str:
        """Exact Q8_0 product as two 4-bit MatMulNBits (8-bit MatMulNBits is only fast at accuracy_level 4, which
        quantizes the activations): q + 128 = 16 * hi + lo, so d * q = 16d * (hi - 8) + d * lo, hi with the default
        zero point 8 and lo with explicit zero points 0."""
        n, blocks = scales.shape
        pack = lambda v: np.ascontiguousarray((v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8))  # noqa: E731
        yh = self.node("MatMulNBits", [x, self.init(f"{name}.q8_hi", pack(values >> 4)),
                                       self.init(f"{name}.hi_scales", scales * np.float32(16))],
                       name=f"{name}/hi", domain=MS, K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=acc)[0]
        yl = self.node("MatMulNBits", [x, self.init(f"{name}.q8_lo", pack(values & 0x0F)),
                                       self.init(f"{name}.lo_scales", scales),
                                       self.init(f"{name}.lo_zero_points",
                                                 np.zeros((n, (blocks * 4 + 7) // 8), np.uint8))],
                       name=f"{name}/lo", domain=MS, K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=acc)[0]
        return self.node("Add", [yh, yl], name=f"{name}/add", outputs=[output] if output else None)[0]


def _norm_weight(t) -> np.ndarray:
    return np.asarray(t.data).astype(np.float32).reshape(-1)


def lm_head_mode(model: GgufModel, acc: int, requested: str) -> str:
    """The head's effective mode: the requested one for a Q8_0 head; otherwise 'exact' (F32/F16, or Q4_1 with fp32
    activations) or 'q4_1-int8-activations'."""
    t = model.tensor("token_embd.weight" if model.tied_embeddings else "output.weight")
    if t.tensor_type == QT.Q8_0:
        return requested
    if t.tensor_type == QT.Q4_1 and acc == Q8_ACCURACY_LEVEL:
        return "q4_1-int8-activations"
    return "exact"


def describe_lm_head(model: GgufModel, acc: int, lm_head: str = "q8") -> str:
    t = model.tensor("token_embd.weight" if model.tied_embeddings else "output.weight")
    src = "tied token_embd" if model.tied_embeddings else "output.weight"
    if t.tensor_type == QT.Q8_0 and lm_head == "exact":
        return f"q8_0 exact as two 4-bit MatMulNBits accuracy_level 0 ({src})"
    if t.tensor_type == QT.Q8_0 and lm_head == "rescore":
        return (f"q8_0 8-bit MatMulNBits accuracy_level {Q8_ACCURACY_LEVEL}, top {RESCORE_K} logits recomputed "
                f"exactly in fp32 ({src})")
    if t.tensor_type == QT.Q8_0:
        return f"q8_0 8-bit MatMulNBits accuracy_level {Q8_ACCURACY_LEVEL} ({src})"
    if t.tensor_type == QT.Q4_1:
        return f"q4_1 lossless 4-bit MatMulNBits accuracy_level {acc} + mins MatMul ({src})"
    return f"{t.tensor_type.name.lower()} as float32 MatMul ({src})"


LM_HEAD_MODES = ("q8", "exact", "rescore")  # for a Q8_0 head (the tied SmolLM2 embedding)
RESCORE_K = 8


def build_model(model: GgufModel, acc: int, progress=None, lm_head: str = "q8") -> onnx.ModelProto:
    """The whole decoder graph; `acc` is the accuracy_level of the body's 4-bit MatMulNBits, `lm_head` one of
    LM_HEAD_MODES: q8 (8-bit MatMulNBits, accuracy_level 4), exact (two 4-bit MatMulNBits, level 0), rescore (q8,
    then its top RESCORE_K logits recomputed exactly)."""
    if lm_head not in LM_HEAD_MODES:
        raise ConversionError(f"unknown LM head mode '{lm_head}'")
    hp = model.hp
    b = _Builder()
    L, H, KVH, D = hp.layers, hp.heads, hp.kv_heads, hp.head_dim
    hidden = hp.hidden

    # ---- inputs / outputs ----
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, hp.vocab])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", KVH, "past_sequence_length", D]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", KVH, "present_sequence_length", D]))
    for n in ["input_ids", "attention_mask", "logits"]:
        b._names.add(n)

    # ---- attention bookkeeping computed in the graph ----
    mask_sum = b.node("ReduceSum", ["attention_mask", b.const_i64([1])], name="mask/sum", keepdims=0)[0]
    seqlens = b.node("Sub", [mask_sum, b.const_i64(1)], name="mask/sum_minus_1")[0]
    seqlens_k = b.node("Cast", [seqlens], name="mask/seqlens_k", to=TensorProto.INT32)[0]
    mask_shape = b.node("Shape", ["attention_mask"], name="mask/shape")[0]
    total = b.node("Gather", [mask_shape, b.const_i64(1)], name="mask/total_len", axis=0)[0]
    total_len = b.node("Cast", [total], name="mask/total_sequence_length", to=TensorProto.INT32)[0]
    cos, sin = rope_cache(hp.context, D, hp.rope_theta)
    cos_name = b.init("rope.cos_cache", cos)
    sin_name = b.init("rope.sin_cache", sin)

    # ---- embedding ----
    emb = model.tensor("token_embd.weight")
    head_shares_embedding = model.tied_embeddings and emb.tensor_type == QT.Q8_0
    gscales = None
    if emb.tensor_type == QT.Q8_0:
        p = q8_0_parts(emb)  # values (vocab, blocks, 32), scales (vocab, blocks)
        data = b.init("token_embd.q8", p.values)
        gscales = b.init("token_embd.gather_scales", p.scales[:, :, None])
        g = b.node("GatherBlockQuantized", [data, "input_ids", gscales], name="embed/GatherBlockQuantized",
                   domain=MS, bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=2)[0]
        h = b.node("Reshape", [g, b.const_i64([-1, hidden])], name="embed/reshape")[0]
    else:
        table = b.init("token_embd.weight", np.ascontiguousarray(_tensor_table(emb)))
        h = b.node("Gather", [table, "input_ids"], name="embed/Gather", axis=0)[0]
        h = b.node("Reshape", [h, b.const_i64([-1, hidden])], name="embed/reshape")[0]
    # The body works on 2-D [batch * seq, hidden] activations (MatMulNBits, norms and Gemm accept them);
    # only GroupQueryAttention sees [batch, seq, *].
    ids_shape = b.node("Shape", ["input_ids"], name="ids/shape")[0]
    bs_shape = b.node("Concat", [ids_shape, b.const_i64([-1])], name="ids/shape_b_s_any", axis=0)[0]

    eps = float(hp.rms_eps)
    x = b.node("SimplifiedLayerNormalization", [h, b.init("blk.0.attn_norm.weight",
               _norm_weight(model.tensor("blk.0.attn_norm.weight")))], name="blk.0/attn_norm",
               axis=-1, epsilon=eps, stash_type=1)[0]

    it = range(L)
    if progress is not None:
        it = progress(it)
    for i in it:
        p = f"blk.{i}"
        T = lambda s: model.tensor(f"{p}.{s}.weight")  # noqa: E731
        qkv = b.linear(x, [T("attn_q"), T("attn_k"), T("attn_v")], hidden, f"{p}.attn_qkv", acc)
        qkv = b.node("Reshape", [qkv, bs_shape], name=f"{p}/qkv_3d")[0]
        attn = b.node("GroupQueryAttention",
                      [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                       seqlens_k, total_len, cos_name, sin_name],
                      name=f"{p}/GroupQueryAttention", domain=MS,
                      outputs=[f"{p}/attn_out", f"present.{i}.key", f"present.{i}.value"],
                      num_heads=H, kv_num_heads=KVH, do_rotary=1, rotary_interleaved=1)[0]
        if i + 1 == L:
            # Only the last position of each sequence reaches the LM head, so after the last attention (whose keys and
            # values every position needs) the rest of the layer runs on that position alone, as llama.cpp does: for
            # a prompt of n tokens, n - 1 rows less of the last o_proj and MLP. Each row's arithmetic is unchanged.
            attn, h = _last_positions(b, attn, h, bs_shape, p, hidden)
        attn = b.node("Reshape", [attn, b.const_i64([-1, H * D])], name=f"{p}/attn_2d")[0]
        o = b.linear(attn, [T("attn_output")], H * D, f"{p}.attn_output", acc)
        ffn_norm = b.init(f"{p}.ffn_norm.weight", _norm_weight(T("ffn_norm")))
        x2, h = b.node("SkipSimplifiedLayerNormalization", [o, h, ffn_norm], name=f"{p}/ffn_norm", domain=MS,
                       outputs=[f"{p}/ffn_in", "", "", f"{p}/resid_attn"], epsilon=eps)[0::3]
        gu = b.linear(x2, [T("ffn_gate"), T("ffn_up")], hidden, f"{p}.ffn_gate_up", acc)
        gate, up = b.node("Split", [gu], n_out=2, name=f"{p}/ffn_split", axis=-1)
        sig = b.node("Sigmoid", [gate], name=f"{p}/ffn_sigmoid")[0]
        silu = b.node("Mul", [gate, sig], name=f"{p}/ffn_silu")[0]
        act = b.node("Mul", [silu, up], name=f"{p}/ffn_act")[0]
        down = b.linear(act, [T("ffn_down")], hp.ffn, f"{p}.ffn_down", acc)
        if i + 1 < L:
            nname, w = f"blk.{i + 1}/attn_norm", model.tensor(f"blk.{i + 1}.attn_norm.weight")
            gname = f"blk.{i + 1}.attn_norm.weight"
        else:
            nname, w, gname = "output_norm", model.tensor("output_norm.weight"), "output_norm.weight"
        x, h = b.node("SkipSimplifiedLayerNormalization", [down, h, b.init(gname, _norm_weight(w))], name=nname,
                      domain=MS, outputs=[f"{nname}/out", "", "", f"{p}/resid_ffn"], epsilon=eps)[0::3]

    # ---- LM head: x already holds the last position only ([batch, hidden]) ----
    last = b.node("Reshape", [x, b.const_i64([-1, 1, hidden])], name="output_norm/3d",
                  outputs=["last_position/out"])[0]
    head = model.tensor("token_embd.weight" if model.tied_embeddings else "output.weight")
    if head.tensor_type == QT.Q8_0 and lm_head == "exact":
        _q8_head_exact(b, last, head, hidden, hp.vocab)
    elif head.tensor_type == QT.Q8_0:
        if head_shares_embedding:  # the same uint8 (vocab, blocks, 32) initializer feeds GatherBlockQuantized too
            hdata = data
        else:
            hdata = b.init("lm_head.q8", q8_0_parts(head).values)
        hs = b.init("lm_head.scales", q8_0_parts(head).scales)
        approx = b.node("MatMulNBits", [last, hdata, hs], name="lm_head/MatMulNBits", domain=MS,
                        outputs=None if lm_head == "rescore" else ["logits"],
                        K=hidden, N=hp.vocab, bits=8, block_size=BLOCK, accuracy_level=Q8_ACCURACY_LEVEL)[0]
        if lm_head == "rescore":
            _rescore_top_k(b, last, approx, hdata, gscales if head_shares_embedding else None, head, hidden)
    else:
        y = b.linear(last, [head], hidden, "lm_head", acc, two_d=False)
        b.node("Identity", [y], name="lm_head/out", outputs=["logits"])

    graph = helper.make_graph(b.nodes, "lambda_llm_llama", inputs, outputs, b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                          producer_name="lambda-llm-convert", ir_version=ONNX_IR_VERSION)
    return m


def _tensor_table(t) -> np.ndarray:
    from .gguf_source import tensor_f32
    return tensor_f32(t)


def _q8_head_exact(b: _Builder, x: str, t, k: int, n: int) -> None:
    p = q8_0_parts(t)
    b.q8_split(x, p.values, p.scales, k, "lm_head", 0, output="logits")


def _last_positions(b: _Builder, attn: str, h: str, bs_shape: str, p: str, hidden: int) -> tuple[str, str]:
    """The last position of each sequence: of the attention output ([batch, seq, H*D], 3-D) and of the residual
    stream (2-D [batch * seq, hidden], through 3-D)."""
    last = lambda x, name: b.node("Slice", [x, b.const_i64([-1]), b.const_i64([np.iinfo(np.int64).max]),  # noqa: E731
                                            b.const_i64([1])], name=name)[0]
    attn = last(attn, f"{p}/attn_last")
    h = b.node("Reshape", [h, bs_shape], name=f"{p}/resid_3d")[0]
    h = last(h, f"{p}/resid_last")
    h = b.node("Reshape", [h, b.const_i64([-1, hidden])], name=f"{p}/resid_2d")[0]
    return attn, h


def _rescore_top_k(b: _Builder, x: str, approx: str, data: str, gscales: str | None, t, hidden: int) -> None:
    """Recompute the RESCORE_K best approximate logits exactly (fp32 dot products with the dequantized rows)."""
    if gscales is None:
        gscales = b.init("lm_head.gather_scales", q8_0_parts(t).scales[:, :, None])
    k = min(RESCORE_K, t.shape[1])
    _, idx = b.node("TopK", [approx, b.const_i64([k])], n_out=2, name="lm_head/topk", axis=-1)
    rows = b.node("GatherBlockQuantized", [data, idx, gscales], name="lm_head/rows", domain=MS,
                  bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=2)[0]
    rows = b.node("Reshape", [rows, b.const_i64([0, 0, k, hidden])], name="lm_head/rows_reshape")[0]
    xc = b.node("Unsqueeze", [x, b.const_i64([-1])], name="lm_head/x_col")[0]
    exact = b.node("MatMul", [rows, xc], name="lm_head/rescore")[0]
    exact = b.node("Squeeze", [exact, b.const_i64([-1])], name="lm_head/rescore_squeeze")[0]
    b.node("ScatterElements", [approx, idx, exact], name="lm_head/scatter", outputs=["logits"], axis=-1)
