"""Reading Hugging Face checkpoint directories of the Llama family, Phi-3 and Gemma (1, 2), by explicit tensor-name maps.

A checkpoint is ``config.json`` + ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) + tokenizer files. Every tensor the checkpoint holds must be one
the architecture's map expects, with the shape the config implies; anything else is an error
naming the tensor (in the manner of llama.cpp's ``TensorNameMap`` and gpt-fast's ``weight_map``,
which fail loudly rather than guess). Pickle checkpoints are refused, never unpickled. A
checkpoint saved from a bitsandbytes 4-bit model keeps its NF4 linears as they are
(``converters/bnb.py``): ``HFCheckpoint.nf4`` holds them, checked, for the converter to copy.

The tensors each architecture must hold, and their roles, are ``edgelora/architectures.py``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgelora.architectures import HEAD, TensorSpec, tensor_map
from edgelora.config import ModelArgs, read_json
from edgelora.converters import bnb
from edgelora.storage import NF4Tensor
from edgelora.errors import FormatError, PickleRefusedError, UnsupportedError
from edgelora.safetensors_io import FLOAT_DTYPES, SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
# Buffers some exporters save that carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
            present.discard(f"{HEAD}.weight")  # some exporters save the tied head anyway
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
