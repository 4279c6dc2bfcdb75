"""Reading Hugging Face checkpoint directories of the Llama family, Phi-3 and Gemma (1, 2), by explicit tensor-name maps.

A checkpoint is ``config.json`` + ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) + tokenizer files. Every tensor the checkpoint holds must be one
the architecture's map expects, with the shape the config implies; anything else is an error
naming the tensor (in the manner of llama.cpp's ``TensorNameMap`` and gpt-fast's ``weight_map``,
which fail loudly rather than guess). Pickle checkpoints are refused, never unpickled. A
checkpoint saved from a bitsandbytes 4-bit model keeps its NF4 linears as they are
(``converters/bnb.py``): ``HFCheckpoint.nf4`` holds them, checked, for the converter to copy.

Roles decide what the converter does with a tensor: ``linear`` goes to NF4, ``embedding`` and
``head`` follow the user's choice (float16 or NF4), ``norm`` and ``bias`` stay float32.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgelora.config import ModelArgs, read_json
from edgelora.converters import bnb
from edgelora.converters.nf4 import NF4Tensor
from edgelora.errors import FormatError, PickleRefusedError, UnsupportedError
from edgelora.safetensors_io import FLOAT_DTYPES, SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
# Buffers some exporters save that carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    role: str  # linear | embedding | head | norm | bias


def _global_specs(a: ModelArgs) -> list[TensorSpec]:
    """The tensors outside the decoder layers: embeddings, final norm, and an untied head."""
    H, V = a.hidden_size, a.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", (V, H), "embedding"),
             TensorSpec("model.norm.weight", (H,), "norm")]
    if not a.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (V, H), "head"))
    return specs


def _layered_map(a: ModelArgs, linears) -> dict[str, TensorSpec]:
    """The global tensors, then per layer its two norms, ``linears(a, prefix)`` and the model type's hook."""
    specs = _global_specs(a)
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + "input_layernorm.weight", (a.hidden_size,), "norm"),
                  TensorSpec(p + "post_attention_layernorm.weight", (a.hidden_size,), "norm")]
        specs += linears(a, p) + ARCH_HOOKS[a.model_type](a, p)
    return {s.name: s for s in specs}


def _dims(a: ModelArgs) -> tuple[int, int, int, int]:
    return a.hidden_size, a.intermediate_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim


def _llama_linears(a: ModelArgs, p: str) -> list[TensorSpec]:
    H, I, q_dim, kv_dim = _dims(a)
    return [TensorSpec(p + "self_attn.q_proj.weight", (q_dim, H), "linear"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_dim, H), "linear"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_dim, H), "linear"),
            TensorSpec(p + "self_attn.o_proj.weight", (H, q_dim), "linear"),
            TensorSpec(p + "mlp.gate_proj.weight", (I, H), "linear"),
            TensorSpec(p + "mlp.up_proj.weight", (I, H), "linear"),
            TensorSpec(p + "mlp.down_proj.weight", (H, I), "linear")]


def _phi3_linears(a: ModelArgs, p: str) -> list[TensorSpec]:
    H, I, q_dim, kv_dim = _dims(a)
    return [TensorSpec(p + "self_attn.qkv_proj.weight", (q_dim + 2 * kv_dim, H), "linear"),  # rows: q, k, v
            TensorSpec(p + "self_attn.o_proj.weight", (H, q_dim), "linear"),
            TensorSpec(p + "mlp.gate_up_proj.weight", (2 * I, H), "linear"),  # rows: gate, up
            TensorSpec(p + "mlp.down_proj.weight", (H, I), "linear")]


def llama_tensor_map(a: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor of a Llama/Mistral/Qwen2 checkpoint, keyed by its Hugging Face name."""
    return _layered_map(a, _llama_linears)


def phi3_tensor_map(a: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor of a Phi-3 checkpoint. Its projections are fused and stay fused: ``qkv_proj`` is
    q, k and v stacked by rows, ``gate_up_proj`` gate then up. Each is one NF4 tensor, as bitsandbytes
    quantizes it for a QLoRA base (one double-quant offset over the whole fused weight), and the
    module PEFT adapters for Phi-3 target."""
    return _layered_map(a, _phi3_linears)


def _llama_extras(a: ModelArgs, p: str) -> list[TensorSpec]:
    _, _, q_dim, kv_dim = _dims(a)
    extra = []
    if a.attention_bias:
        extra += [TensorSpec(p + "self_attn.q_proj.bias", (q_dim,), "bias"),
                  TensorSpec(p + "self_attn.k_proj.bias", (kv_dim,), "bias"),
                  TensorSpec(p + "self_attn.v_proj.bias", (kv_dim,), "bias"),
                  TensorSpec(p + "self_attn.o_proj.bias", (a.hidden_size,), "bias")]
    if a.mlp_bias:
        extra += [TensorSpec(p + "mlp.gate_proj.bias", (a.intermediate_size,), "bias"),
                  TensorSpec(p + "mlp.up_proj.bias", (a.intermediate_size,), "bias"),
                  TensorSpec(p + "mlp.down_proj.bias", (a.hidden_size,), "bias")]
    return extra


def _qwen2_extras(a: ModelArgs, p: str) -> list[TensorSpec]:
    # Qwen2: biases on q, k and v only.
    _, _, q_dim, kv_dim = _dims(a)
    return [TensorSpec(p + "self_attn.q_proj.bias", (q_dim,), "bias"),
            TensorSpec(p + "self_attn.k_proj.bias", (kv_dim,), "bias"),
            TensorSpec(p + "self_attn.v_proj.bias", (kv_dim,), "bias")]


def _no_extras(a: ModelArgs, p: str) -> list[TensorSpec]:
    return []  # Phi-3: no biases


def _gemma_extras(a: ModelArgs, p: str) -> list[TensorSpec]:
    # Gemma: attention biases when attention_bias is set; its MLP never has any (mlp_bias is not read).
    # Its norms multiply by (1 + weight): the stored weight is kept as it is, the runtime adds the 1.
    _, _, q_dim, kv_dim = _dims(a)
    if not a.attention_bias:
        return []
    return [TensorSpec(p + "self_attn.q_proj.bias", (q_dim,), "bias"),
            TensorSpec(p + "self_attn.k_proj.bias", (kv_dim,), "bias"),
            TensorSpec(p + "self_attn.v_proj.bias", (kv_dim,), "bias"),
            TensorSpec(p + "self_attn.o_proj.bias", (a.hidden_size,), "bias")]


def _gemma2_extras(a: ModelArgs, p: str) -> list[TensorSpec]:
    # Gemma 2: two more norms per layer, around the MLP (post_attention_layernorm, in the map for
    # every family, is Gemma 2's norm of the attention output, not the MLP's input norm)
    return [TensorSpec(p + "pre_feedforward_layernorm.weight", (a.hidden_size,), "norm"),
            TensorSpec(p + "post_feedforward_layernorm.weight", (a.hidden_size,), "norm")] + _gemma_extras(a, p)


ARCH_HOOKS = {"llama": _llama_extras, "mistral": _llama_extras, "qwen2": _qwen2_extras, "phi3": _no_extras,
              "gemma": _gemma_extras, "gemma2": _gemma2_extras}
# Gemma's linears are named and shaped as Llama's (head_dim need not be hidden_size / heads)
TENSOR_MAPS = {"llama": llama_tensor_map, "phi3": phi3_tensor_map, "gemma": llama_tensor_map,
               "gemma2": llama_tensor_map}


def tensor_map(a: ModelArgs) -> dict[str, TensorSpec]:
    """The tensor-name map of ``a``'s architecture family."""
    return TENSOR_MAPS[a.family](a)


class HFCheckpoint:
    """An opened Hugging Face checkpoint directory: config, tensor locations, tokenizer files."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError("not a directory; pass a Hugging Face checkpoint folder "
                              "(config.json, *.safetensors, tokenizer.json)", self.path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FormatError("no config.json in the checkpoint folder; is this a Hugging Face checkpoint?",
                              self.path)
        self.config_path = cfg_path
        self.config_dict = read_json(cfg_path)
        self.args = ModelArgs.from_dict(self.config_dict, cfg_path)
        self.quantization = bnb.quantization_method(self.config_dict, cfg_path)  # None: float weights
        self.nf4: dict[str, NF4Tensor] = {}  # weights stored pre-quantized (bitsandbytes 4-bit), by name
        self.shard_paths = self._find_shards()
        self.files: dict[Path, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for shard in self.shard_paths:
                f = SafetensorsFile(shard)
                self.files[shard] = f
                for name in f.keys():
                    if name in self.where:
                        raise FormatError(f"tensor {name!r} appears in two shards "
                                          f"({self.where[name].path.name} and {shard.name})", shard)
                    self.where[name] = f
            self.specs = self._check_tensors()
        except BaseException:
            self.close()
            raise

    def _find_shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError("index has no weight_map", index)
            for n in weight_map.values():
                if not isinstance(n, str) or not n or "/" in n or "\\" in n or "\0" in n or n.startswith("."):
                    raise FormatError(f"index names an invalid shard file {n!r}", index)
            names = sorted(set(weight_map.values()))
            for n in names:
                if n.endswith(PICKLE_SUFFIXES):
                    raise PickleRefusedError(f"index lists pickle shard {n!r}; edgelora never unpickles files", index)
                if not (self.path / n).is_file():
                    raise FormatError(f"shard {n} listed in the index is missing", index)
            return [self.path / n for n in names]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PickleRefusedError(
                f"only pickle checkpoint(s) {pickles} found; edgelora never unpickles files. Convert them to "
                f"safetensors where you trust the file, e.g. `python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{self.path}').save_pretrained('OUT', "
                f"safe_serialization=True)\"`", self.path)
        raise FormatError("no *.safetensors weights in the checkpoint folder", self.path)

    def _check_tensors(self) -> dict[str, TensorSpec]:
        a = self.args
        specs = tensor_map(a)
        present = {n for n in self.where if not n.endswith(IGNORED_SUFFIXES)}
        if self.quantization == "bnb-4bit":
            present = self._import_bnb(specs, present)
        if a.tie_word_embeddings:
            present.discard("lm_head.weight")  # some exporters save the tied head anyway
        unexpected = sorted(present - specs.keys())
        if unexpected:
            raise UnsupportedError(f"unexpected tensor(s) for a {a.model_type} checkpoint with this config: "
                                   f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
                                   self.where[unexpected[0]].path)
        missing = sorted(specs.keys() - present)
        if missing:
            raise FormatError(f"checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}",
                              self.path)
        for name, spec in specs.items():
            if name in self.nf4:
                continue  # checked against its quant state
            info = self.where[name].tensors[name]
            if info.shape != spec.shape:
                raise FormatError(f"tensor {name!r} has shape {list(info.shape)}, but config.json implies "
                                  f"{list(spec.shape)}", self.where[name].path)
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16",
                                       self.where[name].path)
        return specs

    def _import_bnb(self, specs: dict, present: set) -> set:
        """Take each bitsandbytes 4-bit linear as it is stored; the names left to check as float."""
        for name in sorted(present):
            spec = specs.get(name)
            state = bnb.read_state(self.where, name) if spec is not None and spec.role == "linear" else None
            if state is not None:
                self.nf4[name] = bnb.load_nf4(self.where, name, state, spec.shape)
        layouts = {(q.block_size, q.double_quant) for q in self.nf4.values()}
        if len(layouts) > 1:
            raise UnsupportedError(f"the checkpoint mixes bitsandbytes block sizes / double quantization "
                                   f"{sorted(layouts)}; a bundle holds one", self.path)
        parts = {n for n in present if bnb.owner(n) in self.nf4}
        return present - parts  # a stray part (of no quantized weight) is reported as unexpected

    @property
    def nf4_layout(self) -> tuple[int, bool] | None:
        """``(block_size, double_quant)`` of the pre-quantized weights, or None."""
        return next(((q.block_size, q.double_quant) for q in self.nf4.values()), None)

    @property
    def dtypes(self) -> set[str]:
        return {"bitsandbytes-nf4" if n in self.nf4 else self.where[n].tensors[n].dtype for n in self.specs}

    def tensor(self, name: str):
        """A source tensor in float32 (a pre-quantized one dequantized)."""
        return self.nf4[name].dequantize() if name in self.nf4 else self.where[name].float32(name)

    def source_bytes(self) -> int:
        return sum(self.nf4[n].nbytes if n in self.nf4 else self.where[n].tensors[n].nbytes for n in self.specs)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def write_config(self, dst: Path) -> None:
        """The bundle's config.json: the checkpoint's, unchanged."""
        shutil.copyfile(self.config_path, dst)

    @property
    def source_meta(self) -> dict:
        """What the bundle manifest's ``source`` records about this kind of source."""
        return {"format": "safetensors"}

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
