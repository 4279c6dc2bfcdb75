"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) written as the maths reads.

Follows Hugging Face transformers' ``modeling_llama.py`` (the reference the tests compare with)
and the shape of picoGPT's ``gpt2.py`` / llama2.c's ``forward``: small pure functions, a shape
comment on each line. Weights arrive as linear-layer objects with ``matvec``/``matmul``/``rows``
(``NF4Linear``, ``F16Linear``, ``DenseLinear``): this module never asks whether a weight is
quantized. Keys and values live in a cache preallocated for ``max_context`` positions.

Rotary embeddings as transformers computes them (``rope_theta``; ``llama3`` and ``linear``
scaling as in ``modeling_rope_utils.py``), rotate-half convention, grouped-query attention,
SwiGLU, optional q/k/v(/o) and MLP biases, Mistral's sliding window, tied or separate head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelora.config import ModelArgs


class DenseLinear:
    """A float32 weight ``[out, in]`` with the linear-layer interface (small tensors, tests)."""

    def __init__(self, w: np.ndarray):
        self.weight = np.ascontiguousarray(w, np.float32)
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def matvec(self, x, out=None):
        return np.dot(self.weight, x, out=out)

    def matmul(self, x):
        return x @ self.weight.T

    def rows(self, ids):
        return self.weight[np.asarray(ids, np.int64)]


@dataclass
class Layer:
    attn_norm: np.ndarray  # [H]
    q: object  # linear [nh*hd, H]
    k: object  # linear [nkv*hd, H]
    v: object  # linear [nkv*hd, H]
    o: object  # linear [H, nh*hd]
    mlp_norm: np.ndarray  # [H]
    gate: object  # linear [I, H]
    up: object  # linear [I, H]
    down: object  # linear [H, I]
    biases: dict  # optional: "q", "k", "v", "o", "gate", "up", "down" -> [out]


@dataclass
class Weights:
    embed: object  # linear [V, H] (rows() for lookup)
    layers: list
    norm: np.ndarray  # [H]
    head: object  # linear [V, H] (the embedding when tied)


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)  # [T, 1]
    return w * (x / np.sqrt(var + np.float32(eps)))  # [T, H]


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Per-pair rotation frequencies, with llama3/linear scaling as transformers applies it."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [hd/2]
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(inv_freq: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.outer(np.arange(n_pos, dtype=np.float32), inv_freq)  # [P, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [P, hd]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2  # x: [T, heads, hd]; cos, sin: [T, hd]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
    return x * cos[:, None, :] + rotated * sin[:, None, :]  # [T, heads, hd]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              window: int | None) -> np.ndarray:
    """Causal grouped-query attention of T queries over S cached positions."""
    T, nh, hd = q.shape  # q: [T, nh, hd]; k, v: [S, nkv, hd]
    S, nkv, _ = k.shape
    group = nh // nkv
    qg = q.reshape(T, nkv, group, hd).transpose(1, 2, 0, 3)  # [nkv, g, T, hd]
    scores = np.matmul(qg, k.transpose(1, 2, 0)[:, None]) / np.float32(math.sqrt(hd))  # [nkv, g, T, S]
    k_pos = np.arange(S)
    allowed = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    scores = np.where(allowed, scores, np.float32(-np.inf))
    out = np.matmul(softmax(scores), v.transpose(1, 0, 2)[:, None])  # [nkv, g, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, nh * hd)  # [T, nh*hd]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def linear(layer, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    y = layer.matvec(x[0])[None, :] if x.shape[0] == 1 else layer.matmul(x)  # [T, out]
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values for ``max_context`` positions of every layer, allocated once."""

    def __init__(self, args: ModelArgs, max_context: int):
        shape = (args.num_hidden_layers, max_context, args.num_key_value_heads, args.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.max_context = max_context
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.length = 0


class LlamaModel:
    def __init__(self, args: ModelArgs, weights: Weights, max_context: int):
        self.args = args
        self.w = weights
        self.max_context = max_context
        self.cos, self.sin = rope_tables(rope_inv_freq(args), max_context)
        self.window = args.sliding_window if args.model_type == "mistral" else None

    def new_cache(self) -> KVCache:
        return KVCache(self.args, self.max_context)

    def block(self, i: int, x: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        a, L = self.args, self.w.layers[i]
        T = x.shape[0]
        b = L.biases
        h = rmsnorm(x, L.attn_norm, a.rms_norm_eps)  # [T, H]
        q = linear(L.q, h, b.get("q")).reshape(T, a.num_attention_heads, a.head_dim)  # [T, nh, hd]
        k = linear(L.k, h, b.get("k")).reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        v = linear(L.v, h, b.get("v")).reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # [T, hd]
        cache.k[i, start:start + T] = rope(k, cos, sin)
        cache.v[i, start:start + T] = v
        q = rope(q, cos, sin)
        ctx = attention(q, cache.k[i, :start + T], cache.v[i, :start + T],
                        np.arange(start, start + T), self.window)  # [T, nh*hd]
        x = x + linear(L.o, ctx, b.get("o"))  # [T, H]
        h = rmsnorm(x, L.mlp_norm, a.rms_norm_eps)  # [T, H]
        g = silu(linear(L.gate, h, b.get("gate"))) * linear(L.up, h, b.get("up"))  # [T, I]
        return x + linear(L.down, g, b.get("down"))  # [T, H]

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` after the cache's contents; logits of the last (or every) position."""
        start = cache.length
        x = self.w.embed.rows(tokens).astype(np.float32)  # [T, H]
        for i in range(self.args.num_hidden_layers):
            x = self.block(i, x, cache, start)
        cache.length = start + len(tokens)
        x = rmsnorm(x if all_logits else x[-1:], self.w.norm, self.args.rms_norm_eps)  # [T or 1, H]
        return linear(self.w.head, x)  # [T or 1, V]
