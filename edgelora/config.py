"""Model configuration as Hugging Face writes it: one dataclass with ``config.json``'s own field names.

Unknown keys are ignored (as mlx-lm ``models/llama.py``'s ``ModelArgs.from_dict`` does); missing
required ones and impossible values are errors that name the file. The families edgelora runs are
picked by ``model_type``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import FormatError, UnsupportedError

#: model_type -> family module used by the converter and the runtime
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "phi3",
                         "gemma": "gemma", "gemma2": "gemma2"}
#: rope_scaling types transformers' Phi-3 config reads as "longrope" (configuration_phi3.py)
PHI3_LONGROPE_ALIASES = ("su", "yarn")
#: what transformers' GemmaConfig/Gemma2Config assume for keys a config.json may leave out, where
#: that differs from this dataclass's (Llama) defaults (configuration_gemma.py, configuration_gemma2.py)
MODEL_TYPE_DEFAULTS = {
    "gemma": dict(head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
#: the attention kinds of Gemma 2's ``layer_types``
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    partial_rotary_factor: float = 1.0  # the fraction of head_dim that is rotated (Phi-3/Phi-4-mini)
    original_max_position_embeddings: int | None = None  # Phi-3: the pretraining length longrope scales from
    hidden_activation: str | None = None  # Gemma 2's MLP activation (it ignores hidden_act)
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scores are scaled by its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    layer_types: list | None = None  # Gemma 2: per layer "sliding_attention" or "full_attention"
    use_bidirectional_attention: bool | None = None  # Gemma: True (an encoder) is refused
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    architectures: list = field(default_factory=list)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)  # else validate() reports it
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases (and no o_proj bias)
        if self.model_type == "phi3":
            if self.original_max_position_embeddings is None:
                self.original_max_position_embeddings = 4096  # Phi3Config's default, which rope_scaling's never overrides
            sc = self.rope_scaling
            if isinstance(sc, dict) and sc.get("rope_type", sc.get("type")) in PHI3_LONGROPE_ALIASES:
                self.rope_scaling = {**sc, "rope_type": "longrope"}  # as transformers' Phi3Config renames them
        if self.model_type == "gemma2" and self.layer_types is None and isinstance(self.num_hidden_layers, int):
            # Gemma2Config's derivation: even layers (0, 2, ...) slide, odd ones attend to everything
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]

    @property
    def rope_type(self) -> str:
        sc = self.rope_scaling or {}
        return sc.get("rope_type", sc.get("type")) or "default"

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions are rotated (transformers: ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def activation(self) -> str:
        """The MLP's gate activation as transformers picks it: Gemma 2 reads ``hidden_activation``;
        Gemma reads ``hidden_act``, its legacy ``gelu`` meaning the tanh approximation."""
        if self.model_type == "gemma2":
            return self.hidden_activation
        if self.model_type == "gemma" and self.hidden_act == "gelu":
            return "gelu_pytorch_tanh"  # GemmaConfig.__post_init__ rewrites it so
        return self.hidden_act

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "ModelArgs":
        if not isinstance(d, dict):
            raise FormatError("config is not a JSON object", path)
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedError(
                f"unsupported architecture model_type={model_type!r} (architectures={d.get('architectures')}); "
                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}", path)
        d = dict(d)
        for k, v in MODEL_TYPE_DEFAULTS.get(model_type, {}).items():
            d.setdefault(k, v)
        # transformers >= 5 may move rope settings into a rope_parameters block
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            d.setdefault("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
            if d.get("rope_scaling") is None and rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
        names = {f.name for f in dataclasses.fields(cls)}
        required = [p for p, v in inspect.signature(cls).parameters.items() if v.default is inspect.Parameter.empty]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise FormatError(f"config is missing required field(s) {missing}", path)
        args = cls(**{k: v for k, v in d.items() if k in names})
        args.validate(path)
        return args

    @classmethod
    def from_file(cls, path) -> "ModelArgs":
        return cls.from_dict(read_json(path), path)

    def validate(self, path=None) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "vocab_size", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
                raise FormatError(f"config field {name}={v!r} must be a positive integer", path)
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}", path)
        def number(name, v, positive=True):
            try:
                finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
            except OverflowError:  # an integer beyond float's range
                finite = False
            if not finite or not (v > 0 if positive else v >= 0):
                raise FormatError(f"config field {name}={str(v)[:40]} must be a {'positive' if positive else 'non-negative'} "
                                  f"finite number", path)
        number("rms_norm_eps", self.rms_norm_eps, positive=False)
        number("rope_theta", self.rope_theta)
        for name in ("max_position_embeddings", "sliding_window"):
            v = getattr(self, name)
            if (v is not None or name == "max_position_embeddings") and (
                    not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31):
                raise FormatError(f"config field {name}={v!r} must be a positive integer", path)
        if self.model_type in ("gemma", "gemma2"):
            self._validate_gemma(path, number)
        elif not isinstance(self.hidden_act, str) or self.hidden_act not in ("silu", "swish"):
            raise UnsupportedError(f"hidden_act={self.hidden_act!r} is not supported (only silu)", path)
        self._validate_rope(path, number)

    def _validate_gemma(self, path, number) -> None:
        field_name = "hidden_activation" if self.model_type == "gemma2" else "hidden_act"
        if self.activation != "gelu_pytorch_tanh":
            raise UnsupportedError(f"{field_name}={getattr(self, field_name)!r} is not supported for "
                                   f"{self.model_type} (only gelu_pytorch_tanh, the tanh approximation)", path)
        if self.use_bidirectional_attention:
            raise UnsupportedError("use_bidirectional_attention=true (an encoder's attention) is not supported; "
                                   "edgelora runs causal decoders", path)
        if self.model_type != "gemma2":
            return
        number("query_pre_attn_scalar", self.query_pre_attn_scalar)
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, name) is not None:  # null: no soft-capping
                number(name, getattr(self, name))
        lt = self.layer_types
        if not isinstance(lt, list) or len(lt) != self.num_hidden_layers or any(
                not isinstance(t, str) or t not in LAYER_TYPES for t in lt):
            raise FormatError(f"config field layer_types={str(lt)[:80]} must list one of {LAYER_TYPES} for each "
                              f"of the {self.num_hidden_layers} layers", path)
        if "sliding_attention" in lt and self.sliding_window is None:
            raise FormatError("config layer_types has sliding_attention layers but sliding_window is null", path)

    def _validate_rope(self, path, number) -> None:
        f = self.partial_rotary_factor
        number("partial_rotary_factor", f)
        if f > 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise FormatError(f"config field partial_rotary_factor={f!r} must be in (0, 1] and rotate an even "
                              f"number of the head's {self.head_dim} dimensions", path)
        if f != 1.0 and self.model_type != "phi3":
            raise UnsupportedError(f"partial_rotary_factor={f!r}: transformers' {self.model_type} rotates the "
                                   f"whole head; only phi3 rotates part of it", path)
        if self.original_max_position_embeddings is not None:
            v = self.original_max_position_embeddings
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
                raise FormatError(f"config field original_max_position_embeddings={v!r} must be a positive "
                                  f"integer", path)
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise FormatError(f"config field rope_scaling={self.rope_scaling!r} must be an object", path)
        kind = self.rope_type
        kinds = ("default", "llama3", "linear") + (("longrope",) if self.model_type == "phi3" else ())
        if not isinstance(kind, str) or kind not in kinds:
            raise UnsupportedError(f"rope_scaling type {kind!r} is not supported for {self.model_type} "
                                   f"(supported: {', '.join(kinds[1:])})", path)
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(kind, ())
        for key in needed:
            number(f"rope_scaling.{key}", self.rope_scaling.get(key))
        if kind == "llama3" and self.rope_scaling["low_freq_factor"] == self.rope_scaling["high_freq_factor"]:
            raise FormatError("config rope_scaling: low_freq_factor equals high_freq_factor", path)
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                v = self.rope_scaling.get(key)
                if not isinstance(v, list) or len(v) != self.rotary_dim // 2:
                    raise FormatError(f"config rope_scaling.{key} must be a list of {self.rotary_dim // 2} numbers "
                                      f"(one per rotated pair), got {str(v)[:80]}", path)
                for x in v:
                    number(f"rope_scaling.{key}[i]", x)
            for key in ("factor", "attention_factor"):
                if self.rope_scaling.get(key) is not None:
                    number(f"rope_scaling.{key}", self.rope_scaling[key])

    @property
    def family(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]


def open_regular(path):
    """``path`` opened for reading in binary, refused (``FormatError``) unless it is a regular file: a
    FIFO would block for ever and a device never end. Opened without blocking, then checked."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FormatError("file not found", path) from None
    except OSError as e:  # ENAMETOOLONG, EACCES, ELOOP, ...
        raise FormatError(f"cannot open: {e.strerror or e}", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError("not a regular file (a FIFO, device or folder)", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path, limit: int, what: str = "file") -> bytes:
    """The bytes of a small file, refused (``FormatError``) when it is missing, unreadable or larger
    than ``limit`` bytes (``what`` names it then). Reads one byte more than the file holds, at most
    ``limit + 1``: ``read(n)`` allocates ``n`` bytes up front, so never the whole limit for a small
    file, and a file that grows while read is still caught."""
    with open_regular(path) as f:
        try:
            raw = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        except OSError as e:
            raise FormatError(f"cannot read: {e.strerror or e}", path) from None
    if len(raw) > limit:
        raise FormatError(f"{what} larger than {limit >> 20} MiB; refusing to parse", path)
    return raw


def parse_json_object(raw: bytes, path, what: str = "JSON", fix: str = "") -> dict:
    """``raw`` (UTF-8 JSON) as a dict, or a FormatError naming ``path``: malformed text, deep
    nesting, over-long integers and anything but an object alike (``fix`` is added to the message)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also over-long integers
        raise FormatError(f"malformed {what} ({str(e)[:200]}){fix}", path) from None
    if not isinstance(value, dict):
        raise FormatError(f"expected a JSON object{'' if what == 'JSON' else ' as the ' + what}{fix}", path)
    return value


def read_json(path) -> dict:
    path = Path(path)
    return parse_json_object(read_bounded(path, 64 * 1024 * 1024, "JSON file"), path)
