"""The linear-layer contract: what the model asks of a weight ``W [out_features, in_features]``.

A weight reaches the model as an object with this interface, however it is stored: NF4
(``NF4Linear``) and float16 (``F16Linear``) read the stored bytes in place through the kernels of
``runtime/kernels.py``; float32 (``DenseLinear``, here) multiplies with NumPy. The model never asks
which it holds, and LoRA never changes it: adapters are applied beside the product
(``runtime/lora.py``, ``Selection.apply``).

:func:`make_linear` is the one place that decides which class a stored weight gets, for the
bundle's weights (``runtime/loader.py``) and an adapter's saved modules alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from edgelora.products import DEFAULT_PRODUCTS, PRODUCTS, check_products  # noqa: F401 (re-exported)
from edgelora.storage import NF4Tensor
from edgelora.runtime.int8 import Q8_BLOCK, F16Int8Linear, NF4Int8Linear, quantize_activations
from edgelora.runtime.kernels import F16Linear, NF4Linear

@runtime_checkable
class Linear(Protocol):
    """``y = x W^T`` for a weight ``W [out_features, in_features]``.

    The products' bits depend only on the row, never on how many rows come together: ``matmul``
    of one row is exactly ``matvec`` of it, and each row of ``matvec_batch`` is exactly ``matvec``
    of that row. So a one-token forward runs the decode kernel, and a sequence decoded in a batch
    gives the same tokens as decoded alone."""

    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes as stored."""

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x f32 [in] -> f32 [out] (a decode step)."""

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x f32 [T, in] -> f32 [T, out] (a prefill chunk; one row: ``matvec``'s bits)."""

    def matvec_batch(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X f32 [B, in] -> f32 [B, out], each row exactly ``matvec`` of it (a batched decode step)."""

    def dequantize_rows(self, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        """float32 rows ``[r0, r1)`` of the weight (DoRA's norms, a tile at a time)."""

    def rows(self, ids) -> np.ndarray:
        """The rows of token ids ``ids`` (an embedding lookup)."""


class DenseLinear:
    """A float32 weight ``[out, in]`` with the :class:`Linear` interface (small tensors, tests)."""

    def __init__(self, w: np.ndarray):
        self.weight = np.ascontiguousarray(w, np.float32)
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def matvec(self, x, out=None):
        return np.dot(self.weight, x, out=out)

    def matmul(self, x):
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]  # [1, out]: the decode product's bits
        return x @ self.weight.T  # [T, out]

    def matvec_batch(self, X, out=None):
        """X [B, in] -> [B, out], each row exactly ``matvec`` of that row."""
        out = np.empty((X.shape[0], self.out_features), np.float32) if out is None else out
        for b in range(X.shape[0]):
            np.dot(self.weight, np.ascontiguousarray(X[b]), out=out[b])
        return out

    def dequantize_rows(self, r0, r1, buf=None):
        return self.weight[r0:r1]

    def rows(self, ids):
        return self.weight[np.asarray(ids, np.int64)]


def matmul_shared(layers: list, x: np.ndarray) -> list:
    """``[layer.matmul(x) for layer in layers]``, the same bits, for weights that read the same
    rows x [T, in] (a layer's q, k and v; gate and up): int8-path NF4 layers that take the prefill
    GEMM share one quantization of x per block size instead of each making its own (a TinyLlama
    layer's prompt rows: 4 quantizations instead of 7), and one GEMM call
    (``NF4Int8Linear.matmul_many``: one hand-off to the threads instead of one a weight)."""
    out = [None] * len(layers)
    gemms = {}  # block size -> the indices of the layers that take the GEMM
    for i, layer in enumerate(layers):
        if isinstance(layer, NF4Int8Linear) and layer.takes_gemm(x):
            gemms.setdefault(layer.block_size, []).append(i)
        else:
            out[i] = layer.matmul(x)
    for bs, idx in gemms.items():
        q = quantize_activations(np.ascontiguousarray(x, np.float32), bs)
        for i, y in zip(idx, NF4Int8Linear.matmul_many([layers[i] for i in idx], x, q)):
            out[i] = y
    return out


def exact_linear(layer: Linear) -> Linear:
    """``layer`` with exact products: for an int8-path NF4 layer, an :class:`NF4Linear` over the
    same stored bytes, for an int8-path float16 head an :class:`F16Linear` (made once, kept on the
    layer; no copy); any other layer itself. Training (``runtime/backward.py``) differentiates
    these, the float32 products of the dequantized base that PEFT and QLoRA differentiate, whatever
    products the model generates with."""
    if not isinstance(layer, (NF4Int8Linear, F16Int8Linear)):
        return layer
    twin = layer.__dict__.get("_exact")
    if twin is None:
        twin = layer._exact = NF4Linear(layer.tensor) if isinstance(layer, NF4Int8Linear) else F16Linear(layer.weight)
    return twin


def make_linear(weight: NF4Tensor | np.ndarray, products: str = DEFAULT_PRODUCTS, head: bool = False,
                release=None, read_rows=None) -> Linear:
    """The linear-layer object for a weight as stored: an NF4 tensor (its decode products exact, or
    through int8 with ``products="int8"``), a float16 array (read in place; the output head, or an
    embedding tied to it, with ``head=True`` on the int8 path: quantized to int8 at load,
    :class:`~edgelora.runtime.int8.F16Int8Linear`, where its width is whole 64-entry blocks, given
    ``release`` to let the float16 rows' pages go once quantized and ``read_rows`` to look rows up
    without mapping them again), or anything else as float32. An NF4 weight on the int8 path that
    is repacked (``int8.TILED``) calls ``release()``, when given, once its stored bytes are read."""
    int8 = check_products(products) == "int8"
    if isinstance(weight, NF4Tensor):
        return NF4Int8Linear(weight, release=release) if int8 else NF4Linear(weight)
    if weight.dtype == np.float16:
        if int8 and head and weight.ndim == 2 and weight.shape[1] % Q8_BLOCK == 0:
            return F16Int8Linear(weight, release=release, read_rows=read_rows)
        return F16Linear(weight)
    return DenseLinear(weight)
