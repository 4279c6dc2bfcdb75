"""Generation results: each call's own statistics (``Generation``, ``stream_generate`` items),
per-token log-probabilities against a NumPy log-softmax of ``model.logits``, statistics that stay
each call's own under concurrent threads, and the model's thread count in whichever thread runs it."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

import edgelora
from edgelora.errors import UsageError
from edgelora.runtime.model import Generation, GenerationChunk, TokenLogprobs
from edgelora.runtime.sampling import log_softmax, most_likely
from tiny_models import close, make_checkpoint

pytest.importorskip("transformers")  # writes the tiny checkpoints

PROMPT = [1, 5, 9, 3, 7]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            d = tmp_path_factory.mktemp(arch)
            edgelora.convert(make_checkpoint(d / "src", arch, seed=7), d / "out")
            made[arch] = d / "out"
        return made[arch]
    return get


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


# --- log-probabilities ----------------------------------------------------------------------------

def test_log_softmax_and_most_likely():
    x = np.array([1.0, 3.0, -np.inf, 3.0, 2.0], np.float32)
    lp = log_softmax(x)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0)
    assert lp[2] == -np.inf and lp[1] == lp[3]
    assert most_likely(lp, 2).tolist() == [1, 3]  # the lowest id first among equals
    assert most_likely(lp, 1).tolist() == [1]  # a tie at the k-th place: the lowest id
    assert most_likely(lp, 4).tolist() == [1, 3, 4, 0]
    assert most_likely(lp, 10).tolist() == [1, 3, 4, 0, 2]
    assert most_likely(lp, 0).tolist() == []
    with pytest.raises(UsageError):
        log_softmax(np.full(3, -np.inf))


@pytest.mark.parametrize("arch", ["llama_untied", "gemma2"])  # gemma2: the final logits soft-capped
def test_logprobs_are_the_log_softmax_of_the_logits(bundles, arch):
    """Sampled with a temperature and a repetition penalty: the log-probabilities are those of the
    model's logits, before the sampling transforms."""
    model = edgelora.load(bundles(arch), max_context=64)
    model.eos_ids = set()
    k = 5
    r = model.generate(PROMPT, max_new_tokens=12, temperature=0.8, repetition_penalty=1.3, seed=3,
                       return_result=True, logprobs=k)
    assert isinstance(r, Generation) and len(r.logprobs) == len(r.token_ids) == 12
    ref = numpy_log_softmax(model.logits(PROMPT + r.token_ids[:-1])[len(PROMPT) - 1:])  # [12, V]
    chosen = np.array([t.logprob for t in r.logprobs])
    assert [t.token for t in r.logprobs] == r.token_ids
    assert close(chosen, ref[np.arange(12), r.token_ids]), np.abs(chosen - ref[np.arange(12), r.token_ids]).max()
    for t, row in zip(r.logprobs, ref):
        ids = [i for i, _ in t.top_logprobs]
        values = np.array([v for _, v in t.top_logprobs])
        assert len(ids) == len(set(ids)) == k and np.all(np.diff(values) <= 0)  # most likely first
        assert close(values, row[ids])
        assert close(values, np.sort(row)[::-1][:k])  # the k largest (up to near-ties between the paths)
    # the same with only the chosen token's, streamed, and in a batch: bit for bit
    chunks = list(model.stream_generate(PROMPT, max_new_tokens=12, temperature=0.8, repetition_penalty=1.3,
                                        seed=3, logprobs=0))
    assert [c.logprobs.logprob for c in chunks] == chosen.tolist()
    assert all(c.logprobs.top_logprobs == () for c in chunks)
    batch = model.generate_batch([[2, 4], PROMPT], max_new_tokens=12, temperature=0.8, repetition_penalty=1.3,
                                 seed=3, return_result=True, logprobs=k)
    assert batch[1].logprobs == r.logprobs and batch[1].token_ids == r.token_ids


def test_logprobs_options(bundles):
    model = edgelora.load(bundles("llama_untied"), max_context=64)
    V = model.args.vocab_size
    for bad in (-1, True, 1.5, V + 1, "3"):
        with pytest.raises(UsageError, match="logprobs must be"):
            model.generate(PROMPT, max_new_tokens=2, return_result=True, logprobs=bad)
    with pytest.raises(UsageError, match="return_result=True"):
        model.generate(PROMPT, max_new_tokens=2, logprobs=2)
    with pytest.raises(UsageError, match="return_result=True"):
        model.generate_batch([PROMPT], max_new_tokens=2, logprobs=2)
    r = model.generate(PROMPT, max_new_tokens=2, return_result=True, logprobs=V)
    assert sorted(i for i, _ in r.logprobs[0].top_logprobs) == list(range(V))
    assert np.exp([v for _, v in r.logprobs[0].top_logprobs]).sum() == pytest.approx(1.0)
    d = r.to_dict()
    assert d["logprobs"][0]["token"] == r.token_ids[0] and len(d["logprobs"][0]["top_logprobs"]) == V
    assert isinstance(r.logprobs[0], TokenLogprobs)


# --- results and their statistics -------------------------------------------------------------------

def test_result_and_stream_items(bundles):
    model = edgelora.load(bundles("llama_untied"), max_context=64)
    model.eos_ids = set()
    r = model.generate(PROMPT, max_new_tokens=10, temperature=0, return_result=True)
    assert r.text == model.generate(PROMPT, max_new_tokens=10, temperature=0)
    assert r.text == "".join(model.stream(PROMPT, max_new_tokens=10, temperature=0))
    assert r.token_ids == model.last_stats.generated_ids and len(r.token_ids) == 10
    assert r.prompt_ids == PROMPT and r.finish_reason == "length" and r.logprobs is None and r.adapter == "base"
    assert r.prompt_tokens_per_second > 0 and r.decode_tokens_per_second > 0
    assert r.to_dict()["text"] == r.text and r.to_dict()["finish_reason"] == "length"

    chunks = list(model.stream_generate(PROMPT, max_new_tokens=10, temperature=0))
    assert all(isinstance(c, GenerationChunk) for c in chunks)
    assert [c.token for c in chunks] == r.token_ids and "".join(c.text for c in chunks) == r.text
    assert [c.finish_reason for c in chunks] == [None] * 9 + ["length"]
    assert all(c.stats is chunks[0].stats for c in chunks)  # the generation's running statistics

    # running: each item sees the statistics as of its token
    counts = [(c.stats.generated_tokens, list(c.stats.generated_ids)) for c in
              model.stream_generate(PROMPT, max_new_tokens=4, temperature=0)]
    assert counts == [(i + 1, r.token_ids[:i + 1]) for i in range(4)]


def test_finish_reasons(bundles):
    model = edgelora.load(bundles("llama_untied"), max_context=8)
    model.eos_ids = set()
    greedy = model.generate(PROMPT, max_new_tokens=2, temperature=0, return_result=True)
    # context: 5 prompt tokens in an 8-position cache leave room for 3 more steps, so 4 tokens
    r = model.generate(PROMPT, max_new_tokens=50, temperature=0, return_result=True)
    assert r.finish_reason == "context" and len(r.token_ids) == 4
    # eos: the first token is EOS, so no token and no text; the last item carries no token
    model.eos_ids = {greedy.token_ids[0]}
    chunks = list(model.stream_generate(PROMPT, max_new_tokens=5, temperature=0))
    assert [(c.text, c.token, c.finish_reason) for c in chunks] == [("", None, "eos")]
    assert chunks[0].stats.generated_ids == []
    model.eos_ids = set()
    # stop: the second token's text ends the generation and is not shown
    stop = model.tokenizer.decode([greedy.token_ids[1]]).strip()
    assert stop not in model.tokenizer.decode(greedy.token_ids[:1])
    r = model.generate(PROMPT, max_new_tokens=5, temperature=0, stop=stop, return_result=True)
    assert r.finish_reason == "stop" and stop not in r.text and len(r.token_ids) == 2
    # nothing asked
    chunks = list(model.stream_generate(PROMPT, max_new_tokens=0))
    assert [(c.text, c.token, c.finish_reason) for c in chunks] == [("", None, "length")]


def test_each_call_has_its_own_statistics_under_concurrent_threads(bundles):
    model = edgelora.load(bundles("llama_untied"), max_context=64)
    model.eos_ids = set()
    prompts = {"a": [1, 2, 3], "b": [9, 8, 7, 6, 5, 4]}
    want = {k: model.generate(p, max_new_tokens=8, temperature=0, return_result=True).token_ids
            for k, p in prompts.items()}
    assert want["a"] != want["b"]
    errors, start = [], threading.Barrier(2)

    def worker(k):
        start.wait()
        for it in range(15):
            if it % 2:
                r = model.generate(prompts[k], max_new_tokens=8, temperature=0, return_result=True)
                s = r.stats
            else:
                s = [c.stats for c in model.stream_generate(prompts[k], max_new_tokens=8, temperature=0)][-1]
            last = model.last_stats  # this thread's own
            if (s.prompt_ids, s.generated_ids, s.generated_tokens) != (prompts[k], want[k], 8) or last is not s:
                errors.append((k, it, s.prompt_ids, s.generated_ids))

    threads = [threading.Thread(target=worker, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]

    # two generations interleaved in one thread: each item carries its own generation's statistics
    ga = model.stream_generate(prompts["a"], max_new_tokens=8, temperature=0)
    gb = model.stream_generate(prompts["b"], max_new_tokens=8, temperature=0)
    pairs = list(zip(ga, gb))
    assert [a.token for a, _ in pairs] == want["a"] and [b.token for _, b in pairs] == want["b"]
    assert pairs[-1][0].stats.generated_ids == want["a"] and pairs[-1][1].stats.generated_ids == want["b"]


# --- the model's thread count -------------------------------------------------------------------------

def _record_threads(model) -> list:
    """Numba's thread count inside every forward of ``model`` (one-row and batched)."""
    seen = []
    for name in ("forward", "forward_batch"):
        real = getattr(model.net, name)
        setattr(model.net, name, lambda *a, _real=real, **k: seen.append(numba.get_num_threads()) or _real(*a, **k))
    return seen


def _in_thread(fn):
    out, errors = [], []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # reported in the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def _generate_all_ways(model):
    model.generate(PROMPT, max_new_tokens=3, temperature=0)
    list(model.stream(PROMPT, max_new_tokens=3, temperature=0))
    model.generate_batch([PROMPT, [2, 3]], max_new_tokens=3, temperature=0)
    model.logits(PROMPT)


def test_threads_apply_in_a_thread_that_did_not_load_the_model(bundles):
    caller = numba.get_num_threads()
    try:
        model = edgelora.load(bundles("llama_untied"), max_context=64, threads=1)
        seen = _record_threads(model)
        other = _in_thread(lambda: (numba.get_num_threads(), _generate_all_ways(model), numba.get_num_threads()))
        assert seen and set(seen) == {1}, seen
        assert other[0] == other[2] == numba.config.NUMBA_NUM_THREADS  # the thread's own count, put back
    finally:
        numba.set_num_threads(caller)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 cores")
def test_threads_apply_in_a_thread_whose_default_is_lower(bundles):
    caller = numba.get_num_threads()
    try:
        model = edgelora.load(bundles("llama_untied"), max_context=64, threads=2)
        seen = _record_threads(model)

        def run():
            numba.set_num_threads(1)
            _generate_all_ways(model)
            return numba.get_num_threads()

        assert _in_thread(run) == 1  # put back
        assert seen and set(seen) == {2}, seen
    finally:
        numba.set_num_threads(caller)
