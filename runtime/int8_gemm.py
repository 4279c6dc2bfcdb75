"""The int8 path's tile kernels: tokens times an NF4 weight repacked into tiles, int32 sums.

A prompt of T tokens reuses each weight T times; a decode step reads each weight for one token (or
a few). Both are served here, where this CPU has a SIMD variant (``int8.TILED``), from one layout
that the weight is repacked into once, at load (:class:`Tiles`), as llama.cpp's and ik_llama.cpp's
repacked types are: the 32-bit lanes of a register are ``GEMM_ROWS`` output rows and the 4 bytes
of a lane four consecutive entries of its row. One ``vpdpbusd`` then multiplies four entries of
one token (a 32-bit broadcast) by the same four entries of 16 rows, so a register of weights,
decoded once by ``vpshufb``, serves every token of a tile (``GEMM_TOKENS``; ``GEMM_WIDE_TOKENS``
on 512-bit registers), and the int32 sums of a block are ready for the float epilogue 16 rows at
a time, with no horizontal reduction; the blocks' scales are stored 16 rows' side by side, as
their double-quantized 8-bit codes (decoded in the kernel) or as float32 scales. The repack only
moves 4-byte words (a block's byte ``b`` holds entries ``2b`` and ``2b + 1``, and the activations
are already stored per block as their even entries then their odd ones,
``int8.quantize_activations``).

The arithmetic, which the NumPy twin and every variant share bit for bit (it is not the lanes
kernels' of ``runtime/int8.py``, which split the int32 sums into eight lanes; both quantize x
identically):

* activations as the decode path quantizes them (``int8.quantize_activations``: per block of
  ``bs`` entries int8 codes ``q`` and a float scale ``xs``);
* ``S[t, r, j]`` = the sum over block j of ``NF4_I8[code] * q`` (int32, exact). ``vpdpbusd`` and
  ``vpmaddubsw`` take unsigned bytes times signed ones, so the weights enter unsigned, offset by
  ``o``, and the sum starts from ``-o * sum(q of the block)`` so that it is exactly S:
  ``vpdpbusd`` as ``NF4_I8 + 128`` (the table's bytes with the sign bit flipped, ``o = 128``);
  AVX2's ``vpmaddubsw`` as ``NF4_I8 + 64`` (0 .. 128, ``o = 64``: the codes take 7 bits, so a pair
  of products is at most ``2 * 128 * 127 = 32512``, under its int16 saturation; the old sign step,
  ``vpsignb`` of the weights by x against ``|q|``, was a quarter of the instructions: 31 G
  multiply-adds/s a thread on a Zen 3 core, now 39-40);
* ``y[t, r]``: float32 ``acc = acc + float(S[t, r, j]) * (xs[t, j] * scale(r, j))`` block after
  block from 0 (a product, a product, a sum: no FMA), ``scale`` the block's absmax
  (``storage.block_scale``).

Weights of int8 codes (the float16 head quantized at load, ``int8.F16Int8Linear``) take the same
layout and arithmetic (:class:`Q8Tiles`, twin :func:`q8_gemm_reference`): a lane's 4 bytes are
four codes of its row, in the activations' order, so a word needs no lookup and meets one 32-bit
broadcast of x; ``S`` is the sum of code times ``q`` and ``scale`` the block's own. ``vpdpbusd``
takes the codes plus 128 (``o = 128``, as above); AVX2 multiplies ``|w|`` by x with w's sign
(``vpsignb``, pairs at most ``2 * 127 * 127``: 8-bit codes would saturate ``vpmaddubsw`` offset),
which needs no correction (``o = 0``).

A token's result does not depend on the other tokens or on how the rows are tiled, so a prompt
gives the same bits in one chunk or many, and a decode step the bits the prompt's GEMM would give
its row; the float steps are the lanes kernels' per block, so the two arithmetics differ only in
how the int32 sums are split before them.

Variants: ``vnni512`` (AVX-512 VNNI on 512-bit registers: 16 rows a register), ``vnni256``
(``vpdpbusd`` on 256-bit registers: AVX-VNNI, or AVX-512 VNNI with VL), ``avx2`` (``vpmaddubsw`` +
``vpmaddwd``), ``portable`` (plain loops over the same tiles, any CPU: the reference arithmetic,
kept for the tests; CPUs without a SIMD variant do not tile, ``int8.TILED``). ``INT8_GEMM_SIMD``
is the variant this CPU runs, or None.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from edgelora.runtime import large_pages
from edgelora.runtime.simd import AVX2_CODE_OFFSET, _FEATURES, _AARCH64, _HOST_CPU, _I8, _I32, _I64, _F32, _maddubs_lanes, _prefetch
from edgelora.runtime.threads import in_parallel
from edgelora.storage import DYNAMIC_CODE, NF4Tensor, block_scale, dequantize_scales_reference

GEMM_ROWS = 16  # output rows a register holds (16 int32 lanes of a 512-bit register)
#: tokens a tile of the 256-bit variants: each decoded weight register serves this many, and their
#: int and float sums (2 registers a token) stay in AVX2's 16 registers with the weights'
#: (8 tokens spilled: 1.1x slower on a Zen 3 core)
GEMM_TOKENS = 4
#: tokens a tile of the vnni512 variant (32 registers: the float sums of some wait in L1, and a
#: decoded register serves twice as many ``vpdpbusd``); its last tile of a prompt is cut into 8 and less
GEMM_WIDE_TOKENS = 16
#: bytes ahead of each 64-byte word of a tile that a pass prefetches (``prefetcht0``): a decode
#: step's products (TinyLlama, 2 threads) 3-4 % faster with 512-4096 than with none, 8192 no better
GEMM_PREFETCH_BYTES = 2048
#: the same for a pass of few tokens (at most ``GEMM_TOKENS``: a decode step, a speculative step's rows),
#: which spends a sixteenth of a prompt tile's instructions on a word and so reaches the same bytes
#: sooner: the products of a Llama-3.2-1B-shape decode step 6 % faster with 4096 than with 2048 on an
#: Emerald Rapids Xeon (8192: 3 %; 1024: some 20 % slower; a prompt's tiles 7 % slower with 4096, within
#: that measure's noise), no faster
#: on a Zen 5 EPYC (1.00-1.02 times as long), which keeps 2048 (bench/README, *Prefetch distance by CPU*)
GEMM_FEW_PREFETCH_BYTES = 2048 if _HOST_CPU.startswith("znver") else 4096
GEMM_GROUPS = 4  # row groups a tile of tokens runs over together, so its x is reused by 64 rows while in cache
#: independent integer sums a tile keeps over a block's words (``GEMM_CHAINS // tokens``, at least
#: one a token): one token's products would otherwise each wait for the one before (``vpdpbusd``'s
#: latency, not the memory, bounds a decode step); the chains are added at the block's end, exact
GEMM_CHAINS = 4

_VNNI512 = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw"))
INT8_GEMM_AVAILABLE = set() if _AARCH64 or not _FEATURES.get("avx2") else {"avx2"} | (
    {"vnni512"} if _VNNI512 else set()) | (
    {"vnni256"} if _FEATURES.get("avxvnni") or (_VNNI512 and _FEATURES.get("avx512vl")) else set())
INT8_GEMM_SIMD = next((v for v in ("vnni512", "vnni256", "avx2") if v in INT8_GEMM_AVAILABLE), None)


def _q8(rep) -> bool:
    """Whether tile words ``rep`` hold int8 codes (:class:`Q8Tiles`: int32) rather than NF4 nibbles
    (:class:`Tiles`: uint32); in compiled code a constant of the array's type."""
    return rep.dtype == np.int32


@overload(_q8)
def _q8_compiled(rep):
    q8 = rep.dtype == types.int32
    return lambda rep: q8


def _tile_scale(sc, i, dyn, nested, nshift, offset, b):
    """The scale of entry ``i`` of a tile layout's ``sc`` (block ``b`` of the weight): float32, as
    stored; uint8, its double-quantized code, decoded (``storage.block_scale``: ``dyn[code] *
    nested[b >> nshift] + offset``, a product, then a sum)."""
    if sc.dtype == np.uint8:
        return dyn[sc[i]] * nested[b >> nshift] + offset
    return sc[i]


@overload(_tile_scale)
def _tile_scale_compiled(sc, i, dyn, nested, nshift, offset, b):
    if sc.dtype == types.uint8:
        return lambda sc, i, dyn, nested, nshift, offset, b: dyn[sc[i]] * nested[b >> nshift] + offset
    return lambda sc, i, dyn, nested, nshift, offset, b: sc[i]


def _put_scale(sc, i, dyn, qscale, nested, nshift, offset, b):
    """Entry ``i`` of a tile layout's ``sc`` for block ``b`` of the weight: its code ``qscale[b]``
    (uint8 ``sc``), or its scale decoded (float32 ``sc``, ``storage.block_scale``)."""
    sc[i] = qscale[b] if sc.dtype == np.uint8 else block_scale(dyn, qscale, nested, nshift, offset, b)


@overload(_put_scale)
def _put_scale_compiled(sc, i, dyn, qscale, nested, nshift, offset, b):
    if sc.dtype == types.uint8:
        def put_code(sc, i, dyn, qscale, nested, nshift, offset, b):
            sc[i] = qscale[b]
        return put_code

    def put_scale(sc, i, dyn, qscale, nested, nshift, offset, b):
        sc[i] = block_scale(dyn, qscale, nested, nshift, offset, b)
    return put_scale


# ---------------------------------------------------------------------------------------------
# the block sums of the activations (the correction of the unsigned weights)
# ---------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def block_sums(XQ, bs):
    """XQ int8 [T, k] -> int32 [T, k / bs]: each block's sum of codes."""
    T, k = XQ.shape
    out = np.zeros((T, k // bs), np.int32)
    for t in range(T):
        block_sums_into(XQ[t], bs, 0, k // bs, out[t])
    return out


@njit(cache=True, inline="always")
def block_sums_into(q, bs, j0, j1, out):
    """out[j] = the sum of block j's codes of one row ``q`` (int8), blocks ``j0 .. j1``
    (:func:`block_sums` for a span of a row)."""
    for j in range(j0, j1):
        x = q[j * bs:(j + 1) * bs]
        s = np.int32(0)
        for i in range(x.size):  # (a slice and its own length: a reduction LLVM vectorizes)
            s += np.int32(x[i])
        out[j] = s


def block_sums_reference(XQ: np.ndarray, bs: int) -> np.ndarray:
    """NumPy twin of :func:`block_sums`."""
    T, k = XQ.shape
    return XQ.reshape(T, k // bs, bs).astype(np.int32).sum(axis=2, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# the twin
# ---------------------------------------------------------------------------------------------

def _tiles_reference(w: np.ndarray, scales: np.ndarray, XQ: np.ndarray, XS: np.ndarray) -> np.ndarray:
    """The arithmetic of every variant: ``w`` int [n, per_row, bs] a weight's integer codes in the
    activations' order, ``scales`` f32 [n, per_row] its blocks' scales, ``XQ`` int8 [T, k] and
    ``XS`` f32 [T, per_row] -> f32 [T, n] (integer sums exact, the float steps in order)."""
    n, per_row, bs = w.shape
    x = XQ.reshape(XQ.shape[0], per_row, bs).astype(np.int64)  # [T, per_row, bs]
    S = np.einsum("tjb,rjb->jtr", x, w.astype(np.int64)).astype(np.int32)  # [per_row, T, n] exact
    acc = np.zeros((XQ.shape[0], n), np.float32)
    for j in range(per_row):
        s = XS[:, j, None] * scales[None, :, j]  # [T, n] f32
        acc = acc + S[j].astype(np.float32) * s
    return acc


def nf4_int8_gemm_reference(q: NF4Tensor, table: np.ndarray, XQ: np.ndarray, XS: np.ndarray) -> np.ndarray:
    """NumPy twin of every variant on :class:`Tiles`: ``q`` [n, k] NF4, ``table`` the 16 codes as
    int8, ``XQ`` int8 [T, k] and ``XS`` f32 [T, k / bs] the activations as
    ``int8.quantize_activations`` gives them -> f32 [T, n] (module docstring)."""
    n, k = q.shape
    bs, half = q.block_size, q.block_size // 2
    per_row = k // bs
    codes = np.asarray(q.packed, np.uint8).reshape(n, per_row, half)
    w = np.concatenate([table[codes >> 4], table[codes & 15]], axis=2)  # [n, per_row, bs]: x's order
    scales = (q.absmax() if not q.double_quant else dequantize_scales_reference(
        q.scales, q.nested_scales, q.offset, q.nested_block_size)).reshape(n, per_row)
    return _tiles_reference(w, scales, XQ, XS)


def q8_gemm_reference(codes: np.ndarray, scales: np.ndarray, XQ: np.ndarray, XS: np.ndarray) -> np.ndarray:
    """NumPy twin of every variant on :class:`Q8Tiles`: ``codes`` int8 [n, k] (each block's even
    entries, then its odd ones, as the activations') and ``scales`` f32 [n, k / bs], ``XQ``, ``XS``
    as for :func:`nf4_int8_gemm_reference` -> f32 [T, n]."""
    n, k = codes.shape
    per_row = scales.shape[1]
    return _tiles_reference(codes.reshape(n, per_row, k // per_row), scales, XQ, XS)


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI
# ---------------------------------------------------------------------------------------------

@intrinsic
def _transpose_words(typingctx, src, start, row_words, dst, dstart, per_row):
    """``dst[dstart + j * 128 + s * 16 + lane] = src[start + lane * row_words + j * 8 + s]`` for every
    block ``j < per_row`` of 64-entry blocks (8 words), ``s < 8``, ``lane < 16``: a group's 16 rows
    into the tile layout, a block at a time as one 16 x 8 transpose of 32-bit words in registers
    (sixteen 256-bit loads, one shuffle LLVM lowers to permutes, a 512-byte store)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == types.uint32
            and dst.dtype == types.uint32 and src.layout == dst.layout == "C" and dst.mutable):
        return None
    v8, v128 = ir.VectorType(_I32, 8), ir.VectorType(_I32, 128)

    def codegen(context, builder, sig, args):
        src_p, dst_p = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3))
        start, row_words, dstart, per_row = args[1], args[2], args[4], args[5]
        c = lambda x: ir.Constant(_I64, x)
        with cgutils.for_range(builder, per_row) as loop:
            j = loop.index
            base = builder.add(start, builder.mul(j, c(8)))
            rows = [builder.load(builder.bitcast(builder.gep(src_p, [builder.add(base, builder.mul(row_words, c(lane)))]),
                                                 v8.as_pointer()), align=4) for lane in range(16)]
            while len(rows) > 1:  # the 16 rows side by side: <128 x i32>, row ``lane`` at 8 lane
                n = rows[0].type.count
                mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
                rows = [builder.shuffle_vector(a, b, mask) for a, b in zip(rows[::2], rows[1::2])]
            out = builder.shuffle_vector(rows[0], rows[0], ir.Constant(ir.VectorType(_I32, 128),
                                                                       [lane * 8 + s for s in range(8) for lane in range(16)]))
            at = builder.gep(dst_p, [builder.add(dstart, builder.mul(j, c(128)))])
            builder.store(out, builder.bitcast(at, v128.as_pointer()), align=4)
        return context.get_dummy_value()

    i64 = types.int64
    return types.none(src, i64, i64, dst, i64, i64), codegen


@njit(cache=True, nogil=True)
def _repack(dyn, packed, qscale, nested, nshift, offset, bs, n, k, r0, groups, rep, sc):
    """Rows ``r0 .. r0 + groups * GEMM_ROWS`` into the tile layout: ``rep`` 32-bit words
    [group, block, word s, lane] = bytes ``4s .. 4s + 3`` of the block of row ``r0 + group * 16 +
    lane`` (``packed`` as 32-bit words, ``rep`` likewise); ``sc`` [group, block, lane] its scale's
    code (uint8 ``sc``: ``qscale``'s byte) or its scale (float32: ``storage.block_scale``). Rows
    past n: code 7 (the value 0) and scale (code) 0."""
    per_row, nd = k // bs, bs // 8  # words of a block
    row_words = k // 8
    for g in range(groups):  # whole groups of 64-entry blocks: their words a block at a time
        if nd == 8 and r0 + (g + 1) * GEMM_ROWS <= n:
            _transpose_words(packed, (r0 + g * GEMM_ROWS) * row_words, row_words, rep, g * per_row * 8 * GEMM_ROWS,
                             per_row)
    for rr in range(groups * GEMM_ROWS):
        g, lane = rr // GEMM_ROWS, rr % GEMM_ROWS
        r = r0 + rr
        moved = nd == 8 and r0 + (g + 1) * GEMM_ROWS <= n
        for j in range(per_row):
            gj = g * per_row + j
            dst = gj * nd * GEMM_ROWS + lane
            if r < n:
                _put_scale(sc, gj * GEMM_ROWS + lane, dyn, qscale, nested, nshift, offset, r * per_row + j)
                if not moved:
                    src = r * row_words + j * nd
                    for s in range(nd):
                        rep[dst + s * GEMM_ROWS] = packed[src + s]
            else:
                sc[gj * GEMM_ROWS + lane] = 0
                for s in range(nd):
                    rep[dst + s * GEMM_ROWS] = 0x77777777


def _splat(builder, v, ty, n):
    u = builder.insert_element(ir.Constant(ir.VectorType(ty, n), ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _gather8(builder, base, index):
    """f32 ``base[index[i]]`` for 8 int32 indices (AVX2's ``vgatherdps``)."""
    vi, vf = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, _I8.as_pointer(), vi, vf, _I8]),
                                        "llvm.x86.avx2.gather.d.ps.256")
    every = builder.bitcast(ir.Constant(vi, [-1] * 8), vf)
    return builder.call(fn, [ir.Constant(vf, [0.0] * 8), builder.bitcast(base, _I8.as_pointer()), index, every,
                             ir.Constant(_I8, 4)])


def _gemm_codegen(tokens: int, isa: str, q8: bool, coded: bool):
    """IR of :func:`i8_gemm_tile` for ``tokens`` tokens, ``isa`` and the weights' codes (``q8``:
    int8 codes, :class:`Q8Tiles`; else NF4 nibbles, :class:`Tiles`) and scales (``coded``: their
    double-quantized 8-bit codes, decoded here; else float32) (Python values: every accumulator a
    register). A register holds ``lanes`` rows (16 for ``vnni512``, else 8), so a group's 16 rows
    are ``16 / lanes`` registers per token."""
    lanes = 16 if isa == "vnni512" else 8
    # what the weights' unsigned bytes add to each code (taken off through the sums of x); AVX2's
    # int8 codes instead move their signs onto x
    offset = (0 if q8 else AVX2_CODE_OFFSET) if isa == "avx2" else 128
    halves = GEMM_ROWS // lanes
    chains = max(1, GEMM_CHAINS // tokens)
    ahead = GEMM_FEW_PREFETCH_BYTES if tokens <= GEMM_TOKENS else GEMM_PREFETCH_BYTES  # bytes prefetched ahead
    vb, vi, vf = ir.VectorType(_I8, 4 * lanes), ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)
    c = lambda x: ir.Constant(_I64, x)

    def codegen(context, builder, sig, args):
        table_p, rep_p, sc_p, dyn_p, nested_p, xq_p, xsum_p, xs_p, out_p = (
            context.make_array(sig.args[i])(context, builder, args[i]).data for i in range(9))
        per_row, half, k, n_out, t0, o0, r0, nshift, scale_offset = args[9:18]
        fn = lambda name, ret, params: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)
        pshufb = fn("llvm.x86.avx512.pshuf.b.512" if lanes == 16 else "llvm.x86.avx2.pshuf.b", vb, [vb, vb])
        t16 = builder.load(builder.bitcast(table_p, ir.VectorType(_I8, 16).as_pointer()), align=1)
        table = builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 4 * lanes), list(range(16)) * (lanes // 4)))
        if isa == "avx2":
            table = builder.add(table, ir.Constant(vb, [AVX2_CODE_OFFSET] * 4 * lanes))  # NF4_I8 + 64: bytes 0 .. 128
            maddubs = _maddubs_lanes(builder)  # vpmaddubsw, vpmaddwd by ones: 8 int32 lanes
            psign = fn("llvm.x86.avx2.psign.b", vb, [vb, vb])

            def dot(acc, u, x):  # unsigned weights times x: pairs at most 2 * 128 * 127, no saturation
                return builder.add(acc, maddubs(u, builder.bitcast(x, vb)))

            def q8_operands(w, x):  # |w| and x with w's sign (vpsignb): pairs at most 2 * 127 * 127
                return builder.call(psign, [w, w]), builder.call(psign, [builder.bitcast(x, vb), w])
        else:
            table = builder.xor(table, ir.Constant(vb, [0x80] * 4 * lanes))  # NF4_I8 + 128 as unsigned bytes
            dpbusd = fn("llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256", vi,
                        [vi, vi, vi])

            def dot(acc, u, x):
                return builder.call(dpbusd, [acc, builder.bitcast(u, vi), x])

            def q8_operands(w, x):  # the codes plus 128 (their sign bit flipped) as unsigned bytes
                return builder.xor(w, ir.Constant(vb, [0x80] * 4 * lanes)), x
        four, fifteen = ir.Constant(vb, [4] * 4 * lanes), ir.Constant(vb, [15] * 4 * lanes)
        nd = builder.udiv(half, c(2 if q8 else 4))  # words of a block
        rep8 = builder.bitcast(rep_p, _I8.as_pointer())
        ts = [builder.add(t0, c(t)) for t in range(tokens)]
        xq_t = [builder.gep(xq_p, [builder.mul(t, k)]) for t in ts]
        xsum_t = [builder.gep(xsum_p, [builder.mul(t, per_row)]) for t in ts]
        xs_t = [builder.gep(xs_p, [builder.mul(t, per_row)]) for t in ts]
        out_t = [builder.gep(out_p, [builder.add(builder.mul(t, n_out), o0)]) for t in ts]

        def xword(t, at):  # the four bytes of token t's row at ``at``, in every lane
            w = builder.load(builder.bitcast(builder.gep(xq_t[t], [at]), _I32.as_pointer()), align=1)
            return _splat(builder, w, _I32, lanes)

        def rows(h):
            """The ``lanes`` rows of register ``h`` of the group over every block, then their results:
            a register's rows at a time, so every token's sums stay in registers."""
            facc = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes)) for _ in range(tokens)]
            iacc = [cgutils.alloca_once(builder, vi) for _ in range(tokens)]  # chain 0 of each token
            extra = [[cgutils.alloca_once(builder, vi) for _ in range(chains - 1)] for _ in range(tokens)]

            def chain(t, i):  # the token's sum i mod ``chains``
                return iacc[t] if i % chains == 0 else extra[t][i % chains - 1]

            if coded:  # block j of lane l is block ``(r0 + l) * per_row + j`` of the weight
                i32 = lambda v: _splat(builder, builder.trunc(v, _I32), _I32, lanes)
                first = builder.mul(builder.add(i32(r0), ir.Constant(vi, [lanes * h + l for l in range(lanes)])),
                                    i32(per_row))
                permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi]),
                                                         "llvm.x86.avx512.permvar.sf.512" if lanes == 16 else
                                                         "llvm.x86.avx2.permps")
                if lanes == 16:  # the 256 entries of ``dyn`` in 16 registers, looked up by permutes
                    pair = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi, vf]),
                                                          "llvm.x86.avx512.vpermi2var.ps.512")
                    dyn_v = [builder.load(builder.bitcast(builder.gep(dyn_p, [c(16 * i)]), vf.as_pointer()), align=4)
                             for i in range(16)]

            def decoded(qv):
                """``dyn[q]`` of each lane's code: with 16 lanes, eight two-register permutes (bits 0-4),
                then the bits 5, 6, 7 of the code choose (no memory access); else a gather."""
                q = builder.zext(qv, vi)
                if lanes != 16:
                    return _gather8(builder, dyn_p, q)
                level = [builder.call(pair, [dyn_v[2 * i], q, dyn_v[2 * i + 1]]) for i in range(8)]
                for bit in (32, 64, 128):
                    on = builder.icmp_unsigned("!=", builder.and_(q, ir.Constant(vi, [bit] * 16)), ir.Constant(vi, [0] * 16))
                    level = [builder.select(on, b, a) for a, b in zip(level[::2], level[1::2])]
                return level[0]

            def scales(j):
                """The block's scales of the register's rows: stored, or decoded from their codes as
                ``storage.block_scale`` (``dyn[q] * nested[b >> nshift] + offset``: a product, then
                a sum), the rows' nested scales by one load from lane 0's and a permute (they lie
                within a register's width, :func:`codes_fit`; ``nested`` padded for the load)."""
                at = builder.add(builder.mul(j, c(GEMM_ROWS)), c(lanes * h))
                if not coded:
                    return builder.load(builder.bitcast(builder.gep(sc_p, [at]), vf.as_pointer()), align=4)
                qv = builder.load(builder.bitcast(builder.gep(sc_p, [at]), ir.VectorType(_I8, lanes).as_pointer()),
                                  align=1)
                b = builder.lshr(builder.add(first, i32(j)), i32(nshift))
                lo = builder.extract_element(b, ir.Constant(_I32, 0))
                win = builder.load(builder.bitcast(builder.gep(nested_p, [builder.zext(lo, _I64)]), vf.as_pointer()),
                                   align=4)
                nested_v = builder.call(permute, [win, builder.sub(b, _splat(builder, lo, _I32, lanes))])
                prod = builder.fmul(decoded(qv), nested_v)
                return builder.fadd(prod, _splat(builder, scale_offset, _F32, lanes))

            def block(j, nd_v, half_v):
                x0 = builder.mul(j, builder.mul(half_v, c(2)))  # x entries of the block (its even ones first)
                wb = builder.gep(rep8, [builder.mul(builder.mul(j, nd_v), c(4 * GEMM_ROWS))])
                for t in range(tokens):  # the unsigned weights' excess, o * sum(q), taken off in advance
                    corr = builder.mul(builder.load(builder.gep(xsum_t[t], [j])), ir.Constant(_I32, -offset))
                    builder.store(_splat(builder, corr, _I32, lanes), iacc[t])
                    for e in extra[t]:
                        builder.store(ir.Constant(vi, [0] * lanes), e)

                def word(s, i=0):  # word s of the block; its products go to chains i, i + 1
                    at = builder.add(x0, builder.mul(s, c(4)))
                    ptr = builder.gep(wb, [builder.add(builder.mul(s, c(4 * GEMM_ROWS)), c(4 * lanes * h))])
                    if h == 0:  # (the word's other half, for 256-bit registers, is then in cache)
                        _prefetch(builder, builder.gep(ptr, [c(ahead)]))
                    w = builder.load(builder.bitcast(ptr, vb.as_pointer()), align=1)
                    if q8:  # four int8 codes of each row: one product a token
                        for t in range(tokens):
                            u, x = q8_operands(w, xword(t, at))
                            builder.store(dot(builder.load(chain(t, i)), u, x), chain(t, i))
                        return
                    wh = builder.call(pshufb, [table, builder.lshr(w, four)])  # weights of the even entries
                    wl = builder.call(pshufb, [table, builder.and_(w, fifteen)])  # of the odd ones
                    for t in range(tokens):
                        builder.store(dot(builder.load(chain(t, i)), wh, xword(t, at)), chain(t, i))
                        builder.store(dot(builder.load(chain(t, i + 1)), wl, xword(t, builder.add(at, half_v))),
                                      chain(t, i + 1))

                if isinstance(nd_v, ir.Constant):  # (unrolled: each product takes the next chain)
                    for s in range(nd_v.constant):
                        word(c(s), s * (1 if q8 else 2))
                else:
                    with cgutils.for_range(builder, nd_v) as loop:
                        word(loop.index)
                for t in range(tokens):  # the chains' sum (integers: exact in any order)
                    for e in extra[t]:
                        builder.store(builder.add(builder.load(iacc[t]), builder.load(e)), iacc[t])
                scv = scales(j)
                for t in range(tokens):
                    sv = builder.fmul(_splat(builder, builder.load(builder.gep(xs_t[t], [j])), _F32, lanes), scv)
                    f = builder.sitofp(builder.load(iacc[t]), vf)
                    builder.store(builder.fadd(builder.load(facc[t]), builder.fmul(f, sv)), facc[t])

            def blocks(nd_v, half_v):
                with cgutils.for_range(builder, per_row) as loop:
                    block(loop.index, nd_v, half_v)

            with builder.if_else(builder.icmp_unsigned("==", half, c(32))) as (bs64, general):
                with bs64:
                    blocks(c(16 if q8 else 8), c(32))
                with general:
                    blocks(nd, half)
            for t in range(tokens):
                dst = builder.bitcast(builder.gep(out_t[t], [c(lanes * h)]), vf.as_pointer())
                builder.store(builder.load(facc[t]), dst, align=4)

        for h in range(halves):  # (both at once, 8 tokens: 32 sums spilled from 16 registers, 22-24 G/s against 34-37)
            rows(h)
        return context.get_dummy_value()

    return codegen


#: the SIMD variants, by the code :func:`i8_gemm_tile` takes as ``isa``: ``vpdpbusd`` on 512-bit
#: registers (AVX-512 VNNI) or 256-bit ones (AVX-512 VNNI with VL, or AVX-VNNI), and ``vpmaddubsw``
#: + ``vpmaddwd`` (AVX2, the weights offset by ``simd.AVX2_CODE_OFFSET``)
GEMM_ISAS = {"vnni512": 0, "vnni256": 1, "avx2": 2}


@intrinsic
def i8_gemm_tile(typingctx, table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0,
                 nshift, offset, tokens, isa):
    """``out[(t0 + t) * n_out + o0 + lane]`` = row ``lane`` of one repacked group (``rep``, ``sc``:
    :func:`_repack`'s layout for one group, its first row ``r0`` of the weight) times token
    ``t0 + t`` for ``t < tokens`` (a literal, 1 .. ``GEMM_WIDE_TOKENS``): ``xq`` int8 [T * k],
    ``xsum`` int32 and ``xs`` f32 [T * per_row] flat; ``table`` the 16 codes, within -64 .. 64 for
    ``avx2`` (``simd.AVX2_CODE_OFFSET``). Per block of ``2 * half`` entries, ``half / 4`` word steps
    of the group's 64 weight bytes, each decoded by two ``vpshufb`` into the even and odd entries of
    16 rows and multiplied with every token's four entries (one 32-bit broadcast). ``rep`` int32
    instead of uint32: int8 codes (:class:`Q8Tiles`, ``table`` unused), ``half / 2`` word steps a
    block, each multiplied as it is loaded. ``sc`` uint8: the blocks' double-quantized scale codes
    (``dyn``, ``nested``, ``nshift``, ``offset``: ``storage.block_scale``'s; :func:`codes_fit`),
    decoded 16 rows at a time; float32: the scales (``dyn``, ``nested`` unused). ``isa``: a literal
    code of :data:`GEMM_ISAS`."""
    arrays = (table, rep, sc, dyn, nested, xq, xsum, xs, out)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)
            and table.dtype == types.int8 and rep.dtype in (types.uint32, types.int32) and xq.dtype == types.int8
            and xsum.dtype == types.int32 and sc.dtype in (types.float32, types.uint8)
            and all(a.dtype == types.float32 for a in (dyn, nested, xs, out)) and out.mutable
            and isinstance(tokens, types.IntegerLiteral) and 1 <= tokens.literal_value <= GEMM_WIDE_TOKENS
            and isinstance(isa, types.IntegerLiteral) and isa.literal_value in GEMM_ISAS.values()):
        return None
    i64 = types.int64
    name = {v: n for n, v in GEMM_ISAS.items()}[isa.literal_value]
    return (types.none(*arrays, i64, i64, i64, i64, i64, i64, i64, i64, types.float32, tokens, isa),
            _gemm_codegen(tokens.literal_value, name, rep.dtype == types.int32, sc.dtype == types.uint8))


@njit(cache=True, nogil=True)
def _tile(table, rep, sc, dyn, nested, nshift, offset, xq, xsum, xs, out, per_row, half, k, n_out, t0, m, o0, r0, isa):
    """:func:`i8_gemm_tile` for ``m`` tokens: ``GEMM_WIDE_TOKENS`` at once, else 8 then the rest
    (each count its own literal; a token's result does not depend on its tile)."""
    numba.literally(isa)
    if m == GEMM_WIDE_TOKENS:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, GEMM_WIDE_TOKENS, isa)
        return
    if m > 8:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 8, isa)
        t0, m = t0 + 8, m - 8
    if m == 8:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 8, isa)
    elif m == 7:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 7, isa)
    elif m == 6:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 6, isa)
    elif m == 5:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 5, isa)
    elif m == 4:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 4, isa)
    elif m == 3:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 3, isa)
    elif m == 2:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 2, isa)
    else:
        i8_gemm_tile(table, rep, sc, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0, o0, r0, nshift,
                     offset, 1, isa)


@njit(cache=True, nogil=True)
def _repack_groups(dyn, packed, qscale, nested, nshift, offset, bs, n, k, g0, g1, rep, sc):
    """Groups ``g0 .. g1`` of a weight into the tile layout (:func:`_repack`), ``rep`` u32 and ``sc``
    f32 of the whole weight, flat: group g at ``g * words`` and ``g * scales``."""
    per_row = k // bs
    gw, gs = per_row * (bs // 8) * GEMM_ROWS, per_row * GEMM_ROWS
    _repack(dyn, packed, qscale, nested, nshift, offset, bs, n, k, g0 * GEMM_ROWS, g1 - g0, rep[g0 * gw:g1 * gw],
            sc[g0 * gs:g1 * gs])


@njit(cache=True, nogil=True)
def _tiles_simd(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0, isa):
    """``OUT[t, o0 + r]`` for the rows r of groups ``g0 .. g1`` of the repacked weight (``rep``,
    ``sc``: :class:`Tiles`) and every token t: ``GEMM_GROUPS`` groups at a time, each tile of
    tokens (``GEMM_WIDE_TOKENS`` for ``vnni512``, else ``GEMM_TOKENS``) over those groups, so a
    tile's x stays in cache for their rows. The last group, cut at ``n``, goes through a scratch of
    its 16 lanes, so that nothing past row n is written."""
    numba.literally(isa)
    T, n_out = XQ.shape[0], OUT.shape[1]
    gw, gs = per_row * half * GEMM_ROWS // (2 if _q8(rep) else 4), per_row * GEMM_ROWS
    xq, xsum, xs, out = XQ.reshape(-1), XSUM.reshape(-1), XS.reshape(-1), OUT.reshape(-1)
    step = GEMM_WIDE_TOKENS if isa == 0 else GEMM_TOKENS
    whole = n // GEMM_ROWS
    cut = np.empty(T * GEMM_ROWS if n % GEMM_ROWS else 0, np.float32)  # the last group's lanes
    for c0 in range(g0, g1, GEMM_GROUPS):
        for t0 in range(0, T, step):
            m = min(step, T - t0)
            for g in range(c0, min(g1, c0 + GEMM_GROUPS)):
                r, s = rep[g * gw:(g + 1) * gw], sc[g * gs:(g + 1) * gs]
                if g < whole:
                    _tile(table, r, s, dyn, nested, nshift, offset, xq, xsum, xs, out, per_row, half, k, n_out, t0, m,
                          o0 + g * GEMM_ROWS, g * GEMM_ROWS, isa)
                else:
                    _tile(table, r, s, dyn, nested, nshift, offset, xq, xsum, xs, cut, per_row, half, k, GEMM_ROWS, t0,
                          m, 0, g * GEMM_ROWS, isa)
                    for t in range(t0, t0 + m):
                        for lane in range(n - g * GEMM_ROWS):
                            OUT[t, o0 + g * GEMM_ROWS + lane] = cut[t * GEMM_ROWS + lane]


@njit(cache=True, nogil=True)
def _decode_group_scales(sc, dyn, nested, nshift, offset, per_row, g, out):
    """Group ``g``'s block scales (``sc``: :class:`Tiles`' codes) decoded into ``out`` f32
    [per_row * 16] in the same order, by the kernels' formula (``storage.block_scale``)."""
    gs = per_row * GEMM_ROWS
    for j in range(per_row):
        for lane in range(GEMM_ROWS):
            i = j * GEMM_ROWS + lane
            out[i] = _tile_scale(sc, g * gs + i, dyn, nested, nshift, offset, (g * GEMM_ROWS + lane) * per_row + j)


@njit(cache=True, nogil=True)
def _whole_tiles_decoded(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT,
                         o0, isa, tokens):
    """:func:`_tiles_simd` for a prompt whose tokens are whole tiles of ``tokens`` (a literal: the
    variant's tile) over scale codes: ``GEMM_GROUPS`` groups at a time, their scales decoded once
    into float32 (:func:`_decode_group_scales`, the same bits), then every tile of tokens over them
    by the float32-scale kernel of that one size, rather than each tile decoding them again. Only
    that kernel is added to a process's code (:func:`gemm_many` sends the tokens past the last
    whole tile to :func:`_tiles_simd`; a decode step never comes here)."""
    numba.literally(isa)
    numba.literally(tokens)
    T, n_out = XQ.shape[0], OUT.shape[1]
    gw, gs = per_row * half * GEMM_ROWS // 4, per_row * GEMM_ROWS
    xq, xsum, xs, out = XQ.reshape(-1), XSUM.reshape(-1), XS.reshape(-1), OUT.reshape(-1)
    whole = n // GEMM_ROWS
    cut = np.empty(T * GEMM_ROWS if n % GEMM_ROWS else 0, np.float32)  # the last group's lanes
    scales = np.empty(GEMM_GROUPS * gs, np.float32)
    for c0 in range(g0, g1, GEMM_GROUPS):
        c1 = min(g1, c0 + GEMM_GROUPS)
        for g in range(c0, c1):
            _decode_group_scales(sc, dyn, nested, nshift, offset, per_row, g, scales[(g - c0) * gs:(g - c0 + 1) * gs])
        for t0 in range(0, T - tokens + 1, tokens):
            for g in range(c0, c1):
                r, s = rep[g * gw:(g + 1) * gw], scales[(g - c0) * gs:(g - c0 + 1) * gs]
                if g < whole:
                    i8_gemm_tile(table, r, s, dyn, nested, xq, xsum, xs, out, per_row, half, k, n_out, t0,
                                 o0 + g * GEMM_ROWS, g * GEMM_ROWS, nshift, offset, tokens, isa)
                else:
                    i8_gemm_tile(table, r, s, dyn, nested, xq, xsum, xs, cut, per_row, half, k, GEMM_ROWS, t0, 0,
                                 g * GEMM_ROWS, nshift, offset, tokens, isa)
                    for t in range(t0, t0 + tokens):
                        for lane in range(n - g * GEMM_ROWS):
                            OUT[t, o0 + g * GEMM_ROWS + lane] = cut[t * GEMM_ROWS + lane]


@njit(cache=True, nogil=True)
def _tiles_portable(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    """:func:`_tiles_simd` in plain loops (any CPU): each row's words read back from the tile
    layout, the module docstring's arithmetic; ``XSUM`` unused (the sums need no correction)."""
    q8 = _q8(rep)
    nd = half // 2 if q8 else half // 4  # words of a block
    for r in range(g0 * GEMM_ROWS, min(n, g1 * GEMM_ROWS)):
        g, lane = r // GEMM_ROWS, r % GEMM_ROWS
        for t in range(XQ.shape[0]):
            acc = np.float32(0.0)
            for j in range(per_row):
                gj = g * per_row + j
                S = np.int32(0)
                for s in range(nd):
                    word = np.uint32(rep[gj * nd * GEMM_ROWS + s * GEMM_ROWS + lane])
                    for b in range(4):
                        byte, i = (word >> np.uint32(8 * b)) & np.uint32(255), 4 * s + b
                        if q8:  # the byte as a signed code, times entry i of the block
                            S += (np.int32(byte) - np.int32(256 if byte >= 128 else 0)) * np.int32(XQ[t, j * 2 * half + i])
                        else:
                            S += np.int32(table[byte >> np.uint32(4)]) * np.int32(XQ[t, j * 2 * half + i]) + \
                                np.int32(table[byte & np.uint32(15)]) * np.int32(XQ[t, j * 2 * half + half + i])
                scale = _tile_scale(sc, gj * GEMM_ROWS + lane, dyn, nested, nshift, offset, r * per_row + j)
                acc = acc + np.float32(S) * (XS[t, j] * scale)
            OUT[t, o0 + r] = acc


# One per ISA, its code (GEMM_ISAS) compiled in

@njit(cache=True, nogil=True)
def _tiles_vnni512(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _tiles_simd(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0, 0)


@njit(cache=True, nogil=True)
def _tiles_vnni256(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _tiles_simd(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0, 1)


@njit(cache=True, nogil=True)
def _tiles_avx2(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _tiles_simd(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0, 2)


# A prompt's whole tiles over scale codes, decoded once (:func:`_whole_tiles_decoded`), one per ISA

@njit(cache=True, nogil=True)
def _decoded_vnni512(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _whole_tiles_decoded(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT,
                         o0, 0, GEMM_WIDE_TOKENS)


@njit(cache=True, nogil=True)
def _decoded_vnni256(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _whole_tiles_decoded(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT,
                         o0, 1, GEMM_TOKENS)


@njit(cache=True, nogil=True)
def _decoded_avx2(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    _whole_tiles_decoded(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT,
                         o0, 2, GEMM_TOKENS)


#: by variant: its function for a prompt's whole tiles of tokens over scale codes, and that tile's tokens
DECODED_ONCE = {"vnni512": (_decoded_vnni512, GEMM_WIDE_TOKENS), "vnni256": (_decoded_vnni256, GEMM_TOKENS),
                "avx2": (_decoded_avx2, GEMM_TOKENS)}


#: every variant this CPU runs (the tests prove each equal to the twin bit for bit); products use
#: :data:`INT8_GEMM_SIMD`'s
INT8_GEMM_VARIANTS = {"portable": _tiles_portable}
for _isa, _fn in (("vnni512", _tiles_vnni512), ("vnni256", _tiles_vnni256), ("avx2", _tiles_avx2)):
    if _isa in INT8_GEMM_AVAILABLE:
        INT8_GEMM_VARIANTS[_isa] = _fn
_tiles = INT8_GEMM_VARIANTS[INT8_GEMM_SIMD or "portable"]


@njit(cache=True, nogil=True)
def tiles_slice(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0):
    """:data:`INT8_GEMM_SIMD`'s variant of :func:`_tiles_simd` (the decode step's products,
    ``runtime/decode.py``)."""
    _tiles(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, g0, g1, XQ, XSUM, XS, OUT, o0)


@njit(cache=True, parallel=True)
def tiles_parallel(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, XQ, XSUM, XS, OUT, o0, chunks):
    """:func:`tiles_slice` for every group, split in ``chunks`` runs of groups between Numba's threads."""
    groups = (n + GEMM_ROWS - 1) // GEMM_ROWS
    step = (groups + chunks - 1) // chunks
    for c in prange(chunks):
        tiles_slice(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k, c * step,
                    min(groups, (c + 1) * step), XQ, XSUM, XS, OUT, o0)


def words(packed: np.ndarray) -> np.ndarray:
    """The packed bytes as 32-bit words for the repack (in place where 4-byte aligned, else a copy)."""
    if packed.ctypes.data % 4:
        packed = packed.copy()
    return packed.view(np.uint32)


def tiles_nbytes(n: int, k: int, bs: int, code_bits: int = 4, nested_block_size: int = 0) -> int:
    """Bytes of the tiles of an ``[n, k]`` weight in blocks of ``bs`` (:class:`Tiles`, or with
    ``code_bits=8`` :class:`Q8Tiles`): rows rounded up to whole groups, a code a weight, and a
    block's scale code with a copy of the nested scales (double quantization in nested blocks of
    ``nested_block_size``, where :func:`codes_fit`) or else its float32 scale."""
    rows = -(-n // GEMM_ROWS) * GEMM_ROWS
    blocks = rows * (k // bs)
    held = _nested_copy(blocks, k // bs, max(0, int(nested_block_size).bit_length() - 1)) if code_bits == 4 else 0
    return rows * k * code_bits // 8 + (blocks + 4 * held if held else 4 * blocks)


def codes_fit(per_row: int, nshift: int) -> bool:
    """Whether the tiles of a weight of ``per_row`` blocks a row, double-quantized in nested blocks
    of ``2 ** nshift``, hold its blocks' scale codes: the nested scales of a block of any 16 (or 8)
    consecutive rows then lie within 16 (8) entries from the first row's, which the kernels read by
    one load and a permute (up to 256 blocks a row under nested blocks of 256). Else (and without
    double quantization) they hold float32 scales."""
    return nshift > 0 and all(((lanes - 1) * per_row + (1 << nshift) - 1) >> nshift < lanes for lanes in (8, 16))


def _nested_copy(blocks: int, per_row: int, nshift: int) -> int:
    """Entries of the padded copy of the nested scales that the tiles of a weight of ``blocks``
    blocks (whole groups) hold beside their scale codes: the last group's lanes, and a register's
    load from any lane's index (``GEMM_ROWS`` more); 0 where the tiles hold float32 scales
    (:func:`codes_fit`, and the kernels' block numbers are int32)."""
    if not (codes_fit(per_row, nshift) and blocks < 2 ** 31):
        return 0
    return ((blocks - 1) >> nshift) + 1 + GEMM_ROWS


class _TileLayout:
    """What the kernels read of a weight in the tile layout: ``rep`` its codes' 32-bit words, ``sc``
    its blocks' scales (f32) or their double-quantized codes (uint8), 16 rows side by side
    (:func:`_repack`); ``dyn``, ``nested``, ``nshift``, ``offset`` what decodes the codes
    (``storage.block_scale``); ``n``, ``k``, ``bs``."""

    n: int
    k: int
    bs: int
    rep: np.ndarray
    sc: np.ndarray
    dyn: np.ndarray = DYNAMIC_CODE
    nested: np.ndarray = np.zeros(1, np.float32)  # (unused where ``sc`` holds the scales)
    nshift: int = 0
    offset: np.float32 = np.float32(0.0)

    @property
    def nbytes(self) -> int:
        """The bytes held: codes, scales (or their codes) and, with scale codes, the nested scales."""
        return self.rep.nbytes + self.sc.nbytes + (self.nested.nbytes if self.sc.dtype == np.uint8 else 0)

    def args(self, table) -> tuple:
        """``(table, rep, sc, dyn, nested, nshift, offset, per_row, half, n, k)``: the leading
        arguments of every variant."""
        return (table, self.rep, self.sc, self.dyn, self.nested, self.nshift, self.offset, self.k // self.bs,
                self.bs // 2, self.n, self.k)


class Tiles(_TileLayout):
    """An NF4 weight ``[n, k]`` repacked into the tile layout (:func:`_repack`): ``rep`` uint32 the
    codes (the same bytes, moved); ``sc`` every block's scale. With double quantization
    (:func:`codes_fit`) its 8-bit code, moved likewise (uint8: an eighth of a bit a weight for
    64-entry blocks), which the kernels decode 16 rows at a time by ``storage.block_scale``'s
    formula from ``dyn`` and the weight's ``nested`` scales (a copy, padded for the kernels'
    loads); else its float32 absmax (half a bit a weight). Made once, at load
    (``int8.NF4Int8Linear``); every product reads it."""

    def __init__(self, args, n: int, k: int, threads: int = 1, pool=None):
        """``args`` = ``(table, dyn, packed, qscale, nested, nshift, offset, bs)``, the groups split
        between ``threads`` threads of ``pool`` (GIL released) when given."""
        dyn, packed, qscale, nested, nshift, offset, bs = args[1:]
        self.n, self.k, self.bs = n, k, bs
        groups = -(-n // GEMM_ROWS)
        self.rep = large_pages.empty(groups * GEMM_ROWS * k // 8, np.uint32)  # (read every step: 2 MB pages)
        blocks = groups * GEMM_ROWS * (k // bs)
        held = _nested_copy(blocks, k // bs, nshift)
        self.sc = np.empty(blocks, np.uint8 if held else np.float32)
        if held:
            self.nested = np.zeros(held, np.float32)
            self.nested[:nested.size] = nested
            self.dyn, self.nshift, self.offset = np.asarray(dyn, np.float32), int(nshift), np.float32(offset)
        src = words(packed)
        bounds = [groups * i // threads for i in range(threads + 1)]
        work = lambda i: _repack_groups(dyn, src, qscale, nested, nshift, offset, bs, n, k, bounds[i], bounds[i + 1],
                                        self.rep, self.sc)
        if threads > 1 and pool is not None:
            in_parallel(pool, work, range(threads))
        else:
            for i in range(threads):
                work(i)


@njit(cache=True, nogil=True)
def _repack_q8(codes, scales, r0, rep, sc):
    """Rows ``r0 ..`` of int8 codes (``codes`` their 32-bit words, [rows, k / 4]) and ``scales``
    f32 [rows, per_row] into :class:`Q8Tiles`' ``rep`` (as uint32) and ``sc``: word
    ``[group, w, lane]`` = word ``w`` of row ``group * 16 + lane`` (block ``w // (bs / 4)``). A
    whole group's words by 16 x 8 transposes in registers (:func:`_transpose_words`, the NF4
    repack's), a group cut by the run's ends a word at a time."""
    rows, row_words = codes.shape
    per_row = scales.shape[1]
    r1 = r0 + rows
    src = codes.reshape(-1)
    for g in range(r0 // GEMM_ROWS, (r1 + GEMM_ROWS - 1) // GEMM_ROWS):
        lo, hi = max(r0, g * GEMM_ROWS), min(r1, (g + 1) * GEMM_ROWS)  # the group's rows in this run
        for j in range(per_row):
            for r in range(lo, hi):
                sc[(g * per_row + j) * GEMM_ROWS + r % GEMM_ROWS] = scales[r - r0, j]
        if hi - lo == GEMM_ROWS:  # (row_words: a multiple of 8 for blocks of a multiple of 32)
            _transpose_words(src, (lo - r0) * row_words, row_words, rep, g * row_words * GEMM_ROWS, row_words // 8)
            continue
        for w in range(row_words):
            for r in range(lo, hi):
                rep[(g * row_words + w) * GEMM_ROWS + r % GEMM_ROWS] = codes[r - r0, w]


class Q8Tiles(_TileLayout):
    """A weight ``[n, k]`` of int8 codes in blocks of ``bs`` with a float32 scale each (the float16
    head quantized at load, ``int8.F16Int8Linear``) in the tile layout: ``rep`` int32 (its type
    tells the kernels these are int8 codes), 16 rows' four codes side by side a word, ``sc`` the
    blocks' scales likewise. Rows past ``n``: codes and scales 0. Filled a run of rows at a time
    (:meth:`put`), as they are quantized, so the codes are never held twice."""

    def __init__(self, n: int, k: int, bs: int):
        self.n, self.k, self.bs = n, k, bs
        groups, cut = -(-n // GEMM_ROWS), n % GEMM_ROWS
        self.rep = large_pages.empty(groups * GEMM_ROWS * k // 4, np.int32)
        self.sc = np.empty(groups * GEMM_ROWS * (k // bs), np.float32)
        if cut:  # the last group's lanes past row n
            self.rep.reshape(groups, k // 4, GEMM_ROWS)[-1, :, cut:] = 0
            self.sc.reshape(groups, k // bs, GEMM_ROWS)[-1, :, cut:] = 0.0

    def put(self, r0: int, codes: np.ndarray, scales: np.ndarray) -> None:
        """Rows ``r0 .. r0 + len(codes)``: ``codes`` int8 [rows, k] (C-contiguous), ``scales`` f32
        [rows, k / bs]."""
        rows = codes.shape[0]
        _repack_q8(words(codes.reshape(-1)).reshape(rows, self.k // 4), np.ascontiguousarray(scales, np.float32), r0,
                   self.rep.view(np.uint32), self.sc)


#: a prompt's quantized rows whose length is a multiple of this many bytes are copied a cache line
#: apart (:func:`padded_rows`)
ALIASED_ROW_BYTES = 4096


def padded_rows(XQ: np.ndarray) -> tuple[np.ndarray, int]:
    """``(rows, stride)``: the quantized activations XQ int8 [T, k], where a tile's rows would share
    the same few sets of the L1 cache, copied into rows ``stride = k + 64`` bytes apart (the
    values unchanged; the kernels step through x by their ``k``, given the stride); else XQ, k.

    A tile reads the same entries of 16 tokens' rows together. Rows a multiple of 4 KB long (a
    Llama-3.2-1B down projection's 8,192 entries, every projection of a 4,096-wide model) put
    those 16 lines in one set of an L1 that maps 4 KB periodically (8- or 12-way): they evict
    each other. A line apart they spread over 16 sets: that projection's prompt products 20 -> 13
    ms on one thread (bench/README, *Rows a cache line apart*). The copy costs what reading x once
    costs; rows of 2,048 (two sets of 8) gained 1-3 %, within what the copy takes, so only whole
    4 KB multiples are copied, and only for prompts (several tiles of tokens)."""
    T, k = XQ.shape
    if T < 2 * GEMM_TOKENS or k % ALIASED_ROW_BYTES:
        return XQ, k
    rows = np.empty((T, k + 64), np.int8)
    rows[:, :k] = XQ
    return rows, k + 64


def gemm(variant, table, tiles: _TileLayout, XQ: np.ndarray, XS: np.ndarray, threads: int, pool=None,
         out: np.ndarray | None = None) -> np.ndarray:
    """f32 [T, n] = the quantized activations (``int8.quantize_activations``: ``XQ`` int8 [T, k],
    ``XS`` f32 [T, k / bs]) times the repacked weight ``tiles`` (NF4 codes ``table``, or int8), by
    ``variant`` (:data:`INT8_GEMM_VARIANTS`), rows split in whole groups between ``threads``
    threads (:func:`gemm_many` of one weight); into ``out`` [T, n] when given."""
    return gemm_many(variant, table, [tiles], XQ, XS, threads, pool, None if out is None else [out])[0]


def gemm_many(variant, table, tiles: list, XQ: np.ndarray, XS: np.ndarray, threads: int, pool=None,
              outs: list | None = None) -> list:
    """``[f32 [T, n_p]]``: the quantized activations (``XQ``, ``XS``, as for :func:`gemm`) times each
    weight of ``tiles`` (all of one block size and kind: a layer's q, k and v, or gate and up), by
    ``variant``. Their row groups, counted as one run, are split in contiguous shares between
    ``threads`` threads: one hand-off for the lot (a k or v projection alone is less work than the
    hand-off's wake-up and wait), the last share on the calling thread (``threads.in_parallel``; GIL
    released). Into ``outs`` when given. A row's result depends on nothing else,
    so the bits are those of any split.

    A prompt of two whole tiles of tokens or more over scale codes runs those tiles with the scales
    decoded once a call (:func:`_whole_tiles_decoded`; a TinyLlama prompt's products 1.06x faster),
    the tokens past them as a decode step's are."""
    for t in tiles:
        if variant == "avx2" and isinstance(t, Tiles) and not (
                -AVX2_CODE_OFFSET <= int(table.min()) and int(table.max()) <= AVX2_CODE_OFFSET):
            raise ValueError(f"the avx2 GEMM takes codes within -{AVX2_CODE_OFFSET} .. {AVX2_CODE_OFFSET}")
        if t.bs != tiles[0].bs:
            raise ValueError(f"gemm_many takes weights of one block size, not {tiles[0].bs} and {t.bs}")
    T = XQ.shape[0]
    XSUM = block_sums(XQ, tiles[0].bs)  # (on this thread: 128 x 5632 codes in 0.4 ms, less than a hand-off to the pool)
    XQ, stride = padded_rows(XQ)
    outs = [np.empty((T, t.n), np.float32) for t in tiles] if outs is None else outs
    # (this CPU's own variant through :func:`tiles_slice`, which decode steps call too: one copy of its code loaded)
    fn = tiles_slice if variant == INT8_GEMM_SIMD else INT8_GEMM_VARIANTS[variant]
    once, step = DECODED_ONCE.get(variant, (None, 0))
    args = [t.args(table)[:-1] + (stride,) for t in tiles]  # (the kernels' k: the stride of x's rows)
    groups = [-(-t.n // GEMM_ROWS) for t in tiles]
    starts = np.cumsum([0] + groups)  # the first group of each weight in the run
    threads = max(1, min(threads, int(starts[-1])))
    bounds = [int(starts[-1]) * i // threads for i in range(threads + 1)]

    def work(i: int) -> None:
        for p, (a, OUT) in enumerate(zip(args, outs)):  # this share's groups of each weight
            g0, g1 = max(bounds[i], starts[p]) - starts[p], min(bounds[i + 1], starts[p + 1]) - starts[p]
            if g0 >= g1:
                continue
            whole = T - T % step if once is not None and tiles[p].sc.dtype == np.uint8 and T >= 2 * step else 0
            if whole:
                once(*a, g0, g1, XQ[:whole], XSUM[:whole], XS[:whole], OUT[:whole], 0)
            if whole < T:
                fn(*a, g0, g1, XQ[whole:], XSUM[whole:], XS[whole:], OUT[whole:], 0)

    if threads == 1 or pool is None:
        for i in range(threads):
            work(i)
    else:
        in_parallel(pool, work, range(threads))
    return outs
