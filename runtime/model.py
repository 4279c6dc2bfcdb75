"""``edgelora.load`` and the ``Model`` users hold: logits, generate, stream, chat.

Generation is a prefill of the prompt in chunks (matrix-matrix products through the dequantized
tile kernels), then one-token decode steps (fused NF4 matrix-vector kernels) against a key/value
cache preallocated for ``max_context`` tokens. Text is streamed as it becomes complete (never half
a UTF-8 character), and stop strings end generation without leaking into the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.bundle import Bundle
from edgelora.errors import UsageError
from edgelora.runtime.loader import build_model, set_threads

PREFILL_CHUNK = 256


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
                "prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids, "stop_reason": self.stop_reason}


class Model:
    """A loaded bundle, ready to generate. Create with :func:`edgelora.load`."""

    def __init__(self, bundle: Bundle, threads: int | None = None, max_context: int | None = None):
        from edgelora.runtime.tokenizer import Tokenizer
        self.bundle = bundle
        self.path = bundle.path
        self.args = bundle.args
        self.threads = set_threads(threads)
        self.net = build_model(bundle, max_context)
        self.max_context = self.net.max_context
        self.tokenizer = Tokenizer.from_dir(bundle.path)
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self.last_stats = GenerationStats()

    # --- sizes -----------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        a = self.args
        return 2 * a.num_hidden_layers * self.max_context * a.num_key_value_heads * a.head_dim * 4

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

    def _prefill(self, ids: np.ndarray, cache, all_logits: bool) -> np.ndarray:
        outs = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[s:s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= len(ids)
            if all_logits or last:
                outs.append(self.net.forward(chunk, cache, all_logits=all_logits))
            else:
                self.net.forward(chunk, cache, all_logits=False)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def logits(self, token_ids) -> np.ndarray:
        """float32 ``[T, vocab]``: the next-token logits after each of ``token_ids``."""
        ids = self._check_ids(token_ids)
        return self._prefill(ids, self.net.new_cache(), all_logits=True)

    # --- generation ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def stream(self, prompt, max_new_tokens: int = 256, stop=None, **sampling):
        """Yield text pieces as they are generated. ``prompt`` is text or a list of token ids.

        Sampling options: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed.
        """
        from edgelora.runtime.sampling import Sampler, SamplingParams
        params = SamplingParams.from_kwargs(**sampling)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise UsageError("stop must be a non-empty string or a list of them")
        ids = self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
        stats = GenerationStats(prompt_tokens=len(ids), prompt_ids=[int(i) for i in ids])
        self.last_stats = stats
        sampler = Sampler(params)
        cache = self.net.new_cache()
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache, all_logits=False)
        stats.prefill_seconds = time.perf_counter() - t0
        history = [int(i) for i in ids]
        decoder = self.tokenizer.stream_decoder()
        held = ""  # text withheld because it might begin a stop string
        hold = max((len(s) for s in stops), default=1) - 1
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
            held += decoder.push(tok)
            cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut:
                    yield held[:cut]
                held = ""
                stats.stop_reason = "stop"
                break
            if len(held) > hold:
                emit, held = (held[:len(held) - hold], held[len(held) - hold:]) if hold else (held, "")
                yield emit
            if step + 1 == max_new_tokens:
                break
            if cache.length >= self.max_context:
                stats.stop_reason = "context"
                break
            logits = self.net.forward(np.array([tok]), cache)[-1]
        stats.decode_seconds = time.perf_counter() - t1
        if stats.stop_reason != "stop":
            held += decoder.flush()
            if held:
                yield held

    def generate(self, prompt, max_new_tokens: int = 256, stop=None, **sampling) -> str:
        """The generated text (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, stop=stop, **sampling))

    def chat(self, messages, max_new_tokens: int = 256, stop=None, **sampling) -> str:
        """Answer a conversation (``[{"role": "user", "content": ...}, ...]``) with the chat template."""
        return "".join(self.stream_chat(messages, max_new_tokens, stop=stop, **sampling))

    def stream_chat(self, messages, max_new_tokens: int = 256, stop=None, **sampling):
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        yield from self.stream(ids, max_new_tokens, stop=stop, **sampling)


def load(path, threads: int | None = None, max_context: int | None = None, verify: bool | str = True) -> Model:
    """Open a bundle (memory-mapped, checksums verified) and make it ready to generate.

    ``verify``: ``True`` checks every file's sha256, skipping files already verified whose
    identity (size, times, inode) is unchanged; ``"full"`` hashes every file again; ``False``
    checks only the manifest and sizes of what is read.
    """
    return Model(Bundle(Path(path), verify=verify), threads=threads, max_context=max_context)
