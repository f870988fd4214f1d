"""llama.cpp's block layouts (ggml-common.h): the stored values of a quantized tensor as the bytes
of its GGUF data, for the types edgekd's weighted search writes (Q4_K, Q6_K, Q5_0).

Pure functions from `gguf_k.*_codes` to uint8 arrays of shape [rows, bytes per row].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _u8(t: Tensor) -> np.ndarray:
    return t.to(torch.int64).remainder(256).to(torch.uint8).numpy()


def _f16_bytes(t: Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)


def _nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0xF) | ((high & 0xF) << 4)


def pack_q4_k(codes: tuple[Tensor, ...], rows: int) -> np.ndarray:
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles."""
    d, dmin, sc, m, q = codes
    ls, lm, levels = _u8(sc), _u8(m), _u8(q).reshape(-1, 256)
    scales = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    scales[:, :4] = ls[:, :4]
    scales[:, 4:8] = lm[:, :4]
    scales[:, 8:] = _nibbles(ls[:, 4:], lm[:, 4:])
    scales[:, :4] |= (ls[:, 4:] >> 4) << 6
    scales[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    quarters = levels.reshape(-1, 4, 2, 32)  # 64 values: 32 low nibbles, then 32 high
    qs = _nibbles(quarters[:, :, 0], quarters[:, :, 1]).reshape(-1, 128)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def pack_q6_k(codes: tuple[Tensor, ...], rows: int) -> np.ndarray:
    """block_q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d."""
    d, sc, q = codes
    levels = _u8(q.reshape(-1, 256) + 32).reshape(-1, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.concatenate(
        [_nibbles(levels[:, :, 0], levels[:, :, 2]), _nibbles(levels[:, :, 1], levels[:, :, 3])],
        axis=2,
    ).reshape(-1, 128)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate([ql, qh.reshape(-1, 64), _u8(sc), _f16_bytes(d)], axis=1)
    return blocks.reshape(rows, -1)


def pack_q5_0(codes: tuple[Tensor, Tensor], rows: int) -> np.ndarray:
    """block_q5_0: fp16 d, 32 fifth bits (little-endian uint32), 16 bytes of nibbles."""
    d, levels = codes
    lv = _u8(levels).astype(np.uint32)
    bits = ((lv >> 4) & 1) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)
    qs = _nibbles(lv[:, :16], lv[:, 16:]).astype(np.uint8)
    blocks = np.concatenate([_f16_bytes(d.reshape(-1)), qh, qs], axis=1)
    return blocks.reshape(rows, -1)
