"""Building a runnable model from a bundle: memory-mapped weights, layer types injected by storage."""

from __future__ import annotations

import os

import numpy as np

from edgelora.bundle import Bundle
from edgelora.errors import FormatError, UnsupportedError
from edgelora.runtime.linear import make_linear
from edgelora.runtime.llama import LlamaModel, Weights
from edgelora.runtime.gemma import Gemma2Model, GemmaModel
from edgelora.runtime.phi3 import Phi3Model

FAMILIES = {"llama": LlamaModel, "phi3": Phi3Model, "gemma": GemmaModel, "gemma2": Gemma2Model}
#: a layer's norms (``Layer`` field -> module name) unless the family's class lists its own ``NORMS``
LAYER_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
DEFAULT_MAX_CONTEXT = 2048


def stored(bundle: Bundle, name: str):
    """A weight as the bundle stores it, for :func:`make_linear`: its NF4 tensor, or its raw array."""
    return bundle.nf4(name) if bundle.entries[name].storage == "nf4" else bundle.weights.raw(name)


def vector(bundle: Bundle, name: str) -> np.ndarray:
    return np.ascontiguousarray(bundle.tensor(name), np.float32)


def build_weights(bundle: Bundle) -> Weights:
    """The model's weights: per layer, its family's projections (``PROJECTIONS``: field -> module name)
    and norms (``NORMS``, as stored: a family that adds to them does so when it runs)."""
    a = bundle.args
    model_cls = FAMILIES[a.family]
    names = set(bundle.names())
    layers = []
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        linears = {short: make_linear(stored(bundle, p + full + ".weight"))
                   for short, full in model_cls.PROJECTIONS.items()}
        biases = {short: vector(bundle, p + full + ".bias") for short, full in model_cls.PROJECTIONS.items()
                  if p + full + ".bias" in names}
        norms = {short: vector(bundle, p + full + ".weight")
                 for short, full in getattr(model_cls, "NORMS", LAYER_NORMS).items()}
        layers.append(model_cls.Layer(biases=biases, **norms, **linears))
    embed = make_linear(stored(bundle, "model.embed_tokens.weight"))
    head = embed if a.tie_word_embeddings else make_linear(stored(bundle, "lm_head.weight"))
    return Weights(embed=embed, layers=layers, norm=vector(bundle, "model.norm.weight"), head=head)


def set_threads(threads: int | None) -> int:
    """A model's thread count, checked; ``None`` means every core.

    Numba runs the parallel kernels with this many threads. Numba's count belongs to each calling
    thread: this sets the calling (loading) thread's, for code that runs ``model.net`` directly,
    and ``Model`` applies its count around every forward, from whichever thread it runs. BLAS is
    held to one thread (for the process) because the prefill splits its products between threads
    itself (two spinning thread pools on the same cores slow each other down many times over)."""
    import numba
    n = numba.config.NUMBA_NUM_THREADS
    threads = n if threads is None else int(threads)
    if not 1 <= threads <= n:
        from edgelora.errors import UsageError
        raise UsageError(f"threads must be between 1 and {n} on this machine, got {threads}")
    numba.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")
    except ImportError:  # BLAS then uses its own default
        pass
    return threads


def build_model(bundle: Bundle, max_context: int | None):
    a = bundle.args
    if a.family not in FAMILIES:
        raise UnsupportedError(f"no runtime for architecture family {a.family!r}", bundle.path)
    limit = a.max_position_embeddings
    if max_context is None:
        max_context = min(FAMILIES[a.family].context_limit(a), DEFAULT_MAX_CONTEXT)
    max_context = int(max_context)
    if not 1 <= max_context <= limit:
        from edgelora.errors import UsageError
        raise UsageError(f"max_context must be between 1 and the model's max_position_embeddings ({limit}), "
                         f"got {max_context}")
    try:
        weights = build_weights(bundle)
    except KeyError as e:
        raise FormatError(f"bundle lacks tensor {e}", bundle.path) from None
    return FAMILIES[a.family](a, weights, max_context)


def default_threads() -> int:
    return int(os.environ.get("EDGELORA_THREADS", "0")) or None
