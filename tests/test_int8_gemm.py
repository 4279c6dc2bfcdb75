"""The int8 prefill GEMM (runtime/int8_gemm.py): every variant equals the NumPy twin bit for bit on
any shape (rows not a multiple of the register's 16, 1..300 tokens, every block size, with and
without double quantization, one thread or several), a row's result depends on that row alone,
the products are within the derived bound of the exact ones, and a model's int8 prefill logits are
within the stated tolerance of its exact ones on every architecture and on stories260K."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import edgelora
from edgelora.converters.nf4 import quantize_nf4
from edgelora.runtime import int8 as I8
from edgelora.runtime import int8_gemm as G
from edgelora.runtime import kernels as K
from edgelora.runtime import large_pages as LP
from edgelora.storage import DYNAMIC_CODE

from test_int8 import _activations, _bits, _error_bound, assert_logits_within_tolerance
from tiny_models import CONFIGS, Converted


def _weight(rng, n: int, k: int, bs: int, dq: bool = True):
    return quantize_nf4((rng.standard_normal((n, k)) * 0.05).astype(np.float32), block_size=bs, double_quant=dq)


def _weight_from(W: np.ndarray, bs: int):
    return quantize_nf4(W, block_size=bs, double_quant=True)


def _run(variant: str, q, X: np.ndarray, threads: int = 1) -> np.ndarray:
    qscale, nested, nshift, offset = q.scale_args()
    tiles = G.Tiles((I8.NF4_I8, DYNAMIC_CODE, q.packed, qscale, nested, nshift, offset, q.block_size), *q.shape)
    XQ, _, XS = I8.quantize_activations(X, q.block_size)
    pool = K._pool(threads) if threads > 1 else None
    return G.gemm(variant, I8.NF4_I8, tiles, XQ, XS, threads, pool)


def _twin(q, X: np.ndarray) -> np.ndarray:
    XQ, _, XS = I8.quantize_activations_reference(X, q.block_size)
    return G.nf4_int8_gemm_reference(q, I8.NF4_I8, XQ, XS)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 9), blocks=st.integers(1, 5), bs=st.sampled_from([64, 128]), seed=st.integers(0, 2**32 - 1))
def test_block_sums_equal_twin(T, blocks, bs, seed):
    XQ = np.random.default_rng(seed).integers(-127, 128, (T, blocks * bs)).astype(np.int8)
    assert np.array_equal(G.block_sums(XQ, bs), G.block_sums_reference(XQ, bs))


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 70), per_row=st.integers(1, 4), bs=st.sampled_from([64, 128, 256]), dq=st.booleans(),
       T=st.integers(1, 40), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_every_variant_equals_the_twin_bit_for_bit(variant, n, per_row, bs, dq, T, threads, seed):
    """Integer sums exact, the float steps in the twin's order: each variant (portable, and the
    SIMD ones this CPU runs) gives the twin's bits for rows past the last whole register, partial
    token tiles and row groups split between threads."""
    rng = np.random.default_rng(seed)
    q = _weight(rng, n, per_row * bs, bs, dq)
    X = _activations(rng, T, per_row * bs)
    got = _run(variant, q, X, threads)
    assert got.shape == (T, n) and got.flags.c_contiguous
    assert np.array_equal(_bits(got), _bits(_twin(q, X)))


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
def test_extreme_codes_and_activations_sum_exactly(variant):
    """The largest pairs of products there can be: weights only at their blocks' extremes (codes
    -64 and 64, bytes 0 and 128 once offset for avx2's ``vpmaddubsw``) against activations only at
    +-127: every pair of products at its largest, ``2 * 128 * 127``, in either sign. The sums are
    exact (the twin's bits), so nothing saturates."""
    rng = np.random.default_rng(3)
    n, k = 40, 256
    W = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    W[:, :64] = 1.0  # a block of +1 only: 128 against 127 in every pair
    q = _weight_from(W, 64)
    assert set(np.unique(np.asarray(q.packed) >> 4)) <= {0, 15}
    X = np.where(rng.random((9, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    X[0] = 1.0
    X[1] = -1.0
    got = _run(variant, q, X)
    assert np.array_equal(_bits(got), _bits(_twin(q, X)))
    assert np.allclose(got[0], (W.astype(np.float64) @ X[0].astype(np.float64)), rtol=1e-5)


def _q8_run(variant: str, codes: np.ndarray, scales: np.ndarray, X: np.ndarray, threads: int = 1,
            chunk: int = 4096) -> np.ndarray:
    """The GEMM by ``variant`` over int8 codes put into :class:`Q8Tiles` ``chunk`` rows at a time."""
    n, k = codes.shape
    tiles = G.Q8Tiles(n, k, 64)
    for r0 in range(0, n, chunk):
        tiles.put(r0, codes[r0:r0 + chunk], scales[r0:r0 + chunk])
    XQ, _, XS = I8.quantize_activations(X, 64)
    return G.gemm(variant, I8.NF4_I8, tiles, XQ, XS, threads, K._pool(threads) if threads > 1 else None)


def _q8_twin(codes: np.ndarray, scales: np.ndarray, X: np.ndarray) -> np.ndarray:
    XQ, _, XS = I8.quantize_activations_reference(X, 64)
    return G.q8_gemm_reference(codes, scales, XQ, XS)


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 70), per_row=st.integers(1, 5), T=st.integers(1, 40), threads=st.sampled_from([1, 2, 3]),
       chunk=st.sampled_from([5, 16, 4096]), seed=st.integers(0, 2**32 - 1))
def test_every_variant_equals_the_twin_on_int8_codes(variant, n, per_row, T, threads, chunk, seed):
    """Int8 codes (the float16 head's, ``int8.F16Int8Linear``) in tiles: each variant gives the
    twin's bits for any codes and scales, rows past the last whole group, partial token tiles,
    groups split between threads and tiles filled in runs that cut groups."""
    rng = np.random.default_rng(seed)
    k = 64 * per_row
    codes = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scales = (rng.random((n, per_row)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    X = _activations(rng, T, k)
    got = _q8_run(variant, codes, scales, X, threads, chunk)
    assert got.shape == (T, n)
    assert np.array_equal(_bits(got), _bits(_q8_twin(codes, scales, X)))


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
def test_extreme_int8_codes_sum_exactly(variant):
    """Codes only at +-127 against activations only at +-127, in every sign pattern: every pair of
    products at its largest, ``2 * 127 * 127`` (AVX2: ``|w|`` times x with w's sign, under
    ``vpmaddubsw``'s saturation; VNNI: ``w + 128`` up to 255). The sums are exact."""
    rng = np.random.default_rng(5)
    n, k = 37, 256
    codes = np.where(rng.random((n, k)) < 0.5, -127, 127).astype(np.int8)
    codes[:3] = 127
    codes[3:6] = -127
    scales = np.full((n, k // 64), 0.5, np.float32)
    X = np.where(rng.random((9, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    X[0], X[1] = 1.0, -1.0
    got = _q8_run(variant, codes, scales, X)
    assert np.array_equal(_bits(got), _bits(_q8_twin(codes, scales, X)))
    # x quantizes to +-127 with xs = 1 / 127 / 64, each block's even entries first (the codes'
    # order): y = sum of codes * 127 * xs * 0.5, exactly
    x = np.sign(X).reshape(9, -1, 32, 2).transpose(0, 1, 3, 2).reshape(9, k)
    exact = (codes.astype(np.float64) @ x.T.astype(np.float64)).T * 127 * (1 / 127 / 64) * 0.5
    assert np.allclose(got, exact, rtol=1e-6)


def test_avx2_gemm_refuses_codes_it_cannot_offset():
    """avx2 offsets the codes by 64 into unsigned bytes: a table beyond -64 .. 64 is an error, not
    wrong sums."""
    rng = np.random.default_rng(4)
    q = _weight(rng, 16, 64, 64)
    qscale, nested, nshift, offset = q.scale_args()
    table = (I8.NF4_I8.astype(np.int32) * 2 - (I8.NF4_I8 < 0)).clip(-127, 127).astype(np.int8)
    XQ, _, XS = I8.quantize_activations(_activations(rng, 13, 64), 64)
    with pytest.raises(ValueError, match="-64 .. 64"):
        G.gemm("avx2", table, G.Tiles((table, DYNAMIC_CODE, q.packed, qscale, nested, nshift, offset, 64), 16, 64), XQ,
               XS, 1)


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
def test_long_prompts_and_row_independence(variant):
    """1..300 tokens: the twin's bits, and each token's row the same whatever tokens come with it
    (so a prompt gives the same products in one chunk or several)."""
    rng = np.random.default_rng(7)
    q = _weight(rng, 37, 256, 64)
    X = _activations(rng, 300, 256)
    whole = _run(variant, q, X, 2)
    assert np.array_equal(_bits(whole), _bits(_twin(q, X)))
    for a, b in ((0, 1), (5, 18), (100, 137), (299, 300)):
        assert np.array_equal(_bits(_run(variant, q, X[a:b])), _bits(whole[a:b]))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 48), per_row=st.integers(1, 5), bs=st.sampled_from([64, 128]), dq=st.booleans(),
       T=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_gemm_within_the_derived_bound_of_exact(n, per_row, bs, dq, T, seed):
    """The decode path's bound (tests/test_int8.py: codes within 0.5/64, x within half a step)
    holds for the GEMM too: it quantizes alike and only sums in another order."""
    rng = np.random.default_rng(seed)
    k = per_row * bs
    q = _weight(rng, n, k, bs, dq)
    X = _activations(rng, T, k)
    exact = X.astype(np.float64) @ q.dequantize_reference().astype(np.float64).T  # [T, n]
    assert (np.abs(_twin(q, X).astype(np.float64) - exact) <= _error_bound(q, X)).all()


@pytest.mark.parametrize("threaded", [False, True])
def test_linear_matmul_dispatch(monkeypatch, threaded):
    """NF4Int8Linear.matmul: one row is ``matvec``; fewer than GEMM_MIN_ROWS rows ``matvec_batch``;
    from there the GEMM where this CPU has a SIMD variant (else the exact path's split). Tiled
    weights: every row count the GEMM's bits."""
    if threaded:
        monkeypatch.setattr(K, "PARALLEL_MIN_WEIGHTS", 0)
    rng = np.random.default_rng(11)
    q = _weight(rng, 90, 320, 64)
    lin = I8.NF4Int8Linear(q)
    X = _activations(rng, 70, 320)
    batch = I8.nf4_int8_matvec_batch_reference(q, X)
    assert np.array_equal(_bits(lin.matmul(X[:1])), _bits(lin.matvec(X[0])[None]))
    short = I8.GEMM_MIN_ROWS - 1
    assert np.array_equal(_bits(lin.matmul(X[:short])), _bits(batch[:short]))
    if not G.INT8_GEMM_SIMD:
        pytest.skip("no SIMD GEMM on this CPU: prompts keep the exact path's split")
    gemm = I8.nf4_int8_matmul_reference(q, X)
    for T in (1, 2, 5, I8.GEMM_MIN_ROWS, 33, 70):
        assert np.array_equal(_bits(lin.matmul(X[:T])), _bits(gemm[:T]))


def test_unaligned_bytes_are_read_as_words():
    raw = np.zeros(4 * 64 + 1, np.uint8)
    raw[1:] = np.arange(256, dtype=np.uint8)
    w = G.words(raw[1:])
    assert w.dtype == np.uint32 and w.ctypes.data % 4 == 0 and np.array_equal(w.view(np.uint8), raw[1:])


# ---------------------------------------------------------------------------------------------
# models: the tolerance of tests/test_int8.py, on prompts that take the GEMM
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Converted(tmp_path_factory, seed=0)


def _prefill_within_tolerance(bundle, src, T: int = 40):
    import torch
    import transformers
    exact = edgelora.load(bundle, max_context=T + 8, warmup=False, products="exact")
    # (a float32 cache, as exact's: the bound measures the products' error alone)
    int8 = edgelora.load(bundle, max_context=T + 8, warmup=False, products="int8", kv_cache="float32")
    takes = any(lin.int8 for L in int8.net.w.layers for lin in vars(L).values() if isinstance(lin, I8.NF4Int8Linear))
    ids = np.random.default_rng(1).integers(0, exact.args.vocab_size, T)
    le, li = exact.logits(ids), int8.logits(ids)
    if not takes:
        assert np.array_equal(le, li)
        return int8
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        lf = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert_logits_within_tolerance(le, li, lf)
    return int8


@pytest.mark.skipif(not G.INT8_GEMM_SIMD, reason="no SIMD GEMM on this CPU: prompts keep the exact path")
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_int8_prefill_within_tolerance_on_every_architecture(converted, arch):
    src, bundle = converted(arch)
    _prefill_within_tolerance(bundle, src)


@pytest.mark.skipif(not G.INT8_GEMM_SIMD, reason="no SIMD GEMM on this CPU: prompts keep the exact path")
def test_int8_prefill_on_stories260k_and_greedy_consistency(stories260k, tmp_path):
    """Within tolerance on a real model; and greedy generation (prompt by the GEMM, each new token
    by the decode kernel) picks, wherever the margin is clear, the token the GEMM's prefill of the
    whole text ranks first: the two int8 kernels agree."""
    edgelora.convert(stories260k, tmp_path / "b")
    model = _prefill_within_tolerance(tmp_path / "b", stories260k)
    prompt = model.tokenizer.encode("Once upon a time, there was a little girl named Lily. She")
    generated = _greedy_ids(model, prompt, 24)
    full = np.asarray(prompt + generated)
    logits = model.logits(full)[len(prompt) - 1:-1]  # [24, V]: the GEMM's prefill of the whole text
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05 * np.abs(logits).max()
    assert clear.sum() >= len(generated) // 2
    assert np.array_equal(logits.argmax(1)[clear], np.asarray(generated)[clear])


def _greedy_ids(model, prompt: list, n: int) -> list:
    """n greedy token ids after ``prompt``: one prefill, then decode steps."""
    cache = model.net.new_cache()
    logits = model.net.forward(np.asarray(prompt), cache)[-1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.net.forward(np.asarray(out[-1:]), cache)[-1]
    return out


def test_int8_is_the_default_chosen_by_perplexity(converted):
    """README, *The int8 product path*: the perplexity cost measured on the real models at hand
    (0.08-0.20 %) is under the 0.5 % allowed, so ``load`` multiplies through int8 unless told
    ``products="exact"``."""
    from edgelora.products import DEFAULT_PRODUCTS
    _, bundle = converted("llama3")
    assert DEFAULT_PRODUCTS == "int8"
    assert edgelora.load(bundle, max_context=16, warmup=False).products == "int8"
    assert edgelora.load(bundle, max_context=16, warmup=False, products="exact").products == "exact"


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
@pytest.mark.parametrize("per_row", [255, 256, 257, 300])
def test_scale_codes_up_to_a_register_of_nested_scales(variant, per_row):
    """A double-quantized weight's tiles hold its blocks' 8-bit scale codes, decoded 16 (8) rows at a
    time, while the rows' nested scales lie within a register's width (their one load and permute:
    a row of up to 256 blocks under nested blocks of 256); past it, float32 scales. Both give the
    twin's bits, rows past the last whole register too."""
    rng = np.random.default_rng(per_row)
    q = _weight(rng, 37, per_row * 64, 64)
    X = _activations(rng, 3, per_row * 64)
    assert G.codes_fit(per_row, 8) == (per_row <= 256)
    assert np.array_equal(_bits(_run(variant, q, X, 2)), _bits(_twin(q, X)))


@pytest.mark.parametrize("dq", [True, False])
def test_tiles_hold_the_scales_as_stored(dq):
    """With double quantization the tiles hold each block's stored scale code (one byte a block,
    rows past n code 0) and a copy of the nested scales padded with zeros; without it each block's
    float32 absmax (rows past n 0). ``nbytes`` is what ``tiles_nbytes`` plans."""
    n, per_row = 37, 6
    q = _weight(np.random.default_rng(5), n, per_row * 64, 64, dq)
    qscale, nested, nshift, offset = q.scale_args()
    tiles = G.Tiles((I8.NF4_I8, DYNAMIC_CODE, q.packed, qscale, nested, nshift, offset, 64), n, per_row * 64)
    rows = -(-n // 16) * 16
    held = tiles.sc.reshape(rows // 16, per_row, 16).transpose(0, 2, 1).reshape(rows, per_row)
    want = np.asarray(qscale).reshape(n, per_row) if dq else q.absmax().reshape(n, per_row)
    assert tiles.sc.dtype == (np.uint8 if dq else np.float32)
    assert np.array_equal(held[:n], want) and not held[n:].any()
    if dq:
        assert np.array_equal(tiles.nested[:nested.size], nested) and not tiles.nested[nested.size:].any()
    assert tiles.nbytes == G.tiles_nbytes(n, per_row * 64, 64, nested_block_size=256 if dq else 0)


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
def test_every_scale_code_decodes_to_the_twins_bits(variant):
    """Every one of the 256 scale codes, decoded in the tile kernel (each of the permutes and
    selects of the 16-lane lookup, the gather of the 8-lane one), for one token, a few and a
    prompt's tiles of 16: the twin's bits."""
    rng = np.random.default_rng(11)
    q = _weight(rng, 37, 8 * 64, 64)
    q = dataclasses.replace(q, scales=(np.arange(q.scales.size) * 7 % 256).astype(np.uint8))
    assert set(q.scales.tolist()) == set(range(256))
    for T in (1, 3, 40):
        X = _activations(rng, T, 8 * 64)
        assert np.array_equal(_bits(_run(variant, q, X, 2)), _bits(_twin(q, X)))


@pytest.mark.parametrize("variant", sorted(G.DECODED_ONCE.keys() & G.INT8_GEMM_VARIANTS.keys()))
@pytest.mark.parametrize("n, per_row, bs, threads", [(70, 3, 64, 1), (33, 2, 128, 3), (80, 5, 64, 2), (7, 1, 256, 1)])
def test_a_prompts_scales_decoded_once_give_the_twins_bits(variant, n, per_row, bs, threads, monkeypatch):
    """A prompt of two whole tiles of tokens or more over scale codes runs those tiles with the
    scales decoded once a call (``DECODED_ONCE``), the tokens past them as before: the twin's bits
    either way, with rows past the last whole group, groups split between threads, random codes."""
    calls = []
    once, step = G.DECODED_ONCE[variant]

    def counted(*args):
        calls.append(args[13].shape[0])  # (its XQ: the whole tiles' tokens)
        once(*args)

    monkeypatch.setitem(G.DECODED_ONCE, variant, (counted, step))
    rng = np.random.default_rng(n)
    q = _weight(rng, n, per_row * bs, bs)
    q = dataclasses.replace(q, scales=rng.integers(0, 256, q.scales.size).astype(np.uint8))
    for T in (step, 2 * step, 3 * step + 5):
        calls.clear()
        X = _activations(rng, T, per_row * bs)
        assert np.array_equal(_bits(_run(variant, q, X, threads)), _bits(_twin(q, X)))
        assert calls == ([] if T < 2 * step else [T - T % step] * min(threads, -(-n // G.GEMM_ROWS)))


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
@pytest.mark.parametrize("k, bs, dq", [(4096, 64, True), (8192, 128, False)])
def test_rows_a_multiple_of_4kb_are_copied_a_line_apart_with_the_twins_bits(variant, k, bs, dq):
    """A prompt whose rows are a multiple of 4 KB long is multiplied from a copy whose rows lie a
    cache line apart (``padded_rows``: the kernels step by the copy's stride): the twin's bits,
    for whole tiles of tokens and a rest, rows past the last whole group, two threads; one decode
    row, other lengths and few tokens are not copied."""
    rng = np.random.default_rng(k)
    q = _weight(rng, 37, k, bs, dq)
    X = _activations(rng, 2 * G.GEMM_WIDE_TOKENS + 3, k)
    assert np.array_equal(_bits(_run(variant, q, X, 2)), _bits(_twin(q, X)))
    XQ = I8.quantize_activations(X, bs)[0]
    rows, stride = G.padded_rows(XQ)
    assert stride == k + 64 and rows.shape == (X.shape[0], k + 64) and np.array_equal(rows[:, :k], XQ)
    for few in (XQ[:1], XQ[:2 * G.GEMM_TOKENS - 1], np.ascontiguousarray(XQ[:, :k - bs])):
        same, n = G.padded_rows(few)
        assert same is few and n == few.shape[1]


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_weights_in_one_call_give_each_ones_bits(variant, threads):
    """``gemm_many`` (a layer's q, k and v in one call: their row groups one run split between the
    threads, shares that cross from one weight to the next, the last on the calling thread) gives
    each weight the twin's bits, for a prompt of whole tiles and a rest, and one token; weights of
    different block sizes are refused."""
    rng = np.random.default_rng(threads)
    qs = [_weight(rng, n, 3 * 64, 64, dq) for n, dq in ((70, True), (16, True), (33, False), (5, True))]
    tiles = [G.Tiles((I8.NF4_I8, DYNAMIC_CODE, q.packed, *q.scale_args(), 64), *q.shape) for q in qs]
    pool = K._pool(threads) if threads > 1 else None
    for T in (1, 37):
        X = _activations(rng, T, 3 * 64)
        XQ, _, XS = I8.quantize_activations(X, 64)
        outs = G.gemm_many(variant, I8.NF4_I8, tiles, XQ, XS, threads, pool)
        assert [o.shape for o in outs] == [(T, q.shape[0]) for q in qs]
        for q, got in zip(qs, outs):
            assert np.array_equal(_bits(got), _bits(_twin(q, X)))
    other = _weight(rng, 16, 128, 128)
    with pytest.raises(ValueError, match="one block size"):
        G.gemm_many(variant, I8.NF4_I8, tiles[:1] + [G.Tiles((I8.NF4_I8, DYNAMIC_CODE, other.packed, *other.scale_args(),
                                                                128), *other.shape)], XQ, XS, threads, pool)


def _on_large_pages(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of a ``large_pages`` mapping (an anonymous ``mmap``)."""
    import mmap
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def _mapped(address: int) -> bool:
    """Whether ``address`` lies in one of this process's mappings (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        return any(int(lo, 16) <= address < int(hi, 16) for lo, hi in (line.split()[0].split("-") for line in f))


@pytest.mark.skipif(not LP.AVAILABLE, reason="large pages are asked for on Linux only")
def test_large_page_arrays_start_on_a_boundary_and_are_given_back():
    """``large_pages.empty``: an array of 2 MB or more starts on a 2 MB boundary, holds what is
    written to it, is no longer than asked (a view of a run rounded up to 4 KB) and is unmapped
    once it and every view of it are gone; a smaller array is NumPy's own."""
    import gc
    n = (5 << 20) // 4 + 3
    a = LP.empty(n, np.uint32)
    assert a.shape == (n,) and a.dtype == np.uint32 and a.flags.writeable and a.flags.c_contiguous
    assert _on_large_pages(a) and a.ctypes.data % LP.LARGE_PAGE == 0
    a[:] = np.arange(n, dtype=np.uint32)
    view, address = a[-10:], a.ctypes.data
    del a
    gc.collect()
    assert _mapped(address) and np.array_equal(view, np.arange(n - 10, n, dtype=np.uint32))
    del view
    gc.collect()
    assert not _mapped(address)
    small = LP.empty(1000, np.int32)
    assert small.shape == (1000,) and not _on_large_pages(small)


def test_large_pages_fall_back_to_numpy(monkeypatch):
    """Without ``MADV_HUGEPAGE`` (not Linux) or when a mapping fails, ``empty`` is ``np.empty``."""
    def refused(nbytes):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(LP, "_mapped", refused)
    a = LP.empty(3 << 20, np.int8)
    assert a.shape == (3 << 20,) and not _on_large_pages(a)
    monkeypatch.setattr(LP, "AVAILABLE", False)
    a = LP.empty(3 << 20, np.int8)
    assert a.shape == (3 << 20,) and not _on_large_pages(a)


@pytest.mark.parametrize("variant", sorted(G.INT8_GEMM_VARIANTS))
def test_tiles_of_2mb_and_more_lie_on_large_pages_with_the_twins_bits(variant):
    """NF4 and int8-code tiles of 2 MB and more are held on large pages where the system has them
    (``large_pages``: the pages a decode step streams change no bit): a prompt and one token through
    each give the twin's bits, on two threads."""
    rng = np.random.default_rng(11)
    k = 2048
    q = _weight(rng, 2 * G.GEMM_ROWS * 64 + 5, k, 64)  # 2 MB of codes and some
    codes = rng.integers(-127, 128, (G.GEMM_ROWS * 64 + 7, k)).astype(np.int8)
    scales = (rng.random((codes.shape[0], k // 64)) + 0.01).astype(np.float32)
    tiles = G.Tiles((I8.NF4_I8, DYNAMIC_CODE, q.packed, *q.scale_args(), 64), *q.shape)
    q8 = G.Q8Tiles(codes.shape[0], k, 64)
    q8.put(0, codes, scales)
    assert tiles.rep.nbytes >= LP.MIN_BYTES and q8.rep.nbytes >= LP.MIN_BYTES
    if LP.AVAILABLE:
        assert _on_large_pages(tiles.rep) and _on_large_pages(q8.rep)
    for T in (1, G.GEMM_WIDE_TOKENS + 3):
        X = _activations(rng, T, k)
        assert np.array_equal(_bits(_run(variant, q, X, 2)), _bits(_twin(q, X)))
        assert np.array_equal(_bits(_q8_run(variant, codes, scales, X, 2)), _bits(_q8_twin(codes, scales, X)))
