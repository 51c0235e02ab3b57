"""Tiny synthetic GGUF files (written with gguf.GGUFWriter) for the generality and refusal tests."""

from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a t", "Ġ w", "o r", "e n", "i s",
          "Ġ o", "Ġ c", "e s", "Ġ b", "i t", "Ġ f", "a n", "Ġ p", "a r", "a l", "Ġ m", "e d", "o u", "l e",
          "Ġ 1", "Ġ d"]


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(SPECIALS) + bytes_to_unicode()
    for m in MERGES:
        a, b = m.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(MERGES)


def _add_weight(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: QT) -> None:
    if qtype == QT.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    elif qtype in (QT.Q4_1, QT.Q8_0):
        w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    elif qtype == QT.Q4_K:  # not quantizable here: raw bytes of the right size are enough for a refusal test
        n, k = arr.shape
        w.add_tensor(name, np.zeros((n, k // 256 * 144), dtype=np.uint8), raw_dtype=qtype)
    else:
        raise ValueError(qtype)


def write_tiny_llama(path: str, *, types: dict | None = None, tied: bool = False, layers: int = 2, hidden: int = 64,
                     heads: int = 4, kv_heads: int = 2, ffn: int = 128, context: int = 256, seed: int = 0,
                     arch: str = "llama", skip_keys: tuple = (), default_type: QT = QT.Q4_1,
                     embd_type: QT = QT.Q8_0, output_type: QT = QT.Q4_1, pre: str = "smollm",
                     tokenizer_model: str = "gpt2") -> None:
    """Write a random tiny Llama GGUF. `types` maps tensor names ('blk.0.attn_q.weight', ...) to GGML types."""
    types = types or {}
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = tiny_vocab()
    vocab = len(tokens)
    hd = hidden // heads
    w = gguf.GGUFWriter(path, arch)
    kv = {
        "block_count": lambda: w.add_block_count(layers),
        "context_length": lambda: w.add_context_length(context),
        "embedding_length": lambda: w.add_embedding_length(hidden),
        "feed_forward_length": lambda: w.add_feed_forward_length(ffn),
        "head_count": lambda: w.add_head_count(heads),
        "head_count_kv": lambda: w.add_head_count_kv(kv_heads),
        "rope_freq_base": lambda: w.add_rope_freq_base(10000.0),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(1e-5),
        "rope_dims": lambda: w.add_rope_dimension_count(hd),
        "vocab_size": lambda: w.add_vocab_size(vocab),
    }
    for k, f in kv.items():
        if k not in skip_keys:
            f()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(n, k, scale=None):
        return (rng.standard_normal((n, k)) * (scale if scale is not None else 1.0 / np.sqrt(k))).astype(np.float32)

    def vec(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    _add_weight(w, "token_embd.weight", mat(vocab, hidden, 1.0), embd_type)
    _add_weight(w, "output_norm.weight", vec(hidden), QT.F32)
    if not tied:
        _add_weight(w, "output.weight", mat(vocab, hidden, 0.5), output_type)
    shapes = {"attn_q": (heads * hd, hidden), "attn_k": (kv_heads * hd, hidden), "attn_v": (kv_heads * hd, hidden),
              "attn_output": (hidden, heads * hd), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(layers):
        _add_weight(w, f"blk.{i}.attn_norm.weight", vec(hidden), types.get(f"blk.{i}.attn_norm.weight", QT.F32))
        _add_weight(w, f"blk.{i}.ffn_norm.weight", vec(hidden), types.get(f"blk.{i}.ffn_norm.weight", QT.F32))
        for name, (n, k) in shapes.items():
            full = f"blk.{i}.{name}.weight"
            _add_weight(w, full, mat(n, k, 2.0 / np.sqrt(k)), types.get(full, default_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MIXED_TYPES = {
    # layer 0: q/k/v of three different types (per-part MatMuls + Concat), F32 o, Q4_1 gate/up, Q8_0 down
    "blk.0.attn_q.weight": QT.Q4_1, "blk.0.attn_k.weight": QT.Q8_0, "blk.0.attn_v.weight": QT.F16,
    "blk.0.attn_output.weight": QT.F32, "blk.0.ffn_gate.weight": QT.Q4_1, "blk.0.ffn_up.weight": QT.Q4_1,
    "blk.0.ffn_down.weight": QT.Q8_0, "blk.0.ffn_norm.weight": QT.F16,
    # layer 1: fused Q8_0 qkv, F16 o, F16 gate + F32 up, Q4_1 down
    "blk.1.attn_q.weight": QT.Q8_0, "blk.1.attn_k.weight": QT.Q8_0, "blk.1.attn_v.weight": QT.Q8_0,
    "blk.1.attn_output.weight": QT.F16, "blk.1.ffn_gate.weight": QT.F16, "blk.1.ffn_up.weight": QT.F32,
    "blk.1.ffn_down.weight": QT.Q4_1,
}
