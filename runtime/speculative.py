"""Exact speculative decoding: draft a few tokens cheaply, verify them in one step of the model.

A *drafter* guesses the next ``k`` tokens of a generation; the model then runs its last token and
the ``k`` guesses through one forward (``LlamaModel.forward_steps``: every row computed bit for bit
as its own one-token decode step would, so that nothing but the speed depends on the drafting),
and a row's logits decide the guess that follows it:

* greedy: a guess is kept while it equals the argmax the plain decode would take; the first
  mismatch is replaced by that argmax and the rest are dropped. The text is exactly plain
  decoding's.
* sampling: the standard acceptance rule (Leviathan et al. 2023, "Fast Inference from
  Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
  Decoding with Speculative Sampling"): a guess ``x`` drawn from the draft's distribution ``q`` is
  kept with probability ``min(1, p(x) / q(x))``, ``p`` the model's (after the same penalty,
  temperature and filters); when it is not, the token is drawn from ``max(p - q, 0)`` normalised.
  Every token is then distributed exactly as plain sampling's. A guess that is certain (``q`` one
  hot: prompt lookup, a greedy draft) makes this "draw from ``p``, keep the guess if the draw
  equals it": the same draws as plain sampling, so a seeded generation gives plain decoding's
  tokens too.

When every guess is kept, the last row gives one more token for free. The cache holds the keys of
rejected guesses past its ``length``; the next forward overwrites them (the rollback is
``cache.length``).

Drafters: :class:`PromptLookup` (n-gram lookup in the prompt and the text so far, no second model:
Saxena 2023, "Prompt Lookup Decoding"; transformers' ``prompt_lookup_num_tokens``) and
:class:`DraftModel` (a smaller bundle with the same tokenizer).
"""

from __future__ import annotations

import numpy as np

from edgelora.errors import UsageError
from edgelora.runtime.sampling import SamplingParams, apply_repetition_penalty, process_logits, softmax

PROMPT_LOOKUP = "prompt-lookup"
NUM_DRAFT = 4  # guesses per step by default: 5 rows, each weight still read once (matvec_batch)


class PromptLookup:
    """Guesses the continuation of the last ``n`` tokens (``max_ngram`` down to ``min_ngram``) by
    what followed their latest earlier occurrence in the prompt and the text so far: text that
    repeats (summaries, quotes, code edits, chat that restates) is guessed right. A continuation
    that reaches the end of the text goes on copying itself, as LZ77 copies overlap (a loop of
    period ``p`` is guessed ``k`` tokens ahead, not only to the end of the text)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, params: SamplingParams) -> "PromptLookup":
        return self  # no state per generation

    def propose(self, history: list, k: int) -> tuple[list, list]:
        """Up to ``k`` guessed tokens after ``history``, and their draft probabilities (None: certain)."""
        h = np.asarray(history, np.int64)  # [L]
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)  # [L-n, n]: every earlier n-gram
            hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
            if hits.size:
                j = int(hits[-1]) + n  # the latest occurrence's continuation starts at h[j], j < L
                text = h.tolist()
                for i in range(k):
                    text.append(text[j + i])  # (j + i may reach the guesses already made)
                return text[len(h):], [None] * k
        return [], []


class DraftModel:
    """A smaller model (another loaded bundle with the same tokenizer) that drafts by decoding
    ``k`` tokens itself, with the generation's sampling options and its own current adapter
    selection (the target's adapters belong to the target's weights)."""

    def __init__(self, draft, target):
        if draft.args.vocab_size != target.args.vocab_size or \
                draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
            raise UsageError(f"the draft model {draft.path} does not share the tokenizer of {target.path}")
        self.model = draft

    def start(self, params: SamplingParams) -> "_DraftRun":
        return _DraftRun(self.model, params)


class _DraftRun:
    """One generation's draft: the draft model's cache of the tokens it has seen, rolled back to
    what the generation kept before each proposal."""

    def __init__(self, model, params: SamplingParams):
        self.model, self.params = model, params
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed, 1])  # apart from the sampler's
        self.cache = model.net.new_cache()
        self.seen: list = []  # the tokens in the draft cache, in order
        self.lora = model.selection

    def propose(self, history: list, k: int) -> tuple[list, list]:
        k = min(k, self.model.max_context - len(history))
        if k <= 0:
            return [], []
        keep = 0
        for a, b in zip(self.seen, history):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(history) - 1)  # the last token is run again: its logits are the first guess's
        self.cache.length, self.seen = keep, list(history[:keep])
        logits = self.model._prefill(np.asarray(history[keep:], np.int64), self.cache, False, self.lora)
        self.seen += list(history[keep:])
        ctx, guess, probs = list(history), [], []
        for i in range(k):
            if self.params.greedy:
                x, q = int(np.argmax(apply_repetition_penalty(logits, ctx, self.params.repetition_penalty))), None
            else:
                q = softmax(process_logits(logits, self.params, ctx))  # float64 [V]
                x = int(self.rng.choice(q.size, p=q))
            guess.append(x)
            probs.append(q)
            ctx.append(x)
            if i + 1 < k:
                with self.model._running(decode_rows=1):
                    logits = self.model.net.forward(np.array([x]), self.cache, lora=self.lora)[0]
                self.seen.append(x)
        return guess, probs


def make_drafter(draft, target):
    """The drafter for ``draft=``: ``"prompt-lookup"``, a loaded model, or a :class:`PromptLookup`
    / :class:`DraftModel` already made; None for plain decoding."""
    if draft is None or isinstance(draft, (PromptLookup, DraftModel)):
        return draft
    if isinstance(draft, str):
        if draft == PROMPT_LOOKUP:
            return PromptLookup()
        raise UsageError(f"draft must be {PROMPT_LOOKUP!r} or a loaded draft model, got {draft!r}")
    if hasattr(draft, "net") and hasattr(draft, "tokenizer"):
        if draft is target:
            raise UsageError("the draft model is the model itself; load a smaller bundle as the draft")
        return DraftModel(draft, target)
    raise UsageError(f"draft must be {PROMPT_LOOKUP!r} or a loaded draft model, got {type(draft).__name__}")


def verify(sampler, logits: np.ndarray, history: list, guess: int, q) -> tuple[int, bool]:
    """The token after ``history`` from the model's ``logits`` [V], and whether it keeps the draft's
    ``guess`` (drawn with probabilities ``q`` [V] float64; None: certain). Greedy: the argmax (kept
    when it is the guess). Certain guesses: a plain draw, kept when it is the guess. Otherwise the
    acceptance rule: keep with probability min(1, p/q), else draw from max(p - q, 0)."""
    params = sampler.params
    if params.greedy or q is None:
        token = sampler.sample(logits, history)
        return token, token == guess
    p = softmax(process_logits(logits, params, history))  # float64 [V]
    if sampler.rng.random() * q[guess] < p[guess]:
        return guess, True
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0.0:  # p == q up to rounding: any draw from p is right
        residual, total = p, 1.0
    return int(sampler.rng.choice(p.size, p=residual / total)), False
