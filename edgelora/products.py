"""How NF4 weights multiply (``load(..., products=...)``, ``--products``) and what the KV cache
holds (``load(..., kv_cache=...)``, ``--kv-cache``): the choices and the defaults.

* ``exact``: float32 products of the dequantized weights, bit-true against the references
  (transformers over bitsandbytes' dequantized weights);
* ``int8``: int8 codes and activations, int32 sums (``runtime/int8.py`` for decode,
  ``runtime/int8_gemm.py`` for prompts): faster, approximate; a float16 output head is quantized
  to int8 at load and multiplies the same way (``int8.F16Int8Linear``).

:data:`DEFAULT_PRODUCTS` is the one place the default is chosen, from measured perplexity
(README, *The int8 product path*).

KV cache (:data:`KV_CACHES`): ``float32`` keeps attention as the references compute it;
``float16`` (llama.cpp's default) halves the cache's memory and the bytes a decode step reads of
it, each key and value rounded to float16 once, when stored. A load that names none gets
:func:`default_kv_cache` of its products: float16 with the int8 products (chosen from measured
perplexity, as they were: within 0.1 %), float32 with the exact ones, which stay bit-true against
the references (README, *KV cache*).

Adapters (:data:`ADAPTER_DTYPES`): how a LoRA adapter's A and B are held once loaded
(``load(..., adapter_dtype=...)``, ``model.adapters.load(..., dtype=...)``, ``--adapter-dtype``).
``float32``: the file's values exactly (a pair float16 holds exactly, a float16 file's always, is
kept in float16: the same values in half the bytes); ``float16``: every value rounded to float16
once, at load (round to nearest even; what ``deploy`` writes), half the bytes a decode step reads
of a float32 file's adapter (a pair with a value beyond float16's range, and DoRA's, stay
float32). A load that names none gets :func:`default_adapter_dtype` of its products: float16 with
the int8 products (chosen from measured perplexity: the rounding's own effect on the trained demo
adapters at most 0.006 %), float32 with the exact ones, which stay bit-true against PEFT (README,
*LoRA adapters*).

A module of its own, free of NumPy and Numba, so the command line can show the defaults without
loading the runtime.
"""

from __future__ import annotations

from edgelora.errors import UsageError

PRODUCTS = ("exact", "int8")
DEFAULT_PRODUCTS = "int8"


def _one_of(value: str, choices: tuple, what: str) -> str:
    """``value`` if it is one of ``choices``, else a :class:`UsageError` naming ``what``."""
    if value not in choices:
        raise UsageError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_products(products: str) -> str:
    """``products`` if it is one of :data:`PRODUCTS`, else a :class:`UsageError`."""
    return _one_of(products, PRODUCTS, "products")


KV_CACHES = ("float32", "float16")
DEFAULT_KV_CACHES = {"int8": "float16", "exact": "float32"}  # products -> the KV cache a load gets by default
DEFAULT_KV_CACHE = DEFAULT_KV_CACHES[DEFAULT_PRODUCTS]  # a default load's (what plan and deploy assume)
EXACT_KV_CACHE = "float32"  # attention as the references compute it: the runtime's own classes' default
UNPLANNED_KV_CACHE = "float32"  # what deploy folders and fleet groups made before the cache was planned hold
KV_CACHE_BYTES = {"float32": 4, "float16": 2}  # bytes a key or value element takes


def default_kv_cache(products: str) -> str:
    """The KV cache a load of ``products`` gets when it names none (:data:`DEFAULT_KV_CACHES`)."""
    return DEFAULT_KV_CACHES[check_products(products)]


def check_kv_cache(kv_cache: str) -> str:
    """``kv_cache`` if it is one of :data:`KV_CACHES`, else a :class:`UsageError`."""
    return _one_of(kv_cache, KV_CACHES, "kv_cache")


ADAPTER_DTYPES = ("float32", "float16")
DEFAULT_ADAPTER_DTYPES = {"int8": "float16", "exact": "float32"}  # products -> how a load holds adapters by default
DEFAULT_ADAPTER_DTYPE = DEFAULT_ADAPTER_DTYPES[DEFAULT_PRODUCTS]  # a default load's (what plan and deploy assume)


def default_adapter_dtype(products: str) -> str:
    """How a load of ``products`` holds adapters when it names nothing (:data:`DEFAULT_ADAPTER_DTYPES`)."""
    return DEFAULT_ADAPTER_DTYPES[check_products(products)]


def check_adapter_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`ADAPTER_DTYPES`, else a :class:`UsageError`."""
    return _one_of(dtype, ADAPTER_DTYPES, "adapter dtype")
