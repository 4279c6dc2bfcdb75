"""Building a runnable model from a bundle: memory-mapped weights, layer types injected by storage."""

from __future__ import annotations

import os

import numpy as np

from edgelora.architectures import EMBED, HEAD, NORM
from edgelora.bundle import Bundle
from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.runtime.kernels import F16Linear, NF4Linear
from edgelora.runtime.llama import DenseLinear, LlamaModel, Weights
from edgelora.runtime.gemma import Gemma2Model, GemmaModel
from edgelora.runtime.phi3 import Phi3Model

FAMILIES = {"llama": LlamaModel, "phi3": Phi3Model, "gemma": GemmaModel, "gemma2": Gemma2Model}
DEFAULT_MAX_CONTEXT = 2048


def make_linear(bundle: Bundle, name: str):
    """The linear-layer object for a stored tensor: the model never sees how it is stored."""
    e = bundle.entries[name]
    if e.storage == "nf4":
        return NF4Linear(bundle.nf4(name))
    raw = bundle.weights.raw(name)
    if raw.dtype == np.float16:
        return F16Linear(raw)
    return DenseLinear(raw)


def vector(bundle: Bundle, name: str) -> np.ndarray:
    return np.ascontiguousarray(bundle.tensor(name), np.float32)


def build_weights(bundle: Bundle) -> Weights:
    """The model's weights: per layer, its family's projections (``arch.PROJECTIONS``: field -> module)
    and norms (``arch.NORMS``, as stored: a family that adds to them does so when it runs)."""
    a = bundle.args
    model_cls = FAMILIES[a.family]
    arch = model_cls.arch
    names = set(bundle.names())
    layers = []
    for i in range(a.num_hidden_layers):
        modules = {field: arch.module(i, field) for field in arch.PROJECTIONS}
        linears = {field: make_linear(bundle, m + ".weight") for field, m in modules.items()}
        biases = {field: vector(bundle, m + ".bias") for field, m in modules.items() if m + ".bias" in names}
        norms = {field: vector(bundle, arch.module(i, field) + ".weight") for field in arch.NORMS}
        layers.append(model_cls.Layer(biases=biases, **norms, **linears))
    embed = make_linear(bundle, f"{EMBED}.weight")
    head = embed if a.tie_word_embeddings else make_linear(bundle, f"{HEAD}.weight")
    return Weights(embed=embed, layers=layers, norm=vector(bundle, f"{NORM}.weight"), head=head)


def set_threads(threads: int | None) -> int:
    """The runtime's thread count for this process; ``None`` means every core.

    Numba runs the parallel kernels with this many threads; BLAS is held to one thread because
    the prefill splits its products between threads itself (two spinning thread pools on the
    same cores slow each other down many times over)."""
    import numba
    n = numba.config.NUMBA_NUM_THREADS
    threads = n if threads is None else int(threads)
    if not 1 <= threads <= n:
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
        raise UsageError(f"max_context must be between 1 and the model's max_position_embeddings ({limit}), "
                         f"got {max_context}")
    try:
        weights = build_weights(bundle)
    except KeyError as e:
        raise FormatError(f"bundle lacks tensor {e}", bundle.path) from None
    return FAMILIES[a.family](a, weights, max_context)


def default_threads() -> int:
    return int(os.environ.get("EDGELORA_THREADS", "0")) or None
