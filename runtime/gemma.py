"""Gemma and Gemma 2 (transformers' ``modeling_gemma.py``, ``modeling_gemma2.py``): the Llama decoder
with a different norm, activation, embedding scale and, for Gemma 2, soft-capping and local layers.

What differs from ``LlamaModel`` (everything else is its: rotary embeddings, grouped-query
attention over the KV cache, the projections and their adapters, tied head):

* **RMSNorm multiplies by (1 + weight)** (``GemmaRMSNorm``): the checkpoint's weight is stored
  as it is and the 1 is added here, in float32 as transformers does;
* **MLP** ``down(gelu_tanh(gate(x)) * up(x))``: the tanh approximation of GELU
  (``gelu_pytorch_tanh``);
* **embeddings times sqrt(hidden_size)**, the normalizer in the hidden states' dtype (float32
  here), also applied to an adapter's saved embedding (PEFT saves the scaled module whole);
* Gemma 2 only: **four norms per layer** (``Gemma2Layer``): ``post_attention_layernorm`` on the
  attention output and ``post_feedforward_layernorm`` on the MLP output, each before its residual
  add, ``pre_feedforward_layernorm`` on the MLP input; attention scores scaled by
  ``query_pre_attn_scalar ** -0.5`` (not head_dim's) and soft-capped,
  ``cap * tanh(scores / cap)`` with ``attn_logit_softcapping``, before the mask; a sliding window
  on the layers ``layer_types`` marks ``sliding_attention``; the logits soft-capped with
  ``final_logit_softcapping`` (after the head and its adapters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgelora import architectures
from edgelora.config import ModelArgs
from edgelora.runtime.llama import LlamaModel, Weights, rmsnorm


def gemma_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return rmsnorm(x, np.float32(1.0) + w, eps)  # [T, H]: x / rms(x) * (1 + w)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (torch's ``gelu(approximate="tanh")``)."""
    with np.errstate(over="ignore"):  # x**3 = +-inf for huge |x|: tanh saturates to the right limit
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)  # [T, I]
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))  # [T, I]


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    return x if cap is None else np.tanh(x / np.float32(cap)) * np.float32(cap)


@dataclass
class Gemma2Layer:
    attn_norm: np.ndarray  # [H] input_layernorm
    q: object  # linear [nh*hd, H]
    k: object  # linear [nkv*hd, H]
    v: object  # linear [nkv*hd, H]
    o: object  # linear [H, nh*hd]
    post_attn_norm: np.ndarray  # [H] post_attention_layernorm: on the attention output
    mlp_norm: np.ndarray  # [H] pre_feedforward_layernorm
    gate: object  # linear [I, H]
    up: object  # linear [I, H]
    down: object  # linear [H, I]
    post_mlp_norm: np.ndarray  # [H] post_feedforward_layernorm: on the MLP output
    biases: dict = field(default_factory=dict)  # optional: "q", "k", "v", "o" -> [out]


class GemmaModel(LlamaModel):
    arch = architectures.Gemma
    compiled_decode = False  # its norm (1 + w), GELU and embedding scale: decodes through its own layer

    def __init__(self, args: ModelArgs, weights: Weights, max_context: int):
        super().__init__(args, weights, max_context)
        self.normalizer = np.float32(math.sqrt(args.hidden_size))
        self.scale = args.head_dim ** -0.5  # attention scores times this, as transformers' Gemma

    def norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return gemma_rmsnorm(x, w, self.args.rms_norm_eps)  # [T, H]

    def gated(self, proj, h: np.ndarray) -> np.ndarray:
        gate, up = proj(("gate", "up"), h)  # one group: they read the same h
        return gelu_tanh(gate) * up  # [T, I]

    def embed(self, tokens: np.ndarray, lora) -> np.ndarray:
        return super().embed(tokens, lora) * self.normalizer  # [T, H]


class Gemma2Model(GemmaModel):
    arch = architectures.Gemma2
    Layer = Gemma2Layer

    def __init__(self, args: ModelArgs, weights: Weights, max_context: int):
        super().__init__(args, weights, max_context)
        self.scale = args.query_pre_attn_scalar ** -0.5
        self.attn_cap = args.attn_logit_softcapping
        self.final_cap = args.final_logit_softcapping
        self.windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]

    def window_of(self, i: int) -> int | None:
        return self.windows[i]

    def capped(self, logits: np.ndarray) -> np.ndarray:
        return softcap(logits, self.final_cap)  # [T, V]

    def layer(self, L, x: np.ndarray, proj, attend) -> np.ndarray:
        h = self.norm(x, L.attn_norm)  # [T, H]
        x = x + self.norm(proj("o", attend(*self.qkv(proj, h))), L.post_attn_norm)  # [T, H]
        h = self.norm(x, L.mlp_norm)  # [T, H]
        return x + self.norm(proj("down", self.gated(proj, h)), L.post_mlp_norm)  # [T, H]
