"""The edgelora model bundle: a folder that describes itself (see ``docs/format.md``).

    manifest.json          format name and version, quantization spec, source identity, the
                           role and storage of every tensor, statistics, sha256 of every file
    model.safetensors      NF4 tensors as five arrays each, other tensors as float16/float32
    config.json            the source's Hugging Face config, unchanged
    tokenizer.json, tokenizer_config.json, generation_config.json (when the source has them)

How each tensor is laid out in ``model.safetensors`` is ``edgelora/storage.py``'s: an NF4 tensor
``W`` as ``W.nf4_codes``, ``W.nf4_scales``, ``W.nf4_nested``, ``W.nf4_offset`` and ``W.nf4_shape``,
the two code books once as ``edgelora.nf4_code`` and ``edgelora.dynamic_code``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.architectures import layer_index, tensor_map
from edgelora.atomic import edgelora_home, sha256_file, write_text_atomic
from edgelora.config import ModelArgs, parse_json_object, read_bounded
from edgelora.errors import ChecksumError, EdgeLoraError, FormatError, UnsupportedError
from edgelora.safetensors_io import SafetensorsFile
from edgelora.storage import (FLOAT_STORAGES, KINDS, NESTED_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES, FloatStorage,
                              NF4Storage, NF4Tensor)

FORMAT_NAME = "edgelora-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: Files every bundle's manifest must list: the loader opens them (the tokenizer's files it opens only
#: when listed, see :meth:`Bundle.listed`).
REQUIRED_FILES = (WEIGHTS, CONFIG)
#: The manifest's own integrity field: the sha256 of the manifest's text without it (:func:`sealed_text`).
SEAL = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 << 20


def is_bundle(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class TensorEntry:
    name: str
    role: str
    storage: str  # nf4 | float16 | float32
    shape: tuple


class Bundle:
    """An opened bundle. Weights are memory-mapped: nothing is read until a tensor is used
    (``mmap=False``: each is read into memory when first used, see :class:`SafetensorsFile`)."""

    def __init__(self, path, verify: bool | str = True, mmap: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError("not a directory; a bundle is a folder written by `edgelora convert`", self.path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FormatError(f"no {MANIFEST}: not an edgelora bundle (convert a checkpoint with "
                              f"`edgelora convert SRC -o OUT`)", self.path)
        self.manifest = read_sealed(mpath, FORMAT_NAME, FORMAT_VERSION, "bundle")
        self._check_manifest(mpath)
        if verify:  # True: checksums (cached by file identity); "full": hash every file again
            self.verify(full=verify == "full")
        self.args = ModelArgs.from_file(self.path / CONFIG)
        self._check_layers(mpath)
        self.weights = SafetensorsFile(self.path / WEIGHTS, mmap=mmap)
        try:
            self.entries = {name: TensorEntry(name, e["role"], e["storage"], tuple(e["shape"]))
                            for name, e in self.manifest["tensors"].items()}
            self._check_weights()
        except BaseException:
            self.weights.close()
            raise

    def _check_layers(self, mpath: Path) -> None:
        """config.json's layer count is that of the tensors the manifest lists, checked before the
        tensor map of the config is built (a hostile config of 10^6 layers would cost minutes and GBs)."""
        layers = {layer_index(name) for name in self.manifest["tensors"]} - {None}
        n = self.args.num_hidden_layers
        if len(layers) != n or layers != set(range(n)):  # (the count first: no set of n elements)
            raise FormatError(f"config.json has {n} layers but the manifest lists tensors of "
                              f"{len(layers)} layers{f' (up to {max(layers)})' if layers else ''}", mpath)

    def _check_weights(self) -> None:
        """Every tensor the manifest lists is in the weights file as its storage lays it out, with the
        shape the config implies, so that no kernel ever reads past an array."""
        specs = tensor_map(self.args)
        for name, e in self.entries.items():
            if name in specs and e.shape != specs[name].shape:
                raise FormatError(f"manifest gives tensor {name!r} shape {list(e.shape)}, but config.json implies "
                                  f"{list(specs[name].shape)}", self.path / MANIFEST)
            self.storage(name).check(self.weights, name, e.shape)

    def _check_manifest(self, mpath: Path) -> None:
        m = self.manifest
        for key in ("quantization", "files", "tensors"):
            if not isinstance(m.get(key), dict):
                raise FormatError(f"manifest field {key!r} missing or not an object", mpath)
        q = m["quantization"]
        if not isinstance(q.get("block_size"), int) or q.get("block_size") not in SUPPORTED_BLOCK_SIZES:
            raise FormatError(f"quantization block_size {q.get('block_size')!r} is not one of {SUPPORTED_BLOCK_SIZES}",
                              mpath)
        nb = q.get("nested_block_size", NESTED_BLOCK_SIZE)
        if not isinstance(nb, int) or not 1 <= nb <= 1 << 20 or nb & (nb - 1):
            raise FormatError(f"quantization nested_block_size {nb!r} is not a power of two", mpath)
        for name, info in m["files"].items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
                raise FormatError(f"manifest lists an invalid file name {name!r}", mpath)
            if not isinstance(info, dict) or not isinstance(info.get("size"), int) \
                    or not isinstance(info.get("sha256"), str):
                raise FormatError(f"manifest entry for file {name!r} is malformed", mpath)
        unlisted = [f for f in REQUIRED_FILES if f not in m["files"]]
        if unlisted:
            raise FormatError(f"the manifest does not list {unlisted}; every file the loader opens must have "
                              f"a checksum (convert the checkpoint again)", mpath)
        for name, e in m["tensors"].items():
            if not isinstance(e, dict) or e.get("storage") not in KINDS \
                    or not isinstance(e.get("role"), str) or not isinstance(e.get("shape"), list) \
                    or not 1 <= len(e["shape"]) <= 8 \
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in e["shape"]):
                raise FormatError(f"manifest entry for tensor {name!r} is malformed", mpath)

    def verify(self, full: bool = False) -> None:
        """Check that every file the manifest lists is present with its size and sha256
        (:func:`verify_files`; ``full=True`` hashes every file again)."""
        verify_files(self.path, self.manifest["files"], full)

    @property
    def listed(self) -> frozenset:
        """The names of the files the manifest lists (and checksums): the only files read from the folder."""
        return frozenset(self.manifest["files"])

    @property
    def quantization(self) -> dict:
        return self.manifest["quantization"]

    def names(self) -> list[str]:
        return list(self.entries)

    def storage(self, name: str) -> NF4Storage | FloatStorage:
        """How tensor ``name`` is stored (``edgelora/storage.py``): its manifest storage, for NF4 in the
        bundle's block sizes and double-quantized or not as its scales are."""
        e = self.entries[name]
        if e.storage != NF4Storage.kind:
            return FLOAT_STORAGES[e.storage]
        q = self.quantization
        return NF4Storage.stored(self.weights, name, int(q["block_size"]),
                                 int(q.get("nested_block_size", NESTED_BLOCK_SIZE)))

    def nf4(self, name: str) -> NF4Tensor:
        """The stored NF4 tensor, its arrays being views into the mapped file."""
        e = self.entries[name]
        if e.storage != NF4Storage.kind:
            raise KeyError(f"{name} is stored as {e.storage}, not NF4")
        return self.storage(name).read(self.weights, name)

    def tensor(self, name: str) -> np.ndarray:
        """Any tensor as float32 (NF4 ones dequantized)."""
        stored = self.storage(name)
        return stored.dequantize(stored.read(self.weights, name))

    def close(self) -> None:
        self.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def file_table(paths, root: Path | None = None) -> dict:
    """A manifest's ``files`` table of ``paths``, in path order: each one's path relative to ``root``
    (without ``root``, its file name) -> ``{"size": bytes, "sha256": lower-case hex}``."""
    return {(p.relative_to(root).as_posix() if root else p.name): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(paths)}


def verify_files(root: Path, files: dict, full: bool = False, manifest: str = "the manifest") -> None:
    """Check that every file of a manifest's ``files`` table (:func:`file_table`, relative to
    ``root``) is present with its size and sha256; ``manifest`` names the manifest in errors.
    Bundles and deploy folders follow one rule: each file must be a regular file, not a link (nor a
    FIFO or device, which would block or never end), and lie inside ``root``.

    A file whose sha256 was already checked and whose identity has not changed since (size,
    modification and inode-change times, inode, device: the kernel updates the change time on
    any write, and it cannot be set back) is not hashed again, so reopening a 1 GB bundle costs
    a ``stat``, not a second of hashing. ``full=True`` hashes every file regardless.
    """
    stamps = _VerifiedStamps.load()
    real_root = root.resolve()
    for rel, info in files.items():
        p = root / rel
        try:
            st = p.lstat()
            inside = real_root in p.resolve().parents
        except OSError as e:  # ENAMETOOLONG, ENOENT, ELOOP, ...
            raise FormatError(f"file listed in {manifest} cannot be opened ({e.strerror or e})", p) from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"file listed in {manifest} is missing (or not a regular file: links are refused)", p)
        if not inside:
            raise FormatError(f"file listed in {manifest} lies outside its folder", p)
        if st.st_size != info["size"]:
            raise ChecksumError(f"size {st.st_size} differs from {manifest}'s {info['size']}; "
                                f"the file is truncated or was modified", p)
        if not full and stamps.matches(p, st, info["sha256"]):
            continue
        if sha256_file(p) != info["sha256"]:
            raise ChecksumError(f"sha256 differs from {manifest}; the file is corrupt or was modified", p)
        stamps.record(p, st, info["sha256"])
    stamps.save()


class _VerifiedStamps:
    """``edgelora_home()/verified.json``: files whose sha256 matched, with their identity then.
    Best effort: an unreadable or unwritable cache only means hashing again."""

    LIMIT = 512

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries, self.dirty = path, entries, False

    @classmethod
    def load(cls) -> "_VerifiedStamps":
        path = edgelora_home() / "verified.json"
        try:
            entries = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < (1 << 20) else {}
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    @staticmethod
    def _identity(st) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def matches(self, p: Path, st, sha256: str) -> bool:
        e = self.entries.get(str(p.resolve()))
        return isinstance(e, dict) and e.get("sha256") == sha256 and e.get("identity") == self._identity(st)

    def record(self, p: Path, st, sha256: str) -> None:
        self.entries.pop(str(p.resolve()), None)
        self.entries[str(p.resolve())] = {"sha256": sha256, "identity": self._identity(st)}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        keep = dict(list(self.entries.items())[-self.LIMIT:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(keep))
        except (OSError, EdgeLoraError):
            pass


def sealed_text(manifest: dict) -> str:
    """The text of ``manifest`` as written, with its integrity field :data:`SEAL` last: the sha256
    of the same text without it. :func:`read_sealed` accepts exactly this text, so a changed byte
    anywhere in the file (a value, a key, the digest, even white space) is refused."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    digest = hashlib.sha256(_render(body).encode()).hexdigest()
    return _render({**body, SEAL: digest})


def _render(manifest: dict) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def check_format(m: dict, mpath: Path, name: str, version: int, kind: str) -> None:
    """The manifest ``m`` declares format ``name`` at a version this edgelora reads (``version`` or older)."""
    if m.get("format") != name:
        raise FormatError(f"format is {m.get('format')!r}, expected {name!r}", mpath)
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError("format_version missing or not an integer", mpath)
    if v > version:
        raise UnsupportedError(f"{kind} format version {v} is newer than this edgelora reads ({version}); "
                               f"upgrade edgelora", mpath)


def read_sealed(path: Path, name: str, version: int, kind: str) -> dict:
    """A manifest written by :func:`sealed_text`, refused (``FormatError``) unless it is that text
    byte for byte with a matching digest. Its format is checked first (:func:`check_format`), so a
    newer format version is reported as such rather than as a damaged manifest."""
    raw = read_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    m = parse_json_object(raw, path)
    check_format(m, path, name, version, kind)
    digest = m.get(SEAL)
    if not isinstance(digest, str):
        raise FormatError(f"the manifest has no {SEAL!r} integrity digest (written by an older edgelora, or "
                          f"edited); write it again", path)
    body = _render({k: v for k, v in m.items() if k != SEAL})
    if hashlib.sha256(body.encode()).hexdigest() != digest or raw.decode("utf-8") != sealed_text(m):
        raise ChecksumError(f"the manifest does not match its {SEAL!r} digest; it is corrupt or was edited", path)
    return m


def manifest_digest(path) -> str | None:
    """The integrity digest a manifest records for itself (shown by ``edgelora inspect``), or None."""
    try:
        m = json.loads(read_bounded(Path(path), MAX_MANIFEST_BYTES, "manifest"))
    except (EdgeLoraError, ValueError, RecursionError, UnicodeDecodeError):
        return None
    return m.get(SEAL) if isinstance(m, dict) and isinstance(m.get(SEAL), str) else None


def open_bundle(path: str | os.PathLike, verify: bool | str = True, mmap: bool = True) -> Bundle:
    return Bundle(path, verify=verify, mmap=mmap)
