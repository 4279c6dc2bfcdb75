"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) written as the maths reads.

Follows Hugging Face transformers' ``modeling_llama.py`` (the reference the tests compare with)
and the shape of picoGPT's ``gpt2.py`` / llama2.c's ``forward``: small pure functions, a shape
comment on each line. Weights arrive as linear-layer objects (``runtime/linear.py``'s ``Linear``:
``NF4Linear``, ``F16Linear``, ``DenseLinear``): this module never asks whether a weight is
quantized. Every projection runs through the adapter :class:`~edgelora.runtime.lora.Selection`
of the generation, ``Selection.apply`` (the plain base is the selection ``BASE``), so the model
code is the same with adapters or without. Keys and values live in a cache preallocated for
``max_context`` positions.

Rotary embeddings as transformers computes them (``rope_theta``; ``llama3`` and ``linear``
scaling as in ``modeling_rope_utils.py``), rotate-half convention, grouped-query attention,
SwiGLU, optional q/k/v(/o) and MLP biases, Mistral's sliding window, tied or separate head.
A prefill chunk attends to the cache one block of keys at a time with an online softmax, as
FlashAttention tiles it (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness"; the division by the softmax's sum left to the end, as in
FlashAttention-2), so its working memory does not grow with the context; a decode step's single
query attends to the whole cache at once (``attention_reference``, also the NumPy twin).
The steps that differ between architectures are small methods of ``LlamaModel``: ``qkv`` and
``gated`` (Phi-3, ``runtime/phi3.py``, splits its fused projections' outputs there), ``norm``,
``embed``, ``layer``, ``window_of``, ``capped`` and the ``scale``/``attn_cap`` of attention (Gemma,
``runtime/gemma.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from edgelora import architectures
from edgelora.config import ModelArgs
from edgelora.products import EXACT_KV_CACHE, KV_CACHE_BYTES, check_kv_cache
from edgelora.runtime.kernels import _pool
from edgelora.runtime.threads import in_parallel
from edgelora.runtime.decode import (CompiledLayers, attend_row, attention_args, online_softmax_block, rmsnorm_rows,
                                      rope_rows, scale_rows, silu_mul_rows)
from edgelora.runtime.lora import BASE, Selection, apply_batch, apply_batch_group, widened


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
    """``w * x / rms(x)`` over the last axis; float32 rows [T, H] take ``decode.scale_rows`` for the
    last step (one pass, no temporaries), the bits of :func:`rmsnorm_reference`."""
    if not (x.ndim == 2 and x.dtype == w.dtype == np.float32 and w.shape == x.shape[1:]):
        return rmsnorm_reference(x, w, eps)
    var = (x * x).sum(axis=-1) / np.float32(x.shape[-1])  # [T]: np.mean's bits, faster
    root = np.sqrt(var + np.float32(eps))  # [T]
    return scale_rows(np.ascontiguousarray(x), root, w, np.empty(x.shape, np.float32))  # [T, H]


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # [T, 1]: np.mean's bits, faster
    return w * (x / np.sqrt(var + np.float32(eps)))  # [T, H]


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Per-pair rotation frequencies, with llama3/linear/longrope scaling as transformers applies it."""
    dim = args.rotary_dim  # head_dim, or the rotated part of it (partial_rotary_factor)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim  # [rd/2]
    inv = 1.0 / (args.rope_theta ** exponents)  # [rd/2]
    sc = args.rope_scaling or {}
    kind = args.rope_type
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
    elif kind == "longrope":
        # the short factors: transformers uses them while the sequence is within
        # original_max_position_embeddings (the runtime never goes beyond: see runtime/phi3.py)
        inv = 1.0 / (np.asarray(sc["short_factor"], np.float64) * args.rope_theta ** exponents)
    return inv.astype(np.float32)


def rope_attention_scaling(args: ModelArgs) -> float:
    """The factor transformers multiplies cos and sin by: 1, except longrope's attention factor."""
    if args.rope_type != "longrope":
        return 1.0
    sc = args.rope_scaling
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    orig = args.original_max_position_embeddings
    factor = sc.get("factor") or args.max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def rope_tables(inv_freq: np.ndarray, n_pos: int, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.outer(np.arange(n_pos, dtype=np.float32), inv_freq)  # [P, rd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [P, rd]
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    if scaling != 1.0:
        cos, sin = cos * np.float32(scaling), sin * np.float32(scaling)
    return cos, sin


HALF_SIGNS = np.array([[-1.0], [1.0]], np.float32)  # rotate_half([x1, x2]) = [-x2, x1] = [x2, x1] * [-1, 1]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` (x: [T, heads, hd]; cos, sin: [T, rd], rd <= hd rotated
    dimensions): float32 takes ``decode.rope_rows`` (one pass, no temporaries), the bits of
    :func:`rope_reference`."""
    if not (x.ndim == 3 and x.dtype == cos.dtype == sin.dtype == np.float32 and cos.shape == sin.shape
            and cos.shape[0] == x.shape[0] and cos.shape[-1] <= x.shape[-1]):
        return rope_reference(x, cos, sin)
    return rope_rows(np.ascontiguousarray(x), np.ascontiguousarray(cos), np.ascontiguousarray(sin),
                     np.empty(x.shape, np.float32))  # [T, heads, hd]


def rope_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`rope`: rotate_half's halves swapped by a view (no copy)."""
    T, heads, hd = x.shape  # x: [T, heads, hd]; cos, sin: [T, rd], rd <= hd rotated dimensions
    rd = cos.shape[-1]
    if rd < hd:  # partial rotary: the rest of each head passes through
        return np.concatenate([rope_reference(x[..., :rd], cos, sin), x[..., rd:]], axis=-1)  # [T, heads, hd]
    halves = x.reshape(T, heads, 2, rd // 2)  # [T, heads, (x1, x2), rd/2]
    c = cos.reshape(T, 1, 2, rd // 2)
    s = sin.reshape(T, 1, 2, rd // 2) * HALF_SIGNS  # [T, 1, (-sin, sin), rd/2]
    return (halves * c + halves[:, :, ::-1] * s).reshape(T, heads, hd)  # [T, heads, hd]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scaled(scores: np.ndarray, hd: int, scale: float | None, softcap: float | None) -> np.ndarray:
    """Raw q.k scores, in place: divided by sqrt(hd), or multiplied by ``scale`` when given; then
    ``softcap * tanh(scores / softcap)`` when soft-capped (Gemma 2)."""
    if scale is None:
        scores /= np.float32(math.sqrt(hd))
    else:
        scores *= np.float32(scale)
    if softcap is not None:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    return scores


def allowed_keys(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """[T, S] True where query position ``q_pos[t]`` may attend to key position ``k_pos[s]``:
    causal, and within the last ``window`` positions when there is a sliding window."""
    allowed = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                        window: int | None, scale: float | None = None, softcap: float | None = None) -> np.ndarray:
    """Causal grouped-query attention of T queries over S cached positions, the whole [T, S] score
    matrix of every head at once (the NumPy twin of :func:`attention_blockwise`; the decode step
    itself). Scores as :func:`scaled` makes them (soft-capped before the mask), masked as
    :func:`allowed_keys` says."""
    T, nh, hd = q.shape  # q: [T, nh, hd]; k, v: [S, nkv, hd] (float32, or float16 widened here)
    k, v = widened(k), widened(v)
    S, nkv, _ = k.shape
    group = nh // nkv
    qg = q.reshape(T, nkv, group, hd).transpose(1, 2, 0, 3)  # [nkv, g, T, hd]
    scores = scaled(np.matmul(qg, k.transpose(1, 2, 0)[:, None]), hd, scale, softcap)  # [nkv, g, T, S]
    allowed = allowed_keys(q_pos, np.arange(S), window)  # [T, S]
    if not allowed.all():  # (np.where of an all-True mask would copy the scores unchanged)
        scores = np.where(allowed, scores, np.float32(-np.inf))
    out = np.matmul(softmax(scores), v.transpose(1, 0, 2)[:, None])  # [nkv, g, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, nh * hd)  # [T, nh*hd]


#: keys per block of the blockwise attention: its working memory is [nh, T, KEY_BLOCK] scores
KEY_BLOCK = 128
#: queries per block of a long chunk's attention: each block stops at the last key it may see, so
#: a causal prompt computes about half the scores of all queries against all keys (a TinyLlama
#: layer's attention over 512 tokens on 2 threads: 82 -> 45 ms)
QUERY_BLOCK = 128


#: a prompt chunk attends on several threads (its key-value heads split between them) from this
#: many queries x keys
ATTENTION_PARALLEL_MIN = 4096


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              window: int | None, scale: float | None = None, softcap: float | None = None,
              threads: int = 1) -> np.ndarray:
    """Causal grouped-query attention of T queries over S cached positions (see
    :func:`attention_reference` for the scores' scale, soft-cap and mask): a prefill chunk block by
    block, a single query (decode) whole, its [nh, S] scores being no bigger than the cache. With
    ``threads`` > 1 a long chunk's key-value heads are split between that many threads (NumPy and
    BLAS release the GIL); each head's result is the same computed with the others or alone."""
    T, nh, hd = q.shape  # q: [T, nh, hd]; k, v: [S, nkv, hd]
    if T == 1:
        return attention_reference(q, k, v, q_pos, window, scale, softcap)  # [1, nh*hd]
    nkv = k.shape[1]
    parts = min(threads, nkv)
    if parts <= 1 or T * k.shape[0] < ATTENTION_PARALLEL_MIN:
        return _query_blocks(q, k, v, q_pos, window, scale, softcap)  # [T, nh*hd]
    group = nh // nkv
    bounds = [nkv * i // parts for i in range(parts + 1)]  # key-value heads [g0, g1) of each thread
    out = np.empty((T, nh, hd), np.float32)

    def work(i: int) -> None:
        g0, g1 = bounds[i], bounds[i + 1]
        heads = slice(g0 * group, g1 * group)
        out[:, heads] = _query_blocks(q[:, heads], k[:, g0:g1], v[:, g0:g1], q_pos, window, scale,
                                      softcap).reshape(T, -1, hd)

    in_parallel(_pool(parts), work, range(parts))
    return out.reshape(T, nh * hd)  # [T, nh*hd]


def _query_blocks(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, window: int | None,
                  scale: float | None, softcap: float | None) -> np.ndarray:
    """:func:`attention_blockwise` of :data:`QUERY_BLOCK` queries at a time, each block over the keys
    it may see (a key block every query of it is masked from adds exactly nothing to a row: the
    same bits) -> [T, nh*hd]."""
    T = q.shape[0]
    if T <= QUERY_BLOCK:
        return attention_blockwise(q, k, v, q_pos, window, scale, softcap, KEY_BLOCK)
    return np.concatenate([attention_blockwise(q[t0:t0 + QUERY_BLOCK], k, v, q_pos[t0:t0 + QUERY_BLOCK], window,
                                               scale, softcap, KEY_BLOCK) for t0 in range(0, T, QUERY_BLOCK)])


def attention_blockwise(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                        window: int | None, scale: float | None = None, softcap: float | None = None,
                        block: int = KEY_BLOCK) -> np.ndarray:
    """:func:`attention_reference` one block of ``block`` keys at a time, with an online softmax
    (FlashAttention, Dao et al. 2022): each query row keeps its running maximum ``m``, the sum
    ``l`` of ``exp(score - m)`` and the sum ``acc`` of values weighted by them; a block that raises
    the maximum rescales both by ``exp(m_old - m_new)``, and the output is ``acc / l``. Working
    memory is O(nh x T x block) whatever S is. Blocks no query may see (beyond the last query's
    position, before the first query's window) are skipped. A block's scores come from BLAS; their
    scaling, mask and softmax update run in one compiled call (``decode.online_softmax_block``:
    a TinyLlama layer's attention over 512 tokens, 15.8 -> 10.3 ms a thread)."""
    T, nh, hd = q.shape  # q: [T, nh, hd]; k, v: [S, nkv, hd] (float32, or float16: widened a block at once)
    S, nkv, _ = k.shape
    group = nh // nkv
    # a key-value head's queries, every head of its group, as the rows of one matrix: one product
    # a key-value head and block (its rows' bits those of a product a head; TinyLlama's attention
    # over 512 tokens 1.06x faster than 32 products of 128 rows)
    qg = np.ascontiguousarray(q.reshape(T, nkv, group, hd).transpose(1, 2, 0, 3)).reshape(nkv, group * T, hd)
    kt = k.transpose(1, 2, 0)  # [nkv, hd, S]
    vt = v.transpose(1, 0, 2)  # [nkv, S, hd]
    first, last = int(q_pos.min()), int(q_pos.max())
    lo = 0 if window is None else max(0, first - window + 1)  # the first key any query sees
    hi = min(S, last + 1)  # one past the last key any query sees
    rows = nkv * group * T
    m = np.full(rows, -np.inf, np.float32)  # running maximum of each row's scores
    l = np.zeros(rows, np.float32)  # running sum of exp(score - m)
    r = np.empty(rows, np.float32)  # exp(m_old - m_new) of the block
    acc = np.zeros((nkv, group * T, hd), np.float32)  # running sum of exp(score - m) v
    divide, by = (True, np.float32(math.sqrt(hd))) if scale is None else (False, np.float32(scale))
    cap, pos = np.float32(softcap or 0.0), np.ascontiguousarray(q_pos, np.int64)
    for s0 in range(lo, hi, block):
        s1 = min(hi, s0 + block)
        s = np.matmul(qg, widened(kt[..., s0:s1]))  # [nkv, g*T, b]: raw scores
        # scaled, soft-capped, masked, m and l updated; s -> p = exp(score - m_new) in place
        online_softmax_block(s.reshape(rows, s1 - s0), pos, s0, window or 0, divide, by, cap, m, l, r)
        acc *= r.reshape(nkv, group * T, 1)  # exp(m_old - m_new), 0 while m_old = -inf
        acc += np.matmul(s, widened(vt[:, s0:s1]))  # [nkv, g*T, hd]
    acc /= l.reshape(nkv, group * T, 1)  # every query sees at least its own position: l > 0
    return acc.reshape(nkv, group, T, hd).transpose(2, 0, 1, 3).reshape(T, nh * hd)  # [T, nh*hd]


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives x / inf = -0, the right limit
        return x / (np.float32(1.0) + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

#: the KV cache's element type of each ``kv_cache`` choice (``edgelora.products.KV_CACHES``)
KV_DTYPES = {"float32": np.float32, "float16": np.float16}


class KVCache:
    """Keys and values for ``max_context`` positions of every layer, allocated once: ``k``, ``v``
    [layers, kv heads, positions, head dim], a key-value head's positions contiguous (a decode
    step reads each head's keys as one run, not 256 bytes of every position's 1 KB), in float32 or
    float16 (``kv_cache``, ``edgelora.products.KV_CACHES``). The attention functions take a layer
    as float32 [positions, kv heads, head dim] (:meth:`layer`)."""

    def __init__(self, args: ModelArgs, max_context: int, kv_cache: str = EXACT_KV_CACHE):
        shape = (args.num_hidden_layers, args.num_key_value_heads, max_context, args.head_dim)
        self.k = np.zeros(shape, KV_DTYPES[check_kv_cache(kv_cache)])
        self.v = np.zeros(shape, KV_DTYPES[kv_cache])
        self.max_context = max_context
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def planned_bytes(args: ModelArgs, max_context: int, kv_cache: str = EXACT_KV_CACHE) -> int:
        """What a cache of ``max_context`` positions takes (the memory planner's item)."""
        size = KV_CACHE_BYTES[check_kv_cache(kv_cache)]
        return 2 * args.num_hidden_layers * max_context * args.num_key_value_heads * args.head_dim * size

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """k, v as the compiled decode step takes them: float32, or a float16 cache's bits (uint16)."""
        if self.k.dtype == np.float16:
            return self.k.view(np.uint16), self.v.view(np.uint16)
        return self.k, self.v

    def layer(self, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s keys and values of positions ``0 .. n - 1``, views [n, kv heads, head dim]
        (float16 ones of a float16 cache: the attention functions widen what they read, a block at
        a time, ``lora.widened``)."""
        return self.k[i, :, :n].transpose(1, 0, 2), self.v[i, :, :n].transpose(1, 0, 2)

    def store(self, i: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Layer ``i``'s keys and values k, v float32 [T, kv heads, head dim] at positions ``start ..``
        (rounded to nearest even in a float16 cache, as a decode step stores them)."""
        T = k.shape[0]
        self.k[i, :, start:start + T] = k.transpose(1, 0, 2)
        self.v[i, :, start:start + T] = v.transpose(1, 0, 2)

    def prefix(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of every layer's keys and values of positions ``0 .. n - 1``."""
        return self.k[:, :, :n].copy(), self.v[:, :, :n].copy()

    def load_prefix(self, k: np.ndarray, v: np.ndarray, n: int) -> None:
        """Positions ``0 .. n - 1`` from :meth:`prefix` copies (their first n positions); length n."""
        self.k[:, :, :n] = k[:, :, :n]
        self.v[:, :, :n] = v[:, :, :n]
        self.length = n

    def reset(self) -> None:
        self.length = 0


class LlamaModel:
    #: the family's names (``edgelora/architectures.py``): its ``PROJECTIONS`` and ``NORMS`` are the
    #: fields of ``Layer``, mapped to the module names Hugging Face/PEFT spell (the keys adapters use)
    arch = architectures.Llama
    Layer = Layer
    scale = None  # attention scores times this (None: divided by sqrt(head_dim))
    attn_cap = None  # soft-cap of the attention scores (None: none)
    #: decode rows run ``runtime/decode.py``'s compiled pieces (:meth:`decode_layer`); a family whose
    #: layer differs from this one (its norms, projections or activation) sets False and decodes
    #: through :meth:`layer` as its prompts do
    compiled_decode = True

    def __init__(self, args: ModelArgs, weights: Weights, max_context: int):
        self.args = args
        self.w = weights
        self.max_context = max_context
        self.cos, self.sin = rope_tables(rope_inv_freq(args), max_context, rope_attention_scaling(args))
        self.window = args.sliding_window if args.model_type == "mistral" else None
        # module names as Hugging Face/PEFT spell them: the keys adapters are looked up by
        self.names = [{k: self.arch.module(i, k) for k in self.arch.PROJECTIONS} for i in range(args.num_hidden_layers)]
        self._modules = {n: (i, k) for i, d in enumerate(self.names) for k, n in d.items()}

    @staticmethod
    def context_limit(args: ModelArgs) -> int:
        """The longest ``max_context`` this runtime runs the model at exactly as transformers does."""
        return args.max_position_embeddings

    def module(self, name: str):
        """The linear-layer object of a module name (``lm_head``, ``model.layers.0.mlp.up_proj``)."""
        if name == "lm_head":
            return self.w.head
        i, k = self._modules[name]
        return getattr(self.w.layers[i], k)

    def base_bias(self, name: str) -> np.ndarray | None:
        i, k = self._modules[name]
        return self.w.layers[i].biases.get(k)

    #: what the caches :meth:`new_cache` makes hold (``edgelora.products.KV_CACHES``; ``build_model`` sets it)
    kv_cache = EXACT_KV_CACHE

    def new_cache(self) -> KVCache:
        return KVCache(self.args, self.max_context, self.kv_cache)

    # the parts of a layer that differ between architectures: ``proj(k, h)`` is projection ``k``
    # of this layer applied to ``h`` (with the adapters' deltas)

    def qkv(self, proj, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, T = self.args, h.shape[0]
        q, k, v = proj(("q", "k", "v"), h)  # one group: they read the same h
        q = q.reshape(T, a.num_attention_heads, a.head_dim)  # [T, nh, hd]
        k = k.reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        v = v.reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        return q, k, v

    def gated(self, proj, h: np.ndarray) -> np.ndarray:
        gate, up = proj(("gate", "up"), h)
        return silu_mul_rows(gate, up)  # [T, I]

    def norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return rmsnorm(x, w, self.args.rms_norm_eps)  # [T, H]

    def embed(self, tokens: np.ndarray, lora: Selection) -> np.ndarray:
        """The tokens' embeddings (an adapter's saved embedding when it has one)."""
        return lora.embed(self.w.embed, tokens)  # [T, H]

    def window_of(self, i: int) -> int | None:
        """Layer ``i``'s sliding window (None: it attends to every earlier position)."""
        return self.window

    def capped(self, logits: np.ndarray) -> np.ndarray:
        """The logits as the model returns them (Gemma 2 soft-caps them)."""
        return logits

    def layer(self, L, x: np.ndarray, proj, attend) -> np.ndarray:
        """One decoder layer on rows ``x`` [T, H]; ``attend(q, k, v)`` -> [T, nh*hd] runs the attention."""
        h = self.norm(x, L.attn_norm)  # [T, H]
        x = x + proj("o", attend(*self.qkv(proj, h)))  # [T, H]
        h = self.norm(x, L.mlp_norm)  # [T, H]
        return x + proj("down", self.gated(proj, h))  # [T, H]

    def block(self, i: int, x: np.ndarray, cache: KVCache, start: int, lora: Selection = BASE) -> np.ndarray:
        L, n = self.w.layers[i], self.names[i]

        def proj(k, inp):  # the projection k of this layer (a tuple: a group reading inp), with the adapters' deltas
            if isinstance(k, tuple):
                return lora.apply_group([n[j] for j in k], [getattr(L, j) for j in k], inp, [L.biases.get(j) for j in k])
            return lora.apply(n[k], getattr(L, k), inp, L.biases.get(k))

        return self.layer(L, x, proj, lambda q, k, v: self.attend(i, q, k, v, cache, start))  # [T, H]

    def attend(self, i: int, q, k, v, cache: KVCache, start: int) -> np.ndarray:
        """Store this step's keys and values in the cache; attend over everything cached so far."""
        T = q.shape[0]
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # [T, rd]
        cache.store(i, start, rope(k, cos, sin), v)
        keys, values = cache.layer(i, start + T)
        q = rope(q, cos, sin)
        return attention(q, keys, values, np.arange(start, start + T),
                         self.window_of(i), self.scale, self.attn_cap, numba.get_num_threads())  # [T, nh*hd]

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False,
                lora: Selection = BASE) -> np.ndarray:
        """Run ``tokens`` after the cache's contents; logits of the last (or every) position.
        ``lora``: the adapter :class:`~edgelora.runtime.lora.Selection` to run with."""
        start = cache.length
        if len(tokens) == 1 and self.compiled_decode:  # a decode step: the compiled pieces
            out = self.decode_rows(tokens, [cache], [start], [lora])  # [1, V]
            cache.length = start + 1
            return out
        x = self.embed(tokens, lora)  # [T, H]
        for i in range(self.args.num_hidden_layers):
            x = self.block(i, x, cache, start, lora)
        cache.length = start + len(tokens)
        x = self.norm(x if all_logits else x[-1:], self.w.norm)  # [T or 1, H]
        return self.capped(lora.apply("lm_head", self.w.head, x))  # [T or 1, V]

    def forward_batch(self, tokens: np.ndarray, caches: list, loras: list) -> np.ndarray:
        """One decode step for B sequences, each with its own cache and adapter selection: every
        base product is computed once for the batch. Row b equals ``forward(tokens[b:b+1],
        caches[b], lora=loras[b])`` bit for bit."""
        out = self.decode_rows(tokens, caches, [c.length for c in caches], loras)  # [B, V]
        for c in caches:
            c.length += 1
        return out

    def forward_steps(self, tokens: np.ndarray, cache: KVCache, lora: Selection = BASE) -> np.ndarray:
        """T tokens of one sequence after the cache's contents, each row computed as its own decode
        step (``forward`` of that one token after the ones before it) would, bit for bit: the rows
        of a speculative step's verification (``runtime/speculative.py``), whose greedy tokens must
        be those of decoding one token at a time. The base products are read once for the T rows
        (``matvec_batch``); each row attends to the cache up to its own position
        (``attention_reference``, as a decode step). Logits of every position [T, V]."""
        start = cache.length
        T = len(tokens)
        out = self.decode_rows(tokens, [cache] * T, list(range(start, start + T)), [lora] * T)  # [T, V]
        cache.length = start + T
        return out

    def decode_rows(self, tokens: np.ndarray, caches: list, starts: list, loras: list) -> np.ndarray:
        """Rows of decode steps: token b at position ``starts[b]`` of ``caches[b]`` with selection
        ``loras[b]``, each row exactly its one-row ``forward``. Rows sharing a cache are run in
        order, each seeing the keys the rows before it stored. Lengths are the caller's to set.

        With ``compiled_decode``, each layer is :meth:`decode_layer`; when every row runs one
        selection (the base, or LoRA adapters: not DoRA, no replaced projection) on one cache and
        the model's projections are int8-path NF4 weights, all layers are one compiled call
        (``runtime/decode.py``'s ``decode_layers``: the same pieces, products and adapter kernels
        in the same order, so the same bits)."""
        if any(not 0 <= s < c.max_context for c, s in zip(caches, starts)):  # (compiled code checks no bounds)
            raise ValueError(f"decode positions {list(starts)} outside the cache of {caches[0].max_context} positions")
        x = np.concatenate([self.embed(tokens[b:b + 1], lo) for b, lo in enumerate(loras)])  # [B, H]
        if not self.compiled_decode:
            return self._decode_rows_layers(x, caches, starts, loras)
        layers = self.compiled_layers
        ops = None
        if layers is not None and all(lo is loras[0] for lo in loras) and all(c is caches[0] for c in caches):
            ops = layers.ops(loras[0])  # None: an adapter the one-call step does not run (DoRA, replaced modules)
        if ops is not None:
            x = layers.run(x, np.asarray(starts, np.int64), caches[0], self.cos, self.sin, ops)  # [B, H]
        else:
            for i in range(self.args.num_hidden_layers):
                x = self.decode_layer(i, x, self._batch_proj(i, loras), caches, starts)  # [B, H]
        x = rmsnorm_rows(x, self.w.norm, np.float32(self.args.rms_norm_eps), np.empty_like(x))  # [B, H]
        return self.capped(apply_batch(loras, "lm_head", self.w.head, x))  # [B, V]

    @property
    def compiled_layers(self) -> CompiledLayers | None:
        """What the one-call decode step reads (``runtime/decode.py``), gathered on first use; None
        when the weights are not all int8-path NF4."""
        if "_compiled_layers" not in self.__dict__:
            self._compiled_layers = CompiledLayers.of(self)
        return self._compiled_layers

    def _batch_proj(self, i: int, loras: list):
        L, n = self.w.layers[i], self.names[i]

        def proj(k, inp):  # the base product once for the batch, each row its own adapters
            if isinstance(k, tuple):
                return apply_batch_group(loras, [n[j] for j in k], [getattr(L, j) for j in k], inp,
                                         [L.biases.get(j) for j in k])
            return apply_batch(loras, n[k], getattr(L, k), inp, L.biases.get(k))

        return proj

    def decode_layer(self, i: int, x: np.ndarray, proj, caches: list, starts: list) -> np.ndarray:
        """Layer ``i`` on decode rows x [B, H] (row b at position ``starts[b]`` of ``caches[b]``):
        :meth:`layer`'s maths with ``runtime/decode.py``'s compiled norm, attention and activation."""
        a, L = self.args, self.w.layers[i]
        nh, nkv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        eps = np.float32(a.rms_norm_eps)
        h = rmsnorm_rows(x, L.attn_norm, eps, np.empty_like(x))  # [B, H]
        q, k, v = (np.ascontiguousarray(y) for y in proj(("q", "k", "v"), h))  # [B, nh*hd], [B, nkv*hd] x 2
        att = np.empty((x.shape[0], nh * hd), np.float32)  # [B, nh*hd]
        window, scale, divide, cap = attention_args(self, i)
        threads = numba.get_num_threads()
        for b, (c, s) in enumerate(zip(caches, starts)):  # in order: a row sees the keys stored before it
            K, V = c.kernel_arrays()
            attend_row(q[b].reshape(nh, hd), k[b].reshape(nkv, hd), v[b].reshape(nkv, hd), K[i], V[i], s,
                       self.cos[s], self.sin[s], a.rotary_dim, window, scale, divide, cap, threads, att[b])
        x = x + proj("o", att)  # [B, H]
        h = rmsnorm_rows(x, L.mlp_norm, eps, np.empty_like(x))  # [B, H]
        gate, up = proj(("gate", "up"), h)  # [B, I] x 2
        return x + proj("down", silu_mul_rows(gate, up))  # [B, H]

    def _decode_rows_layers(self, x: np.ndarray, caches: list, starts: list, loras: list) -> np.ndarray:
        """:meth:`decode_rows` through :meth:`layer` (families without ``compiled_decode``)."""
        for i in range(self.args.num_hidden_layers):
            L = self.w.layers[i]

            def attend(q, k, v):  # q: [B, nh, hd]; k, v: [B, nkv, hd]; each row at its own position
                return np.concatenate([self.attend(i, q[b:b + 1], k[b:b + 1], v[b:b + 1], c, s)
                                       for b, (c, s) in enumerate(zip(caches, starts))])  # [B, nh*hd]

            x = self.layer(L, x, self._batch_proj(i, loras), attend)  # [B, H]
        x = self.norm(x, self.w.norm)  # [B, H]
        return self.capped(apply_batch(loras, "lm_head", self.w.head, x))  # [B, V]
