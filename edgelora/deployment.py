"""Deploy folders: a bundle, its adapters and its memory plan for one device, verified on load.

``edgelora deploy BUNDLE --device NAME --adapter NAME=PATH ... -o OUT`` plans first
(``edgelora.devices.planner``) and refuses a plan that does not fit. Otherwise it writes::

    OUT/manifest.json          format "edgelora-deploy" and version, the edgelora version, the
                               device and plan in short, the adapters, sha256 and size of every file
    OUT/model/...              the bundle, file for file (its own manifest included)
    OUT/adapters/NAME/...      each adapter: its adapter_config.json and its tensors in float16
                               (adapter_model.safetensors; float32 kept where float16 would overflow)
    OUT/device.toml            the device profile planned for
    OUT/plan.json              the whole plan, item by item

all written in a temporary sibling folder renamed into place (``edgelora.atomic``), so a kill at
any moment leaves the old folder or the new one. ``--archive`` also writes ``OUT.tar`` (plain files
and folders only): built from the new folder before either is in place, the old archive removed
just before the folder is replaced, then renamed in, so that an archive that exists always holds
the folder beside it (a kill in between leaves no archive); ``edgelora unpack`` extracts one, refusing links, absolute paths and
``..``, then verifies it.

``edgelora.load``/``edgelora run`` on a deploy folder check the format and version, every file's
sha256, that this machine has the planned architecture and enough RAM, then enforce the plan: the
KV cache is the planned context, the planned adapters are loaded, and adapters beyond the bytes
planned for them are refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from edgelora.atomic import (_tmp_sibling, atomic_output_dir, build_time, check_output_dir, clean_stale, os_error,
                             utc_stamp)
from edgelora.errors import ChecksumError, EdgeLoraError, FormatError, PlanError, UsageError
from edgelora.products import DEFAULT_KV_CACHE, KV_CACHES, UNPLANNED_KV_CACHE

if TYPE_CHECKING:  # (imported where used: planning pulls in the runtime)
    from edgelora.devices.profiles import Device

FORMAT_NAME = "edgelora-deploy"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
ADAPTERS_DIR = "adapters"
DEVICE_FILE = "device.toml"
PLAN_FILE = "plan.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 16  # a deploy archive's members lie at most this many folders deep (they use 4)
F16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

@dataclass
class DeployResult:
    path: Path
    archive: Path | None
    plan: object  # devices.planner.Plan
    files: dict  # relative path -> {"size", "sha256"}

    @property
    def total_file_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def text(self) -> str:
        lines = [self.plan.text(), "",
                 f"deployed to {self.path} ({len(self.files) + 1} files, {self.total_file_bytes / 1e6:.1f} MB)"]
        if self.archive is not None:
            lines.append(f"archive {self.archive} ({self.archive.stat().st_size / 1e6:.1f} MB)")
        return "\n".join(lines)


def compact_adapter(src, dst: Path) -> None:
    """Copy a PEFT adapter folder with its tensors in float16 (a tensor whose values float16
    cannot hold keeps its dtype)."""
    from edgelora.adapters import adapter_files
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    cfg, weights = adapter_files(src)
    dst.mkdir(parents=True)
    shutil.copyfile(cfg, dst / cfg.name)
    tensors = {}
    with SafetensorsFile(weights) as st:
        for name in st.keys():
            info = st.tensors[name]
            if info.dtype in ("F32", "F16", "BF16"):
                x = st.float32(name)
                if np.all(np.abs(x) <= F16_MAX):
                    tensors[name] = x.astype(np.float16)
                else:
                    tensors[name] = x
            else:
                tensors[name] = np.array(st.raw(name))
    write_safetensors(dst / weights.name, tensors, {"format": "pt"})


def _check_adapters_fit(adapters: dict, device) -> None:
    """Adapters that could not fit the device even alone are refused from their headers, before the
    planner reads them (a sparse 10 GB file would otherwise be read whole)."""
    from edgelora.adapters import min_resident_bytes
    from edgelora.devices.profiles import get_device
    dev = get_device(device)
    need = sum(min_resident_bytes(path) for path in adapters.values())
    if need > dev.budget_bytes:
        raise PlanError(f"the adapters need at least {need / 1e6:.1f} MB, more than {dev.name}'s whole budget of "
                        f"{dev.budget_bytes / 1e6:.1f} MB; nothing was read or written")


def deploy(bundle: str | os.PathLike, device: str | Device, out: str | os.PathLike, adapters: dict | None = None,
           context: int | None = None, threads: int | None = None, archive: bool = False, overwrite: bool = False,
           overhead: int | None = None, kv_cache: str = DEFAULT_KV_CACHE) -> DeployResult:
    """Plan ``bundle`` with ``adapters`` ``{name: folder}`` on ``device`` and, when it fits, write
    the deploy folder ``out`` (and ``out.tar`` with ``archive``). A plan that does not fit raises
    :class:`PlanError` with the plan's numbers and what to change. ``kv_cache``: what its KV cache
    holds (``"float16"``, the default load's, or ``"float32"``, :func:`edgelora.load`), planned and
    recorded: loading the folder uses it."""
    adapters = dict(adapters or {})
    for name in adapters:
        _check_name(name)
    out = check_output_dir(out, overwrite, owner=FORMAT_NAME)
    tar_path = out.with_name(out.name + ".tar") if archive else None
    if tar_path is not None and tar_path.exists() and not overwrite:
        raise UsageError("the archive already exists; pass overwrite=True (--overwrite) to replace it", tar_path)
    _check_adapters_fit(adapters, device)
    if adapters:  # each checked as given, so that an error names the user's files, not the compacted copies
        from edgelora.adapters import read_adapter
        from edgelora.bundle import Bundle
        with Bundle(bundle, verify=False) as b:
            args = b.args
        for path in adapters.values():
            read_adapter(path, args)
    with tempfile.TemporaryDirectory(prefix="edgelora-deploy-") as scratch:
        # the plan counts the adapters as the folder will hold them: compact, held in float16
        compact = {name: Path(scratch) / name for name in adapters}
        for name, path in adapters.items():
            compact_adapter(path, compact[name])
        return _deploy(bundle, device, out, adapters, compact, context, threads, tar_path, overwrite, overhead,
                       kv_cache)


def _deploy(bundle, device, out: Path, adapters: dict, compact: dict, context, threads, tar_path, overwrite,
            overhead, kv_cache) -> DeployResult:
    """:func:`deploy` once the adapters are compacted (``compact``: name -> the float16 copy)."""
    from edgelora import __version__
    from edgelora.bundle import Bundle, file_table, sealed_text
    from edgelora.devices.planner import plan as make_plan
    p = make_plan(bundle, device, context=context, adapters=compact, threads=threads, overhead=overhead,
                  kv_cache=kv_cache)
    if not p.fits:
        raise PlanError(f"does not fit {p.device.name}: needs {p.total_bytes / 1e6:.1f} MB, the budget is "
                        f"{p.budget_bytes / 1e6:.1f} MB ({p.device.app_share:.0%} of {p.device.ram_mib} MiB)"
                        + "".join(f"; {s}" for s in p.suggestions) + "\n" + p.text())
    src = Bundle(bundle, verify=False)  # the manifest and the weights' layout checked; hashes below
    src.close()
    with atomic_output_dir(out, overwrite, owner=FORMAT_NAME) as tmp:
        model_dir = tmp / MODEL_DIR
        model_dir.mkdir()
        for name in [*src.manifest["files"], "manifest.json"]:
            shutil.copyfile(src.path / name, model_dir / name)
        for name in adapters:
            shutil.copytree(compact[name], tmp / ADAPTERS_DIR / name)
        (tmp / DEVICE_FILE).write_text(p.device.to_toml())
        (tmp / PLAN_FILE).write_text(json.dumps(p.to_dict(), indent=1) + "\n")
        files = file_table((p for p in tmp.rglob("*") if p.is_file() and p != tmp / MANIFEST), tmp)
        for name, info in src.manifest["files"].items():  # what was copied is what the bundle lists
            if files[f"{MODEL_DIR}/{name}"]["sha256"] != info["sha256"]:
                raise ChecksumError("sha256 differs from the bundle's manifest; the file is corrupt or was "
                                    "modified, nothing was deployed", src.path / name)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "edgelora_version": __version__,
            "created": utc_stamp(),  # SOURCE_DATE_EPOCH where set
            "device": {"name": p.device.name, "arch": p.device.arch, "cores": p.device.cores,
                       "ram_mib": p.device.ram_mib, "budget_bytes": p.budget_bytes},
            "plan": {"context": p.context, "threads": p.threads, "total_bytes": p.total_bytes,
                     "adapter_bytes": p.adapter_bytes, "kv_cache": p.kv_cache},
            "model": MODEL_DIR,
            "adapters": {name: {"path": f"{ADAPTERS_DIR}/{name}", "bytes": p.adapters[name]} for name in adapters},
            "files": files,
        }
        (tmp / MANIFEST).write_text(sealed_text(manifest))
        if tar_path is not None:  # the archive of the new folder, ready before either is in place
            clean_stale(tar_path)
            tar_tmp = _tmp_sibling(tar_path, "tmp")
            _write_tar(tmp, tar_tmp, out.name)
            tar_path.unlink(missing_ok=True)  # an archive that exists always matches the folder beside it
    if tar_path is not None:
        try:
            os.replace(tar_tmp, tar_path)
        except OSError as e:
            tar_tmp.unlink(missing_ok=True)
            raise os_error(e, tar_path) from None
    return DeployResult(out, tar_path, p, files)


def _write_tar(folder: Path, tmp: Path, top: str) -> None:
    """``folder`` as the tar ``tmp`` with members under ``top/``, fsynced; ``tmp`` removed on failure."""
    stamp = build_time()
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for p in [folder, *sorted(folder.rglob("*"))]:
                arc = PurePosixPath(top, p.relative_to(folder).as_posix()).as_posix() if p != folder else top
                info = tar.gettarinfo(str(p), arcname=arc)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = stamp  # not the files' own times: the same folder gives the same archive
                if p.is_file():
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def _check_name(name) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in ",=/\\\0:") \
            or name.strip() != name or name.startswith(".") or len(name) > 128:
        raise UsageError(f"adapter name {name!r}: use a short name without '/', '\\', ',', '=', ':', "
                         f"spaces at the ends or a leading '.'")


def _safe_rel(rel, where) -> str:
    """A manifest's relative path, refused if it could leave the folder."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise FormatError(f"invalid path {rel!r} in the manifest", where)
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or not parts or rel in (".", "..") or any(x in ("", ".", "..") for x in parts) or ":" in parts[0]:
        raise FormatError(f"path {rel!r} in the manifest leaves the deploy folder", where)
    return rel


def read_manifest(path) -> dict:
    """The deploy manifest at ``path/manifest.json``, its integrity digest checked
    (:func:`edgelora.bundle.read_sealed`) and its fields type-checked."""
    from edgelora.bundle import read_sealed
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FormatError(f"no {MANIFEST}: not a deploy folder", root)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise FormatError("manifest is larger than 16 MiB", mpath)
    m = read_sealed(mpath, FORMAT_NAME, FORMAT_VERSION, "deploy")
    for key, kind in (("device", dict), ("plan", dict), ("adapters", dict), ("files", dict), ("model", str)):
        if not isinstance(m.get(key), kind):
            raise FormatError(f"manifest field {key!r} missing or not {'an object' if kind is dict else 'text'}", mpath)
    plan = m["plan"]
    for key in ("context", "threads", "total_bytes", "adapter_bytes"):
        if not isinstance(plan.get(key), int) or isinstance(plan.get(key), bool) or plan[key] < 0:
            raise FormatError(f"manifest plan field {key!r} missing or not a non-negative integer", mpath)
    if plan["context"] < 1:
        raise FormatError("manifest plan context must be at least 1", mpath)
    if plan.get("kv_cache", UNPLANNED_KV_CACHE) not in KV_CACHES:  # (absent in folders made before it was planned)
        raise FormatError(f"manifest plan kv_cache must be one of {', '.join(KV_CACHES)}", mpath)
    for rel, info in m["files"].items():
        _safe_rel(rel, mpath)
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or \
                not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64:
            raise FormatError(f"manifest entry for file {rel!r} is malformed", mpath)
    _safe_rel(m["model"], mpath)
    for name, a in m["adapters"].items():
        try:
            _check_name(name)
        except UsageError as e:
            raise FormatError(f"manifest lists a bad adapter name: {e}", mpath) from None
        if not isinstance(a, dict) or not isinstance(a.get("bytes"), int) or a["bytes"] < 0:
            raise FormatError(f"manifest entry for adapter {name!r} is malformed", mpath)
        _safe_rel(a.get("path"), mpath)
    return m


def is_deploy(path) -> bool:
    """Whether ``path`` is a folder whose manifest says it is a deploy folder."""
    mpath = Path(path) / MANIFEST
    try:
        if not mpath.is_file() or mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        return json.loads(mpath.read_bytes()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


@dataclass
class Deployment:
    """An opened deploy folder. Its limits (context, threads, adapter bytes, memory) come from the
    checksummed ``plan.json``; the manifest's summary of them must agree (:func:`open_deploy`)."""
    path: Path
    manifest: dict
    device: object  # devices.profiles.Device
    planned: dict  # plan.json
    #: the bundle's weights being hashed in the background (``verify=True``), handed to its Bundle
    verification: object = None  # bundle.BackgroundCheck | None

    @property
    def context(self) -> int:
        return self.planned["context"]

    @property
    def threads(self) -> int:
        return self.planned["threads"]

    @property
    def kv_cache(self) -> str:
        """What the planned KV cache holds (``"float32"`` in folders made before it was planned)."""
        return self.planned.get("kv_cache", UNPLANNED_KV_CACHE)

    @property
    def adapter_bytes(self) -> int:
        return self.planned["adapter_bytes"]

    @property
    def total_bytes(self) -> int:
        return self.planned["total_bytes"]

    @property
    def bundle_path(self) -> Path:
        return self.path / self.manifest["model"]

    @property
    def adapters(self) -> dict:
        return {name: self.path / a["path"] for name, a in self.manifest["adapters"].items()}

    def plan(self) -> dict:
        return dict(self.planned)


def _read_plan(root: Path, m: dict) -> dict:
    """``plan.json``, whose numbers the manifest's ``plan`` summary and adapter budgets must repeat."""
    from edgelora.config import read_json
    path = root / PLAN_FILE
    planned = read_json(path)
    for key in ("context", "threads", "total_bytes", "adapter_bytes"):
        v = planned.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "context" else 0):
            raise FormatError(f"plan field {key!r} missing or not a non-negative integer", path)
        if m["plan"][key] != v:
            raise FormatError(f"the manifest's plan {key} {m['plan'][key]} differs from plan.json's {v}; "
                              f"the folder was edited, deploy again", root / MANIFEST)
    if planned.get("kv_cache", UNPLANNED_KV_CACHE) != m["plan"].get("kv_cache", UNPLANNED_KV_CACHE):
        raise FormatError("plan.json's kv_cache differs from the manifest's; the folder was edited, deploy again",
                          root / MANIFEST)
    budget = planned.get("budget_bytes")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget != m["device"].get("budget_bytes"):
        raise FormatError("plan.json's budget_bytes is missing or differs from the manifest's device budget; the "
                          "folder was edited, deploy again", root / MANIFEST)
    adapters = planned.get("adapters")
    if not isinstance(adapters, dict) or {n: a["bytes"] for n, a in m["adapters"].items()} != adapters:
        raise FormatError("the manifest's adapters differ from plan.json's; the folder was edited, deploy again",
                          root / MANIFEST)
    return planned


def _check_bundle_listed(root: Path, m: dict) -> None:
    """Every file of the inner bundle is listed in the deploy manifest with the same checksum, so that
    verifying the deploy folder verifies the bundle the loader then opens."""
    from edgelora.bundle import FORMAT_NAME as BUNDLE_FORMAT, FORMAT_VERSION as BUNDLE_VERSION, read_sealed
    mpath = root / m["model"] / MANIFEST
    inner = read_sealed(mpath, BUNDLE_FORMAT, BUNDLE_VERSION, "bundle")
    files = inner.get("files")
    if not isinstance(files, dict):
        raise FormatError("manifest field 'files' missing or not an object", mpath)
    for name, info in files.items():
        outer = m["files"].get(f"{m['model']}/{name}") if isinstance(name, str) else None
        if outer is None or not isinstance(info, dict) or outer.get("sha256") != info.get("sha256") \
                or outer.get("size") != info.get("size"):
            raise FormatError(f"the bundle's file {name!r} is not listed with the same checksum in the deploy "
                              f"manifest", root / MANIFEST)


def open_deploy(path: str | os.PathLike, verify: bool | str = True, device_check: bool = True) -> Deployment:
    """Read and verify a deploy folder: format, checksums of every file (the inner bundle's included:
    each must be listed), the plan's limits as ``plan.json`` has them, and (``device_check``) that
    this machine has the planned CPU architecture and at least the planned memory."""
    from edgelora.bundle import WEIGHTS, verify_files
    from edgelora.devices.profiles import Device, host_arch, host_ram_bytes
    root = Path(path)
    m = read_manifest(root)
    needed = {f"{m['model']}/manifest.json", DEVICE_FILE, PLAN_FILE}
    missing = sorted(needed - set(m["files"]))
    if missing:
        raise FormatError(f"the deploy manifest does not list {missing}", root / MANIFEST)
    check = None
    if verify:  # one rule with bundles: every file hashed now but the bundle's weights, hashed in the background
        check = verify_files(root, m["files"], full=verify == "full", manifest="the deploy manifest",
                             background=(f"{m['model']}/{WEIGHTS}",))
    _check_bundle_listed(root, m)
    planned = _read_plan(root, m)
    device = Device.from_file(root / DEVICE_FILE)
    dep = Deployment(root, m, device, planned, check)
    if device_check:
        arch = host_arch()
        if device.arch != arch:
            raise PlanError(f"planned for {device.name} ({device.arch}); this machine is {arch}. Deploy again for "
                            f"this device, or pass --any-device (device_check=False) to run it here anyway", root)
        ram = host_ram_bytes()
        need = dep.total_bytes
        if ram is not None and ram < need:
            raise PlanError(f"the plan needs {need / 1e6:.1f} MB and this machine has {ram / 1e6:.1f} MB of RAM; "
                            f"deploy again for this device", root)
    return dep


def unpack(archive: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Extract a deploy archive written by ``edgelora deploy --archive`` into ``out`` and verify it.
    Only plain files and folders under one top folder are accepted; links, devices, absolute
    paths and ``..`` are refused before anything is written."""
    archive = Path(archive)
    try:
        tar = tarfile.open(archive, "r:")
    except (OSError, tarfile.TarError, ValueError) as e:  # ValueError: a malformed PAX sparse map
        raise FormatError(f"not a readable tar archive: {e}", archive) from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: a malformed PAX sparse map
            raise FormatError(f"archive is truncated or corrupt: {e}", archive) from None
        tops = set()
        for mem in members:
            name = mem.name
            if not (mem.isfile() or mem.isdir()) or mem.issparse():
                raise FormatError(f"archive member {name!r} is not a plain file or folder (links are refused)", archive)
            parts = PurePosixPath(name).parts
            if name.startswith("/") or "\\" in name or not parts or any(x in ("..", "") for x in parts):
                raise FormatError(f"archive member {name!r} would be written outside the output folder", archive)
            if len(parts) > MAX_DEPTH or len(name.encode(errors="surrogateescape")) > 4096:
                raise FormatError(f"archive member {name[:80]!r}... is nested more than {MAX_DEPTH} folders deep or "
                                  f"its name is longer than 4096 bytes", archive)
            tops.add(parts[0])
        if len(tops) != 1:
            raise FormatError(f"a deploy archive holds one top folder, this one has {sorted(tops)[:5]}", archive)
        with atomic_output_dir(out, overwrite, owner=FORMAT_NAME) as tmp:
            for mem in members:
                rel = PurePosixPath(mem.name).parts[1:]
                if not rel:
                    continue
                dst = tmp.joinpath(*rel)
                try:
                    if mem.isdir():
                        dst.mkdir(parents=True, exist_ok=True)
                        continue
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(mem)
                    with open(dst, "xb") as f:
                        shutil.copyfileobj(src, f, 1 << 22)
                except (tarfile.TarError, EOFError) as e:
                    raise FormatError(f"archive member {mem.name!r} is truncated or corrupt: {e}", archive) from None
                except FileExistsError:
                    raise FormatError(f"archive member {mem.name!r} appears twice, or as a file and a folder",
                                      archive) from None
                except (NotADirectoryError, IsADirectoryError):
                    raise FormatError(f"archive member {mem.name!r} lies under a member that is a file",
                                      archive) from None
                except OSError as e:
                    if e.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
                        raise FormatError(f"archive member {mem.name!r} has a name this system cannot hold "
                                          f"({e.strerror})", archive) from None
                    raise
            try:
                m = open_deploy(tmp, verify="full", device_check=False).manifest
                listed = {*m["files"], MANIFEST}
                extra = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                               if not p.is_dir() and p.relative_to(tmp).as_posix() not in listed)
                if extra:
                    raise FormatError(f"archive members {extra[:5]} are not listed in the manifest", tmp)
            except EdgeLoraError as e:  # name the archive and the member, not the temporary folder
                msg = str(e).replace(str(tmp), tops.pop())
                raise type(e)(f"the archive does not hold a valid deploy folder: {msg}", archive) from None
    return Path(out)


__all__ = ["deploy", "DeployResult", "open_deploy", "Deployment", "is_deploy", "unpack", "read_manifest",
           "compact_adapter", "FORMAT_NAME", "FORMAT_VERSION"]
