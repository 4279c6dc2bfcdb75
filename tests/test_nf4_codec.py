"""The NF4 codec against bitsandbytes (bit for bit) and the Numba kernels against their NumPy twins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelora import storage
from edgelora.converters import nf4
from edgelora.errors import QuantizationError

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

# the float vector width of the torch compared against: its sum order (the offset) depends on it
LANES = 4 if __import__("platform").machine().lower() in ("aarch64", "arm64") else 8


def _weights(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape) * 0.02
    elif kind == "heavy":  # Student-t with 2 degrees of freedom: outliers dominate many blocks
        x = rng.standard_t(2, size=shape) * 0.01
    elif kind == "zeros":  # whole blocks of zeros among real values
        x = rng.standard_normal(shape) * 0.05
        x.ravel()[: x.size // 2] = 0.0
    elif kind == "uniform":
        x = rng.uniform(-1, 1, size=shape)
    elif kind == "ties":  # values on NF4 midpoints and on exact code values
        vals = np.concatenate([storage.NF4_CODE, nf4.NF4_MIDPOINTS])
        x = rng.choice(vals, size=shape)
        x.ravel()[::64] = 1.0  # absmax 1 so the scaled values are the values themselves
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def _bnb(x: np.ndarray, block_size: int, double_quant: bool, dtype=None):
    t = torch.from_numpy(x)
    if dtype is not None:
        t = t.to(dtype)
    packed, state = bnbf.quantize_4bit(t, blocksize=block_size, quant_type="nf4",
                                       compress_statistics=double_quant)
    return packed, state


def bnb_dequantize_flat(packed, state) -> np.ndarray:
    """bitsandbytes' dequantization of the flat tensor.

    The format is defined on the row-major flattening. bitsandbytes 0.50's CPU kernel for 2-D
    shapes indexes blocks as ``row * (cols // block) + col // block``, which is wrong when ``cols``
    is a multiple of 32 but not of the block size (e.g. 96 or 160 columns); its quantization is
    flat, and so are its generic and CUDA dequantizers. Asking it for the 1-D shape gives the flat
    result on every path.
    """
    import copy
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([int(np.prod(state.shape))])
    return bnbf.dequantize_4bit(packed, flat_state).numpy().ravel()


def _assert_same_as_bnb(q: storage.NF4Tensor, packed, state, float_input: bool = True):
    assert np.array_equal(q.packed, packed.numpy().ravel())
    if q.double_quant:
        assert np.array_equal(q.scales, state.absmax.numpy())
        assert np.array_equal(q.nested_scales, state.state2.absmax.numpy())
        assert q.offset.tobytes() == np.float32(state.offset.item()).tobytes()
    else:
        assert np.array_equal(q.scales, state.absmax.numpy())
    if float_input:
        ref = bnb_dequantize_flat(packed, state)
        assert np.array_equal(q.dequantize().ravel(), ref)


def test_code_tables_match_bitsandbytes():
    assert np.array_equal(storage.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    assert storage.DYNAMIC_CODE.tobytes() == bnbf.create_dynamic_map().numpy().tobytes()


@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "uniform", "ties"])
@pytest.mark.parametrize("shape", [(256, 512), (7,), (3, 333), (1, 64), (129, 65), (2048, 1100)])
def test_bit_exact_with_bitsandbytes(kind, shape):
    x = _weights(kind, shape, seed=sum(map(ord, kind)) + sum(shape))
    q = nf4.quantize_nf4(x, sum_threads=torch.get_num_threads(), sum_lanes=LANES)
    _assert_same_as_bnb(q, *_bnb(x, 64, True))


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_block_sizes_and_single_quant(block_size, double_quant):
    x = _weights("heavy", (300, 517), seed=block_size)
    q = nf4.quantize_nf4(x, block_size=block_size, double_quant=double_quant, sum_lanes=LANES)
    assert q.double_quant == double_quant
    _assert_same_as_bnb(q, *_bnb(x, block_size, double_quant))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sources(dtype):
    """A bf16/fp16 checkpoint is widened to float32 exactly, as bitsandbytes does."""
    tdtype = getattr(torch, dtype)
    x = torch.from_numpy(_weights("normal", (96, 640), seed=3)).to(tdtype)
    q = nf4.quantize_nf4(x.float().numpy(), sum_lanes=LANES)
    _assert_same_as_bnb(q, *_bnb(x.float().numpy(), 64, True, dtype=tdtype), float_input=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_tensor_offset_follows_torch_thread_split(threads):
    """Above 32768 blocks torch sums the absmaxes per thread; sum_threads reproduces that split."""
    x = _weights("normal", (4096, 1024), seed=11)  # 65536 blocks
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed, state = _bnb(x, 64, True)
    finally:
        torch.set_num_threads(old)
    _assert_same_as_bnb(nf4.quantize_nf4(x, sum_threads=threads, sum_lanes=LANES), packed, state)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 90000), seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([1, 2, 3]))
def test_torch_sum_order(n, seed, threads):
    x = (np.abs(np.random.default_rng(seed).standard_normal(n)) * 0.03).astype(np.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expect = torch.from_numpy(x).mean().numpy()
    finally:
        torch.set_num_threads(old)
    assert nf4.torch_mean(x, threads, LANES).tobytes() == expect.tobytes()
    assert nf4.torch_mean_reference(x, threads, LANES).tobytes() == expect.tobytes()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 90000), seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([1, 2, 3]),
       lanes=st.sampled_from([4, 8, 16]))
def test_every_vector_width_numba_equals_numpy_twin(n, seed, threads, lanes):
    x = (np.abs(np.random.default_rng(seed).standard_normal(n)) * 0.03).astype(np.float32)
    assert nf4.torch_mean(x, threads, lanes).tobytes() == nf4.torch_mean_reference(x, threads, lanes).tobytes()


def test_default_vector_width_is_the_same_on_every_machine():
    """Bundles do not depend on where they were converted: the default is x86-64's 8 lanes."""
    x = (np.abs(np.random.default_rng(0).standard_normal(70001)) * 0.03).astype(np.float32)  # orders differ here
    assert nf4.quantize_nf4(x).offset.tobytes() == nf4.quantize_nf4(x, sum_lanes=8).offset.tobytes()
    assert nf4.torch_mean(x, 1, 4).tobytes() != nf4.torch_mean(x, 1, 8).tobytes()  # the width matters
    with pytest.raises(Exception, match="sum_lanes"):
        nf4.quantize_nf4(x, sum_lanes=5)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 5000), block=st.sampled_from(storage.SUPPORTED_BLOCK_SIZES),
       dq=st.booleans(), scale=st.floats(1e-6, 1e3), seed=st.integers(0, 2**32 - 1))
def test_numba_kernels_equal_numpy_twins(n, block, dq, scale, seed):
    x = (np.random.default_rng(seed).standard_t(3, size=n) * scale).astype(np.float32)
    fast = nf4.quantize_nf4(x, block, dq)
    ref = nf4.quantize_nf4_reference(x, block, dq)
    assert np.array_equal(fast.packed, ref.packed)
    assert np.array_equal(fast.scales, ref.scales)
    assert np.array_equal(fast.nested_scales, ref.nested_scales)
    assert fast.offset.tobytes() == ref.offset.tobytes()
    ref_absmax = storage.dequantize_scales_reference(ref.scales, ref.nested_scales, ref.offset) if dq else ref.scales
    assert np.array_equal(fast.absmax(), ref_absmax)
    assert np.array_equal(fast.dequantize(), ref.dequantize_reference())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_dynamic_8bit_step_matches_bitsandbytes(n, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * 0.01).astype(np.float32)
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    mine, absmax = nf4.dynamic_quantize_reference(x, 256)
    assert np.array_equal(mine, codes.numpy())
    assert np.array_equal(absmax, state.absmax.numpy())


def test_size_and_bits_per_weight():
    q = nf4.quantize_nf4(np.ones((4096, 4096), np.float32))
    # 4 bits + 8 bits/64 + 32 bits/(64*256) + 32 bits offset
    assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert q.packed.nbytes == 4096 * 4096 // 2


def test_error_bound_against_original():
    x = _weights("normal", (512, 512), seed=5)
    q = nf4.quantize_nf4(x)
    blocks = np.abs(x.reshape(-1, 64)).max(axis=1)
    err = np.abs(q.dequantize() - x).reshape(-1, 64).max(axis=1)
    # half the widest NF4 gap (between -1 and -0.696) times the block absmax, plus the 8-bit scale error
    assert np.all(err <= blocks * (0.5 * (1 - 0.6961928) + 0.01) + 1e-7)


@pytest.mark.parametrize("bad", [np.zeros(0, np.float32), np.array([1.0, np.nan], np.float32),
                                 np.array([np.inf], np.float32), np.arange(4, dtype=np.int32)])
def test_bad_input_is_refused(bad):
    with pytest.raises(QuantizationError):
        nf4.quantize_nf4(bad)


def test_bad_block_size_is_refused():
    with pytest.raises(QuantizationError, match="block_size"):
        nf4.quantize_nf4(np.ones(64, np.float32), block_size=48)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_error_stats_kernel_equals_numpy_twin(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = (a + rng.standard_normal(n) * 0.01).astype(np.float32)
    fast, ref = nf4.error_stats(a, b), nf4.error_stats_reference(a, b)
    assert fast[2] == ref[2]
    np.testing.assert_allclose(fast[:2], ref[:2], rtol=1e-12)  # float64 sums in another order
