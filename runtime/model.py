"""``edgelora.load`` and the ``Model`` users hold: logits, generate, stream, chat.

Generation is a prefill of the prompt in chunks (matrix-matrix products through the dequantized
tile kernels), then one-token decode steps (fused NF4 matrix-vector kernels) against a key/value
cache preallocated for ``max_context`` tokens. Text is streamed as it becomes complete (never half
a UTF-8 character), and stop strings end generation without leaking into the text.

Every generation is a :class:`_Sequence` (prompt, cache, sampler, text, adapter selection, stop
rules, statistics) run by one decode loop: ``stream`` and ``generate`` are a batch of one,
``generate_batch`` the same loop over many. Each call has its own statistics: the
:class:`Generation` that ``generate(..., return_result=True)`` returns, or the
:class:`GenerationChunk` items of ``stream_generate``.
"""

from __future__ import annotations

import numbers
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from edgelora.autoconvert import bundle_path
from edgelora.bundle import Bundle
from edgelora.devices.profiles import host_ram_bytes
from edgelora.errors import PlanError, UsageError
from edgelora.products import (DEFAULT_PRODUCTS, KV_CACHE_BYTES, check_adapter_dtype, check_kv_cache,
                               default_adapter_dtype, default_kv_cache)
from edgelora.runtime.llama import KVCache
from edgelora.runtime.loader import build_model
from edgelora.runtime.lora import BASE, AdapterSet, Resident, Selection
from edgelora.runtime.sampling import Sampler, SamplingParams, log_softmax, most_likely
from edgelora.runtime.speculative import NUM_DRAFT, DraftBudget, make_drafter, verify
from edgelora.runtime.threads import ThreadGovernor, set_threads, thread_count
from edgelora.runtime.warmup import ensure_compiled

PREFILL_CHUNK = 256


class _Current:
    """``adapter=`` not given: use the model's current selection."""

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()
#: an adapter selection: a resident adapter's name, None (the base), {name: weight} or "a=0.7,b=0.3"
AdapterSpec = Union[str, None, Mapping[str, float], _Current]


def _refuse_unknown(options: dict) -> None:
    """A mistyped keyword (``temprature=0.5``) is a usage error naming it and the valid sampling
    options (the generation methods take ``**unknown`` only for this message)."""
    if options:
        SamplingParams.from_kwargs(**options)  # raises: every key is unknown


class _TextOut:
    """Turns generated token ids into text pieces: complete UTF-8 only, special tokens left out
    (transformers' ``skip_special_tokens=True``: their ids stay in ``token_ids``), stop strings cut
    off and never shown, text that might begin a stop string held back until it is known not to."""

    def __init__(self, tokenizer, stops):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = stops
        self.held = ""
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def push(self, tok: int) -> str:
        self.held += self.decoder.push(tok)
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            emit, self.held, self.stopped = self.held[:cut], "", True
            return emit
        if len(self.held) > self.hold:
            n = len(self.held) - self.hold
            emit, self.held = self.held[:n], self.held[n:]
            return emit
        return ""

    def flush(self) -> str:
        if self.stopped:
            return ""
        emit, self.held = self.held + self.decoder.flush(), ""
        return emit


@dataclass
class GenerationStats:
    """One generation's statistics; while it runs, the statistics so far."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    prompt_ids: list = field(default_factory=list)
    generated_ids: list = field(default_factory=list)
    stop_reason: str = ""
    adapter: str = "base"  # the adapter selection the generation ran with
    drafted_tokens: int = 0  # speculative decoding: tokens the drafter guessed
    accepted_tokens: int = 0  # ... and of those, the ones the model kept
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prompt cache (not prefilled)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        done = self.prompt_tokens - self.cached_tokens  # (those from the prompt cache were not prefilled)
        return done / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "time_to_first_token": self.time_to_first_token,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second,
                "prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids, "stop_reason": self.stop_reason,
                "adapter": self.adapter, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens, "cached_tokens": self.cached_tokens}


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability and the ``k`` most likely tokens' at its step (as
    OpenAI's ``logprobs``/``top_logprobs``): the log-softmax of the model's final logits (after
    any soft-capping), before the sampling transforms (repetition penalty, temperature, filters)."""

    token: int
    logprob: float
    top_logprobs: tuple  # ((token id, log-probability), ...): the k most likely, most likely first

    @classmethod
    def of(cls, logits: np.ndarray, token: int, k: int) -> "TokenLogprobs":
        lp = log_softmax(logits)  # float64 [V]
        return cls(token, float(lp[token]), tuple((int(i), float(lp[i])) for i in most_likely(lp, k)))

    def to_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob,
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in self.top_logprobs]}


@dataclass(frozen=True)
class GenerationChunk:
    """One item of ``Model.stream_generate`` (as mlx-lm's ``GenerationResponse``): one per generated
    token, and the last item has ``finish_reason`` set (with ``token`` None when the generation
    ended without a new token: EOS sampled, or ``max_new_tokens=0``)."""

    text: str  # the text this item completes ("" while held back: half a character, a possible stop string)
    token: int | None  # the generated token id
    logprobs: TokenLogprobs | None  # with ``logprobs=k``
    finish_reason: str | None  # None until the last item: stop, length, eos, context (cancelled: an Engine request)
    stats: GenerationStats  # this generation's statistics, running: the same object, updated as it goes


@dataclass
class Generation:
    """One generation's result (``Model.generate(..., return_result=True)``): its text and tokens,
    why it ended, the per-token log-probabilities when asked, and its own statistics."""

    text: str
    stats: GenerationStats
    logprobs: list | None = None  # one TokenLogprobs per token of ``token_ids`` (``logprobs=k``)

    @property
    def token_ids(self) -> list:
        return self.stats.generated_ids

    @property
    def prompt_ids(self) -> list:
        return self.stats.prompt_ids

    @property
    def finish_reason(self) -> str:
        """``stop`` (a stop string), ``length`` (``max_new_tokens``), ``eos`` or ``context`` (the cache is full)."""
        return self.stats.stop_reason

    @property
    def adapter(self) -> str:
        return self.stats.adapter

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.stats.prefill_tokens_per_second

    @property
    def decode_tokens_per_second(self) -> float:
        return self.stats.decode_tokens_per_second

    def to_dict(self) -> dict:
        out = {"text": self.text, "finish_reason": self.finish_reason, **self.stats.to_dict()}
        if self.logprobs is not None:
            out["logprobs"] = [t.to_dict() for t in self.logprobs]
        return out


class _Sequence:
    """One generation in progress: its prompt ids, KV cache, sampler, text, adapter selection, stop
    rules and statistics. The decode loop samples a token from ``logits`` and hands it to
    :meth:`accept`; a forward step then sets ``logits`` again unless the sequence is ``done``.

    With a ``drafter`` (speculative decoding, ``runtime/speculative.py``) a forward step also runs
    the drafter's guesses: ``guesses`` are those not yet decided, ``rows`` the logits after each
    (already in the cache, past ``cache.length``), ``draft_probs`` their draft probabilities; a
    sampled token that keeps the next guess takes its row as the next logits with no forward."""

    def __init__(self, model: "Model", ids: np.ndarray, lora: Selection, params: SamplingParams, stops: list,
                 max_new_tokens: int, logprobs: int | None, drafter=None, num_draft: int = NUM_DRAFT, cache=None):
        self.ids, self.lora, self.max_new_tokens, self.top = ids, lora, max_new_tokens, logprobs
        self.cache = model.net.new_cache() if cache is None else cache  # (the engine's: from its pool, when admitted)
        self.filled = 0  # prompt positions in the cache (the prefill's progress)
        self.t0 = self.t1 = 0.0  # clocks: the request (time to first token counts from it), the prefill's end
        self.first = True  # no token sampled yet
        self.sampler = Sampler(params)
        self.text = _TextOut(model.tokenizer, stops)
        self.eos_ids, self.max_context = model.eos_ids, model.max_context
        self.history = [int(i) for i in ids]  # prompt and generated ids (the repetition penalty's)
        self.stats = GenerationStats(prompt_tokens=len(ids), prompt_ids=list(self.history), adapter=lora.label)
        self.pieces: list[str] = []
        self.logprobs = None if logprobs is None else []
        self.logits = None  # float32 [V]: the next token's
        self.done = False
        self.drafter = None if drafter is None else drafter.start(params)
        self.num_draft = num_draft
        #: how many guesses each step verifies, for a drafter whose guesses are free (prompt lookup)
        self.budget = DraftBudget(num_draft) if drafter is not None and drafter.adapts else None
        self.guesses, self.rows, self.draft_probs = [], [], []
        self.kept = False  # the last sampled token is the next guess (its row is computed)

    def sample(self) -> int:
        if not self.guesses:
            self.kept = False
            return self.sampler.sample(self.logits, self.history)
        token, self.kept = verify(self.sampler, self.logits, self.history, self.guesses[0], self.draft_probs[0])
        return token

    def next_from_guesses(self) -> bool:
        """After a token was accepted: when it kept the next guess, that guess's row becomes the next
        logits (its keys are in the cache already) and True; otherwise the guesses left are dropped
        (their keys past ``cache.length`` are overwritten by the next forward) and False."""
        if not self.kept:
            self.guesses, self.rows, self.draft_probs = [], [], []
            return False
        self.logits = self.rows.pop(0)
        del self.guesses[0], self.draft_probs[0]
        self.cache.length += 1
        self.stats.accepted_tokens += 1
        return True

    def draft_room(self) -> int:
        """How many guesses the next step may verify: ``num_draft``, within the cache (the last token
        and the guesses must fit) and ``max_new_tokens`` (the step yields at most guesses + 1)."""
        return max(0, min(self.num_draft, self.max_context - self.cache.length - 1,
                          self.max_new_tokens - self.stats.generated_tokens - 1))

    def accept(self, token: int) -> GenerationChunk:
        """Take the sampled ``token``: EOS or BOS (``eos_ids``) ends the sequence without output; any other token is
        generated, its text pushed and the stop rules checked (a stop string, ``max_new_tokens``,
        a full cache)."""
        if token in self.eos_ids:
            return self.finish("eos")
        st = self.stats
        lp = None if self.top is None else TokenLogprobs.of(self.logits, token, self.top)
        if lp is not None:
            self.logprobs.append(lp)
        self.history.append(token)
        st.generated_ids.append(token)
        st.generated_tokens += 1
        piece = self.text.push(token)
        if self.text.stopped:
            reason = "stop"
        elif st.generated_tokens == self.max_new_tokens:
            reason = "length"
        elif self.cache.length >= self.max_context:
            reason = "context"
        else:
            reason = None
        return self._emit(piece, token, lp, reason)

    def finish(self, reason: str) -> GenerationChunk:
        """End without a new token."""
        return self._emit("", None, None, reason)

    def _emit(self, piece: str, token, lp, reason) -> GenerationChunk:
        if reason is not None:
            piece += self.text.flush()
            self.stats.stop_reason, self.done = reason, True
        self.pieces.append(piece)
        return GenerationChunk(piece, token, lp, reason, self.stats)

    def result(self) -> Generation:
        return Generation("".join(self.pieces), self.stats, self.logprobs)


class Model:
    """A loaded bundle, ready to generate. Create with :func:`edgelora.load`.

    ``deployment``: the :class:`~edgelora.deployment.Deployment` when the bundle comes from a
    deploy folder: its adapters are made resident, and no more adapter bytes than it planned.
    ``products``: how NF4 weights multiply, ``"exact"`` or ``"int8"`` (:func:`edgelora.load`).
    ``kv_cache``: what its KV caches hold, ``"float32"`` or ``"float16"`` (None: the default of
    ``products``, :func:`edgelora.load`). ``adapter_dtype``: how ``adapters.load`` holds an
    adapter, ``"float32"`` or ``"float16"`` (None: the default of ``products``).
    ``prompt_cache``: None, or a :class:`~edgelora.runtime.prompt_cache.PromptCache` whose kept
    prompt prefixes generations reuse (``model.prompt_cache = edgelora.PromptCache(256 << 20)``)."""

    def __init__(self, bundle: Bundle, threads: int | None = None, max_context: int | None = None,
                 deployment=None, products: str = DEFAULT_PRODUCTS, kv_cache: str | None = None,
                 adapter_dtype: str | None = None):
        from edgelora.runtime.tokenizer import Tokenizer
        self.bundle = bundle
        self.path = bundle.path
        self.args = bundle.args
        self.threads = set_threads(threads)  # the most every forward runs on, from whichever thread (``_running``)
        self.governor = ThreadGovernor(self.threads)  # how many of them each forward uses
        self.products = products
        self.kv_cache = kv_cache = default_kv_cache(products) if kv_cache is None else check_kv_cache(kv_cache)
        self.adapter_dtype = (default_adapter_dtype(products) if adapter_dtype is None
                              else check_adapter_dtype(adapter_dtype))
        _check_cache_fits(bundle, max_context, kv_cache)
        self.net = build_model(bundle, max_context, products, kv_cache)
        self.max_context = self.net.max_context
        self.tokenizer = Tokenizer.from_dir(bundle.path, listed=bundle.listed)
        # the ids that end a generation (finish reason "eos"): EOS, and BOS, which starts a new document
        # (transformers' eos_token_id lists, llama.cpp's end-of-generation tokens); never shown as text
        bos = self.tokenizer.bos_token_id
        self.eos_ids = set(self.tokenizer.eos_token_ids) | ({bos} if bos is not None else set())
        self._local = threading.local()  # statistics of the last generation, per thread
        self.selection: Selection = BASE  # what generations use unless given ``adapter=``
        self._lock = threading.Lock()  # one forward step at a time (kernels share thread pools)
        #: a :class:`~edgelora.runtime.prompt_cache.PromptCache`: generations reuse the keys and values of
        #: the prompt prefixes it holds (None: every prompt is prefilled in full)
        self.prompt_cache = None
        self.deployment = deployment  # the Deployment when loaded from a deploy folder (edgelora.deployment)
        self.adapters = AdapterSet(self.net, self._unloaded,
                                   budget_bytes=None if deployment is None else deployment.adapter_bytes,
                                   dtype=self.adapter_dtype)
        for name, adapter_path in ({} if deployment is None else deployment.adapters).items():
            self.adapters.load(name, adapter_path)

    @property
    def last_stats(self) -> GenerationStats:
        """Statistics of the last generation this thread started with ``stream``, ``generate`` or
        ``chat`` (kept for compatibility: each call's own are in its :class:`Generation` or
        :class:`GenerationChunk` items)."""
        return getattr(self._local, "stats", None) or GenerationStats()

    @last_stats.setter
    def last_stats(self, stats: GenerationStats) -> None:
        self._local.stats = stats

    @property
    def last_batch_stats(self) -> list:
        """Per-sequence statistics of this thread's last ``generate_batch``."""
        return getattr(self._local, "batch", [])

    @last_batch_stats.setter
    def last_batch_stats(self, stats: list) -> None:
        self._local.batch = stats

    def __repr__(self) -> str:
        a = self.args
        return (f"Model(path={str(self.path)!r}, model_type={a.model_type!r}, layers={a.num_hidden_layers}, "
                f"hidden_size={a.hidden_size}, vocab_size={a.vocab_size}, max_context={self.max_context}, "
                f"threads={self.threads}, adapters={self.adapters.names!r}, active_adapter={self.active_adapter!r})")

    # --- adapters --------------------------------------------------------------------------
    def use(self, adapter) -> Selection:
        """Make ``adapter`` the current selection: a resident adapter's name, ``None`` for the plain
        base, or ``{"a": 0.7, "b": 0.3}`` for an exact weighted mix (as text too: ``"a=0.7,b=0.3"``,
        ``"base"``). Copies no weights.
        Generations already running keep the selection they started with."""
        self.selection = self.adapters.select(adapter)
        return self.selection

    @contextmanager
    def using(self, adapter):
        """``with model.using("a"): ...`` uses ``adapter`` inside the block, then what was before
        (or the base, with a warning, when the block unloaded an adapter of what was before)."""
        before = self.selection
        self.use(adapter)
        try:
            yield self.selection
        finally:
            gone = next((r for r in before.adapters if not self.adapters.holds(r)), None)
            self.selection = before if gone is None else self._without(gone, before)

    def _unloaded(self, res: Resident) -> None:
        """``adapters.unload`` tells the model ``res`` is gone: a current selection that uses it
        (alone or in a mix) gives way to the base. Generations already running keep theirs."""
        if any(r is res for r in self.selection.adapters):
            self.selection = self._without(res, self.selection)

    @staticmethod
    def _without(res: Resident, was: Selection) -> Selection:
        """The base, in place of selection ``was`` that adapter ``res``'s unloading took away; says so."""
        warnings.warn(f"adapter {res.name!r} was unloaded while the model was using {was.label!r}; "
                      f"the model now uses the base", stacklevel=4)
        return BASE

    @property
    def active_adapter(self) -> str:
        """The current selection as text: ``base``, a name, or ``a=0.7,b=0.3``."""
        return self.selection.label

    def _pin(self, adapter) -> Selection:
        return self.selection if adapter is CURRENT else self.adapters.select(adapter)

    def _forward(self, ids, cache, all_logits=False, lora=BASE):
        with self._running():
            return self.net.forward(ids, cache, all_logits=all_logits, lora=lora)

    @contextmanager
    def _running(self, decode_rows: int = 0):
        """Around every forward: one at a time (the kernels share thread pools), on the thread count
        the governor chooses (at most ``threads``; fewer while other processes keep cores busy).
        Numba's count belongs to each calling thread, so it is set on entry and the caller's put
        back after: a generation from any thread runs on the model's threads. A decode step of
        ``decode_rows`` sequences reports its time to the governor."""
        with self._lock:
            self.bundle.check()  # a mismatch the background hash found, or weights truncated under the mapping
            n = self.governor.current(decode_rows)
            with thread_count(n):
                t = time.perf_counter()
                yield
                if decode_rows:
                    self.governor.record(n, time.perf_counter() - t, decode_rows)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return KVCache.planned_bytes(self.args, self.max_context, self.kv_cache)

    @property
    def weight_bytes(self) -> int:
        return int(self.bundle.manifest["stats"]["weight_bytes"])

    # --- logits ----------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise UsageError("token ids must be a non-empty 1-D sequence of integers")
        bad = ids[(ids < 0) | (ids >= self.args.vocab_size)]
        if bad.size:
            raise UsageError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        if ids.size > self.max_context:
            limit = self.args.max_position_embeddings
            raise UsageError(f"{ids.size} tokens exceed max_context={self.max_context}; " + (
                f"load with a larger max_context (model limit {limit}) or shorten the prompt"
                if self.max_context < limit else f"the model holds at most {limit} positions: shorten the prompt"))
        return ids.astype(np.int64)

    def _prefill(self, ids: np.ndarray, cache, all_logits: bool, lora: Selection = BASE) -> np.ndarray:
        outs = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[s:s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= len(ids)
            if all_logits or last:
                outs.append(self._forward(chunk, cache, all_logits, lora))
            else:
                self._forward(chunk, cache, False, lora)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def _start_prefill(self, s: _Sequence, prompt_cache=None) -> None:
        """Before ``s``'s prefill: what ``prompt_cache`` (``runtime/prompt_cache.py``) holds of its
        prompt under its adapter selection is copied into its cache, and the prefill goes on from there."""
        if prompt_cache is not None:
            s.filled = s.stats.cached_tokens = prompt_cache.restore(s.ids, s.lora, s.cache)

    def _prefill_step(self, s: _Sequence, prompt_cache=None) -> bool:
        """One chunk of ``s``'s prefill, up to the next multiple of ``PREFILL_CHUNK`` (the chunks of
        :meth:`_prefill`, wherever the prefill started: the same bits); True when the prompt is in,
        ``s.logits`` then set and the prompt's keys and values offered to ``prompt_cache``."""
        t = time.perf_counter()
        end = min(len(s.ids), (s.filled // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        out = self._forward(s.ids[s.filled:end], s.cache, False, s.lora)  # [1, V]
        s.filled = end
        s.stats.prefill_seconds += time.perf_counter() - t
        if end < len(s.ids):
            return False
        s.logits = out[-1]
        if prompt_cache is not None:
            prompt_cache.store(s.ids, s.lora, s.cache, len(s.ids))
        return True

    def logits(self, token_ids, adapter=CURRENT) -> np.ndarray:
        """float32 ``[T, vocab]``: the next-token logits after each of ``token_ids``."""
        ids = self._check_ids(token_ids)
        return self._prefill(ids, self.net.new_cache(), True, self._pin(adapter))

    def token_logprobs(self, token_ids, adapter=CURRENT) -> np.ndarray:
        """float64 ``[T - 1]``: the log-probability of each of ``token_ids`` after the ones before it
        (``log_softmax`` of the model's final logits), computed one prefill chunk at a time so that
        no ``[T, vocab]`` array is held (``edgelora.evaluate``'s perplexity and answer loss)."""
        ids = self._check_ids(token_ids)
        cache, lora = self.net.new_cache(), self._pin(adapter)
        out = []
        for s in range(0, len(ids) - 1, PREFILL_CHUNK):
            chunk = ids[s:min(s + PREFILL_CHUNK, len(ids) - 1)]  # [C]: the last token predicts nothing
            logits = self._forward(chunk, cache, True, lora).astype(np.float64)  # [C, V]
            top = logits.max(axis=-1, keepdims=True)  # [C, 1]
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))  # [C]
            nxt = ids[s + 1:s + 1 + len(chunk)]  # [C]: the tokens they predict
            out.append(logits[np.arange(len(chunk)), nxt] - lse)
        return np.concatenate(out) if out else np.empty(0)

    # --- generation ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _stops(self, stop, max_new_tokens) -> list:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise UsageError("stop must be a non-empty string or a list of them")
        return stops

    def _top_logprobs(self, logprobs) -> int | None:
        if logprobs is None:
            return None
        V = self.args.vocab_size
        if isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral) or not 0 <= logprobs <= V:
            raise UsageError(f"logprobs must be None or the number of top alternatives, 0 to {V}, got {logprobs!r}")
        return int(logprobs)

    def _prompt_ids(self, prompt) -> np.ndarray:
        return self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))

    def _sequence(self, prompt, max_new_tokens, stop, adapter, logprobs, params: SamplingParams, draft=None,
                  num_draft=NUM_DRAFT) -> _Sequence:
        """A generation of ``prompt``, its options checked and its adapter selection pinned; this
        thread's ``last_stats``."""
        stops = self._stops(stop, max_new_tokens)
        top = self._top_logprobs(logprobs)
        lora = self._pin(adapter)
        if isinstance(num_draft, bool) or not isinstance(num_draft, numbers.Integral) or num_draft < 1:
            raise UsageError(f"num_draft must be a positive integer, got {num_draft!r}")
        seq = _Sequence(self, self._prompt_ids(prompt), lora, params, stops, max_new_tokens, top,
                        make_drafter(draft, self), int(num_draft))
        self.last_stats = seq.stats
        return seq

    def _decode(self, seqs: list):
        """The decode loop of every generation; yields each sequence's :class:`GenerationChunk` items.

        Each sequence is prefilled on its own (from what ``prompt_cache`` holds of its prompt);
        then, until all are done, :meth:`_step`. Times count from the call (time to first token)
        and from the end of the prefills (decode)."""
        t0 = time.perf_counter()
        for s in seqs:
            s.t0 = t0
            self._start_prefill(s, self.prompt_cache)
            while not self._prefill_step(s, self.prompt_cache):
                pass
        t1 = time.perf_counter()
        for s in seqs:
            s.t1 = t1
            if s.max_new_tokens == 0:
                yield s.finish("length")
        live = [s for s in seqs if not s.done]
        while live:
            for _, chunk in self._step(live, self.prompt_cache):
                yield chunk
            live = [s for s in live if not s.done]

    def _step(self, live: list, prompt_cache=None):
        """One step of the token loop (generations and the batching engine, ``runtime/engine.py``):
        each live sequence samples its next token and accepts it (yielding ``(sequence, chunk)``),
        then one forward step computes the next logits of those still live: the one-row forward
        for a single sequence (the faster decode), the batched step for several (its row b equals
        sequence b's one-row forward bit for bit, so a sequence's tokens never depend on its
        batch). A sequence that ends offers its keys and values to ``prompt_cache``."""
        ready = []  # sequences whose next logits a kept guess already gave
        for s in live:
            token = s.sample()
            if s.first:
                s.stats.time_to_first_token, s.first = time.perf_counter() - s.t0, False
            chunk = s.accept(token)
            s.stats.decode_seconds = time.perf_counter() - s.t1
            if not s.done and s.next_from_guesses():
                ready.append(s)
            if s.done and prompt_cache is not None:
                prompt_cache.store(s.history[:s.cache.length], s.lora, s.cache, len(s.ids))
            yield s, chunk
        step = [s for s in live if not s.done and s not in ready]
        if step:
            self._advance(step)

    def _advance(self, seqs: list) -> None:
        """One decode step: each sequence's last token through the model, its next logits kept.
        A sequence with a drafter runs its step with guesses (:meth:`_speculate`)."""
        for s in seqs:
            if s.drafter is not None:
                self._speculate(s)
        seqs = [s for s in seqs if s.drafter is None]
        if not seqs:
            return
        tokens = np.array([s.history[-1] for s in seqs])  # [B]
        with self._running(decode_rows=len(seqs)):
            if len(seqs) == 1:
                out = self.net.forward(tokens, seqs[0].cache, lora=seqs[0].lora)  # [1, V]
            else:
                out = self.net.forward_batch(tokens, [s.cache for s in seqs], [s.lora for s in seqs])  # [B, V]
        for s, logits in zip(seqs, out):
            s.logits = logits

    def _speculate(self, s: _Sequence) -> None:
        """A speculative step: the last token and the drafter's guesses through one forward whose
        rows are each exactly a one-token decode step (``forward_steps``); the cache's ``length``
        counts only the last token, each kept guess adds its own (``_Sequence.next_from_guesses``)."""
        room = s.draft_room()
        guesses, probs = s.drafter.propose(s.history, room) if room else ([], [])
        budget = s.budget
        if budget is not None:  # as many of the guesses as pay, by what was kept and what steps cost
            k = budget.step(s.history, guesses, s.stats.accepted_tokens)
            guesses, probs = guesses[:k], probs[:k]
        tokens = np.array([s.history[-1]] + guesses)  # [1 + g]
        start = s.cache.length
        t = time.perf_counter()
        with self._running(decode_rows=len(tokens)):
            if guesses:
                out = self.net.forward_steps(tokens, s.cache, s.lora)  # [1 + g, V]
            else:
                out = self.net.forward(tokens, s.cache, lora=s.lora)  # [1, V]: a plain step
        if budget is not None:
            budget.timed(len(tokens), time.perf_counter() - t)
        s.cache.length = start + 1
        s.logits, s.rows, s.guesses, s.draft_probs = out[0], list(out[1:]), guesses, probs
        s.stats.drafted_tokens += len(guesses)

    @staticmethod
    def _needs_result(logprobs, return_result: bool) -> None:
        if logprobs is not None and not return_result:
            raise UsageError("logprobs are returned in the result: pass return_result=True")

    def stream_generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256,
                        stop: str | Sequence[str] | None = None,
                        adapter: AdapterSpec = CURRENT, *, logprobs: int | None = None,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0, repetition_penalty: float = 1.0,
                        seed: int | None = None, draft=None, num_draft: int = NUM_DRAFT,
                        **unknown) -> Iterator[GenerationChunk]:
        """Yield a :class:`GenerationChunk` per generated token (as mlx-lm's ``stream_generate``):
        its text piece, token id, log-probabilities with ``logprobs=k``, and this generation's
        running statistics; the last item has the ``finish_reason``.

        ``logprobs=k``: each token's log-probability and the ``k`` most likely tokens' (0: only the
        chosen token's), the log-softmax of the model's final logits after any soft-capping, before
        the sampling transforms (repetition penalty, temperature, filters). Other options as
        :meth:`stream`.
        """
        _refuse_unknown(unknown)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        seq = self._sequence(prompt, max_new_tokens, stop, adapter, logprobs, params, draft, num_draft)
        yield from self._decode([seq])

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, stop: str | Sequence[str] | None = None,
               adapter: AdapterSpec = CURRENT, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               draft=None, num_draft: int = NUM_DRAFT, **unknown) -> Iterator[str]:
        """Yield text pieces as they are generated. ``prompt`` is text or a list of token ids.

        ``adapter``: a resident adapter's name, ``None`` (the base) or a ``{name: weight}`` mix for
        this call; by default the model's current selection. The selection is pinned when the
        generation starts: switching adapters meanwhile does not affect it.
        Sampling (:class:`~edgelora.runtime.sampling.SamplingParams`): ``temperature`` (0 = greedy),
        ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off), ``repetition_penalty`` (1 = off),
        ``seed`` (None = a fresh one).
        Per-token data and this call's statistics: :meth:`stream_generate`.

        ``draft``: speculative decoding (README, *Speculative decoding*): ``"prompt-lookup"``
        guesses the next tokens from earlier text (no second model), a loaded smaller model with the
        same tokenizer drafts them itself; up to ``num_draft`` guesses are verified per forward (a
        draft model's always that many; prompt lookup's as many as pay: ``speculative.DraftBudget``). Greedy
        text is exactly that of plain decoding, sampled text has exactly its distribution (and, with
        prompt lookup or a greedy draft, a seed gives plain decoding's tokens); the statistics count
        ``drafted_tokens`` and ``accepted_tokens``.
        """
        for chunk in self.stream_generate(prompt, max_new_tokens, stop=stop, adapter=adapter,
                                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                          repetition_penalty=repetition_penalty, seed=seed, draft=draft,
                                          num_draft=num_draft, **unknown):
            if chunk.text:
                yield chunk.text

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, stop: str | Sequence[str] | None = None,
                 adapter: AdapterSpec = CURRENT, *, return_result: bool = False, logprobs: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 draft=None, num_draft: int = NUM_DRAFT, **unknown) -> str | Generation:
        """The generated text (without the prompt); with ``return_result=True`` a :class:`Generation`
        (text, token ids, finish reason, this call's statistics, and the per-token log-probabilities
        with ``logprobs=k``, as :meth:`stream_generate` computes them). Options as :meth:`stream`."""
        self._needs_result(logprobs, return_result)
        _refuse_unknown(unknown)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        seq = self._sequence(prompt, max_new_tokens, stop, adapter, logprobs, params, draft, num_draft)
        for _ in self._decode([seq]):
            pass
        result = seq.result()
        return result if return_result else result.text

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256,
             stop: str | Sequence[str] | None = None, adapter: AdapterSpec = CURRENT, *, return_result: bool = False,
             logprobs: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             draft=None, num_draft: int = NUM_DRAFT, **unknown) -> str | Generation:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the chat template;
        the text, or a :class:`Generation` with ``return_result=True`` (as :meth:`generate`)."""
        return self.generate(self.chat_ids(messages), max_new_tokens, stop=stop, adapter=adapter,
                             return_result=return_result, logprobs=logprobs, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                             draft=draft, num_draft=num_draft, **unknown)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256,
                    stop: str | Sequence[str] | None = None, adapter: AdapterSpec = CURRENT, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                    draft=None, num_draft: int = NUM_DRAFT, **unknown) -> Iterator[str]:
        """Yield the answer to a conversation as text pieces (:meth:`chat`, streamed as :meth:`stream`)."""
        yield from self.stream(self.chat_ids(messages), max_new_tokens, stop=stop, adapter=adapter,
                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty, seed=seed, draft=draft,
                               num_draft=num_draft, **unknown)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids of a conversation rendered by the chat template, ready for the answer."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]],
                       adapters: AdapterSpec | Sequence[AdapterSpec] = CURRENT,
                       max_new_tokens: int = 256, stop: str | Sequence[str] | None = None, *,
                       return_result: bool = False, logprobs: int | None = None,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       min_p: float = 0.0, repetition_penalty: float = 1.0,
                       seed: int | None = None, **unknown) -> list[str] | list[Generation]:
        """Generate for several prompts together, each with its own adapter: their texts, or with
        ``return_result=True`` their :class:`Generation` results (as :meth:`generate`).

        ``adapters``: one entry per prompt (a name, ``None`` for the base, or a ``{name: weight}``
        mix), or one value for all; by default the current selection. Each prompt is prefilled on
        its own, then all sequences decode together: every base product is computed once per step
        for the whole batch, and each sequence adds its own adapter's deltas. Every sequence's
        tokens are exactly those of generating it alone. Each sequence's statistics are its own
        (its decode time ends with its last token); also in ``last_batch_stats``.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise UsageError("prompts must be a non-empty list of texts or token-id lists")
        self._needs_result(logprobs, return_result)
        _refuse_unknown(unknown)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        stops = self._stops(stop, max_new_tokens)
        top = self._top_logprobs(logprobs)
        if isinstance(adapters, (list, tuple)):
            if len(adapters) != len(prompts):
                raise UsageError(f"{len(adapters)} adapters for {len(prompts)} prompts; give one per prompt")
            loras = [self._pin(a) for a in adapters]
        else:
            loras = [self._pin(adapters)] * len(prompts)
        self._check_batch_planned(len(prompts))
        seqs = [_Sequence(self, ids, lora, params, stops, max_new_tokens, top)
                for ids, lora in zip([self._prompt_ids(p) for p in prompts], loras)]
        self.last_batch_stats = [s.stats for s in seqs]
        for _ in self._decode(seqs):
            pass
        results = [s.result() for s in seqs]
        return results if return_result else [r.text for r in results]


    def _check_batch_planned(self, n: int) -> None:
        """A deploy folder's plan holds one sequence's KV cache; a batch of ``n`` needs ``n - 1`` more,
        which must fit in the plan's headroom (its budget less its total)."""
        if self.deployment is None or n <= 1:
            return
        planned = self.deployment.planned
        per_sequence = KVCache.planned_bytes(self.args, self.max_context, self.kv_cache)
        headroom = planned["budget_bytes"] - planned["total_bytes"]
        most = 1 + max(headroom, 0) // per_sequence
        if n > most:
            raise PlanError(f"a batch of {n} sequences needs {(n - 1) * per_sequence / 1e6:.1f} MB of KV cache beyond "
                            f"this deploy folder's plan, which has {headroom / 1e6:.1f} MB to spare: at most {most} "
                            f"sequences at once", self.path)


def _check_cache_fits(bundle: Bundle, max_context: int | None, kv_cache: str) -> None:
    """A ``max_context`` whose KV cache and rope tables alone exceed this machine's memory is refused
    before anything is allocated (NumPy would fail with a raw allocation error, or the OS kill us)."""
    ram = host_ram_bytes()
    if max_context is None or ram is None or not isinstance(max_context, numbers.Integral) or max_context < 1:
        return
    a = bundle.args
    need = KVCache.planned_bytes(a, int(max_context), kv_cache) + 2 * int(max_context) * a.head_dim * 4
    if need > ram:
        raise UsageError(f"max_context {max_context} needs {need / 1e9:.1f} GB for its KV cache, more than this "
                         f"machine's {ram / 1e9:.1f} GB of RAM; lower --max-context", bundle.path)


def load(path: str | os.PathLike, threads: int | None = None, max_context: int | None = None,
         verify: bool | str = True, adapters: Mapping[str, str | os.PathLike] | None = None,
         device_check: bool = True, mmap: bool = True, warmup: bool = True,
         convert_options: Mapping[str, Any] | None = None, products: str = DEFAULT_PRODUCTS,
         kv_cache: str | None = None, adapter_dtype: str | None = None) -> Model:
    """Open a bundle or a deploy folder (memory-mapped, checksums verified) and make it ready to
    generate. A Hugging Face checkpoint folder or hub id, a GGUF file or an ONNX model is converted
    once into ``$EDGELORA_HOME/bundles/`` (``convert_options``: :func:`edgelora.convert`'s
    ``block_size``, ``double_quant``, ``embeddings``, ``head``) and loaded from there
    (:mod:`edgelora.autoconvert`).

    ``verify``: ``True`` checks every file's sha256: the weights' in the background while the
    model already runs (a mismatch stops it: the next forward step raises ``ChecksumError`` naming
    the file; ``model.bundle.verification.wait()`` waits for the result), every other file's before
    ``load`` returns; ``"full"`` hashes the weights too before returning; ``False`` checks only the
    manifest and sizes of what is read.
    ``adapters``: ``{name: path}`` of PEFT LoRA adapter folders to make resident (none is in use
    until ``model.use(name)`` or ``adapter=name``).
    ``mmap=False`` reads the weights into process memory instead of mapping the file (llama.cpp's
    ``--no-mmap``): the same bytes resident, a slower start, and on Linux with transparent huge
    pages a faster decode (the page cache is mapped with small pages; README, *Benchmarks*).
    ``threads``: the most threads the kernels use (default: every core this process may use);
    fewer while other processes keep cores busy (:mod:`edgelora.runtime.threads`).
    ``warmup``: the first time this configuration runs on this machine, compile its kernels now
    (after a one-line notice on a terminal: tens of seconds, once) rather than during the first
    generation, whose speeds would then include compiling (``edgelora warmup`` does it ahead).
    ``products``: how NF4 weights multiply: ``"exact"`` (float32 products of the dequantized
    weights, bit-true against the references) or ``"int8"`` (int8 codes and activations, int32
    sums by VNNI/AVX2 byte dot products, prompts by an int8 GEMM; logits within a stated tolerance
    of exact); the default, ``edgelora.products.DEFAULT_PRODUCTS``, was chosen from measured
    perplexity (README, *The int8 product path*).
    ``kv_cache``: what the KV cache holds: ``"float32"`` (attention as the references compute it)
    or ``"float16"`` (llama.cpp's default: half the cache's memory and of the bytes a decode step
    reads of it; each key and value rounded to float16 when stored). ``None`` (the default): float16
    with the int8 products, float32 with the exact ones (``edgelora.products.default_kv_cache``,
    chosen from measured perplexity; README, *KV cache*); a deploy folder's plan says which.
    ``adapter_dtype``: how adapters are held (``adapters`` and every later ``model.adapters.load``
    that names no ``dtype``): ``"float32"`` (the file's values exactly, bit-true against PEFT; a
    float16 file's in float16) or ``"float16"`` (each value rounded to float16 once, at load, as
    ``deploy`` writes them: half the memory and the bytes a decode step reads of a float32 file's).
    ``None`` (the default): float16 with the int8 products, float32 with the exact ones
    (``edgelora.products.default_adapter_dtype``; README, *LoRA adapters*).

    A deploy folder (``edgelora deploy``) is also checked against this machine (its planned
    architecture and memory; ``device_check=False`` skips that) and its plan is enforced: the KV
    cache holds the planned context (a larger ``max_context`` is refused), its adapters are
    loaded (a single one is also put in use, as ``edgelora run`` does), and adapters beyond the bytes
    planned for them are refused.
    """
    from edgelora.deployment import is_deploy, open_deploy
    path = bundle_path(path, convert_options)
    dep = None
    if is_deploy(path):
        from edgelora.errors import PlanError
        dep = open_deploy(path, verify=verify, device_check=device_check)
        if max_context is not None and max_context > dep.context:
            raise PlanError(f"max_context {max_context} is more than the {dep.context} positions this deploy folder "
                            f"was planned for; deploy again with context={max_context} (--context)", path)
        max_context = dep.context if max_context is None else max_context
        if kv_cache is not None and KV_CACHE_BYTES[check_kv_cache(kv_cache)] > KV_CACHE_BYTES[dep.kv_cache]:
            raise PlanError(f"kv_cache {kv_cache!r} takes more memory than the {dep.kv_cache!r} cache this deploy "
                            f"folder was planned for; deploy again with kv_cache={kv_cache!r} (--kv-cache)", path)
        model = Model(Bundle(dep.bundle_path, verify=False, mmap=mmap, verification=dep.verification),
                      threads=threads, max_context=max_context, deployment=dep, products=products,
                      kv_cache=dep.kv_cache if kv_cache is None else kv_cache, adapter_dtype=adapter_dtype)
    else:
        model = Model(Bundle(path, verify=verify, mmap=mmap), threads=threads, max_context=max_context,
                      products=products, kv_cache=kv_cache, adapter_dtype=adapter_dtype)
    for name, adapter_path in (adapters or {}).items():
        model.adapters.load(name, adapter_path)
    if dep is not None and len(dep.adapters) == 1:  # a deploy folder planned for one adapter uses it (as `run`)
        model.use(next(iter(dep.adapters)))
    if warmup:
        ensure_compiled(model)
    return model
