"""numpy fp32 reference forward pass of a Llama GGUF over its dequantized weights (teacher-forced logits)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lambda_llm_convert.gguf_source import GgufModel, load_gguf, tensor_f32  # noqa: E402
from lambda_llm_convert.graph import rope_cache  # noqa: E402


class Reference:
    """Dequantizes every weight once (gguf.quants.dequantize) and runs the plain fp32 Llama math."""

    def __init__(self, model: GgufModel | str):
        self.model = load_gguf(model) if isinstance(model, str) else model
        m, hp = self.model, self.model.hp
        self.hp = hp
        self.emb = tensor_f32(m.tensor("token_embd.weight"))  # (vocab, hidden)
        self.head = self.emb if m.tied_embeddings else tensor_f32(m.tensor("output.weight"))
        self.out_norm = tensor_f32(m.tensor("output_norm.weight"))
        self.blocks = []
        for i in range(hp.layers):
            g = lambda s: tensor_f32(m.tensor(f"blk.{i}.{s}.weight"))  # noqa: E731
            self.blocks.append({k: g(k) for k in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")})
        self.cos, self.sin = rope_cache(hp.context, hp.head_dim, hp.rope_theta)

    def _rms(self, x, w):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + np.float32(self.hp.rms_eps))) * w

    def _rope(self, x, pos):
        """x [T, heads, D]; rotate adjacent pairs (2i, 2i+1) by angle pos * theta_i (ggml's LLAMA rope)."""
        c = self.cos[pos][:, None, :]
        s = self.sin[pos][:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits [T, vocab] for the token sequence ids (position t predicts token t+1)."""
        hp = self.hp
        ids = np.asarray(ids, dtype=np.int64)
        T, H, KVH, D = len(ids), hp.heads, hp.kv_heads, hp.head_dim
        pos = np.arange(T)
        h = self.emb[ids].astype(np.float32)
        causal = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        scale = np.float32(1.0 / np.sqrt(D))
        group = H // KVH
        for w in self.blocks:
            x = self._rms(h, w["attn_norm"])
            q = self._rope((x @ w["attn_q"].T).reshape(T, H, D), pos)
            k = self._rope((x @ w["attn_k"].T).reshape(T, KVH, D), pos)
            v = (x @ w["attn_v"].T).reshape(T, KVH, D)
            k = np.repeat(k, group, axis=1)  # q head j uses kv head j // group
            v = np.repeat(v, group, axis=1)
            att = np.einsum("thd,shd->hts", q, k) * scale + causal
            att = att - att.max(axis=-1, keepdims=True)
            p = np.exp(att)
            p /= p.sum(axis=-1, keepdims=True)
            o = np.einsum("hts,shd->thd", p, v).reshape(T, H * D)
            h = h + o @ w["attn_output"].T
            x = self._rms(h, w["ffn_norm"])
            gate = x @ w["ffn_gate"].T
            up = x @ w["ffn_up"].T
            act = gate / (1.0 + np.exp(-gate)) * up
            h = h + act @ w["ffn_down"].T
        x = self._rms(h, self.out_norm)
        return (x @ self.head.T).astype(np.float32)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="Print the reference's greedy continuation ids of a token id list.")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("ids", nargs="+", type=int)
    a = ap.parse_args(argv)
    ref = Reference(a.gguf)
    print(np.argmax(ref.logits(a.ids), axis=-1).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
