"""Prompt caching: the keys and values of prompt prefixes kept and reused, bounded by bytes.

A generation whose prompt starts with tokens a previous one computed under the *same adapter
selection* copies their keys and values into its cache and prefills only the rest (llama-server's
``cache_prompt``, mlx-lm's prompt cache). Keys and values depend on the adapters (every projection
runs through them), so an entry is keyed by the selection's exact identity: each member's name,
weight and resident adapter object. An adapter unloaded and another loaded under its name is a
different object, so its entries never match; they are dropped once the unloaded adapter is gone.

Two reuse policies (``exact``):

* ``exact=True`` (the default): only keys and values that a fresh prefill of the new prompt would
  compute with the same bits are reused: whole prefill chunks (``PREFILL_CHUNK`` tokens, at
  multiples of it) of an earlier *prompt*. A fresh prefill runs the same chunks on the same
  tokens, so a generation's tokens and logits are exactly those without the cache; what is
  skipped is a multiple of the chunk, and an entry holds only its whole chunks.
* ``exact=False``: every cached position of the longest common prefix is reused, the generated
  tokens' too (whose keys a decode step computed one at a time, not a prefill chunk): a
  conversation's next turn prefills only what is new. The keys differ from a fresh prefill's in
  the last bits (different products and summation orders for the same values), so logits match a
  fresh prefill within float32 rounding (README, *Prompt cache*), not bit for bit, and greedy
  tokens can differ where two are within that of each other.

One prompt token at least is always prefilled (the next token's logits come from it). Entries are
evicted least recently used first when their bytes exceed ``max_bytes``; an entry larger than that
is not kept. Thread-safe: the model's generations and the batching engine share one.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgelora.errors import UsageError
from edgelora.runtime.lora import Selection
from edgelora.runtime.model import PREFILL_CHUNK


def selection_key(lora: Selection) -> tuple:
    """The identity of an adapter selection: ``((name, weight, id(resident)), ...)``; ``()`` is the
    base. (The ids are compared together with weak references to the residents: an id reused by
    a later object never matches an entry, see :meth:`_Entry.alive`.)"""
    return tuple((name, float(w), id(r)) for (name, w), r in zip(lora.members, lora.adapters))


@dataclass
class _Entry:
    key: tuple
    refs: tuple  # weak references to the selection's Resident adapters
    ids: np.ndarray  # int64 [n]: the tokens whose keys and values these are
    k: np.ndarray  # float32 [layers, kv heads, n, head dim] (``KVCache.prefix``)
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.ids.nbytes

    def alive(self, lora: Selection | None = None) -> bool:
        """The adapters it was computed with still exist (and are ``lora``'s, when given)."""
        got = [r() for r in self.refs]
        if any(g is None for g in got):
            return False
        return lora is None or all(g is r for g, r in zip(got, lora.adapters))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


class PromptCache:
    """Keys and values of prompt prefixes per adapter selection, at most ``max_bytes`` of them.

    ``model.prompt_cache = PromptCache(256 << 20)`` makes ``generate``/``stream_generate``/``chat``
    reuse them; the batching engine (``Engine(prompt_cache_bytes=...)``) keeps its own. ``exact``:
    the reuse policy (module docstring): True reuses only whole prefill chunks of earlier prompts
    (results bit-identical to no cache), False every common position (a conversation's next turn
    prefills only the new text; logits within float32 rounding of a fresh prefill)."""

    def __init__(self, max_bytes: int, exact: bool = True, chunk: int = PREFILL_CHUNK):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise UsageError(f"prompt cache size must be a non-negative number of bytes, got {max_bytes!r}")
        self.max_bytes, self.exact, self.chunk = max_bytes, bool(exact), int(chunk)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            self._purge()
            return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "exact": self.exact, "hits": self.hits, "misses": self.misses,
                    "reused_tokens": self.reused_tokens}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def usable(self, common: int, prompt_len: int) -> int:
        """Positions of a common prefix of ``common`` tokens that a prompt of ``prompt_len`` reuses:
        never its last token; whole chunks only when exact."""
        n = min(common, prompt_len - 1)
        return n - n % self.chunk if self.exact else max(n, 0)

    def restore(self, ids: np.ndarray, lora: Selection, cache) -> int:
        """Copy the longest reusable prefix of ``ids`` under ``lora`` into the empty KV ``cache``;
        its length (0: nothing cached), which ``cache.length`` is set to."""
        ids = np.asarray(ids, np.int64)
        key = selection_key(lora)
        with self._lock:
            self._purge()
            best, n = None, 0
            for e in self._entries.values():
                if e.key == key and e.alive(lora):
                    m = self.usable(common_prefix(e.ids, ids), len(ids))
                    if m > n:
                        best, n = e, m
            if best is None:
                self.misses += 1
                return 0
            self._touch(best)
            cache.load_prefix(best.k, best.v, n)
            self.hits += 1
            self.reused_tokens += n
            return n

    def store(self, ids, lora: Selection, cache, prompt_len: int) -> None:
        """Keep the keys and values ``cache`` holds for tokens ``ids`` (its first ``len(ids)``
        positions, the first ``prompt_len`` of them a prompt's prefill): exact, only the prompt's
        whole chunks. An entry whose tokens start another under the same selection is replaced by it."""
        ids = np.asarray(ids, np.int64)
        n = prompt_len - prompt_len % self.chunk if self.exact else len(ids)
        n = min(n, len(ids), cache.length)
        if n <= 0 or self.max_bytes == 0:
            return
        key = selection_key(lora)
        with self._lock:
            self._purge()
            for slot, e in list(self._entries.items()):
                if e.key != key or not e.alive(lora):
                    continue
                c = common_prefix(e.ids, ids[:n])
                if c == n and len(e.ids) >= n:  # held already (or more of it)
                    self._touch(e)
                    return
                if c == len(e.ids):  # the new entry extends this one
                    self._drop(slot)
            entry = _Entry(key, tuple(weakref.ref(r) for r in lora.adapters), ids[:n].copy(),
                           *cache.prefix(n))
            if entry.nbytes > self.max_bytes:
                return
            self._entries[self._next] = entry
            self._next += 1
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    # --- under the lock ------------------------------------------------------------------------
    def _touch(self, e: _Entry) -> None:
        slot = next(s for s, x in self._entries.items() if x is e)
        self._entries.move_to_end(slot)

    def _drop(self, slot: int) -> None:
        self.nbytes -= self._entries.pop(slot).nbytes

    def _purge(self) -> None:
        """Drop entries of adapters no longer alive (unloaded, and no generation holds them)."""
        for slot in [s for s, e in self._entries.items() if not e.alive()]:
            self._drop(slot)


def planned_room(model, sequences: int = 1) -> int | None:
    """Bytes a deploy folder's memory plan leaves beside ``sequences`` KV caches (the plan holds
    one; its budget less its total is the headroom): what a prompt cache may take there. None when
    the model is not from a deploy folder (no plan to respect)."""
    if model.deployment is None:
        return None
    planned = model.deployment.planned
    headroom = max(planned["budget_bytes"] - planned["total_bytes"], 0)
    return max(headroom - (sequences - 1) * model.kv_cache_bytes, 0)


def conversation_cache(model) -> PromptCache | None:
    """A prompt cache for a conversation (``edgelora chat``): every position reused (``exact=False``:
    a turn prefills only what is new), one context's keys and values at most (within a deploy
    folder's plan; None where the plan has no room)."""
    room = planned_room(model)
    size = model.kv_cache_bytes if room is None else min(room, model.kv_cache_bytes)
    return PromptCache(size, exact=False) if size > 0 else None
