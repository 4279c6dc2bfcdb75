"""Writing outputs so that a crash, a kill or a full disk leaves the old output or nothing.

Files: write a temporary sibling, fsync, ``os.replace``. Directories: build the whole tree in a
temporary sibling directory, fsync its files, then rename it into place (replacing an old output
only when asked, by renaming it aside first and deleting it after the new one is in place).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from edgelora.errors import OutputError, UsageError


def edgelora_home() -> Path:
    """Where edgelora keeps its caches: ``$EDGELORA_HOME``, else ``$XDG_CACHE_HOME/edgelora``, else
    ``~/.cache/edgelora``."""
    base = os.environ.get("EDGELORA_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "edgelora")
    return Path(base)


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error(e: OSError, path) -> OutputError:
    """Turn an OSError met while writing into a one-line OutputError with the fix."""
    if e.errno == errno.ENOSPC:
        return OutputError("disk full while writing; free space or choose another output folder", path)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write here ({e.strerror}); choose another output folder", path)
    return OutputError(f"cannot write: {e.strerror or e}", path)


def write_bytes_atomic(path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(e, path) from None
    _fsync_dir(path.parent)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def check_output_dir(out, overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError("output already exists; choose a new path or pass overwrite=True (--overwrite)", out)
    if out.exists() and not out.is_dir():
        raise UsageError("output exists and is not a directory", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a folder" if parent.exists() or any(
            q.exists() and not q.is_dir() for q in parent.parents) else f"parent folder {parent} does not exist", out)
    return out


@contextlib.contextmanager
def atomic_output_dir(out, overwrite: bool = False):
    """Yield a temporary directory; on success it becomes ``out`` in one rename."""
    out = check_output_dir(out, overwrite)
    tmp = _tmp_sibling(out, "tmp")
    try:
        tmp.mkdir()
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = _tmp_sibling(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
