"""The batching engine (``runtime/engine.py``) and the prompt cache (``runtime/prompt_cache.py``)
against ``Model.generate`` run alone: every request's greedy tokens (and sampled tokens with a
seed, and log-probabilities) equal generating it by itself, whatever ran beside it, whichever
adapters; joining, cancelling, a full queue, unloading while running, closing; the cache reused
only under the same adapter selection, exact where it says so, and within its bound. ``edgelora
chat`` through a subprocess as a user types."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgelora
from conftest import demo_bundle_path
from edgelora.errors import EngineClosed, PlanError, QueueFull, UsageError
from edgelora.runtime.engine import Engine
from edgelora.runtime.model import PREFILL_CHUNK
from edgelora.runtime.prompt_cache import PromptCache, common_prefix
from tiny_models import Adapters, Converted

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama bundle and two PEFT adapters for it (all-linear rank 4, attention rank 8)."""
    converted = Converted(tmp_path_factory, seed=5, bundle_name="nf4")
    made = Adapters(converted, tmp_path_factory)
    _, bundle = converted("llama_untied")
    a1 = made("llama_untied", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    a2 = made("llama_untied", seed=2, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return bundle, {"a1": str(a1), "a2": str(a2)}


@pytest.fixture
def model(tiny):
    """The tiny model, its generations ended only by their limits (a random model may sample BOS or
    EOS, which end a generation: the tests here count tokens and finish reasons)."""
    bundle, adapters = tiny
    m = edgelora.load(bundle, adapters=adapters)
    m.eos_ids = set()
    return m


def _prompts(seed: int, lengths) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in lengths]


ADAPTERS = [None, "a1", "a2", {"a1": 0.5, "a2": 0.5}]


def _greedy(model, prompt, adapter, n, **kw):
    return model.generate(prompt, n, adapter=adapter, return_result=True, **kw)


# --- continuous batching -------------------------------------------------------------------------

def test_concurrent_requests_across_adapters_equal_generate_alone(model):
    """16 requests (prompts of 3 to 600 tokens: one chunk, several, exactly one, a chunk and one)
    across the base, two adapters and a mix, 4 at a time, submitted from 4 threads: each request's
    tokens, text and log-probabilities are those of generate alone; sampled ones with a seed too."""
    prompts = _prompts(0, [3, 40, 300, 600, 17, PREFILL_CHUNK, PREFILL_CHUNK + 1, 2 * PREFILL_CHUNK + 1])
    cases = [(p, ADAPTERS[(i + j) % 4]) for i, p in enumerate(prompts) for j in (0, 1)]
    refs = [_greedy(model, p, a, 12, logprobs=2) for p, a in cases]
    sampled_ref = _greedy(model, prompts[1], "a1", 12, temperature=0.9, top_p=0.9, seed=7)
    with Engine(model, max_batch=4) as eng:
        reqs = [None] * len(cases)

        def submit(k):
            for i in range(k, len(cases), 4):
                reqs[i] = eng.submit(cases[i][0], adapter=cases[i][1], max_new_tokens=12, logprobs=2)
        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sampled = eng.submit(prompts[1], adapter="a1", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
        outs = [r.result(timeout=300) for r in reqs]
        assert sampled.result(timeout=300).token_ids == sampled_ref.token_ids
    for (p, a), out, ref in zip(cases, outs, refs):
        assert out.token_ids == ref.token_ids, (len(p), a)
        assert out.text == ref.text and out.finish_reason == ref.finish_reason  # (length, or eos: BOS or EOS)
        assert [t.to_dict() for t in out.logprobs] == [t.to_dict() for t in ref.logprobs]
        assert out.adapter == ref.adapter
    assert len({tuple(o.token_ids) for o in outs}) > 8  # the adapters really differ
    # the stream's items are the result's tokens, the last with the finish reason
    with Engine(model, max_batch=2) as eng:
        r = eng.submit(prompts[2], adapter="a2", max_new_tokens=5, stop="w42")
        items = list(r)
    ref = _greedy(model, prompts[2], "a2", 5, stop="w42")
    assert [c.token for c in items if c.token is not None] == ref.token_ids
    assert "".join(c.text for c in items) == ref.text and items[-1].finish_reason == ref.finish_reason
    assert all(c.finish_reason is None for c in items[:-1])


def test_a_newcomer_joins_the_running_batch_and_a_finished_one_leaves(model):
    """A request submitted while another decodes gets its tokens while the first still runs (it
    joined the batch; it did not wait for the end), and the first goes on after it finishes."""
    long_p, short_p = _prompts(1, [20, 2 * PREFILL_CHUNK + 30])
    with Engine(model, max_batch=4) as eng:
        first = eng.submit(long_p, adapter="a1", max_new_tokens=120)
        it = iter(first)
        for _ in range(3):
            next(it)
        second = eng.submit(short_p, adapter="a2", max_new_tokens=5)
        second_done = second.result(timeout=300)
        assert first.stats.generated_tokens < 120  # still running when the newcomer finished
        assert eng.stats()["running"] == 1  # the newcomer left the batch; the first runs on
        first_done = first.result(timeout=300)
    assert first_done.token_ids == _greedy(model, long_p, "a1", 120).token_ids
    assert second_done.token_ids == _greedy(model, short_p, "a2", 5).token_ids
    assert first_done.stats.time_to_first_token > 0 and second_done.stats.prefill_seconds > 0


def test_cancel_frees_the_slot_and_ends_the_stream(model):
    p, q = _prompts(2, [10, 12])
    with Engine(model, max_batch=1) as eng:
        a = eng.submit(p, max_new_tokens=200)
        b = eng.submit(q, adapter="a1", max_new_tokens=6)
        it = iter(a)
        next(it)
        assert eng.stats()["queued"] == 1  # b waits for a's slot
        a.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled"
        assert b.result(timeout=300).token_ids == _greedy(model, q, "a1", 6).token_ids
        got = a.result()
        assert got.finish_reason == "cancelled" and len(got.token_ids) < 200
        assert got.token_ids == _greedy(model, p, None, len(got.token_ids)).token_ids
        c = eng.submit(p, max_new_tokens=50)  # cancelled while it waits: never runs
        c.cancel()
        assert c.result(timeout=300).finish_reason == "cancelled"


def test_a_full_queue_is_refused_with_a_retry_time(model):
    p = _prompts(3, [8])[0]
    with Engine(model, max_batch=1, max_queue=1) as eng:
        a = eng.submit(p, max_new_tokens=500)
        next(iter(a))  # admitted: running, the queue empty
        b = eng.submit(p, max_new_tokens=2)
        with pytest.raises(QueueFull, match="max_queue=1") as e:
            eng.submit(p, max_new_tokens=2)
        assert e.value.retry_after >= 1.0
        a.cancel()
        assert b.result(timeout=300).finish_reason == "length"
    with pytest.raises(UsageError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(UsageError, match="multiple of 256"):
        Engine(model, prefill_chunk=100)


def test_submit_checks_everything_before_queueing(model):
    with Engine(model) as eng:
        with pytest.raises(UsageError, match="no adapter named 'nope'"):
            eng.submit([5, 6], adapter="nope")
        with pytest.raises(UsageError, match="temprature"):
            eng.submit([5, 6], temprature=0.5)
        with pytest.raises(UsageError, match="exceed max_context"):
            eng.submit([5] * (model.max_context + 1))
        with pytest.raises(UsageError, match="top_p"):
            eng.submit([5, 6], top_p=0)
        assert eng.stats()["queued"] == 0
        assert eng.submit("the cat sat", max_new_tokens=0).result(timeout=60).finish_reason == "length"


def test_unloading_an_adapter_while_a_request_uses_it(model, tiny):
    """The request keeps the adapter it was submitted with; new requests cannot name it; another
    adapter loaded under its name is not mixed up with it (nor its cached prompts)."""
    p = _prompts(4, [PREFILL_CHUNK + 40])[0]
    ref_a1 = _greedy(model, p, "a1", 40).token_ids
    with Engine(model, max_batch=2, prompt_cache_bytes=64 << 20) as eng:
        r = eng.submit(p, adapter="a1", max_new_tokens=40)
        next(iter(r))
        model.adapters.unload("a1")
        with pytest.raises(UsageError, match="no adapter named 'a1'"):
            eng.submit(p, adapter="a1")
        assert r.result(timeout=300).token_ids == ref_a1
        model.adapters.load("a1", tiny[1]["a2"])  # another adapter, the same name
        again = eng.submit(p, adapter="a1", max_new_tokens=10).result(timeout=300)
        assert again.stats.cached_tokens == 0  # the old a1's keys are not the new a1's
        assert again.token_ids == _greedy(model, p, "a2", 10).token_ids != ref_a1[:10]


def test_async_iteration(model):
    p = _prompts(5, [30])[0]
    ref = _greedy(model, p, "a2", 8)

    async def consume(eng):
        return [c async for c in eng.submit(p, adapter="a2", max_new_tokens=8)]

    with Engine(model) as eng:
        items = asyncio.run(consume(eng))
    assert [c.token for c in items] == ref.token_ids and items[-1].finish_reason == "length"


def test_close_drains_or_cancels(model):
    prompts = _prompts(6, [5, 9, 30])
    eng = Engine(model, max_batch=2)
    reqs = [eng.submit(p, max_new_tokens=10) for p in prompts]
    eng.close(drain=True)
    assert [r.result(timeout=0).finish_reason for r in reqs] == ["length"] * 3
    with pytest.raises(EngineClosed):
        eng.submit(prompts[0])
    eng = Engine(model, max_batch=1)
    reqs = [eng.submit(p, max_new_tokens=400) for p in prompts]
    next(iter(reqs[0]))
    eng.close(drain=False)
    assert {r.result(timeout=0).finish_reason for r in reqs} == {"cancelled"}
    assert eng.stats()["running"] == eng.stats()["queued"] == 0


def test_a_batch_beyond_a_deploy_plan_is_refused_at_construction(model):
    """A deploy folder's plan holds one sequence's KV cache; its headroom (budget less total) bounds
    the engine's batch and its prompt cache together (the check ``generate_batch`` makes, on a
    real deploy folder in tests/test_hardening.py; here a plan with room for 2.5 more caches)."""
    from types import SimpleNamespace
    per_seq = model.kv_cache_bytes
    model.deployment = SimpleNamespace(planned={"budget_bytes": 10 * per_seq + int(2.5 * per_seq),
                                                "total_bytes": 10 * per_seq}, adapters={}, adapter_bytes=None)
    with pytest.raises(PlanError, match="at most 3 sequences"):
        Engine(model, max_batch=4)
    with pytest.raises(PlanError, match="prompt cache of .* 3 sequences"):
        Engine(model, max_batch=3, prompt_cache_bytes=per_seq)
    Engine(model, max_batch=3, prompt_cache_bytes=per_seq // 2).close()  # what is left: half a cache
    Engine(model, max_batch=2, prompt_cache_bytes=per_seq).close()


# --- the prompt cache ----------------------------------------------------------------------------

def test_prompt_cache_reuses_whole_chunks_per_adapter_selection_exactly(model):
    """Exact policy: a prompt sharing a 600-token prefix with an earlier one under the same
    selection skips its two whole chunks (512 tokens) and gives generate's tokens and
    log-probabilities without the cache; the same tokens under another selection (another
    adapter, the base, another mix weight) reuse nothing."""
    head, t1, t2 = _prompts(7, [600, 20, 90])
    refs = {(k, tag): _greedy(model, head + tail, a, 8, logprobs=3)
            for k, a in (("base", None), ("a1", "a1"), ("mix", {"a1": 0.5, "a2": 0.5}))
            for tag, tail in (("t1", t1), ("t2", t2))}
    with Engine(model, max_batch=3, prompt_cache_bytes=256 << 20) as eng:
        assert eng.submit(head + t1, adapter="a1", max_new_tokens=8).result(timeout=300).stats.cached_tokens == 0
        got = {}
        for k, a in (("a1", "a1"), ("base", None), ("mix", {"a1": 0.5, "a2": 0.5})):
            got[k, "t2"] = eng.submit(head + t2, adapter=a, max_new_tokens=8, logprobs=3).result(timeout=300)
        other_mix = eng.submit(head + t2, adapter={"a1": 0.7, "a2": 0.3}, max_new_tokens=1).result(timeout=300)
        for k, a in (("base", None), ("mix", {"a1": 0.5, "a2": 0.5})):
            got[k, "t1"] = eng.submit(head + t1, adapter=a, max_new_tokens=8, logprobs=3).result(timeout=300)
        stats = eng.stats()["prompt_cache"]
    assert got["a1", "t2"].stats.cached_tokens == 2 * PREFILL_CHUNK  # the a1 prompt's whole chunks
    assert got["base", "t2"].stats.cached_tokens == got["mix", "t2"].stats.cached_tokens == 0  # not a1's keys
    assert other_mix.stats.cached_tokens == 0  # another weight, another selection
    assert got["base", "t1"].stats.cached_tokens == got["mix", "t1"].stats.cached_tokens == 2 * PREFILL_CHUNK
    for key, g in got.items():
        assert g.token_ids == refs[key].token_ids, key
        assert [t.to_dict() for t in g.logprobs] == [t.to_dict() for t in refs[key].logprobs], key
    assert stats["hits"] == 3 and stats["entries"] == 4 and stats["exact"]


def test_model_prompt_cache_every_position_for_a_conversation(model):
    """``exact=False`` (a conversation): the next turn reuses the previous prompt and answer,
    prefilling only the new tokens, and its log-probabilities match a fresh prefill's within
    float32 rounding (1e-4 here)."""
    turn1, question = _prompts(8, [300, 25])
    fresh_first = _greedy(model, turn1, "a2", 30)
    model.prompt_cache = PromptCache(64 << 20, exact=False)
    first = _greedy(model, turn1, "a2", 30)
    assert first.token_ids == fresh_first.token_ids and first.stats.cached_tokens == 0
    turn2 = turn1 + first.token_ids + question
    second = _greedy(model, turn2, "a2", 10, logprobs=4)
    assert second.stats.cached_tokens == len(turn1) + len(first.token_ids) - 1  # all but the answer's last token
    model.prompt_cache = None
    fresh = _greedy(model, turn2, "a2", 10, logprobs=4)
    n = common_prefix(np.array(second.token_ids), np.array(fresh.token_ids))
    assert n >= 1
    for a, b in zip(second.logprobs[:n], fresh.logprobs[:n]):
        assert abs(a.logprob - b.logprob) <= 1e-4
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_prompt_cache_bound_and_least_recently_used_eviction(model):
    """Entries are evicted least recently used first when their bytes pass the bound; an entry
    larger than the bound is not kept; a prefix's entry is replaced by one that extends it."""
    from edgelora.runtime.lora import BASE
    per_position = model.kv_cache_bytes // model.max_context  # keys and values of one position
    size = lambda n: n * per_position + n * 8  # keys, values and the token ids
    cache = PromptCache(size(3 * PREFILL_CHUNK) + 100)
    prompts = _prompts(9, [PREFILL_CHUNK + 5] * 4)
    kv = model.net.new_cache()
    for p in prompts:
        kv.reset()
        model.net.forward(np.array(p), kv)
        cache.store(p, BASE, kv, len(p))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 3 and cache.nbytes == 3 * size(PREFILL_CHUNK)
    fresh = model.net.new_cache()
    assert cache.restore(prompts[0] + [1], BASE, fresh) == 0  # the oldest went
    assert cache.restore(prompts[1] + [1], BASE, fresh) == PREFILL_CHUNK  # used: now the most recent
    own = model.net.new_cache()
    model.net.forward(np.array(prompts[1]), own)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.prefix(PREFILL_CHUNK), own.prefix(PREFILL_CHUNK)))
    assert fresh.length == PREFILL_CHUNK
    kv.reset()
    model.net.forward(np.array(prompts[0]), kv)
    cache.store(prompts[0], BASE, kv, len(prompts[0]))  # evicts prompts[2]'s, the least recently used
    assert cache.restore(prompts[2] + [1], BASE, model.net.new_cache()) == 0
    assert cache.restore(prompts[1] + [1], BASE, model.net.new_cache()) == PREFILL_CHUNK
    small = PromptCache(size(PREFILL_CHUNK) - 1)
    small.store(prompts[0], BASE, kv, len(prompts[0]))
    assert len(small) == 0 and small.nbytes == 0
    loose = PromptCache(1 << 30, exact=False)
    loose.store(prompts[0][:100], BASE, kv, 100)
    loose.store(prompts[0][:200], BASE, kv, 200)  # extends the first: replaces it
    loose.store(prompts[0][:150], BASE, kv, 150)  # held already
    assert len(loose) == 1 and loose.nbytes == size(200)
    with pytest.raises(UsageError, match="non-negative"):
        PromptCache(-1)


# --- edgelora chat -------------------------------------------------------------------------------

def _chat(*args, stdin):
    return subprocess.run([sys.executable, "-m", "edgelora", "chat", *map(str, args)], capture_output=True,
                          text=True, input=stdin, timeout=600)


def test_chat_prefills_only_the_new_turn_and_drops_old_turns_when_full():
    bundle = demo_bundle_path()
    r = _chat(bundle, "-n", 20, "--json", stdin="Hello!\nTell me a story.\nWhat color is the ball?\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 3 and turns[0]["cached_tokens"] == 0
    model = edgelora.load(bundle)
    tok = model.tokenizer
    history = []
    for t in turns:
        history.append({"role": "user", "content": t["prompt"]})
        assert t["prompt_ids"] == tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        history.append({"role": "assistant", "content": t["text"]})
    for before, t in zip(turns, turns[1:]):  # the previous prompt at least came from the cache
        assert before["prompt_tokens"] <= t["cached_tokens"] < t["prompt_tokens"]
    # a 96-token context: turns go, oldest first, with a note; the chat goes on to the end
    lines = "".join(f"Tell me a story about the number {i}.\n" for i in range(6))
    r = _chat(bundle, "-n", 30, "--max-context", 96, "--json", stdin=lines)
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 6 and "dropped its oldest 2 messages" in r.stderr
    assert all(t["prompt_tokens"] <= 96 - 30 for t in turns)  # room for the answer kept
    r = _chat(bundle, "-n", 5, "--max-context", 32, stdin="the " * 40 + "\n")
    assert r.returncode == 2 and "more than the 32-token context" in r.stderr and "Traceback" not in r.stderr
