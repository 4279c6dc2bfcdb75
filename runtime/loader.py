"""Building a runnable model from a bundle: memory-mapped weights, layer types injected by storage."""

from __future__ import annotations

import numpy as np

from edgelora.architectures import EMBED, HEAD, NORM
from edgelora.bundle import Bundle
from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.products import DEFAULT_PRODUCTS, check_kv_cache, default_kv_cache
from edgelora.runtime.linear import check_products, make_linear
from edgelora.runtime.llama import LlamaModel, Weights
from edgelora.runtime.gemma import Gemma2Model, GemmaModel
from edgelora.runtime.phi3 import Phi3Model

FAMILIES = {"llama": LlamaModel, "phi3": Phi3Model, "gemma": GemmaModel, "gemma2": Gemma2Model}
DEFAULT_MAX_CONTEXT = 2048


def stored(bundle: Bundle, name: str):
    """A weight as the bundle stores it, for :func:`make_linear`: its NF4 tensor, or its raw array."""
    return bundle.nf4(name) if bundle.entries[name].storage == "nf4" else bundle.weights.raw(name)


def let_go(bundle: Bundle, name: str) -> dict:
    """For :func:`make_linear` to keep a mapped weight it copies out of the resident set. A float16
    one: ``release(r0, r1)`` lets the pages of rows ``r0 .. r1`` go (they stay valid to read again)
    and ``read_rows(ids)`` reads rows from the file, not through the mapping. An NF4 one (repacked
    by ``int8.NF4Int8Linear`` where ``int8.TILED``): ``release()`` lets its stored arrays' pages go
    (training's exact products read them again). Nothing when the weights were read into memory
    (``mmap=False``): the copy read is what there is."""
    f = bundle.weights
    if not f.mapped:
        return {}
    if bundle.entries[name].storage == "nf4":
        return {"release": lambda: [f.release(key) for key in bundle.storage(name).keys(name)]}

    def release(r0: int, r1: int) -> None:
        row_bytes = f.tensors[name].nbytes // bundle.entries[name].shape[0]
        f.release(name, r0 * row_bytes, r1 * row_bytes)
    return {"release": release, "read_rows": lambda ids: f.read_rows(name, ids)}


def vector(bundle: Bundle, name: str) -> np.ndarray:
    return np.ascontiguousarray(bundle.tensor(name), np.float32)


def build_weights(bundle: Bundle, products: str = DEFAULT_PRODUCTS) -> Weights:
    """The model's weights: per layer, its family's projections (``arch.PROJECTIONS``: field -> module)
    and norms (``arch.NORMS``, as stored: a family that adds to them does so when it runs); NF4
    weights multiply as ``products`` says (``linear.PRODUCTS``)."""
    a = bundle.args
    model_cls = FAMILIES[a.family]
    arch = model_cls.arch
    names = set(bundle.names())
    layers = []
    for i in range(a.num_hidden_layers):
        modules = {field: arch.module(i, field) for field in arch.PROJECTIONS}
        linears = {field: make_linear(stored(bundle, m + ".weight"), products, **let_go(bundle, m + ".weight"))
                   for field, m in modules.items()}
        biases = {field: vector(bundle, m + ".bias") for field, m in modules.items() if m + ".bias" in names}
        norms = {field: vector(bundle, arch.module(i, field) + ".weight") for field in arch.NORMS}
        layers.append(model_cls.Layer(biases=biases, **norms, **linears))
    # an int8 copy of a float16 head (or the embedding tied to it) lets the float16 pages go as it is made
    e_name, h_name = f"{EMBED}.weight", f"{HEAD}.weight"
    # (an embedding not tied to the head is only looked up: its products, and an int8 path's repack, never made)
    embed = make_linear(stored(bundle, e_name), products if a.tie_word_embeddings else "exact", head=a.tie_word_embeddings,
                        **let_go(bundle, e_name))
    head = embed if a.tie_word_embeddings else make_linear(stored(bundle, h_name), products, head=True,
                                                           **let_go(bundle, h_name))
    return Weights(embed=embed, layers=layers, norm=vector(bundle, f"{NORM}.weight"), head=head)


def build_model(bundle: Bundle, max_context: int | None, products: str = DEFAULT_PRODUCTS,
                kv_cache: str | None = None):
    a = bundle.args
    if a.family not in FAMILIES:
        raise UnsupportedError(f"no runtime for architecture family {a.family!r}", bundle.path)
    limit = a.max_position_embeddings
    if max_context is None:
        max_context = min(FAMILIES[a.family].context_limit(a), DEFAULT_MAX_CONTEXT)
    max_context = int(max_context)
    check_products(products)
    kv_cache = default_kv_cache(products) if kv_cache is None else check_kv_cache(kv_cache)
    if not 1 <= max_context <= limit:
        raise UsageError(f"max_context must be between 1 and the model's max_position_embeddings ({limit}), "
                         f"got {max_context}")
    try:
        weights = build_weights(bundle, products)
    except KeyError as e:
        raise FormatError(f"bundle lacks tensor {e}", bundle.path) from None
    net = FAMILIES[a.family](a, weights, max_context)
    net.kv_cache = kv_cache
    return net

