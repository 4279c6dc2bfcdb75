"""How NF4 weights multiply (``load(..., products=...)``, ``--products``): the choices and the default.

* ``exact``: float32 products of the dequantized weights, bit-true against the references
  (transformers over bitsandbytes' dequantized weights);
* ``int8``: int8 codes and activations, int32 sums (``runtime/int8.py`` for decode,
  ``runtime/int8_gemm.py`` for prompts): faster, approximate; a float16 output head is quantized
  to int8 at load and multiplies the same way (``int8.F16Int8Linear``).

:data:`DEFAULT_PRODUCTS` is the one place the default is chosen, from measured perplexity
(README, *The int8 product path*). A module of its own, free of NumPy and Numba, so the command
line can show the default without loading the runtime.
"""

from __future__ import annotations

from edgelora.errors import UsageError

PRODUCTS = ("exact", "int8")
DEFAULT_PRODUCTS = "int8"


def check_products(products: str) -> str:
    """``products`` if it is one of :data:`PRODUCTS`, else a :class:`UsageError`."""
    if products not in PRODUCTS:
        raise UsageError(f"products must be one of {', '.join(PRODUCTS)}, got {products!r}")
    return products
