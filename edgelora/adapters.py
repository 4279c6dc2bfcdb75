"""LoRA adapters as PEFT saves them: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter is data keyed by the base model's module names (``model.layers.3.mlp.up_proj``): for
each targeted linear ``W [out, in]`` a pair ``A [r, in]``, ``B [out, r]`` and a scale, so that the
adapted layer computes ``y = W x + scale * B (A x)`` (Hu et al. 2021, "LoRA"). Nothing here
touches a base weight; the runtime applies the pairs at the matmul (``runtime/lora.py``).

Which modules an adapter targets is decided from its config the way PEFT decides it
(``peft/tuners/tuners_utils.py::check_target_module_exists``, ``peft/utils/other.py``): a list of
names matches a module by equality or as a dotted suffix, a string is a full regular expression,
``all-linear`` is every linear layer except the output head, ``exclude_modules`` and
``modules_to_save`` are excluded, ``layers_to_transform``/``layers_pattern`` pick layer indices.
``rank_pattern``/``alpha_pattern`` override ``r``/``lora_alpha`` for the first pattern matching a
module's name as a dotted suffix; ``use_rslora`` scales by ``alpha / sqrt(r)`` instead of
``alpha / r`` (Kalajdzievski 2023). The targets found must be exactly the tensors in the file,
with the shapes the base implies: anything else is refused, naming the first mismatch, because
an adapter trained for another base would otherwise run and produce garbage.

Also read: ``bias="all"``/``"lora_only"`` (trained base biases, which replace the base's),
``lora_bias`` (a bias on ``B``), ``modules_to_save`` for the output head and the embeddings (full
replacement matrices), and DoRA (``use_dora``, Liu et al. 2024: a per-output magnitude vector;
the runtime divides it by the column norms of the dequantized base plus the LoRA product once at
load). LoRA on the embedding layer itself, and the PEFT options that change the model's structure
(``layer_replication``, ``trainable_token_indices``, ``target_parameters``, aLoRA), are refused.
Pickle files (``adapter_model.bin``) are never unpickled.

Every regular expression of a config (``target_modules`` as a string, ``exclude_modules``,
``rank_pattern``/``alpha_pattern`` keys, and ``modules_to_save`` entries and ``layers_pattern``,
which PEFT interpolates into patterns) is matched once, ahead, against the base's module names, a
known and bounded list (:class:`PatternMatches`). Python's ``re`` backtracks and cannot be
interrupted, so ``(.*.*)*q`` would spin for ever in-process: a pattern that is a plain name (word
characters, dots, dashes: no repetition, hence no backtracking) is matched here, any other in a
child Python that is killed after :data:`REGEX_SECONDS`, and the field is named in the error.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from edgelora.architectures import EMBED, HEAD, layer_index, tensor_map
from edgelora.config import ModelArgs, read_json
from edgelora.errors import AdapterMismatchError, FormatError, PickleRefusedError, UnsupportedError
from edgelora.products import check_adapter_dtype
from edgelora.safetensors_io import FLOAT_DTYPES, SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# modules_to_save this runtime can hold as full replacement matrices
SAVEABLE = (EMBED, HEAD)
F32_MAX = float(np.finfo(np.float32).max)
#: the longest regular expression a config may hold
MAX_PATTERN = 2048
#: how long the child that matches a config's regular expressions may run
REGEX_SECONDS = 5.0
# patterns without repetition or alternation: matched in-process, in time linear in the name
_PLAIN = re.compile(r"[\w.\-]*", re.ASCII)
# PEFT options that change the model's structure: a value other than these defaults is refused
REFUSED_OPTIONS = ("layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
                   "use_qalora", "fan_in_fan_out")


@dataclass
class LoraConfig:
    """``adapter_config.json`` with PEFT's own field names; unknown keys are ignored."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: object = None  # list of names, a regex string, or "all-linear"
    exclude_modules: object = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: object = None  # int or list of ints
    layers_pattern: object = None  # str or list of str
    bias: str = "none"
    lora_bias: bool = False
    use_dora: bool = False
    modules_to_save: object = None
    peft_type: str = "LORA"
    task_type: object = None
    base_model_name_or_path: object = None
    peft_version: object = None

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "LoraConfig":
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UnsupportedError(f"peft_type {peft_type!r} is not supported; edgelora runs LoRA adapters "
                                   f"(peft_type 'LORA')", path)
        for key in REFUSED_OPTIONS:
            if d.get(key) not in (None, False, [], {}):
                raise UnsupportedError(f"adapter option {key}={d[key]!r} is not supported by edgelora; "
                                       f"train without it or merge the adapter with PEFT first", path)
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: d[k] for k in names if k in d})
        cfg.rank_pattern = cfg.rank_pattern or {}
        cfg.alpha_pattern = cfg.alpha_pattern or {}
        cfg.bias = cfg.bias or "none"
        cfg.validate(path)
        return cfg

    def validate(self, path=None) -> None:
        def bad(msg):
            raise FormatError(f"adapter_config.json: {msg}", path)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= 1 << 20:
            bad(f"r must be a positive integer, got {_short(self.r)}")
        if not _finite(self.lora_alpha):
            bad(f"lora_alpha must be a finite number, got {_short(self.lora_alpha)}")
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name)
            if not isinstance(pat, dict):
                bad(f"{name} must be an object, got {pat!r}")
            for k, v in pat.items():
                if not _finite(v) or (name == "rank_pattern" and (not isinstance(v, int) or not 1 <= v <= 1 << 20)):
                    bad(f"{name}[{_short(k)}] = {_short(v)} is not a valid "
                        f"{'rank' if name == 'rank_pattern' else 'alpha'}")
                _compile(k, f"{name} key", path)
                _compile(_suffix_pattern(k), f"{name} key", path)  # as _pattern_value uses it
        if not isinstance(self.bias, str) or self.bias not in ("none", "all", "lora_only"):
            bad(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        t = self.target_modules
        if t is None:
            bad("target_modules is missing")
        if isinstance(t, str):
            if t.lower() != "all-linear":
                _compile(t, "target_modules", path)
        elif not isinstance(t, list) or not all(isinstance(x, str) for x in t) or not t:
            bad(f"target_modules must be a non-empty list of names, a regex string or 'all-linear', got {t!r}")
        lt = self.layers_to_transform
        if isinstance(t, str) and lt not in (None, []):
            bad("layers_to_transform cannot be used with a regex or 'all-linear' target_modules (PEFT refuses "
                "this too); put the layer numbers in the regex")
        if lt is not None and not (isinstance(lt, int) or (isinstance(lt, list) and all(isinstance(i, int) for i in lt))):
            bad(f"layers_to_transform must be an integer or a list of them, got {lt!r}")
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, list)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            bad(f"modules_to_save must be a list of names, got {self.modules_to_save!r}")
        for m in self.modules_to_save or []:  # matched as a regex, as PEFT does
            _compile(_saved_pattern(m), "modules_to_save entry", path)
        lp = self.layers_pattern
        if lp is not None and not isinstance(lp, str) and not (isinstance(lp, list) and all(isinstance(p, str) for p in lp)):
            bad(f"layers_pattern must be a name or a list of names, got {lp!r}")
        for p in [lp] if isinstance(lp, str) else lp or []:
            _compile(_layer_pattern(p), "layers_pattern", path)
        ex = self.exclude_modules
        if isinstance(ex, str):
            _compile(ex, "exclude_modules", path)
        elif ex is not None and not (isinstance(ex, list) and all(isinstance(e, str) for e in ex)):
            bad(f"exclude_modules must be a list of names or a regex string, got {ex!r}")
        if self.use_dora and self.lora_bias:
            bad("use_dora and lora_bias cannot be combined (PEFT refuses this too)")

    # --- which modules, which rank ---------------------------------------------------------
    def regexes(self) -> list[tuple[str, str, str]]:
        """Every regular expression PEFT's rules match module names against, as ``(field, pattern,
        mode)``, ``mode`` being ``re.Pattern``'s method (``match`` or ``fullmatch``)."""
        jobs = [("layers_to_transform", _DEFAULT_LAYER, "match")]
        t, ex = self.target_modules, self.exclude_modules
        if isinstance(t, str) and t.lower() != "all-linear":
            jobs.append(("target_modules", t, "fullmatch"))
        if isinstance(ex, str):
            jobs.append(("exclude_modules", ex, "fullmatch"))
        jobs += [("modules_to_save", _saved_pattern(m), "match") for m in self.modules_to_save or []]
        lp = self.layers_pattern
        jobs += [("layers_pattern", _layer_pattern(p), "match") for p in ([lp] if isinstance(lp, str) else lp or [])]
        jobs += [(name, _suffix_pattern(k), "match") for name in ("rank_pattern", "alpha_pattern")
                 for k in getattr(self, name)]
        return jobs

    def is_excluded(self, key: str, found: "PatternMatches") -> bool:
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if found.match(ex, "fullmatch", key) is not None:
                    return True
            elif key in ex or any(key.endswith("." + e) for e in ex):
                return True
        return any(found.match(_saved_pattern(m), "match", key) is not None for m in self.modules_to_save or [])

    def is_target(self, key: str, linear_modules, found: "PatternMatches") -> bool:
        """PEFT's rule for whether module ``key`` gets a LoRA pair (``found``: the config's patterns
        matched against the base's module names)."""
        if self.is_excluded(key, found):
            return False
        t = self.target_modules
        if isinstance(t, str):
            if t.lower() == "all-linear":
                return key in linear_modules and key != HEAD
            return found.match(t, "fullmatch", key) is not None
        if key in t:
            return True
        if not any(key.endswith("." + x) for x in t):
            return False
        lt = self.layers_to_transform
        if lt is None or lt == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            m = found.match(_DEFAULT_LAYER, "match", key)
        else:
            m = None
            for p in [patterns] if isinstance(patterns, str) else patterns:
                m = found.match(_layer_pattern(p), "match", key)
                if m is not None:
                    break
        if m is None or m.get("idx") is None:  # (a pattern's own alternation can leave the group unset)
            return False
        idx = int(m["idx"])
        return idx == lt if isinstance(lt, int) else idx in lt

    def rank_alpha(self, key: str, found: "PatternMatches") -> tuple[int, float]:
        return (_pattern_value(self.rank_pattern, key, self.r, found),
                float(_pattern_value(self.alpha_pattern, key, self.lora_alpha, found)))

    def scale(self, key: str, found: "PatternMatches") -> float:
        r, alpha = self.rank_alpha(key, found)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


_DEFAULT_LAYER = r".*?\.[^.]*\.(?P<idx>\d+)\."


def _saved_pattern(name: str) -> str:
    return rf"(^|.*\.){name}($|\..*)"


def _layer_pattern(name: str) -> str:
    return rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\."


def _suffix_pattern(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _finite(v) -> bool:
    """A finite int or float (a 400-digit integer is not: it has no float value)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _compile(pattern: str, what: str, path):
    if len(pattern) > MAX_PATTERN:
        raise FormatError(f"adapter_config.json: {what} is a pattern of {len(pattern)} characters, more than "
                          f"{MAX_PATTERN}", path)
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:  # OverflowError: a{99999999999}
        raise FormatError(f"adapter_config.json: {what} {_short(pattern)} is not a valid regular expression ({e})",
                          path) from None


def _pattern_value(patterns: dict, key: str, default, found: "PatternMatches"):
    for pat, value in patterns.items():
        if found.match(_suffix_pattern(pat), "match", key) is not None:
            return value
    return default


# The child that matches patterns which could backtrack: stdlib only (``-I -S``), its address space
# capped, one line on stderr before each pattern so that the one that ran out of time can be named.
_MATCHER = r"""
import json, re, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
jobs, names = json.load(sys.stdin)
out = []
for i, (pattern, mode) in enumerate(jobs):
    print(i, file=sys.stderr, flush=True)
    f = getattr(re.compile(pattern), mode)
    out.append([m.groupdict() if m else None for m in map(f, names)])
json.dump(out, sys.stdout)
"""


class PatternMatches:
    """A config's regular expressions (:meth:`LoraConfig.regexes`) matched against the bounded list of
    module ``names``: plain names in-process, the others in a child Python given
    :data:`REGEX_SECONDS`. A pattern that runs out of time (catastrophic backtracking) or memory is
    refused with its field named, so no config can hang a loader."""

    def __init__(self, config: LoraConfig, names, path=None):
        self.names = list(names)
        self.found: dict[tuple[str, str], dict[str, dict | None]] = {}
        jobs = list(dict.fromkeys(config.regexes()))
        slow = []
        for field_name, pattern, mode in jobs:
            if (pattern, mode) in self.found:
                continue
            if _PLAIN.fullmatch(pattern) or pattern == _DEFAULT_LAYER or self._plain_template(pattern):
                f = getattr(re.compile(pattern), mode)
                self.found[(pattern, mode)] = {n: (m.groupdict() if m else None) for n in self.names
                                               for m in [f(n)]}
            else:
                slow.append((field_name, pattern, mode))
        if slow:
            self._match_in_child(slow, path)

    @staticmethod
    def _plain_template(pattern: str) -> bool:
        """Whether ``pattern`` is one of PEFT's templates around a plain name."""
        for template in (_saved_pattern, _layer_pattern, _suffix_pattern):
            head, tail = template("\\0").split("\\0")
            if pattern.startswith(head) and pattern.endswith(tail) and len(pattern) >= len(head) + len(tail) \
                    and _PLAIN.fullmatch(pattern[len(head):len(pattern) - len(tail)]):
                return True
        return False

    def _match_in_child(self, slow: list, path) -> None:
        cmd = [sys.executable, "-I", "-S", "-c", _MATCHER]
        request = json.dumps([[[p, m] for _, p, m in slow], self.names])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(request.encode(), timeout=REGEX_SECONDS)
            why = "ran out of memory" if proc.returncode else None
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            why = f"takes more than {REGEX_SECONDS:g} s"
        if why is None:
            for (_, pattern, mode), hits in zip(slow, json.loads(out)):
                self.found[(pattern, mode)] = dict(zip(self.names, hits))
            return
        started = [int(x) for x in err.decode(errors="replace").split() if x.isdigit()]
        field_name, pattern, _ = slow[started[-1] if started else 0]
        raise FormatError(f"adapter_config.json: {field_name} pattern {_short(pattern)} {why} to match the base's "
                          f"{len(self.names)} module names (it backtracks catastrophically); simplify it", path)

    def match(self, pattern: str, mode: str, key: str) -> dict | None:
        """``re.<mode>(pattern, key)``'s groups, or None when it does not match."""
        return self.found[(pattern, mode)][key]


# ---------------------------------------------------------------------------------------------
# the base model's modules, as PEFT names them
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseModules:
    """What an adapter is checked against: the base's linear modules with ``(out, in)`` shapes,
    the modules that carry a bias, the vocabulary and the hidden size."""

    linear: dict  # module name -> (out, in); includes "lm_head" even when tied
    biases: dict  # module name -> out
    vocab_size: int
    hidden_size: int
    num_layers: int

    @classmethod
    def from_args(cls, args: ModelArgs) -> "BaseModules":
        linear, biases = {}, {}
        for name, spec in tensor_map(args).items():
            module = name.rsplit(".", 1)[0]
            if spec.role == "linear":
                linear[module] = tuple(spec.shape)
            elif spec.role == "bias":
                biases[module] = spec.shape[0]
        linear[HEAD] = (args.vocab_size, args.hidden_size)
        return cls(linear, biases, args.vocab_size, args.hidden_size, args.num_hidden_layers)


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

@dataclass
class LoraPair:
    """One targeted linear: ``delta(x) = scale * (B (A x) + bias)``; DoRA adds ``magnitude``."""

    A: np.ndarray  # [r, in] float32, or float16 (read_adapter's held)
    B: np.ndarray  # [out, r] as A
    scale: float
    bias: np.ndarray | None = None  # [out] (lora_bias)
    magnitude: np.ndarray | None = None  # [out] (DoRA)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.A, self.B, self.bias, self.magnitude) if a is not None)


@dataclass
class Adapter:
    """A PEFT LoRA adapter read into memory, checked against a base model."""

    path: Path
    config: LoraConfig
    pairs: dict  # module name -> LoraPair
    biases: dict  # module name -> float32 [out]: trained base biases (bias="all"/"lora_only")
    saved: dict  # "lm_head" / "model.embed_tokens" -> [V, H] float16 or float32 replacement

    @property
    def nbytes(self) -> int:
        return (sum(p.nbytes for p in self.pairs.values()) + sum(b.nbytes for b in self.biases.values())
                + sum(s.nbytes for s in self.saved.values()))

    @property
    def is_dora(self) -> bool:
        return self.config.use_dora

    def summary(self) -> dict:
        ranks = sorted({p.rank for p in self.pairs.values()})
        kinds = sorted({m.rsplit(".", 1)[-1] for m in self.pairs})
        return {"path": str(self.path), "peft_type": "LORA", "ranks": ranks, "r": self.config.r,
                "lora_alpha": self.config.lora_alpha, "use_rslora": self.config.use_rslora,
                "use_dora": self.config.use_dora, "bias": self.config.bias, "lora_bias": self.config.lora_bias,
                "target_modules": self.config.target_modules, "targets": kinds, "modules": len(self.pairs),
                "modules_to_save": sorted(self.saved), "trained_biases": len(self.biases),
                "parameters": int(sum(p.A.size + p.B.size for p in self.pairs.values())),
                "bytes": self.nbytes, "base_model_name_or_path": self.config.base_model_name_or_path}


def adapter_files(path) -> tuple[Path, Path]:
    """The config and weights files of an adapter folder; pickle-only adapters are refused."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError("not an adapter folder (expected a directory with adapter_config.json and "
                          "adapter_model.safetensors)", path)
    cfg, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg.is_file():
        raise FormatError(f"no {ADAPTER_CONFIG}: not a PEFT adapter folder", path)
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise PickleRefusedError(
                f"only pickle weights {pickles} found; edgelora never unpickles files. Where you trust the file, "
                f"convert it: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{path / pickles[0]}', weights_only=True), "
                f"'{weights}')\" (or load it with PEFT and save_pretrained(..., safe_serialization=True))", path)
        raise FormatError(f"no {ADAPTER_WEIGHTS} in the adapter folder", path)
    return cfg, weights


def read_config(path) -> LoraConfig:
    cfg, _ = adapter_files(path)
    return LoraConfig.from_dict(read_json(cfg), cfg)


def _module_of(tensor: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> ``("X", "lora_A.weight")``."""
    name = tensor[len(PEFT_PREFIX):] if tensor.startswith(PEFT_PREFIX) else tensor
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
                   "lora_embedding_A", "lora_embedding_B", "base_layer.bias", "base_layer.weight",
                   "bias", "weight"):
        if name.endswith("." + suffix):
            return name[:-len(suffix) - 1], suffix
    return name, ""


def _layer_hint(module: str, base: BaseModules) -> str:
    i = layer_index(module)
    if i is not None and i >= base.num_layers:
        return f" (the adapter has layer {i}, the base has {base.num_layers} layers: 0-{base.num_layers - 1})"
    return ""


def read_adapter(path: str | os.PathLike, base: BaseModules | ModelArgs, held: str | None = None) -> Adapter:
    """Read and check an adapter folder against ``base`` (``BaseModules`` or the base's ``ModelArgs``);
    every problem is an ``EdgeLoraError``. ``held``: how the runtime holds the LoRA pairs
    (``edgelora.products.ADAPTER_DTYPES``). None: float32. ``"float32"``: the file's values, a pair
    whose every value float16 holds exactly (a float16 file's always; a bfloat16 or float32 file's
    when its values happen to fit) in float16: the same values in half the bytes, which a decode
    step reads. ``"float16"``: every pair rounded to float16 (round to nearest even, as ``deploy``
    writes them) but one with a value beyond float16's range. DoRA pairs stay float32."""
    if held is not None:
        check_adapter_dtype(held)
    path = Path(path)
    if isinstance(base, ModelArgs):
        base = BaseModules.from_args(base)
    cfg_path, weights_path = adapter_files(path)
    config = LoraConfig.from_dict(read_json(cfg_path), cfg_path)
    candidates = list(base.linear) + [EMBED]
    found = PatternMatches(config, candidates, cfg_path)

    # the targets the config selects, and config entries that name nothing in this architecture
    targets = [m for m in candidates if config.is_target(m, base.linear, found)]
    if EMBED in targets:
        raise UnsupportedError("LoRA on the embedding layer (embed_tokens) is not supported; train with "
                               "modules_to_save=['embed_tokens'] or target linear layers only", cfg_path)
    t = config.target_modules
    if isinstance(t, list):
        for name in t:
            if not any(m == name or m.endswith("." + name) for m in candidates):
                kinds = sorted({m.rsplit(".", 1)[-1] for m in base.linear})
                raise AdapterMismatchError(f"target module {name!r} does not exist in this {base.num_layers}-layer "
                                           f"base; its linear modules are {kinds}", cfg_path)
    if not targets:
        raise AdapterMismatchError(f"target_modules {t!r} (with layers_to_transform="
                                   f"{config.layers_to_transform!r}) match no linear module of the base", cfg_path)
    saved_wanted = []
    for m in config.modules_to_save or []:
        hits = [c for c in (EMBED, HEAD) if found.match(_saved_pattern(m), "match", c) is not None]
        if not hits:
            raise UnsupportedError(f"modules_to_save entry {m!r}: edgelora keeps only the output head "
                                   f"(lm_head) and the embeddings (embed_tokens) as saved modules", cfg_path)
        saved_wanted += hits

    with SafetensorsFile(weights_path) as st:
        return _read_tensors(path, st, config, base, targets, saved_wanted, found,
                             None if config.use_dora else held)


def _half(a: np.ndarray, rounded: bool) -> np.ndarray:
    """``a`` (float32) in float16 when that loses nothing (every value the same after the round
    trip) or, ``rounded``, when every value stays finite; else ``a``."""
    with np.errstate(over="ignore"):  # (a value beyond float16's range: inf, and not the same)
        h = a.astype(np.float16)
    keep = np.isfinite(h).all() if rounded else np.array_equal(h.astype(np.float32), a)
    return h if keep else a


def _read_tensors(path, st: SafetensorsFile, config: LoraConfig, base: BaseModules, targets, saved_wanted,
                  found: PatternMatches, held: str | None = None):
    def tensor(name, shape, module, what):
        info = st.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{name}: dtype {info.dtype}, expected F32, F16 or BF16", st.path)
        if tuple(info.shape) != tuple(shape):
            got = list(info.shape)
            own = _rank_disagreement(what, got, shape)
            if own is not None:  # the base fits; the file and its own config disagree on the rank
                raise AdapterMismatchError(f"{module}: {what} has shape {got}, rank {own}, but {ADAPTER_CONFIG} gives "
                                           f"it rank {shape[0] if what == 'lora_A' else shape[1]} (r or rank_pattern): "
                                           f"{st.path.name} disagrees with its own config {Path(path) / ADAPTER_CONFIG}; "
                                           f"was the config edited?", st.path)
            raise AdapterMismatchError(f"{module}: {what} has shape {got} but this base needs {list(shape)}"
                                       f"{_shape_hint(what, got, shape, base)}; the adapter was made for "
                                       f"another base model", st.path)
        arr = np.ascontiguousarray(st.float32(name), np.float32).copy()
        if not np.isfinite(arr).all():
            raise FormatError(f"{name}: non-finite values (NaN or infinity)", st.path)
        return arr

    present = set(st.keys())
    used = set()

    def take(module, suffix):
        name = PEFT_PREFIX + module + "." + suffix
        if name in present:
            used.add(name)
            return name
        return None

    # every tensor must belong to this base and this config
    for name in sorted(present):
        module, suffix = _module_of(name)
        if suffix in ("lora_embedding_A", "lora_embedding_B"):
            raise UnsupportedError(f"{name}: LoRA on embedding layers is not supported", st.path)
        if module not in base.linear and module != EMBED:
            raise AdapterMismatchError(f"tensor {name!r} names module {module!r}, which this base does not have"
                                       f"{_layer_hint(module, base)}; the adapter was made for another base "
                                       f"model", st.path)

    pairs = {}
    for module in targets:
        out_f, in_f = base.linear[module]
        r, _ = config.rank_alpha(module, found)
        a_name, b_name = take(module, "lora_A.weight"), take(module, "lora_B.weight")
        if a_name is None or b_name is None:
            raise AdapterMismatchError(f"the config targets {module!r} but the file has no "
                                       f"{'lora_A' if a_name is None else 'lora_B'} weight for it", st.path)
        A = tensor(a_name, (r, in_f), module, "lora_A")
        B = tensor(b_name, (out_f, r), module, "lora_B")
        if held is not None:  # the pair in float16 when both fit (the kernels take one kind for a pair)
            A16, B16 = _half(A, held == "float16"), _half(B, held == "float16")
            if A16.dtype == B16.dtype == np.float16:
                A, B = A16, B16
        bound = abs(config.scale(module, found)) * r * float(np.abs(A).max(initial=0)) * float(np.abs(B).max(initial=0))
        if not bound <= F32_MAX:  # a bound on every entry of scale * B A
            raise FormatError(f"{module}: lora_A and lora_B values are so large that their product overflows "
                              f"float32 (non-finite outputs)", st.path)
        bias = magnitude = None
        if config.lora_bias:
            b = take(module, "lora_B.bias")
            if b is None:
                raise FormatError(f"lora_bias is set but {module}.lora_B.bias is missing", st.path)
            bias = tensor(b, (out_f,), module, "lora_B bias")
        if config.use_dora:
            mv = take(module, "lora_magnitude_vector")
            if mv is None:
                raise FormatError(f"use_dora is set but {module}.lora_magnitude_vector is missing", st.path)
            magnitude = tensor(mv, (out_f,), module, "DoRA magnitude")
        pairs[module] = LoraPair(A, B, config.scale(module, found), bias, magnitude)

    biases = {}
    if config.bias != "none":
        for module, out_f in base.biases.items():
            name = take(module, "base_layer.bias") or take(module, "bias")
            if name is not None:
                biases[module] = tensor(name, (out_f,), module, "bias")

    saved = {}
    for module in SAVEABLE:  # PEFT also saves the full weight of a LoRA-targeted head or embedding
        if module in targets and module not in saved_wanted and PEFT_PREFIX + module + ".base_layer.weight" in present:
            saved_wanted.append(module)
    for module in saved_wanted:
        name = take(module, "weight") or take(module, "base_layer.weight")
        if name is None:
            raise FormatError(f"modules_to_save lists {module!r} but {PEFT_PREFIX}{module}.weight is missing",
                              st.path)
        shape = (base.vocab_size, base.hidden_size)
        info = st.tensors[name]
        if tuple(info.shape) != shape:
            raise AdapterMismatchError(f"{module}: saved weight is {list(info.shape)} but this base has vocabulary "
                                       f"{base.vocab_size} and hidden size {base.hidden_size}; the adapter was made "
                                       f"for another base model", st.path)
        if info.dtype == "F16":
            arr = np.array(st.raw(name))
            if not np.isfinite(arr).all():
                raise FormatError(f"{name}: non-finite values (NaN or infinity)", st.path)
        else:
            arr = tensor(name, shape, module, "saved weight")
        saved[module] = arr

    extra = sorted(present - used)
    if extra:
        module, _ = _module_of(extra[0])
        why = ("is not targeted by the adapter's config" if module in base.linear else "is not expected")
        raise AdapterMismatchError(f"tensor {extra[0]!r}: module {module!r} {why} (target_modules="
                                   f"{config.target_modules!r}, layers_to_transform={config.layers_to_transform!r},"
                                   f" bias={config.bias!r}); config and weights disagree", st.path)
    return Adapter(Path(path), config, pairs, biases, saved)


def _rank_disagreement(what: str, got, want) -> int | None:
    """The rank a ``lora_A [r, in]`` / ``lora_B [out, r]`` tensor of shape ``got`` has when only its
    rank differs from ``want`` (its sizes fit the base: the file disagrees with its own config), else None."""
    if len(got) != 2:
        return None
    if what == "lora_A" and got[1] == want[1] and got[0] != want[0]:
        return got[0]
    if what == "lora_B" and got[0] == want[0] and got[1] != want[1]:
        return got[1]
    return None


def _shape_hint(what: str, got, want, base: BaseModules) -> str:
    if what == "lora_A" and len(got) == 2 and got[0] == want[0]:
        return f" (input size {got[1]} vs {want[1]})"
    if what == "lora_B" and len(got) == 2 and got[1] == want[1]:
        return f" (output size {got[0]} vs {want[0]})"
    if what in ("lora_A", "lora_B") and len(got) == 2:
        return " (rank differs from the config's r/rank_pattern)"
    return ""


def min_resident_bytes(path: str | os.PathLike) -> int:
    """The fewest bytes the adapter at ``path`` can take once loaded (two per parameter: no tensor
    is kept in fewer), from its weights file's header alone, so that a budget can refuse an adapter
    before it is read (a sparse file of 10 GB costs nothing to size)."""
    _, weights_path = adapter_files(path)
    with SafetensorsFile(weights_path, mmap=False) as st:  # the header only: nothing mapped, nothing read
        return sum(2 * info.numel for info in st.tensors.values())


def describe_adapter(path: str | os.PathLike) -> dict:

    """What an adapter folder holds, from its config and the weights' header (no base needed)."""
    cfg_path, weights_path = adapter_files(path)
    config = LoraConfig.from_dict(read_json(cfg_path), cfg_path)
    with SafetensorsFile(weights_path) as st:
        modules, ranks, dtypes, params, saved = set(), {}, set(), 0, []
        for name, info in st.tensors.items():
            module, suffix = _module_of(name)
            dtypes.add(info.dtype)
            if suffix == "lora_A.weight":
                modules.add(module)
                ranks[module] = info.shape[0]
                params += info.numel
            elif suffix == "lora_B.weight":
                params += info.numel
            elif suffix in ("weight", "base_layer.weight"):
                saved.append(module)
        size = weights_path.stat().st_size
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    layers = sorted({i for i in map(layer_index, modules) if i is not None})
    return {"kind": "adapter", "path": str(Path(path)), "peft_type": "LORA", "r": config.r,
            "ranks": sorted(set(ranks.values())), "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
            "use_dora": config.use_dora, "bias": config.bias, "lora_bias": config.lora_bias,
            "target_modules": config.target_modules, "targets": kinds, "modules": len(modules),
            "layers": layers, "modules_to_save": sorted(saved), "parameters": params, "dtypes": sorted(dtypes),
            "bytes": size, "base_model_name_or_path": config.base_model_name_or_path,
            "peft_version": config.peft_version}


def format_adapter(info: dict) -> str:
    scale = "alpha/sqrt(r)" if info["use_rslora"] else "alpha/r"
    layers = info["layers"]
    span = f"layers {layers[0]}-{layers[-1]}" if layers else "no decoder layers"
    lines = [f"adapter: {info['path']}",
             f"  LoRA          rank {', '.join(map(str, info['ranks'])) or info['r']}, alpha {info['lora_alpha']:g} "
             f"(scale {scale}){', DoRA' if info['use_dora'] else ''}",
             f"  targets       {', '.join(info['targets'])} ({info['modules']} modules, {span})",
             f"  saved         {', '.join(info['modules_to_save']) or 'none'}; bias {info['bias']}"
             f"{', bias on B' if info['lora_bias'] else ''}",
             f"  size          {info['parameters']:,} LoRA parameters, {info['bytes'] / 1e6:.2f} MB "
             f"({', '.join(info['dtypes'])})",
             f"  trained on    {info['base_model_name_or_path'] or 'unknown base'}"
             f" (peft {info['peft_version'] or '?'})"]
    return "\n".join(lines)
