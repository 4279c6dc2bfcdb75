"""The fleet file (``fleet.toml``): what a fleet is made of, read and checked whole before any work.

::

    [bases.demo]                                # a base model: a checkpoint folder, GGUF/ONNX file or hub id
    source = "../edgelora/demo_model"           # relative paths resolve against the fleet file's folder
    block_size = 64                             # edgelora convert's options: block_size, double_quant,
    embeddings = "float16"                      #   embeddings, head, merge_adapter

    [adapters.pirate]                           # a PEFT LoRA adapter folder made for one base
    path = "../edgelora/demo_adapters/pirate"
    base = "demo"

    [devices.pi4]                               # a device group: one profile, one base, its adapters
    profile = "raspberry-pi-4-4gb"              # a profile name (edgelora devices) or a .toml file
    context = 512                               # KV cache positions (default: min(model limit, 2048))
    adapters = ["pirate", "shout"]              # base: that of the adapters (or base = "demo")
    # threads = 4, archive = true, overhead = 180000000 (bytes: the runtime's own, instead of measured),
    # kv_cache = "float32" (what the KV cache holds: float16, the default, or float32, as the references)

    [eval.pirate-qa]                            # an evaluation set: JSONL (answer-only loss) or text
    data = "fleet_eval/pirate.jsonl"            #   (perplexity); adapters = [...] for some adapters,
    adapters = ["pirate"]                       #   none for every adapter

    [evaluation]                                # how adapters are evaluated (all optional)
    context = 512                               # KV cache of the evaluating model
    samples = 2                                 # greedy samples: the first prompts of each data set ...
    prompts = ["Hello!"]                        # ... and these, as chat messages (chat = true) or text
    max_new_tokens = 32

Every problem is collected and reported at once in one :class:`FleetFileError`, each line naming
the table and key: ``fleet.toml: [adapters.pirate] base = "x": no base named x``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import FormatError
from edgelora.products import DEFAULT_KV_CACHE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BLOCK_SIZES = (32, 64, 128, 256)
STORAGES = ("float16", "nf4")
TABLES = ("fleet", "bases", "adapters", "devices", "eval", "evaluation")
MAX_FLEET_BYTES = 4 << 20


class FleetFileError(FormatError):
    """A fleet file that cannot be built: every problem found, one per line, named by table and key."""


@dataclass(frozen=True)
class Base:
    name: str
    source: str  # a resolved local path, or a hub id
    options: dict  # edgelora.convert's options (merge_adapter as a resolved path)
    hub: bool = False


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    base: str


@dataclass(frozen=True)
class DeviceGroup:
    name: str
    profile: str  # a profile name or a resolved .toml path
    base: str
    adapters: tuple
    context: int | None = None
    threads: int | None = None
    archive: bool = True
    overhead: int | None = None
    kv_cache: str = DEFAULT_KV_CACHE  # what its KV cache holds (edgelora.products.KV_CACHES)


@dataclass(frozen=True)
class EvalSet:
    name: str
    kind: str  # "data" (JSONL, answer-only loss) or "text" (perplexity)
    path: Path
    adapters: tuple | None  # None: every adapter


@dataclass(frozen=True)
class EvalOptions:
    context: int = 512
    window: int | None = None
    samples: int = 2
    prompts: tuple = ()
    chat: bool = True
    max_new_tokens: int = 32
    threads: int = 1

    def to_dict(self) -> dict:
        return {"context": self.context, "window": self.window, "samples": self.samples,
                "prompts": list(self.prompts), "chat": self.chat, "max_new_tokens": self.max_new_tokens,
                "threads": self.threads}


@dataclass
class Fleet:
    """A checked fleet file: its bases, adapters, device groups and evaluation sets by name."""
    path: Path
    name: str
    bases: dict = field(default_factory=dict)
    adapters: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)
    evaluation: EvalOptions = field(default_factory=EvalOptions)

    def eval_sets_of(self, adapter: str) -> list:
        """The evaluation sets ``adapter`` is measured on, in file order."""
        return [e for e in self.evals.values() if e.adapters is None or adapter in e.adapters]


def _show(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


class _Checker:
    """Collects problems: ``[table.name] key = value: what is wrong``."""

    def __init__(self, path: Path):
        self.path, self.problems = path, []

    def bad(self, where: str, key: str | None, value, why: str) -> None:
        at = where if key is None else f"{where} {key}" + ("" if value is _MISSING else f" = {_show(value)}")
        self.problems.append(f"{at}: {why}")

    def raise_if_any(self) -> None:
        if self.problems:
            lines = self.problems
            raise FleetFileError(lines[0] if len(lines) == 1 else
                                 f"{len(lines)} problems:\n  " + "\n  ".join(lines), self.path)

    def table(self, where: str, value, allowed: dict, required=()) -> dict:
        """``value`` as a table of the keys ``allowed`` ``{key: (type, ...)}``; others reported."""
        if not isinstance(value, dict):
            self.bad(where, None, _MISSING, "must be a table")
            return {}
        out = {}
        for key, v in value.items():
            if key not in allowed:
                self.bad(where, key, v, f"unknown key (known: {', '.join(allowed)})")
                continue
            kinds = allowed[key]
            if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
                names = " or ".join({str: "text", int: "an integer", bool: "true or false", list: "a list",
                                     float: "a number"}[k] for k in kinds)
                self.bad(where, key, v, f"must be {names}")
                continue
            out[key] = v
        for key in required:
            if key not in value:
                self.bad(where, key, _MISSING, "missing")
        return out

    def path_of(self, where: str, key: str, value: str, root: Path, want: str = "any") -> Path | None:
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists():
            self.bad(where, key, value, f"no such file or folder ({p})")
            return None
        if want == "file" and not p.is_file():
            self.bad(where, key, value, f"not a file ({p})")
            return None
        if want == "dir" and not p.is_dir():
            self.bad(where, key, value, f"not a folder ({p})")
            return None
        return p

    def names(self, where: str, key: str, value: list, known: dict, what: str) -> tuple:
        out = []
        for n in value:
            if not isinstance(n, str) or n not in known:
                self.bad(where, key, value, f"no {what} named {n}" if isinstance(n, str) else f"{n!r} is not a name")
            elif n in out:
                self.bad(where, key, value, f"{n} is listed twice")
            else:
                out.append(n)
        return tuple(out)


_MISSING = object()


def read_fleet(path) -> Fleet:
    """Read and check the fleet file at ``path`` (every problem reported at once in a
    :class:`FleetFileError`); relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FleetFileError("fleet file does not exist", path) from None
    except OSError as e:
        raise FleetFileError(f"cannot read the fleet file: {e.strerror or e}", path) from None
    if len(raw) > MAX_FLEET_BYTES:
        raise FleetFileError(f"fleet file is larger than {MAX_FLEET_BYTES >> 20} MiB", path)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FleetFileError(f"not valid TOML: {e}", path) from None
    return check_fleet(doc, path)


def check_fleet(doc: dict, path: Path) -> Fleet:
    """The :class:`Fleet` a parsed fleet file describes (``path``: the file, for its folder and errors)."""
    c = _Checker(path)
    root = path.resolve().parent
    for key in doc:
        if key not in TABLES:
            c.bad(f"[{key}]", None, _MISSING, f"unknown table (known: {', '.join(f'[{t}]' for t in TABLES)})")
    meta = c.table("[fleet]", doc.get("fleet", {}), {"name": (str,)})
    fleet = Fleet(path=path, name=meta.get("name", path.stem))
    sections = {}
    for table in ("bases", "adapters", "devices", "eval"):
        value = doc.get(table, {})
        if not isinstance(value, dict):
            c.bad(f"[{table}]", None, _MISSING, f"must hold tables [{table}.NAME]")
            value = {}
        for name in value:
            if not NAME.match(name):
                c.bad(f"[{table}.{name}]", None, _MISSING, "names are 1-64 letters, digits, '.', '_' or '-', "
                                                            "starting with a letter or digit")
        sections[table] = {n: v for n, v in value.items() if NAME.match(n)}
    if not sections["bases"]:
        c.bad("[bases]", None, _MISSING, "a fleet needs at least one base model ([bases.NAME] source = ...)")
    for name, t in sections["bases"].items():
        b = _check_base(c, name, t, root)
        if b is not None:
            fleet.bases[name] = b
    for name, t in sections["adapters"].items():
        where = f"[adapters.{name}]"
        t = c.table(where, t, {"path": (str,), "base": (str,)}, required=("path", "base"))
        p = c.path_of(where, "path", t["path"], root, "dir") if "path" in t else None
        if p is not None:
            from edgelora.adapters import adapter_files
            try:
                adapter_files(p)
            except FormatError as e:
                c.bad(where, "path", t["path"], f"not a PEFT adapter folder ({e})")
                p = None
        if "base" in t and t["base"] not in sections["bases"]:
            c.bad(where, "base", t["base"], f"no base named {t['base']}")
        elif p is not None and "base" in t:
            fleet.adapters[name] = Adapter(name, p, t["base"])
    for name, t in sections["devices"].items():
        g = _check_group(c, name, t, root, sections, fleet)
        if g is not None:
            fleet.devices[name] = g
    for name, t in sections["eval"].items():
        where = f"[eval.{name}]"
        t = c.table(where, t, {"data": (str,), "text": (str,), "adapters": (list,)})
        kinds = [k for k in ("data", "text") if k in t]
        if len(kinds) != 1:
            c.bad(where, None, _MISSING, "give exactly one of data = \"FILE.jsonl\" (answer-only loss) or "
                                         "text = \"FILE.txt\" (perplexity)")
            continue
        p = c.path_of(where, kinds[0], t[kinds[0]], root, "file")
        adapters = c.names(where, "adapters", t["adapters"], sections["adapters"], "adapter") \
            if "adapters" in t else None
        if p is not None:
            fleet.evals[name] = EvalSet(name, kinds[0], p, adapters)
    fleet.evaluation = _check_evaluation(c, doc.get("evaluation", {}))
    c.raise_if_any()
    return fleet


def _check_base(c: _Checker, name: str, t, root: Path) -> Base | None:
    where = f"[bases.{name}]"
    t = c.table(where, t, {"source": (str,), "block_size": (int,), "double_quant": (bool,), "embeddings": (str,),
                           "head": (str,), "merge_adapter": (str,)}, required=("source",))
    options = {}
    if "block_size" in t:
        if t["block_size"] not in BLOCK_SIZES:
            c.bad(where, "block_size", t["block_size"], f"must be one of {', '.join(map(str, BLOCK_SIZES))}")
        options["block_size"] = t["block_size"]
    if "double_quant" in t:
        options["double_quant"] = t["double_quant"]
    for key in ("embeddings", "head"):
        if key in t:
            if t[key] not in STORAGES:
                c.bad(where, key, t[key], f"must be one of {', '.join(STORAGES)}")
            options[key] = t[key]
    if "merge_adapter" in t:
        p = c.path_of(where, "merge_adapter", t["merge_adapter"], root, "dir")
        if p is not None:
            options["merge_adapter"] = str(p)
    if "source" not in t:
        return None
    src = t["source"]
    local = Path(src).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists():
        return Base(name, str(local), options)
    if HUB_ID.match(src) and not src.lower().endswith((".onnx", ".gguf")):
        return Base(name, src, options, hub=True)
    c.bad(where, "source", src, f"no such file or folder ({local}), and not a hub id of the form org/name")
    return None


def _check_group(c: _Checker, name: str, t, root: Path, sections: dict, fleet: Fleet) -> DeviceGroup | None:
    where = f"[devices.{name}]"
    t = c.table(where, t, {"profile": (str,), "base": (str,), "adapters": (list,), "context": (int,),
                           "threads": (int,), "archive": (bool,), "overhead": (int,), "kv_cache": (str,)},
                required=("profile",))
    from edgelora.products import KV_CACHES
    if t.get("kv_cache", KV_CACHES[0]) not in KV_CACHES:
        c.bad(where, "kv_cache", t["kv_cache"], f"must be one of {', '.join(KV_CACHES)}")
    for key in ("context", "threads"):
        if key in t and t[key] < 1:
            c.bad(where, key, t[key], "must be at least 1")
    if "overhead" in t and t["overhead"] < 0:
        c.bad(where, "overhead", t["overhead"], "must be a number of bytes, at least 0")
    profile = t.get("profile")
    if profile is not None and (profile.endswith(".toml") or "/" in profile or "\\" in profile):
        p = c.path_of(where, "profile", profile, root, "file")
        profile = None if p is None else str(p)
    from edgelora.devices.profiles import get_device
    from edgelora.errors import EdgeLoraError
    try:
        if profile is not None:
            get_device(profile)
    except EdgeLoraError as e:
        c.bad(where, "profile", t["profile"], str(e))
        profile = None
    adapters = c.names(where, "adapters", t.get("adapters", []), sections["adapters"], "adapter")
    bases = {sections["adapters"][a].get("base") for a in adapters if isinstance(sections["adapters"][a], dict)}
    base = t.get("base")
    if base is not None and base not in sections["bases"]:
        c.bad(where, "base", base, f"no base named {base}")
        return None
    if base is not None and bases - {base}:
        c.bad(where, "adapters", list(adapters), f"all must be adapters of base {base}, these are of "
                                                 f"{', '.join(sorted(map(str, bases - {base})))}")
        return None
    if base is None:
        if len(bases) > 1:
            c.bad(where, "adapters", list(adapters), f"adapters of several bases ({', '.join(sorted(map(str, bases)))}); "
                                                     f"a device group runs one base")
            return None
        if not bases and len(sections["bases"]) != 1:
            if not t.get("adapters"):  # (unknown adapters are reported already)
                c.bad(where, "base", _MISSING, "missing: say which base this group runs (it has no adapters to tell)")
            return None
        base = next(iter(bases)) if bases else next(iter(sections["bases"]))
    if profile is None:
        return None
    return DeviceGroup(name, profile, base, adapters, t.get("context"), t.get("threads"), t.get("archive", True),
                       t.get("overhead"), t.get("kv_cache", DEFAULT_KV_CACHE))


def _check_evaluation(c: _Checker, t) -> EvalOptions:
    where = "[evaluation]"
    t = c.table(where, t, {"context": (int,), "window": (int,), "samples": (int,), "prompts": (list,),
                           "chat": (bool,), "max_new_tokens": (int,), "threads": (int,)})
    for key, low in (("context", 2), ("window", 2), ("samples", 0), ("max_new_tokens", 1), ("threads", 1)):
        if key in t and t[key] < low:
            c.bad(where, key, t[key], f"must be at least {low}")
            t.pop(key)
    if "window" in t and t["window"] > t.get("context", EvalOptions.context):
        c.bad(where, "window", t["window"], "must not exceed the evaluation context")
    prompts = t.get("prompts", [])
    if not all(isinstance(p, str) and p for p in prompts):
        c.bad(where, "prompts", prompts, "must be a list of non-empty texts")
        prompts = []
    return EvalOptions(**{k: v for k, v in t.items() if k != "prompts"}, prompts=tuple(prompts))
