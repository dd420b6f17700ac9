"""GGUF's block-quantized weights, re-expressed for onnxruntime's MatMulNBits and
GatherBlockQuantized without re-quantizing.

Every GGUF block format attar meets has the form w = s·q + o within a sub-block (s a scale, q an
integer code, o an offset that many formats leave at 0). onnxruntime's integer kernels compute
w = s·(code − z) with z fixed at 8 (4-bit) or 128 (8-bit) when no zero points are given: the
fastest path on CPU. So each format maps to codes (shifted into that range), the same scales and,
where o ≠ 0, an offset term o' = o + z·s that the graph adds as a block-sum of the activations
times a small matrix. Codes and scales are the GGUF's own bits: nothing is rounded again.

  Q4_0, Q4_1, Q4_K        -> 4-bit codes, blocks of 32
  Q5_0, Q5_1, Q5_K, Q8_0  -> 8-bit codes, blocks of 32 (5-bit codes are shifted by +112)
  Q6_K                    -> 8-bit codes, blocks of 16 (shifted by +96)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

OFFSET_BLOCK = 32  # the offset term is per 32 weights along K in every format that has one


@dataclass
class BlockQuant:
    """An (N, K) weight as onnxruntime's block-quantized ops take it."""

    bits: int  # 4 or 8
    block: int  # weights per scale along K
    codes: np.ndarray  # (N, K) uint8, each in [0, 2**bits)
    scales: np.ndarray  # (N, K // block) float32
    offsets: np.ndarray | None  # (N, K // 32) float32: w = scale·(code − zero) + offset

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    def packed(self) -> np.ndarray:
        """(N, K·bits/8) bytes; two 4-bit codes per byte, the first in the low nibble."""
        if self.bits == 8:
            return self.codes
        return (self.codes[:, 0::2] | (self.codes[:, 1::2] << 4)).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        w = (self.codes.astype(np.float32) - self.zero).reshape(n, k // self.block, self.block)
        w = (w * self.scales[:, :, None]).reshape(n, k)
        if self.offsets is not None:
            w += np.repeat(self.offsets, OFFSET_BLOCK, axis=1)
        return w


SUPPORTED = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """Bytes (n, groups·L) -> codes (n, groups·2L): in each group of L bytes the low nibbles are
    the first L weights and the high nibbles the next L (the ggml layout)."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    return ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of a Q4_K/Q5_K super-block -> eight 6-bit scales and eight 6-bit mins."""
    n = packed.shape[0]
    lo, hi, mix = packed.reshape(n, 3, 4).transpose(1, 0, 2)
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(qtype: Q, blocks: np.ndarray):
    """Blocks (n_blocks, type_size) -> (codes, scales, offsets) in the kernel's form
    w = s·(code − zero) + offset; offsets None where they are all 0."""
    n = blocks.shape[0]
    if qtype == Q.Q8_0:
        d, qs = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
        return (qs.astype(np.int16) + 128).astype(np.uint8), d, None
    if qtype in (Q.Q4_0, Q.Q4_1):
        head = 2 if qtype == Q.Q4_0 else 4
        d, q = _f16(blocks[:, :2]), _nibbles(blocks[:, head:], 1)
        if qtype == Q.Q4_0:
            return q, d, None  # w = d·(q − 8): the kernel's own form
        return q, d, _f16(blocks[:, 2:4]) + 8 * d  # w = d·q + m
    if qtype in (Q.Q5_0, Q.Q5_1):
        head = 2 if qtype == Q.Q5_0 else 4
        d = _f16(blocks[:, :2])
        qh = np.ascontiguousarray(blocks[:, head:head + 4]).view(np.uint32)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = _nibbles(blocks[:, head + 4:], 1) | (high << 4)
        if qtype == Q.Q5_0:
            return q + 112, d, None  # w = d·(q − 16) = d·(q + 112 − 128)
        return q + 112, d, _f16(blocks[:, 2:4]) + 16 * d
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        if qtype == Q.Q4_K:
            q = _nibbles(blocks[:, 16:], 4)
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:]
            high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            q = _nibbles(qs, 4) | (high.reshape(n, 256) << 4)
        scale, offset = d * sc, -(dmin * mn)  # w = s·q − m per sub-block of 32
        if qtype == Q.Q4_K:
            return q, scale, offset + 8 * scale
        return q + 112, scale, offset + 16 * scale
    if qtype == Q.Q6_K:
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
        low = _nibbles(ql, 2)
        high = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3)
        q = low | (high.reshape(n, 256) << 4)
        return q + 96, d * sc.view(np.int8).astype(np.float32), None  # w = s·(q − 32)
    raise ValueError(f"unsupported GGUF type {qtype.name}")


_LAYOUT = {  # type -> (bits, block)
    Q.Q4_0: (4, 32), Q.Q4_1: (4, 32), Q.Q4_K: (4, 32),
    Q.Q5_0: (8, 32), Q.Q5_1: (8, 32), Q.Q5_K: (8, 32), Q.Q8_0: (8, 32), Q.Q6_K: (8, 16),
}


def block_quant(qtype: Q, data: np.ndarray, n: int, k: int) -> BlockQuant:
    """GGUF tensor bytes of an (N, K) weight -> the same weights as a BlockQuant."""
    bits, block = _LAYOUT[qtype]
    from gguf import GGML_QUANT_SIZES

    per_block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(n * k // per_block, type_size)
    codes, scales, offsets = _decode(qtype, blocks)
    codes = codes.reshape(n, k).astype(np.uint8)
    scales = scales.reshape(n, k // block).astype(np.float32)
    if offsets is not None:
        offsets = offsets.reshape(n, k // OFFSET_BLOCK).astype(np.float32)
    return BlockQuant(bits, block, codes, scales, offsets)


def concat_rows(parts: list[BlockQuant]) -> BlockQuant:
    """Weights with one layout stacked along N (fused Q/K/V, gate/up); missing offsets are 0."""
    with_offsets = any(p.offsets is not None for p in parts)
    offsets = None
    if with_offsets:
        offsets = np.concatenate([p.offsets if p.offsets is not None
                                  else np.zeros((p.codes.shape[0], p.codes.shape[1] // OFFSET_BLOCK), np.float32)
                                  for p in parts])
    return BlockQuant(parts[0].bits, parts[0].block, np.concatenate([p.codes for p in parts]),
                      np.concatenate([p.scales for p in parts]), offsets)
