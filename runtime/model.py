"""``edgelora.load`` and the ``Model`` users hold: logits, generate, stream, chat.

Generation is a prefill of the prompt in chunks (matrix-matrix products through the dequantized
tile kernels), then one-token decode steps (fused NF4 matrix-vector kernels) against a key/value
cache preallocated for ``max_context`` tokens. Text is streamed as it becomes complete (never half
a UTF-8 character), and stop strings end generation without leaking into the text.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.bundle import Bundle
from edgelora.errors import UsageError
from edgelora.runtime.llama import KVCache
from edgelora.runtime.loader import build_model, set_threads
from edgelora.runtime.lora import BASE, AdapterSet, Resident, Selection

PREFILL_CHUNK = 256
CURRENT = object()  # ``adapter=`` not given: use the model's current selection


class _TextOut:
    """Turns generated token ids into text pieces: complete UTF-8 only, stop strings cut off and
    never shown, text that might begin a stop string held back until it is known not to."""

    def __init__(self, tokenizer, stops):
        self.decoder = tokenizer.stream_decoder()
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
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    prompt_ids: list = field(default_factory=list)
    generated_ids: list = field(default_factory=list)
    stop_reason: str = ""
    adapter: str = "base"  # the adapter selection the generation ran with

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

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
                "adapter": self.adapter}


class Model:
    """A loaded bundle, ready to generate. Create with :func:`edgelora.load`.

    ``deployment``: the :class:`~edgelora.deployment.Deployment` when the bundle comes from a
    deploy folder: its adapters are made resident, and no more adapter bytes than it planned."""

    def __init__(self, bundle: Bundle, threads: int | None = None, max_context: int | None = None,
                 deployment=None):
        from edgelora.runtime.tokenizer import Tokenizer
        self.bundle = bundle
        self.path = bundle.path
        self.args = bundle.args
        self.threads = set_threads(threads)
        self.net = build_model(bundle, max_context)
        self.max_context = self.net.max_context
        self.tokenizer = Tokenizer.from_dir(bundle.path)
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self._local = threading.local()  # statistics of the last generation, per thread
        self.selection: Selection = BASE  # what generations use unless given ``adapter=``
        self._step = threading.Lock()  # one forward step at a time (kernels share thread pools)
        self.deployment = deployment  # the Deployment when loaded from a deploy folder (edgelora.deployment)
        self.adapters = AdapterSet(self.net, self._unloaded,
                                   budget_bytes=None if deployment is None else deployment.adapter_bytes)
        for name, adapter_path in ({} if deployment is None else deployment.adapters).items():
            self.adapters.load(name, adapter_path)

    @property
    def last_stats(self) -> GenerationStats:
        """Statistics of this thread's last generation."""
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
        with self._step:
            return self.net.forward(ids, cache, all_logits=all_logits, lora=lora)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return KVCache.planned_bytes(self.args, self.max_context)

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
            raise UsageError(f"{ids.size} tokens exceed max_context={self.max_context}; load with a larger "
                             f"max_context (model limit {self.args.max_position_embeddings}) or shorten the prompt")
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

    def logits(self, token_ids, adapter=CURRENT) -> np.ndarray:
        """float32 ``[T, vocab]``: the next-token logits after each of ``token_ids``."""
        ids = self._check_ids(token_ids)
        return self._prefill(ids, self.net.new_cache(), True, self._pin(adapter))

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

    def _prompt_ids(self, prompt) -> np.ndarray:
        return self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))

    def stream(self, prompt, max_new_tokens: int = 256, stop=None, adapter=CURRENT, **sampling):
        """Yield text pieces as they are generated. ``prompt`` is text or a list of token ids.

        ``adapter``: a resident adapter's name, ``None`` (the base) or a ``{name: weight}`` mix for
        this call; by default the model's current selection. The selection is pinned when the
        generation starts: switching adapters meanwhile does not affect it.
        Sampling options: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed.
        """
        from edgelora.runtime.sampling import Sampler, SamplingParams
        params = SamplingParams.from_kwargs(**sampling)
        stops = self._stops(stop, max_new_tokens)
        lora = self._pin(adapter)
        ids = self._prompt_ids(prompt)
        stats = GenerationStats(prompt_tokens=len(ids), prompt_ids=[int(i) for i in ids], adapter=lora.label)
        self.last_stats = stats
        sampler = Sampler(params)
        cache = self.net.new_cache()
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache, False, lora)
        stats.prefill_seconds = time.perf_counter() - t0
        history = [int(i) for i in ids]
        text = _TextOut(self.tokenizer, stops)
        t1 = time.perf_counter()
        stats.stop_reason = "length"
        for step in range(max_new_tokens):
            tok = sampler.sample(logits, history)
            if step == 0:
                stats.time_to_first_token = time.perf_counter() - t0
            if tok in self.eos_ids:
                stats.stop_reason = "eos"
                break
            history.append(tok)
            stats.generated_ids.append(tok)
            stats.generated_tokens += 1
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                stats.stop_reason = "stop"
                break
            if step + 1 == max_new_tokens:
                break
            if cache.length >= self.max_context:
                stats.stop_reason = "context"
                break
            logits = self._forward(np.array([tok]), cache, False, lora)[-1]
        stats.decode_seconds = time.perf_counter() - t1
        rest = text.flush()
        if rest:
            yield rest

    def generate(self, prompt, max_new_tokens: int = 256, stop=None, adapter=CURRENT, **sampling) -> str:
        """The generated text (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, stop=stop, adapter=adapter, **sampling))

    def chat(self, messages, max_new_tokens: int = 256, stop=None, adapter=CURRENT, **sampling) -> str:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the chat template."""
        return "".join(self.stream_chat(messages, max_new_tokens, stop=stop, adapter=adapter, **sampling))

    def stream_chat(self, messages, max_new_tokens: int = 256, stop=None, adapter=CURRENT, **sampling):
        yield from self.stream(self.chat_ids(messages), max_new_tokens, stop=stop, adapter=adapter, **sampling)

    def chat_ids(self, messages) -> list[int]:
        """The token ids of a conversation rendered by the chat template, ready for the answer."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_batch(self, prompts, adapters=CURRENT, max_new_tokens: int = 256, stop=None,
                       **sampling) -> list[str]:
        """Generate for several prompts together, each with its own adapter.

        ``adapters``: one entry per prompt (a name, ``None`` for the base, or a ``{name: weight}``
        mix), or one value for all; by default the current selection. Each prompt is prefilled on
        its own, then all sequences decode together: every base product is computed once per step
        for the whole batch, and each sequence adds its own adapter's deltas. Every sequence's
        tokens are exactly those of generating it alone. Per-sequence statistics are in
        ``last_batch_stats``.
        """
        from edgelora.runtime.sampling import Sampler, SamplingParams
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise UsageError("prompts must be a non-empty list of texts or token-id lists")
        params = SamplingParams.from_kwargs(**sampling)
        stops = self._stops(stop, max_new_tokens)
        if isinstance(adapters, (list, tuple)):
            if len(adapters) != len(prompts):
                raise UsageError(f"{len(adapters)} adapters for {len(prompts)} prompts; give one per prompt")
            loras = [self._pin(a) for a in adapters]
        else:
            loras = [self._pin(adapters)] * len(prompts)
        ids = [self._prompt_ids(p) for p in prompts]
        n = len(prompts)
        stats = [GenerationStats(prompt_tokens=len(i), prompt_ids=[int(t) for t in i], adapter=lo.label)
                 for i, lo in zip(ids, loras)]
        self.last_batch_stats = stats
        samplers = [Sampler(params) for _ in range(n)]
        caches = [self.net.new_cache() for _ in range(n)]
        texts = [_TextOut(self.tokenizer, stops) for _ in range(n)]
        outs = [[] for _ in range(n)]
        histories = [[int(t) for t in i] for i in ids]
        t0 = time.perf_counter()
        logits = []
        for b in range(n):
            t = time.perf_counter()
            logits.append(self._prefill(ids[b], caches[b], False, loras[b]))
            stats[b].prefill_seconds = time.perf_counter() - t
        t1 = time.perf_counter()
        active = list(range(n))
        for s in stats:
            s.stop_reason = "length"
        for step in range(max_new_tokens):
            feed = []
            for b in active:
                tok = samplers[b].sample(logits[b], histories[b])
                if step == 0:
                    stats[b].time_to_first_token = time.perf_counter() - t0
                if tok in self.eos_ids:
                    stats[b].stop_reason = "eos"
                    continue
                histories[b].append(tok)
                stats[b].generated_ids.append(tok)
                stats[b].generated_tokens += 1
                outs[b].append(texts[b].push(tok))
                if texts[b].stopped:
                    stats[b].stop_reason = "stop"
                elif step + 1 < max_new_tokens:
                    if caches[b].length >= self.max_context:
                        stats[b].stop_reason = "context"
                    else:
                        feed.append((b, tok))
            active = [b for b, _ in feed]
            if not active:
                break
            with self._step:
                out = self.net.forward_batch(np.array([t for _, t in feed]), [caches[b] for b in active],
                                             [loras[b] for b in active])
            for row, b in enumerate(active):
                logits[b] = out[row]
        elapsed = time.perf_counter() - t1
        for b in range(n):
            stats[b].decode_seconds = elapsed
            outs[b].append(texts[b].flush())
        return ["".join(o) for o in outs]


def load(path, threads: int | None = None, max_context: int | None = None, verify: bool | str = True,
         adapters: dict | None = None, device_check: bool = True, mmap: bool = True) -> Model:
    """Open a bundle or a deploy folder (memory-mapped, checksums verified) and make it ready to
    generate.

    ``verify``: ``True`` checks every file's sha256, skipping files already verified whose
    identity (size, times, inode) is unchanged; ``"full"`` hashes every file again; ``False``
    checks only the manifest and sizes of what is read.
    ``adapters``: ``{name: path}`` of PEFT LoRA adapter folders to make resident (none is in use
    until ``model.use(name)`` or ``adapter=name``).
    ``mmap=False`` reads the weights into process memory instead of mapping the file (llama.cpp's
    ``--no-mmap``): the same bytes resident, a slower start, and on Linux with transparent huge
    pages a faster decode (the page cache is mapped with small pages; README, *Benchmarks*).

    A deploy folder (``edgelora deploy``) is also checked against this machine (its planned
    architecture and memory; ``device_check=False`` skips that) and its plan is enforced: the KV
    cache holds the planned context (a larger ``max_context`` is refused), its adapters are
    loaded, and adapters beyond the bytes planned for them are refused.
    """
    from edgelora.deployment import is_deploy, open_deploy
    path = Path(path)
    dep = None
    if is_deploy(path):
        from edgelora.errors import PlanError
        dep = open_deploy(path, verify=verify, device_check=device_check)
        if max_context is not None and max_context > dep.context:
            raise PlanError(f"max_context {max_context} is more than the {dep.context} positions this deploy folder "
                            f"was planned for; deploy again with --context {max_context}", path)
        max_context = dep.context if max_context is None else max_context
        model = Model(Bundle(dep.bundle_path, verify=False, mmap=mmap), threads=threads, max_context=max_context,
                      deployment=dep)
    else:
        model = Model(Bundle(path, verify=verify, mmap=mmap), threads=threads, max_context=max_context)
    for name, adapter_path in (adapters or {}).items():
        model.adapters.load(name, adapter_path)
    return model
