"""The int8 path's prefill GEMM: many tokens times an NF4 weight in int8 codes, int32 sums.

``load(..., products="int8")`` multiplies a decode step's one vector (or a few) by the bytes as
bitsandbytes stores them (``runtime/int8.py``). A prompt of T tokens reuses each weight T times,
so here the weight is first repacked, one tile of rows at a time, into the layout of llama.cpp's
and ik_llama.cpp's repacked types: the 32-bit lanes of a register are ``GEMM_ROWS`` output rows
and the 4 bytes of a lane four consecutive entries of its row. One ``vpdpbusd`` then multiplies
four entries of one token (a 32-bit broadcast) by the same four entries of 16 rows, so a register
of weights, decoded once by ``vpshufb``, serves every token of a tile (``GEMM_TOKENS``), and the
int32 sums of a block are ready for the float epilogue 16 rows at a time, with no horizontal
reduction. The repack only moves 4-byte words (a block's byte ``b`` holds entries ``2b`` and
``2b + 1``, and the activations are already stored per block as their even entries then their odd
ones, ``int8.quantize_activations``), so it costs a copy of the tile, made once for all T tokens.

The arithmetic, which the NumPy twin and every variant share bit for bit (it is not the decode
kernels': their int32 sums are split into eight lanes; both quantize x identically):

* activations as the decode path quantizes them (``int8.quantize_activations``: per block of
  ``bs`` entries int8 codes ``q`` and a float scale ``xs``);
* ``S[t, r, j]`` = the sum over block j of ``NF4_I8[code] * q`` (int32, exact). ``vpdpbusd`` takes
  unsigned bytes times signed ones: the weights enter as ``NF4_I8 + 128`` (the table's bytes with
  the sign bit flipped), and the sum starts from ``-128 * sum(q of the block)`` so it is exactly S;
* ``y[t, r]``: float32 ``acc = acc + float(S[t, r, j]) * (xs[t, j] * scale(r, j))`` block after
  block from 0 (a product, a product, a sum: no FMA), ``scale`` the block's absmax
  (``storage.block_scale``).

A token's result does not depend on the other tokens or on how the rows are tiled, so a prompt
gives the same bits in one chunk or many; the float steps are the decode kernels' per block, so
the two paths differ only in how the int32 sums are split before them.

Variants: ``vnni512`` (AVX-512 VNNI on 512-bit registers: 16 rows a register), ``portable``
(plain loops, any CPU: the reference arithmetic, kept for the tests; prompts on CPUs without a
SIMD variant keep the exact tiles). ``INT8_GEMM_SIMD`` is the variant this CPU runs, or None.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgelora.runtime.simd import _FEATURES, _AARCH64, _I8, _I32, _I64, _F32
from edgelora.storage import NF4Tensor, block_scale, dequantize_scales_reference

GEMM_ROWS = 16  # output rows a register holds (16 int32 lanes of a 512-bit register)
GEMM_TOKENS = 8  # tokens a tile: each decoded weight register serves this many (registers: 2 per token)
GEMM_GROUPS = 4  # row groups repacked together, so a tile of tokens' x is reused by 64 rows while in cache

INT8_GEMM_AVAILABLE = set() if _AARCH64 else (
    {"vnni512"} if _FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw") else set())
INT8_GEMM_SIMD = "vnni512" if "vnni512" in INT8_GEMM_AVAILABLE else None


# ---------------------------------------------------------------------------------------------
# the block sums of the activations (the correction of the unsigned weights)
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def block_sums(XQ, bs):
    """XQ int8 [T, k] -> int32 [T, k / bs]: each block's sum of codes."""
    T, k = XQ.shape
    out = np.zeros((T, k // bs), np.int32)
    for t in range(T):
        for j in range(k // bs):
            s = np.int32(0)
            for i in range(bs):
                s += np.int32(XQ[t, j * bs + i])
            out[t, j] = s
    return out


def block_sums_reference(XQ: np.ndarray, bs: int) -> np.ndarray:
    """NumPy twin of :func:`block_sums`."""
    T, k = XQ.shape
    return XQ.reshape(T, k // bs, bs).astype(np.int32).sum(axis=2, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# the twin
# ---------------------------------------------------------------------------------------------

def nf4_int8_gemm_reference(q: NF4Tensor, table: np.ndarray, XQ: np.ndarray, XS: np.ndarray) -> np.ndarray:
    """NumPy twin of every variant: ``q`` [n, k] NF4, ``table`` the 16 codes as int8, ``XQ`` int8
    [T, k] and ``XS`` f32 [T, k / bs] the activations as ``int8.quantize_activations`` gives
    them -> f32 [T, n] (module docstring: integer sums exact, the float steps in order)."""
    n, k = q.shape
    bs, half = q.block_size, q.block_size // 2
    per_row = k // bs
    codes = np.asarray(q.packed, np.uint8).reshape(n, per_row, half)
    w = np.concatenate([table[codes >> 4], table[codes & 15]], axis=2).astype(np.int64)  # [n, per_row, bs]
    x = XQ.reshape(XQ.shape[0], per_row, bs).astype(np.int64)  # [T, per_row, bs], same order
    S = np.einsum("tjb,rjb->jtr", x, w).astype(np.int32)  # [per_row, T, n] exact
    scales = (q.absmax() if not q.double_quant else dequantize_scales_reference(
        q.scales, q.nested_scales, q.offset, q.nested_block_size)).reshape(n, per_row)
    acc = np.zeros((XQ.shape[0], n), np.float32)
    for j in range(per_row):
        s = XS[:, j, None] * scales[None, :, j]  # [T, n] f32
        acc = acc + S[j].astype(np.float32) * s
    return acc


# ---------------------------------------------------------------------------------------------
# portable
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _gemm_portable(table, dyn, packed, qscale, nested, nshift, offset, bs, n, k, g0, g1, XQ, XSUM, XS, OUT):
    """Rows of groups ``g0 .. g1`` (``GEMM_ROWS`` each, the last cut at n) for every token, read
    from the stored bytes in plain loops."""
    per_row, half = k // bs, bs // 2
    for r in range(g0 * GEMM_ROWS, min(n, g1 * GEMM_ROWS)):
        row = packed[r * (k // 2):(r + 1) * (k // 2)]
        for t in range(XQ.shape[0]):
            acc = np.float32(0.0)
            for j in range(per_row):
                S = np.int32(0)
                for i in range(half):
                    byte = row[j * half + i]
                    S += np.int32(table[byte >> 4]) * np.int32(XQ[t, j * bs + i]) + \
                        np.int32(table[byte & 15]) * np.int32(XQ[t, j * bs + half + i])
                acc = acc + np.float32(S) * (XS[t, j] * block_scale(dyn, qscale, nested, nshift, offset,
                                                                    r * per_row + j))
            OUT[t, r] = acc


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _repack(dyn, packed, qscale, nested, nshift, offset, bs, n, k, r0, groups, rep, sc):
    """Rows ``r0 .. r0 + groups * GEMM_ROWS`` into the tile layout: ``rep`` 32-bit words
    [group, block, word s, lane] = bytes ``4s .. 4s + 3`` of the block of row ``r0 + group * 16 +
    lane`` (``packed`` as 32-bit words, ``rep`` likewise); ``sc`` f32 [group, block, lane] its
    scale. Rows past n: code 7 (the value 0) and scale 0."""
    per_row, nd = k // bs, bs // 8  # words of a block
    row_words = k // 8
    for rr in range(groups * GEMM_ROWS):
        g, lane = rr // GEMM_ROWS, rr % GEMM_ROWS
        r = r0 + rr
        for j in range(per_row):
            gj = g * per_row + j
            dst = gj * nd * GEMM_ROWS + lane
            if r < n:
                sc[gj * GEMM_ROWS + lane] = block_scale(dyn, qscale, nested, nshift, offset, r * per_row + j)
                src = r * row_words + j * nd
                for s in range(nd):
                    rep[dst + s * GEMM_ROWS] = packed[src + s]
            else:
                sc[gj * GEMM_ROWS + lane] = 0.0
                for s in range(nd):
                    rep[dst + s * GEMM_ROWS] = 0x77777777


def _splat(builder, v, ty, n):
    u = builder.insert_element(ir.Constant(ir.VectorType(ty, n), ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _gemm_codegen(tokens: int):
    """IR of :func:`i8_gemm_tile` for ``tokens`` tokens (a Python int: every accumulator a register)."""
    v64b, v16i, v16f = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
    c = lambda x: ir.Constant(_I64, x)

    def codegen(context, builder, sig, args):
        table_p, rep_p, sc_p, xq_p, xsum_p, xs_p, out_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                                          for i in range(7))
        per_row, half, k, n_out, t0, o0 = args[7:13]
        fn = lambda name, ret, params: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)
        pshufb = fn("llvm.x86.avx512.pshuf.b.512", v64b, [v64b, v64b])
        dpbusd = fn("llvm.x86.avx512.vpdpbusd.512", v16i, [v16i, v16i, v16i])
        t16 = builder.load(builder.bitcast(table_p, ir.VectorType(_I8, 16).as_pointer()), align=1)
        table = builder.xor(builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 64), list(range(16)) * 4)),
                            ir.Constant(v64b, [0x80] * 64))  # NF4_I8 + 128 as unsigned bytes
        four, fifteen = ir.Constant(v64b, [4] * 64), ir.Constant(v64b, [15] * 64)
        nd = builder.udiv(half, c(4))
        rep8 = builder.bitcast(rep_p, _I8.as_pointer())
        ts = [builder.add(t0, c(t)) for t in range(tokens)]
        xq_t = [builder.gep(xq_p, [builder.mul(t, k)]) for t in ts]
        xsum_t = [builder.gep(xsum_p, [builder.mul(t, per_row)]) for t in ts]
        xs_t = [builder.gep(xs_p, [builder.mul(t, per_row)]) for t in ts]
        out_t = [builder.gep(out_p, [builder.add(builder.mul(t, n_out), o0)]) for t in ts]
        facc = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(tokens)]
        iacc = [cgutils.alloca_once(builder, v16i) for _ in range(tokens)]

        def xword(t, at):  # the four int8 codes of token t at byte ``at`` of its row, in every lane
            w = builder.load(builder.bitcast(builder.gep(xq_t[t], [at]), _I32.as_pointer()), align=1)
            return _splat(builder, w, _I32, 16)

        def block(j, nd_v, half_v):
            x0 = builder.mul(j, builder.mul(half_v, c(2)))  # x entries of the block (its even ones first)
            wb = builder.gep(rep8, [builder.mul(builder.mul(j, nd_v), c(64))])
            for t in range(tokens):
                corr = builder.mul(builder.load(builder.gep(xsum_t[t], [j])), ir.Constant(_I32, -128))
                builder.store(_splat(builder, corr, _I32, 16), iacc[t])

            def word(s):
                w = builder.load(builder.bitcast(builder.gep(wb, [builder.mul(s, c(64))]), v64b.as_pointer()), align=1)
                wh = builder.bitcast(builder.call(pshufb, [table, builder.lshr(w, four)]), v16i)  # the even entries
                wl = builder.bitcast(builder.call(pshufb, [table, builder.and_(w, fifteen)]), v16i)  # the odd ones
                at = builder.add(x0, builder.mul(s, c(4)))
                for t in range(tokens):
                    a = builder.call(dpbusd, [builder.load(iacc[t]), wh, xword(t, at)])
                    builder.store(builder.call(dpbusd, [a, wl, xword(t, builder.add(at, half_v))]), iacc[t])

            if isinstance(nd_v, ir.Constant):
                for s in range(nd_v.constant):
                    word(c(s))
            else:
                with cgutils.for_range(builder, nd_v) as loop:
                    word(loop.index)
            scv = builder.load(builder.bitcast(builder.gep(sc_p, [builder.mul(j, c(GEMM_ROWS))]), v16f.as_pointer()),
                               align=4)
            for t in range(tokens):
                s = builder.fmul(_splat(builder, builder.load(builder.gep(xs_t[t], [j])), _F32, 16), scv)
                f = builder.sitofp(builder.load(iacc[t]), v16f)
                builder.store(builder.fadd(builder.load(facc[t]), builder.fmul(f, s)), facc[t])

        def blocks(nd_v, half_v):
            with cgutils.for_range(builder, per_row) as loop:
                block(loop.index, nd_v, half_v)

        with builder.if_else(builder.icmp_unsigned("==", half, c(32))) as (bs64, general):
            with bs64:
                blocks(c(8), c(32))
            with general:
                blocks(nd, half)
        for t in range(tokens):
            builder.store(builder.load(facc[t]), builder.bitcast(out_t[t], v16f.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def i8_gemm_tile(typingctx, table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, tokens):
    """``out[(t0 + t) * n_out + o0 + lane]`` = row ``lane`` of one repacked group (``rep``, ``sc``:
    :func:`_repack`'s layout for one group) times token ``t0 + t`` for ``t < tokens`` (a literal,
    1 .. ``GEMM_TOKENS``): ``xq`` int8 [T * k], ``xsum`` int32 and ``xs`` f32 [T * per_row] flat.
    Per block of ``2 * half`` entries, ``half / 4`` loads of 64 weight bytes, each decoded by two
    ``vpshufb`` into the even and odd entries of 16 rows, each ``vpdpbusd``'d with every token."""
    arrays = (table, rep, sc, xq, xsum, xs, out)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)
            and table.dtype == types.int8 and rep.dtype == types.uint32 and xq.dtype == types.int8
            and xsum.dtype == types.int32 and all(a.dtype == types.float32 for a in (sc, xs, out)) and out.mutable
            and isinstance(tokens, types.IntegerLiteral) and 1 <= tokens.literal_value <= GEMM_TOKENS):
        return None
    i64 = types.int64
    return types.none(*arrays, i64, i64, i64, i64, i64, i64, tokens), _gemm_codegen(tokens.literal_value)


@njit(cache=True, nogil=True)
def _tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, m, o0):
    """:func:`i8_gemm_tile` for ``m`` tokens (each count its own literal)."""
    if m == 8:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 8)
    elif m == 7:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 7)
    elif m == 6:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 6)
    elif m == 5:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 5)
    elif m == 4:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 4)
    elif m == 3:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 3)
    elif m == 2:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 2)
    else:
        i8_gemm_tile(table, rep, sc, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, 1)


@njit(cache=True, nogil=True)
def _gemm_vnni512(table, dyn, packed, qscale, nested, nshift, offset, bs, n, k, g0, g1, XQ, XSUM, XS, OUT):
    """Groups ``g0 .. g1`` of ``GEMM_ROWS`` rows: ``GEMM_GROUPS`` groups repacked at a time, then
    for each tile of ``GEMM_TOKENS`` tokens each group's tile product. ``OUT`` [T, n_out] with
    ``n_out`` >= ``g1 * GEMM_ROWS`` (lanes past n are written too, as zeros)."""
    per_row, half = k // bs, bs // 2
    T, n_out = XQ.shape[0], OUT.shape[1]
    gbytes = per_row * half * GEMM_ROWS  # repacked bytes of a group
    rep = np.empty(GEMM_GROUPS * gbytes // 4, np.uint32)
    sc = np.empty(GEMM_GROUPS * per_row * GEMM_ROWS, np.float32)
    xq, xsum, xs, out = XQ.reshape(-1), XSUM.reshape(-1), XS.reshape(-1), OUT.reshape(-1)
    for c0 in range(g0, g1, GEMM_GROUPS):
        groups = min(GEMM_GROUPS, g1 - c0)
        _repack(dyn, packed, qscale, nested, nshift, offset, bs, n, k, c0 * GEMM_ROWS, groups, rep, sc)
        for t0 in range(0, T, GEMM_TOKENS):
            m = min(GEMM_TOKENS, T - t0)
            for g in range(groups):
                _tile(table, rep[g * gbytes // 4:(g + 1) * gbytes // 4], sc[g * per_row * GEMM_ROWS:(g + 1) * per_row * GEMM_ROWS],
                      xq, xsum, xs, out, per_row, half, k, n_out, t0, m, (c0 + g) * GEMM_ROWS)


# Every variant this CPU runs (the tests prove each equal to the twin bit for bit)
INT8_GEMM_VARIANTS = {"portable": _gemm_portable}
if "vnni512" in INT8_GEMM_AVAILABLE:
    INT8_GEMM_VARIANTS["vnni512"] = _gemm_vnni512


def words(packed: np.ndarray) -> np.ndarray:
    """The packed bytes as 32-bit words for the repack (in place where 4-byte aligned, else a copy)."""
    if packed.ctypes.data % 4:
        packed = packed.copy()
    return packed.view(np.uint32)


def gemm(variant, args, n: int, k: int, XQ: np.ndarray, XS: np.ndarray, threads: int, pool=None) -> np.ndarray:
    """f32 [T, n] = the quantized activations (``XQ`` int8 [T, k], ``XS`` f32 [T, k / bs]) times
    the NF4 weight ``args`` = ``(table, dyn, packed, qscale, nested, nshift, offset, bs)`` (SIMD
    variants: ``packed`` as :func:`words` may be given), rows split in whole groups between ``threads`` threads of ``pool`` (GIL released)."""
    bs = args[-1]
    XSUM = block_sums(XQ, bs)
    groups = -(-n // GEMM_ROWS)
    OUT = np.empty((XQ.shape[0], groups * GEMM_ROWS), np.float32)
    fn = INT8_GEMM_VARIANTS[variant]
    if variant != "portable" and args[2].dtype == np.uint8:  # the repack moves 32-bit words
        args = args[:2] + (words(args[2]),) + args[3:]
    threads = max(1, min(threads, groups))
    bounds = [groups * i // threads for i in range(threads + 1)]
    work = lambda i: fn(*args, n, k, bounds[i], bounds[i + 1], XQ, XSUM, XS, OUT)
    if threads == 1 or pool is None:
        for i in range(threads):
            work(i)
    else:
        list(pool.map(work, range(threads)))
    return OUT if OUT.shape[1] == n else np.ascontiguousarray(OUT[:, :n])
