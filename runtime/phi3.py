"""Phi-3 (transformers' ``modeling_phi3.py``): the Llama decoder with fused projections.

Phi-3 stores q, k and v as one ``qkv_proj`` [(nh + 2 nkv) hd, H] and gate and up as one
``gate_up_proj`` [2 I, H] (gate first). They stay fused here, as in the checkpoint: each is one
NF4 tensor exactly as bitsandbytes quantizes it for a QLoRA base (one double-quant offset for
the whole fused weight), and PEFT's Phi-3 adapters target the fused modules, their ``lora_B`` rows
spanning the fused output. So a layer computes the fused product once (base plus adapter deltas,
through the same ``Selection.apply`` as Llama) and splits its output, as transformers'
``Phi3Attention``/``Phi3MLP`` do. Everything else is ``LlamaModel``'s: RMSNorm, rotary embeddings
(also over part of the head, ``partial_rotary_factor``), grouped-query attention with the
optional ``sliding_window``, tied or separate head.

``longrope`` (Phi-3-mini-128k, Phi-3.5, Phi-4-mini): transformers rotates with the short factors
while the sequence is at most ``original_max_position_embeddings`` long and with the long factors
beyond, recomputing the whole sequence (cache dropped) when it crosses over. A KV cache of at
most that many positions therefore always runs exactly transformers' short-factor model (with
its attention factor on cos and sin); a longer ``max_context`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgelora import architectures
from edgelora.config import ModelArgs
from edgelora.errors import UnsupportedError
from edgelora.runtime.llama import LlamaModel, Weights, silu


@dataclass
class Phi3Layer:
    attn_norm: np.ndarray  # [H]
    qkv: object  # linear [(nh + 2 nkv) hd, H]: rows q, then k, then v
    o: object  # linear [H, nh*hd]
    mlp_norm: np.ndarray  # [H]
    gate_up: object  # linear [2 I, H]: rows gate, then up
    down: object  # linear [H, I]
    biases: dict = field(default_factory=dict)  # Phi-3 has none


class Phi3Model(LlamaModel):
    arch = architectures.Phi3
    Layer = Phi3Layer
    compiled_decode = False  # fused projections: decodes through its own qkv and gated

    @staticmethod
    def context_limit(args: ModelArgs) -> int:
        if args.rope_type == "longrope":  # the short factors' range (see the module's docstring)
            return min(args.max_position_embeddings, args.original_max_position_embeddings)
        return args.max_position_embeddings

    def __init__(self, args: ModelArgs, weights: Weights, max_context: int):
        if args.rope_type == "longrope" and max_context > self.context_limit(args):
            n = args.original_max_position_embeddings
            raise UnsupportedError(
                f"max_context={max_context}: this model's longrope scaling switches to its long factors for "
                f"sequences longer than original_max_position_embeddings={n}, where transformers recomputes the "
                f"whole sequence; edgelora's KV cache does not, so it runs longrope models up to {n} positions. "
                f"Pass max_context <= {n}")
        super().__init__(args, weights, max_context)
        self.window = args.sliding_window  # transformers' Phi-3 masks with it whenever it is set

    def qkv(self, proj, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, T = self.args, h.shape[0]
        q_dim, kv_dim = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        fused = proj("qkv", h)  # [T, q_dim + 2 kv_dim]
        q = fused[:, :q_dim].reshape(T, a.num_attention_heads, a.head_dim)  # [T, nh, hd]
        k = fused[:, q_dim:q_dim + kv_dim].reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        v = fused[:, q_dim + kv_dim:].reshape(T, a.num_key_value_heads, a.head_dim)  # [T, nkv, hd]
        return q, k, v

    def gated(self, proj, h: np.ndarray) -> np.ndarray:
        I = self.args.intermediate_size
        fused = proj("gate_up", h)  # [T, 2 I]
        return fused[:, I:] * silu(fused[:, :I])  # up * silu(gate): [T, I]
