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
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.architectures import layer_index, tensor_map
from edgelora.atomic import sha256_file
from edgelora.config import ModelArgs, parse_json_object, read_bounded
from edgelora.errors import ChecksumError, EdgeLoraError, FormatError, UnsupportedError
from edgelora import sigbus
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
    (``mmap=False``: each is read into memory when first used, see :class:`SafetensorsFile`).

    ``verify``: ``True`` hashes every file but the weights before returning, and the weights in the
    background (:attr:`verification`, a :class:`BackgroundCheck`); ``"full"`` hashes them all before
    returning; ``False`` hashes nothing (the manifest's own digest, the files' sizes and layout are
    still checked). ``verification``: a check of these weights already running (a deploy folder's).
    :meth:`check` raises what the model must stop for."""

    def __init__(self, path, verify: bool | str = True, mmap: bool = True,
                 verification: BackgroundCheck | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError("not a directory; a bundle is a folder written by `edgelora convert`", self.path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FormatError(f"no {MANIFEST}: not an edgelora bundle (convert a checkpoint with "
                              f"`edgelora convert SRC -o OUT`)", self.path)
        self.manifest = read_sealed(mpath, FORMAT_NAME, FORMAT_VERSION, "bundle")
        self._check_manifest(mpath)
        #: the hashing of the weights still running in the background, or None (see :meth:`check`)
        self.verification = verification
        if verify:  # True: the weights hashed in the background; "full": before returning
            self.verification = verify_files(self.path, self.manifest["files"], full=verify == "full",
                                             background=(WEIGHTS,)) or verification
        self.args = ModelArgs.from_file(self.path / CONFIG)
        self._check_layers(mpath)
        self.weights = SafetensorsFile(self.path / WEIGHTS, mmap=mmap)
        if mmap:
            sigbus.watch(self.weights.path)  # a truncation under the mapping ends with a message naming it
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

    def verify(self) -> None:
        """Check now that every file the manifest lists is present with its size and sha256, the
        weights included (:func:`verify_files`)."""
        verify_files(self.path, self.manifest["files"])

    def check(self) -> None:
        """Raise when a model of this bundle must stop: the background hash of the weights found a
        mismatch (``ChecksumError``), or the mapped weights file shrank since it was opened (reading
        it would end the process with SIGBUS). Costs an ``fstat``: called before every forward step."""
        if self.verification is not None:
            self.verification.check()
        self.weights.check_unchanged()

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


def verify_files(root: Path, files: dict, full: bool = False, manifest: str = "the manifest",
                 background=()) -> "BackgroundCheck | None":
    """Check that every file of a manifest's ``files`` table (:func:`file_table`, relative to
    ``root``) is present with its size and sha256; ``manifest`` names the manifest in errors.
    Bundles and deploy folders follow one rule: each file must be a regular file, not a link (nor a
    FIFO or device, which would block or never end), and lie inside ``root``.

    Every file is hashed, each time: no record of an earlier check is trusted (a file's identity
    does not change when the storage beneath the file system flips a bit). The files named in
    ``background`` (the weights a model maps) are hashed by a :class:`BackgroundCheck` started here
    and returned, while the model already runs; ``full=True`` hashes them too before returning.
    """
    real_root = root.resolve()
    later = []
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
        if rel in background and not full:
            later.append((p, info["sha256"]))
        elif sha256_file(p) != info["sha256"]:
            raise ChecksumError(f"sha256 differs from {manifest}; the file is corrupt or was modified", p)
    return BackgroundCheck(later, manifest) if later else None


class BackgroundCheck:
    """The sha256 of files a model maps (its weights), computed by a thread of lowered priority while
    the model already runs, so that a 1 GB bundle starts as fast as one verified ahead, and corruption
    that leaves a file's size and times as they were (a flipped block on an SD card) is still found.

    :meth:`check` raises the mismatch once it is found: :class:`~edgelora.runtime.model.Model` calls
    it before every forward step, so the next generation fails, and one in flight ends with the
    error. :meth:`wait` waits for the result (``verify="full"`` waits before the load returns)."""

    NICE = 10  # the hashing thread's nice value on Linux: it takes idle cores, yields busy ones

    def __init__(self, files: list, manifest: str):
        self.files = [(Path(p), sha) for p, sha in files]
        self.manifest = manifest
        self._failure: tuple | None = None  # (error class, message, path)
        self._done = threading.Event()
        self.seconds: float | None = None  # how long the hashing took, once done
        threading.Thread(target=self._run, name="edgelora-verify", daemon=True).start()

    def _run(self) -> None:
        t = time.perf_counter()
        _lower_thread_priority(self.NICE)
        try:
            for p, sha in self.files:
                if sha256_file(p) != sha:
                    self._failure = (ChecksumError, f"sha256 differs from {self.manifest} (found by the check that "
                                     f"runs while the model does); the file is corrupt or was modified. The model "
                                     f"is stopped: replace the file (convert or deploy again) and load it again", p)
                    return
        except OSError as e:
            self._failure = (FormatError, f"cannot be read to verify it ({e.strerror or e}); the model is stopped", p)
        finally:
            self.seconds = time.perf_counter() - t
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def check(self) -> None:
        """Raise the mismatch found so far (``ChecksumError`` naming the file), if any."""
        if self._failure is not None:
            cls, message, path = self._failure
            raise cls(message, path)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every file is hashed (at most ``timeout`` seconds): True when done, False when
        still hashing; raises the mismatch as :meth:`check`."""
        done = self._done.wait(timeout)
        self.check()
        return done


def _lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's priority (Linux gives each thread its own nice value); elsewhere
    ``setpriority`` would apply to the whole process, so nothing is done."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
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
