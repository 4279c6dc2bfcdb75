"""Next-token sampling (NumPy only): repetition penalty, temperature, top-k, top-p, min-p.

The steps and their order are those of transformers' ``GenerationMixin._get_logits_processor``
(``generation/utils.py``) with the processors of ``generation/logits_process.py``:

1. ``RepetitionPenaltyLogitsProcessor``: each token id that occurs in the history (prompt and
   generated tokens) has its logit divided by the penalty when positive, multiplied when negative;
2. greedy decoding (``temperature == 0``) takes the argmax of those logits (the lowest id on ties);
3. ``TemperatureLogitsWarper``: logits divided by the temperature;
4. ``TopKLogitsWarper``: tokens whose logit is below the k-th largest are removed (ties with the k-th
   are kept, as ``scores < topk(scores, k)[-1]`` does);
5. ``TopPLogitsWarper``: the nucleus, the smallest set of most probable tokens whose probabilities sum to
   at least ``top_p``, is kept (always at least one token);
6. ``MinPLogitsWarper``: tokens whose probability is below ``min_p`` times the largest are removed;
7. a token is drawn from the softmax of what is left, computed in float64.

Removed tokens get ``-inf``. Every step is a pure function of its inputs; :class:`Sampler` owns the
``numpy.random.Generator`` so that the same seed gives the same tokens. The log-probabilities
reported with generated tokens (``logprobs=k``) are :func:`log_softmax` of the model's logits,
before any of these steps, and :func:`most_likely` picks the top alternatives.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgelora.errors import UsageError


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding with no filter.

    * ``temperature``: 0 picks the most likely token; above 0 samples from ``softmax(logits / temperature)``.
    * ``top_k``: keep the k most likely tokens (0 = off).
    * ``top_p``: keep the smallest set of most likely tokens whose probability sums to ``top_p`` (1 = off).
    * ``min_p``: drop tokens less likely than ``min_p`` times the most likely one (0 = off).
    * ``repetition_penalty``: > 1 discourages tokens already in the prompt or the output (1 = off).
    * ``seed``: seed of the random generator (None = a fresh random seed).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        top_k = _integer("top_k", self.top_k)
        if top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        min_p = _real("min_p", self.min_p)
        if not 0 <= min_p < 1:
            raise UsageError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        seed = None if self.seed is None else _integer("seed", self.seed)
        if seed is not None and seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                            ("repetition_penalty", penalty), ("seed", seed)):
            object.__setattr__(self, name, value)  # normalised types (NumPy scalars -> int/float)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Build from keyword options, naming any unknown one."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise UsageError(f"unknown sampling option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(u) for u in unknown)}; valid options: {', '.join(valid)}")
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------------------------
# The steps, as pure functions of float logits (a new array is returned; -inf marks removed tokens)
# --------------------------------------------------------------------------------------------

def _as_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind != "f":
        raise UsageError(f"logits must be a non-empty 1-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: logits of tokens in ``history`` divided by
    ``penalty`` when positive (or zero), multiplied by it when negative."""
    out = np.array(_as_logits(logits), copy=True)
    if penalty == 1.0 or len(history) == 0:
        return out
    ids = np.unique(np.asarray(history, dtype=np.int64))
    if ids[0] < 0 or ids[-1] >= out.size:
        raise UsageError(f"history holds token id {int(ids[0] if ids[0] < 0 else ids[-1])} outside the "
                         f"vocabulary (0..{out.size - 1})")
    score = out[ids]
    out[ids] = np.where(score < 0, score * penalty, score / penalty).astype(out.dtype)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """transformers' ``TopKLogitsWarper``: remove tokens whose logit is below the k-th largest (k = 0: off)."""
    out = np.array(_as_logits(logits), copy=True)
    if k <= 0 or k >= out.size:
        return out
    kth = np.partition(out, out.size - k)[out.size - k]
    out[out < kth] = -np.inf
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities; -inf logits get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        raise UsageError("logits have no finite value to sample from")
    e = np.exp(x - top)
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities ``logits - logsumexp(logits)``; -inf logits get -inf."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        raise UsageError("logits have no finite value to take log-probabilities of")
    return x - (top + np.log(np.sum(np.exp(x - top))))


def most_likely(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest ``scores``, largest first, the lowest id first among equal
    scores (also at the k-th place: the choice never depends on the partition's order)."""
    x = np.asarray(scores)
    k = min(int(k), x.size)
    if k <= 0:
        return np.empty(0, np.int64)
    kth = np.partition(x, x.size - k)[x.size - k]
    above = np.flatnonzero(x > kth)
    ids = np.concatenate([above, np.flatnonzero(x == kth)[:k - above.size]])
    return ids[np.lexsort((ids, -x[ids]))]


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' ``TopPLogitsWarper``: keep the smallest set of most probable tokens whose cumulative
    probability reaches ``top_p`` (the most probable token is always kept; ``top_p = 1``: off)."""
    out = np.array(_as_logits(logits), copy=True)
    if top_p >= 1.0:
        return out
    probs = softmax(out)
    candidates = np.flatnonzero(probs > 0)
    order = candidates[np.argsort(-out[candidates], kind="stable")]  # most probable first
    before = np.cumsum(probs[order]) - probs[order]  # probability of the tokens ranked above each one
    drop = order[before >= top_p]
    out[drop] = -np.inf
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """transformers' ``MinPLogitsWarper``: remove tokens whose probability is below ``min_p`` times the
    largest probability (``min_p = 0``: off)."""
    out = np.array(_as_logits(logits), copy=True)
    if min_p <= 0.0:
        return out
    probs = softmax(out)
    out[probs < min_p * probs.max()] = -np.inf
    return out


def process_logits(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> np.ndarray:
    """The float64 logits a token is sampled from: penalty, temperature and the filters in transformers'
    order (repetition penalty, temperature, top-k, top-p, min-p). Not defined for greedy parameters."""
    if params.greedy:
        raise UsageError("process_logits needs temperature > 0 (temperature 0 is greedy argmax)")
    x = apply_repetition_penalty(logits, history, params.repetition_penalty).astype(np.float64)
    x /= params.temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


class Sampler:
    """Chooses next tokens with fixed :class:`SamplingParams` and its own random generator."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id given the float logits ``[vocab]`` and the ids so far (prompt + output)."""
        p = self.params
        if p.greedy:
            return int(np.argmax(apply_repetition_penalty(logits, history, p.repetition_penalty)))
        probs = softmax(process_logits(logits, p, history))
        cdf = np.cumsum(probs)
        token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        token = min(token, probs.size - 1)
        if probs[token] == 0.0:  # only reachable through rounding at the very top of the cdf
            token = int(np.flatnonzero(probs)[-1])
        return token


__all__ = ["SamplingParams", "Sampler", "apply_repetition_penalty", "top_k_filter", "top_p_filter",
           "min_p_filter", "softmax", "log_softmax", "most_likely", "process_logits"]
