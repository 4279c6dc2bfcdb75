"""Explicit-SIMD pieces for the NF4 kernels, written as LLVM IR through Numba intrinsics.

Numba has no vector types, and LLVM turns a 16-entry table lookup into a memory gather at best.
x86-64 has a register-to-register lookup instead: ``vpermps`` picks 16 (AVX-512) or 8 (AVX2)
floats out of a register by index, so one instruction decodes 16 NF4 codes into their float
values. (The same idea as llama.cpp's ``vpshufb`` decoding of IQ4_NL's 16-value grid, on float
lanes here so the product stays exact float32 arithmetic.) Per block the 16-entry table is first
multiplied by the block's scale, so a lookup yields the dequantized weight ``code[c] * scale``,
rounded exactly as ``NF4Tensor.dequantize`` rounds it. The block scale itself is formed in the
loop from the double-quantized bytes by a call to ``storage.block_scale``, the format's one
definition of ``dyn[qscale[b]] * nested[b >> nshift] + offset``, which LLVM inlines (scalar work
beside the vector lookups: a separate pass writing float scales had cost a fifth of the kernel's
time).

``nf4_tile_dot(code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row,
j0, n_blocks, half, v0, n_vec, nvec, isa)`` multiplies a tile of the weight by a group of
vectors: rows ``r0 .. r1`` of a matrix of ``per_row`` blocks of ``half`` packed bytes (the
block scales of ``packed``'s block i are those of the tensor's block ``b0 + i``),
blocks ``j0 .. j0 + n_blocks`` of each,
with vectors ``v0 .. v0 + nvec`` of ``n_vec`` (x interleaved in ``xi``, see :func:`_tile_codegen`).
For row r and vector v it keeps two accumulators (high nibbles times even x entries, low nibbles
times odd ones), ``acc_h += W[r, 2i] * x[2i]``, ``acc_l += W[r, 2i+1] * x[2i+1]`` by FMA, a
``width``-byte chunk at a time in column order; they wait in ``acc`` between calls (a store and a
load: exact), and :func:`acc_reduce` gives the row's result, ``hsum(acc_h + acc_l)``.

Batched decode (several sequences sharing the weight, as Punica's BGMV or llama.cpp's ``mul_mat``
with more than one column in ``src1``) is this kernel with ``nvec > 1``: each chunk of weight bytes
is loaded and decoded once per group and FMA'd into every vector's accumulators, and each x
value loaded once serves several rows. A row and vector see the same operations in the same
order whatever the tile's shape, so a vector's result is bit for bit the same alone or in a batch;
the tests check it. ``nvec`` is a compile-time literal so the IR is unrolled over rows and vectors
with every accumulator in a register. ``isa`` (a literal too) picks the lookup: AVX-512 as above,
AVX2 with two 8-entry lookups and a blend, and on aarch64 NEON ``tbl`` byte lookups of the scaled
table held as four byte planes (the same idea as llama.cpp's ``tbl`` decoding of IQ4_NL on ARM,
again on the float's bytes so the product stays exact; see :func:`_decoder`). Callers select a
variant with :data:`SIMD` (from the host CPU) and keep the portable loop for everything else
(older x86, other CPUs); the tests prove every available variant equal to the NumPy reference,
and ``scripts/arm64_proof.sh`` runs them on aarch64.

:func:`i8_rows_dot` is the int8 product path's kernel (``runtime/int8.py``): NF4 codes as int8
looked up by ``vpshufb``, int8 activations, int32 sums by ``vpdpbusd`` (VNNI) or ``vpmaddubsw`` and
``vpmaddwd`` (AVX2), :data:`INT8_AVAILABLE` the variants this CPU runs.

The NF4 kernels prefetch (``llvm.prefetch``) the bytes one row tile ahead (the int8 ones
:data:`INT8_PREFETCH_TILES` tiles ahead), and
``f16_rows_dot`` (the float16 head and embeddings, plain LLVM vector IR for any CPU) does the
same four rows at a time: the weights are mapped from the page cache in 4 KB pages, where the
hardware prefetchers stop, so without it each row tile waited on memory (bench/README.md).

Numba's on-disk cache cannot see what these intrinsics generate, so edgelora keys its kernel
folder by the text of every source (``edgelora/kernel_cache.py``): an edit here compiles the
kernels again.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgelora.storage import block_scale

_FEATURES = llvm.get_host_cpu_features()
_HOST_CPU = llvm.get_host_cpu_name()  # LLVM's name of this CPU ("znver5", "emeraldrapids", ...)
_AARCH64 = llvm.get_process_triple().startswith(("aarch64", "arm64"))
if _AARCH64:
    SIMD = "neon"  # Advanced SIMD is part of every aarch64 CPU
elif _FEATURES.get("avx512f"):
    SIMD = "avx512"
else:
    SIMD = "avx2" if _FEATURES.get("avx2") and _FEATURES.get("fma") else None
#: the SIMD kernels this CPU runs (the best is ``SIMD``), by the code ``nf4_tile_dot`` takes as ``isa``
ISAS = {"avx512": 0, "avx2": 1, "neon": 2}
AVAILABLE = {"neon"} if _AARCH64 else {"avx512", "avx2"} if SIMD == "avx512" else {"avx2"} if SIMD else set()
WIDTH = {"avx512": 16, "avx2": 8, "neon": 16}  # floats a step decodes per nibble

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_I64 = ir.IntType(64)

MAX_VECTORS = 4  # vectors one tile call takes; larger batches are split into groups
#: vectors one int8 call takes on x86-64 (``i8_rows_dot``, ``int8._i8_rows_simd``): a speculative
#: step's last token and its four guesses in one pass (a 5632 x 2048 weight by 5 vectors cost 1.12
#: (avx2) and 1.19-1.26 (vnni) of 4 vectors' time, against 1.40-1.54 and 1.34-1.39 as 4 + 1, on the
#: AVX-512 machine, ``bench/README.md``); aarch64's variants keep groups of ``MAX_VECTORS``
INT8_MAX_VECTORS = 5
# rows a tile decodes side by side, by vector count: each x chunk loaded once serves them all,
# within the register file (AVX-512: 32 registers, 2 accumulators a row and vector; AVX2: 16;
# NEON: 32 of 4 floats, a 16-float accumulator taking 4 of them)
TILE_ROWS = {"avx512": {1: 4, 2: 4, 3: 3, 4: 2}, "avx2": {1: 2, 2: 1, 3: 1, 4: 1}, "neon": {1: 1, 2: 1, 3: 1, 4: 1}}


def _hsum(builder, v, width):
    """Pairwise horizontal sum of a float vector (log2(width) shuffles and adds)."""
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _prefetch(builder, ptr):
    """``llvm.prefetch`` of the cache line at ``ptr`` (read, keep in all levels; never faults):
    ``prefetcht0`` on x86-64, ``prfm pldl1keep`` on aarch64."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, _I8.as_pointer()), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _scale_call(typingctx, dyn, qscale, nested):
    """:func:`edgelora.storage.block_scale` compiled for these arrays: ``(function type, signature)``
    for :func:`_block_scale`. The shift and the block numbers are passed unsigned (they are never
    negative), so Numba adds no negative-index wraparound to the loads."""
    fnty = typingctx.resolve_value_type(block_scale)
    return fnty, typingctx.resolve_function_type(fnty, (dyn, qscale, nested, types.uint64, types.float32,
                                                        types.uint64), {})


def _block_scale(context, builder, call, dyn, qscale, nested, nshift, offset, b0):
    """``scale(b)``: block b's absmax (counted from ``b0``: ``B = b0 + b``), a call of
    ``storage.block_scale`` (``call`` from :func:`_scale_call`; ``dyn``, ``qscale``, ``nested`` the
    arrays) that LLVM inlines. It is compiled on its own without fastmath, so its product and sum
    carry no ``contract`` flag and are never fused into an FMA, though this IR lands in kernels
    compiled for fastmath callers such as ``_nf4_matvec_rows`` (the tests check every scale bit
    for bit)."""
    impl = context.get_function(*call)

    def scale(b):
        return impl(builder, (dyn, qscale, nested, nshift, offset, builder.add(b0, b)))

    return scale


def _decoder(builder, isa, code_p):
    """``(prepare, decode)`` for one ISA: ``prepare(scale)`` is the 16-value table times a block's
    scale, in the form ``decode(table, bytes_ptr)`` looks codes up in; ``decode`` turns the next
    ``WIDTH[isa]`` bytes into the float weights of their high and low nibbles.

    * avx512: one ``vpermps`` of a 16-float register per nibble (indices zero-extended bytes);
    * avx2: two 8-float ``vpermps`` and a blend on the index's bit 3;
    * neon: ``tbl`` looks bytes up in one 16-byte register, so the scaled table is kept as four
      byte planes (byte k of each float); four ``tbl`` give the planes of 16 weights, which a
      byte interleave (``zip``) turns into their floats. Exact: the bytes of ``code[c] * scale``."""
    width = WIDTH[isa]
    vf, vi, vb = ir.VectorType(_F32, width), ir.VectorType(_I32, width), ir.VectorType(_I8, width)
    mod = builder.module
    table = [builder.load(builder.bitcast(builder.gep(code_p, [ir.Constant(_I64, t)]), vf.as_pointer()), align=4)
             for t in range(0, 16, width)]

    def splat(x):
        v = builder.insert_element(ir.Constant(vf, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(vi, [0] * width))

    def load_bytes(ptr):
        return builder.load(builder.bitcast(ptr, vb.as_pointer()), align=1)

    if isa == "neon":
        v64 = ir.VectorType(_I8, 64)
        tbl = cgutils.get_or_insert_function(mod, ir.FunctionType(vb, [vb, vb]), "llvm.aarch64.neon.tbl1.v16i8")
        undef64 = ir.Constant(v64, ir.Undefined)
        mask = lambda m: ir.Constant(ir.VectorType(_I32, len(m)), m)

        def prepare(scale):
            raw = builder.bitcast(builder.fmul(table[0], splat(scale)), v64)  # [16 floats x 4 bytes]
            return [builder.shuffle_vector(raw, undef64, mask([4 * i + k for i in range(16)])) for k in range(4)]

        def decode(planes, ptr):
            w = load_bytes(ptr)
            out = []
            for idx in (builder.lshr(w, ir.Constant(vb, [4] * 16)), builder.and_(w, ir.Constant(vb, [15] * 16))):
                p = [builder.call(tbl, [plane, idx]) for plane in planes]
                lo, hi = (builder.shuffle_vector(p[a], p[a + 1], mask(list(range(32)))) for a in (0, 2))
                cat = builder.shuffle_vector(lo, hi, mask(list(range(64))))  # the four planes
                floats = builder.shuffle_vector(cat, undef64, mask([16 * (b % 4) + b // 4 for b in range(64)]))
                out.append(builder.bitcast(floats, vf))
            return out

        return prepare, decode

    name = "llvm.x86.avx512.permvar.sf.512" if isa == "avx512" else "llvm.x86.avx2.permps"
    perm = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vi]), name)
    four, fifteen, eight = (ir.Constant(vi, [c] * width) for c in (4, 15, 8))
    zero_i = ir.Constant(vi, [0] * width)

    def prepare(scale):
        sv = splat(scale)
        return [builder.fmul(t, sv) for t in table]

    def lookup(tab, idx):
        if isa == "avx512":
            return builder.call(perm, [tab[0], idx])
        lo, hi = builder.call(perm, [tab[0], idx]), builder.call(perm, [tab[1], idx])
        return builder.select(builder.icmp_unsigned("!=", builder.and_(idx, eight), zero_i), hi, lo)

    def decode(tab, ptr):
        w = builder.zext(load_bytes(ptr), vi)
        return lookup(tab, builder.lshr(w, four)), lookup(tab, builder.and_(w, fifteen))

    return prepare, decode


def _emit_tile(builder, isa, code_p, rows, xload, n_blocks, half, row_bytes, scale):
    """IR for ``n_blocks`` blocks of ``len(rows)`` rows with every vector.

    ``rows``: per row ``(bytes, block, accs)``: ``i8*`` to its first byte, the index of its first
    block (``scale(block)`` forms that block's scale), and per vector the allocas ``[acc_h, acc_l]``.
    ``xload(v, nibble, at)`` loads vector v's x entries for the high (0: even entries) or low (1:
    odd) nibbles of the bytes ``at .. at + width`` of the tile. ``code_p``: the 16 NF4 values."""
    width = WIDTH[isa]
    vf = ir.VectorType(_F32, width)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32")
    prepare, decode = _decoder(builder, isa, code_p)
    n_vec = len(rows[0][2])

    with cgutils.for_range(builder, n_blocks) as blk:
        j = blk.index
        scaled = [prepare(scale(builder.add(first, j))) for _, first, _ in rows]  # per row: table x scale
        start = builder.mul(j, half)
        # the same bytes of the next tile's rows: the hardware prefetchers stop at 4 KB pages (the
        # weights are memory-mapped from the page cache, no huge pages), so without this each row
        # tile waits on memory; with it, 1.5-1.6x (bench/README.md)
        ahead = builder.add(start, builder.mul(row_bytes, ir.Constant(_I64, len(rows))))
        for p_base, _, _ in rows:
            _prefetch(builder, builder.gep(p_base, [ahead]))
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), half, ir.Constant(_I64, width)) as (i, _):
            at = builder.add(start, i)
            xs = [[xload(v, nib, at) for nib in (0, 1)] for v in range(n_vec)]  # shared by the rows
            for (p_base, _, accs), tab in zip(rows, scaled):
                ws = decode(tab, builder.gep(p_base, [at]))
                for v in range(n_vec):
                    for nib in (0, 1):
                        a = accs[v][nib]
                        builder.store(builder.call(fma, [ws[nib], xs[v][nib], builder.load(a)]), a)


def _tile_codegen(isa: str, nvec: int, call):
    """``xi`` holds x interleaved as [in/2/width, n_vec, 2, width]: for each chunk of ``width``
    bytes, each vector's even then odd entries side by side, so one pointer serves all vectors.
    Row r's accumulators for vector v: ``acc[((r - r0) * n_vec + v) * 2 * width:]``, acc_h then
    acc_l. Rows go ``TILE_ROWS[isa][nvec]`` at a time, the rest one at a time."""
    width = WIDTH[isa]
    tile_rows = TILE_ROWS[isa][nvec]
    vf = ir.VectorType(_F32, width)
    vp = vf.as_pointer()

    def codegen(context, builder, sig, args):
        code_p, packed_p, xi_p, acc_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                         for i in (0, 2, 5, 6))
        nshift, offset, b0, r0, r1, per_row, j0, n_blocks, half, v0, n_vec = args[7:18]
        c = lambda n: ir.Constant(_I64, n)

        scale = _block_scale(context, builder, call, args[1], args[3], args[4], nshift, offset, b0)

        # x of column j0 * half, vector v0; chunk q of the tile is n_vec * 2 * width floats further
        x_base = builder.gep(xi_p, [builder.mul(builder.add(builder.mul(builder.udiv(builder.mul(j0, half), c(width)),
                                                                          n_vec), v0), c(2 * width))])
        chunk_stride = builder.mul(n_vec, c(2 * width))

        def xload(v, nib, at):
            q = builder.udiv(at, c(width))
            off = builder.add(builder.mul(q, chunk_stride), c((2 * v + nib) * width))
            return builder.load(builder.bitcast(builder.gep(x_base, [off]), vp), align=4)

        def run_rows(first_row, count):
            """IR for rows ``first_row .. first_row + count`` (``count`` a Python int)."""
            rows, stores = [], []
            for k in range(count):
                r = builder.add(first_row, c(k))
                blk = builder.add(builder.mul(r, per_row), j0)
                p_base = builder.gep(packed_p, [builder.mul(blk, half)])
                a_row = builder.mul(builder.add(builder.mul(builder.sub(r, r0), n_vec), v0), c(2 * width))
                accs = []
                for v in range(nvec):
                    pair = []
                    for nib in (0, 1):
                        ptr = builder.bitcast(builder.gep(acc_p, [builder.add(a_row, c((2 * v + nib) * width))]), vp)
                        pair.append(cgutils.alloca_once_value(builder, builder.load(ptr, align=4)))
                        stores.append((pair[-1], ptr))
                    accs.append(pair)
                rows.append((p_base, blk, accs))
            _emit_tile(builder, isa, code_p, rows, xload, n_blocks, half, builder.mul(per_row, half), scale)
            for a, ptr in stores:
                builder.store(builder.load(a), ptr, align=4)

        n_rows = builder.sub(r1, r0)
        tiled = builder.mul(builder.udiv(n_rows, c(tile_rows)), c(tile_rows))
        with cgutils.for_range_slice(builder, r0, builder.add(r0, tiled), c(tile_rows)) as (r, _):
            run_rows(r, tile_rows)
        if tile_rows > 1:
            with cgutils.for_range_slice(builder, builder.add(r0, tiled), r1, c(1)) as (r, _):
                run_rows(r, 1)
        return context.get_dummy_value()

    return codegen


def _tile_signature(code, dyn, packed, qscale, nested, xi, acc, nvec, isa):
    if not (isinstance(nvec, types.IntegerLiteral) and 1 <= nvec.literal_value <= MAX_VECTORS):
        return None
    if not (isinstance(isa, types.IntegerLiteral) and isa.literal_value in ISAS.values()):
        return None
    arrays = (code, dyn, packed, qscale, nested, xi, acc)
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
        return None
    if packed.dtype != types.uint8 or qscale.dtype != types.uint8:
        return None
    if any(a.dtype != types.float32 for a in (code, dyn, nested, xi, acc)) or not acc.mutable:
        return None
    i64 = types.int64
    return types.none(code, dyn, packed, qscale, nested, xi, acc, i64, types.float32, i64, i64, i64, i64, i64, i64,
                      i64, i64, i64, nvec, isa)


@intrinsic
def nf4_tile_dot(typingctx, code, dyn, packed, qscale, nested, xi, acc, nshift, offset, b0, r0, r1, per_row, j0,
                 n_blocks, half, v0, n_vec, nvec, isa):
    """The tile kernel for ``isa`` (a literal code of :data:`ISAS`), ``nvec`` vectors (a literal)."""
    sig = _tile_signature(code, dyn, packed, qscale, nested, xi, acc, nvec, isa)
    if sig is None:
        return None
    name = {v: k for k, v in ISAS.items()}[isa.literal_value]
    return sig, _tile_codegen(name, nvec.literal_value, _scale_call(typingctx, dyn, qscale, nested))


@intrinsic
def nf4_dequant_blocks(typingctx, code, dyn, packed, qscale, nested, buf, nshift, offset, b0, n_blocks, half, isa):
    """``buf`` = the float32 weights of ``n_blocks`` whole blocks of ``2 * half`` weights (their
    bytes ``packed``, block i having the scale of the tensor's block ``b0 + i``), each exactly
    ``code[c] * scale`` as ``NF4Tensor.dequantize`` gives it: the decode kernel's lookups
    (:func:`_decoder`), the high and low nibbles' weights interleaved back into column order. The
    prefill's dequantized tiles (``runtime/kernels.py``); ``isa`` a literal code of :data:`ISAS`."""
    arrays = (code, dyn, packed, qscale, nested, buf)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)
            and packed.dtype == types.uint8 and qscale.dtype == types.uint8 and buf.mutable
            and all(a.dtype == types.float32 for a in (code, dyn, nested, buf))
            and isinstance(isa, types.IntegerLiteral) and isa.literal_value in ISAS.values()):
        return None
    name = {v: k for k, v in ISAS.items()}[isa.literal_value]
    call = _scale_call(typingctx, dyn, qscale, nested)
    width = WIDTH[name]
    vf2 = ir.VectorType(_F32, 2 * width)
    interleave = ir.Constant(ir.VectorType(_I32, 2 * width), [m // 2 + (m % 2) * width for m in range(2 * width)])

    def codegen(context, builder, sig, args):
        code_p, packed_p, buf_p = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 2, 5))
        nshift, offset, b0, n_blocks, half = args[6:11]
        scale = _block_scale(context, builder, call, args[1], args[3], args[4], nshift, offset, b0)
        prepare, decode = _decoder(builder, name, code_p)
        with cgutils.for_range(builder, n_blocks) as blk:
            tab = prepare(scale(blk.index))
            start = builder.mul(blk.index, half)
            with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), half, ir.Constant(_I64, width)) as (i, _):
                at = builder.add(start, i)
                hi, lo = decode(tab, builder.gep(packed_p, [at]))
                dst = builder.bitcast(builder.gep(buf_p, [builder.mul(at, ir.Constant(_I64, 2))]), vf2.as_pointer())
                builder.store(builder.shuffle_vector(hi, lo, interleave), dst, align=4)
        return context.get_dummy_value()

    i64 = types.int64
    return types.none(code, dyn, packed, qscale, nested, buf, i64, types.float32, i64, i64, i64, isa), codegen


@intrinsic
def acc_reduce(typingctx, acc, i, width):
    """``hsum(acc_h + acc_l)`` for the accumulators at ``acc[i * 2 * width:]`` (``width`` a
    literal 16 or 8): a row's result for one vector."""
    if not (isinstance(acc, types.Array) and acc.ndim == 1 and acc.layout == "C" and acc.dtype == types.float32
            and isinstance(width, types.IntegerLiteral) and width.literal_value in (8, 16)):
        return None
    n = width.literal_value

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        at = builder.mul(args[1], ir.Constant(_I64, 2 * n))
        vp = ir.VectorType(_F32, n).as_pointer()
        h, lo = (builder.load(builder.bitcast(builder.gep(data, [builder.add(at, ir.Constant(_I64, k * n))]), vp),
                              align=4) for k in (0, 1))
        return _hsum(builder, builder.fadd(h, lo), n)

    return types.float32(acc, types.int64, width), codegen


@intrinsic
def prefetch(typingctx, arr, i):
    """Hint the CPU to fetch ``arr[i]``'s cache line (LLVM ``llvm.prefetch``, read, keep in all
    levels); no fault past the end. On x86-64 ``prefetcht0``, on aarch64 ``prfm pldl1keep``."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        _prefetch(builder, builder.gep(data, [args[1]]))
        return context.get_dummy_value()

    return types.none(arr, types.int64), codegen


F16_ROWS = 4  # rows the float16 kernel dots side by side (each x chunk loaded once for all)
F16_CHUNK = 32  # halfs a step reads of each row: one 64-byte cache line


@intrinsic
def f16_rows_dot(typingctx, bits, x, out, r0, r1, k):
    """``out[r] = W[r] . x`` for rows ``r0 .. r1`` of a float16 matrix ``W [*, k]`` held as its
    bits (uint16, row-major), ``k`` a multiple of :data:`F16_CHUNK`: ``F16_ROWS`` rows at a time,
    then one at a time, each row with two ``F16_CHUNK / 2``-float accumulators (even and odd
    chunks), widened by ``fpext half`` (F16C ``vcvtph2ps`` on x86-64, ``fcvtl`` on aarch64) and FMA'd
    with x; the next row tile's line is prefetched. A row's result, ``hsum(acc_even + acc_odd)``,
    does not depend on the rows around it, so a row alone gives the same bits as in a tile. Plain
    LLVM vector IR: no target intrinsic, any CPU."""
    ok = (isinstance(bits, types.Array) and bits.dtype == types.uint16 and isinstance(x, types.Array)
          and isinstance(out, types.Array) and x.dtype == types.float32 and out.dtype == types.float32
          and all(a.ndim == 1 and a.layout == "C" for a in (bits, x, out)) and out.mutable)
    if not ok:
        return None
    w = F16_CHUNK // 2
    vf, vh, vi16 = ir.VectorType(_F32, w), ir.VectorType(ir.HalfType(), w), ir.VectorType(ir.IntType(16), w)

    def codegen(context, builder, sig, args):
        bits_p, x_p, out_p = (context.make_array(t)(context, builder, a).data for t, a in zip(sig.args[:3], args[:3]))
        r0, r1, k = args[3:]
        c = lambda n: ir.Constant(_I64, n)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{w}f32")
        zero = ir.Constant(vf, [0.0] * w)

        def run_rows(first, count):
            rows = [builder.gep(bits_p, [builder.mul(builder.add(first, c(i)), k)]) for i in range(count)]
            ahead = builder.mul(k, c(count))  # the next tile's rows
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(count)]
            with cgutils.for_range_slice(builder, c(0), k, c(F16_CHUNK)) as (at, _):
                for row in rows:
                    _prefetch(builder, builder.gep(row, [builder.add(at, ahead)]))
                for half_i in range(2):
                    off = builder.add(at, c(half_i * w))
                    xv = builder.load(builder.bitcast(builder.gep(x_p, [off]), vf.as_pointer()), align=4)
                    for row, acc in zip(rows, accs):
                        h = builder.load(builder.bitcast(builder.gep(row, [off]), vi16.as_pointer()), align=2)
                        wv = builder.fpext(builder.bitcast(h, vh), vf)
                        builder.store(builder.call(fma, [wv, xv, builder.load(acc[half_i])]), acc[half_i])
            for i, acc in enumerate(accs):
                total = _hsum(builder, builder.fadd(builder.load(acc[0]), builder.load(acc[1])), w)
                builder.store(total, builder.gep(out_p, [builder.add(first, c(i))]))

        n = builder.sub(r1, r0)
        tiled = builder.mul(builder.udiv(n, c(F16_ROWS)), c(F16_ROWS))
        with cgutils.for_range_slice(builder, r0, builder.add(r0, tiled), c(F16_ROWS)) as (r, _):
            run_rows(r, F16_ROWS)
        with cgutils.for_range_slice(builder, builder.add(r0, tiled), r1, c(1)) as (r, _):
            run_rows(r, 1)
        return context.get_dummy_value()

    i64 = types.int64
    return types.none(bits, x, out, i64, i64, i64), codegen


# ---------------------------------------------------------------------------------------------
# The int8 product path (``runtime/int8.py``): NF4 codes as int8, activations as int8, int32 sums
# ---------------------------------------------------------------------------------------------

def _aarch64_extensions() -> set[str]:
    """The int8 extensions of this aarch64 CPU, of ``{"dotprod", "i8mm"}``, as its kernel reports
    them: on Linux the auxiliary vector (``getauxval``: ``AT_HWCAP`` bit 20 ``asimddp``,
    ``AT_HWCAP2`` bit 13 ``i8mm``, the bits /proc/cpuinfo's Features line prints; under qemu-user,
    those of the emulated CPU), on macOS ``sysctl hw.optional.arm.FEAT_DotProd`` / ``FEAT_I8MM``;
    none elsewhere. (LLVM's host features are not used: under qemu-user they are the host's.)"""
    import ctypes
    import sys

    found = set()
    try:
        if sys.platform.startswith("linux"):
            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
            hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
            found |= {"dotprod"} if hwcap & (1 << 20) else set()
            found |= {"i8mm"} if hwcap2 & (1 << 13) else set()
        elif sys.platform == "darwin":
            libc = ctypes.CDLL(None)
            for name, feature in ((b"hw.optional.arm.FEAT_DotProd", "dotprod"), (b"hw.optional.arm.FEAT_I8MM", "i8mm")):
                value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
                if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0 \
                        and value.value:
                    found.add(feature)
    except (OSError, AttributeError):  # no libc symbol: the baseline kernels
        pass
    return found


#: the int8 kernels ``i8_rows_dot`` has, by the code it takes as ``isa``: ``vnni`` is ``vpdpbusd``
#: on 256-bit registers (AVX-512 VNNI with VL, or AVX-VNNI), ``avx2`` the same sums through
#: ``vpmaddubsw`` and ``vpmaddwd``; on aarch64 ``sdot`` (ARMv8.2 dotprod), ``smmla`` (i8mm: 2 rows
#: by 2 vectors a step, for batches) and ``neon`` (baseline Advanced SIMD: widening multiplies and
#: adds); all look the codes up by byte shuffles (``vpshufb``, ``tbl``)
INT8_ISAS = {"vnni": 0, "avx2": 1, "sdot": 2, "neon": 3, "smmla": 4}
if _AARCH64:
    AARCH64_EXTENSIONS = _aarch64_extensions()
    INT8_AVAILABLE = {"neon"} | ({"sdot"} if "dotprod" in AARCH64_EXTENSIONS else set()) | (
        {"smmla"} if {"dotprod", "i8mm"} <= AARCH64_EXTENSIONS else set())
    # sdot and smmla are written as inline assembly (with ``.arch_extension``), so they compile
    # whatever CPU Numba targets (``NUMBA_CPU_NAME=generic`` included); that needs the asm parser
    llvm.initialize_native_asmparser()
else:
    AARCH64_EXTENSIONS = set()
    INT8_AVAILABLE = set() if not _FEATURES.get("avx2") else {"avx2"} | (
        {"vnni"} if _FEATURES.get("avxvnni") or (_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl")) else set())
#: the variant products use: the first this CPU runs (smmla serves batches; one vector goes to sdot)
INT8_SIMD = next((isa for isa in ("vnni", "avx2", "smmla", "sdot", "neon") if isa in INT8_AVAILABLE), None)
INT8_CHUNK = 32  # bytes of a row a step reads (one 256-bit register: 32 high and 32 low nibbles)
INT8_LANES = 8  # int32 lanes of a step; lane l sums the products of bytes 4l .. 4l + 3 of each chunk
INT8_TILE_ROWS = 2  # rows a step takes side by side (they share each x load; 1.2x for 4 vectors)
#: the vnni kernel's rows side by side, by vector count: its codes need no sign step, so one
#: vector's x loads and offsets serve four rows within the registers
INT8_VNNI_TILE_ROWS = {1: 4}
#: the avx2 kernel's rows side by side for two or more vectors: one. Two rows share each vector's
#: four x loads, but from two vectors on those shared values outgrow the 16 registers and spill;
#: with one row a pass each x load is used once, straight from memory (two to five vectors 9-15 %
#: faster on the Zen 3 machine, ``bench/README.md``; two rows again once the codes needed no sign
#: step: 4-5 vectors 10 % slower)
INT8_AVX2_BATCH_TILE_ROWS = 1
#: the avx2 kernel's rows side by side for one vector of NF4 codes (4 rows: 5 % slower there)
INT8_AVX2_TILE_ROWS = 2
# row tiles ahead whose bytes a step prefetches: one tile ahead (2 KB of a 2048-wide row pair) left
# the loads waiting on memory; 8 (16 rows) made a TinyLlama decode step's layers 8-15 % faster on
# 2 threads here (bench/README.md), farther gained nothing more
INT8_PREFETCH_TILES = 8
#: what the avx2 kernels (decode here, the prefill GEMM in ``int8_gemm``) add to NF4's int8 codes
#: (``int8.NF4_I8``, -64 .. 64) to multiply them as unsigned bytes (0 .. 128) by ``vpmaddubsw`` with
#: no sign step
AVX2_CODE_OFFSET = 64


_V32, _V16, _V8I, _V4I = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16), ir.VectorType(_I32, 8), ir.VectorType(_I32, 4)


def _join(builder, a, b):
    """Two vectors of n elements -> one of 2n (a's, then b's)."""
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _halves(builder, v):
    """A vector of 2n elements -> its two halves of n."""
    n = v.type.count // 2
    return [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(h * n, h * n + n))))
            for h in (0, 1)]


def _neon_asm(builder, mnemonic, extension, acc, a, b):
    """``mnemonic acc.4s, a.16b, b.16b`` (``sdot``, ``smmla``) as inline assembly, with the
    ``.arch_extension`` that lets the assembler take it whatever CPU Numba compiles for (the
    intrinsics would abort LLVM where its target lacks the feature, as ``NUMBA_CPU_NAME=generic``
    does); the caller checked that the CPU has it (:data:`INT8_AVAILABLE`)."""
    return builder.asm(ir.FunctionType(_V4I, [_V4I, _V16, _V16]),
                       f".arch_extension {extension}\n\t{mnemonic} $0.4s, $2.16b, $3.16b", "=w,0,w,w", [acc, a, b],
                       False)


def _maddubs_lanes(builder):
    """``lanes(u, s)``: the 8 int32 lanes of 32 unsigned bytes ``u`` times 32 signed bytes ``s``, lane l
    the sum of products ``4l .. 4l + 3``: ``vpmaddubsw`` (adjacent products summed to int16, which
    saturates above 32767: the callers keep each pair under it) then ``vpmaddwd`` by ones."""
    mod = builder.module
    v16i = ir.VectorType(ir.IntType(16), 16)
    maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [_V32, _V32]), "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(mod, ir.FunctionType(_V8I, [v16i, v16i]), "llvm.x86.avx2.pmadd.wd")
    ones = ir.Constant(v16i, [1] * 16)
    return lambda u, sgn: builder.call(maddwd, [builder.call(maddubs, [u, sgn]), ones])


def _i8_lookup(builder, isa, table_p):
    """``lookup(idx)``: the int8 codes ``table[idx]`` of 32 nibbles (bytes 0 .. 15): ``vpshufb`` of
    the 16-byte table held twice in a 256-bit register on x86-64, two ``tbl`` on aarch64; for
    ``vnni`` the codes plus 128, for ``avx2u`` plus 64, as unsigned bytes (:func:`_i8_dot`)."""
    t16 = builder.load(builder.bitcast(table_p, _V16.as_pointer()), align=1)
    if isa == "vnni":  # the codes plus 128 (their sign bit flipped): 1 .. 255, vpdpbusd's unsigned operand
        t16 = builder.xor(t16, ir.Constant(_V16, [0x80] * 16))
    if isa == "avx2u":  # the 7-bit codes plus 64: 0 .. 128, vpmaddubsw's unsigned operand
        t16 = builder.add(t16, ir.Constant(_V16, [AVX2_CODE_OFFSET] * 16))
    if isa in ("vnni", "avx2", "avx2u"):
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32, [_V32, _V32]),
                                                "llvm.x86.avx2.pshuf.b")
        table = builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
        return lambda idx: builder.call(pshufb, [table, idx])
    tbl = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16]),
                                         "llvm.aarch64.neon.tbl1.v16i8")
    return lambda idx: _join(builder, *(builder.call(tbl, [t16, h]) for h in _halves(builder, idx)))


def _i8_dot(builder, isa):
    """``dot(acc, w, q, a)``: the 8 int32 lanes ``acc[l] + sum_{i<4} w[4l+i] * q[4l+i]`` of 32 int8
    codes ``w`` and activations ``q`` (``a = |q|`` as uint8, which the avx2 kernel uses); for
    ``vnni``, ``w`` are the codes plus 128 and the sum carries ``128 * sum q`` more; for ``avx2u``
    (NF4's 7-bit codes on AVX2), the codes plus 64 and ``64 * sum q`` more."""
    mod = builder.module
    fn = lambda name, ret, params: cgutils.get_or_insert_function(mod, ir.FunctionType(ret, params), name)
    if isa == "avx2u":
        lanes = _maddubs_lanes(builder)
        # (w + 64) . x: unsigned 0 .. 128 times signed x (|x| <= 127), pairs at most 2 * 128 * 127 = 32512:
        # under vpmaddubsw's int16 saturation; the caller starts the lanes at -64 * (their sum of x)
        return lambda acc, w, q, a: builder.add(acc, lanes(w, q))
    if isa in ("vnni", "avx2"):
        psign = fn("llvm.x86.avx2.psign.b", _V32, [_V32, _V32])
        if isa == "vnni":
            dpbusd = fn("llvm.x86.avx512.vpdpbusd.256", _V8I, [_V8I, _V8I, _V8I])
            # (w + 128) . x: vpdpbusd multiplies unsigned by signed bytes; the caller starts the
            # lanes at -128 * (their sum of x) (:func:`_i8_offsets`), so the sum is w . x exactly
            return lambda acc, w, q, a: builder.call(dpbusd, [acc, builder.bitcast(w, _V8I), builder.bitcast(q, _V8I)])
        lanes = _maddubs_lanes(builder)
        # pairs at most 2 * 127 * 127, so vpmaddubsw never saturates
        return lambda acc, w, q, a: builder.add(acc, lanes(a, builder.call(psign, [w, q])))
    if isa == "sdot":
        # sdot: lane l of a 4-lane accumulator += the 4 signed byte products 4l .. 4l + 3 of 16 bytes
        def dot(acc, w, q, a):
            parts = [_neon_asm(builder, "sdot", "dotprod", s, wh, qh)
                     for s, wh, qh in zip(_halves(builder, acc), _halves(builder, w), _halves(builder, q))]
            return _join(builder, *parts)

        return dot
    v32s, v8s = ir.VectorType(ir.IntType(16), 32), ir.VectorType(ir.IntType(16), 8)

    def dot(acc, w, q, a):  # neon: 16-bit products (at most 127 * 127), pairs of them (fit 16 bits), then 32
        p = builder.mul(builder.sext(w, v32s), builder.sext(q, v32s))
        g = [builder.shuffle_vector(p, p, ir.Constant(_V8I, [4 * l + i for l in range(8)])) for i in range(4)]
        pair = lambda x, y: builder.sext(builder.add(x, y), _V8I)
        return builder.add(acc, builder.add(pair(g[0], g[1]), pair(g[2], g[3])))

    return dot


def _i8_frame(context, builder, sig, args, nvec, q8=False):
    """What every int8 kernel variant reads from its arguments: a namespace of the arrays' data
    pointers, the scalars, ``c(n)``, ``load32(p, at)`` and per vector v its x codes ``xq[v]``,
    absolute values ``xa[v]``, scales ``xs[v]`` and output row ``out[v]``; ``row_bytes`` a weight
    row's bytes (``q8``: one a weight, else two weights a byte)."""
    from types import SimpleNamespace

    f = SimpleNamespace()
    table_p, packed_p, xq_p, xa_p, xs_p, out_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                                  for i in (0, 2, 5, 6, 7, 8))
    nshift, offset, b0, f.n_rows, f.per_row, f.half, v0, n_out, o0 = args[9:18]
    f.table_p, f.packed_p = table_p, packed_p
    f.c = c = lambda n: ir.Constant(_I64, n)
    f.k = builder.mul(f.per_row, builder.mul(f.half, c(2)))  # entries of a row of x
    f.row_bytes = builder.mul(f.per_row, builder.mul(f.half, c(2 if q8 else 1)))
    f.load32 = lambda p, at: builder.load(builder.bitcast(builder.gep(p, [at]), _V32.as_pointer()), align=1)
    vs = [builder.add(v0, c(v)) for v in range(nvec)]
    f.xq = [builder.gep(xq_p, [builder.mul(v, f.k)]) for v in vs]
    f.xa = [builder.gep(xa_p, [builder.mul(v, f.k)]) for v in vs]
    f.xs = [builder.gep(xs_p, [builder.mul(v, f.per_row)]) for v in vs]
    f.out = [builder.gep(out_p, [builder.add(builder.mul(v, n_out), o0)]) for v in vs]
    f.block_args = (args[1], args[3], args[4], nshift, offset, b0)
    nested_p = context.make_array(sig.args[4])(context, builder, args[4]).data
    f.q8_scale = lambda b: builder.load(builder.gep(nested_p, [builder.add(b0, b)]))  # q8: the block's own scale
    return f


def _i8_offsets(builder):
    """``offsets(qe, qo)`` for ``vnni``: the 8 int32 lanes ``-128 * sum_{i<4} (qe[4l+i] + qo[4l+i])``
    that cancel what the codes' +128 adds to a chunk's sums (two ``vpdpbusd`` of 128s and x)."""
    dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V8I, _V8I, _V8I]),
                                            "llvm.x86.avx512.vpdpbusd.256")
    k128, zero = builder.bitcast(ir.Constant(_V32, [0x80] * 32), _V8I), ir.Constant(_V8I, [0] * 8)

    def offsets(qe, qo):
        s = builder.call(dpbusd, [zero, k128, builder.bitcast(qe, _V8I)])
        return builder.sub(zero, builder.call(dpbusd, [s, k128, builder.bitcast(qo, _V8I)]))

    return offsets


def _i8_offsets_avx2u(builder):
    """``offsets(qe, qo)`` for ``avx2u``: the 8 int32 lanes ``-64 * sum_{i<4} (qe[4l+i] + qo[4l+i])``
    that cancel what the codes' +64 adds to a chunk's sums (:func:`_maddubs_lanes` of 64s by each
    half: pairs at most ``64 * 254``, no saturation)."""
    lanes = _maddubs_lanes(builder)
    k64, zero = ir.Constant(_V32, [AVX2_CODE_OFFSET] * 32), ir.Constant(_V8I, [0] * 8)
    return lambda qe, qo: builder.sub(zero, builder.add(lanes(k64, qe), lanes(k64, qo)))


def _i8_offset_table(builder, f, nvec):
    """``avx2u``'s offsets (:func:`_i8_offsets_avx2u`) of every chunk of every vector, computed once
    before the rows (so that no row pass spends instructions on them) into a stack buffer, released
    by the returned ``done()``: ``(at(v, j, i), done)``, ``at`` the offsets of vector v's chunk at
    byte ``i`` of block j."""
    c = f.c
    save = builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.PointerType(), []),
                                                       "llvm.stacksave.p0"), [])
    per_block = builder.udiv(f.half, c(INT8_CHUNK))  # chunks of a block
    chunks = builder.mul(f.per_row, per_block)  # of a vector
    buf = builder.alloca(_V8I, size=builder.mul(chunks, c(nvec)))
    offsets = _i8_offsets_avx2u(builder)
    at = lambda v, j, i: builder.gep(buf, [builder.add(builder.mul(c(v), chunks), builder.add(
        builder.mul(j, per_block), builder.udiv(i, c(INT8_CHUNK))))])
    for v in range(nvec):
        with cgutils.for_range(builder, f.per_row) as blk:
            with cgutils.for_range_slice(builder, c(0), f.half, c(INT8_CHUNK)) as (i, _):
                x = builder.add(builder.mul(blk.index, builder.mul(f.half, c(2))), i)  # the chunk's even entries
                qe, qo = f.load32(f.xq[v], x), f.load32(f.xq[v], builder.add(x, f.half))
                builder.store(offsets(qe, qo), at(v, blk.index, i), align=32)

    def done():
        builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType()]),
                                                    "llvm.stackrestore.p0"), [save])

    return at, done


def _for_chunks(builder, f, half, chunk):
    """``chunk(i)`` for the 32-byte chunks ``i`` of a block of ``half`` bytes: unrolled when ``half``
    is a constant (64-weight blocks: one chunk), a loop otherwise."""
    if isinstance(half, ir.Constant):
        for i in range(0, half.constant, INT8_CHUNK):
            chunk(f.c(i))
    else:
        with cgutils.for_range_slice(builder, f.c(0), half, f.c(INT8_CHUNK)) as (i, _):
            chunk(i)


def _for_row_tiles(builder, f, run_rows, tile=INT8_TILE_ROWS):
    """``run_rows(first, count, half)`` over the rows, ``tile`` at a time then one at a time, with
    ``half`` a constant in the common case of one 32-byte chunk a block."""
    c = f.c

    def rows(half):
        tiled = builder.mul(builder.udiv(f.n_rows, c(tile)), c(tile))
        with cgutils.for_range_slice(builder, c(0), tiled, c(tile)) as (r, _):
            run_rows(r, tile, half)
        with cgutils.for_range_slice(builder, tiled, f.n_rows, c(1)) as (r, _):
            run_rows(r, 1, half)

    with builder.if_else(builder.icmp_unsigned("==", f.half, c(INT8_CHUNK))) as (one_chunk, general):
        with one_chunk:
            rows(c(INT8_CHUNK))
        with general:
            rows(f.half)


def _splat(builder, x, n):
    vt = ir.VectorType(x.type, n)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I64, 0)),
                                  ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _i8_codegen(isa: str, nvec: int, call, q8: bool = False):
    """IR of :func:`i8_rows_dot` for ``isa`` (vnni, avx2, sdot, neon) and ``nvec`` vectors. Per row,
    block and vector the chunks' products go into eight int32 lanes (exact, in any order); per
    block those lanes, as floats, times ``xs[j] * scale(j)`` are added to eight float lanes (a
    product, then a sum: no FMA, so the NumPy twin rounds alike); the row's result is the pairwise
    sum of the lanes. ``q8``: the weights are int8 codes, a block's even entries then its odd ones
    (two 32-byte loads instead of one looked up by nibbles), scaled by their own float scales."""
    v8f = ir.VectorType(_F32, 8)

    def codegen(context, builder, sig, args):
        f = _i8_frame(context, builder, sig, args, nvec, q8)
        c = f.c
        unsigned = isa == "avx2" and not q8  # NF4's 7-bit codes on AVX2: as unsigned bytes, codes + 64
        kisa = "avx2u" if unsigned else isa
        lookup, dot = _i8_lookup(builder, kisa, f.table_p), _i8_dot(builder, kisa)
        scale = f.q8_scale if q8 else _block_scale(context, builder, call, *f.block_args)
        flip = ir.Constant(_V32, [0x80] * 32)  # q8 on vnni: the codes plus 128, vpdpbusd's unsigned operand
        four, fifteen = ir.Constant(_V32, [4] * 32), ir.Constant(_V32, [15] * 32)
        x86, vnni = isa in ("vnni", "avx2"), isa == "vnni"
        offsets = _i8_offsets(builder) if vnni else None
        offset_at, offsets_done = _i8_offset_table(builder, f, nvec) if unsigned else (None, None)
        tile = (INT8_VNNI_TILE_ROWS.get(nvec, INT8_TILE_ROWS) if vnni else
                INT8_AVX2_BATCH_TILE_ROWS if isa == "avx2" and nvec > 1 else
                INT8_AVX2_TILE_ROWS if unsigned else INT8_TILE_ROWS)
        accs = [[cgutils.alloca_once(builder, v8f) for _ in range(nvec)] for _ in range(tile)]  # [row][vector]
        sums = [[cgutils.alloca_once(builder, _V8I) for _ in range(nvec)] for _ in range(tile)]

        def run_rows(first, count, half):
            """IR for rows ``first .. first + count`` (``count`` a Python int: they share each x load)
            with blocks of ``half`` bytes (a constant for 64-weight blocks: one chunk a block)."""
            rs = [builder.add(first, c(t)) for t in range(count)]
            p_rows = [builder.gep(f.packed_p, [builder.mul(r, f.row_bytes)]) for r in rs]
            ahead = builder.mul(f.row_bytes, c(count * INT8_PREFETCH_TILES))  # the same bytes of rows ahead
            for t in range(count):
                for a in accs[t]:
                    builder.store(ir.Constant(v8f, [0.0] * 8), a)
            with cgutils.for_range(builder, f.per_row) as blk:
                j = blk.index
                start = builder.mul(j, half)
                wstart = builder.mul(start, c(2)) if q8 else start  # the block's first weight byte
                for t in range(count):
                    _prefetch(builder, builder.gep(p_rows[t], [builder.add(wstart, ahead)]))
                    for s in sums[t]:
                        builder.store(ir.Constant(_V8I, [0] * 8), s)

                def chunk(i):
                    at = builder.add(builder.mul(start, c(2)), i)  # even entries; the odd ones ``half`` on
                    at_o = builder.add(at, half)
                    absolute = x86 and not vnni and not unsigned
                    xs = [[f.load32(xq, at), f.load32(xa, at) if absolute else None, f.load32(xq, at_o),
                           f.load32(xa, at_o) if absolute else None] for xq, xa in zip(f.xq, f.xa)]  # shared by the rows
                    # vnni: each vector's lanes start at -128 * their sum of x (as the block's first chunk
                    # when a block is one chunk, added otherwise), shared by the rows; avx2u: at
                    # -64 * that sum, computed before the rows
                    starts = ([offsets(qe, qo) for qe, _, qo, _ in xs] if vnni else
                              [builder.load(offset_at(v, j, i), align=32) for v in range(nvec)] if unsigned else
                              [None] * nvec)
                    for t in range(count):
                        if q8:  # the even entries' codes and the odd ones', as x holds them
                            wh, wl = f.load32(p_rows[t], at), f.load32(p_rows[t], at_o)
                            if vnni:
                                wh, wl = builder.xor(wh, flip), builder.xor(wl, flip)
                        else:
                            w = f.load32(p_rows[t], builder.add(start, i))
                            wh = lookup(builder.lshr(w, four))  # int8 codes of the high nibbles
                            wl = lookup(builder.and_(w, fifteen))
                        for (qe, ae, qo, ao), s, s0 in zip(xs, sums[t], starts):
                            if s0 is None:
                                s0 = builder.load(s)
                            elif not isinstance(half, ir.Constant):
                                s0 = builder.add(builder.load(s), s0)
                            builder.store(dot(dot(s0, wh, qe, ae), wl, qo, ao), s)

                _for_chunks(builder, f, half, chunk)
                for t in range(count):
                    sw = scale(builder.add(builder.mul(rs[t], f.per_row), j))
                    for xs, s, a in zip(f.xs, sums[t], accs[t]):
                        fv = _splat(builder, builder.fmul(builder.load(builder.gep(xs, [j])), sw), 8)
                        builder.store(builder.fadd(builder.load(a), builder.fmul(builder.sitofp(builder.load(s), v8f),
                                                                                 fv)), a)
            for t in range(count):
                for out, a in zip(f.out, accs[t]):
                    builder.store(_hsum(builder, builder.load(a), 8), builder.gep(out, [rs[t]]))

        _for_row_tiles(builder, f, run_rows, tile)
        if unsigned:
            offsets_done()
        return context.get_dummy_value()

    return codegen


def _i8mm_codegen(nvec: int, call):
    """IR of :func:`i8_rows_dot` for ``smmla`` (i8mm): ``smmla acc, a, b`` adds to a 2 x 2 int32
    block the products of two 8-byte rows of ``a`` with two of ``b``. A row's lane l (module
    ``runtime/int8.py``: the products of bytes 4l .. 4l + 3 of each chunk, both nibbles) is exactly 8
    products, so ``a`` holds lane l's codes of two weight rows (high nibbles, then low) and ``b``
    the matching x entries (even, then odd) of two vectors, and one ``smmla`` gives lane l of the
    four (row, vector) pairs: ``[(r, v), (r, v'), (r', v), (r', v')]``. The float epilogue runs on
    those four lanes as it runs on a row's eight, product then sum, with the pairwise sum of the
    eight lane vectors last: each of the four results is rounded as the twin rounds it. Rows go two
    at a time and vectors in pairs; an odd last row or vector is paired with itself (it computes
    and writes the same value twice)."""
    v4f, v64 = ir.VectorType(_F32, 4), ir.VectorType(_I8, 64)
    pairs = [(v, min(v + 1, nvec - 1)) for v in range(0, nvec, 2)]
    # 4-byte groups of a and b interleaved: [a0..3, b0..3, a4..7, b4..7, ...]: lane l is bytes 8l .. 8l + 7
    interleave = ir.Constant(ir.VectorType(_I32, 64), [32 * ((i // 4) % 2) + 4 * (i // 8) + i % 4 for i in range(64)])
    lane_masks = [ir.Constant(ir.VectorType(_I32, 16), list(range(8 * l, 8 * l + 8)) + list(range(64 + 8 * l, 72 + 8 * l)))
                  for l in range(INT8_LANES)]

    def codegen(context, builder, sig, args):
        f = _i8_frame(context, builder, sig, args, nvec)
        c = f.c
        lookup = _i8_lookup(builder, "smmla", f.table_p)
        scale = _block_scale(context, builder, call, *f.block_args)
        four, fifteen = ir.Constant(_V32, [4] * 32), ir.Constant(_V32, [15] * 32)
        facc = [[cgutils.alloca_once(builder, v4f) for _ in range(INT8_LANES)] for _ in pairs]  # [pair][lane]
        isum = [[cgutils.alloca_once(builder, _V4I) for _ in range(INT8_LANES)] for _ in pairs]

        def run_rows(first, count, half):
            rs = [first, builder.add(first, c(count - 1))]  # the row pair (a single row twice)
            p_rows = [builder.gep(f.packed_p, [builder.mul(r, f.row_bytes)]) for r in rs]
            ahead = builder.mul(f.row_bytes, c(count * INT8_PREFETCH_TILES))
            for accs in facc:
                for a in accs:
                    builder.store(ir.Constant(v4f, [0.0] * 4), a)
            with cgutils.for_range(builder, f.per_row) as blk:
                j = blk.index
                start = builder.mul(j, half)
                for p in p_rows[:count]:
                    _prefetch(builder, builder.gep(p, [builder.add(start, ahead)]))
                for sums in isum:
                    for s in sums:
                        builder.store(ir.Constant(_V4I, [0] * 4), s)

                def chunk(i):
                    at = builder.add(builder.mul(start, c(2)), i)
                    at_o = builder.add(at, half)
                    xv = {v: builder.shuffle_vector(f.load32(f.xq[v], at), f.load32(f.xq[v], at_o), interleave)
                          for v in sorted({v for pair in pairs for v in pair})}  # [lane][even 4, odd 4]
                    wv = []
                    for p in p_rows:
                        w = f.load32(p, builder.add(start, i))
                        wv.append(builder.shuffle_vector(lookup(builder.lshr(w, four)), lookup(builder.and_(w, fifteen)),
                                                         interleave))  # [lane][high 4, low 4]
                    for lane, mask in enumerate(lane_masks):
                        a = builder.shuffle_vector(wv[0], wv[1], mask)
                        for (va, vb), sums in zip(pairs, isum):
                            b = builder.shuffle_vector(xv[va], xv[vb], mask)
                            s = sums[lane]
                            builder.store(_neon_asm(builder, "smmla", "i8mm", builder.load(s), a, b), s)

                _for_chunks(builder, f, half, chunk)
                sw = [scale(builder.add(builder.mul(r, f.per_row), j)) for r in rs]
                swv = _join(builder, _splat(builder, sw[0], 2), _splat(builder, sw[1], 2))  # [s_r, s_r, s_r', s_r']
                for (va, vb), sums, accs in zip(pairs, isum, facc):
                    xa, xb = (builder.load(builder.gep(f.xs[v], [j])) for v in (va, vb))
                    xsv = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(_F32, 2), ir.Undefined),
                                                                        xa, c(0)), xb, c(1))
                    fv = builder.fmul(_join(builder, xsv, xsv), swv)  # xs[v] * scale(r), as the other variants
                    for s, a in zip(sums, accs):
                        builder.store(builder.fadd(builder.load(a), builder.fmul(builder.sitofp(builder.load(s), v4f),
                                                                                 fv)), a)
            for (va, vb), accs in zip(pairs, facc):
                lv = [builder.load(a) for a in accs]
                total = builder.fadd(builder.fadd(builder.fadd(lv[0], lv[4]), builder.fadd(lv[2], lv[6])),
                                     builder.fadd(builder.fadd(lv[1], lv[5]), builder.fadd(lv[3], lv[7])))
                for e, (r, v) in enumerate(((rs[0], va), (rs[0], vb), (rs[1], va), (rs[1], vb))):
                    builder.store(builder.extract_element(total, c(e)), builder.gep(f.out[v], [r]))

        _for_row_tiles(builder, f, run_rows)
        return context.get_dummy_value()

    return codegen


@intrinsic
def i8_rows_dot(typingctx, table, dyn, packed, qscale, nested, xq, xa, xs, out, nshift, offset, b0, n_rows, per_row,
                half, v0, n_out, o0, nvec, isa):
    """``out[v * n_out + o0 + r]`` = row r . x_v for rows ``0 .. n_rows`` of ``packed`` (``per_row``
    blocks of ``half`` bytes, ``half`` a multiple of :data:`INT8_CHUNK`; block i of ``packed``
    scaled as the tensor's block ``b0 + i``) and vectors ``v = v0 .. v0 + nvec``, in the int8
    path's arithmetic (``runtime/int8.py``): ``table`` the 16 NF4 values as int8 (looked up by
    ``vpshufb`` or ``tbl``), ``xq`` the vectors quantized to int8 (each block's even entries, then
    its odd ones), ``xa`` their absolute values (uint8), ``xs`` [vectors, per_row] their float
    scales. On x86-64 the byte products take an unsigned operand: NF4's 7-bit codes enter as
    ``code + 128`` (``vpdpbusd``) or ``code + 64`` (AVX2's ``vpmaddubsw``: pairs of products at most
    ``2 * 128 * 127``, under its int16 saturation), each chunk's lanes starting from minus that
    offset times their sum of x (the avx2 offsets computed once a call, before the rows, into a
    stack buffer); int8 weights on AVX2 (``F16Int8Linear``, full 8 bits) move the signs of x onto the
    weights (``vpsignb``) so that the products see ``|x|``; aarch64's ``sdot``/``smmla`` multiply
    signed bytes. ``nvec`` (1 .. INT8_MAX_VECTORS) and ``isa`` (:data:`INT8_ISAS`) are literals: a chunk's
    bytes are decoded once for all the vectors; ``smmla`` with one vector is ``sdot``.

    ``packed`` int8 instead of uint8: weights quantized to int8 as x is (``int8.F16Int8Linear``: blocks
    of ``2 * half`` bytes, their even entries then their odd ones) and ``nested`` their float
    block scales (``table``, ``dyn`` and ``qscale`` unused); the sums and float steps as for NF4
    (``smmla`` takes ``sdot``'s code for them)."""
    arrays = (table, dyn, packed, qscale, nested, xq, xa, xs, out)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)
            and table.dtype == types.int8 and xq.dtype == types.int8 and xa.dtype == types.uint8
            and packed.dtype in (types.uint8, types.int8) and qscale.dtype == types.uint8 and out.mutable
            and all(a.dtype == types.float32 for a in (dyn, nested, xs, out))
            and isinstance(nvec, types.IntegerLiteral) and 1 <= nvec.literal_value <= INT8_MAX_VECTORS
            and isinstance(isa, types.IntegerLiteral) and isa.literal_value in INT8_ISAS.values()):
        return None
    name = {v: k for k, v in INT8_ISAS.items()}[isa.literal_value]
    i64 = types.int64
    sig = types.none(table, dyn, packed, qscale, nested, xq, xa, xs, out, i64, types.float32, i64, i64, i64, i64, i64,
                     i64, i64, nvec, isa)
    call = _scale_call(typingctx, dyn, qscale, nested)
    q8 = packed.dtype == types.int8
    if name == "smmla" and nvec.literal_value > 1 and not q8:
        return sig, _i8mm_codegen(nvec.literal_value, call)
    return sig, _i8_codegen("sdot" if name == "smmla" else name, nvec.literal_value, call, q8)
