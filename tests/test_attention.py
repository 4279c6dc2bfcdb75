"""Blockwise attention (online softmax over key blocks) against the dense reference, and the
model's prefill with blocks small enough to need many of them against transformers."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import edgelora
from edgelora.runtime import llama
from edgelora.runtime.llama import attention, attention_blockwise, attention_reference
from tiny_models import close, hf_dequantized, make_checkpoint

# nkv, group, hd, T (queries), start (cached positions before them), window, block, scale, softcap
CASES = {
    "gqa": (2, 4, 16, 40, 0, None, 16, None, None),
    "mqa": (1, 3, 8, 33, 5, None, 8, None, None),
    "one query": (2, 2, 8, 1, 37, None, 16, None, None),
    "one query in a window": (2, 2, 8, 1, 37, 5, 16, None, None),
    "T > block": (2, 2, 16, 100, 0, None, 32, None, None),
    "S not a multiple of the block": (2, 2, 16, 50, 13, None, 32, None, None),
    "window < block": (2, 2, 16, 70, 20, 5, 32, None, None),
    "window of 1": (1, 2, 8, 20, 3, 1, 8, None, None),
    "window skips blocks": (2, 1, 16, 30, 100, 40, 16, None, None),
    "window > positions": (2, 2, 8, 24, 4, 400, 8, None, None),
    "block of 1": (2, 2, 8, 12, 3, 4, 1, None, None),
    "block > S": (2, 2, 16, 20, 10, None, 128, None, None),
    "gemma scale": (1, 4, 32, 40, 9, None, 16, 32 ** -0.5, None),
    "gemma2 scale, softcap, window": (2, 2, 32, 60, 17, 8, 16, 16 ** -0.5, 5.0),
    "softcap 50, long": (2, 2, 64, 256, 300, None, 128, 64 ** -0.5, 50.0),
    "start offset, window, long": (4, 2, 64, 256, 600, 300, 128, None, None),
}


def _inputs(nkv, group, hd, T, start, seed=0, keys_after=0):
    rng = np.random.default_rng(seed)
    S = start + T + keys_after
    q = rng.standard_normal((T, nkv * group, hd), dtype=np.float32)
    k = rng.standard_normal((S, nkv, hd), dtype=np.float32)
    v = rng.standard_normal((S, nkv, hd), dtype=np.float32)
    return q, k, v, np.arange(start, start + T)


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_equals_reference(case, monkeypatch):
    nkv, group, hd, T, start, window, block, scale, softcap = CASES[case]
    q, k, v, q_pos = _inputs(nkv, group, hd, T, start)
    ref = attention_reference(q, k, v, q_pos, window, scale, softcap)
    got = attention_blockwise(q, k, v, q_pos, window, scale, softcap, block=block)
    assert got.shape == ref.shape == (T, nkv * group * hd) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=2e-6)
    # as exact as the reference: both against the same attention in float64
    exact = attention_reference(*(a.astype(np.float64) for a in (q, k, v)), q_pos, window, scale, softcap)
    assert np.abs(got - exact).max() <= 2 * np.abs(ref - exact).max() + 1e-6
    # a long chunk's queries in blocks, each over the keys it may see (the long cases: 256 queries)
    serial = ref if T == 1 else llama._query_blocks(q, k, v, q_pos, window, scale, softcap)
    np.testing.assert_allclose(serial, ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_array_equal(attention(q, k, v, q_pos, window, scale, softcap), serial)
    if T > 1:  # key-value heads split between threads: each head's bits as computed with the others
        monkeypatch.setattr(llama, "ATTENTION_PARALLEL_MIN", 0)
        for threads in (2, 3):
            np.testing.assert_array_equal(attention(q, k, v, q_pos, window, scale, softcap, threads=threads), serial)


@pytest.mark.parametrize("window", [None, 6])
def test_blocks_no_query_sees_are_skipped(window):
    """Keys beyond the last query (the causal limit) and before the first query's window are never
    read: NaN there leaves the output finite and equal to the reference on the keys that count."""
    q, k, v, q_pos = _inputs(2, 2, 8, 10, 40, keys_after=50)  # 50 keys after the last query
    lo = 0 if window is None else q_pos[0] - window + 1
    poisoned_k, poisoned_v = k.copy(), v.copy()
    for a in (poisoned_k, poisoned_v):
        a[q_pos[-1] + 1:] = np.nan  # after the last query's position
        a[:lo] = np.nan  # before the first query's window
    got = attention_blockwise(q, poisoned_k, poisoned_v, q_pos, window, block=8)
    ref = attention_reference(q, k[:q_pos[-1] + 1], v[:q_pos[-1] + 1], q_pos, window)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=2e-6)


def test_working_memory_does_not_grow_with_the_context():
    """The reference holds [nh, T, S] scores (three at once); blockwise holds [nh, T, block]."""
    def peak(fn, S):
        q, k, v, q_pos = _inputs(4, 2, 32, 64, S - 64)
        tracemalloc.start()
        fn(q, k, v, q_pos, None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    nh, T, block = 8, 64, llama.KEY_BLOCK
    short, long = peak(attention_blockwise, 512), peak(attention_blockwise, 8192)
    assert long <= short * 1.05 + 64 * 1024
    assert long < 4 * (4 * nh * T * block)  # a few float32 [nh, T, block] blocks' worth
    assert peak(attention_reference, 8192) > 2 * 4 * nh * T * 8192  # what it replaces


@pytest.fixture(scope="module", params=["llama3", "phi3", "gemma2", "gemma2_variant"])
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = make_checkpoint(d / "src", request.param, seed=11)
    edgelora.convert(src, d / "out")
    return src, d / "out"


def test_prefill_in_many_key_blocks_matches_transformers(converted, monkeypatch):
    """60 positions in key blocks of 8: sliding windows (phi3 16, gemma2 8 and 6) shorter and
    longer than a block, skipped blocks, soft-capped scores, against transformers."""
    import torch
    src, out = converted
    model = edgelora.load(out, max_context=64, products="exact")
    ids = np.random.default_rng(5).integers(0, model.args.vocab_size, 60)
    whole = model.logits(ids)  # one block: KEY_BLOCK > 60
    monkeypatch.setattr(llama, "KEY_BLOCK", 8)
    blocks = model.logits(ids)
    with torch.no_grad():
        ref = hf_dequantized(out, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert close(blocks, ref), np.abs(blocks - ref).max()
    np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
