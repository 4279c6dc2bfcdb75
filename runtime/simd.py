"""Explicit-SIMD pieces for the NF4 kernels, written as LLVM IR through Numba intrinsics.

Numba has no vector types, and LLVM turns a 16-entry table lookup into a memory gather at best.
x86-64 has a register-to-register lookup instead: ``vpermps`` picks 16 (AVX-512) or 8 (AVX2)
floats out of a register by index, so one instruction decodes 16 NF4 codes into their float
values. (The same idea as llama.cpp's ``vpshufb`` decoding of IQ4_NL's 16-value grid, on float
lanes here so the product stays exact float32 arithmetic.)

``nf4_row_dot_avx512(code, packed, p0, scales, s0, xe, xo, n_blocks, half)`` returns one row's
product: for ``n_blocks`` blocks of ``half`` packed bytes (``half`` a multiple of 16) starting at
``packed[p0]``, with block scales ``scales[s0:]``::

    sum_j scales[s0 + j] * sum_i (code[hi(p[j*half + i])] * xe[j*half + i] + code[lo(...)] * xo[j*half + i])

keeping both sums in vector registers and reducing once per row. ``nf4_row_dot_avx2`` is the same
with two 8-entry lookups and a blend. Callers select a variant with
:data:`SIMD` (from the host CPU's features) and keep the portable loop for everything else
(aarch64, older x86); the tests prove every available variant equal to the NumPy reference.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_FEATURES = llvm.get_host_cpu_features()
SIMD = "avx512" if _FEATURES.get("avx512f") else ("avx2" if _FEATURES.get("avx2") and _FEATURES.get("fma") else None)

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_I64 = ir.IntType(64)


def _data_ptr(context, builder, arrty, arr, index, elem):
    """Pointer to ``arr[index]`` cast to ``elem*``."""
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = builder.gep(ary.data, [index])
    return builder.bitcast(ptr, elem.as_pointer())


def _hsum(builder, v, width):
    """Pairwise horizontal sum of a float vector (log2(width) shuffles and adds)."""
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _row_codegen(width: int):
    vf = ir.VectorType(_F32, width)
    vi = ir.VectorType(_I32, width)
    vb = ir.VectorType(_I8, width)

    def codegen(context, builder, sig, args):
        code_t, packed_t, _, scales_t, _, xe_t, xo_t, _, _ = sig.args
        code, packed, p0, scales, s0, xe, xo, n_blocks, half = args
        mod = builder.module
        name = "llvm.x86.avx512.permvar.sf.512" if width == 16 else "llvm.x86.avx2.permps"
        perm = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vi]), name)
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32")
        tbl_lo = builder.load(_data_ptr(context, builder, code_t, code, ir.Constant(_I64, 0), vf), align=4)
        tbl_hi = builder.load(_data_ptr(context, builder, code_t, code, ir.Constant(_I64, 8), vf), align=4) \
            if width == 8 else None
        p_base = _data_ptr(context, builder, packed_t, packed, p0, _I8)
        s_base = _data_ptr(context, builder, scales_t, scales, s0, _F32)
        e_base = _data_ptr(context, builder, xe_t, xe, ir.Constant(_I64, 0), _F32)
        o_base = _data_ptr(context, builder, xo_t, xo, ir.Constant(_I64, 0), _F32)
        four, fifteen, eight = (ir.Constant(vi, [c] * width) for c in (4, 15, 8))
        zero_i, zero_f = ir.Constant(vi, [0] * width), ir.Constant(vf, [0.0] * width)

        def lookup(idx):
            if width == 16:
                return builder.call(perm, [tbl_lo, idx])
            lo, hi = builder.call(perm, [tbl_lo, idx]), builder.call(perm, [tbl_hi, idx])
            return builder.select(builder.icmp_unsigned("!=", builder.and_(idx, eight), zero_i), hi, lo)

        def vload(base, i, ty, align):
            return builder.load(builder.bitcast(builder.gep(base, [i]), ty.as_pointer()), align=align)

        row_acc = cgutils.alloca_once_value(builder, zero_f)
        acc_h = cgutils.alloca_once_value(builder, zero_f)  # two chains, so FMA latency overlaps
        acc_l = cgutils.alloca_once_value(builder, zero_f)
        with cgutils.for_range(builder, n_blocks) as blk:
            j = blk.index
            builder.store(zero_f, acc_h)
            builder.store(zero_f, acc_l)
            start = builder.mul(j, half)
            with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), half, ir.Constant(_I64, width)) as (i, _):
                at = builder.add(start, i)
                w = builder.zext(vload(p_base, at, vb, 1), vi)
                builder.store(builder.call(fma, [lookup(builder.lshr(w, four)), vload(e_base, at, vf, 4),
                                                 builder.load(acc_h)]), acc_h)
                builder.store(builder.call(fma, [lookup(builder.and_(w, fifteen)), vload(o_base, at, vf, 4),
                                                 builder.load(acc_l)]), acc_l)
            scale = builder.load(builder.gep(s_base, [j]))
            splat = builder.insert_element(ir.Constant(vf, ir.Undefined), scale, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(vi, [0] * width))
            block = builder.fadd(builder.load(acc_h), builder.load(acc_l))
            builder.store(builder.call(fma, [block, splat, builder.load(row_acc)]), row_acc)
        return _hsum(builder, builder.load(row_acc), width)

    return codegen


def _signature(code, packed, scales, xe, xo):
    arrays = (code, packed, scales, xe, xo)
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
        return None
    if packed.dtype != types.uint8 or any(a.dtype != types.float32 for a in (code, scales, xe, xo)):
        return None
    i64 = types.int64
    return types.float32(code, packed, i64, scales, i64, xe, xo, i64, i64)


@intrinsic
def nf4_row_dot_avx512(typingctx, code, packed, p0, scales, s0, xe, xo, n_blocks, half):
    return _signature(code, packed, scales, xe, xo), _row_codegen(16)


@intrinsic
def nf4_row_dot_avx2(typingctx, code, packed, p0, scales, s0, xe, xo, n_blocks, half):
    return _signature(code, packed, scales, xe, xo), _row_codegen(8)
