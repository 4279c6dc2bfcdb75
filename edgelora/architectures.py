"""What each architecture family's checkpoint holds, in one place per family: the tensors' names,
the shapes the config gives them and their roles, the projections (the NF4 linears) and the norms.

A family is a small declarative class, as mlx-lm's ``models/llama.py`` owns its model's names:
``PROJECTIONS`` and ``NORMS`` map a decoder layer's fields (the runtime's ``Layer`` fields, the
short names adapters are applied by) to the module names Hugging Face and PEFT spell
(``mlp.up_proj``, ``input_layernorm``); ``projection_shapes`` gives each projection's
``(out, in)`` from the config, ``biased`` the projections that carry a bias. From these,
``tensor_map`` lists every tensor a checkpoint of that config must hold, by name (in the manner of
llama.cpp's ``TensorNameMap`` and gpt-fast's ``weight_map``, which fail loudly rather than guess).
The readers (``converters/``), the bundle, the adapters and the planner ask this module; the
runtime's model classes name their family (``LlamaModel.arch``). It imports no runtime code.

Roles decide what the converter does with a tensor: ``linear`` goes to NF4, ``embedding`` and
``head`` follow the user's choice (float16 or NF4), ``norm`` and ``bias`` stay float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgelora.config import ModelArgs

#: the modules outside the decoder layers, as Hugging Face names them
EMBED, NORM, HEAD = "model.embed_tokens", "model.norm", "lm_head"
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_prefix(i: int) -> str:
    """Where layer ``i``'s modules are named: ``model.layers.{i}.``."""
    return f"model.layers.{i}."


def layer_index(name: str) -> int | None:
    """The layer a module or tensor name lies in (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    role: str  # linear | embedding | head | norm | bias


def _dims(a: ModelArgs) -> tuple[int, int, int, int]:
    """Hidden size, intermediate size, q width and k/v width (head_dim need not be hidden / heads)."""
    return a.hidden_size, a.intermediate_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim


ATTENTION_BIASES = ("q", "k", "v", "o")


class Llama:
    """Llama 2/3, Mistral and Qwen2 (transformers' ``modeling_llama.py``, ``modeling_qwen2.py``)."""

    #: Layer field -> projection module in a layer; each one an NF4 linear
    PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                   "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    #: Layer field -> norm module in a layer (its weight stored as the checkpoint has it); the first
    #: two, which every family has, are the input and post-attention norms
    NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}

    @staticmethod
    def projection_shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each projection, by Layer field."""
        H, I, q_dim, kv_dim = _dims(a)
        return {"q": (q_dim, H), "k": (kv_dim, H), "v": (kv_dim, H), "o": (H, q_dim),
                "gate": (I, H), "up": (I, H), "down": (H, I)}

    @staticmethod
    def biased(a: ModelArgs) -> tuple[str, ...]:
        """The projections with a bias: ``attention_bias`` puts one on q, k, v and o, ``mlp_bias`` on
        the MLP's three; Qwen2 always has them on q, k and v and never on o."""
        if a.model_type == "qwen2":
            return ("q", "k", "v")
        return (ATTENTION_BIASES if a.attention_bias else ()) + (("gate", "up", "down") if a.mlp_bias else ())

    @classmethod
    def module(cls, i: int, field: str) -> str:
        """The module name of layer ``i``'s projection or norm ``field``, as Hugging Face and PEFT spell it
        (``module(3, "up") == "model.layers.3.mlp.up_proj"``): the names adapters are keyed by."""
        return layer_prefix(i) + (cls.PROJECTIONS.get(field) or cls.NORMS[field])

    @classmethod
    def layer_tensors(cls, a: ModelArgs, i: int) -> list[TensorSpec]:
        """Layer ``i``'s tensors, in the order a bundle stores them: the input and post-attention norms,
        the projections, any further norms (Gemma 2's), the biases."""
        norms = [TensorSpec(f"{cls.module(i, f)}.weight", (a.hidden_size,), "norm") for f in cls.NORMS]
        shapes = cls.projection_shapes(a)
        linears = [TensorSpec(f"{cls.module(i, f)}.weight", shape, "linear") for f, shape in shapes.items()]
        biases = [TensorSpec(f"{cls.module(i, f)}.bias", shapes[f][:1], "bias") for f in cls.biased(a)]
        return norms[:2] + linears + norms[2:] + biases

    @classmethod
    def tensor_map(cls, a: ModelArgs) -> dict[str, TensorSpec]:
        """Every tensor of a checkpoint with config ``a``, keyed by its Hugging Face name: the embeddings,
        the final norm, an untied head, then each layer's."""
        H, V = a.hidden_size, a.vocab_size
        specs = [TensorSpec(f"{EMBED}.weight", (V, H), "embedding"), TensorSpec(f"{NORM}.weight", (H,), "norm")]
        if not a.tie_word_embeddings:
            specs.append(TensorSpec(f"{HEAD}.weight", (V, H), "head"))
        for i in range(a.num_hidden_layers):
            specs += cls.layer_tensors(a, i)
        return {s.name: s for s in specs}


class Phi3(Llama):
    """Phi-3 (transformers' ``modeling_phi3.py``). Its projections are fused and stay fused:
    ``qkv_proj`` is q, k and v stacked by rows, ``gate_up_proj`` gate then up. Each is one NF4
    tensor, as bitsandbytes quantizes it for a QLoRA base (one double-quant offset over the whole
    fused weight), and the module PEFT adapters for Phi-3 target."""

    PROJECTIONS = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                   "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}

    @staticmethod
    def projection_shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
        H, I, q_dim, kv_dim = _dims(a)
        return {"qkv": (q_dim + 2 * kv_dim, H),  # rows: q, k, v
                "o": (H, q_dim),
                "gate_up": (2 * I, H),  # rows: gate, up
                "down": (H, I)}

    @staticmethod
    def biased(a: ModelArgs) -> tuple[str, ...]:
        return ()  # Phi-3 has no biases


class Gemma(Llama):
    """Gemma (transformers' ``modeling_gemma.py``): Llama's tensors, names and shapes. Its norms
    multiply by (1 + weight): the stored weight is kept as it is, the runtime adds the 1."""

    @staticmethod
    def biased(a: ModelArgs) -> tuple[str, ...]:
        """Attention biases when ``attention_bias`` is set; its MLP never has any (mlp_bias is not read)."""
        return ATTENTION_BIASES if a.attention_bias else ()


class Gemma2(Gemma):
    """Gemma 2 (transformers' ``modeling_gemma2.py``): two more norms per layer, around the MLP;
    ``post_attention_layernorm`` is here the norm of the attention output, not the MLP's input norm."""

    NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
             "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


#: family (``ModelArgs.family``) -> its architecture
ARCHITECTURES = {"llama": Llama, "phi3": Phi3, "gemma": Gemma, "gemma2": Gemma2}


def architecture(a: ModelArgs) -> type[Llama]:
    """The architecture of ``a``'s family."""
    return ARCHITECTURES[a.family]


def tensor_map(a: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint with config ``a`` holds, keyed by its Hugging Face name."""
    return architecture(a).tensor_map(a)
