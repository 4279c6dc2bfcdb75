"""Compute kernels of the runtime: NF4 and float16 matrix products straight from the stored bytes.

* ``NF4Linear`` multiplies by a weight kept as packed NF4 codes and double-quantized block
  scales (``docs/format.md``): the block scales ``dynamic_code[q] * nested + offset`` are formed
  for the rows at hand (by ``storage.block_scale``, the format's one definition of them), so no
  float copy of a weight matrix ever exists. Decode (one token) is a fused dequantize-and-dot
  over output rows (``vpermps`` lookups on x86-64, ``runtime/simd.py``), one slice of rows per
  thread. Prefill (many tokens) dequantizes a tile of rows at a time into a small float32 buffer
  and multiplies it with the whole chunk of tokens through BLAS, so each dequantized tile is
  reused by every token (the tiling idea of llama.cpp's ``ggml_compute_forward_mul_mat``).
* Decode of several sequences at once (``matvec_batch``, X [B, in]: LoRA multi-sequence batches
  share the base product) is a batched matrix-vector product, as Punica's BGMV or llama.cpp's
  ``mul_mat`` with more than one column in ``src1``: on x86-64 each weight byte is read and
  decoded once per call and FMA'd into every sequence's accumulators. Row b is bit for bit
  ``matvec(X[b])``: the one-vector kernel is the one-vector case of the same code, and each
  (row, vector) pair gets the same operations in the same order whatever the batch, so a sequence
  decodes to the same tokens in a batch as alone. The portable kernel runs the one-vector code per
  vector on each row while it is in cache; a row that straddles blocks is dequantized once and
  dotted with each vector in order, the one-vector kernel being the case of one vector.
* ``F16Linear`` does the same for float16 matrices (embeddings, output head), four rows at a time
  with prefetching (``f16_rows_dot``, ``runtime/simd.py``); its batched product dots each row with
  every vector while the row is in cache, through the row function ``matvec`` uses. Numba has no
  float16 on CPU, so half floats are widened by an LLVM ``fpext`` from their bits (exact,
  subnormals too).
* Every decode kernel prefetches the weight bytes ahead of the rows it is on: bundles are mapped
  from the page cache in 4 KB pages, at whose edges the hardware prefetchers stop.

Without double quantization a bundle's float32 block absmaxes are fed to the same kernel as
``nested`` with a shift of 0 and codes of 255 (``NF4Tensor.scale_args``), so one kernel serves
both layouts exactly. Every kernel has a plain-NumPy twin (``*_reference``) used by the tests.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numba
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from edgelora.runtime.simd import AVAILABLE as SIMD_AVAILABLE
from edgelora.runtime.simd import (F16_CHUNK, ISAS, MAX_VECTORS, SIMD, acc_reduce, f16_rows_dot, nf4_dequant_blocks,
                                   nf4_tile_dot, prefetch)
from edgelora.runtime.threads import in_parallel
from edgelora.storage import DYNAMIC_CODE, NF4_CODE, NF4Tensor, block_scale, block_scales

_FM = {"reassoc", "contract", "nsz"}  # allow reassociation so reductions vectorise; no NaN shortcuts
TILE_ELEMENTS = 1 << 20  # float32 elements of a dequantized prefill tile (4 MB)


PARALLEL_MIN_WEIGHTS = 1 << 16  # smaller products run on the calling thread (no thread wake-up)
# Up to this many rows, ``matmul`` runs ``matvec_batch`` (each weight decoded in registers once per
# four rows) rather than dequantizing tiles for BLAS: dequantizing costs as much as ~60 rows of
# products, so short prompts and chunks were paying for a whole pass of it (bench/README.md:
# 1.7-17x faster products at 2-32 rows on the 1B shape; the crossover is near 60 rows here).
MATVEC_ROWS_MAX = 32
X_TILE_BYTES = 32 << 10  # bytes of x (all vectors) one column tile reads, to stay in L1 (SIMD kernels)
ROW_TILE = 32  # rows whose accumulators wait while the column tiles pass (SIMD kernels)
# The portable NF4 loop prefetches the bytes this many rows ahead: weights are mapped from the page
# cache in 4 KB pages, where the hardware prefetchers stop (the SIMD kernels prefetch a row tile ahead)
PREFETCH_ROWS = 4


@intrinsic
def half_to_float(typingctx, bits):
    """IEEE binary16 bits (uint16) -> float32, exactly: LLVM's ``fpext half`` (F16C ``vcvtph2ps``
    on x86-64, ``fcvt`` on aarch64), which vectorises where bit arithmetic would not."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


# Numba's parallel loops are not vectorised by LLVM, so each kernel is a serial loop over a
# contiguous slice of rows (which LLVM vectorises: gathers from the 16-entry code table, F16C
# conversions) and a thin ``prange`` over one slice per thread calls it.

# ---------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------

# The aligned kernels' arguments: ``code`` and ``dyn`` the NF4 and dynamic-map tables; ``packed``
# exactly these rows' bytes, whose block i has the scale of the tensor's block ``b0 + i`` (from
# ``qscale``, ``nested``, ``nshift``, ``offset``: the whole tensor's); ``xe``/``xo`` the even/odd
# entries of x (the high/low nibble of each byte).

@njit(cache=True, fastmath=_FM)
def _nf4_row_dot_portable(code, p, scales, half, xe, xo):
    """One row's dot product: ``p`` its bytes, ``scales`` its blocks' scales; each block's sum of
    ``code[nibble] * x`` (LLVM vectorises it over the slices, which start at 0 so it can prove
    their bounds), times the block's scale."""
    acc = np.float32(0.0)
    for j in range(scales.size):
        b = p[j * half:(j + 1) * half]
        e = xe[j * half:(j + 1) * half]
        o = xo[j * half:(j + 1) * half]
        part = np.float32(0.0)
        for i in range(half):
            part += code[b[i] >> 4] * e[i] + code[b[i] & 15] * o[i]
        acc += part * scales[j]
    return acc


@njit(cache=True)
def _prefetch_row(packed, r, row_bytes):
    """The bytes ``PREFETCH_ROWS`` rows ahead of row r, a line at a time (bench/README.md: 1.6x)."""
    for at in range((r + PREFETCH_ROWS) * row_bytes, (r + PREFETCH_ROWS + 1) * row_bytes, 64):
        prefetch(packed, at)


@njit(cache=True)
def _nf4_dot_aligned_portable(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out):
    """Rows whose length is a multiple of the block, one at a time."""
    per_row = xe.size // half
    row_bytes = per_row * half
    scales = np.empty(per_row, np.float32)
    for r in range(n_rows):
        _prefetch_row(packed, r, row_bytes)
        block_scales(dyn, qscale, nested, nshift, offset, b0 + r * per_row, scales)
        out[r] = _nf4_row_dot_portable(code, packed[r * row_bytes:(r + 1) * row_bytes], scales, half, xe, xo)


# Batched twins: ``OUT[b, o0 + r] = row r . x_b`` for every vector b of ``XE``/``XO`` [B, in/2] and
# ``OUT`` [B, n], each equal bit for bit to the one-vector kernel's ``out[r]`` for x_b.

@njit(cache=True)
def _nf4_dot_aligned_batch_portable(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO,
                                    OUT, o0):
    """Each row's scales formed once and its dot product (the one-vector kernel's row function)
    taken with every vector while the row is in cache."""
    per_row = XE.shape[1] // half
    row_bytes = per_row * half
    scales = np.empty(per_row, np.float32)
    for r in range(n_rows):
        _prefetch_row(packed, r, row_bytes)
        block_scales(dyn, qscale, nested, nshift, offset, b0 + r * per_row, scales)
        p = packed[r * row_bytes:(r + 1) * row_bytes]
        for b in range(XE.shape[0]):
            OUT[b, o0 + r] = _nf4_row_dot_portable(code, p, scales, half, XE[b], XO[b])


@njit(cache=True)
def _aligned_f32(n):
    """float32 [n] starting on a 64-byte line (Numba's own arrays promise 32)."""
    raw = np.empty(n + 16, np.float32)
    at = (-raw.ctypes.data % 64) // 4
    return raw[at:at + n]


@njit(cache=True)
def _interleave_x(XE, XO, width):
    """[B, in/2] twice -> [in/2/width, B, 2, width] flat: for each chunk of ``width`` bytes, every
    vector's even then odd entries side by side (``runtime/simd.py``)."""
    n_vec, h = XE.shape
    xi = _aligned_f32(2 * n_vec * h)
    for q in range(h // width):
        for v in range(n_vec):
            at = (q * n_vec + v) * 2 * width
            for i in range(width):
                xi[at + i] = XE[v, q * width + i]
                xi[at + width + i] = XO[v, q * width + i]
    return xi


_AVX2 = ISAS["avx2"]  # the one ISA whose steps are 8 floats wide


@njit(cache=True)
def _nf4_group(code, dyn, packed, qscale, nested, nshift, offset, b0, xi, acc, r0, r1, per_row, j0, nb, half, v0,
               n_vec, m, isa):
    """Rows ``r0 .. r1``, blocks ``j0 .. j0 + nb`` for vectors ``v0 .. v0 + m``: the intrinsic takes
    the vector count as a compile-time literal (1 .. MAX_VECTORS = 4), so each count is a call;
    ``isa`` (``simd.ISAS``) is compiled in as a literal too."""
    numba.literally(isa)
    if m == 4:
        nf4_tile_dot(code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row, j0, nb, half, v0,
                     n_vec, 4, isa)
    elif m == 3:
        nf4_tile_dot(code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row, j0, nb, half, v0,
                     n_vec, 3, isa)
    elif m == 2:
        nf4_tile_dot(code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row, j0, nb, half, v0,
                     n_vec, 2, isa)
    else:
        nf4_tile_dot(code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row, j0, nb, half, v0,
                     n_vec, 1, isa)


@njit(cache=True)
def _nf4_dot_aligned_batch_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT, o0,
                                isa):
    """Tiles of ``ROW_TILE`` rows by as many blocks as keep every vector's x in L1, each decoded once
    per group of at most ``MAX_VECTORS`` vectors (``nf4_tile_dot`` for ``isa``); between column
    tiles the accumulators wait in ``acc``."""
    numba.literally(isa)
    width = 8 if isa == _AVX2 else 16
    n_vec, per_row = XE.shape[0], XE.shape[1] // half
    xi = _interleave_x(XE, XO, width)
    groups = (n_vec + MAX_VECTORS - 1) // MAX_VECTORS
    tile = max(1, X_TILE_BYTES // (8 * half * n_vec))  # blocks a column tile (a block of x is 8 * half bytes)
    acc = _aligned_f32(ROW_TILE * n_vec * 2 * width)  # [rows, vectors, (h, l), width]
    for r0 in range(0, n_rows, ROW_TILE):
        r1 = min(n_rows, r0 + ROW_TILE)
        acc[:] = 0.0
        for j0 in range(0, per_row, tile):
            nb = min(tile, per_row - j0)
            for g in range(groups):  # sizes as even as can be
                v0, v1 = g * n_vec // groups, (g + 1) * n_vec // groups
                _nf4_group(code, dyn, packed, qscale, nested, nshift, offset, b0, xi, acc, r0, r1, per_row, j0, nb, half,
                           v0, n_vec, v1 - v0, isa)
        for r in range(r0, r1):
            for b in range(n_vec):
                i = (r - r0) * n_vec + b
                OUT[b, o0 + r] = acc_reduce(acc, i, 8) if isa == _AVX2 else acc_reduce(acc, i, 16)


@njit(cache=True)
def _nf4_dot_aligned_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out, isa):
    """The one-vector case of the batched kernel."""
    numba.literally(isa)
    XE, XO = xe.reshape((1, xe.size)), xo.reshape((1, xo.size))
    _nf4_dot_aligned_batch_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO,
                                out.reshape((1, n_rows)), 0, isa)


# One pair per ISA: the generic kernel with its ISA code (simd.ISAS: avx512 0, avx2 1, neon 2) compiled in

@njit(cache=True)
def _nf4_dot_aligned_avx512(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out):
    _nf4_dot_aligned_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out, 0)


@njit(cache=True)
def _nf4_dot_aligned_batch_avx512(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT,
                                  o0):
    _nf4_dot_aligned_batch_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT, o0, 0)


@njit(cache=True)
def _nf4_dot_aligned_avx2(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out):
    _nf4_dot_aligned_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out, 1)


@njit(cache=True)
def _nf4_dot_aligned_batch_avx2(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT,
                                o0):
    _nf4_dot_aligned_batch_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT, o0, 1)


@njit(cache=True)
def _nf4_dot_aligned_neon(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out):
    _nf4_dot_aligned_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, xe, xo, out, 2)


@njit(cache=True)
def _nf4_dot_aligned_batch_neon(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT,
                                o0):
    _nf4_dot_aligned_batch_simd(code, dyn, packed, qscale, nested, nshift, offset, b0, half, n_rows, XE, XO, OUT, o0, 2)


# Every variant this CPU can run (the tests prove each equal to the reference, and each batched
# twin equal bit for bit to its one-vector kernel); kernels use the best.
NF4_DOT_VARIANTS = {"portable": _nf4_dot_aligned_portable}
NF4_DOT_BATCH_VARIANTS = {"portable": _nf4_dot_aligned_batch_portable}
for _isa, _one, _batch in (("avx512", _nf4_dot_aligned_avx512, _nf4_dot_aligned_batch_avx512),
                           ("avx2", _nf4_dot_aligned_avx2, _nf4_dot_aligned_batch_avx2),
                           ("neon", _nf4_dot_aligned_neon, _nf4_dot_aligned_batch_neon)):
    if _isa in SIMD_AVAILABLE:
        NF4_DOT_VARIANTS[_isa], NF4_DOT_BATCH_VARIANTS[_isa] = _one, _batch
_nf4_dot_aligned = NF4_DOT_VARIANTS[SIMD or "portable"]
_nf4_dot_aligned_batch = NF4_DOT_BATCH_VARIANTS[SIMD or "portable"]


@njit(cache=True, fastmath=_FM)
def _nf4_matvec_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, x, xe, xo, out):
    """out[r0:r1] = W[r0:r1] @ x. ``code``/``dyn``: the NF4 and dynamic-map tables."""
    if r1 <= r0:
        return
    if k % bs == 0:
        per_row = k // bs
        half = bs // 2
        _nf4_dot_aligned(code, dyn, packed[r0 * (k // 2):r1 * (k // 2)], qscale, nested, nshift, offset, r0 * per_row,
                         half, r1 - r0, xe, xo, out[r0:r1])
    else:  # rows that straddle blocks (e.g. 172 columns): the batched code for the one vector
        _nf4_dot_unaligned(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, x.reshape((1, k)),
                           out.reshape((1, out.size)))


@njit(cache=True, fastmath=False)
def _nf4_dot_unaligned(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, X, OUT):
    """OUT[:, r0:r1] = X @ W[r0:r1].T, X [B, in], for rows that straddle NF4 blocks: each row
    dequantized once by the prefill's code (:func:`_nf4_dequant_rows`), then dotted with every
    vector strictly in order. ``fastmath=False`` is stated so that no fastmath caller's is
    inherited: reassociation would let each compilation (for the one-vector or the batched kernel,
    compiled now or loaded from Numba's cache) vectorise the sum its own way, and the batched rows
    would no longer equal the one-vector rows bit for bit."""
    row = np.empty((1, k), np.float32)
    for r in range(r0, r1):
        _nf4_dequant_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r, r + 1, row)
        for b in range(X.shape[0]):
            acc = np.float32(0.0)
            for c in range(k):
                acc += row[0, c] * X[b, c]
            OUT[b, r] = acc


@njit(cache=True, parallel=True)
def _nf4_matvec_parallel(code, dyn, packed, qscale, nested, nshift, offset, bs, n_rows, k, x, xe, xo, out, chunks):
    step = (n_rows + chunks - 1) // chunks
    for c in prange(chunks):
        r0 = c * step
        _nf4_matvec_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, min(n_rows, r0 + step), x, xe, xo, out)


@njit(cache=True)
def _nf4_matvec_batch_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, X, XE, XO, OUT):
    """OUT[:, r0:r1] = X @ W[r0:r1].T, X [B, in]: each row's
    bytes are read (and on x86-64 decoded) once for all B vectors, and OUT[b] is bit for bit what
    :func:`_nf4_matvec_rows` gives for X[b]."""
    if r1 <= r0:
        return
    if k % bs == 0:
        per_row = k // bs
        half = bs // 2
        _nf4_dot_aligned_batch(code, dyn, packed[r0 * (k // 2):r1 * (k // 2)], qscale, nested, nshift, offset,
                               r0 * per_row, half, r1 - r0, XE, XO, OUT, r0)
    else:
        _nf4_dot_unaligned(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, X, OUT)


@njit(cache=True, parallel=True)
def _nf4_matvec_batch_parallel(code, dyn, packed, qscale, nested, nshift, offset, bs, n_rows, k, X, XE, XO, OUT,
                               chunks):
    step = (n_rows + chunks - 1) // chunks  # the same row slices as _nf4_matvec_parallel
    for c in prange(chunks):
        r0 = c * step
        _nf4_matvec_batch_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, min(n_rows, r0 + step),
                               X, XE, XO, OUT)


# Dequantizing whole blocks (the prefill's tiles): ``out`` [n_blocks * 2 * half] = the weights of
# blocks ``packed`` (their scales those of the tensor's blocks ``b0 ..``), exactly.

@njit(cache=True, nogil=True)
def _nf4_dequant_blocks_portable(code, dyn, packed, qscale, nested, nshift, offset, b0, n_blocks, half, out):
    scales = np.empty(n_blocks, np.float32)
    block_scales(dyn, qscale, nested, nshift, offset, b0, scales)
    for j in range(n_blocks):
        s = scales[j]
        for i in range(half):
            byte = packed[j * half + i]
            out[2 * (j * half + i)] = code[byte >> 4] * s
            out[2 * (j * half + i) + 1] = code[byte & 15] * s


@njit(cache=True, nogil=True)
def _nf4_dequant_blocks_avx512(code, dyn, packed, qscale, nested, nshift, offset, b0, n_blocks, half, out):
    nf4_dequant_blocks(code, dyn, packed, qscale, nested, out, nshift, offset, b0, n_blocks, half, 0)


@njit(cache=True, nogil=True)
def _nf4_dequant_blocks_avx2(code, dyn, packed, qscale, nested, nshift, offset, b0, n_blocks, half, out):
    nf4_dequant_blocks(code, dyn, packed, qscale, nested, out, nshift, offset, b0, n_blocks, half, 1)


@njit(cache=True, nogil=True)
def _nf4_dequant_blocks_neon(code, dyn, packed, qscale, nested, nshift, offset, b0, n_blocks, half, out):
    nf4_dequant_blocks(code, dyn, packed, qscale, nested, out, nshift, offset, b0, n_blocks, half, 2)


NF4_DEQUANT_VARIANTS = {"portable": _nf4_dequant_blocks_portable}  # the tests check each against the reference
for _isa, _fn in (("avx512", _nf4_dequant_blocks_avx512), ("avx2", _nf4_dequant_blocks_avx2),
                  ("neon", _nf4_dequant_blocks_neon)):
    if _isa in SIMD_AVAILABLE:
        NF4_DEQUANT_VARIANTS[_isa] = _fn
_nf4_dequant_blocks = NF4_DEQUANT_VARIANTS[SIMD or "portable"]


@njit(cache=True, nogil=True)
def _nf4_dequant_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, buf):
    """buf[:r1 - r0] = W[r0:r1] as float32 (exact)."""
    if k % bs == 0:
        per_row, half = k // bs, bs // 2
        for rr in range(r1 - r0):  # a row at a time: ``buf`` may be wider than the rows
            r = r0 + rr
            _nf4_dequant_blocks(code, dyn, packed[r * (k // 2):(r + 1) * (k // 2)], qscale, nested, nshift, offset,
                                r * per_row, per_row, half, buf[rr])
    else:
        for rr in range(r1 - r0):
            start = (r0 + rr) * k
            b_prev = -1
            s = np.float32(0.0)
            for c in range(k):
                e = start + c
                b = e // bs
                if b != b_prev:
                    s = block_scale(dyn, qscale, nested, nshift, offset, b)
                    b_prev = b
                byte = np.int64(packed[e >> 1])
                cv = (byte >> 4) if (e & 1) == 0 else (byte & 15)
                buf[rr, c] = code[cv] * s


@njit(cache=True, parallel=True)
def _nf4_dequant_parallel(code, dyn, packed, qscale, nested, nshift, offset, bs, k, r0, r1, buf, chunks):
    step = (r1 - r0 + chunks - 1) // chunks
    for c in prange(chunks):
        a = r0 + c * step
        b = min(r1, a + step)
        if a < b:
            _nf4_dequant_rows(code, dyn, packed, qscale, nested, nshift, offset, bs, k, a, b, buf[a - r0:b - r0])


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="edgelora-prefill")
    return _POOLS[n]


def row_slices(n: int, parts: int) -> list:
    """``parts`` slices covering rows ``0 .. n`` (the work of each prefill thread)."""
    return [slice(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


#: rows of a prompt's elementwise step (the MLP's activation, the activations' quantization) from
#: which each prefill thread takes a share
ROWS_PARALLEL_MIN = 64


def rows_in_parallel(step, n: int) -> None:
    """``step(rows)`` for slices covering rows ``0 .. n``: one call, or from ``2 *``
    :data:`ROWS_PARALLEL_MIN` rows one a prefill thread (``numba.get_num_threads()``, the calling
    thread's among them; ``step`` releases the GIL). For steps whose rows are independent (the same
    bits whatever the split): the prefill pool's threads, not a Numba parallel region, whose
    threads spin for a while after it on the cores the products after it need."""
    parts = max(1, min(numba.get_num_threads(), n // ROWS_PARALLEL_MIN))
    if parts == 1:
        step(slice(0, n))
        return
    slices = row_slices(n, parts)
    in_parallel(_pool(parts), lambda i: step(slices[i]), range(parts))


class _StoredLinear:
    """What NF4 and float16 weights share: ``matmul`` through dequantized tiles. A subclass
    provides ``matvec`` and ``dequantize_rows_serial`` (one thread, GIL released)."""

    out_features: int
    in_features: int

    def _parallel(self, n_weights: int) -> bool:
        return n_weights >= PARALLEL_MIN_WEIGHTS and numba.get_num_threads() > 1

    def dequantize_rows(self, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        """float32 rows ``[r0, r1)`` of the weight."""
        if buf is None:
            buf = np.empty((r1 - r0, self.in_features), np.float32)
        return self.dequantize_rows_serial(r0, r1, buf)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [T, in] -> f32 [T, out]. The rows are split between the threads; each thread
        dequantizes a tile of its rows at a time (a GIL-free Numba call) and multiplies the whole
        chunk of tokens by it with single-threaded BLAS, so every dequantized weight is reused by
        all T tokens and no two thread pools (Numba's and BLAS's) compete for the cores. Up to
        ``MATVEC_ROWS_MAX`` rows it is ``matvec_batch``: each row bit for bit ``matvec`` of it."""
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        if x.shape[0] <= MATVEC_ROWS_MAX:
            return self.matvec_batch(x)
        x = np.ascontiguousarray(x, np.float32)
        n, k = self.out_features, self.in_features
        out = np.empty((x.shape[0], n), np.float32)
        tile = max(1, TILE_ELEMENTS // k)
        threads = numba.get_num_threads() if self._parallel(n * k) else 1
        step = -(-n // threads)

        def work(r0: int) -> None:
            r1 = min(n, r0 + step)
            buf = np.empty((min(tile, r1 - r0), k), np.float32)
            for a in range(r0, r1, tile):
                b = min(r1, a + tile)
                np.matmul(x, self.dequantize_rows_serial(a, b, buf).T, out=out[:, a:b])

        if threads == 1:
            work(0)
        else:
            in_parallel(_pool(threads), work, range(0, n, step))
        return out


def _batch_args(lin: _StoredLinear, X: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``X`` as C-contiguous f32 [B, in]; ``out`` checked (or made) as C-contiguous f32 [B, out]."""
    X = np.ascontiguousarray(X, np.float32)
    if X.ndim != 2 or X.shape[1] != lin.in_features:
        raise ValueError(f"matvec_batch needs X of shape [B, {lin.in_features}], got {X.shape}")
    shape = (X.shape[0], lin.out_features)
    if out is None:
        return X, np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"matvec_batch needs out as a writable C-contiguous float32 {shape} array")
    return X, out


class NF4Linear(_StoredLinear):
    """``y = x W^T`` for an NF4 weight ``W [out_features, in_features]``, read in place."""

    def __init__(self, q: NF4Tensor):
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {q.shape}")
        self.out_features, self.in_features = (int(d) for d in q.shape)
        self.block_size = q.block_size
        self.packed = q.packed
        self.qscale, self.nested, self.nshift, self.offset = q.scale_args()
        # the leading arguments of every NF4 kernel, built once rather than per call
        self._kargs = (NF4_CODE, DYNAMIC_CODE, self.packed, self.qscale, self.nested, self.nshift, self.offset,
                       self.block_size)
        self.tensor = q

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x: f32 [in] -> f32 [out]"""
        if out is None:
            out = np.empty(self.out_features, np.float32)
        x = np.ascontiguousarray(x, np.float32)
        xe, xo = np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2])
        n, k = self.out_features, self.in_features
        if self._parallel(n * k):
            _nf4_matvec_parallel(*self._kargs, n, k, x, xe, xo, out, numba.get_num_threads())
        else:
            _nf4_matvec_rows(*self._kargs, k, 0, n, x, xe, xo, out)
        return out

    def matvec_batch(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X: f32 [B, in] -> f32 [B, out], row b bit for bit ``matvec(X[b])``; each weight byte is
        read once for the whole batch (decode of B sequences sharing the base weight)."""
        X, out = _batch_args(self, X, out)
        if X.shape[0] == 0:
            return out
        XE, XO = np.ascontiguousarray(X[:, 0::2]), np.ascontiguousarray(X[:, 1::2])  # [B, ceil(in/2)], [B, in/2]
        n, k = self.out_features, self.in_features
        if self._parallel(n * k):
            _nf4_matvec_batch_parallel(*self._kargs, n, k, X, XE, XO, out, numba.get_num_threads())
        else:
            _nf4_matvec_batch_rows(*self._kargs, k, 0, n, X, XE, XO, out)
        return out

    def dequantize_rows(self, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        """float32 rows ``[r0, r1)`` of the weight, with all threads when there are many."""
        if buf is None:
            buf = np.empty((r1 - r0, self.in_features), np.float32)
        if not self._parallel((r1 - r0) * self.in_features):
            return self.dequantize_rows_serial(r0, r1, buf)
        _nf4_dequant_parallel(*self._kargs, self.in_features, r0, r1, buf, numba.get_num_threads())
        return buf[: r1 - r0]

    def dequantize_rows_serial(self, r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
        _nf4_dequant_rows(*self._kargs, self.in_features, r0, r1, buf)
        return buf[: r1 - r0]

    def rows(self, ids) -> np.ndarray:
        """Embedding lookup: float32 rows for token ids."""
        return np.stack([self.dequantize_rows(int(i), int(i) + 1)[0] for i in ids]) if len(ids) else \
            np.zeros((0, self.in_features), np.float32)


def nf4_matvec_reference(q: NF4Tensor, x: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`NF4Linear.matvec` (dequantize, then multiply)."""
    return (q.dequantize_reference().astype(np.float64) @ np.asarray(x, np.float64)).astype(np.float32)


def nf4_matmul_reference(q: NF4Tensor, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float64) @ q.dequantize_reference().astype(np.float64).T).astype(np.float32)


def nf4_matvec_batch_reference(q: NF4Tensor, X: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`NF4Linear.matvec_batch`: X [B, in] -> [B, out]."""
    return nf4_matmul_reference(q, X)


# ---------------------------------------------------------------------------------------------
# float16
# ---------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=_FM)
def _f16_dot_rows_portable(w_bits, n_rows, k, x, out):
    """out[:n_rows] = W @ x for the rows held in ``w_bits`` (float16 bits, row-major), a row at a
    time (LLVM vectorises the widening and the sum)."""
    for r in range(n_rows):
        acc = np.float32(0.0)
        base = r * k
        for c in range(k):
            acc += half_to_float(w_bits[base + c]) * x[c]
        out[r] = acc


@njit(cache=True)
def _f16_dot_rows(w_bits, n_rows, k, x, out):
    """out[:n_rows] = W @ x: rows of whole cache lines through ``f16_rows_dot`` (four rows share
    each x load; the next rows are prefetched), others through the portable loop."""
    if k % F16_CHUNK == 0:
        f16_rows_dot(w_bits, x, out, 0, n_rows, k)
    else:
        _f16_dot_rows_portable(w_bits, n_rows, k, x, out)


F16_DOT_VARIANTS = {"portable": _f16_dot_rows_portable, "tiled": _f16_dot_rows}  # the tests check both


@njit(cache=True)
def _f16_dot_rows_batch(w_bits, n_rows, k, X, OUT, o0):
    """OUT[:, o0:o0 + n_rows] = X @ W.T, X [B, k]: each row is dotted with every vector while it
    is in cache, by :func:`_f16_dot_rows` on that one row (a row's arithmetic does not depend on
    how many rows a call gets; same argument types), so bit for bit its result."""
    for r in range(n_rows):
        row = w_bits[r * k:(r + 1) * k]
        for b in range(X.shape[0]):
            _f16_dot_rows(row, 1, k, X[b], OUT[b, o0 + r:o0 + r + 1])


@njit(cache=True, parallel=True)
def _f16_matvec_parallel(w_bits, n_rows, k, x, out, chunks):
    step = (n_rows + chunks - 1) // chunks
    for c in prange(chunks):
        r0 = c * step
        r1 = min(n_rows, r0 + step)
        if r0 < r1:
            _f16_dot_rows(w_bits[r0 * k:r1 * k], r1 - r0, k, x, out[r0:r1])


@njit(cache=True, parallel=True)
def _f16_matvec_batch_parallel(w_bits, n_rows, k, X, OUT, chunks):
    step = (n_rows + chunks - 1) // chunks
    for c in prange(chunks):
        r0 = c * step
        r1 = min(n_rows, r0 + step)
        if r0 < r1:
            _f16_dot_rows_batch(w_bits[r0 * k:r1 * k], r1 - r0, k, X, OUT, r0)


@njit(cache=True, nogil=True)
def _f16_rows(w_bits, k, r0, r1, buf):
    src = w_bits[r0 * k:r1 * k]
    for rr in range(r1 - r0):
        for c in range(k):
            buf[rr, c] = half_to_float(src[rr * k + c])


class F16Linear(_StoredLinear):
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
        x = np.ascontiguousarray(x, np.float32)
        n, k = self.out_features, self.in_features
        if self._parallel(n * k):
            _f16_matvec_parallel(self.bits, n, k, x, out, numba.get_num_threads())
        else:
            _f16_dot_rows(self.bits, n, k, x, out)
        return out

    def matvec_batch(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X: f32 [B, in] -> f32 [B, out], row b bit for bit ``matvec(X[b])``."""
        X, out = _batch_args(self, X, out)
        n, k = self.out_features, self.in_features
        if self._parallel(n * k):
            _f16_matvec_batch_parallel(self.bits, n, k, X, out, numba.get_num_threads())
        else:
            _f16_dot_rows_batch(self.bits, n, k, X, out, 0)
        return out

    def dequantize_rows_serial(self, r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
        _f16_rows(self.bits, self.in_features, r0, r1, buf)
        return buf[: r1 - r0]

    def rows(self, ids) -> np.ndarray:
        return self.weight[np.asarray(ids, np.int64)].astype(np.float32)


def f16_matvec_reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (w.astype(np.float64) @ np.asarray(x, np.float64)).astype(np.float32)


def f16_matvec_batch_reference(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`F16Linear.matvec_batch`: X [B, in] -> [B, out]."""
    return (np.asarray(X, np.float64) @ w.astype(np.float64).T).astype(np.float32)
