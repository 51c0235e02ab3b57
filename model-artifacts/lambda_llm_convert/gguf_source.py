"""GGUF reading and validation: hyper-parameters, tensors and tokenizer data of a Llama-architecture GGUF."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from . import ConversionError

SUPPORTED_TYPES = {QT.F32, QT.F16, QT.Q4_1, QT.Q8_0}
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class HParams:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context: int
    vocab: int


@dataclass
class TokenizerData:
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool


@dataclass
class GgufModel:
    path: str
    arch: str
    hp: HParams
    tok: TokenizerData
    chat_template: str | None
    tensors: dict = field(default_factory=dict)  # name -> gguf ReaderTensor
    tied_embeddings: bool = True

    def tensor(self, name: str):
        return self.tensors[name]


def file_digest(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest(), os.path.getsize(path)


def _value(reader: GGUFReader, key: str, default=None, required=False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ConversionError(f"GGUF metadata key '{key}' is missing")
        return default
    return f.contents()


def _tensor_shape(t) -> tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


def load_gguf(path: str) -> GgufModel:
    """Read and validate a GGUF; raise ConversionError for anything the converter cannot convert exactly."""
    if not os.path.isfile(path):
        raise ConversionError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - any parse failure is a refusal
        raise ConversionError(f"cannot read {os.path.basename(path)} as GGUF: {e}") from e

    arch = _value(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ConversionError(f"unsupported architecture '{arch}' (only 'llama' is supported)")

    def hp(key, default=None, required=True):
        return _value(reader, f"llama.{key}", default, required and default is None)

    layers = int(hp("block_count"))
    hidden = int(hp("embedding_length"))
    ffn = int(hp("feed_forward_length"))
    heads = int(hp("attention.head_count"))
    kv_heads = int(hp("attention.head_count_kv", heads))
    context = int(hp("context_length"))
    rms_eps = float(hp("attention.layer_norm_rms_epsilon"))
    rope_theta = float(hp("rope.freq_base", 10000.0))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ConversionError(f"head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    if hidden % heads:
        raise ConversionError(f"embedding_length {hidden} is not a multiple of head_count {heads}")
    head_dim = int(hp("attention.key_length", hidden // heads))
    if int(hp("attention.value_length", head_dim)) != head_dim:
        raise ConversionError("attention.key_length != attention.value_length is not supported")
    rope_dims = int(hp("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(f"partial rotary (rope.dimension_count {rope_dims} != head dim {head_dim}) "
                              "is not supported")
    if head_dim % 16:
        raise ConversionError(f"head dim {head_dim} is not a multiple of 16")
    scaling = _value(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConversionError(f"rope scaling '{scaling}' is not supported")
    if int(hp("expert_count", 0)) > 0:
        raise ConversionError("mixture-of-experts Llama models are not supported")

    # tokenizer
    tok_model = _value(reader, "tokenizer.ggml.model", required=True)
    tokens = _value(reader, "tokenizer.ggml.tokens", required=True)
    token_types = _value(reader, "tokenizer.ggml.token_type")
    if token_types is None:
        token_types = [1] * len(tokens)
    merges = _value(reader, "tokenizer.ggml.merges", [])
    vocab = int(hp("vocab_size", len(tokens)))
    if vocab != len(tokens):
        raise ConversionError(f"vocab_size {vocab} != number of tokens {len(tokens)}")

    def opt_id(key):
        v = _value(reader, key)
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < vocab:
            raise ConversionError(f"{key} {v} is outside the vocabulary")
        return v

    tok = TokenizerData(
        model=str(tok_model),
        pre=str(_value(reader, "tokenizer.ggml.pre", "default")),
        tokens=list(tokens),
        token_types=[int(t) for t in token_types],
        merges=list(merges),
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        eot_id=opt_id("tokenizer.ggml.eot_token_id"),
        add_bos=bool(_value(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_value(reader, "tokenizer.ggml.add_eos_token", False)),
    )
    if tok.eos_id is None:
        raise ConversionError("GGUF metadata key 'tokenizer.ggml.eos_token_id' is missing")
    if tok.add_bos and tok.bos_id is None:
        raise ConversionError("add_bos_token is true but 'tokenizer.ggml.bos_token_id' is missing")

    chat_template = _value(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ConversionError(
                f"tensor '{t.name}' has unsupported type {t.tensor_type.name} "
                "(supported: F32, F16, Q4_1, Q8_0)")

    hpv = HParams(layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  rope_theta=rope_theta, rms_eps=rms_eps, context=context, vocab=vocab)

    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    # expected tensors and ggml-order shapes (K input features first, N output features second)
    expected = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    for i in range(layers):
        p = f"blk.{i}."
        expected.update({
            p + "attn_norm.weight": (hidden,),
            p + "attn_q.weight": (hidden, q_dim),
            p + "attn_k.weight": (hidden, kv_dim),
            p + "attn_v.weight": (hidden, kv_dim),
            p + "attn_output.weight": (q_dim, hidden),
            p + "ffn_norm.weight": (hidden,),
            p + "ffn_gate.weight": (hidden, ffn),
            p + "ffn_up.weight": (hidden, ffn),
            p + "ffn_down.weight": (ffn, hidden),
        })
    tied = "output.weight" not in tensors
    if not tied:
        expected["output.weight"] = (hidden, vocab)
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(f"tensor '{name}' is missing")
        got = _tensor_shape(tensors[name])
        if got != shape:
            raise ConversionError(f"tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        if len(shape) == 1 and tensors[name].tensor_type not in (QT.F32, QT.F16):
            raise ConversionError(f"norm tensor '{name}' must be F32 or F16")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ConversionError(f"unexpected tensor '{extra[0]}' (e.g. rope_freqs/biases are not supported)"
                              + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))

    return GgufModel(path=path, arch=arch, hp=hpv, tok=tok, chat_template=chat_template,
                     tensors=tensors, tied_embeddings=tied)


def tensor_f32(t) -> np.ndarray:
    """Dequantized (N, K) float32 array of a ReaderTensor (1-D tensors stay 1-D)."""
    from gguf.quants import dequantize

    if t.tensor_type == QT.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == QT.F16:
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        arr = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)
    shape = tuple(reversed(_tensor_shape(t)))
    return arr.reshape(shape)
