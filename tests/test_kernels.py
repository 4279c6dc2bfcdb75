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
@given(n=st.integers(1, 300), k=st.sampled_from([1, 7, 64, 96, 172, 256, 320]), t=st.integers(1, 9),
       block=st.sampled_from([32, 64, 128, 256]), dq=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nf4_products_equal_reference(n, k, t, block, dq, seed):
    rng = np.random.default_rng(seed)
    q = quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=block, double_quant=dq)
    lin = K.NF4Linear(q)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = q.dequantize_reference()
    np.testing.assert_allclose(lin.matvec(x[0]), K.nf4_matvec_reference(q, x[0]), rtol=0, atol=_tol(w, x))
    np.testing.assert_allclose(lin.matmul(x), K.nf4_matmul_reference(q, x), rtol=0, atol=_tol(w, x))
    r0, r1 = sorted(rng.integers(0, n + 1, 2))
    assert np.array_equal(lin.dequantize_rows(r0, r1), w[r0:r1])  # dequantization itself is exact
    ids = rng.integers(0, n, 5)
    assert np.array_equal(lin.rows(ids), w[ids])


@pytest.mark.parametrize("threaded", [False, True])
def test_tiled_matmul_crosses_tiles(monkeypatch, threaded):
    monkeypatch.setattr(K, "TILE_ELEMENTS", 3 * 64)  # three rows a tile
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
    K._nf4_block_scales(K.DYNAMIC_CODE, lin.qscale, lin.nested, lin.nshift, lin.offset, 0, scales)
    np.testing.assert_array_equal(scales, q.absmax())  # the kernels' block scales are exact
    out = np.empty(n, np.float32)
    K.NF4_DOT_VARIANTS[variant](K.NF4_CODE, lin.packed, scales, block // 2, n, np.ascontiguousarray(x[0::2]),
                                np.ascontiguousarray(x[1::2]), out)
    w = q.dequantize_reference()
    np.testing.assert_allclose(out, K.nf4_matvec_reference(q, x), rtol=0, atol=_tol(w, x[None]))
