"""Device profiles: what a target device offers an app (RAM and the share of it one app may use,
CPU architecture, cores, SIMD features, storage), one TOML file per device.

The shipped profiles live in ``devices/profiles/`` (installed as ``edgelora.devices``'s package
data), each with the sources of its figures. Users add their own files, with the same fields, in
``$EDGELORA_HOME/devices/`` (by default ``~/.cache/edgelora/devices/``) or a folder named by
``$EDGELORA_DEVICES``; a user profile with a shipped profile's name replaces it. A profile file
may also be named directly by its path wherever a device name is taken.

Fields (``name``, ``arch``, ``cores``, ``ram_mib`` and ``app_share`` are required)::

    name = "raspberry-pi-4-4gb"        # what --device takes
    title = "Raspberry Pi 4 Model B, 4 GB"
    arch = "aarch64"                   # aarch64 | x86_64 (arm64 and amd64 are accepted)
    cpu = "..."                        # free text
    cores = 4
    simd = ["neon"]
    ram_mib = 4096                     # physical RAM
    app_share = 0.80                   # the share of it one app may use: the planner's budget
    storage = "..."                    # free text
    storage_gb = 32                    # room for deploy folders
    sources = ["https://..."]
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edgelora.atomic import edgelora_home
from edgelora.config import read_bounded
from edgelora.errors import FormatError, UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ARCH_ALIASES = {"arm64": "aarch64", "aarch64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64"}
MIB = 1 << 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Device:
    name: str
    arch: str
    cores: int
    ram_mib: int
    app_share: float
    title: str = ""
    cpu: str = ""
    simd: tuple = ()
    storage: str = ""
    storage_gb: float | None = None
    sources: tuple = ()
    path: str = field(default="", compare=False)

    @property
    def ram_bytes(self) -> int:
        return self.ram_mib * MIB

    @property
    def budget_bytes(self) -> int:
        """The memory one app may use on this device: the planner's limit."""
        return int(self.ram_bytes * self.app_share)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "arch": self.arch, "cpu": self.cpu, "cores": self.cores,
                "simd": list(self.simd), "ram_mib": self.ram_mib, "app_share": self.app_share,
                "budget_bytes": self.budget_bytes, "storage": self.storage, "storage_gb": self.storage_gb,
                "sources": list(self.sources)}

    def to_toml(self) -> str:
        """The profile as a TOML file (what a deploy folder carries)."""
        def s(v):
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines = [f"name = {s(self.name)}", f"title = {s(self.title)}", f"arch = {s(self.arch)}",
                 f"cpu = {s(self.cpu)}", f"cores = {self.cores}", f"simd = [{', '.join(s(x) for x in self.simd)}]",
                 f"ram_mib = {self.ram_mib}", f"app_share = {self.app_share!r}", f"storage = {s(self.storage)}"]
        if self.storage_gb is not None:
            lines.append(f"storage_gb = {self.storage_gb!r}")
        lines.append(f"sources = [{', '.join(s(x) for x in self.sources)}]")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d, path=None) -> "Device":
        """A profile from its fields; every problem is a ``FormatError`` naming the file."""
        if not isinstance(d, dict):
            raise FormatError("a device profile must be a table of fields", path)

        def need(key, kind, check, what):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, kind) or not check(v):
                raise FormatError(f"device profile field {key!r} must be {what}, got {v!r}", path)
            return v

        name = need("name", str, _NAME.match, "a lower-case name of letters, digits, '.', '_' and '-'")
        arch = ARCH_ALIASES.get(str(d.get("arch", "")).lower())
        if arch is None:
            raise FormatError(f"device profile field 'arch' must be one of {sorted(ARCH_ALIASES)}, "
                              f"got {d.get('arch')!r}", path)
        cores = need("cores", int, lambda v: 1 <= v <= 1024, "a whole number of cores (1-1024)")
        ram = need("ram_mib", int, lambda v: 16 <= v <= 1 << 24, "the RAM in MiB (16 to 16 TiB)")
        share = need("app_share", (int, float), lambda v: 0 < v <= 1, "a fraction in (0, 1]")
        simd = d.get("simd", [])
        sources = d.get("sources", [])
        for key, v in (("simd", simd), ("sources", sources)):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise FormatError(f"device profile field {key!r} must be a list of strings", path)
        for key in ("title", "cpu", "storage"):
            if not isinstance(d.get(key, ""), str):
                raise FormatError(f"device profile field {key!r} must be text", path)
        storage_gb = d.get("storage_gb")
        if storage_gb is not None and (isinstance(storage_gb, bool) or not isinstance(storage_gb, (int, float))
                                       or not 0 < storage_gb < float("inf")):
            raise FormatError("device profile field 'storage_gb' must be a positive number", path)
        return cls(name=name, arch=arch, cores=cores, ram_mib=ram, app_share=float(share),
                   title=d.get("title", ""), cpu=d.get("cpu", ""), simd=tuple(simd), storage=d.get("storage", ""),
                   storage_gb=storage_gb, sources=tuple(sources), path=str(path or ""))

    @classmethod
    def from_file(cls, path) -> "Device":
        path = Path(path)
        raw = read_bounded(path, 1 << 20, "device profile")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
            raise FormatError(f"device profile is not valid TOML: {e}", path) from None
        return cls.from_dict(data, path)


def shipped_dir() -> Path:
    return Path(str(resources.files("edgelora.devices") / "profiles"))


def user_dirs() -> list[Path]:
    dirs = [edgelora_home() / "devices"]
    if os.environ.get("EDGELORA_DEVICES"):
        dirs.append(Path(os.environ["EDGELORA_DEVICES"]))
    return dirs


def list_devices() -> dict[str, Device]:
    """Every profile by name: ``host`` (this machine, detected), the shipped ones, then the user's
    (which replace same-named ones)."""
    found: dict[str, Device] = {"host": host_device()}
    for folder in [shipped_dir(), *user_dirs()]:
        if folder.is_dir():
            for p in sorted(folder.glob("*.toml")):
                dev = Device.from_file(p)
                found[dev.name] = dev
    return found


def get_device(name_or_path: str | os.PathLike | Device) -> Device:
    """A profile by name, or from a ``.toml`` file path; ``"host"`` describes this machine."""
    if isinstance(name_or_path, Device):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return Device.from_file(text)
    if text == "host":
        return host_device()
    devices = list_devices()
    if text not in devices:
        raise UsageError(f"no device profile named {text!r}; known: {', '.join(sorted(devices))} "
                         f"(add your own as a .toml file in {user_dirs()[0]})")
    return devices[text]


def host_arch() -> str:
    return ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# /proc/cpuinfo feature flags -> the SIMD names profiles use (x86 ``flags``, Arm ``Features``)
SIMD_FLAGS = {"sse4_2": "sse4.2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
              "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16",
              "avx_vnni": "avxvnni", "amx_int8": "amx-int8",
              "asimd": "neon", "neon": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm",
              "sve": "sve", "sve2": "sve2", "bf16": "bf16"}


def parse_cpuinfo(text: str) -> tuple[str, tuple]:
    """``(cpu description, SIMD features)`` from the text of Linux's ``/proc/cpuinfo``: the model
    name (x86's ``model name``; Arm's ``Hardware`` or ``Model``, else its implementer/part ids)
    and the first processor's feature flags named as in :data:`SIMD_FLAGS`."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    cpu = (fields.get("model name") or fields.get("hardware") or fields.get("model")
           or (f"Arm CPU implementer {fields['cpu implementer']} part {fields['cpu part']}"
               if "cpu part" in fields and "cpu implementer" in fields else ""))
    flags = (fields.get("flags") or fields.get("features") or "").split()
    simd = tuple(dict.fromkeys(SIMD_FLAGS[f] for f in flags if f in SIMD_FLAGS))
    return cpu, simd


def host_device(app_share: float = 0.8) -> Device:
    """This machine as a profile (its RAM, cores, architecture, CPU model and SIMD features, read
    from ``/proc/cpuinfo`` on Linux)."""
    ram = host_ram_bytes() or 0
    arch = host_arch()
    try:
        cpu, simd = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        cpu, simd = "", ()
    return Device(name="host", title=f"this machine ({platform.node() or 'unknown'})",
                  arch=arch if arch in ("aarch64", "x86_64") else "x86_64", cores=os.cpu_count() or 1,
                  ram_mib=max(16, ram // MIB), app_share=app_share, cpu=cpu or platform.processor() or "",
                  simd=simd)


def format_devices(devices: dict[str, Device]) -> str:
    rows = [("name", "arch", "cores", "RAM", "app budget", "description")]
    for d in devices.values():
        rows.append((d.name, d.arch, str(d.cores), f"{d.ram_mib / 1024:g} GiB",
                     f"{d.budget_bytes / (1 << 30):.2f} GiB ({d.app_share:.0%})", d.title))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)
