"""Writing outputs so that a crash, a kill or a full disk leaves the old output or nothing.

Files: write a temporary sibling, fsync, ``os.replace``. Directories: build the whole tree in a
temporary sibling directory, fsync its files, then rename it into place. An old output is replaced
only when asked, and only one this tool wrote (its manifest names the expected format and lists
every file in it): on Linux by exchanging the two in one ``renameat2(RENAME_EXCHANGE)``, so that at
every instant the output path holds the old output or the new one; where the system or the file
system has no exchange, by renaming the old one aside and the new one in (a kill between the two
leaves the old output in its ``.NAME.old-PID-...`` sibling, put back by the next run).

Temporary siblings are named ``.NAME.tmp-PID-RANDOM``; those of processes that no longer run (a
kill, a power cut) are removed by the next run that writes ``NAME`` (:func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
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


def build_time() -> int:
    """The time written into manifests and archives, in seconds since the epoch: now, or
    ``SOURCE_DATE_EPOCH`` where set (the reproducible-builds convention), so that the same inputs
    written twice give the same bytes (``edgelora fleet`` and byte-for-byte comparisons rely on it)."""
    import time
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            return max(0, int(epoch))
        except ValueError:
            raise UsageError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return int(time.time())


def utc_stamp() -> str:
    """:func:`build_time` as ``YYYY-MM-DDTHH:MM:SSZ``."""
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(build_time()))


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or not a pid at all): leave its files alone
    return True


def clean_stale(path) -> None:
    """Remove the temporary siblings of ``path`` (``.NAME.tmp-PID-...``) left by processes that no
    longer run; an old output set aside by one (``.NAME.old-PID-...``) is put back when ``path`` is
    missing, else removed. Best effort: what cannot be removed stays."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    try:
        siblings = list(os.scandir(path.parent if str(path.parent) else "."))
    except OSError:
        return
    for entry in sorted(siblings, key=lambda e: e.name):
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(2))):
            continue
        stale = Path(entry.path)
        with contextlib.suppress(OSError):
            if m.group(1) == "old" and not os.path.lexists(path):
                os.rename(stale, path)
            elif stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc 2.28+); False
    where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _not_ours(out: Path, owner: str) -> str | None:
    """Why ``out`` is not an output of format ``owner`` that may be replaced, or None when it is: its
    ``manifest.json`` says ``owner`` and lists every file under it (nothing of the user's inside)."""
    try:
        with open(out / "manifest.json", "rb") as f:
            m = json.loads(f.read(16 << 20))
    except (OSError, ValueError, RecursionError):
        return "it has no readable manifest.json"
    if not isinstance(m, dict) or m.get("format") != owner or not isinstance(m.get("files"), dict):
        return f"its manifest.json is not an {owner} manifest"
    listed = {*m["files"], "manifest.json"}
    for root, dirs, files in os.walk(out):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), out).replace(os.sep, "/")
            if rel not in listed:
                return f"it holds {rel!r}, which its manifest does not list"
    return None


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


def check_output_dir(out, overwrite: bool, owner: str | None = None) -> Path:
    """Refuse an existing output (unless ``overwrite``) before any work is done. ``owner``: the
    format (``edgelora-bundle``, ``edgelora-deploy``) an existing output must be to be replaced, so
    that ``--overwrite`` never deletes a folder this tool did not write."""
    out = Path(out)
    clean_stale(out)
    if out.exists() and not overwrite:
        raise UsageError("output already exists; choose a new path or pass overwrite=True (--overwrite)", out)
    if out.exists() and not out.is_dir():
        raise UsageError("output exists and is not a directory", out)
    why = _not_ours(out, owner) if out.exists() and owner is not None else None
    if why is not None:
        raise UsageError(f"--overwrite replaces only a folder edgelora wrote, and {why}; remove it yourself or "
                         f"choose another output", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a folder" if parent.exists() or any(
            q.exists() and not q.is_dir() for q in parent.parents) else f"parent folder {parent} does not exist", out)
    return out


@contextlib.contextmanager
def atomic_output_dir(out, overwrite: bool = False, owner: str | None = None):
    """Yield a temporary directory; on success it becomes ``out`` in one rename (or one exchange with
    the old output; ``owner``: see :func:`check_output_dir`)."""
    out = check_output_dir(out, overwrite, owner)
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
            if _exchange(tmp, out):  # tmp now holds the old output
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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
