"""Continuous batching: many requests, each with its own adapter selection, decoded together.

An :class:`Engine` owns one worker thread that runs the model step after step. Requests are
submitted from any thread (:meth:`Engine.submit` checks them and pins their adapter selection at
once) and wait in a bounded queue; at each step the worker admits waiting requests while fewer
than ``max_batch`` run, runs one prefill chunk of newcomers (``prefill_chunk`` prompt tokens at
most, one chunk of a prompt at least), then one decode step of every sequence whose prompt is in:
each samples its token and the batched forward computes all their next logits, every base product
once for the batch and each row with its own adapters (``forward_batch``, Punica/S-LoRA style). A
sequence that finishes, or whose request is cancelled, leaves at that step and its slot is free
for the next; the others never wait for it. The decode step is the model's own token loop
(``Model._step``), and a prompt is prefilled in the chunks ``Model.generate`` uses
(``Model._prefill_step``), so a request's tokens are exactly those of ``model.generate`` with the
same prompt, adapter and options, whatever ran beside it.

A :class:`Request` is consumed as an iterator of :class:`~edgelora.runtime.model.GenerationChunk`
items (blocking, or ``async for`` in an asyncio program), or by :meth:`Request.result`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from edgelora.errors import EngineClosed, PlanError, QueueFull, UsageError
from edgelora.runtime.model import PREFILL_CHUNK, Generation, GenerationChunk, Model, _refuse_unknown, _Sequence
from edgelora.runtime.prompt_cache import PromptCache, planned_room
from edgelora.runtime.sampling import SamplingParams

_ids = itertools.count(1)


class _Unallocated:
    """A waiting request's KV cache: none yet (its memory is taken when it is admitted)."""

    length = 0


class Request:
    """One submitted generation. Iterate it for its :class:`GenerationChunk` items as they are
    generated (the same items ``Model.stream_generate`` yields; the last has ``finish_reason``:
    ``stop``, ``length``, ``eos``, ``context``, or ``cancelled``); any number of consumers may
    iterate, each from the start. ``result()`` waits for the :class:`Generation`."""

    def __init__(self, seq: _Sequence):
        self.id = f"req-{next(_ids)}"
        self.adapter = seq.lora.label  # the pinned selection, as text
        self._seq = seq
        self._items: list = []  # chunks so far (an exception as the last item when the engine failed)
        self._cond = threading.Condition()
        self._waiters: list = []  # (event loop, asyncio.Event) of async consumers
        self._done = threading.Event()
        self._cancelled = False
        self.submitted = time.perf_counter()

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, adapter={self.adapter!r}, done={self.done})"

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def stats(self):
        """This request's running :class:`~edgelora.runtime.model.GenerationStats`."""
        return self._seq.stats

    def cancel(self) -> None:
        """Stop this request: its slot (or its place in the queue) is freed at the next step and the
        last item has ``finish_reason`` ``cancelled``. Nothing happens once it has finished."""
        self._cancelled = True

    @staticmethod
    def _ends(item) -> bool:
        """Whether ``item`` is this request's last (it has a finish reason); an error item is raised."""
        if isinstance(item, BaseException):
            raise item
        return item.finish_reason is not None

    def __iter__(self) -> Iterator[GenerationChunk]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._items):
                    self._cond.wait()
                item = self._items[i]
            i += 1
            last = self._ends(item)
            yield item
            if last:
                return

    async def __aiter__(self):
        """``async for chunk in request``: the items without blocking the event loop."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ready))
        try:
            i = 0
            while True:
                with self._cond:
                    new = self._items[i:]
                if not new:
                    await ready.wait()
                    ready.clear()
                    continue
                for item in new:
                    i += 1
                    last = self._ends(item)
                    yield item
                    if last:
                        return
        finally:
            with self._cond:
                self._waiters.remove((loop, ready))

    def result(self, timeout: float | None = None) -> Generation:
        """The finished :class:`Generation` (``TimeoutError`` when not finished within ``timeout`` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        with self._cond:
            last = self._items[-1]
        if isinstance(last, BaseException):
            raise last
        return self._seq.result()

    # --- the worker's side ----------------------------------------------------------------------
    def _push(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiters = list(self._waiters)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._done.set()
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that consumer's loop is closed
                pass


class Engine:
    """Continuous batching of ``model``'s generations (module docstring).

    ``max_batch``: sequences decoded together at most (a deploy folder's plan must hold their KV
    caches: more is a :class:`~edgelora.errors.PlanError` here). ``max_queue``: requests waiting
    for a slot at most; one more is refused with :class:`~edgelora.errors.QueueFull`.
    ``prefill_chunk``: prompt tokens prefilled per step at most (a multiple of the model's
    ``PREFILL_CHUNK``, 256, whose chunks keep prefill results exact; at least one chunk runs per
    step): smaller keeps the others' decode steps coming more often, larger fills newcomers faster.
    ``prompt_cache_bytes``: keys and values of earlier prompts kept for reuse
    (:class:`~edgelora.runtime.prompt_cache.PromptCache`); None uses ``model.prompt_cache`` (if
    any), 0 none; ``prompt_cache_exact``: its policy, True reuses whole prefill chunks of earlier
    prompts only (tokens exactly those without a cache), False every common position, generated
    tokens' too (a conversation's next turn prefills only what is new; logits within float32
    rounding). Within a deploy folder's plan, beside ``max_batch`` KV caches. The worker thread
    starts at once (a daemon)."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = None,
                 prompt_cache_bytes: int | None = None, prompt_cache_exact: bool = True):
        for name, value, least in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")
        chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk % PREFILL_CHUNK:
            raise UsageError(f"prefill_chunk must be a positive multiple of {PREFILL_CHUNK} (the prefill's chunk, "
                             f"which keeps results exact), got {prefill_chunk!r}")
        model._check_batch_planned(max_batch)
        self.model, self.max_batch, self.max_queue, self.prefill_chunk = model, max_batch, max_queue, chunk
        self.prompt_cache = (model.prompt_cache if prompt_cache_bytes is None
                             else PromptCache(prompt_cache_bytes, prompt_cache_exact) if prompt_cache_bytes else None)
        room = planned_room(model, max_batch)
        if room is not None and self.prompt_cache is not None and self.prompt_cache.max_bytes > room:
            raise PlanError(f"a prompt cache of {self.prompt_cache.max_bytes / 1e6:.1f} MB does not fit this deploy "
                            f"folder's plan beside {max_batch} sequences' KV caches: {room / 1e6:.1f} MB are left",
                            model.path)
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []  # admitted, in admission order
        self._free: list = []  # KV caches of finished sequences, for the next ones
        self._cv = threading.Condition()
        self._closing = False
        self._drain = True
        self.steps = self.completed = 0
        self._request_seconds = None  # a running mean of admitted requests' durations (the Retry-After guess)
        self._worker = threading.Thread(target=self._run, name="edgelora-engine", daemon=True)
        self._worker.start()

    def __repr__(self) -> str:
        return f"Engine(max_batch={self.max_batch}, max_queue={self.max_queue}, {self.stats()})"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the callers' side ----------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], *, adapter=None, max_new_tokens: int = 256,
               stop: str | Sequence[str] | None = None, logprobs: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               seed: int | None = None, **unknown) -> Request:
        """Queue a generation of ``prompt`` (text or token ids); its :class:`Request`.

        Checked here, before anything is queued (a :class:`~edgelora.errors.UsageError` names what
        is wrong): the prompt (within the model's context), the options (as
        :meth:`Model.stream_generate`'s) and ``adapter``, a resident adapter's name, ``None`` or
        ``"base"`` for the base, or a ``{name: weight}`` mix; the selection is pinned now, so a
        later unload does not affect this request. :class:`~edgelora.errors.QueueFull` when
        ``max_queue`` requests wait already (its ``retry_after`` guesses when to try again);
        :class:`~edgelora.errors.EngineClosed` after :meth:`close`."""
        m = self.model
        _refuse_unknown(unknown)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        stops = m._stops(stop, max_new_tokens)
        top = m._top_logprobs(logprobs)
        ids = m._prompt_ids(prompt)
        lora = m._pin(adapter)
        req = Request(_Sequence(m, ids, lora, params, stops, max_new_tokens, top, cache=_Unallocated()))
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is closed: it takes no more requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (max_queue={self.max_queue}); "
                                f"try again later", retry_after=self._retry_after())
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def stats(self) -> dict:
        """``running``, ``queued``, ``max_batch``, ``max_queue``, ``steps``, ``completed`` and the
        prompt cache's ``entries``, ``bytes``, ``hits`` ... (None without one)."""
        with self._cv:
            out = {"running": len(self._running), "queued": len(self._queue), "max_batch": self.max_batch,
                   "max_queue": self.max_queue, "steps": self.steps, "completed": self.completed}
        out["prompt_cache"] = None if self.prompt_cache is None else self.prompt_cache.stats()
        return out

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; with ``drain`` let those queued and running finish (within
        ``timeout`` seconds, after which the rest are cancelled), else cancel them at the next
        step; then stop the worker."""
        with self._cv:
            self._closing = True
            self._drain = drain
            self._cv.notify_all()
        if drain and timeout is not None:
            self._worker.join(timeout)
            with self._cv:
                self._drain = False
                self._cv.notify_all()
        self._worker.join()

    def _retry_after(self) -> float:
        """Seconds until a queued request is likely admitted: the queue's turns of a batch, each
        as long as an average request (1 s before any has finished)."""
        per = self._request_seconds or 1.0
        return round(max(1.0, per * (len(self._queue) / self.max_batch + 1)), 1)

    # --- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._running or self._closing):
                    self._cv.wait()
                if self._closing and not self._drain:
                    for r in list(self._queue) + self._running:
                        r.cancel()
                elif self._closing and not (self._queue or self._running):
                    return
                for req in [r for r in self._queue if r._cancelled]:
                    self._queue.remove(req)
                    req._push(req._seq.finish("cancelled"))
                while self._queue and len(self._running) < self.max_batch:
                    self._admit(self._queue.popleft())
            if self._closing and not self._drain and not self._running:
                return
            try:
                self._step()
            except Exception as e:  # a failed step fails its requests; the engine goes on
                for r in self._running:
                    r._push(e)
                self._release(list(self._running))

    def _admit(self, req: Request) -> None:
        s = req._seq
        try:
            s.cache = self._free.pop() if self._free else self.model.net.new_cache()
            s.cache.reset()
            s.t0 = req.submitted
            self.model._start_prefill(s, self.prompt_cache)
        except Exception as e:  # (no memory for its cache): this request fails, the engine goes on
            s.cache = _Unallocated()
            req._push(e)
            return
        self._running.append(req)

    def _step(self) -> None:
        """Cancellations, one prefill chunk (or more within ``prefill_chunk`` tokens), one decode step."""
        m = self.model
        self._release([r for r in self._running if r._cancelled], "cancelled")
        budget, first = self.prefill_chunk, True
        for r in [r for r in self._running if r._seq.logits is None]:
            s = r._seq
            while s.logits is None:
                n = min(len(s.ids), (s.filled // PREFILL_CHUNK + 1) * PREFILL_CHUNK) - s.filled  # the next chunk
                if n > budget and not first:
                    break
                budget, first = budget - n, False
                if m._prefill_step(s, self.prompt_cache):
                    s.t1 = time.perf_counter()
                    if s.max_new_tokens == 0:
                        self._release([r], "length")
        live = [r for r in self._running if r._seq.logits is not None and not r._seq.done]
        if live:
            by_seq, last = {id(r._seq): r for r in live}, []
            for s, chunk in m._step([r._seq for r in live], self.prompt_cache):
                if chunk.finish_reason is None:
                    by_seq[id(s)]._push(chunk)  # at once: the client has it while the forward step runs
                else:
                    last.append((by_seq[id(s)], chunk))
            self._release([r for r, _ in last])  # out of the batch before their callers hear they ended
            for r, chunk in last:
                r._push(chunk)
        self.steps += 1

    def _release(self, reqs: list, reason: str | None = None) -> None:
        """Take finished requests out of the batch (first finishing them with ``reason``), their caches kept."""
        now = time.perf_counter()
        for r in reqs:
            with self._cv:
                self._running.remove(r)
                self.completed += 1
            if reason is not None and not r._seq.done:
                r._push(r._seq.finish(reason))
            if len(self._free) < self.max_batch:
                self._free.append(r._seq.cache)
            r._seq.cache = _Unallocated()
            took = now - r.submitted
            self._request_seconds = took if self._request_seconds is None else 0.8 * self._request_seconds + 0.2 * took
