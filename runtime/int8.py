"""The int8 product path for NF4 weights (``load(..., products="int8")``): integer dot products.

The exact path (``runtime/kernels.py``) multiplies each dequantized weight ``code[c] * scale`` with
x in float32. This path does what llama.cpp does for its IQ4_NL codebook: the 16 NF4 values are
held as small integers, ``NF4_I8 = round(64 * code)`` = -64, -45, ..., 46, 64 (every value within
0.5/64 = 0.0078 of ``64 * code``; -1, 0 and 1 exact; :data:`CODE_SCALE`), x is quantized to int8
per weight block, and the products are summed in int32 by byte dot-product instructions:
``vpdpbusd`` (AVX-512 VNNI or AVX-VNNI) or ``vpmaddubsw`` + ``vpmaddwd`` (AVX2), codes looked up
32 at a time by ``vpshufb``; on aarch64 ``sdot`` (dotprod), ``smmla`` (i8mm, batches) or widening
NEON multiplies, codes looked up by ``tbl`` (``simd.i8_rows_dot``); a portable Numba loop
elsewhere. The codes take 7 bits so that AVX2 (the prefill GEMM, ``runtime/int8_gemm.py``, and
the decode kernel) can feed them to ``vpmaddubsw`` as the unsigned bytes ``NF4_I8 + 64`` (0 .. 128)
against the signed activations: a pair of products is at most ``2 * 128 * 127 = 32512``, under
the instruction's int16 saturation, so no sign step is needed (with 8-bit codes, ``vpsignb`` of
the weights by x was a quarter of the GEMM's instructions).

The arithmetic, which every variant and the NumPy twin share bit for bit:

* **activations**, per vector and per block of ``bs`` entries (the weight's NF4 block, 64 by
  default): ``amax = max|x|``, ``d = amax / 127``, ``q = rint(x * (1 / d))`` (0 when amax is 0),
  all float32; stored as the block's even entries then its odd ones (the high and low nibbles of
  its bytes); the block's float scale ``xs = d / 64`` (the :data:`CODE_SCALE` of the codes folded
  in: a power of two, so exact);
* **block j of row r**, lanes ``l = 0 .. 7``: ``S[l] = sum of NF4_I8[c] * q`` over the bytes
  ``4l .. 4l + 3`` of every 32-byte chunk of the block, both nibbles (int32, exact);
* **row r**: float32 lanes ``acc[l] += float(S[l]) * (xs[j] * scale(j))`` block after block (the
  block scale from the double-quantized bytes, ``storage.block_scale``; a product then a sum, no
  FMA), and ``y[r]`` the pairwise sum of the eight lanes (``(0..3 + 4..7)``, then halves again).

So ``y ~ sum_j scale_j * d_j / 64 * sum NF4_I8 * q``, an approximation of the exact product whose
error comes from the integer codes (at most 0.78 % of a block's absmax per weight) and the int8
activations (at most half a step, ``d / 2``, per entry). A vector's result does not depend on the
other vectors of a batch, so ``matvec_batch`` row b is bit for bit ``matvec(X[b])``.

Where :data:`TILED` (x86-64 with AVX2: where the prefill GEMM has a SIMD variant), an NF4 weight
is instead repacked once, at load, into the GEMM's tiles (``runtime/int8_gemm.py``: 16 rows'
codes side by side in each register, each block's scale decoded to float32), and every product
of it runs the tile kernels, a decode step's one vector as a prompt's many: the same quantized
activations, the int32 sums of a block whole rather than in eight lanes, one float32 product and
sum a block; the float16 head's int8 codes (:class:`F16Int8Linear`) are tiled alike. The lanes
above then serve NF4 weights and the head's codes on aarch64. Tiles read each weight once for up to 16 tokens with no horizontal
sums, and a block's scales are one vector load for 16 rows (what they gave: ``bench/README.md``,
*Tiles for decode steps*). Elsewhere a prompt of more than ``kernels.MATVEC_ROWS_MAX`` rows takes
the exact tiles, a shorter one ``matvec_batch``.

The path serves weights whose rows are whole blocks of a multiple of 64 (every projection of the
models edgelora converts); others keep the exact kernels. Where not tiled, the bundle's bytes are
read in place, as bitsandbytes wrote them. Tiles hold the same codes, moved, and 4 bytes of scale
a block instead of the stored scale codes (64-entry blocks: 4.5 bits a weight instead of 4.13);
the stored pages are let go once read (``loader.let_go``). A float16 output head becomes int8
codes at load (:class:`F16Int8Linear`), in tiles where :data:`TILED`.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from edgelora.runtime.int8_gemm import (GEMM_ROWS, INT8_GEMM_SIMD, Q8Tiles, Tiles, block_sums, gemm_many,
                                        nf4_int8_gemm_reference, q8_gemm_reference, tiles_parallel, tiles_slice)
from edgelora.runtime.kernels import F16Linear, NF4Linear, _batch_args, _pool, rows_in_parallel
from edgelora.runtime.simd import (INT8_AVAILABLE, INT8_CHUNK, INT8_LANES, INT8_MAX_VECTORS, INT8_SIMD, MAX_VECTORS,
                                   i8_rows_dot)
from edgelora.storage import DYNAMIC_CODE, NF4_CODE, NF4Tensor, block_scale, dequantize_scales_reference

#: the integer the NF4 value 1.0 becomes (module docstring: 7-bit codes, a power of two)
CODE_SCALE = 64
NF4_I8 = np.rint(NF4_CODE.astype(np.float64) * CODE_SCALE).astype(np.int8)  # [16]: -64, -45, ..., 46, 64
INT8_BLOCK_MULTIPLE = 2 * INT8_CHUNK  # block sizes the path takes: whole 32-byte chunks of codes
# From this many rows ``matmul`` runs the prefill GEMM (``runtime/int8_gemm.py``: repacking a tile
# costs about as much as the products of a few rows); fewer run ``matvec_batch``, four rows a pass
# over the weight (a 5632 x 2048 weight on 2 threads: 8 rows 1.7 ms against the GEMM's 3.3, even at
# 12, the GEMM ahead from 16)
GEMM_MIN_ROWS = 12
_127 = np.float32(127.0)
_CODES = np.float32(CODE_SCALE)


def supports_int8(q: NF4Tensor) -> bool:
    """Whether the int8 path can multiply by ``q``: 2-D, rows of whole blocks, blocks a multiple of 64."""
    return len(q.shape) == 2 and q.shape[1] % q.block_size == 0 and q.block_size % INT8_BLOCK_MULTIPLE == 0


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------

@intrinsic
def _f32_bits(typingctx, bits):
    """The int32 ``bits`` as the float32 they encode."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath=False, nogil=True, inline="always")
def _quantize_block(x, xb, q, a):
    """One block: ``x`` f32 and ``xb`` its bits -> codes ``q`` (the even entries', then the odd
    ones'), ``a = |q|``; returns its ``amax`` (module docstring)."""
    half = x.size // 2
    m = np.int32(0)
    for i in range(xb.size):  # max |x| on the bits (sign cleared: their order is the floats'), vectorized
        m = max(m, xb[i] & np.int32(0x7FFFFFFF))
    amax = _f32_bits(m)
    d = amax / _127
    inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
    for i in range(half):  # entry 2i to i, entry 2i + 1 to half + i (a loop LLVM vectorizes)
        e = min(max(np.rint(x[2 * i] * inv), np.float32(-127.0)), _127)
        o = min(max(np.rint(x[2 * i + 1] * inv), np.float32(-127.0)), _127)
        q[i], q[half + i] = np.int8(e), np.int8(o)
        a[i], a[half + i] = np.uint8(abs(e)), np.uint8(abs(o))
    return amax


@njit(cache=True, fastmath=False, nogil=True, inline="always")
def _quantize_row64(x, xb, q, a, xs, t, pairs):
    """:func:`_quantize_block` for every block of one row when blocks are 64 entries (bitsandbytes'
    NF4 default), the same arithmetic: every loop over 64 (or 32) entries at constant offsets and
    unit stride, so LLVM vectorizes each whole, with no strided or gathered loads. The codes go in
    order into the fresh scratch ``t`` and are split into even and odd entries as the two bytes of
    each 16-bit pair (``pairs``, the same bytes)."""
    for j in range(x.size // 64):
        o = j * 64
        m = np.int32(0)
        for i in range(64):
            m = max(m, np.int32(xb[o + i] & np.int32(0x7FFFFFFF)))
        amax = _f32_bits(m)
        d = amax / _127
        inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
        for i in range(64):
            e = np.rint(x[o + i] * inv)
            e = np.float32(-127.0) if e < np.float32(-127.0) else (_127 if e > _127 else e)
            t[i] = np.int8(np.int32(e))
        for i in range(32):
            p = pairs[i]  # (little-endian: the even entry is the low byte)
            q[o + i], q[o + 32 + i] = np.int8(p & np.uint16(0xFF)), np.int8(p >> np.uint16(8))
        for i in range(64):
            v = np.int32(q[o + i])
            a[o + i] = np.uint8(v if v >= 0 else -v)
        xs[j] = d / _CODES


@njit(cache=True, fastmath=False, nogil=True, inline="always")
def _quantize_span(x, xb, q, a, xs, bs, t, pairs):
    """Whole blocks of ``bs`` entries of one row, x f32 and ``xb`` its bits -> codes ``q``, ``a =
    |q|``, scales ``xs`` (a block's own: any span of whole blocks gives the whole row's bits there).
    Blocks of 64 take :func:`_quantize_row64` (4 x faster, ``t`` and ``pairs`` its scratch), others
    :func:`_quantize_block`."""
    if bs == 64:
        _quantize_row64(x, xb, q, a, xs, t, pairs)
        return
    for j in range(x.size // bs):
        s = slice(j * bs, (j + 1) * bs)
        xs[j] = (_quantize_block(x[s], xb[s], q[s], a[s]) / _127) / _CODES


@njit(cache=True, fastmath=False, nogil=True)
def _quantize_x(X, bs, XQ, XA, XS):
    """X f32 [B, k] (C-contiguous) -> XQ int8 [B, k] (per block: the even entries' codes, then the
    odd ones'), XA = |XQ| as uint8, XS f32 [B, k / bs] (module docstring), row by row
    (:func:`_quantize_span`). ``fastmath=False``: the divisions and the rounding are IEEE float32,
    as the twin's."""
    bits = X.view(np.int32)
    t = np.empty(64, np.int8)
    pairs = t.view(np.uint16)
    for b in range(X.shape[0]):
        _quantize_span(X[b], bits[b], XQ[b], XA[b], XS[b], bs, t, pairs)


@njit(cache=True, fastmath=False, nogil=True, parallel=True)
def _quantize_rows(X, bs, codes, scales):
    """Weight rows X f32 [n, k] -> ``codes`` int8 [n, k] as :func:`_quantize_x` gives them and
    ``scales`` f32 [n, k / bs] each block's ``amax / 127 * CODE_SCALE`` (:class:`F16Int8Linear`:
    its codes' step, times the :data:`CODE_SCALE` that activations' scales divide by), rows split
    between the threads."""
    bits = X.view(np.int32)
    for r in prange(X.shape[0]):
        a = np.empty(bs, np.uint8)
        for j in range(X.shape[1] // bs):
            s = slice(j * bs, (j + 1) * bs)
            scales[r, j] = (_quantize_block(X[r, s], bits[r, s], codes[r, s], a) / _127) * _CODES


def quantize_activations(X: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(XQ, XA, XS)`` for X f32 [B, k], blocks of ``bs``: see :func:`_quantize_x`. A prompt's rows
    are shared between the prefill threads (``kernels.rows_in_parallel``; a prompt chunk of 128 x
    5632 takes 0.3 ms on one thread, blocks of 64). Split between Numba's threads it took 0.2, but
    the prompt's products then ran slower: the OpenMP threads spin for a while after a parallel
    region, on the cores the prefill pool's threads need next."""
    X = np.ascontiguousarray(X, np.float32)  # (read as bits too)
    B, k = X.shape
    XQ, XA = np.empty((B, k), np.int8), np.empty((B, k), np.uint8)
    XS = np.empty((B, k // bs), np.float32)
    rows_in_parallel(lambda r: _quantize_x(X[r], bs, XQ[r], XA[r], XS[r]), B)
    return XQ, XA, XS


def quantize_activations_reference(X: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy twin of :func:`quantize_activations`."""
    X = np.asarray(X, np.float32)
    B, k = X.shape
    blocks = X.reshape(B, k // bs, bs)
    amax = np.abs(blocks).max(axis=2)
    d = amax / _127
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[:, :, None]), -_127, _127)
    q = np.concatenate([q[:, :, 0::2], q[:, :, 1::2]], axis=2).reshape(B, k).astype(np.int8)
    return q, np.abs(q).astype(np.uint8), d / _CODES


# ---------------------------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------------------------

# Every variant: ``OUT[v, o0 + r]`` = row r of ``packed`` (``n_rows`` rows of ``per_row`` blocks of
# ``half`` bytes, block i scaled as the tensor's block ``b0 + i``) . x_v, for every vector of XQ.

def _weights_per_byte(packed) -> int:
    """2 for NF4 codes (uint8, two weights a byte), 1 for :class:`F16Int8Linear` codes (int8)."""
    return 2 if packed.dtype == np.uint8 else 1


@overload(_weights_per_byte)
def _weights_per_byte_compiled(packed):
    n = 2 if packed.dtype == types.uint8 else 1
    return lambda packed: n


@njit(cache=True, fastmath=False)
def _i8_rows_portable(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS,
                      OUT, o0):
    """The arithmetic of the module docstring in plain loops (any CPU); int8 ``packed``: the codes of
    an :class:`F16Int8Linear`, ``nested`` its block scales."""
    lanes = np.zeros(INT8_LANES, np.int32)
    acc = np.zeros(INT8_LANES, np.float32)
    nf4 = _weights_per_byte(packed) == 2
    row_bytes = per_row * half * (1 if nf4 else 2)
    for r in range(n_rows):
        row = packed[r * row_bytes:(r + 1) * row_bytes]
        for v in range(XQ.shape[0]):
            acc[:] = 0.0
            for j in range(per_row):
                lanes[:] = 0
                for i in range(half):
                    xe, xo = XQ[v, 2 * j * half + i], XQ[v, 2 * j * half + half + i]
                    if nf4:
                        byte = row[j * half + i]
                        we, wo = np.int32(table[byte >> 4]), np.int32(table[byte & 15])
                    else:
                        we, wo = np.int32(row[2 * j * half + i]), np.int32(row[2 * j * half + half + i])
                    lanes[(i % INT8_CHUNK) >> 2] += we * np.int32(xe) + wo * np.int32(xo)
                b = b0 + r * per_row + j
                s = XS[v, j] * (block_scale(dyn, qscale, nested, nshift, offset, b) if nf4 else nested[b])
                for lane in range(INT8_LANES):
                    acc[lane] = acc[lane] + np.float32(lanes[lane]) * s
            OUT[v, o0 + r] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))


#: a batch of more vectors than a group (:func:`_i8_rows_simd`) goes over its rows this many bytes
#: of codes at a time, each group of vectors in turn, so that the groups after the first read the
#: rows from cache: every weight is read from memory once, not once a group
BATCH_ROW_BYTES = 32768


@njit(cache=True)
def _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT,
                  o0, isa):
    """``simd.i8_rows_dot`` for groups of at most ``INT8_MAX_VECTORS`` vectors on x86-64
    (``isa`` 0, 1), ``MAX_VECTORS`` on aarch64 (the count a literal); more vectors than a group: a
    run of rows (:data:`BATCH_ROW_BYTES`) at a time for every group."""
    numba.literally(isa)
    group = INT8_MAX_VECTORS if isa <= 1 else MAX_VECTORS
    n_vec, n_out = XQ.shape[0], OUT.shape[1]
    xq, xa, xs, out = XQ.reshape(-1), XA.reshape(-1), XS.reshape(-1), OUT.reshape(-1)
    row = packed.size // max(n_rows, 1)  # bytes of a row
    step = n_rows if n_vec <= group else max(1, BATCH_ROW_BYTES // max(row, 1))
    for r0 in range(0, n_rows, step):
        rows = min(step, n_rows - r0)
        p, b, o = packed[r0 * row:(r0 + rows) * row], b0 + r0 * per_row, o0 + r0
        for v0 in range(0, n_vec, group):
            m = min(group, n_vec - v0)
            if m == 5:
                i8_rows_dot(table, dyn, p, qscale, nested, xq, xa, xs, out, nshift, offset, b, rows, per_row, half,
                            v0, n_out, o, 5, isa)
            elif m == 4:
                i8_rows_dot(table, dyn, p, qscale, nested, xq, xa, xs, out, nshift, offset, b, rows, per_row, half,
                            v0, n_out, o, 4, isa)
            elif m == 3:
                i8_rows_dot(table, dyn, p, qscale, nested, xq, xa, xs, out, nshift, offset, b, rows, per_row, half,
                            v0, n_out, o, 3, isa)
            elif m == 2:
                i8_rows_dot(table, dyn, p, qscale, nested, xq, xa, xs, out, nshift, offset, b, rows, per_row, half,
                            v0, n_out, o, 2, isa)
            else:
                i8_rows_dot(table, dyn, p, qscale, nested, xq, xa, xs, out, nshift, offset, b, rows, per_row, half,
                            v0, n_out, o, 1, isa)


# One per ISA, its code (simd.INT8_ISAS: vnni 0, avx2 1, sdot 2, neon 3, smmla 4) compiled in

@njit(cache=True)
def _i8_rows_vnni(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0):
    _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0, 0)


@njit(cache=True)
def _i8_rows_avx2(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0):
    _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0, 1)


@njit(cache=True)
def _i8_rows_sdot(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0):
    _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0, 2)


@njit(cache=True)
def _i8_rows_neon(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0):
    _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0, 3)


@njit(cache=True)
def _i8_rows_smmla(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0):
    _i8_rows_simd(table, dyn, packed, qscale, nested, nshift, offset, b0, n_rows, per_row, half, XQ, XA, XS, OUT, o0, 4)


# Every variant this CPU runs (the tests prove each equal to the twin bit for bit); products use the best
INT8_VARIANTS = {"portable": _i8_rows_portable}
for _isa, _fn in (("vnni", _i8_rows_vnni), ("avx2", _i8_rows_avx2), ("sdot", _i8_rows_sdot), ("neon", _i8_rows_neon),
                  ("smmla", _i8_rows_smmla)):
    if _isa in INT8_AVAILABLE:
        INT8_VARIANTS[_isa] = _fn
_i8_rows = INT8_VARIANTS[INT8_SIMD or "portable"]


@njit(cache=True)
def _i8_slice_at(table, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, XQ, XA, XS, OUT, o0):
    """OUT[:, o0 + r0:o0 + r1] for rows ``r0 .. r1`` of the whole tensor ``packed``."""
    if r1 > r0:
        per_row, half = k // bs, bs // 2
        row = k // _weights_per_byte(packed)  # bytes
        _i8_rows(table, dyn, packed[r0 * row:r1 * row], qscale, nested, nshift, offset, r0 * per_row, r1 - r0,
                 per_row, half, XQ, XA, XS, OUT, o0 + r0)


@njit(cache=True)
def _i8_slice(table, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, XQ, XA, XS, OUT):
    """OUT[:, r0:r1] for rows ``r0 .. r1`` of the whole tensor ``packed``."""
    _i8_slice_at(table, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, XQ, XA, XS, OUT, 0)


@njit(cache=True, parallel=True)
def _i8_parallel(table, dyn, packed, qscale, nested, nshift, offset, bs, n_rows, k, XQ, XA, XS, OUT, chunks):
    step = (n_rows + chunks - 1) // chunks  # one slice of rows per thread, as the exact kernels
    for c in prange(chunks):
        r0 = c * step
        _i8_slice(table, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, min(n_rows, r0 + step), XQ, XA, XS, OUT)


#: whether NF4 weights on the int8 path are repacked at load into the prefill GEMM's tiles
#: (``runtime/int8_gemm.py``), which then serve every product, decode steps' too: where this CPU
#: has a SIMD variant of the GEMM (x86-64 with AVX2). Elsewhere (aarch64) decode steps take the
#: lanes kernels (``simd.i8_rows_dot``) on the bytes as stored.
TILED = bool(INT8_GEMM_SIMD)


class NF4Int8Linear(NF4Linear):
    """:class:`~edgelora.runtime.kernels.NF4Linear` whose products take the int8 path; weights it
    cannot take (:func:`supports_int8`) keep the exact kernels.

    Where :data:`TILED`, the weight is repacked at load into the GEMM's tiles (``self.tiles``: the
    codes and the blocks' double-quantized scale codes moved 16 rows to a register, as many bytes
    as the stored ones), and every product, of one row or a prompt's,
    runs the tile kernels: one arithmetic (:func:`~edgelora.runtime.int8_gemm.nf4_int8_gemm_reference`),
    so a row's bits never depend on how many rows come with it, decode or prefill. Elsewhere
    ``matvec`` and ``matvec_batch`` run the lanes kernels on the stored bytes
    (:func:`nf4_int8_matvec_batch_reference`) and prompts the exact tiles."""

    def __init__(self, q: NF4Tensor, release=None):
        super().__init__(q)
        self.int8 = supports_int8(q)
        self._iargs = (NF4_I8, DYNAMIC_CODE, self.packed, self.qscale, self.nested, self.nshift, self.offset,
                       self.block_size)
        self.tiled = self.int8 and TILED
        if self.tiled:
            n, k = self.out_features, self.in_features
            threads = numba.get_num_threads() if self._parallel(n * k) else 1
            self.tiles = Tiles(self._iargs, n, k, threads, _pool(threads) if threads > 1 else None)
            if release is not None:  # the stored codes are not read again by these products
                release()

    @property
    def resident_nbytes(self) -> int:
        """Bytes held in memory beside the mapped weight: the tiles (0 when the stored bytes serve)."""
        return self.tiles.nbytes if self.tiled else 0

    def takes_gemm(self, x: np.ndarray) -> bool:
        """Whether :meth:`matmul` of rows ``x`` runs the int8 GEMM on the prefill pool (else
        :meth:`matvec_batch`, on Numba's threads: the same tiles and bits where :data:`TILED`)."""
        return self.tiled and x.shape[0] >= GEMM_MIN_ROWS

    def matmul(self, x: np.ndarray, quantized: tuple | None = None) -> np.ndarray:
        """x: f32 [T, in] -> f32 [T, out]. Where :data:`TILED`: from ``GEMM_MIN_ROWS`` rows the int8
        GEMM, its row groups split between the prefill pool's threads (``runtime/int8_gemm.py``),
        fewer rows :meth:`matvec_batch`, the same bits either way. Elsewhere as :class:`NF4Linear`
        (one row: ``matvec``'s bits, up to ``MATVEC_ROWS_MAX``: ``matvec_batch``, more: the exact
        tiles). ``quantized``: x already quantized (``quantize_activations(x, block_size)``, by
        ``linear.matmul_shared`` for weights that read the same rows)."""
        if not self.takes_gemm(x):
            return self.matvec_batch(x) if self.tiled else super().matmul(x)
        return NF4Int8Linear.matmul_many([self], x, quantized)[0]

    @staticmethod
    def matmul_many(layers: list, x: np.ndarray, quantized: tuple | None = None) -> list:
        """``[layer.matmul(x, quantized) for layer in layers]``, the same bits, for layers that take
        the GEMM (:meth:`takes_gemm`) with one block size: one GEMM call over all their row groups
        (``int8_gemm.gemm_many``: one hand-off to the threads, their shares balanced over the lot)."""
        XQ, XA, XS = quantized if quantized is not None else quantize_activations(np.ascontiguousarray(x, np.float32),
                                                                                  layers[0].block_size)
        weights = sum(layer.out_features * layer.in_features for layer in layers)
        threads = numba.get_num_threads() if layers[0]._parallel(weights) else 1
        return gemm_many(INT8_GEMM_SIMD, NF4_I8, [layer.tiles for layer in layers], XQ, XS, threads,
                         _pool(threads) if threads > 1 else None)

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x: f32 [in] -> f32 [out]"""
        return _int8_matvec(self, x, out) if self.int8 else super().matvec(x, out)

    def matvec_batch(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X: f32 [B, in] -> f32 [B, out], row b bit for bit ``matvec(X[b])``: x quantized once per
        call, each weight byte read and decoded once for several vectors."""
        if not self.int8:
            return super().matvec_batch(X, out)
        return _int8_batch(self, X, out, self.block_size)


def _int8_matvec(layer, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``layer.matvec`` on the int8 path: a batch of one row."""
    if out is None:
        out = np.empty(layer.out_features, np.float32)
    layer.matvec_batch(np.ascontiguousarray(x, np.float32).reshape(1, layer.in_features),
                       out.reshape(1, layer.out_features))
    return out


def _int8_batch(layer, X: np.ndarray, out: np.ndarray | None, bs: int) -> np.ndarray:
    """``layer.matvec_batch`` on the int8 path: X quantized per block of ``bs`` entries, then the
    tile kernels over ``layer.tiles`` where it is tiled, else the lanes kernel over ``layer._iargs``
    (its weights' arrays), rows split between Numba's threads where large."""
    X, out = _batch_args(layer, X, out)
    if X.shape[0] == 0:
        return out
    XQ, XA, XS = quantize_activations(X, bs)
    n, k = layer.out_features, layer.in_features
    if layer.tiled:
        args, XSUM = layer.tiles.args(NF4_I8), block_sums(XQ, bs)
        if layer._parallel(n * k):
            tiles_parallel(*args, XQ, XSUM, XS, out, 0, numba.get_num_threads())
        else:
            tiles_slice(*args, 0, -(-n // GEMM_ROWS), XQ, XSUM, XS, out, 0)
    elif layer._parallel(n * k):
        _i8_parallel(*layer._iargs, n, k, XQ, XA, XS, out, numba.get_num_threads())
    else:
        _i8_slice(*layer._iargs, k, 0, n, XQ, XA, XS, out)
    return out


#: entries of a block of :class:`F16Int8Linear`'s int8 codes (one float32 scale each: 8.5 bits a weight)
Q8_BLOCK = 64
_NO_CODES = np.zeros(1, np.uint8)  # (the kernels' NF4 scale codes, unused for int8 weights)


class F16Int8Linear(F16Linear):
    """A float16 output head on the int8 path. The head is a decode step's largest single read (a
    TinyLlama step: 131 MB of float16 against 500 MB of NF4 layers); here its rows are quantized
    once, at load, to int8 codes per block of :data:`Q8_BLOCK` entries exactly as activations are
    (:func:`quantize_activations`: ``rint(w * 127 / amax)``, a block's even entries then its odd
    ones) with ``sc = amax / 127 * 64`` as the block's float32 scale (the codes' step, times the
    :data:`CODE_SCALE` the activations' ``xs`` divide by), 8.5 bits a weight. Where ``tiled``
    (default :data:`TILED`) the codes go straight into the tile layout (``int8_gemm.Q8Tiles``, a
    chunk of rows at a time: never held twice) and every product runs the tile kernels (twin
    :func:`q8_matmul_reference`): ``y = sum_j (xs_j * sc_j) * S_j``, ``S_j`` the block's int32 sum
    of codes times q, the NF4 tiles' arithmetic with the weight's own codes and scales (one
    ``vpdpbusd`` a word of 16 rows' four codes, no lookup). Elsewhere the lanes kernels multiply
    them (``simd.i8_rows_dot`` with int8 weights; twin :func:`q8_lanes_reference`). Every row of a
    product is ``matvec`` of it. Rows looked up (``rows``: the embeddings of a tied head) and
    ``linear.exact_linear`` (training) read the float16 weight as before. Heads whose width is not
    a multiple of :data:`Q8_BLOCK` stay :class:`F16Linear` (``linear.make_linear``).

    ``release(0, r1)``, when given, is called once rows ``0 .. r1`` are quantized (each chunk's call
    covers the rows before it too: a page fault in one chunk can map a whole large page-cache folio
    reaching back into the last one's rows). The loader passes the mapped file's
    :meth:`~edgelora.safetensors_io.SafetensorsFile.release`, so the float16 pages read to make the
    codes leave the process's resident set a chunk at a time (a 128K-vocabulary 1B model's tied
    embedding: 0.5 GB) instead of staying beside their copy. Pages
    read again through the mapping come back (training's ``exact_linear`` reads the whole weight);
    ``read_rows(ids)``, when given, reads the rows that :meth:`rows` looks up (the embeddings of a
    tied head) from the file instead (:meth:`~edgelora.safetensors_io.SafetensorsFile.read_rows`),
    so that lookups keep them out."""

    int8 = True

    def __init__(self, w: np.ndarray, chunk_rows: int = 4096, release=None, read_rows=None, tiled: bool = TILED):
        super().__init__(w)
        self._read_rows = read_rows
        n, k = self.out_features, self.in_features
        if k % Q8_BLOCK:
            raise ValueError(f"F16Int8Linear needs rows of whole {Q8_BLOCK}-entry blocks, got width {k}")
        self.tiled = tiled
        if tiled:  # each chunk's codes into the tiles, then the next chunk into the same scratch
            self.tiles = Q8Tiles(n, k, Q8_BLOCK)
            rows = min(n, chunk_rows)
            codes, scales = np.empty((rows, k), np.int8), np.empty((rows, k // Q8_BLOCK), np.float32)
        else:
            self.codes = codes = np.empty((n, k), np.int8)
            self.scales = scales = np.empty((n, k // Q8_BLOCK), np.float32)
        for r0 in range(0, n, chunk_rows):  # a chunk of rows widened at a time
            r1 = min(n, r0 + chunk_rows)
            c, sc = (codes[:r1 - r0], scales[:r1 - r0]) if tiled else (codes[r0:r1], scales[r0:r1])
            _quantize_rows(w[r0:r1].astype(np.float32), Q8_BLOCK, c, sc)
            if tiled:
                self.tiles.put(r0, c, sc)
            if release is not None:
                release(0, r1)
        if not tiled:
            self._iargs = (NF4_I8, DYNAMIC_CODE, self.codes.reshape(-1), _NO_CODES, self.scales.reshape(-1), 0,
                           np.float32(0.0), Q8_BLOCK)

    @property
    def resident_nbytes(self) -> int:
        """Bytes held in memory beside the mapped float16 weight: the codes and their scales."""
        return self.tiles.nbytes if self.tiled else self.codes.nbytes + self.scales.nbytes

    def rows(self, ids) -> np.ndarray:
        """The float16 rows ``ids`` as float32 (``F16Linear.rows``), through ``read_rows`` if given."""
        if self._read_rows is None:
            return super().rows(ids)
        return self._read_rows(np.asarray(ids, np.int64)).astype(np.float32)

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x: f32 [in] -> f32 [out]"""
        return _int8_matvec(self, x, out)

    def matvec_batch(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X: f32 [B, in] -> f32 [B, out], row b bit for bit ``matvec(X[b])``."""
        return _int8_batch(self, X, out, Q8_BLOCK)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [T, in] -> f32 [T, out]: ``matvec_batch`` (each row ``matvec`` of it; a prompt's
        logits are wanted for its last row, or every row only in evaluation)."""
        return self.matvec_batch(x)


def q8_lanes_reference(codes: np.ndarray, scales: np.ndarray, X: np.ndarray) -> np.ndarray:
    """NumPy twin of the lanes kernels with :class:`F16Int8Linear`'s codes (not tiled): ``codes``
    int8 [n, k] and ``scales`` f32 [n, k / Q8_BLOCK] as it holds them, X [B, k] -> [B, n] (the
    module docstring's arithmetic)."""
    n, k = codes.shape
    per_row, half = k // Q8_BLOCK, Q8_BLOCK // 2
    XQ, _, XS = quantize_activations_reference(X, Q8_BLOCK)
    w = codes.reshape(n, per_row, 2, half).astype(np.int32)  # [n, per_row, (even, odd), half]
    xq = XQ.reshape(-1, per_row, 2, half).astype(np.int32)
    prod = (w[None] * xq[:, None]).sum(axis=3)  # [B, n, per_row, half]
    return _lanes_epilogue(prod, XS, scales)


def q8_matmul_reference(codes: np.ndarray, scales: np.ndarray, X: np.ndarray) -> np.ndarray:
    """NumPy twin of the tile kernels with :class:`F16Int8Linear`'s codes (tiled): the same
    ``codes`` and ``scales`` (each row quantized as an activation row is), X [B, k] -> [B, n]."""
    XQ, _, XS = quantize_activations_reference(X, Q8_BLOCK)
    return q8_gemm_reference(codes, scales, XQ, XS)


def q8_matvec_batch_reference(codes: np.ndarray, scales: np.ndarray, X: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`F16Int8Linear.matvec_batch` on this CPU: the tiles'
    (:func:`q8_matmul_reference`) where :data:`TILED`, else the lanes kernels'
    (:func:`q8_lanes_reference`)."""
    return q8_matmul_reference(codes, scales, X) if TILED else q8_lanes_reference(codes, scales, X)


def _lanes_epilogue(prod: np.ndarray, XS: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float steps of the twins: ``prod`` [B, n, per_row, half] the products of a block's byte
    positions (both entries), ``XS`` [B, per_row], ``scales`` [n, per_row] -> [B, n]."""
    B, n, per_row, half = prod.shape
    lanes = prod.reshape(B, n, per_row, half // INT8_CHUNK, INT8_LANES, 4).sum(axis=(3, 5))  # [B, n, per_row, 8]
    acc = np.zeros((B, n, INT8_LANES), np.float32)
    for j in range(per_row):
        s = XS[:, None, j] * scales[None, :, j]  # [B, n] f32
        acc = acc + lanes[:, :, j].astype(np.float32) * s[:, :, None]
    while acc.shape[2] > 1:
        h = acc.shape[2] // 2
        acc = acc[:, :, :h] + acc[:, :, h:]
    return acc[:, :, 0]


def nf4_int8_lanes_reference(q: NF4Tensor, X: np.ndarray) -> np.ndarray:
    """NumPy twin of the lanes kernels (:data:`INT8_VARIANTS`; the module docstring's arithmetic,
    integer sums exact, float operations in the kernels' order): X [B, in] -> [B, out]."""
    n, k = q.shape
    bs, half = q.block_size, q.block_size // 2
    per_row = k // bs
    XQ, _, XS = quantize_activations_reference(X, bs)
    codes = np.asarray(q.packed, np.uint8).reshape(n, per_row, half)
    wh, wl = NF4_I8[codes >> 4].astype(np.int32), NF4_I8[codes & 15].astype(np.int32)  # [n, per_row, half]
    xq = XQ.reshape(-1, per_row, 2, half).astype(np.int32)  # [B, per_row, (even, odd), half]
    prod = wh[None] * xq[:, None, :, 0] + wl[None] * xq[:, None, :, 1]  # [B, n, per_row, half]
    scales = (q.absmax() if not q.double_quant else dequantize_scales_reference(
        q.scales, q.nested_scales, q.offset, q.nested_block_size)).reshape(n, per_row)
    return _lanes_epilogue(prod, XS, scales)


def nf4_int8_matmul_reference(q: NF4Tensor, X: np.ndarray) -> np.ndarray:
    """NumPy twin of the tile kernels (``runtime/int8_gemm.py``): every product of
    :class:`NF4Int8Linear` where :data:`TILED`, whatever its row count: X [T, in] -> [T, out]."""
    XQ, _, XS = quantize_activations_reference(X, q.block_size)
    return nf4_int8_gemm_reference(q, NF4_I8, XQ, XS)


def nf4_int8_matvec_batch_reference(q: NF4Tensor, X: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`NF4Int8Linear.matvec_batch` on this CPU: the tiles'
    (:func:`nf4_int8_matmul_reference`) where :data:`TILED`, else the lanes kernels'
    (:func:`nf4_int8_lanes_reference`): X [B, in] -> [B, out]."""
    return nf4_int8_matmul_reference(q, X) if TILED else nf4_int8_lanes_reference(q, X)
