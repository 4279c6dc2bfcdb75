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

import statistics

import numpy as np

from edgelora.errors import UsageError
from edgelora.runtime.sampling import SamplingParams, apply_repetition_penalty, process_logits, softmax

PROMPT_LOOKUP = "prompt-lookup"
NUM_DRAFT = 4  # the most guesses a step verifies by default: 5 rows, each weight read once from memory


class DraftBudget:
    """How many of prompt lookup's guesses a step verifies, chosen anew each step: the count k (0 up
    to the guesses there are) that gives the most tokens a second by what this generation has seen
    so far, ``E(k) / c(1 + k)``. ``E(k) = 1 + sum_{i<=k} a_1 ... a_i`` is the tokens a step yields on
    average, ``a_i`` the share of guesses kept at place i when the one before was kept (a Beta(1, 1)
    prior: 1/2 before any is seen); ``c(r)`` the measured time of a step of r rows (the lower median
    of its last five). The first step is a plain one (it measures ``c(1)``); a count not yet
    measured costs what the line between the measured counts around it says, or, above the largest
    measured, as much as that one (so the largest is tried first and each count above is tried
    once); a count measured once costs no more than that either (:meth:`step_cost`). While no
    guess is verified, the guesses of a plain step are still checked against the tokens that follow
    (:meth:`shadow`, free for prompt lookup), so drafting resumes when the text starts to repeat.

    It only chooses how many guesses are verified, never what they or the tokens are: the text is
    plain decoding's whatever it chooses (greedy, and seeded sampling with certain guesses)."""

    RECENT = 5  # step times kept per row count: its cost is their lower median

    def __init__(self, most: int):
        self.verified = np.zeros(most + 1)  # [place]: guesses verified there with the one before kept
        self.kept = np.zeros(most + 1)  # [place]: of those, kept
        self.cost: dict = {}  # rows -> seconds a step
        self._times: dict = {}  # rows -> the last RECENT step times
        self._shadow, self._shadow_at = [], 0
        self._verifying, self._accepted = 0, 0  # the last step's count, and the guesses kept before it

    def step(self, history: list, guesses: list, accepted: int) -> int:
        """How many of ``guesses`` (made after ``history``) this step verifies; ``accepted``: the
        guesses the generation has kept so far, which settles what the last step's kept."""
        if self._verifying:
            self.observe(self._verifying, accepted - self._accepted)
        k = self.choose(len(guesses))
        if not k:
            self.shadow(history, guesses)
        self._verifying, self._accepted = k, accepted
        return k

    def choose(self, available: int) -> int:
        if 1 not in self.cost:
            return 0
        a = (self.kept[1:] + 1.0) / (self.verified[1:] + 2.0)  # [place - 1]
        best, best_rate, tokens, reach = 0, 1.0 / self.cost[1], 1.0, 1.0
        for k in range(1, min(available, a.size) + 1):
            reach *= a[k - 1]
            tokens += reach
            rate = tokens / self.step_cost(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def step_cost(self, rows: int) -> float:
        """The measured time of a step of ``rows`` rows; unmeasured, the line between the nearest
        measured counts around it, or the nearest below when none is above (so it is tried).
        A count measured once costs the less of that time and what it would cost unmeasured: a
        first step slowed by something else does not keep the count from being tried again."""
        own = self.cost.get(rows)
        if own is not None and len(self._times[rows]) > 1:
            return own
        lo = max((r for r in self.cost if r < rows), default=None)
        if lo is None:  # the fewest rows measured
            return own
        hi = min((r for r in self.cost if r > rows), default=None)
        guess = self.cost[lo]
        if hi is not None:
            guess += (self.cost[hi] - self.cost[lo]) * (rows - lo) / (hi - lo)
        return guess if own is None else min(own, guess)

    def observe(self, drafted: int, kept: int) -> None:
        """A step verified ``drafted`` guesses and kept the first ``kept``."""
        self.verified[1:min(drafted, kept + 1) + 1] += 1  # (place i counts when the one before was kept)
        self.kept[1:kept + 1] += 1

    def timed(self, rows: int, seconds: float) -> None:
        """A step of ``rows`` rows took ``seconds``. Its cost is the lower median of the last
        ``RECENT`` such steps: one step slowed by something else (another process, a page fault)
        is not taken for the cost; a lasting change is, after three steps."""
        times = self._times.setdefault(rows, [])
        times.append(seconds)
        del times[:-self.RECENT]
        self.cost[rows] = statistics.median_low(times)

    def shadow(self, history: list, guesses: list) -> None:
        """At a step that verifies no guess: settle the last unverified guesses once the tokens after
        them are known (or one differs), then keep ``guesses`` (made after ``history``) if none wait."""
        if self._shadow:
            done = history[self._shadow_at:self._shadow_at + len(self._shadow)]
            kept = next((i for i, (g, t) in enumerate(zip(self._shadow, done)) if g != t), len(done))
            if kept == len(self._shadow) or kept < len(done):
                self.observe(len(self._shadow), kept)
                self._shadow = []
        if not self._shadow and guesses:
            self._shadow, self._shadow_at = list(guesses), len(history)


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

    adapts = True  # its guesses cost nothing: a generation verifies as many as pay (DraftBudget)

    def start(self, params: SamplingParams) -> "PromptLookup":
        return self  # no state per generation

    def propose(self, history: list, k: int) -> tuple[list, list]:
        """Up to ``k`` guessed tokens after ``history``, and their draft probabilities (None: certain)."""
        h = np.asarray(history, np.int64)  # [L]
        L = h.size
        ends = np.flatnonzero(h[:-1] == h[-1])  # earlier places of the last token: where n-grams may end
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            hits = ends[ends >= n - 1]
            for back in range(1, n):  # the n-gram ending at e is the last n tokens
                hits = hits[h[hits - back] == h[L - 1 - back]]
            if hits.size:
                j = int(hits[-1]) + 1  # the latest occurrence's continuation starts at h[j], j < L
                guess = []
                for i in range(j, j + k):
                    guess.append(int(h[i]) if i < L else guess[i - L])  # (i may reach the guesses made)
                return guess, [None] * k
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

    adapts = False  # every step drafts num_draft tokens (a seeded sampled text then never depends on timing)

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
