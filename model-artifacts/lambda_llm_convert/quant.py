"""Exact transcoding of GGUF Q4_1 / Q8_0 / F16 / F32 weights into ONNX Runtime MatMulNBits / GatherBlockQuantized layouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

BLOCK = 32


@dataclass
class Q4_1Parts:
    """w[n, k] = d[n, b] * q[n, k] + m[n, b] for k in block b (32 weights per block)."""
    packed: np.ndarray  # uint8 (N, blocks, 16): element 2i in the low nibble of byte i, 2i+1 in the high nibble
    scales: np.ndarray  # float32 (N, blocks)
    mins: np.ndarray    # float32 (N, blocks)


@dataclass
class Q8_0Parts:
    """w[n, k] = d[n, b] * q[n, k]; q stored as uint8 q + 128 (MatMulNBits/GatherBlockQuantized default zero point 128)."""
    values: np.ndarray  # uint8 (N, blocks, 32)
    scales: np.ndarray  # float32 (N, blocks)


def _blocks(t, block_bytes: int) -> np.ndarray:
    data = np.ascontiguousarray(np.asarray(t.data, dtype=np.uint8))
    n = data.shape[0]
    return data.reshape(n, -1, block_bytes)


def q4_1_parts(t) -> Q4_1Parts:
    assert t.tensor_type == QT.Q4_1
    b = _blocks(t, 20)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[:, :, 4:20]
    # ggml: element j = low nibble of byte j, element j + 16 = high nibble of byte j
    vals = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, blocks, 32) in element order
    packed = (vals[..., 0::2] | (vals[..., 1::2] << 4)).astype(np.uint8)
    return Q4_1Parts(packed=np.ascontiguousarray(packed), scales=d, mins=m)


def q8_0_parts(t) -> Q8_0Parts:
    assert t.tensor_type == QT.Q8_0
    b = _blocks(t, 34)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    values = (b[:, :, 2:34] ^ 0x80).astype(np.uint8)  # int8 q -> uint8 q + 128
    return Q8_0Parts(values=np.ascontiguousarray(values), scales=d)


def float_weight(t) -> np.ndarray:
    """(N, K) float32 of an F32/F16 2-D tensor (exact)."""
    assert t.tensor_type in (QT.F32, QT.F16)
    arr = np.asarray(t.data)
    k, n = (int(x) for x in t.shape)
    return arr.astype(np.float32).reshape(n, k)
