"""One-step loading of a model that is not a bundle yet (as ``mlx_lm.load`` or llama.cpp's
``Llama(model_path=...)``): a Hugging Face checkpoint folder or hub id, a GGUF file or an ONNX
model given to :func:`edgelora.load` (or ``edgelora run``/``chat``) is converted once, with
:func:`edgelora.convert`'s options, into ``$EDGELORA_HOME/bundles/<digest>`` and loaded from
there. The digest covers the source's files (names, sizes, modification times), the options and
edgelora's version: a changed checkpoint or other options convert again; the same ones reuse the
bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from edgelora import __version__
from edgelora.atomic import edgelora_home
from edgelora.errors import UsageError

MANIFEST = "manifest.json"  # a bundle's or a deploy folder's (edgelora.bundle, edgelora.deployment)
#: the options of edgelora.convert a one-step load takes (merging an adapter is convert's alone)
CONVERT_OPTIONS = ("block_size", "double_quant", "embeddings", "head")


def cache_dir() -> Path:
    """Where converted sources are kept: ``$EDGELORA_HOME/bundles``."""
    return edgelora_home() / "bundles"


def source_digest(src: Path, options: Mapping[str, Any]) -> str:
    """A key for ``src`` converted with ``options``: its resolved path, each file's name, size and
    modification time, the options and edgelora's version."""
    h = hashlib.sha256(json.dumps({"edgelora": __version__, "source": str(src.resolve()),
                                   "options": dict(options)}, sort_keys=True).encode())
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
    for f in files:
        st = f.stat()
        name = f.name if f == src else f.relative_to(src).as_posix()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def bundle_path(path: str | os.PathLike, convert_options: Mapping[str, Any] | None = None) -> Path:
    """``path`` itself when it is a bundle or a deploy folder; otherwise the bundle converted from
    it (a checkpoint folder, hub id, GGUF file or ONNX model) in :func:`cache_dir`, converted now
    (after a one-line notice on a terminal) unless it is there already."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        if convert_options:
            raise UsageError("convert_options apply to a model that is not converted yet; this is a bundle", p)
        return p
    options = dict(convert_options or {})
    unknown = sorted(set(options) - set(CONVERT_OPTIONS))
    if unknown:
        raise UsageError(f"unknown convert option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(CONVERT_OPTIONS)} (merge an adapter with edgelora.convert)")
    from edgelora.converters.convert import convert, resolve_source  # (the converters only when converting)
    from edgelora.runtime.warmup import status_line
    src = resolve_source(path)
    out = cache_dir() / source_digest(src, options)
    if (out / MANIFEST).is_file():
        return out
    status_line(f"edgelora: converting {path} to NF4 once, into {out} (edgelora convert does the same)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert(src, out, progress=sys.stderr is not None and sys.stderr.isatty(), **options)
    except UsageError:
        if (out / MANIFEST).is_file():  # another process converted it meanwhile
            return out
        raise
    return out
