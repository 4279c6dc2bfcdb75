"""Decode steps compiled: the pieces of a Llama decoder layer for a few rows, and the whole step of
every layer in one call.

A prompt's prefill runs ``runtime/llama.py``'s NumPy layer (its time is in the products). A decode
step has one row per sequence, and there the NumPy calls around the products (norms, rotary,
attention over the cache, activations: some thirty array operations a layer, each a few
microseconds) and the Python around them cost about a quarter of the step. So a decode row of a
Llama-family model (Llama, Mistral, Qwen2) runs these compiled pieces instead:

* :func:`rmsnorm_rows` (twin: ``llama.rmsnorm``), eight float32 partial sums per row;
* :func:`attend_row`: rotary on the row's query and key, its key and value stored in the cache,
  the query attending to every cached key its position may see (twin: ``llama.rope`` +
  ``llama.attention_reference``), heads split between the threads;
* :func:`silu_mul` (twin: ``llama.silu(gate) * up``), also on a prompt's rows (``LlamaModel.gated``:
  on one thread, its exp vectorized, 128 x 5632 in 0.8 ms, less than a hand-off to the prefill pool).

``LlamaModel.decode_rows`` runs them one by one around the adapters' projections
(``Selection.apply``), and, when every row runs one selection on one cache (the base, or LoRA
adapters: not DoRA, no replaced projection) and every projection is an int8-path NF4 weight (the
default), :func:`decode_layers` runs the same pieces, the same int8 kernels (``runtime/int8.py``)
and the same adapter plan and kernels (``lora.Selection._group_plan``, ``lora.stack_down``,
``lora.stack_up``) for all layers in one call: no Python between the products, each adapter's
A products in the same parallel region as the base products they sit beside, and each thread's
rows of the MLP's SwiGLU and their quantization where it made them (:func:`_gate_up`). Both orders of the
same compiled functions, so a row's bits do not depend on which ran it, on its batch, or on the
thread count (the products', the adapters' and the attention's split between threads never
changes a sum).

The pieces' float operations are IEEE float32 (``fastmath=False``: no reassociation, no fused
multiply-adds), so their NumPy twins agree to a few ulps (the sums' order differs), tested.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgelora.runtime.int8 import NF4_I8, TILED, NF4Int8Linear, _f32_bits, _i8_slice_at, _quantize_span, _quantize_x
from edgelora.runtime.int8_gemm import GEMM_ROWS, block_sums, block_sums_into, tiles_slice
from edgelora.runtime.kernels import PARALLEL_MIN_WEIGHTS, rows_in_parallel
from edgelora.runtime.lora import BASE, LORA_CHUNK, Selection, stack_down, stack_up
from edgelora.runtime.simd import SIMD, _hsum, _prefetch, prefetch
from edgelora.storage import DYNAMIC_CODE

#: the projections of a layer in :func:`decode_layers`' order
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
_F0 = np.float32(0.0)


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=False, inline="always")
def _dot(a, b, n):
    """``sum a[i] b[i]`` for i < n in float32: eight partial sums (lanes i mod 8), added pairwise."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _F0
    i = 0
    while i + 8 <= n:
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
        i += 8
    t = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
    while i < n:
        t += a[i] * b[i]
        i += 1
    return t


@intrinsic
def _dot_at(typingctx, a, b, b0, n):
    """``sum a[i] b[b0 + i]`` for i < n (float32 1-D arrays, C order) with :func:`_dot`'s bits: lane
    ``i mod 8`` of an 8-float vector (a product, then a sum: no FMA) over the whole steps of 8, the
    lanes added pairwise (``_hsum``), the rest one by one. Explicit vectors, since LLVM leaves
    ``_dot``'s eight scalar sums scalar (a decode row's scores: 3.7 G products/s through ``_dot``,
    five times that through this)."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.dtype == b.dtype == types.float32
            and a.ndim == b.ndim == 1 and a.layout == b.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        f32, i64 = ir.FloatType(), ir.IntType(64)
        v8 = ir.VectorType(f32, 8)
        pa, pb = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1))
        pb = builder.gep(pb, [args[2]])
        n = args[3]
        whole = builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8))
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * 8))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), whole, ir.Constant(i64, 8)) as (i, _):
            x = builder.load(builder.bitcast(builder.gep(pa, [i]), v8.as_pointer()), align=4)
            y = builder.load(builder.bitcast(builder.gep(pb, [i]), v8.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(x, y)), acc)
        t = cgutils.alloca_once_value(builder, _hsum(builder, builder.load(acc), 8))
        with cgutils.for_range_slice(builder, whole, n, ir.Constant(i64, 1)) as (i, _):
            x = builder.load(builder.gep(pa, [i]))
            y = builder.load(builder.gep(pb, [i]))
            builder.store(builder.fadd(builder.load(t), builder.fmul(x, y)), t)
        return builder.load(t)

    return types.float32(a, b, types.uint64, types.uint64), codegen


#: floats in each partial sum vector of an attention score (:func:`_head_dots`): lane ``i mod 16``
#: of a query-key dot, fixed on every ISA so that a score's bits do not depend on the CPU's
#: vectors (LLVM splits a 16-float vector into what the CPU has)
SCORE_LANES = 16
#: heads and keys one :func:`_head_dots` call dots together, within the register file: 16 sums
#: of 16 floats in 16 of AVX-512's 32 registers; 4 of them elsewhere (AVX2's 16 registers of 8
#: floats, NEON's 32 of 4). Which dots run together never changes a dot's bits.
SCORE_BLOCK = (4, 4) if SIMD == "avx512" else (2, 2)
#: heads one :func:`_weighted_sums` call sums together (4 x 64 outputs in 16 registers of AVX-512)
VALUE_HEADS = 4 if SIMD == "avx512" else 1
#: keys ahead of the one being read that the attention asks the memory for (a decode step reads a
#: long cache from memory, one layer after another: software prefetch keeps several pages in
#: flight where the hardware's stops at each 4 KB page; a TinyLlama step's attention at 4,000
#: positions 7.1 -> 6.6 ms, its scores 3.1 -> 2.4 ms)
PREFETCH_KEYS = 16


def _vec(builder, ptr, vt):
    """Load a vector of type ``vt`` from ``ptr`` (unaligned)."""
    return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)


def _cache_load(builder, ptr, lanes: int, half: bool):
    """``lanes`` float32 (a vector, or one float when ``lanes`` is 1) from a cache's ``ptr``: float32
    as they are; float16 bits (a float16 cache, held as uint16) widened exactly (``fpext``: F16C
    ``vcvtph2ps`` on x86-64, ``fcvtl`` on aarch64)."""
    f32 = ir.FloatType()
    if not half:
        return _vec(builder, ptr, ir.VectorType(f32, lanes)) if lanes > 1 else builder.load(ptr)
    if lanes == 1:
        return builder.fpext(builder.bitcast(builder.load(ptr), ir.HalfType()), f32)
    bits = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), lanes).as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(f32, lanes))


def _cache_array(a) -> bool | None:
    """Whether a kernel's cache array ``a`` holds float16 bits (uint16; False: float32; None: neither)."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"):
        return None
    return True if a.dtype == types.uint16 else False if a.dtype == types.float32 else None


@intrinsic
def _to_cache(typingctx, x, like):
    """The float32 ``x`` as an element of the cache array ``like``: itself (float32), or its float16
    bits (uint16), rounded to nearest even as NumPy's ``astype(np.float16)`` rounds (``fptrunc``)."""
    if x != types.float32 or not isinstance(like, types.Array):
        return None
    if like.dtype == types.float32:
        return types.float32(x, like), lambda context, builder, sig, args: args[0]
    if like.dtype == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return types.uint16(x, like), codegen
    return None


def _head_dots(heads: int, keys: int):
    """An intrinsic ``f(q, q0, qstep, k, k0, kstep, n, s, s0, sstep)``: for h < ``heads`` and c <
    ``keys``, ``s[s0 + h sstep + c] = sum_i q[q0 + h qstep + i] k[k0 + c kstep + i]`` for i < n
    (flat float32 arrays, ``k`` float32 or float16 bits widened exactly; unsigned offsets): the
    scores of ``heads`` queries against ``keys`` keys, each key's vectors loaded once for every
    head. Each dot's bits are those of the dot alone: lane
    ``i mod 16`` of a 16-float sum over the whole steps of 16 (a product, then a sum: no FMA),
    the lanes added pairwise (``_hsum``), then the rest one by one (``tests/test_decode.py`` has
    its NumPy twin). ``heads`` x ``keys`` independent sums, where one dot's sum would wait on each
    add before it."""
    lanes = SCORE_LANES

    @intrinsic
    def dots(typingctx, q, q0, qstep, k, k0, kstep, n, s, s0, sstep):
        if _cache_array(q) is not False or _cache_array(s) is not False or _cache_array(k) is None:
            return None
        half = _cache_array(k)

        def codegen(context, builder, sig, args):
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vt = ir.VectorType(f32, lanes)
            pq, pk, ps = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3, 7))
            q0, qstep, k0, kstep, n, s0, sstep = (args[i] for i in (1, 2, 4, 5, 6, 8, 9))
            qs = [builder.gep(pq, [builder.add(q0, builder.mul(qstep, ir.Constant(i64, h)))]) for h in range(heads)]
            ks = [builder.gep(pk, [builder.add(k0, builder.mul(kstep, ir.Constant(i64, c)))]) for c in range(keys)]
            whole = builder.mul(builder.udiv(n, ir.Constant(i64, lanes)), ir.Constant(i64, lanes))
            zero = ir.Constant(vt, [0.0] * lanes)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(keys)] for _ in range(heads)]
            with cgutils.for_range_slice(builder, ir.Constant(i64, 0), whole, ir.Constant(i64, lanes)) as (i, _):
                kv = [_cache_load(builder, builder.gep(p, [i]), lanes, half) for p in ks]
                for h in range(heads):
                    x = _vec(builder, builder.gep(qs[h], [i]), vt)
                    for c in range(keys):
                        a = accs[h][c]
                        builder.store(builder.fadd(builder.load(a), builder.fmul(x, kv[c])), a)
            ts = [[cgutils.alloca_once_value(builder, _hsum(builder, builder.load(a), lanes)) for a in row] for row in accs]
            with cgutils.for_range_slice(builder, whole, n, ir.Constant(i64, 1)) as (i, _):
                for h in range(heads):
                    x = builder.load(builder.gep(qs[h], [i]))
                    for c in range(keys):
                        y = _cache_load(builder, builder.gep(ks[c], [i]), 1, half)
                        builder.store(builder.fadd(builder.load(ts[h][c]), builder.fmul(x, y)), ts[h][c])
            for h in range(heads):
                row = builder.add(s0, builder.mul(sstep, ir.Constant(i64, h)))
                for c in range(keys):
                    builder.store(builder.load(ts[h][c]), builder.gep(ps, [builder.add(row, ir.Constant(i64, c))]))
            return context.get_dummy_value()

        u = types.uint64
        return types.none(q, u, u, k, u, u, u, s, u, u), codegen

    return dots


def _weighted_sums(heads: int):
    """An intrinsic ``f(p, p0, pstep, v, v0, vstep, n, width, o, o0, ostep)``: for h < ``heads`` and
    d < ``width``, ``o[o0 + h ostep + d] = sum_j p[p0 + h pstep + j] v[v0 + j vstep + d]`` (``v``
    float32 or float16 bits widened exactly), j = 0 .. n - 1 in order from 0.0 (a product, then a
    sum: no FMA): each head's bits are those of ``out[d] += p[j] * v[j, d]`` looped over j,
    whatever heads run beside it. A run of 64 outputs of every
    head stays in registers while j runs, each value vector loaded once for all the heads; then
    runs of 8, then single outputs."""

    @intrinsic
    def sums(typingctx, p, p0, pstep, v, v0, vstep, n, width, o, o0, ostep):
        if _cache_array(p) is not False or _cache_array(o) is not False or _cache_array(v) is None:
            return None
        half = _cache_array(v)
        line = 32 if half else 16  # values a cache line holds

        def codegen(context, builder, sig, args):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            pp, pv, po = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3, 8))
            p0, pstep, v0, vstep, n, width, o0, ostep = (args[i] for i in (1, 2, 4, 5, 6, 7, 9, 10))
            ps = [builder.gep(pp, [builder.add(p0, builder.mul(pstep, ir.Constant(i64, h)))]) for h in range(heads)]
            outs = [builder.gep(po, [builder.add(o0, builder.mul(ostep, ir.Constant(i64, h)))]) for h in range(heads)]

            def run(lanes, count, d0):  # outputs d0 .. d0 + lanes * count of every head
                vt = ir.VectorType(f32, lanes) if lanes > 1 else f32
                zero = ir.Constant(vt, [0.0] * lanes) if lanes > 1 else ir.Constant(f32, 0.0)
                accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(count)] for _ in range(heads)]
                for a in (a for row in accs for a in row):
                    builder.store(zero, a)
                with cgutils.for_range(builder, n) as loop:
                    j = loop.index
                    row = builder.gep(pv, [builder.add(builder.add(v0, builder.mul(j, vstep)), d0)])
                    xs = [_cache_load(builder, builder.gep(row, [ir.Constant(i64, r * lanes)]), lanes, half)
                          for r in range(count)]
                    if lanes > 1 and PREFETCH_KEYS:  # the same outputs PREFETCH_KEYS rows on
                        ahead = builder.gep(row, [builder.mul(vstep, ir.Constant(i64, PREFETCH_KEYS))])
                        for at in range(0, lanes * count, line):
                            _prefetch(builder, builder.gep(ahead, [ir.Constant(i64, at)]))
                    for h in range(heads):
                        pj = builder.load(builder.gep(ps[h], [j]))
                        if lanes > 1:
                            pj = builder.insert_element(ir.Constant(vt, ir.Undefined), pj, ir.Constant(i32, 0))
                            pj = builder.shuffle_vector(pj, pj, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                        for x, a in zip(xs, accs[h]):
                            builder.store(builder.fadd(builder.load(a), builder.fmul(pj, x)), a)
                for h in range(heads):
                    for r, a in enumerate(accs[h]):
                        at = builder.gep(outs[h], [builder.add(d0, ir.Constant(i64, r * lanes))])
                        builder.store(builder.load(a), builder.bitcast(at, vt.as_pointer()) if lanes > 1 else at, align=4)

            done = ir.Constant(i64, 0)
            for lanes, count in ((16, 4), (8, 1), (1, 1)):  # runs of 64, then of 8, then single outputs
                size = ir.Constant(i64, lanes * count)
                whole = builder.mul(builder.udiv(width, size), size)  # (at least `done`: 64 is a multiple of 8)
                with cgutils.for_range_slice(builder, done, whole, size) as (d0, _):
                    run(lanes, count, d0)
                done = whole
            return context.get_dummy_value()

        u = types.uint64
        return types.none(p, u, u, v, u, u, u, u, o, u, u), codegen

    return sums


_HB, _KB = SCORE_BLOCK
_dots_block, _dots_heads, _dots_keys, _dot1 = (_head_dots(_HB, _KB), _head_dots(1, _KB), _head_dots(_HB, 1),
                                               _head_dots(1, 1))
_sums_block, _sums1 = _weighted_sums(VALUE_HEADS), _weighted_sums(1)


@njit(cache=True, fastmath=False, inline="always")
def _scores(qf, h0, h1, hd, Kf, k0, n, s):
    """s [(h1 - h0) n]: row h - h0 the dots of query head h (``qf`` [nh hd] flat) with keys 0 .. n -
    1 of one key-value head, key j at ``Kf[k0 + j hd]`` (contiguous), :data:`SCORE_BLOCK` heads and
    keys at a time (:func:`_head_dots`), the keys :data:`PREFETCH_KEYS` on asked for ahead."""
    u, w, m = np.uint64, np.uint64(hd), np.uint64(n)
    j = 0
    while j < n:
        kb = _KB if j + _KB <= n else 1
        at = k0 + u(j) * w
        if PREFETCH_KEYS and kb == _KB:
            ahead = at + u(PREFETCH_KEYS) * w
            for c in range(0, _KB * hd, 64 // Kf.itemsize):  # (a cache line a call)
                prefetch(Kf, np.int64(ahead + u(c)))
        h = h0
        while h < h1:
            row = u(h - h0) * m + u(j)
            if h + _HB <= h1:
                if kb == _KB:
                    _dots_block(qf, u(h) * w, w, Kf, at, w, w, s, row, m)
                else:
                    _dots_keys(qf, u(h) * w, w, Kf, at, w, w, s, row, m)
                h += _HB
            else:
                if kb == _KB:
                    _dots_heads(qf, u(h) * w, w, Kf, at, w, w, s, row, m)
                else:
                    _dot1(qf, u(h) * w, w, Kf, at, w, w, s, row, m)
                h += 1
        j += kb


@njit(cache=True, fastmath=False, inline="always")
def _values(s, n, h0, h1, Vf, v0, hd, of):
    """of[h hd .. (h + 1) hd] for heads h0 .. h1 - 1: row h - h0 of s [(h1 - h0) n] (the head's
    weights of values 0 .. n - 1, value j at ``Vf[v0 + j hd]``) times the values, summed in order
    (:func:`_weighted_sums`), :data:`VALUE_HEADS` heads at a time."""
    u, w, m = np.uint64, np.uint64(hd), np.uint64(n)
    h = h0
    while h < h1:
        if h + VALUE_HEADS <= h1:
            _sums_block(s, u(h - h0) * m, m, Vf, v0, w, m, w, of, u(h) * w, w)
            h += VALUE_HEADS
        else:
            _sums1(s, u(h - h0) * m, m, Vf, v0, w, m, w, of, u(h) * w, w)
            h += 1


@njit(cache=True, fastmath=False, inline="always")
def _sum(a):
    """``sum a[i]`` in float32: eight partial sums (lanes i mod 8), added pairwise (as :func:`_dot`)."""
    n = a.size
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _F0
    i = 0
    while i + 8 <= n:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
        i += 8
    t = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
    while i < n:
        t += a[i]
        i += 1
    return t


@njit(cache=True, fastmath=False)
def rmsnorm_rows(x, w, eps, out):
    """out [B, H] = ``w * (x / sqrt(mean(x^2) + eps))`` row by row, float32 (``llama.rmsnorm``)."""
    B, H = x.shape
    for b in range(B):
        row = x[b]
        var = _dot(row, row, H) / np.float32(H)
        root = np.float32(np.sqrt(var + eps))
        for j in range(H):
            out[b, j] = w[j] * (row[j] / root)
    return out


# Cephes' expf: e^x = 2^n e^r, n = rint(x log2 e), r = x - n ln 2 in two parts (exact products for
# |n| < 2^9), e^r by a degree-7 polynomial on |r| <= ln2 / 2; within 2 ulps of the C library's expf
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
          np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@njit(cache=True, fastmath=False, inline="always")
def _exp(x):
    """e^x in float32 with no call to the C library, so a loop of it vectorizes: x above 88.8 gives
    inf, below -104 gives 0 (as expf, up to its last denormals), NaN gives NaN."""
    x = np.float32(88.8) if x > np.float32(88.8) else x
    x = np.float32(-104.0) if x < np.float32(-104.0) else x
    n = np.rint(x * _LOG2E)  # -150 .. 128
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_P[0]
    p = p * r + _EXP_P[1]
    p = p * r + _EXP_P[2]
    p = p * r + _EXP_P[3]
    p = p * r + _EXP_P[4]
    p = p * r + _EXP_P[5]
    y = (p * (r * r) + r) + np.float32(1.0)
    k = np.int32(n)
    h = k >> 1  # 2^n as two factors, neither of which overflows nor underflows early
    return (y * _f32_bits((h + np.int32(127)) << 23)) * _f32_bits((k - h + np.int32(127)) << 23)


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy", inline="always")
def _silu_mul_row(g, u, o):
    """o [n] = ``g / (1 + exp(-g)) * u`` for one row (contiguous 1-D arrays: the loops vectorize;
    a strided 2-D slice such as ``gu[:, :I]`` keeps them scalar, 8x slower)."""
    one = np.float32(1.0)
    for j in range(g.size):
        o[j] = _exp(-g[j])
    for j in range(g.size):
        o[j] = g[j] / (one + o[j]) * u[j]


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def silu_mul(gate, up, out):
    """out = ``gate / (1 + exp(-gate)) * up``, elementwise float32 (``llama.silu(gate) * up``), ``out``
    another array than ``gate`` and ``up``. ``exp`` is :func:`_exp` in a loop of its own, the rest in
    another: both vectorize (``error_model="numpy"``: a division by zero is IEEE's, with no check
    that would keep the loop scalar; here 1 + exp(-g) >= 1 anyway). A prompt chunk of 128 x 5632
    in 0.7 ms on one thread (4.1 with the C library's expf in one loop)."""
    for b in range(gate.shape[0]):
        _silu_mul_row(gate[b], up[b], out[b])
    return out


def silu_mul_rows(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """:func:`silu_mul` of a prompt's rows [T, I] into a new array, its rows shared between the
    prefill threads (``kernels.rows_in_parallel``; a Llama-3.2-1B prompt of 512: 4 ms a layer on
    one thread)."""
    gate, up = np.ascontiguousarray(gate, np.float32), np.ascontiguousarray(up, np.float32)
    out = np.empty(gate.shape, np.float32)
    rows_in_parallel(lambda r: silu_mul(gate[r], up[r], out[r]), gate.shape[0])
    return out


@njit(cache=True, fastmath=False, inline="always")
def _rope_into(x, cos, sin, rd, out):
    """out [heads, hd] = x [heads, hd] rotated (``llama.rope`` of one position): ``x cos +
    rotate_half(x) sin`` on the first ``rd`` dimensions, the rest copied; ``out`` float32, or a
    float16 cache's bits (each value rounded as :func:`_to_cache` rounds)."""
    half = rd // 2
    for h in range(x.shape[0]):
        for j in range(half):
            out[h, j] = _to_cache(x[h, j] * cos[j] + x[h, j + half] * -sin[j], out)
            out[h, j + half] = _to_cache(x[h, j + half] * cos[j + half] + x[h, j] * sin[j + half], out)
        for j in range(rd, x.shape[1]):
            out[h, j] = _to_cache(x[h, j], out)


@njit(cache=True, fastmath=False, nogil=True)
def rope_rows(x, cos, sin, out):
    """out [T, heads, hd] = each row of x [T, heads, hd] rotated by its position's ``cos``, ``sin``
    [T, rd] (``llama.rope``, the same float operations: the same bits)."""
    rd = cos.shape[1]
    for t in range(x.shape[0]):
        _rope_into(x[t], cos[t], sin[t], rd, out[t])
    return out


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def scale_rows(x, root, w, out):
    """out [T, H] = ``w * (x / root)`` with one ``root`` a row (``llama.rmsnorm``'s last step, its
    bits)."""
    for t in range(x.shape[0]):
        r = root[t]
        for j in range(x.shape[1]):
            out[t, j] = w[j] * (x[t, j] / r)
    return out


@njit(cache=True, fastmath=False, inline="always")
def _ordered(bits):
    """The int32 ``bits`` of a float32 as an int32 in the floats' order (NaN aside): negative
    floats' magnitude bits flipped, so an integer maximum, which vectorizes, is the float one."""
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def online_softmax_block(s, q_pos, s0, window, divide, scale, cap, m, l, r):
    """One key block of a prompt's blockwise attention (``llama.attention_blockwise``), in a few
    passes over each row: ``s`` [rows, b] the raw scores of keys ``s0 .. s0 + b`` (row ``i`` the
    query at ``q_pos[i % T]``), in place -> ``p = exp(score - m_new)``, 0 for keys the query may not
    see (later ones; with ``window`` > 0, those ``window`` or more positions back); the running
    maximum ``m`` and sum ``l`` [rows] updated, ``r`` [rows] = ``exp(m_old - m_new)`` (0 while no
    key was seen), by which the caller rescales its sums. Scores are divided by ``scale``
    (``divide``) or multiplied by it (``scale`` > 0), then soft-capped by ``cap`` when it is not 0,
    as ``llama.scaled``. The maximum is taken on the raw scores as ordered integers (scaling by a
    positive number and the soft cap keep the order, IEEE rounding being monotonic), exp is
    :func:`_exp` (within 3 ulps of NumPy's), the sum :func:`_dot_at`'s: every loop vectorizes."""
    rows, b = s.shape
    T = q_pos.size
    ninf = np.float32(-np.inf)
    bits = s.view(np.int32)
    ones = np.ones(b, np.float32)
    for i in range(rows):
        row, rb = s[i], bits[i]
        pos = q_pos[i % T]
        hi = min(b, max(0, pos - s0 + 1))  # keys s0 + j, j < hi, are at or before the query
        lo = min(hi, max(0, pos - window + 1 - s0)) if window > 0 else 0
        mx = ninf
        if hi > lo:  # (unsigned offsets: no negative-index wraparound, no gathers)
            top, at = _ordered(rb[lo]), np.uint64(lo)
            for j in range(np.uint64(1), np.uint64(hi - lo)):
                top = max(top, _ordered(rb[at + j]))
            mx = _f32_bits(_ordered(top))  # (the map is its own inverse)
            mx = mx / scale if divide else mx * scale
            if cap != 0:
                mx = np.float32(np.tanh(mx / cap)) * cap
        m_new = max(m[i], mx)
        shift = _F0 if m_new == ninf else m_new
        if cap != 0:
            for j in range(b):
                v = row[j] / scale if divide else row[j] * scale
                row[j] = np.float32(np.tanh(v / cap)) * cap - shift
            for j in range(b):
                row[j] = _exp(row[j])
        elif divide:
            for j in range(b):
                row[j] = _exp(row[j] / scale - shift)
        else:
            for j in range(b):
                row[j] = _exp(row[j] * scale - shift)
        row[:lo] = _F0
        row[hi:] = _F0
        total = _dot_at(ones, row, np.uint64(0), np.uint64(b))  # (times 1: exact; in vectors)
        r[i] = _exp(m[i] - shift) if m[i] != ninf else _F0
        l[i] = l[i] * r[i] + total
        m[i] = m_new


@njit(cache=True, fastmath=False, inline="always")
def _attend_heads(q, K, V, lo, n, scale, divide, cap, threads, out):
    """out [nh, hd]: each head of q [nh, hd] over keys ``lo .. n - 1`` of K, V [nkv, S, hd] (a
    key-value head's positions contiguous; grouped: head h reads key head ``h // (nh / nkv)``);
    scores times ``scale`` (divided by it when ``divide``), soft-capped by ``cap`` when it is not 0,
    softmax, the values' weighted sum. The heads that share a key-value head run together: their
    scores a block of heads and keys at a time (:func:`_scores`), then each head's softmax, then
    their weighted sums of the values, each value read once for a block of heads
    (:func:`_values`). Each head's arithmetic, and so its bits, is that of the head alone, one key
    after another. The work is split by key-value head, each group in as many parts as keep
    ``threads`` busy (a TinyLlama step's attention at 1,000 positions, every layer's cache read
    from memory: 4.4 ms with the positions of a key-value head 1 KB apart, 1.8 ms contiguous and
    in blocks; bench/README)."""
    nh, hd = q.shape
    nkv, S = K.shape[0], K.shape[1]
    group = nh // nkv
    parts = min(group, max(1, (threads + nkv - 1) // nkv))  # pieces of a group
    size = (group + parts - 1) // parts
    qf, Kf, Vf, of = q.reshape(-1), K.reshape(-1), V.reshape(-1), out.reshape(-1)  # flat: unsigned offsets
    m = n - lo
    for u in prange(nkv * parts):
        g = u // parts
        h0 = g * group + (u % parts) * size
        h1 = min(h0 + size, (g + 1) * group)
        if h0 >= h1:
            continue
        at = (np.uint64(g) * np.uint64(S) + np.uint64(lo)) * np.uint64(hd)  # key lo of key-value head g
        s = np.empty((h1 - h0) * m, np.float32)
        _scores(qf, h0, h1, hd, Kf, at, m, s)
        for h in range(h1 - h0):  # each head's softmax
            r, top = s[h * m:(h + 1) * m], np.float32(-np.inf)
            for j in range(m):
                v = r[j] / scale if divide else r[j] * scale
                if cap != 0:
                    v = np.float32(np.tanh(v / cap)) * cap
                r[j] = v
                top = max(top, v)
            for j in range(m):  # (loops of their own, which vectorize: _exp calls no library)
                r[j] = _exp(r[j] - top)
            total = _sum(r)
            for j in range(m):
                r[j] = r[j] / total
        _values(s, m, h0, h1, Vf, at, hd, of)


@njit(cache=True, fastmath=False, inline="always")
def _store(x, dst):
    """dst [heads, hd] (a cache's, float32 or float16 bits) = x [heads, hd] float32 (:func:`_to_cache`)."""
    for h in range(x.shape[0]):
        for j in range(x.shape[1]):
            dst[h, j] = _to_cache(x[h, j], dst)


@njit(cache=True, fastmath=False, parallel=True, inline="always")
def attend_row(q, k, v, K, V, pos, cos, sin, rd, window, scale, divide, cap, threads, out):
    """One decode row at position ``pos``: q [nh, hd], k, v [nkv, hd] of this step; K, V
    [nkv, S, hd] the layer's cache (float32, or a float16 cache's bits: ``KVCache.kernel_arrays``).
    Rotates q and k (``cos``, ``sin`` [rd] of the position), stores k and v at ``pos``, and writes
    to out [nh * hd] the attention of q over positions ``0 .. pos`` (the last ``window`` of them
    when ``window`` > 0), split between ``threads`` (passed in: ``numba.get_num_threads()`` inside
    would keep the function out of the cache)."""
    _rope_into(k, cos, sin, rd, K[:, pos])
    _store(v, V[:, pos])
    qr = np.empty_like(q)
    _rope_into(q, cos, sin, rd, qr)
    lo = max(0, pos - window + 1) if window > 0 else 0
    _attend_heads(qr, K, V, lo, pos + 1, scale, divide, cap, threads, out.reshape(q.shape))
    return out


def attention_args(net, i: int) -> tuple:
    """``(window, scale, divide, cap)`` of layer ``i`` of ``net`` as :func:`attend_row` takes them."""
    window = net.window_of(i) or 0
    if net.scale is None:
        scale, divide = np.float32(math.sqrt(net.args.head_dim)), True
    else:
        scale, divide = np.float32(net.scale), False
    return window, scale, divide, np.float32(net.attn_cap or 0.0)


# ---------------------------------------------------------------------------------------------
# every layer in one call
# ---------------------------------------------------------------------------------------------

# The projections' arrays reach the compiled step as addresses and lengths (int64 arrays), each
# made an array again inside by ``numba.carray``: no container of 154 arrays to build or unbox (a
# typed List costs a compilation and some 70 MB in every process; a tuple, a compilation per layer
# count). ``CompiledLayers`` holds the arrays themselves, so the addresses stay valid.

@intrinsic
def _u8_ptr(typingctx, addr):
    """The int64 ``addr`` as a pointer to uint8."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.CPointer(types.uint8)(types.int64), codegen


@intrinsic
def _ptr_like(typingctx, addr, like):
    """The int64 ``addr`` as a pointer to the dtype of array ``like``."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(like.dtype).as_pointer())
    return types.CPointer(like.dtype)(types.int64, like), codegen


@intrinsic
def _f32_ptr(typingctx, addr):
    """The int64 ``addr`` as a pointer to float32."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(types.int64), codegen


@intrinsic
def _u16_ptr(typingctx, addr):
    """The int64 ``addr`` as a pointer to uint16."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(16).as_pointer())
    return types.CPointer(types.uint16)(types.int64), codegen


@intrinsic
def _u32_ptr(typingctx, addr):
    """The int64 ``addr`` as a pointer to uint32."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(32).as_pointer())
    return types.CPointer(types.uint32)(types.int64), codegen


@intrinsic
def _i64_ptr(typingctx, addr):
    """The int64 ``addr`` as a pointer to int64."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(64).as_pointer())
    return types.CPointer(types.int64)(types.int64), codegen


def _addresses(arrays: list) -> tuple[np.ndarray, np.ndarray]:
    """(addresses, lengths) int64 of C-contiguous 1-D arrays."""
    for a in arrays:
        assert a.ndim == 1 and a.flags.c_contiguous
    return (np.array([a.ctypes.data for a in arrays], np.int64), np.array([a.size for a in arrays], np.int64))


@njit(cache=True, fastmath=False, inline="always")
def _product(j, w, XQ, XA, XS, XSUM, out, o0, n, threads):
    """out[:, o0:o0 + n] = projection j (an int8-path NF4 weight of n outputs, as
    ``NF4Int8Linear.matvec_batch``) of the quantized rows XQ. ``w``: every projection's arrays
    (:func:`decode_layers`): where ``int8.TILED`` its tiles (codes, scale codes) and nested
    scales, else its stored codes, scale codes and nested scales."""
    table, dyn, arrays, lengths, nshift, offset, bs, sc_kind = w
    k = XQ.shape[1]
    parallel = threads > 1 and n * k >= PARALLEL_MIN_WEIGHTS
    if TILED:
        rep = numba.carray(_u32_ptr(arrays[j, 0]), lengths[j, 0])
        sc = numba.carray(_ptr_like(arrays[j, 1], sc_kind), lengths[j, 1])
        nested = numba.carray(_f32_ptr(arrays[j, 2]), lengths[j, 2])
        groups = (n + GEMM_ROWS - 1) // GEMM_ROWS
        if parallel:
            step = (groups + threads - 1) // threads  # one run of row groups per thread (as ``int8_gemm.tiles_parallel``)
            for c in prange(threads):
                tiles_slice(table, rep, sc, dyn, nested, nshift[j], offset[j], k // bs, bs // 2, n, k, c * step,
                            min(groups, (c + 1) * step), XQ, XSUM, XS, out, o0)
        else:
            tiles_slice(table, rep, sc, dyn, nested, nshift[j], offset[j], k // bs, bs // 2, n, k, 0, groups, XQ, XSUM,
                        XS, out, o0)
        return
    packed = numba.carray(_u8_ptr(arrays[j, 0]), lengths[j, 0])
    qscale = numba.carray(_u8_ptr(arrays[j, 1]), lengths[j, 1])
    nested = numba.carray(_f32_ptr(arrays[j, 2]), lengths[j, 2])
    if parallel:
        step = (n + threads - 1) // threads  # one slice of rows per thread (as ``int8._i8_parallel``)
        for c in prange(threads):
            r0 = c * step
            _i8_slice_at(table, dyn, packed, qscale, nested, nshift[j], offset[j], bs, k, r0,
                         min(n, r0 + step), XQ, XA, XS, out, o0)
    else:
        _i8_slice_at(table, dyn, packed, qscale, nested, nshift[j], offset[j], bs, k, 0, n, XQ, XA, XS, out, o0)


# The adapters and biases of a group (a layer's projections that read one input: q, k, v; o; gate,
# up; down) are its selection's plan (``lora.Selection._group_plan``) as rows of an int64 table:
# a stack of deltas ``[STACK, A, R, in, Bt, Bt size, coef, rows, b_off, y_off, modules, half]``
# (addresses and sizes; half: A and Bt are float16), an addition ``[ADD, values, size, at]`` (a
# trained or the base bias).
STACK, ADD = 0, 1
OP_FIELDS = 12
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@njit(cache=True, fastmath=False, inline="always")
def _group_span(j, ns, w, XQ, XSUM, XS, out, g0, g1):
    """Row groups ``g0 .. g1`` of projections ``j, j + 1, ...`` (``ns`` their outputs) counted as one
    run of groups, each projection's outputs after the one before it in ``out`` (tiles only)."""
    table, dyn, arrays, lengths, nshift, offset, bs, sc_kind = w
    k = XQ.shape[1]
    base, o0 = 0, 0
    for p in range(len(ns)):
        n = ns[p]
        groups = (n + GEMM_ROWS - 1) // GEMM_ROWS
        lo, hi = max(g0, base), min(g1, base + groups)
        if lo < hi:
            rep = numba.carray(_u32_ptr(arrays[j + p, 0]), lengths[j + p, 0])
            sc = numba.carray(_ptr_like(arrays[j + p, 1], sc_kind), lengths[j + p, 1])
            nested = numba.carray(_f32_ptr(arrays[j + p, 2]), lengths[j + p, 2])
            tiles_slice(table, rep, sc, dyn, nested, nshift[j + p], offset[j + p], k // bs, bs // 2, n, k, lo - base,
                        hi - base, XQ, XSUM, XS, out, o0)
        base += groups
        o0 += n


@njit(cache=True, fastmath=False, inline="always")
def _downs(ops, lo, hi, X, U, uoff, c, threads):
    """Thread ``c``'s share (of ``threads``) of the A products of ops ``lo .. hi``'s stacks for every
    row of X [B, in]: rows ``c R / threads .. (c + 1) R / threads`` of each stack's A, into row b's
    part of U (``U.size / B`` floats) from ``uoff[o]`` (``lora.stack_down``: a row's ``u[j]`` has
    the same bits whichever thread makes it)."""
    row = U.size // X.shape[0]
    for o in range(lo, hi):
        if ops[o, 0] == STACK:
            R, k = ops[o, 2], ops[o, 3]
            coef = numba.carray(_f32_ptr(ops[o, 6]), R)
            j0, j1 = c * R // threads, (c + 1) * R // threads
            for b in range(X.shape[0]):
                u = U[b * row + uoff[o]:b * row + uoff[o] + R]
                if ops[o, 11]:  # float16, as its bits (``lora.kernel_array``)
                    stack_down(X[b], numba.carray(_u16_ptr(ops[o, 1]), (R, k)), coef, u, j0, j1)
                else:
                    stack_down(X[b], numba.carray(_f32_ptr(ops[o, 1]), (R, k)), coef, u, j0, j1)


@njit(cache=True, fastmath=False, inline="always")
def _ups(ops, lo, hi, U, uoff, Y, o0, o1):
    """Outputs ``o0 .. o1`` of every row of Y [B, sum out] (changed in place) through ops ``lo ..
    hi`` in the table's order, as ``lora.Selection._finish_group`` runs them: a stack's B products
    (``lora.stack_up``, from its A products in U, :func:`_downs`), an addition's values."""
    row = U.size // Y.shape[0]
    for b in range(Y.shape[0]):
        y = Y[b]
        for o in range(lo, hi):
            if ops[o, 0] == STACK:
                R, nb = ops[o, 2], ops[o, 10] + 1
                rows = numba.carray(_i64_ptr(ops[o, 7]), nb)
                b_off = numba.carray(_i64_ptr(ops[o, 8]), nb)
                y_off = numba.carray(_i64_ptr(ops[o, 9]), nb - 1)
                u = U[b * row + uoff[o]:b * row + uoff[o] + R]
                if ops[o, 11]:
                    stack_up(u, numba.carray(_u16_ptr(ops[o, 4]), ops[o, 5]), rows, b_off, y_off, y, o0, o1)
                else:
                    stack_up(u, numba.carray(_f32_ptr(ops[o, 4]), ops[o, 5]), rows, b_off, y_off, y, o0, o1)
            else:
                values = numba.carray(_f32_ptr(ops[o, 1]), ops[o, 2])
                at = ops[o, 3]
                for i in range(max(at, o0), min(at + values.size, o1)):
                    y[i] = y[i] + values[i - at]


@njit(cache=True, fastmath=False, inline="always")
def _products(j, ns, w, XQ, XA, XS, XSUM, out, threads, ops, lo, hi, X, U, uoff, stacked):
    """out [B, sum ns] = projections ``j, j + 1, ...`` (``ns`` their outputs) of the quantized rows,
    side by side (q, k, v; gate, up), and the A products of ops ``lo .. hi``'s adapter stacks on
    the float rows X (:func:`_downs`; ``stacked``: there are some). With tiles, the projections'
    row groups split between the threads as one run and each thread's share of every stack's rows
    of A in the same parallel region: one region, not one a projection and two a stack (each
    region's wake-up and wait cost more than the k and v products' or an adapter's own work). Else
    :func:`_product` after :func:`_product`, then the A products. The same bits either way: each
    row's sum is its own."""
    if TILED:
        total, groups = 0, 0
        for p in range(len(ns)):
            total += ns[p]
            groups += (ns[p] + GEMM_ROWS - 1) // GEMM_ROWS
        if threads > 1 and total * XQ.shape[1] >= PARALLEL_MIN_WEIGHTS:
            step = (groups + threads - 1) // threads
            for c in prange(threads):
                _group_span(j, ns, w, XQ, XSUM, XS, out, c * step, min(groups, (c + 1) * step))
                _downs(ops, lo, hi, X, U, uoff, c, threads)
        else:
            _group_span(j, ns, w, XQ, XSUM, XS, out, 0, groups)
            _downs(ops, lo, hi, X, U, uoff, 0, 1)
        return
    o0 = 0
    for p in range(len(ns)):
        _product(j + p, w, XQ, XA, XS, XSUM, out, o0, ns[p], threads)
        o0 += ns[p]
    if stacked and threads > 1:
        for c in prange(threads):
            _downs(ops, lo, hi, X, U, uoff, c, threads)
    elif stacked:
        _downs(ops, lo, hi, X, U, uoff, 0, 1)


@njit(cache=True, fastmath=False, inline="always")
def _finish(ops, lo, hi, U, uoff, Y, threads, stacked):
    """Y [B, sum out] through ops ``lo .. hi`` (:func:`_ups`; ``stacked``: they include a stack): the
    outputs split between the threads in slices starting at multiples of ``lora.LORA_CHUNK`` (as
    ``lora.lora_stack_add_parallel``: the same bits), on this thread when they are only additions."""
    n = Y.shape[1]
    if threads > 1 and stacked:
        step = ((n + threads - 1) // threads + LORA_CHUNK - 1) // LORA_CHUNK * LORA_CHUNK
        for c in prange(threads):
            _ups(ops, lo, hi, U, uoff, Y, c * step, min(n, (c + 1) * step))
    elif lo < hi:
        _ups(ops, lo, hi, U, uoff, Y, 0, n)


@njit(cache=True, fastmath=False, inline="always")
def _swiglu_span(gu, inter, r0, r1, bs, act, A):
    """Entries ``r0 .. r1`` (whole blocks of ``bs``) of every row of act [B, I] = SiLU(gate) * up
    of gu [B, 2 I] (:func:`_silu_mul_row`), and their quantization into ``A = (AQ, AA, AS, ASUM)``
    (``int8._quantize_span``, each block's sum of codes: ``int8_gemm.block_sums_into``): every
    entry and block its own, so a span's bits are the whole row's."""
    AQ, AA, AS, ASUM = A
    bits = act.view(np.int32)
    t = np.empty(64, np.int8)
    pairs = t.view(np.uint16)
    for b in range(gu.shape[0]):
        r, a = gu[b], act[b]
        _silu_mul_row(r[r0:r1], r[inter + r0:inter + r1], a[r0:r1])
        _quantize_span(a[r0:r1], bits[b, r0:r1], AQ[b, r0:r1], AA[b, r0:r1], AS[b, r0 // bs:r1 // bs], bs, t, pairs)
        block_sums_into(AQ[b], bs, r0 // bs, r1 // bs, ASUM[b])


@njit(cache=True, fastmath=False, inline="always")
def _finish_span(ops, lo, hi, U, uoff, gu, inter, r0, r1, bs, act, A):
    """Rows ``r0 .. r1`` of gate and of up through ops ``lo .. hi`` (:func:`_ups`), then their
    SwiGLU and its quantization (:func:`_swiglu_span`): one thread's share in :func:`_gate_up`."""
    _ups(ops, lo, hi, U, uoff, gu, r0, r1)
    _ups(ops, lo, hi, U, uoff, gu, inter + r0, inter + r1)
    _swiglu_span(gu, inter, r0, r1, bs, act, A)


@njit(cache=True, fastmath=False, inline="always")
def _gate_up(j, inter, w, XQ, XA, XS, XSUM, gu, threads, ops, lo, hi, X, U, uoff, stacked, act, A):
    """gu [B, 2 I] = the gate and up projections ``j, j + 1`` of the quantized rows with ops ``lo ..
    hi``, then act [B, I] = SiLU(gate) * up and its quantization A (:func:`_swiglu_span`). With
    tiles on the threads, each thread takes the same rows of gate and of up (whole blocks of act,
    starting at multiples of ``GEMM_ROWS`` and ``LORA_CHUNK``) and finishes them where it made them:
    their SwiGLU and quantization in the region of its products (with stacks, in the region of its
    B products, which wait for every A product), not on the calling thread after a region (a
    TinyLlama step: 0.15-0.25 ms of serial work). Else :func:`_products`, :func:`_finish`, then the
    whole rows. The same bits either way."""
    bs = w[6]
    unit = bs
    while unit % GEMM_ROWS or unit % LORA_CHUNK:
        unit += bs
    if TILED and threads > 1 and 2 * inter * XQ.shape[1] >= PARALLEL_MIN_WEIGHTS and inter % unit == 0:
        G = inter // GEMM_ROWS
        step = (inter // unit + threads - 1) // threads * unit
        for c in prange(threads):
            r0, r1 = min(inter, c * step), min(inter, (c + 1) * step)
            _group_span(j, (inter, inter), w, XQ, XSUM, XS, gu, r0 // GEMM_ROWS, r1 // GEMM_ROWS)
            _group_span(j, (inter, inter), w, XQ, XSUM, XS, gu, G + r0 // GEMM_ROWS, G + r1 // GEMM_ROWS)
            _downs(ops, lo, hi, X, U, uoff, c, threads)
            if not stacked:
                _finish_span(ops, lo, hi, U, uoff, gu, inter, r0, r1, bs, act, A)
        if stacked:  # (the B products need every thread's A products)
            for c in prange(threads):
                _finish_span(ops, lo, hi, U, uoff, gu, inter, min(inter, c * step), min(inter, (c + 1) * step), bs,
                             act, A)
        return
    _products(j, (inter, inter), w, XQ, XA, XS, XSUM, gu, threads, ops, lo, hi, X, U, uoff, stacked)
    _finish(ops, lo, hi, U, uoff, gu, threads, stacked)
    _swiglu_span(gu, inter, 0, inter, bs, act, A)


@njit(cache=True, fastmath=False, inline="always")
def _add_rows(x, o):
    """x [B, H] += o [B, H] as a plain loop: in a parallel function ``x += o`` is a parallel region,
    which wakes the threads for a few thousand additions."""
    for b in range(x.shape[0]):
        xb, ob = x[b], o[b]
        for j in range(xb.size):
            xb[j] = xb[j] + ob[j]


@njit(cache=True, fastmath=False)
def _quantized(X, bs):
    B, k = X.shape
    XQ, XA = np.empty((B, k), np.int8), np.empty((B, k), np.uint8)
    XS = np.empty((B, k // bs), np.float32)
    _quantize_x(X, bs, XQ, XA, XS)
    return XQ, XA, XS, block_sums(XQ, bs)


@njit(cache=True, fastmath=False, parallel=True)
def decode_layers(x, pos, K, V, cos, sin, attn_norm, mlp_norm, eps, table, dyn, arrays, lengths, nshift, offset,
                  bs, sc_kind, nh, nkv, hd, inter, rd, windows, scale, divide, cap, threads, ops, op_start, uoff,
                  stacked, a_rows):
    """Every layer of a decode step for rows x [B, H] of one sequence's cache (K, V [L, nkv, S, hd],
    float32 or float16 bits)
    at positions ``pos`` [B] (stored and attended in row order), all with one selection:
    ``LlamaModel.decode_rows``' layer loop (the same pieces, products and adapter kernels) in one
    call. Projection ``j = 7 i + p`` is projection ``PROJECTIONS[p]`` of layer i: its codes and block
    scale codes (in the tile layout where ``int8.TILED``, else as stored) and nested scales at the
    addresses ``arrays[j]`` (lengths ``lengths[j]``); ``sc_kind`` an empty array of the block scale
    codes' dtype (the tiles': uint8 codes, or float32 scales without double quantization).
    Group g of layer i (:data:`GROUPS`) finishes each row with the ops ``op_start[4 i + g] ..
    op_start[4 i + g + 1]`` of the table ``ops`` (:func:`_finish`); ``uoff``, ``stacked``: where each
    stack's A products start in a row's scratch, which groups have a stack, and how many rows of A
    the stacks have in all (:class:`Ops`)."""
    B, H = x.shape
    nq, nk = nh * hd, nkv * hd
    x = x.copy()
    h = np.empty_like(x)
    qkv = np.empty((B, nq + 2 * nk), np.float32)  # q, k, v side by side, as ``Selection.apply_group``
    att = np.empty((B, nq), np.float32)
    o = np.empty((B, H), np.float32)
    gu = np.empty((B, 2 * inter), np.float32)  # gate, up
    act = np.empty((B, inter), np.float32)
    A = (np.empty((B, inter), np.int8), np.empty((B, inter), np.uint8), np.empty((B, inter // bs), np.float32),
         np.empty((B, inter // bs), np.int32))  # act quantized (:func:`_gate_up`)
    w = (table, dyn, arrays, lengths, nshift, offset, bs, sc_kind)  # every projection's arrays
    U = np.empty(B * max(a_rows, 1), np.float32)  # every stack's A products, row after row
    for i in range(attn_norm.shape[0]):
        j, g = 7 * i, 4 * i
        rmsnorm_rows(x, attn_norm[i], eps, h)
        XQ, XA, XS, XSUM = _quantized(h, bs)
        _products(j, (nq, nk, nk), w, XQ, XA, XS, XSUM, qkv, threads, ops, op_start[g], op_start[g + 1], h, U, uoff,
                  stacked[g])
        _finish(ops, op_start[g], op_start[g + 1], U, uoff, qkv, threads, stacked[g])
        for b in range(B):
            p = pos[b]
            row = qkv[b]
            attend_row(row[:nq].reshape(nh, hd), row[nq:nq + nk].reshape(nkv, hd), row[nq + nk:].reshape(nkv, hd),
                       K[i], V[i], p, cos[p], sin[p], rd, windows[i], scale, divide, cap, threads, att[b])
        XQ, XA, XS, XSUM = _quantized(att, bs)
        _products(j + 3, (H,), w, XQ, XA, XS, XSUM, o, threads, ops, op_start[g + 1], op_start[g + 2], att, U, uoff,
                  stacked[g + 1])
        _finish(ops, op_start[g + 1], op_start[g + 2], U, uoff, o, threads, stacked[g + 1])
        _add_rows(x, o)
        rmsnorm_rows(x, mlp_norm[i], eps, h)
        XQ, XA, XS, XSUM = _quantized(h, bs)
        _gate_up(j + 4, inter, w, XQ, XA, XS, XSUM, gu, threads, ops, op_start[g + 2], op_start[g + 3], h, U, uoff,
                 stacked[g + 2], act, A)
        _products(j + 6, (H,), w, A[0], A[1], A[2], A[3], o, threads, ops, op_start[g + 3], op_start[g + 4], act, U,
                  uoff, stacked[g + 3])
        _finish(ops, op_start[g + 3], op_start[g + 4], U, uoff, o, threads, stacked[g + 3])
        _add_rows(x, o)
    return x


class Ops:
    """A selection's ops for :func:`decode_layers`: the table, where each group's start, where each
    stack's A products start in a row's scratch (``uoff``, its rows of A one stack after another)
    and which groups have a stack (``stacked``), every stack's rows of A (``a_rows``); the arrays
    the addresses point into, held here."""

    def __init__(self, rows: list, starts: list, held: list):
        self.table = np.array(rows, np.int64).reshape(-1, OP_FIELDS)
        self.start = np.array(starts, np.int64)
        is_stack = self.table[:, 0] == STACK
        rows_of_a = np.where(is_stack, self.table[:, 2], 0)
        self.uoff = (np.cumsum(rows_of_a) - rows_of_a).astype(np.int64)
        self.a_rows = int(rows_of_a.sum())
        self.stacked = np.array([is_stack[a:b].any() for a, b in zip(self.start[:-1], self.start[1:])], np.bool_)
        self._held = held


class CompiledLayers:
    """What :func:`decode_layers` reads of a model, gathered once: the projections' stored arrays
    as addresses (the bundle's mapped bytes, no copies; the arrays held here), the norms stacked.
    :meth:`of` gives None for a model it cannot run (a projection that is not an int8-path NF4
    weight, blocks of different sizes, biases on a module other than q, k, v, o and the MLP's);
    :meth:`ops` gives None for a selection it cannot run (a DoRA adapter, a replaced module)."""

    def __init__(self, net, lins: list):
        a = net.args
        self.net = net
        self.bs = lins[0].block_size
        self.sc_kind = np.empty(0, lins[0].tiles.sc.dtype if TILED else np.uint8)
        self.nshift = np.array([lin.nshift for lin in lins], np.int64)
        self.offset = np.array([lin.offset for lin in lins], np.float32)
        columns = ([[lin.tiles.rep for lin in lins], [lin.tiles.sc for lin in lins], [lin.tiles.nested for lin in lins]]
                   if TILED else
                   [[np.ascontiguousarray(lin.packed) for lin in lins], [np.ascontiguousarray(lin.qscale) for lin in lins],
                    [np.ascontiguousarray(lin.nested, np.float32) for lin in lins]])
        self._held = columns  # the arrays the addresses point into
        pairs = [_addresses(c) for c in columns]
        self.arrays = np.stack([a for a, _ in pairs], axis=1)  # int64 [7 L, 3]
        self.lengths = np.stack([n for _, n in pairs], axis=1)  # int64 [7 L, 3]
        self.attn_norm = np.stack([np.asarray(L.attn_norm, np.float32) for L in net.w.layers])  # [L, H]
        self.mlp_norm = np.stack([np.asarray(L.mlp_norm, np.float32) for L in net.w.layers])  # [L, H]
        self.windows = np.array([attention_args(net, i)[0] for i in range(a.num_hidden_layers)], np.int64)
        _, self.scale, self.divide, self.cap = attention_args(net, 0)
        self.eps = np.float32(a.rms_norm_eps)
        self.dims = (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.intermediate_size, a.rotary_dim)
        self.base_ops = self._build(BASE)

    @classmethod
    def of(cls, net) -> "CompiledLayers | None":
        lins = [getattr(L, p) for L in net.w.layers for p in PROJECTIONS]
        if not lins or not all(isinstance(lin, NF4Int8Linear) and lin.int8 and lin.block_size == lins[0].block_size
                   for lin in lins):
            return None
        if TILED and len({lin.tiles.sc.dtype for lin in lins}) > 1:  # (double quantization in some only)
            return None
        if any(set(L.biases) - set(PROJECTIONS) for L in net.w.layers):
            return None
        return cls(net, lins)

    def ops(self, sel: Selection) -> Ops | None:
        """The ops of selection ``sel`` (made once and kept with it), or None when it has a DoRA
        adapter or replaces a projection: those rows run the layer loop."""
        if sel.is_base:
            return self.base_ops
        key = ("decode_layers", id(self))
        if key not in sel._plans:
            sel._plans[key] = (self, self._build(sel))  # (self: the id stays this object's while kept)
        return sel._plans[key][1]

    def _build(self, sel: Selection) -> Ops | None:
        net, rows, starts, held = self.net, [], [0], []

        def address(a: np.ndarray) -> int:
            assert a.flags.c_contiguous
            held.append(a)
            return a.ctypes.data

        for i, L in enumerate(net.w.layers):
            for group in GROUPS:
                modules = tuple(net.names[i][p] for p in group)
                if any(m in sel.replaced for m in modules):
                    return None
                off = np.cumsum([0] + [getattr(L, p).out_features for p in group])
                for kind, item, extra in sel._group_plan(modules, off) if sel.members else ():
                    if kind == "delta":  # DoRA
                        return None
                    if kind == "stack":
                        st, (coef, y_off) = item, extra
                        R, k = st.A.shape
                        rows.append([STACK, address(st.A), R, k, address(st.Bt), st.Bt.size, address(coef),
                                     address(st.rows), address(st.b_off), address(y_off), len(st.modules),
                                     int(st.A.dtype == np.float16)])
                    else:
                        rows.append([ADD, address(extra), extra.size, off[item]] + [0] * (OP_FIELDS - 4))
                for m, p, o0 in zip(modules, group, off):
                    b = sel.biases.get(m, L.biases.get(p))
                    if b is not None:
                        b = np.ascontiguousarray(b, np.float32)
                        rows.append([ADD, address(b), b.size, o0] + [0] * (OP_FIELDS - 4))
                starts.append(len(rows))
        return Ops(rows, starts, held)

    def run(self, x: np.ndarray, pos: np.ndarray, cache, cos: np.ndarray, sin: np.ndarray, ops: Ops) -> np.ndarray:
        """x [B, H] -> [B, H] after every layer (the final norm is the caller's), ``ops`` those of the
        rows' selection (:meth:`ops`)."""
        nh, nkv, hd, inter, rd = self.dims
        K, V = cache.kernel_arrays()
        return decode_layers(np.ascontiguousarray(x, np.float32), pos, K, V, cos, sin, self.attn_norm, self.mlp_norm,
                             self.eps, NF4_I8, DYNAMIC_CODE, self.arrays, self.lengths, self.nshift, self.offset,
                             self.bs, self.sc_kind, nh, nkv, hd, inter, rd, self.windows, self.scale, self.divide,
                             self.cap, numba.get_num_threads(), ops.table, ops.start, ops.uoff, ops.stacked,
                             ops.a_rows)
