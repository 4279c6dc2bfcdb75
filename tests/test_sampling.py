"""Sampling: each filter by hand, against transformers' logits processors, and the sampled frequencies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelora.errors import UsageError
from edgelora.runtime.sampling import (Sampler, SamplingParams, apply_repetition_penalty, min_p_filter,
                                       process_logits, softmax, top_k_filter, top_p_filter)

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def kept(x: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(x)).tolist())


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def random_logits(seed: int, vocab: int = 300, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


# --- parameters ---------------------------------------------------------------------------------

def test_defaults_are_greedy():
    p = SamplingParams()
    assert p.greedy and p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0 and p.repetition_penalty == 1.0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"min_p": 1.0}, "min_p must be in [0, 1)"),
    ({"min_p": -0.2}, "min_p must be in [0, 1)"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ({"seed": -3}, "seed must be a non-negative integer"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"temperature": True}, "temperature must be a finite number"),
])
def test_bad_values_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as e:
        SamplingParams(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError):
        SamplingParams.from_kwargs(**kwargs)


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(UsageError) as e:
        SamplingParams.from_kwargs(temperature=0.5, top_q=0.9)
    msg = str(e.value)
    assert "'top_q'" in msg
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        assert name in msg


def test_from_kwargs_and_normalised_types():
    p = SamplingParams.from_kwargs(temperature=np.float32(0.5), top_k=np.int64(5), seed=np.int32(3))
    assert p == SamplingParams(temperature=0.5, top_k=5, seed=3)
    assert type(p.top_k) is int and type(p.temperature) is float and type(p.seed) is int
    assert not p.greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


def test_bad_logits_and_history():
    with pytest.raises(UsageError):
        Sampler(SamplingParams(temperature=1.0)).sample(np.zeros((2, 3), np.float32), [])
    with pytest.raises(UsageError, match="outside the vocabulary"):
        apply_repetition_penalty(np.zeros(4, np.float32), [5], 1.3)


# --- greedy and reproducibility ------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_index_on_ties():
    s = Sampler(SamplingParams())
    for seed in range(20):
        x = random_logits(seed)
        assert s.sample(x, []) == int(np.argmax(x))
    tie = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    assert s.sample(tie, []) == 1


def test_greedy_applies_the_repetition_penalty():
    x = np.array([1.0, 2.0, 1.9, -1.0], np.float32)
    assert Sampler(SamplingParams()).sample(x, [1]) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.2)).sample(x, [1]) == 2  # 2.0 / 1.2 < 1.9


def test_same_seed_same_tokens_other_seed_other_tokens():
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    xs = [random_logits(s, scale=1.0) for s in range(60)]
    s1, s2 = Sampler(params), Sampler(params)
    run1 = [s1.sample(x, [1, 2]) for x in xs]
    run2 = [s2.sample(x, [1, 2]) for x in xs]
    assert run1 == run2 and len(set(run1)) > 10
    s3 = Sampler(SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=4321))
    assert [s3.sample(x, [1, 2]) for x in xs] != run1


# --- each filter by hand -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 5, 17, 299])
def test_top_k_keeps_exactly_the_k_largest(k):
    x = random_logits(k)
    out = top_k_filter(x, k)
    assert kept(out) == set(np.argsort(-x)[:k].tolist())
    assert np.array_equal(out[list(kept(out))], x[list(kept(out))])  # survivors unchanged


def test_top_k_off_and_ties():
    x = random_logits(0)
    assert np.array_equal(top_k_filter(x, 0), x)
    assert np.array_equal(top_k_filter(x, x.size + 5), x)
    tie = np.array([1.0, 5.0, 3.0, 3.0, 0.0], np.float32)
    assert kept(top_k_filter(tie, 2)) == {1, 2, 3}  # transformers keeps ties with the k-th value


@pytest.mark.parametrize("probs, top_p, expected", [
    ([0.5, 0.3, 0.15, 0.05], 0.5, {0}),           # the top token alone reaches 0.5
    ([0.5, 0.3, 0.15, 0.05], 0.6, {0, 1}),        # 0.5 < 0.6 <= 0.8
    ([0.5, 0.3, 0.15, 0.05], 0.79, {0, 1}),       # 0.8 reaches 0.79: the third token is not needed
    ([0.5, 0.3, 0.15, 0.05], 0.81, {0, 1, 2}),
    ([0.5, 0.3, 0.15, 0.05], 0.99, {0, 1, 2, 3}),
    ([0.05, 0.15, 0.5, 0.3], 0.6, {2, 3}),        # order of ids does not matter
    ([0.9, 0.05, 0.05], 0.1, {0}),                # always at least one token
    ([0.25, 0.25, 0.25, 0.25], 1.0, {0, 1, 2, 3}),  # 1 = off
])
def test_top_p_keeps_the_minimal_nucleus(probs, top_p, expected):
    assert kept(top_p_filter(np.log(np.asarray(probs)), top_p)) == expected


@pytest.mark.parametrize("probs, min_p, expected", [
    ([0.5, 0.3, 0.15, 0.05], 0.2, {0, 1, 2}),   # threshold 0.1
    ([0.5, 0.3, 0.15, 0.05], 0.5, {0, 1}),      # threshold 0.25
    ([0.5, 0.3, 0.15, 0.05], 0.61, {0}),        # threshold 0.305
    ([0.5, 0.3, 0.15, 0.05], 0.0, {0, 1, 2, 3}),
    ([0.4, 0.4, 0.2], 0.99, {0, 1}),            # the maximum always survives
])
def test_min_p_threshold(probs, min_p, expected):
    assert kept(min_p_filter(np.log(np.asarray(probs)), min_p)) == expected


def test_softmax_is_stable_and_ignores_removed_tokens():
    p = softmax(np.array([1000.0, 999.0, -np.inf], np.float32))
    assert p.dtype == np.float64 and np.isclose(p.sum(), 1.0) and p[2] == 0.0
    assert np.isclose(p[0] / p[1], np.e)
    with pytest.raises(UsageError):
        softmax(np.full(3, -np.inf))


# --- against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.5])
def test_repetition_penalty_equals_transformers(penalty):
    x = random_logits(3, vocab=64)
    history = [0, 5, 5, 9, 63, 12, 9, 40]
    x[[5, 12]] = [-2.0, 0.0]  # a negative and a zero logit among the repeated tokens
    ref = logits_process.RepetitionPenaltyLogitsProcessor(penalty=float(penalty))(
        torch.tensor([history]), torch.from_numpy(x.copy())[None])[0].numpy()
    ours = apply_repetition_penalty(x, history, penalty)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(ours, x) or penalty == 1.0


def transformers_filtered(x: np.ndarray, p: SamplingParams, history) -> np.ndarray:
    scores = torch.from_numpy(x.copy())[None]
    ids = torch.tensor([list(history)]) if history else torch.zeros((1, 0), dtype=torch.long)
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(logits_process.RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    procs.append(logits_process.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(logits_process.TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        procs.append(logits_process.TopPLogitsWarper(top_p=p.top_p))
    if p.min_p:
        procs.append(logits_process.MinPLogitsWarper(min_p=p.min_p))
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=60, top_p=0.8, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=100, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
    SamplingParams(temperature=2.0, top_p=0.5, repetition_penalty=0.8),
], ids=["top_k", "top_p", "min_p", "k_p_minp", "all_penalty", "hot_p_penalty"])
def test_filters_together_equal_transformers_warpers(params, seed):
    x = random_logits(100 + seed, vocab=500, scale=2.0)
    history = np.random.default_rng(seed).integers(0, 500, 30).tolist()
    ours = process_logits(x, params, history)
    ref = transformers_filtered(x, params, history)
    assert kept(ours) == kept(ref)
    assert 1 <= len(kept(ours)) < x.size
    survivors = sorted(kept(ours))
    np.testing.assert_allclose(ours[survivors], ref[survivors], rtol=1e-5, atol=1e-5)


def test_process_logits_refuses_greedy_params():
    with pytest.raises(UsageError):
        process_logits(random_logits(0), SamplingParams(), [])


# --- sampled frequencies ------------------------------------------------------------------------

def test_sampling_frequencies_match_the_filtered_distribution():
    probs = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.04, 0.02, 0.01], np.float64)
    x = logits_of(probs)
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.9, seed=2024)
    target = softmax(process_logits(x, params, []))
    assert kept(process_logits(x, params, [])) == {0, 1, 2, 3, 4}  # top_k 6, then the 0.9 nucleus
    n = 20000
    sampler = Sampler(params)
    counts = np.bincount([sampler.sample(x, []) for _ in range(n)], minlength=x.size)
    assert counts[target == 0].sum() == 0  # filtered tokens are never drawn
    live = target > 0
    expected = n * target[live]
    chi2 = float((((counts[live] - expected) ** 2) / expected).sum())
    assert chi2 < 25.0, (chi2, counts, expected)  # 4 degrees of freedom: p < 1e-4 by chance


def test_temperature_sharpens_the_distribution():
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    cold = Sampler(SamplingParams(temperature=0.2, seed=0))
    hot = Sampler(SamplingParams(temperature=5.0, seed=0))
    n = 4000
    c = np.bincount([cold.sample(x, []) for _ in range(n)], minlength=4) / n
    h = np.bincount([hot.sample(x, []) for _ in range(n)], minlength=4) / n
    assert c[0] > 0.75 and h[0] < 0.35 and h[3] > 0.15


def test_repetition_penalty_changes_what_is_sampled():
    x = logits_of([0.6, 0.4])
    plain = Sampler(SamplingParams(temperature=1.0, seed=5))
    penalised = Sampler(SamplingParams(temperature=1.0, repetition_penalty=50.0, seed=5))
    n = 2000
    a = sum(plain.sample(x, [1]) == 1 for _ in range(n)) / n
    b = sum(penalised.sample(x, [1]) == 1 for _ in range(n)) / n
    assert 0.35 < a < 0.45 and b < 0.05
