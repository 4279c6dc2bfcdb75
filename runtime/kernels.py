"""Compute kernels of the runtime: NF4 and float16 matrix products straight from the stored bytes.

* ``NF4Linear`` multiplies by a weight kept as packed NF4 codes and double-quantized block
  scales (``docs/format.md``): the block scale ``dynamic_code[q] * nested + offset`` is formed per
  block inside the kernel, so no float copy of a weight matrix ever exists. Decode (one token)
  is a fused dequantize-and-dot over output rows, parallel with Numba's ``prange``. Prefill
  (many tokens) dequantizes a tile of rows at a time into a small float32 buffer and multiplies
  it with the whole chunk of tokens through BLAS, so each dequantized tile is reused by every
  token (the tiling idea of llama.cpp's ``ggml_compute_forward_mul_mat``).
* ``F16Linear`` does the same for float16 matrices (embeddings, output head). Numba has no
  float16 on CPU, so half floats are widened from their bits (IEEE-754 binary16, subnormals too).

Without double quantization a bundle's float32 block absmaxes are fed to the same kernel as
``nested`` with a shift of 0 and codes of 255 (``dynamic_code[255] == 1.0``), so one kernel serves
both layouts exactly. Every kernel has a plain-NumPy twin (``*_reference``) used by the tests.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from edgelora.converters.nf4 import DYNAMIC_CODE, NF4_CODE, NF4Tensor

_FM = {"reassoc", "contract", "nsz"}  # allow reassociation so reductions vectorise; no NaN shortcuts
TILE_ELEMENTS = 1 << 20  # float32 elements of a dequantized prefill tile (4 MB)


@intrinsic
def _bits_to_f32(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@njit(inline="always")
def half_to_float(h):
    """IEEE binary16 bits (uint16) -> float32, exactly (normals, subnormals, inf, nan)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0:  # zero or subnormal: mant * 2**-24
        v = np.float32(mant) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if exp == 31:  # inf / nan
        return _bits_to_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13)))
    return _bits_to_f32(sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13)))


# ---------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=_FM)
def _nf4_matvec(packed, qscale, nested, nshift, offset, bs, n_rows, k, x, out):
    code = NF4_CODE
    dyn = DYNAMIC_CODE
    half = bs // 2
    if k % bs == 0:
        per_row = k // bs
        for r in prange(n_rows):
            w = np.empty(bs, np.float32)  # one block's codes as floats, then a contiguous dot
            acc = np.float32(0.0)
            for j in range(per_row):
                b = r * per_row + j
                base = b * half
                for i in range(half):
                    byte = np.int64(packed[base + i])
                    w[2 * i] = code[byte >> 4]
                    w[2 * i + 1] = code[byte & 15]
                xo = j * bs
                part = np.float32(0.0)
                for i in range(bs):
                    part += w[i] * x[xo + i]
                acc += part * (dyn[qscale[b]] * nested[b >> nshift] + offset)
            out[r] = acc
    else:  # rows that straddle blocks (e.g. 172 columns): element by element
        for r in prange(n_rows):
            acc = np.float32(0.0)
            start = r * k
            for c in range(k):
                e = start + c
                b = e // bs
                s = dyn[qscale[b]] * nested[b >> nshift] + offset
                byte = np.int64(packed[e >> 1])
                cv = (byte >> 4) if (e & 1) == 0 else (byte & 15)
                acc += code[cv] * s * x[c]
            out[r] = acc


@njit(cache=True, parallel=True)
def _nf4_dequant_rows(packed, qscale, nested, nshift, offset, bs, k, r0, r1, buf):
    code = NF4_CODE
    dyn = DYNAMIC_CODE
    for rr in prange(r1 - r0):
        start = (r0 + rr) * k
        b_prev = -1
        s = np.float32(0.0)
        for c in range(k):
            e = start + c
            b = e // bs
            if b != b_prev:
                s = dyn[qscale[b]] * nested[b >> nshift] + offset
                b_prev = b
            byte = np.int64(packed[e >> 1])
            cv = (byte >> 4) if (e & 1) == 0 else (byte & 15)
            buf[rr, c] = code[cv] * s


class NF4Linear:
    """``y = x W^T`` for an NF4 weight ``W [out_features, in_features]``, read in place."""

    def __init__(self, q: NF4Tensor):
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {q.shape}")
        self.out_features, self.in_features = (int(d) for d in q.shape)
        self.block_size = q.block_size
        self.packed = q.packed
        if q.double_quant:
            self.qscale, self.nested, self.offset = q.scales, q.nested_scales, np.float32(q.offset)
            self.nshift = int(np.log2(q.nested_block_size))
        else:
            self.qscale = np.full(q.scales.size, 255, np.uint8)  # DYNAMIC_CODE[255] == 1.0
            self.nested, self.offset, self.nshift = np.asarray(q.scales, np.float32), np.float32(0.0), 0
        self.tensor = q

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x: f32 [in] -> f32 [out]"""
        if out is None:
            out = np.empty(self.out_features, np.float32)
        _nf4_matvec(self.packed, self.qscale, self.nested, self.nshift, self.offset, self.block_size,
                    self.out_features, self.in_features, x, out)
        return out

    def dequantize_rows(self, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        """float32 rows ``[r0, r1)`` of the weight."""
        if buf is None:
            buf = np.empty((r1 - r0, self.in_features), np.float32)
        _nf4_dequant_rows(self.packed, self.qscale, self.nested, self.nshift, self.offset, self.block_size,
                          self.in_features, r0, r1, buf)
        return buf[: r1 - r0]

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [T, in] -> f32 [T, out], one dequantized tile of rows at a time."""
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        return _tiled_matmul(self, x)

    def rows(self, ids) -> np.ndarray:
        """Embedding lookup: float32 rows for token ids."""
        return np.stack([self.dequantize_rows(int(i), int(i) + 1)[0] for i in ids]) if len(ids) else \
            np.zeros((0, self.in_features), np.float32)


def _tiled_matmul(lin, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], lin.out_features), np.float32)
    tile = max(1, TILE_ELEMENTS // lin.in_features)
    buf = np.empty((min(tile, lin.out_features), lin.in_features), np.float32)
    for r0 in range(0, lin.out_features, tile):
        r1 = min(lin.out_features, r0 + tile)
        w = lin.dequantize_rows(r0, r1, buf)
        np.matmul(x, w.T, out=out[:, r0:r1])
    return out


def nf4_matvec_reference(q: NF4Tensor, x: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`NF4Linear.matvec` (dequantize, then multiply)."""
    return (q.dequantize_reference().astype(np.float64) @ np.asarray(x, np.float64)).astype(np.float32)


def nf4_matmul_reference(q: NF4Tensor, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float64) @ q.dequantize_reference().astype(np.float64).T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# float16
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=_FM)
def _f16_matvec(w_bits, n_rows, k, x, out):
    for r in prange(n_rows):
        acc = np.float32(0.0)
        base = r * k
        for c in range(k):
            acc += half_to_float(w_bits[base + c]) * x[c]
        out[r] = acc


@njit(cache=True, parallel=True)
def _f16_rows(w_bits, k, r0, r1, buf):
    for rr in prange(r1 - r0):
        base = (r0 + rr) * k
        for c in range(k):
            buf[rr, c] = half_to_float(w_bits[base + c])


class F16Linear:
    """``y = x W^T`` for a float16 weight (stored bits, widened on the fly)."""

    def __init__(self, w: np.ndarray):
        if w.ndim != 2 or w.dtype != np.float16:
            raise ValueError(f"F16Linear needs a 2-D float16 weight, got {w.dtype} {w.shape}")
        self.out_features, self.in_features = w.shape
        self.bits = w.reshape(-1).view(np.uint16)
        self.weight = w

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.out_features, np.float32)
        _f16_matvec(self.bits, self.out_features, self.in_features, x, out)
        return out

    def dequantize_rows(self, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        if buf is None:
            buf = np.empty((r1 - r0, self.in_features), np.float32)
        _f16_rows(self.bits, self.in_features, r0, r1, buf)
        return buf[: r1 - r0]

    def matmul(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        return _tiled_matmul(self, x)

    def rows(self, ids) -> np.ndarray:
        return self.weight[np.asarray(ids, np.int64)].astype(np.float32)


def f16_matvec_reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (w.astype(np.float64) @ np.asarray(x, np.float64)).astype(np.float32)
