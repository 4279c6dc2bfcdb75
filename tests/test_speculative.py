"""Speculative decoding (``runtime/speculative.py``): the verification forward's rows are one-token
decode steps bit for bit on every architecture; greedy text with prompt lookup or a draft model is
plain decoding's, with adapters and mixes too; seeded sampling with certain guesses gives plain
sampling's tokens; sampling with a draft model's guesses has plain sampling's distribution (a
chi-square over many seeded draws against the probabilities computed from the model's logits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import edgelora
from edgelora.cli import main
from edgelora.errors import UsageError
from edgelora.runtime.sampling import SamplingParams, process_logits, softmax
from edgelora.runtime.speculative import DraftBudget, PromptLookup
from tiny_models import CONFIGS, Adapters, Converted

pytest.importorskip("transformers")  # writes the tiny checkpoints

ARCHS = [a for a in CONFIGS if a != "long_context"]
PROMPT = [1, 5, 9, 3, 7, 4, 5, 9, 3, 7, 4, 5, 9, 3, 8, 6, 5, 9]  # repeats, and longer than the sliding windows


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Converted(tmp_path_factory, seed=7)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """The same tiny architectures with other weights: draft models that guess wrong at times."""
    return Converted(tmp_path_factory, seed=8, bundle_name="draft")


@pytest.fixture(scope="module")
def adapters(converted, tmp_path_factory):
    return Adapters(converted, tmp_path_factory)


def load(path, **kw):
    model = edgelora.load(path, max_context=kw.pop("max_context", 64), **kw)
    model.eos_ids = set()  # random weights: run to the length asked
    return model


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    pl = PromptLookup(max_ngram=3)
    assert pl.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == ([7, 5, 1], [None] * 3)  # the latest "1 2 3"
    assert pl.propose([4, 2, 3, 8, 8, 6, 2, 3], 4) == ([8, 8, 6, 2], [None] * 4)  # "2 3" when "6 2 3" never came
    assert pl.propose([5, 6, 7, 6], 2) == ([7, 6], [None] * 2)  # one token when no two-token match
    assert pl.propose([9, 4, 4, 4], 3) == ([4, 4, 4], [None] * 3)  # a loop goes on copying itself
    assert pl.propose([1, 2, 3, 1, 2], 5) == ([3, 1, 2, 3, 1], [None] * 5)
    assert pl.propose([1, 2, 3], 4) == ([], [])  # nothing repeats
    with pytest.raises(UsageError):
        PromptLookup(max_ngram=1, min_ngram=2)


def _prompt_lookup_reference(history, k, max_ngram, min_ngram):
    """Prompt lookup spelled out: every earlier window of n tokens compared with the last n."""
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        hits = [s for s in range(len(history) - n) if history[s:s + n] == history[-n:]]
        if hits:
            text = list(history)
            for i in range(k):
                text.append(text[hits[-1] + n + i])
            return text[len(history):], [None] * k
    return [], []


@settings(max_examples=300, deadline=None)
@given(history=st.lists(st.integers(0, 4), min_size=1, max_size=40), k=st.integers(1, 7),
       ngrams=st.tuples(st.integers(1, 4), st.integers(1, 4)).map(sorted))
def test_prompt_lookup_equals_its_reference(history, k, ngrams):
    min_ngram, max_ngram = ngrams
    assert PromptLookup(max_ngram, min_ngram).propose(history, k) == _prompt_lookup_reference(
        history, k, max_ngram, min_ngram)


def test_draft_budget_verifies_as_many_guesses_as_pay():
    """The count of guesses a step verifies: plain first (its time measured), then the most there
    are (above the largest measured count a step costs what that one does); then what gives the most
    tokens a second by the kept shares and the measured or interpolated step times."""
    b = DraftBudget(4)
    assert b.choose(4) == 0  # no step time yet
    b.timed(1, 1.0)
    assert b.choose(4) == 4 and b.choose(2) == 2  # every count as cheap as a plain step: the most
    b.timed(5, 3.5)
    assert b.step_cost(3) == pytest.approx(2.25)  # between measured counts: the line
    b.timed(5, 3.5)  # (a count measured once is tried again: below)
    for _ in range(30):
        b.observe(4, 0)  # the first guess never kept
    assert b.choose(4) == 0
    cheap = DraftBudget(4)
    cheap.timed(1, 1.0)
    cheap.timed(5, 1.2)
    cheap.timed(5, 1.2)
    for _ in range(30):
        cheap.observe(4, 3)  # three kept, the fourth never
    assert cheap.choose(4) == 3 and cheap.choose(2) == 2
    cheap.observe(3, 1)
    assert list(cheap.verified) == [0, 31, 31, 30, 30] and list(cheap.kept) == [0, 31, 30, 30, 0]


def test_draft_budget_step_times_are_robust_to_a_slowed_step():
    """A step's cost is the lower median of its last five times: a step slowed once does not move
    it, a lasting change does after three. A count measured once costs no more than it would
    unmeasured, so a first step slowed by something else (a thread-count probe, another process)
    does not keep prompt lookup at fewer guesses for the rest of the generation."""
    b = DraftBudget(4)
    b.timed(1, 1.0)
    for _ in range(30):
        b.observe(4, 4)  # every guess kept
    b.timed(5, 2.5)  # slowed: a step of 5 rows costs 1.3 here
    assert b.step_cost(5) == pytest.approx(1.0) and b.choose(4) == 4  # tried again
    b.timed(5, 1.3)
    assert b.cost[5] == pytest.approx(1.3) and b.choose(4) == 4
    for t in (1.3, 9.0, 1.3):
        b.timed(5, t)
    assert b.cost[5] == pytest.approx(1.3)  # one slow step among five
    for t in (2.0, 2.0, 2.0):
        b.timed(5, t)
    assert b.cost[5] == pytest.approx(2.0)  # three: the cost now


def test_draft_budget_step_settles_the_last_step_then_chooses():
    """``step``: what the last step kept (from the generation's count of kept guesses) is counted
    before this step's count is chosen; only a step that verifies none settles shadowed guesses."""
    b = DraftBudget(2)
    assert b.step([1, 2, 1], [2, 1], accepted=0) == 0  # no step time yet: plain, the guesses shadowed
    b.timed(1, 1.0)
    assert b.step([1, 2, 1, 2], [1, 2], accepted=0) == 2  # the most, untried; the shadow waits
    assert not b.verified.any()
    b.timed(3, 1.1)
    b.step([1, 2, 1, 2, 1, 2], [1, 2], accepted=2)  # the two verified were both kept
    assert list(b.verified) == [0, 1, 1] and list(b.kept) == [0, 1, 1]
    b.step([1, 2, 1, 2, 1, 2, 7], [], accepted=3)  # one of two kept; none to verify: the shadow settles
    assert list(b.verified) == [0, 3, 3] and list(b.kept) == [0, 3, 2]  # (the shadow [2, 1]: both right)


def test_draft_budget_checks_unverified_guesses_against_the_text():
    """While no guess is verified, a plain step's guesses are settled against the tokens that follow
    them: once all are known or one differs; until then no new ones are taken."""
    b = DraftBudget(3)
    b.timed(1, 1.0)
    b.timed(4, 2.0)
    b.timed(4, 2.0)
    for _ in range(20):
        b.observe(3, 0)
    assert b.choose(3) == 0
    history = [1, 2, 3, 1, 2]
    b.shadow(history, [3, 1, 2])
    b.shadow(history + [3, 1], [9])  # two of three known, both right: waits
    assert b.verified[1] == 20
    b.shadow(history + [3, 1, 2], [3])  # all three right: counted, then the next guesses taken
    assert list(b.verified) == [0, 21, 1, 1] and list(b.kept) == [0, 1, 1, 1]
    b.shadow(history + [3, 1, 2, 7], [])  # the first differs: counted at once
    assert list(b.verified) == [0, 22, 1, 1] and list(b.kept) == [0, 1, 1, 1]
    for _ in range(40):
        b.shadow([5], [5, 5, 5])
        b.shadow([5, 5, 5, 5], [])
    assert b.choose(3) == 3  # the text repeats now: drafting resumes


@pytest.mark.parametrize("arch", ARCHS)
def test_verification_rows_are_decode_steps_bit_for_bit(converted, arch):
    """``forward_steps`` of T tokens gives each row the bits of decoding the tokens one at a time
    (the prefill path, tiles and blockwise attention, would not), and leaves the same cache."""
    model = load(converted(arch)[1])
    net, steps = model.net, np.array([4, 8, 2, 6, 5, 9, 3])
    one, many = net.new_cache(), net.new_cache()
    net.forward(np.array(PROMPT), one)
    net.forward(np.array(PROMPT), many)
    seq = np.stack([net.forward(steps[t:t + 1], one)[0] for t in range(len(steps))])  # [T, V]
    rows = net.forward_steps(steps, many)  # [T, V]
    assert np.array_equal(seq, rows)
    assert one.length == many.length
    assert all(np.array_equal(a, b) for a, b in zip(one.prefix(one.length), many.prefix(many.length)))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_text_is_plain_decoding(converted, drafts, arch):
    model = load(converted(arch)[1])
    draft = load(drafts(arch)[1])
    plain = model.generate(PROMPT, 30, return_result=True)
    lookup = model.generate(PROMPT, 30, return_result=True, draft="prompt-lookup", num_draft=3)
    drafted = model.generate(PROMPT, 30, return_result=True, draft=draft, num_draft=4)
    for r in (lookup, drafted):
        assert r.token_ids == plain.token_ids and r.text == plain.text and r.finish_reason == plain.finish_reason
        assert r.stats.drafted_tokens > 0 and r.stats.accepted_tokens <= r.stats.drafted_tokens
    # a draft with the model's own weights guesses every token right: every guess kept, every step
    # yields num_draft + 1 tokens
    same = model.generate(PROMPT, 30, return_result=True, draft=load(converted(arch)[1]), num_draft=4)
    assert same.token_ids == plain.token_ids
    assert same.stats.accepted_tokens == same.stats.drafted_tokens == 23  # 5 steps of 4 guesses, then 3 (the budget)


@pytest.mark.parametrize("arch", ["llama3", "gemma2"])
def test_greedy_with_adapters_and_mixes(converted, drafts, adapters, arch):
    model = load(converted(arch)[1])
    model.adapters.load("a", adapters(arch, 1, r=8, target_modules="all-linear"))
    model.adapters.load("b", adapters(arch, 2, r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    draft = load(drafts(arch)[1])
    for sel in ("a", {"a": 0.6, "b": 0.4}):
        plain = model.generate(PROMPT, 24, adapter=sel, return_result=True)
        for d in ("prompt-lookup", draft):
            r = model.generate(PROMPT, 24, adapter=sel, return_result=True, draft=d, num_draft=5)
            assert r.token_ids == plain.token_ids and r.adapter == plain.adapter
    # the draft model drafts with its own selection; the model's mix still decides every token
    with model.using({"a": 0.3, "b": 0.7}):
        plain = model.generate(PROMPT, 24, return_result=True)
        assert model.generate(PROMPT, 24, return_result=True, draft=draft).token_ids == plain.token_ids


@pytest.mark.parametrize("arch", ["llama3", "gemma2"])
def test_greedy_over_a_float16_kv_cache(converted, drafts, arch):
    """With ``kv_cache="float16"`` a verification step stores and reads the keys and values a plain
    step would (the same rounding), so greedy text is plain decoding's there too."""
    model = load(converted(arch)[1], kv_cache="float16")
    assert model.net.new_cache().k.dtype == np.float16
    plain = model.generate(PROMPT, 30, return_result=True)
    for d in ("prompt-lookup", load(drafts(arch)[1], kv_cache="float16")):
        r = model.generate(PROMPT, 30, return_result=True, draft=d, num_draft=4)
        assert r.token_ids == plain.token_ids and r.stats.drafted_tokens > 0


def test_the_stop_rules_of_plain_decoding(converted, drafts):
    """A full cache, a token budget that ends mid-step, a stop string, streaming and log-probabilities:
    each the same as plain decoding."""
    model = load(converted("llama3")[1], max_context=len(PROMPT) + 9)
    draft = load(drafts("llama3")[1], max_context=len(PROMPT) + 9)
    for d in ("prompt-lookup", draft):
        plain = model.generate(PROMPT, 50, return_result=True, logprobs=2)
        r = model.generate(PROMPT, 50, return_result=True, logprobs=2, draft=d, num_draft=4)
        assert r.finish_reason == plain.finish_reason == "context" and r.token_ids == plain.token_ids
        assert r.logprobs == plain.logprobs
        for n in (1, 2, 7):
            assert model.generate(PROMPT, n, draft=d, return_result=True).token_ids == plain.token_ids[:n]
        stop = model.tokenizer.decode(plain.token_ids[3:5])
        cut = model.generate(PROMPT, 50, stop=stop, return_result=True)
        r = model.generate(PROMPT, 50, stop=stop, draft=d, return_result=True)
        assert (r.text, r.token_ids, r.finish_reason) == (cut.text, cut.token_ids, "stop")
        assert "".join(model.stream(PROMPT, 6, draft=d)) == model.generate(PROMPT, 6)


def test_seeded_sampling_with_certain_guesses_is_plain_sampling(converted):
    """Prompt lookup's guesses are certain: the acceptance rule becomes "draw as plain sampling does,
    keep the guess if the draw is it", so a seed gives plain sampling's very tokens."""
    model = load(converted("llama3")[1])
    opts = dict(temperature=0.4, top_p=0.95, repetition_penalty=0.5)  # (a penalty < 1 favours repeats: guesses kept)
    kept = 0
    for seed in range(4):
        plain = model.generate(PROMPT, 24, seed=seed, return_result=True, **opts)
        r = model.generate(PROMPT, 24, seed=seed, return_result=True, draft="prompt-lookup", **opts)
        assert r.token_ids == plain.token_ids
        kept += r.stats.accepted_tokens
    assert kept > 0


def test_sampling_with_a_draft_model_keeps_the_distribution(converted, drafts):
    """Chi-square of the first three sampled tokens over many seeds against their exact joint
    probabilities (each step's from the model's decode logits, after the penalty, temperature and
    top-k): tokens 2 and 3 pass through the acceptance rule with a draft model whose top-k
    differs from the model's (guesses rejected and tokens drawn from the residual)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    model = load(converted("llama3")[1])
    draft = load(drafts("llama3")[1])
    opts = dict(temperature=0.5, top_k=3, repetition_penalty=1.2)
    prompt = PROMPT[:6]
    params = SamplingParams(**opts)

    def probs(history):  # the plain sampler's distribution after ``history``, from decode logits
        cache = model.net.new_cache()
        logits = model.net.forward(np.array(history[:len(prompt)]), cache)[0]
        for t in history[len(prompt):]:
            logits = model.net.forward(np.array([t]), cache)[0]
        return softmax(process_logits(logits, params, history))

    exact = {}
    p1 = probs(prompt)
    for a in np.flatnonzero(p1):
        p2 = probs(prompt + [int(a)])
        for b in np.flatnonzero(p2):
            p3 = probs(prompt + [int(a), int(b)])
            for c in np.flatnonzero(p3):
                exact[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    n = 3000
    counts = dict.fromkeys(exact, 0)
    drafted = accepted = 0
    for seed in range(n):
        r = model.generate(prompt, 3, seed=seed, return_result=True, draft=draft, num_draft=2, **opts)
        counts[tuple(r.token_ids)] += 1  # (a KeyError would be a path of probability 0)
        drafted, accepted = drafted + r.stats.drafted_tokens, accepted + r.stats.accepted_tokens
    assert 0 < accepted < drafted  # guesses both kept and rejected
    keys = sorted(exact, key=exact.get)
    expected = np.array([exact[k] for k in keys]) * n
    observed = np.array([counts[k] for k in keys], np.float64)
    small = expected < 5  # rare paths pooled into one bin
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    assert scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_usage_errors(converted, drafts):
    model = load(converted("llama3")[1])
    with pytest.raises(UsageError):
        model.generate(PROMPT, 4, draft="n-gram")
    with pytest.raises(UsageError):
        model.generate(PROMPT, 4, draft="prompt-lookup", num_draft=0)
    with pytest.raises(UsageError):
        model.generate(PROMPT, 4, draft=model)
    with pytest.raises(UsageError):  # another vocabulary
        model.generate(PROMPT, 4, draft=load(drafts("mistral")[1]))


def test_cli_run_with_a_draft(converted, drafts, capsys):
    bundle = str(converted("llama3")[1])
    common = ["run", bundle, "-p", "the cat sat on the mat . the cat", "-n", "12", "--json", "--max-context", "64"]
    outs = []
    for extra in ([], ["--draft", "prompt-lookup", "--num-draft", "3"], ["--draft", str(drafts("llama3")[1])]):
        assert main(common + extra) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["generated_ids"] == outs[1]["generated_ids"] == outs[2]["generated_ids"]
    assert outs[0]["drafted_tokens"] == 0 and outs[1]["drafted_tokens"] > 0 and outs[2]["drafted_tokens"] > 0
