"""``edgelora eval`` / :func:`evaluate`: how good a bundle is, measured.

* **Perplexity of a text**: the text is tokenized once (with the tokenizer's special tokens, as
  ``encode`` does), then cut into consecutive, non-overlapping windows of ``window`` tokens
  (default: the model's ``max_context``); each window runs from an empty cache and every token of
  it after its first is predicted from those before it in the window. Perplexity is
  ``exp(sum of negative log-likelihoods / tokens predicted)``: transformers' perplexity guide
  ("Perplexity of fixed-length models") with ``stride = max_length``, so its numbers compare.
* **Answer-only loss** on JSONL data: a line ``{"prompt": ..., "completion": ...}`` is the prompt's
  tokens (with special tokens) joined to the completion's (without), the loss counted on the
  completion's tokens only; a line ``{"messages": [...]}`` is the conversation rendered by the chat
  template, the loss counted on every assistant turn's tokens (each turn's span is what the
  template adds after the conversation before it with ``add_generation_prompt=True``); a line
  ``{"text": ...}`` counts every token after the first. Lines are read as ``edgelora train``
  reads them (:mod:`edgelora.training_data`, without the end of sequence training appends). The loss
  is the mean negative log-likelihood per counted token over the whole file (as TRL's
  completion-only loss), and its ``exp`` is reported too.
* **Weight quantization report**: each stored tensor's ``‖W − Q(W)‖ / ‖W‖`` as the converter
  measured it against the source weights (the bundle manifest's ``rel_error``, rounded to 6
  digits; an imported NF4 tensor's codes are the source's, so its error is 0), per layer.

* **Product error report** (int8 products): the first window of the text (at most
  :data:`PRODUCT_TOKENS` tokens; else the first example of the data) runs once through the model
  as loaded while every projection and the head keep the rows they multiply; each then multiplies
  those rows both ways, and ``‖y_int8 − y_exact‖ / ‖y_exact‖`` is reported per projection, per
  layer: the activations' and codes' error on real activations, apart from NF4's own.

The model is loaded with :func:`edgelora.load` (or given loaded): its products are the ones the
runtime uses, so the numbers are those of the runtime as loaded.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np

from edgelora.errors import UsageError
from edgelora.runtime.linear import exact_linear
from edgelora.runtime.model import Model, load
from edgelora.training_data import answer_spans, read_jsonl

_LAYER = re.compile(r"\.layers\.(\d+)\.")
#: tokens of the text (or of the first example) the product error report runs
PRODUCT_TOKENS = 128


@dataclass
class Evaluation:
    """What :func:`evaluate` measured (``None``: not asked)."""

    bundle: str
    adapter: str  # the adapter selection: base, a name, or a mix
    window: int  # tokens per perplexity window
    perplexity: float | None = None
    text_tokens: int = 0  # tokens predicted in the text
    text_nll: float | None = None  # mean negative log-likelihood per predicted token (nats)
    answer_loss: float | None = None  # mean negative log-likelihood per answer token (nats)
    answer_tokens: int = 0
    examples: int = 0
    weights: list = field(default_factory=list)  # one dict per layer (None: the tensors outside layers)
    products: list = field(default_factory=list)  # int8 products: one dict per layer (None: the head)
    product_tokens: int = 0  # the rows each projection's product error was measured on

    @property
    def answer_perplexity(self) -> float | None:
        return None if self.answer_loss is None else math.exp(self.answer_loss)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "adapter": self.adapter, "window": self.window,
                "perplexity": self.perplexity, "text_tokens": self.text_tokens, "text_nll": self.text_nll,
                "answer_loss": self.answer_loss, "answer_perplexity": self.answer_perplexity,
                "answer_tokens": self.answer_tokens, "examples": self.examples, "weights": self.weights,
                "products": self.products, "product_tokens": self.product_tokens}

    def format(self) -> str:
        lines = [f"bundle       {self.bundle} (adapter: {self.adapter})"]
        if self.perplexity is not None:
            lines.append(f"perplexity   {self.perplexity:.4f} over {self.text_tokens} tokens "
                         f"(windows of {self.window}, NLL {self.text_nll:.4f})")
        if self.answer_loss is not None:
            lines.append(f"answer loss  {self.answer_loss:.4f} over {self.answer_tokens} answer tokens of "
                         f"{self.examples} examples (perplexity {self.answer_perplexity:.4f})")
        lines.append("weights      ||W - Q(W)|| / ||W|| per tensor (mean and worst per layer)")
        for row in self.weights:
            where = "outside layers" if row["layer"] is None else f"layer {row['layer']}"
            lines.append(f"  {where:<15} mean {row['mean_rel_error']:.6f}  worst {row['worst_rel_error']:.6f} "
                         f"({row['worst_tensor']})")
        if self.products:
            lines.append(f"products     ||y_int8 - y_exact|| / ||y_exact|| per projection on {self.product_tokens} "
                         f"tokens (mean and worst per layer)")
            for row in self.products:
                where = "head" if row["layer"] is None else f"layer {row['layer']}"
                lines.append(f"  {where:<15} mean {row['mean_rel_error']:.6f}  worst {row['worst_rel_error']:.6f} "
                             f"({row['worst_projection']})")
        return "\n".join(lines)


def weight_report(manifest: dict) -> list:
    """Per layer (``layer`` None: embeddings, head, final norm): each quantized tensor's
    ``‖W − Q(W)‖/‖W‖`` as the manifest records it, their mean and the worst. Tensors stored in
    float32 (norms, biases) are exact and left out."""
    layers: dict = {}
    for name, t in manifest["tensors"].items():
        if t.get("storage") == "float32" or t.get("rel_error") is None:
            continue
        m = _LAYER.search(name)
        layers.setdefault(None if m is None else int(m.group(1)), {})[name] = float(t["rel_error"])
    rows = []
    for layer in sorted(layers, key=lambda i: -1 if i is None else i):
        errors = layers[layer]
        worst = max(errors, key=errors.get)
        rows.append({"layer": layer, "tensors": errors, "mean_rel_error": sum(errors.values()) / len(errors),
                     "worst_rel_error": errors[worst], "worst_tensor": worst})
    return rows


class _Recorder:
    """A linear layer that keeps the rows it multiplies (:func:`product_report`); all else is the
    layer's own."""

    def __init__(self, layer):
        self.layer, self.rows = layer, []

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def matmul(self, x):
        self.rows.append(np.array(x, np.float32))
        return self.layer.matmul(x)


def product_report(model: Model, ids: list) -> list:
    """Per layer (``layer`` None: the output head): each projection's ``‖y_int8 − y_exact‖ /
    ‖y_exact‖`` on the rows it multiplies when ``ids`` (at least two tokens) run through ``model``
    with its current adapter selection, its mean and the worst; empty for exact products. A weight
    the int8 path cannot take multiplies exactly both ways (0)."""
    if model.products != "int8":
        return []
    if len(ids) < 2:
        raise UsageError("the product error report needs at least two tokens")
    net = model.net
    fields = list(net.arch.PROJECTIONS)
    recorders = {(i, f): _Recorder(getattr(L, f)) for i, L in enumerate(net.w.layers) for f in fields}
    recorders[(None, "head")] = _Recorder(net.w.head)
    try:
        for (i, f), r in recorders.items():
            setattr(net.w if i is None else net.w.layers[i], f, r)
        model.logits(ids)  # one prompt: every projection's rows, the head's last
    finally:
        for (i, f), r in recorders.items():
            setattr(net.w if i is None else net.w.layers[i], f, r.layer)
    layers: dict = {}
    for (i, f), r in recorders.items():
        X = np.concatenate(r.rows)  # [T, in]
        exact = exact_linear(r.layer).matmul(X).astype(np.float64)
        diff = np.linalg.norm(r.layer.matmul(X).astype(np.float64) - exact)
        layers.setdefault(i, {})[f] = float(diff / max(np.linalg.norm(exact), 1e-30))
    rows = []
    for i in sorted(layers, key=lambda i: len(layers) if i is None else i):
        errors = layers[i]
        worst = max(errors, key=errors.get)
        rows.append({"layer": i, "projections": errors, "mean_rel_error": sum(errors.values()) / len(errors),
                     "worst_rel_error": errors[worst], "worst_projection": worst})
    return rows


def text_windows(ids: list, window: int) -> list:
    """Consecutive, non-overlapping windows of ``window`` ids; a last window of one id is dropped
    (it predicts nothing)."""
    return [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) > 1]


def perplexity(model: Model, text: str, window: int | None = None) -> tuple[float, int, float]:
    """``(perplexity, tokens predicted, mean NLL)`` of ``text`` over non-overlapping windows, with
    the model's current adapter selection."""
    window = model.max_context if window is None else window
    ids = model.tokenizer.encode(text)
    total, count = 0.0, 0
    for w in text_windows(ids, window):
        lp = model.token_logprobs(w)  # [len(w) - 1]
        total, count = total - float(lp.sum()), count + lp.size
    if count == 0:
        raise UsageError("the text has fewer than two tokens: nothing to predict")
    return math.exp(total / count), count, total / count


def answer_loss(model: Model, path) -> tuple[float, int, int]:
    """``(mean NLL per answer token, answer tokens, examples)`` of a JSONL file, with the model's
    current adapter selection (lines read by :mod:`edgelora.training_data`, as training reads them
    but without an end of sequence appended)."""
    total, count, examples = 0.0, 0, 0
    for where, record in read_jsonl(path):
        ids, spans = answer_spans(model.tokenizer, record, where)
        if len(ids) > model.max_context:
            raise UsageError(f"{where}: {len(ids)} tokens exceed max_context={model.max_context}; evaluate with a "
                             f"larger --max-context")
        lp = model.token_logprobs(ids)  # [T - 1]: lp[t - 1] is token t's
        for a, b in spans:
            a = max(a, 1)  # the first token of a sequence predicts from nothing
            total, count = total - float(lp[a - 1:b - 1].sum()), count + max(b - a, 0)
        examples += 1
    if count == 0:
        raise UsageError(f"{path}: no answer tokens to score")
    return total / count, count, examples


def evaluate(model: Model | str | os.PathLike, text: str | None = None, data: str | os.PathLike | None = None, *,
             adapters: dict | None = None, use: str | dict | None = None, window: int | None = None,
             max_context: int | None = None, text_file: str | os.PathLike | None = None,
             products: str | None = None, adapter_dtype: str | None = None) -> Evaluation:
    """Measure a bundle: perplexity of ``text`` (or of the file ``text_file``), answer-only loss on
    the JSONL file ``data``, and the weights' quantization error (always).

    ``model``: a bundle path (loaded with ``max_context`` and ``adapters`` ``{name: path}``; a
    single adapter is used) or a loaded :class:`~edgelora.runtime.model.Model` (its resident
    adapters). ``use``: the adapter selection to measure (a name, a ``{name: weight}`` mix,
    ``"base"``; default: the model's current one), in force for this call only. ``window``: tokens
    per perplexity window (default: the model's ``max_context``). ``products``, ``adapter_dtype``:
    how a bundle given by path multiplies and holds its adapters (:func:`edgelora.load`'s options;
    default its defaults).
    """
    options = {k: v for k, v in (("products", products), ("adapter_dtype", adapter_dtype)) if v is not None}
    if isinstance(model, Model):
        if adapters or max_context is not None or options:
            raise UsageError("adapters, max_context, products and adapter_dtype are load options: give them to "
                             "edgelora.load, or give evaluate the bundle's path")
    else:
        model = load(model, max_context=max_context, adapters=adapters, **options)
        if use is None and len(model.adapters) == 1:
            use = model.adapters.names[0]
    if window is not None and not 2 <= window <= model.max_context:
        raise UsageError(f"window must be 2 to max_context={model.max_context}, got {window}")
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8")
    with nullcontext() if use is None else model.using(use):
        result = Evaluation(str(model.path), model.active_adapter, window or model.max_context,
                            weights=weight_report(model.bundle.manifest))
        if text is not None:
            result.perplexity, result.text_tokens, result.text_nll = perplexity(model, text, window)
        if data is not None:
            result.answer_loss, result.answer_tokens, result.examples = answer_loss(model, data)
        sample = _product_sample(model, text, data)
        if model.products == "int8" and sample:
            result.products, result.product_tokens = product_report(model, sample), len(sample)
    return result


def _product_sample(model: Model, text: str | None, data) -> list:
    """The tokens the product error report runs: the text's first window, else the first example's."""
    limit = min(PRODUCT_TOKENS, model.max_context)
    if text is not None:
        return model.tokenizer.encode(text)[:limit]
    if data is not None:
        for where, record in read_jsonl(data):
            return answer_spans(model.tokenizer, record, where)[0][:limit]
    return []
