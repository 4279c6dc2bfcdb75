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

The NF4 kernels prefetch (``llvm.prefetch``) the bytes one row tile ahead, and
``f16_rows_dot`` (the float16 head and embeddings, plain LLVM vector IR for any CPU) does the
same four rows at a time: the weights are mapped from the page cache in 4 KB pages, where the
hardware prefetchers stop, so without it each row tile waited on memory (bench/README.md).

Numba's on-disk cache of the kernels that use these intrinsics is keyed on the text of
``kernels.py`` alone: after editing this file (or ``storage.block_scale``), delete
``runtime/__pycache__/kernels.*`` (or run with a fresh ``NUMBA_CACHE_DIR``) so that they are
compiled again.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgelora.storage import block_scale

_FEATURES = llvm.get_host_cpu_features()
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

#: the int8 kernels this CPU runs, by the code ``i8_rows_dot`` takes as ``isa``: ``vnni`` is
#: ``vpdpbusd`` on 256-bit registers (AVX-512 VNNI with VL, or AVX-VNNI), ``avx2`` the same sums
#: through ``vpmaddubsw`` and ``vpmaddwd``
INT8_ISAS = {"vnni": 0, "avx2": 1}
INT8_AVAILABLE = set() if _AARCH64 or not _FEATURES.get("avx2") else {"avx2"} | (
    {"vnni"} if _FEATURES.get("avxvnni") or (_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl")) else set())
INT8_SIMD = "vnni" if "vnni" in INT8_AVAILABLE else "avx2" if "avx2" in INT8_AVAILABLE else None
INT8_CHUNK = 32  # bytes of a row a step reads (one 256-bit register: 32 high and 32 low nibbles)
INT8_LANES = 8  # int32 lanes of a step; lane l sums the products of bytes 4l .. 4l + 3 of each chunk
INT8_TILE_ROWS = 2  # rows a step takes side by side (they share each x load; 1.2x for 4 vectors)


def _i8_codegen(isa: str, nvec: int, call):
    """IR of :func:`i8_rows_dot` for ``isa`` and ``nvec`` vectors. Per row, block and vector the
    chunks' products go into eight int32 lanes (exact, in any order); per block those lanes, as
    floats, times ``xs[j] * scale(j)`` are added to eight float lanes (a product, then a sum: no
    FMA, so the NumPy twin rounds alike); the row's result is the pairwise sum of the lanes."""
    v32, v16i, v8i, v8f = (ir.VectorType(_I8, 32), ir.VectorType(ir.IntType(16), 16), ir.VectorType(_I32, 8),
                           ir.VectorType(_F32, 8))
    c = lambda n: ir.Constant(_I64, n)

    def codegen(context, builder, sig, args):
        table_p, packed_p, xq_p, xa_p, xs_p, out_p = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                                      for i in (0, 2, 5, 6, 7, 8))
        nshift, offset, b0, n_rows, per_row, half, v0, n_out, o0 = args[9:18]
        mod = builder.module
        fn = lambda name, ret, params: cgutils.get_or_insert_function(mod, ir.FunctionType(ret, params), name)
        pshufb = fn("llvm.x86.avx2.pshuf.b", v32, [v32, v32])
        psign = fn("llvm.x86.avx2.psign.b", v32, [v32, v32])
        if isa == "vnni":
            dpbusd = fn("llvm.x86.avx512.vpdpbusd.256", v8i, [v8i, v8i, v8i])
            dot = lambda acc, u, s: builder.call(dpbusd, [acc, builder.bitcast(u, v8i), builder.bitcast(s, v8i)])
        else:
            maddubs = fn("llvm.x86.avx2.pmadd.ub.sw", v16i, [v32, v32])
            maddwd = fn("llvm.x86.avx2.pmadd.wd", v8i, [v16i, v16i])
            ones = ir.Constant(v16i, [1] * 16)
            # |x| . (w signed by x): pairs at most 2 * 127 * 127, so vpmaddubsw never saturates
            dot = lambda acc, u, s: builder.add(acc, builder.call(maddwd, [builder.call(maddubs, [u, s]), ones]))
        scale = _block_scale(context, builder, call, args[1], args[3], args[4], nshift, offset, b0)
        t16 = builder.load(builder.bitcast(table_p, ir.VectorType(_I8, 16).as_pointer()), align=1)
        table = builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
        four, fifteen = ir.Constant(v32, [4] * 32), ir.Constant(v32, [15] * 32)
        k = builder.mul(per_row, builder.mul(half, c(2)))  # entries of a row of x
        row_bytes = builder.mul(per_row, half)
        load32 = lambda p, at: builder.load(builder.bitcast(builder.gep(p, [at]), v32.as_pointer()), align=1)
        tile = INT8_TILE_ROWS
        accs = [[cgutils.alloca_once(builder, v8f) for _ in range(nvec)] for _ in range(tile)]  # [row][vector]
        sums = [[cgutils.alloca_once(builder, v8i) for _ in range(nvec)] for _ in range(tile)]
        xq_v = [builder.gep(xq_p, [builder.mul(builder.add(v0, c(v)), k)]) for v in range(nvec)]  # vector v's x
        xa_v = [builder.gep(xa_p, [builder.mul(builder.add(v0, c(v)), k)]) for v in range(nvec)]
        xs_v = [builder.gep(xs_p, [builder.mul(builder.add(v0, c(v)), per_row)]) for v in range(nvec)]
        out_v = [builder.gep(out_p, [builder.add(builder.mul(builder.add(v0, c(v)), n_out), o0)]) for v in range(nvec)]

        def run_rows(first, count, half):
            """IR for rows ``first .. first + count`` (``count`` a Python int: they share each x load)
            with blocks of ``half`` bytes (a constant for 64-weight blocks: one chunk a block)."""
            rs = [builder.add(first, c(t)) for t in range(count)]
            p_rows = [builder.gep(packed_p, [builder.mul(r, row_bytes)]) for r in rs]
            ahead = builder.mul(row_bytes, c(count))  # the same bytes of the next rows
            for t in range(count):
                for a in accs[t]:
                    builder.store(ir.Constant(v8f, [0.0] * 8), a)
            with cgutils.for_range(builder, per_row) as blk:
                j = blk.index
                start = builder.mul(j, half)
                for t in range(count):
                    _prefetch(builder, builder.gep(p_rows[t], [builder.add(start, ahead)]))
                    for s in sums[t]:
                        builder.store(ir.Constant(v8i, [0] * 8), s)

                def chunk(i):
                    at = builder.add(builder.mul(start, c(2)), i)  # even entries; the odd ones ``half`` on
                    at_o = builder.add(at, half)
                    xs = [[load32(xa, at), load32(xq, at), load32(xa, at_o), load32(xq, at_o)]
                          for xq, xa in zip(xq_v, xa_v)]  # shared by the rows
                    for t in range(count):
                        w = load32(p_rows[t], builder.add(start, i))
                        wh = builder.call(pshufb, [table, builder.lshr(w, four)])  # int8 codes of the high nibbles
                        wl = builder.call(pshufb, [table, builder.and_(w, fifteen)])
                        for (ae, qe, ao, qo), s in zip(xs, sums[t]):
                            acc = dot(builder.load(s), ae, builder.call(psign, [wh, qe]))
                            builder.store(dot(acc, ao, builder.call(psign, [wl, qo])), s)

                if isinstance(half, ir.Constant):
                    for i in range(0, half.constant, INT8_CHUNK):
                        chunk(c(i))
                else:
                    with cgutils.for_range_slice(builder, c(0), half, c(INT8_CHUNK)) as (i, _):
                        chunk(i)
                for t in range(count):
                    sw = scale(builder.add(builder.mul(rs[t], per_row), j))
                    for xs, s, a in zip(xs_v, sums[t], accs[t]):
                        f = builder.fmul(builder.load(builder.gep(xs, [j])), sw)
                        fv = builder.shuffle_vector(builder.insert_element(ir.Constant(v8f, ir.Undefined), f, c(0)),
                                                    ir.Constant(v8f, ir.Undefined), ir.Constant(v8i, [0] * 8))
                        builder.store(builder.fadd(builder.load(a), builder.fmul(builder.sitofp(builder.load(s), v8f),
                                                                                 fv)), a)
            for t in range(count):
                for out, a in zip(out_v, accs[t]):
                    builder.store(_hsum(builder, builder.load(a), 8), builder.gep(out, [rs[t]]))

        def rows(half):
            tiled = builder.mul(builder.udiv(n_rows, c(tile)), c(tile))
            with cgutils.for_range_slice(builder, c(0), tiled, c(tile)) as (r, _):
                run_rows(r, tile, half)
            with cgutils.for_range_slice(builder, tiled, n_rows, c(1)) as (r, _):
                run_rows(r, 1, half)

        with builder.if_else(builder.icmp_unsigned("==", half, c(INT8_CHUNK))) as (one_chunk, general):
            with one_chunk:
                rows(c(INT8_CHUNK))
            with general:
                rows(half)
        return context.get_dummy_value()

    return codegen


@intrinsic
def i8_rows_dot(typingctx, table, dyn, packed, qscale, nested, xq, xa, xs, out, nshift, offset, b0, n_rows, per_row,
                half, v0, n_out, o0, nvec, isa):
    """``out[v * n_out + o0 + r]`` = row r . x_v for rows ``0 .. n_rows`` of ``packed`` (``per_row``
    blocks of ``half`` bytes, ``half`` a multiple of :data:`INT8_CHUNK`; block i of ``packed``
    scaled as the tensor's block ``b0 + i``) and vectors ``v = v0 .. v0 + nvec``, in the int8
    path's arithmetic (``runtime/int8.py``): ``table`` the 16 NF4 values as int8 (held twice in a
    register and looked up by ``vpshufb``), ``xq`` the vectors quantized to int8 (each block's
    even entries, then its odd ones), ``xa`` their absolute values (uint8), ``xs`` [vectors,
    per_row] their float scales. The signs of x move onto the weights (``vpsignb``) so that the
    unsigned-times-signed byte products see ``|x|``. ``nvec`` (1 .. MAX_VECTORS) and ``isa``
    (:data:`INT8_ISAS`) are literals: a chunk's bytes are decoded once for all the vectors."""
    arrays = (table, dyn, packed, qscale, nested, xq, xa, xs, out)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)
            and table.dtype == types.int8 and xq.dtype == types.int8 and xa.dtype == types.uint8
            and packed.dtype == types.uint8 and qscale.dtype == types.uint8 and out.mutable
            and all(a.dtype == types.float32 for a in (dyn, nested, xs, out))
            and isinstance(nvec, types.IntegerLiteral) and 1 <= nvec.literal_value <= MAX_VECTORS
            and isinstance(isa, types.IntegerLiteral) and isa.literal_value in INT8_ISAS.values()):
        return None
    name = {v: k for k, v in INT8_ISAS.items()}[isa.literal_value]
    i64 = types.int64
    sig = types.none(table, dyn, packed, qscale, nested, xq, xa, xs, out, i64, types.float32, i64, i64, i64, i64, i64,
                     i64, i64, nvec, isa)
    return sig, _i8_codegen(name, nvec.literal_value, _scale_call(typingctx, dyn, qscale, nested))
