"""Compiled decode steps (``runtime/decode.py``): each piece against its NumPy twin in
``runtime/llama.py``, the one-call step of every layer bit for bit against the same pieces run one
by one (and on any thread count), and whole decode steps against the NumPy layer."""

from __future__ import annotations

import numpy as np
import pytest

import edgelora
from edgelora.runtime import decode, llama
from edgelora.runtime.lora import BASE
from tiny_models import CONFIGS, close, make_checkpoint

F32 = np.float32


def test_rmsnorm_rows_equals_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 203)) * np.array([[1e-3], [1.0], [30.0], [0.0]])).astype(F32)  # a zero row too
    w = rng.standard_normal(203).astype(F32)
    got = decode.rmsnorm_rows(x, w, F32(1e-5), np.empty_like(x))
    ref = llama.rmsnorm(x, w, 1e-5)
    np.testing.assert_allclose(got, ref, rtol=3e-6, atol=1e-30)
    assert not got[3].any()


def test_silu_mul_equals_numpy():
    rng = np.random.default_rng(1)
    g = (rng.standard_normal((3, 300)) * 20).astype(F32)
    g[0, :4] = [-200.0, -90.0, 0.0, 100.0]  # exp(-g) overflows: g / inf = -0, as silu's limit
    u = rng.standard_normal((3, 300)).astype(F32)
    got = decode.silu_mul(g, u, np.empty_like(g))
    np.testing.assert_allclose(got, llama.silu(g) * u, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_pieces_have_their_numpy_twins_bits(threads):
    """A prompt's rotary (``decode.rope_rows``, partial rotary too), RMSNorm's last step
    (``decode.scale_rows``), a prompt's SwiGLU (``silu_mul_rows``) and its activations' int8 codes
    (``int8.quantize_activations``) give the bits of their NumPy twins (the same float operations),
    on any thread count (rows shared between the threads)."""
    from edgelora.runtime.threads import thread_count
    rng = np.random.default_rng(7)
    with thread_count(threads):
        for T, heads, hd, rd in ((1, 2, 8, 8), (37, 4, 64, 64), (300, 3, 96, 32)):
            x = (rng.standard_normal((T, heads, hd)) * 5).astype(F32)
            ang = rng.standard_normal((T, rd // 2)).astype(F32)
            cos, sin = (np.concatenate([f(ang)] * 2, axis=1).astype(F32) for f in (np.cos, np.sin))
            got, ref = llama.rope(x, cos, sin), llama.rope_reference(x, cos, sin)
            assert got.shape == ref.shape and np.array_equal(got.view(np.int32), ref.view(np.int32))
            xs = x[:, ::2]  # strided rows: copied before the kernel
            assert np.array_equal(llama.rope(xs, cos, sin), llama.rope_reference(xs, cos, sin))
        for T, H in ((1, 5), (129, 203), (600, 256)):
            x = (rng.standard_normal((T, H)) * 3).astype(F32)
            x[0] = 0.0  # a zero row: 0 / sqrt(eps)
            w = rng.standard_normal(H).astype(F32)
            assert np.array_equal(llama.rmsnorm(x, w, 1e-6).view(np.int32), llama.rmsnorm_reference(x, w, 1e-6).view(np.int32))
        g = (rng.standard_normal((300, 700)) * 20).astype(F32)
        g[0, :3] = [-200.0, 0.0, 100.0]
        u = rng.standard_normal((300, 700)).astype(F32)
        one = decode.silu_mul(g, u, np.empty_like(g))
        assert np.array_equal(decode.silu_mul_rows(g, u).view(np.int32), one.view(np.int32))
        # a prompt's quantization of x, its rows shared between the threads as the SwiGLU's
        from edgelora.runtime.int8 import quantize_activations, quantize_activations_reference
        for got, ref in zip(quantize_activations(g[:, :640], 64), quantize_activations_reference(g[:, :640], 64)):
            assert got.dtype == ref.dtype and np.array_equal(got.view(np.uint8), ref.view(np.uint8))


def test_vector_dot_has_the_scalar_dots_bits():
    """``_dot_at`` (explicit 8-float vectors: a decode row's attention scores) gives ``_dot``'s bits
    (eight scalar partial sums added pairwise, then the rest), at any offset and length."""
    from numba import njit

    @njit
    def both(a, b, b0, n):
        return decode._dot_at(a, b, np.uint64(b0), np.uint64(n)), decode._dot(a, b[b0:], n)

    rng = np.random.default_rng(3)
    for n in (1, 7, 8, 9, 64, 67, 128):
        a = (rng.standard_normal(n) * 10).astype(F32)
        b = (rng.standard_normal(n + 40) * 10).astype(F32)
        for b0 in (0, 3, 40):
            vec, scalar = both(a, b, b0, n)
            assert np.float32(vec).view(np.int32) == np.float32(scalar).view(np.int32), (n, b0, vec, scalar)


def score_twin(q: np.ndarray, k: np.ndarray) -> np.float32:
    """The NumPy twin of one attention score (``decode._head_dots``): lane ``i mod 16`` of 16
    float32 partial sums over the whole steps of 16 (a product, then a sum), the lanes added
    pairwise (halves: 16 -> 8 -> 4 -> 2 -> 1), then the rest one by one."""
    n = q.size
    whole = n - n % decode.SCORE_LANES
    lanes = np.zeros(decode.SCORE_LANES, F32)
    for i in range(0, whole, decode.SCORE_LANES):
        lanes = lanes + q[i:i + decode.SCORE_LANES] * k[i:i + decode.SCORE_LANES]
    while lanes.size > 1:
        lanes = lanes[:lanes.size // 2] + lanes[lanes.size // 2:]
    t = lanes[0]
    for i in range(whole, n):
        t = F32(t + q[i] * k[i])
    return t


@pytest.mark.parametrize("kind", ["float32", "float16"])
@pytest.mark.parametrize("heads,keys", [(1, 1), (2, 2), (4, 4), (3, 2)])
def test_scores_of_several_heads_and_keys_have_the_twins_bits(heads, keys, kind):
    """``_head_dots`` (several queries against several keys, independent sums, each key loaded once
    for all the queries) gives every score the bits of its NumPy twin, at any offsets, strides and
    lengths, and writes nothing else; keys of a float16 cache (their bits) widened exactly."""
    from numba import njit

    dots = decode._head_dots(heads, keys)

    @njit
    def run(q, q0, qstep, k, k0, kstep, n, s, s0, sstep):
        u = np.uint64
        dots(q, u(q0), u(qstep), k, u(k0), u(kstep), u(n), s, u(s0), u(sstep))

    rng = np.random.default_rng(5)
    for n in (1, 7, 16, 17, 64, 67, 128, 256):
        for qstep, kstep in ((n, n), (n + 5, 4 * n + 3)):
            q = (rng.standard_normal(2 + heads * qstep + n) * 10).astype(F32)
            k = (rng.standard_normal(3 + keys * kstep + n) * 10).astype(kind)
            sstep = keys + 2
            s = np.full(1 + heads * sstep, F32(7.0))
            run(q, 2, qstep, k.view(np.uint16) if kind == "float16" else k, 3, kstep, n, s, 1, sstep)
            k = k.astype(F32)
            want = np.full_like(s, F32(7.0))
            for h in range(heads):
                for c in range(keys):
                    want[1 + h * sstep + c] = score_twin(q[2 + h * qstep:2 + h * qstep + n],
                                                         k[3 + c * kstep:3 + c * kstep + n])
            np.testing.assert_array_equal(s.view(np.int32), want.view(np.int32), err_msg=str((n, qstep, kstep)))


@pytest.mark.parametrize("kind", ["float32", "float16"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_weighted_sums_of_values_have_the_numpy_loops_bits(heads, kind):
    """``_weighted_sums`` (heads' attention outputs: their outputs held in registers while the
    positions run, each value loaded once for all the heads) gives each head the bits of the loop
    ``out[d] += p[j] * v[j, d]`` for j in order from 0.0, here in NumPy float32: every width (runs
    of 64, of 8, single outputs), offset, stride and count of positions; nothing else written."""
    from numba import njit

    sums = decode._weighted_sums(heads)

    @njit
    def run(p, p0, pstep, v, v0, vstep, n, width, o, o0, ostep):
        u = np.uint64
        sums(p, u(p0), u(pstep), v, u(v0), u(vstep), u(n), u(width), o, u(o0), u(ostep))

    rng = np.random.default_rng(6)
    for width in (1, 3, 8, 13, 64, 72, 80, 128, 130):
        for n, step, v0 in ((1, width, 0), (5, width + 3, 2), (300, 4 * width, 5)):
            p = rng.random(1 + heads * (n + 1)).astype(F32)
            v = (rng.standard_normal(v0 + (n - 1) * step + width + 4) * 10).astype(kind)
            ostep = width + 2
            out = np.full(3 + heads * ostep, F32(7.0))
            run(p, 1, n + 1, v.view(np.uint16) if kind == "float16" else v, v0, step, n, width, out, 3, ostep)
            v = v.astype(F32)
            want = np.full_like(out, F32(7.0))
            for h in range(heads):
                ref = np.zeros(width, F32)
                for j in range(n):
                    ref = ref + p[1 + h * (n + 1) + j] * v[v0 + j * step:v0 + j * step + width]
                want[3 + h * ostep:3 + h * ostep + width] = ref
            np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32), err_msg=str((width, n, step)))


def test_a_float16_caches_rounding_is_numpys():
    """``_to_cache`` (a decode step's keys and values stored in a float16 cache) rounds float32 to
    float16 as NumPy's ``astype`` does (to nearest, ties to even; overflow to inf, subnormals,
    signed zeros, NaN kept NaN): the prompt's keys, stored by NumPy, round alike."""
    from numba import njit

    @njit
    def rounded(x, out):
        for i in range(x.size):
            out[i] = decode._to_cache(x[i], out)
        return out

    rng = np.random.default_rng(8)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 2_000_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000, 0x33800000, 97, dtype=np.uint32),  # float16's subnormal range
                           np.arange(0x477fe000, 0x47800100, 1, dtype=np.uint32)])  # at float16's largest
    x = np.concatenate([bits.view(F32), np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 6e-8, 3e-8], F32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    got = rounded(x, np.empty(x.size, np.uint16)).view(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


@pytest.mark.parametrize("case", ["gqa", "mqa, long", "window", "scale and soft-cap"])
def test_attend_row_over_a_float16_cache(case):
    """A float16 cache: the step's key and value stored rounded as NumPy rounds them, and the
    attention that of the reference over the rounded cache (each key and value widened exactly)."""
    nkv, group, hd, rd, pos, window, scale, cap = ROW_CASES[case]
    nh, S = nkv * group, pos + 5
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((n, hd)).astype(F32) for n in (nh, nkv, nkv))
    K, V = (rng.standard_normal((nkv, S, hd)).astype(np.float16) for _ in range(2))
    inv = (1.0 / 10000.0 ** (np.arange(0, rd, 2) / rd)).astype(F32)
    cos, sin = llama.rope_tables(inv, S)
    Kr, Vr = K.copy(), V.copy()
    Kr[:, pos] = llama.rope(k[None], cos[pos:pos + 1], sin[pos:pos + 1])[0]
    Vr[:, pos] = v
    qr = llama.rope(q[None], cos[pos:pos + 1], sin[pos:pos + 1])
    keys, values = (a[:, :pos + 1].astype(F32).transpose(1, 0, 2) for a in (Kr, Vr))
    ref = llama.attention_reference(qr, keys, values, np.array([pos]), window or None, scale, cap or None)[0]
    s, divide = (F32(np.sqrt(hd)), True) if scale is None else (F32(scale), False)
    out = np.empty(nh * hd, F32)
    decode.attend_row(q, k, v, K.view(np.uint16), V.view(np.uint16), pos, cos[pos], sin[pos], rd, window, s, divide,
                      F32(cap), 2, out)
    np.testing.assert_array_equal(K.view(np.uint16), Kr.view(np.uint16))
    np.testing.assert_array_equal(V.view(np.uint16), Vr.view(np.uint16))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)


def test_exp_is_within_3_ulps_of_numpy():
    """``decode._exp`` (the vectorizable exp of silu_mul) against NumPy's float32 exp: every normal
    result within 3 ulps, overflow to inf and underflow to 0 where NumPy's are, NaN kept."""
    from numba import njit

    @njit
    def exps(x, out):
        for i in range(x.size):
            out[i] = decode._exp(x[i])
        return out

    x = np.concatenate([np.linspace(-110, 95, 400_001, dtype=F32), (np.random.default_rng(2).standard_normal(10_000) * 30).astype(F32),
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, 88.7228, -87.3, -103.9], F32)])
    got = exps(x, np.empty_like(x))
    with np.errstate(over="ignore"):
        ref = np.exp(x)
    normal = np.isfinite(ref) & (ref >= np.finfo(F32).tiny)
    ulps = np.abs(got[normal].view(np.int32).astype(np.int64) - ref[normal].view(np.int32).astype(np.int64))
    assert ulps.max() <= 3, ulps.max()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.abs(got[~normal & np.isfinite(ref)] - ref[~normal & np.isfinite(ref)]).max() <= 1e-44  # denormals: 0 .. 7 of the last ulp


# nkv, group, hd, rotated dims, position, window (0: none), scale (None: / sqrt(hd)), soft-cap (0: none)
ROW_CASES = {
    "gqa": (2, 4, 16, 16, 37, 0, None, 0.0),
    "first position": (2, 2, 8, 8, 0, 0, None, 0.0),
    "mqa, long": (1, 8, 64, 64, 700, 0, None, 0.0),
    "window": (2, 2, 16, 16, 50, 7, None, 0.0),
    "window of 1": (1, 2, 8, 8, 9, 1, None, 0.0),
    "window beyond the start": (2, 2, 16, 16, 4, 30, None, 0.0),
    "partial rotary": (1, 3, 32, 16, 20, 0, None, 0.0),
    "scale and soft-cap": (2, 2, 32, 32, 60, 8, 16 ** -0.5, 5.0),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_attend_row_equals_rope_and_reference_attention(case):
    nkv, group, hd, rd, pos, window, scale, cap = ROW_CASES[case]
    nh, S = nkv * group, pos + 5
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((n, hd)).astype(F32) for n in (nh, nkv, nkv))
    K, V = (rng.standard_normal((S, nkv, hd)).astype(F32) for _ in range(2))  # keys after pos: never read
    inv = (1.0 / 10000.0 ** (np.arange(0, rd, 2) / rd)).astype(F32)
    cos, sin = llama.rope_tables(inv, S)

    Kr, Vr = K.copy(), V.copy()
    Kr[pos] = llama.rope(k[None], cos[pos:pos + 1], sin[pos:pos + 1])[0]
    Vr[pos] = v
    qr = llama.rope(q[None], cos[pos:pos + 1], sin[pos:pos + 1])
    ref = llama.attention_reference(qr, Kr[:pos + 1], Vr[:pos + 1], np.array([pos]), window or None, scale,
                                    cap or None)[0]

    if scale is None:
        s, divide = F32(np.sqrt(hd)), True
    else:
        s, divide = F32(scale), False
    Kc, Vc = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (K, V))  # the cache's layout: [nkv, S, hd]
    out = np.empty(nh * hd, F32)
    decode.attend_row(q, k, v, Kc, Vc, pos, cos[pos], sin[pos], rd, window, s, divide, F32(cap), 2, out)
    # the rotated key stored at pos (rotary: the same operations), nothing else
    np.testing.assert_array_equal(Kc.transpose(1, 0, 2), Kr)
    np.testing.assert_array_equal(Vc.transpose(1, 0, 2), Vr)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)

    # each head's bits its own: for one thread a group's heads run together, for more (where there
    # are fewer key-value heads than threads) a group is split in parts
    for threads in (1, 3, 8):
        again = np.empty_like(out)
        decode.attend_row(q, k, v, Kc, Vc, pos, cos[pos], sin[pos], rd, window, s, divide, F32(cap), threads, again)
        np.testing.assert_array_equal(again.view(np.int32), out.view(np.int32))


# tiny models whose every width is a multiple of 64, so that every projection takes the int8 path
# and the one-call step runs: a Llama, a Qwen2 (q, k, v biases) and a Mistral with a short window
FUSED = {
    "fused_llama": dict(CONFIGS["llama3"], hidden_size=128, intermediate_size=256, num_hidden_layers=3),
    "fused_qwen2": dict(CONFIGS["qwen2"], hidden_size=128, intermediate_size=192),
    "fused_mistral": dict(CONFIGS["mistral"], hidden_size=128, intermediate_size=192, sliding_window=5),
    # products big enough for the threads (PARALLEL_MIN_WEIGHTS): q, k and v of 16 row groups
    # each, split between 2 threads as one run of 48, so the split falls inside k
    "fused_wide": dict(CONFIGS["llama3"], hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_key_value_heads=8),
}


@pytest.fixture(scope="module")
def fused_bundles(tmp_path_factory):
    made = {}
    for name, spec in FUSED.items():
        CONFIGS[name] = spec
        try:
            d = tmp_path_factory.mktemp(name)
            src = make_checkpoint(d / "src", name, seed=3)
            edgelora.convert(src, d / "bundle")
        finally:
            del CONFIGS[name]
        made[name] = d / "bundle"
        made[name + "/src"] = src
    return made


def _decode(model, prompt, steps, tokens):
    """Logits of ``steps`` one-token forwards after ``prompt``, feeding ``tokens``; and the cache."""
    net = model.net
    cache = net.new_cache()
    with model._running():
        net.forward(np.asarray(prompt), cache)
        out = [net.forward(np.array([t]), cache)[0] for t in tokens[:steps]]
    return np.stack(out), cache


@pytest.mark.parametrize("kv_cache", ["float32", "float16"])
@pytest.mark.parametrize("name", list(FUSED))
def test_one_call_step_equals_the_pieces_bit_for_bit(fused_bundles, name, kv_cache):
    bundle = fused_bundles[name]
    rng = np.random.default_rng(4)
    prompt, tokens = rng.integers(3, 80, 9), rng.integers(3, 80, 12)
    fused = edgelora.load(bundle, max_context=64, threads=2, kv_cache=kv_cache)
    assert fused.net.compiled_layers is not None, "every projection should take the int8 path"
    assert fused.net.new_cache().k.dtype == np.dtype(kv_cache)
    pieces = edgelora.load(bundle, max_context=64, threads=2, kv_cache=kv_cache)
    pieces.net._compiled_layers = None  # the layer loop of decode_layer, with the same compiled pieces
    one_thread = edgelora.load(bundle, max_context=64, threads=1, kv_cache=kv_cache)
    a, ca = _decode(fused, prompt, 12, tokens)
    b, cb = _decode(pieces, prompt, 12, tokens)
    c, _ = _decode(one_thread, prompt, 12, tokens)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(ca.k, cb.k)
    np.testing.assert_array_equal(ca.v, cb.v)

    # rows of one sequence in one call (a speculative step's verification) are its decode steps
    net, cache = fused.net, fused.net.new_cache()
    with fused._running():
        net.forward(np.asarray(prompt), cache)
        rows = net.forward_steps(np.asarray(tokens[:4]), cache)
    np.testing.assert_array_equal(rows, a[:4])

    # against the NumPy layer (llama.rmsnorm, rope, attention_reference, silu): the same maths
    numpy_layers = edgelora.load(bundle, max_context=64, kv_cache=kv_cache)
    numpy_layers.net.compiled_decode = False
    d, cd = _decode(numpy_layers, prompt, 12, tokens)
    if kv_cache == "float32":
        assert close(a, d), np.abs(a - d).max()
    else:  # a key or value whose two float32 results (2^-23 apart) straddle a float16 rounding boundary
        # differs by a float16 ulp (2^-10 relative) between the paths: 1e-2 of the logits' scale
        # (measured: at most 3.8e-3 on these models)
        assert np.abs(a - d).max() <= 1e-2 * max(1.0, np.abs(d).max()), np.abs(a - d).max()
        # the steps' keys as stored: most bits equal (the two paths' float32 keys differ in their
        # last bits, so a few round to the neighbouring float16)
        assert np.mean(cd.k[:, :, 9:21] == ca.k[:, :, 9:21]) > 0.9


def test_a_base_row_beside_an_adapter_row_is_the_one_call_step(fused_bundles, tmp_path):
    """A batch with an adapter runs the layer loop of pieces: its base row equals the base alone,
    which ran the one-call step."""
    from tiny_models import make_adapter
    adapter = make_adapter(fused_bundles["fused_llama/src"], tmp_path / "ad", seed=1, r=4, target_modules="all-linear")
    model = edgelora.load(fused_bundles["fused_llama"], max_context=64)
    model.adapters.load("a", adapter)
    net, sel = model.net, model.adapters.select("a")
    assert not sel.is_base
    prompt = [5, 6, 7, 8]
    with model._running():
        alone = net.new_cache()
        net.forward(np.asarray(prompt), alone)
        ref = net.forward(np.array([9]), alone)[0]  # the one-call step
        c0, c1 = net.new_cache(), net.new_cache()
        net.forward(np.asarray(prompt), c0)
        net.forward(np.asarray(prompt), c1, lora=sel)
        rows = net.forward_batch(np.array([9, 9]), [c0, c1], [BASE, sel])
    np.testing.assert_array_equal(rows[0], ref)
    assert not np.array_equal(rows[1], ref)


@pytest.fixture(scope="module")
def adapters(fused_bundles, tmp_path_factory):
    """Adapters of fused_qwen2 (biases on q, k, v) and of fused_wide (its gate and up products on
    the threads, where each thread finishes its rows' SwiGLU): all-linear; some modules with their
    biases trained (stacked q, v, and gate alone beside up; lone o, down); DoRA."""
    from tiny_models import make_adapter
    made = {}
    for model in ("fused_qwen2", "fused_wide"):
        src, d = fused_bundles[model + "/src"], tmp_path_factory.mktemp("adapters")
        made[model] = {
            "all": make_adapter(src, d / "all", seed=1, r=4, target_modules="all-linear"),
            "some": make_adapter(src, d / "some", seed=2, r=8, lora_alpha=4, bias="lora_only",
                                 target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
            "dora": make_adapter(src, d / "dora", seed=3, r=4, use_dora=True, target_modules="all-linear")}
    return made


@pytest.mark.parametrize("model", ["fused_qwen2", "fused_wide"])
@pytest.mark.parametrize("spec", ["all", "some", {"all": 0.7, "some": -0.4}, "dora"], ids=str)
@pytest.mark.parametrize("parallel_min", [None, 0], ids=["threads-by-size", "threads-always"])
def test_adapters_in_the_one_call_step_equal_the_pieces_bit_for_bit(fused_bundles, adapters, model, spec,
                                                                  parallel_min, monkeypatch):
    """A sequence with LoRA adapters runs them inside the one-call step (DoRA: the layer loop): its
    rows equal the layer loop's, a batch's, where a base row sits beside it, and one thread's, bit
    for bit."""
    from edgelora.runtime import lora
    if parallel_min is not None:  # every adapter product on the threads, in both paths
        monkeypatch.setattr(lora, "LORA_PARALLEL_MIN", parallel_min)
    rng = np.random.default_rng(5)
    prompt, tokens = rng.integers(3, 80, 7), rng.integers(3, 80, 6)
    models = []
    for threads in (2, 2, 1):
        m = edgelora.load(fused_bundles[model], max_context=64, threads=threads)
        for name, path in adapters[model].items():
            m.adapters.load(name, path)
        models.append(m)
    fused, pieces, one_thread = models
    pieces.net._compiled_layers = None
    sel = fused.adapters.select(spec)
    runs_fused = fused.net.compiled_layers.ops(sel) is not None
    assert runs_fused == (spec != "dora")

    def run(model):
        net, s = model.net, model.adapters.select(spec)
        with model._running():
            cache = net.new_cache()
            net.forward(np.asarray(prompt), cache, lora=s)
            steps = [net.forward(np.array([t]), cache, lora=s)[0] for t in tokens]
            c0, c1 = net.new_cache(), net.new_cache()  # a base row beside it: the layer loop
            net.forward(np.asarray(prompt), c0)
            net.forward(np.asarray(prompt), c1, lora=s)
            batch = [net.forward_batch(np.array([t, t]), [c0, c1], [BASE, s])[1] for t in tokens]
            c2 = net.new_cache()
            net.forward(np.asarray(prompt), c2, lora=s)
            rows = net.forward_steps(np.asarray(tokens), c2, lora=s)  # several rows of one cache
        return np.stack(steps), np.stack(batch), rows

    a, a_batch, a_rows = run(fused)
    b, b_batch, b_rows = run(pieces)
    c, _, c_rows = run(one_thread)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, c_rows)
    np.testing.assert_array_equal(a, a_batch)
    np.testing.assert_array_equal(a, b_batch)
    np.testing.assert_array_equal(a, a_rows)
    np.testing.assert_array_equal(a, b_rows)
    with fused._running():  # the adapters change every step
        cache = fused.net.new_cache()
        fused.net.forward(np.asarray(prompt), cache)
        plain = np.stack([fused.net.forward(np.array([t]), cache)[0] for t in tokens])
    assert all(not np.allclose(x, y, atol=1e-3) for x, y in zip(a, plain))


def test_exact_products_run_the_pieces(fused_bundles):
    """Exact products leave the one-call step to the layer loop of pieces."""
    exact = edgelora.load(fused_bundles["fused_llama"], max_context=64, products="exact")
    assert exact.net.compiled_layers is None
    logits, _ = _decode(exact, [5, 6, 7], 3, [8, 9, 10])
    numpy_layers = edgelora.load(fused_bundles["fused_llama"], max_context=64, products="exact")
    numpy_layers.net.compiled_decode = False
    ref, _ = _decode(numpy_layers, [5, 6, 7], 3, [8, 9, 10])
    assert close(logits, ref)


def test_a_decode_step_past_the_cache_is_refused(fused_bundles):
    """The compiled step checks no bounds: the position is checked before it runs."""
    model = edgelora.load(fused_bundles["fused_llama"], max_context=8)
    net, cache = model.net, model.net.new_cache()
    with model._running():
        net.forward(np.arange(3, 11), cache)  # the cache is full
        with pytest.raises(ValueError, match="outside the cache"):
            net.forward(np.array([5]), cache)
        with pytest.raises(ValueError, match="outside the cache"):
            net.forward_steps(np.array([5, 6]), cache)
