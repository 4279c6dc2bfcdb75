"""Runtime kernels against their NumPy twins (dequantize, then multiply in float64)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelora.converters.nf4 import quantize_nf4
from edgelora.runtime import kernels as K


def _tol(w: np.ndarray, x: np.ndarray) -> float:
    # float32 accumulation over k terms, in another order than the float64 reference
    return 1e-6 * (np.abs(w).max() * np.abs(x).sum(axis=-1).max() + 1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.sampled_from([1, 7, 64, 96, 172, 256, 320]), t=st.integers(1, 40),
       block=st.sampled_from([32, 64, 128, 256]), dq=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nf4_products_equal_reference(n, k, t, block, dq, seed):
    rng = np.random.default_rng(seed)
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block, double_quant=dq)
    lin = K.NF4Linear(q)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = q.dequantize_reference()
    np.testing.assert_allclose(lin.matvec(x[0]), K.nf4_matvec_reference(q, x[0]), rtol=0, atol=_tol(w, x))
    np.testing.assert_allclose(lin.matmul(x), K.nf4_matmul_reference(q, x), rtol=0, atol=_tol(w, x))
    batch = lin.matvec_batch(x)
    np.testing.assert_allclose(batch, K.nf4_matvec_batch_reference(q, x), rtol=0, atol=_tol(w, x))
    assert all(np.array_equal(batch[b], lin.matvec(x[b])) for b in range(t))
    r0, r1 = sorted(rng.integers(0, n + 1, 2))
    assert np.array_equal(lin.dequantize_rows(r0, r1), w[r0:r1])  # dequantization itself is exact
    ids = rng.integers(0, n, 5)
    assert np.array_equal(lin.rows(ids), w[ids])


@pytest.mark.parametrize("rows", [2, 5, 32, 33, 70])
def test_matmul_takes_the_batched_kernel_for_few_rows(rows):
    """Up to MATVEC_ROWS_MAX rows each row of a product is bit for bit the decode kernel's; beyond,
    the tiled dequantize-and-BLAS path; both equal the NumPy reference."""
    rng = np.random.default_rng(rows)
    q = quantize_nf4((rng.standard_normal((96, 320)) * 0.05).astype(np.float32))
    x = rng.standard_normal((rows, 320)).astype(np.float32)
    w16 = q.dequantize_reference().astype(np.float16)
    for lin, ref in ((K.NF4Linear(q), K.nf4_matmul_reference(q, x)),
                     (K.F16Linear(w16), (x.astype(np.float64) @ w16.astype(np.float64).T).astype(np.float32))):
        y = lin.matmul(x)
        np.testing.assert_allclose(y, ref, atol=1e-5)
        same = all(np.array_equal(y[b], lin.matvec(x[b])) for b in range(rows))
        assert same == (rows <= K.MATVEC_ROWS_MAX)


@pytest.mark.parametrize("threaded", [False, True])
def test_tiled_matmul_crosses_tiles(monkeypatch, threaded):
    monkeypatch.setattr(K, "TILE_ELEMENTS", 3 * 64)  # three rows a tile
    monkeypatch.setattr(K, "MATVEC_ROWS_MAX", 1)  # the tiled path even for these few rows
    if threaded:  # every product takes the multi-threaded paths (when this machine has 2+ threads)
        monkeypatch.setattr(K, "PARALLEL_MIN_WEIGHTS", 0)
    rng = np.random.default_rng(1)
    q = quantize_nf4((rng.standard_normal((50, 64)) * 0.1).astype(np.float32))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    lin = K.NF4Linear(q)
    np.testing.assert_allclose(lin.matmul(x), K.nf4_matmul_reference(q, x), atol=1e-5)
    np.testing.assert_allclose(lin.matvec(x[0]), K.nf4_matvec_reference(q, x[0]), atol=1e-5)
    assert np.array_equal(lin.dequantize_rows(0, 50), q.dequantize_reference())
    w = q.dequantize_reference().astype(np.float16)
    f = K.F16Linear(w)
    ref = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    np.testing.assert_allclose(f.matmul(x), ref, atol=1e-5)
    np.testing.assert_allclose(f.matvec(x[0]), K.f16_matvec_reference(w, x[0]), atol=1e-5)


def test_half_to_float_is_exact_for_every_half():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    got = K.F16Linear(halves).dequantize_rows(0, 256)
    ref = halves.astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # signed zeros too
    assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("n,k,t", [(100, 64, 1), (33, 172, 5), (1, 1, 2)])
def test_f16_products_equal_reference(n, k, t):
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
    x = rng.standard_normal((t, k)).astype(np.float32)
    lin = K.F16Linear(w)
    ref = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    np.testing.assert_allclose(lin.matvec(x[0]), K.f16_matvec_reference(w, x[0]), atol=_tol(w.astype(np.float32), x))
    np.testing.assert_allclose(lin.matmul(x), ref, atol=_tol(w.astype(np.float32), x))
    assert np.array_equal(lin.rows([0, n - 1]), w[[0, n - 1]].astype(np.float32))


@pytest.mark.parametrize("variant", sorted(K.F16_DOT_VARIANTS))
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (257, 96), (130, 2048)])
def test_every_f16_dot_variant_equals_reference(variant, n, k):
    """The row loop and the tiled kernel (four rows a step, prefetching) on row counts that leave
    partial tiles; a row gives the same bits alone as in a tile."""
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float32)
    bits = w.reshape(-1).view(np.uint16)
    out = np.full(n, np.nan, np.float32)
    K.F16_DOT_VARIANTS[variant](bits, n, k, x, out)
    np.testing.assert_allclose(out, K.f16_matvec_reference(w, x), rtol=0, atol=_tol(w.astype(np.float32), x[None]))
    alone = np.full(1, np.nan, np.float32)
    for r in (0, n // 2, n - 1):
        K.F16_DOT_VARIANTS[variant](bits[r * k:(r + 1) * k], 1, k, x, alone)
        assert alone[0] == out[r]


def _scale_args(lin, b0: int = 0):
    """The aligned kernels' leading arguments: tables, bytes, the double-quantized scales."""
    return K.NF4_CODE, K.DYNAMIC_CODE, lin.packed, lin.qscale, lin.nested, lin.nshift, lin.offset, b0


@pytest.mark.parametrize("variant", sorted(K.NF4_DOT_VARIANTS))
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_every_nf4_dot_variant_equals_reference(variant, block):
    """The portable loop and each SIMD kernel this CPU supports (vpermps lookups on x86-64)."""
    rng = np.random.default_rng(block)
    n, k = 37, 4 * block
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block)
    lin = K.NF4Linear(q)
    x = rng.standard_normal(k).astype(np.float32)
    scales = np.empty(n * k // block, np.float32)
    K.block_scales(K.DYNAMIC_CODE, lin.qscale, lin.nested, lin.nshift, lin.offset, 0, scales)
    np.testing.assert_array_equal(scales, q.absmax())  # the kernels' block scales are exact
    out = np.empty(n, np.float32)
    K.NF4_DOT_VARIANTS[variant](*_scale_args(lin), block // 2, n, np.ascontiguousarray(x[0::2]),
                                np.ascontiguousarray(x[1::2]), out)
    w = q.dequantize_reference()
    np.testing.assert_allclose(out, K.nf4_matvec_reference(q, x), rtol=0, atol=_tol(w, x[None]))


@pytest.mark.parametrize("variant", sorted(K.NF4_DOT_VARIANTS))
def test_every_nf4_dot_variant_forms_each_block_scale_exactly(variant):
    """Times a one-hot x, a kernel returns one column of the weight: bit for bit the dequantized
    weight, so the scales it forms in its loop from the double-quantized bytes are exact, in every
    nested block (1200 blocks: 5 of 256), also for rows taken from the middle (``b0`` > 0)."""
    rng = np.random.default_rng(5)
    n, block, k = 300, 64, 256
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block)
    lin, w = K.NF4Linear(q), q.dequantize_reference()
    kernel, per_row, r0 = K.NF4_DOT_VARIANTS[variant], k // block, 77
    for j in range(per_row):
        c = j * block + 7 * j + 1
        x = np.zeros(k, np.float32)
        x[c] = 1.0
        xe, xo = np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2])
        out = np.full(n, np.nan, np.float32)
        kernel(*_scale_args(lin), block // 2, n, xe, xo, out)
        np.testing.assert_array_equal(out, w[:, c])
        tail = np.full(n - r0, np.nan, np.float32)
        args = list(_scale_args(lin, b0=r0 * per_row))
        args[2] = lin.packed[r0 * k // 2:]
        kernel(*args, block // 2, n - r0, xe, xo, tail)
        np.testing.assert_array_equal(tail, w[r0:, c])


@pytest.mark.parametrize("variant", sorted(K.NF4_DEQUANT_VARIANTS))
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_every_nf4_dequant_variant_is_the_reference_bit_for_bit(variant, block):
    """The prefill's tile dequantization (portable loop, SIMD lookups) gives exactly
    ``dequantize_reference``'s floats, for blocks from the middle of the tensor (``b0`` > 0) too."""
    rng = np.random.default_rng(block + 7)
    n, k = 40, 2 * block
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block)
    lin, w = K.NF4Linear(q), q.dequantize_reference()
    per_row, r0 = k // block, 9
    out = np.full((n - r0) * k, np.nan, np.float32)
    K.NF4_DEQUANT_VARIANTS[variant](K.NF4_CODE, K.DYNAMIC_CODE, lin.packed[r0 * k // 2:], lin.qscale, lin.nested,
                                    lin.nshift, lin.offset, r0 * per_row, (n - r0) * per_row, block // 2, out)
    np.testing.assert_array_equal(out.reshape(n - r0, k), w[r0:])


BATCHES = [1, 2, 3, 4, 5, 9]


def _rows_of(lin, X):
    return np.stack([lin.matvec(x) for x in X])


@pytest.mark.parametrize("variant", sorted(K.NF4_DOT_VARIANTS))
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_every_nf4_batch_variant_is_its_one_vector_kernel_bit_for_bit(variant, block):
    """Each batched kernel gives every vector exactly the bits of the one-vector kernel of the same
    variant, for batch sizes that fill, split and leave remainders of the vector groups; 75 rows
    leave remainders of the row tiles, and 2048 columns take several column tiles at B = 9."""
    rng = np.random.default_rng(block + 1)
    n, k = 75, 2048
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block)
    lin = K.NF4Linear(q)
    one, batched = K.NF4_DOT_VARIANTS[variant], K.NF4_DOT_BATCH_VARIANTS[variant]
    X = rng.standard_normal((max(BATCHES), k)).astype(np.float32)
    XE, XO = np.ascontiguousarray(X[:, 0::2]), np.ascontiguousarray(X[:, 1::2])
    singles = np.empty((len(X), n), np.float32)
    for b in range(len(X)):
        one(*_scale_args(lin), block // 2, n, XE[b], XO[b], singles[b])
    ref = K.nf4_matvec_batch_reference(q, X)
    np.testing.assert_allclose(singles, ref, rtol=0, atol=_tol(q.dequantize_reference(), X))
    for B in BATCHES:
        out = np.full((B, n + 3), np.nan, np.float32)
        batched(*_scale_args(lin), block // 2, n, XE[:B], XO[:B], out, 2)  # columns 2 .. n + 2
        np.testing.assert_array_equal(out[:, 2:n + 2], singles[:B], err_msg=f"{variant} block {block} B {B}")
        assert np.isnan(out[:, :2]).all() and np.isnan(out[:, n + 2:]).all()


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("n,k,block,dq", [(300, 1024, 64, True), (37, 512, 128, False), (64, 256, 32, True),
                                          (41, 172, 64, True), (9, 100, 32, False), (1, 7, 64, True)])
def test_nf4_matvec_batch_rows_are_matvec_bit_for_bit(monkeypatch, threaded, n, k, block, dq):
    """``matvec_batch`` row b is ``matvec(X[b])`` exactly, on the serial and threaded paths, for
    rows that are whole blocks and rows that straddle them (172, 100, 7 columns)."""
    if threaded:
        monkeypatch.setattr(K, "PARALLEL_MIN_WEIGHTS", 0)  # threaded whenever Numba has 2+ threads
    rng = np.random.default_rng(n * k)
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block, double_quant=dq)
    lin = K.NF4Linear(q)
    w = q.dequantize_reference()
    for B in BATCHES:
        X = rng.standard_normal((B, k)).astype(np.float32)
        got = lin.matvec_batch(X)
        assert got.shape == (B, n) and got.dtype == np.float32
        np.testing.assert_allclose(got, K.nf4_matvec_batch_reference(q, X), rtol=0, atol=_tol(w, X))
        np.testing.assert_array_equal(got, _rows_of(lin, X), err_msg=f"B {B}")
        out = np.empty((B, n), np.float32)
        assert lin.matvec_batch(X, out=out) is out and np.array_equal(out, got)


def test_nf4_matvec_batch_serial_equals_threaded(monkeypatch):
    """The row slices a thread gets do not change any row's bits."""
    import numba
    rng = np.random.default_rng(5)
    q = quantize_nf4((rng.standard_normal((203, 512)) * 0.05).astype(np.float32))
    lin = K.NF4Linear(q)
    X = rng.standard_normal((6, 512)).astype(np.float32)
    serial = lin.matvec_batch(X)
    monkeypatch.setattr(K, "PARALLEL_MIN_WEIGHTS", 0)
    for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        try:
            np.testing.assert_array_equal(lin.matvec_batch(X), serial)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("n,k", [(100, 64), (33, 172), (1, 1), (257, 300)])
def test_f16_matvec_batch_rows_are_matvec_bit_for_bit(monkeypatch, threaded, n, k):
    if threaded:
        monkeypatch.setattr(K, "PARALLEL_MIN_WEIGHTS", 0)
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
    lin = K.F16Linear(w)
    for B in BATCHES:
        X = rng.standard_normal((B, k)).astype(np.float32)
        got = lin.matvec_batch(X)
        np.testing.assert_allclose(got, K.f16_matvec_batch_reference(w, X), rtol=0,
                                   atol=_tol(w.astype(np.float32), X))
        np.testing.assert_array_equal(got, _rows_of(lin, X), err_msg=f"B {B}")


def test_matvec_batch_checks_its_arguments():
    rng = np.random.default_rng(0)
    nf4 = K.NF4Linear(quantize_nf4((rng.standard_normal((8, 64)) * 0.05).astype(np.float32)))
    f16 = K.F16Linear(np.zeros((8, 64), np.float16))
    for lin in (nf4, f16):
        with pytest.raises(ValueError, match="shape"):
            lin.matvec_batch(np.zeros((2, 63), np.float32))
        with pytest.raises(ValueError, match="shape"):
            lin.matvec_batch(np.zeros(64, np.float32))
        with pytest.raises(ValueError, match="out"):
            lin.matvec_batch(np.zeros((2, 64), np.float32), out=np.empty((2, 9), np.float32))
        with pytest.raises(ValueError, match="out"):
            lin.matvec_batch(np.zeros((2, 64), np.float32), out=np.empty((8, 2), np.float32).T)
        X = rng.standard_normal((3, 64))  # float64 and non-contiguous input are converted
        np.testing.assert_array_equal(lin.matvec_batch(X[::-1]), lin.matvec_batch(X[::-1].astype(np.float32)))


_UNALIGNED = r"""
import numpy as np
from edgelora.converters.nf4 import quantize_nf4
from edgelora.runtime import kernels as K
rng = np.random.default_rng(0)
for k in (160, 172, 96):  # rows that straddle 64-weight blocks
    lin = K.NF4Linear(quantize_nf4((rng.standard_normal((64, k)) * 0.05).astype(np.float32)))
    X = (rng.standard_normal((24, k)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    batch = np.concatenate([lin.matvec_batch(X[i:i + 3]) for i in range(0, 24, 3)])
    assert all(np.array_equal(batch[b], lin.matvec(X[b])) for b in range(24)), k
print("ok")
"""


def test_unaligned_rows_batched_equal_one_vector_when_loaded_from_numba_cache():
    """The batched kernel's rows equal the one-vector kernel's bit for bit also when both come from
    Numba's on-disk cache, compiled in another process (the first run here may compile and cache,
    the second loads): the straddling-rows sum must not depend on how LLVM vectorised it there."""
    import subprocess
    import sys
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _UNALIGNED], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
