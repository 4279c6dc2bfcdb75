"""A fleet's outputs, content-addressed by their inputs.

Every piece of work (an *item*: a base converted, an adapter checked, a device group deployed, an
adapter evaluated) has a **key**: the sha256 of what it is made from: the checksums of its source
files (sha256 of each file's contents), its options, the keys of the items it uses and edgelora's
version (release and source digest, :func:`edgelora.kernel_cache.sources_digest`). Its output is
the folder ``OUT/store/KIND/NAME-KEY/``, written in a temporary sibling and renamed into place
(``edgelora.atomic``) with an ``item.json`` that records the key, the inputs and the result. A
build reuses an item whose folder exists and redoes only those whose key changed: after one
adapter changes, its check, evaluation and the device groups that carry it.

File checksums are cached in ``OUT/.fleet/hashes.json`` by file identity (size, times, inode), as
bundle verification does, so a second build hashes nothing that did not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from edgelora.atomic import clean_stale, sha256_file, write_text_atomic

ITEM = "item.json"
STORE = "store"
STATE = "fleet.json"  # the last build: the fleet file, every item's key and status
KINDS = ("base", "check", "deploy", "eval")
_TEMP = re.compile(r"\.(.+)\.(tmp|old)-\d+-[0-9a-f]{8}")


@functools.lru_cache(maxsize=None)
def edgelora_version() -> str:
    """This edgelora's release and a digest of its sources (any change to the code makes new keys)."""
    from edgelora import __version__
    from edgelora.kernel_cache import sources_digest
    return f"{__version__}+{sources_digest()}"


class HashCache:
    """sha256 of files, remembered by identity in ``OUT/.fleet/hashes.json`` (best effort)."""

    def __init__(self, out: Path):
        self.path = out / ".fleet" / "hashes.json"
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        self.entries, self.dirty = entries if isinstance(entries, dict) else {}, False

    def file(self, p: Path) -> str:
        st = p.stat()
        ident = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(p.resolve())
        e = self.entries.get(key)
        if isinstance(e, dict) and e.get("identity") == ident and isinstance(e.get("sha256"), str):
            return e["sha256"]
        digest = sha256_file(p)
        self.entries[key] = {"identity": ident, "sha256": digest}
        self.dirty = True
        return digest

    def tree(self, p: Path) -> dict:
        """``{relative path: sha256}`` of every regular file under ``p`` (or of ``p`` itself), hidden
        names left out."""
        p = Path(p)
        if p.is_file():
            return {p.name: self.file(p)}
        files = {}
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            files[rel.as_posix()] = self.file(f)
        return files

    def save(self) -> None:
        if self.dirty:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.path, json.dumps(self.entries))
            except OSError:
                pass
            self.dirty = False


def digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def item_key(kind: str, inputs: dict) -> str:
    """An item's key: its kind, its inputs and edgelora's version, 20 hex digits."""
    return digest({"kind": kind, "edgelora": edgelora_version(), "inputs": inputs})[:20]


def item_dir(out: Path, kind: str, name: str, key: str) -> Path:
    return out / STORE / kind / f"{name}-{key}"


def read_item(folder: Path) -> dict | None:
    """The ``item.json`` of a finished item, or None (absent or unreadable: the item is redone)."""
    try:
        d = json.loads((folder / ITEM).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("result"), dict) else None


def prune(out: Path, keep: set) -> list:
    """Remove the item folders of ``out``'s store that are not in ``keep`` (relative paths), and
    return them: the outputs of earlier versions of the fleet's items."""
    removed = []
    root = out / STORE
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            rel = p.relative_to(out).as_posix()
            m = _TEMP.fullmatch(p.name)
            if m is not None:  # a temporary sibling: removed when its writer no longer runs
                clean_stale(folder / m.group(1))
                continue
            if rel in keep or p.name.startswith("."):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(rel)
    return removed


def relpath(p: Path, out: Path) -> str:
    return Path(os.path.relpath(p, out)).as_posix()
