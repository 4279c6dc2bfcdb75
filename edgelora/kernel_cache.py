"""Where Numba keeps edgelora's compiled kernels: the user's cache folder, never the package.

Numba's ``cache=True`` writes beside the source file (``__pycache__``), which for an installed
package means ``site-packages``: a read-only install cannot cache, ``pip uninstall`` leaves the files
behind, and a folder left there shadows a later editable install. edgelora's kernels are cached in
``$EDGELORA_HOME/kernels`` (else ``~/.cache/edgelora/kernels``) instead, in a folder per edgelora
version (and sources), Numba version and CPU, so a shared home folder never mixes machines or
versions and removing the folder is always safe. ``NUMBA_CACHE_DIR``, when set, is the user's own choice and wins.

:func:`install` adds the locator that does this; every package or module that defines kernels
(``edgelora.runtime``, ``edgelora.converters``, ``edgelora.storage``) calls it before it defines them. Compiling every kernel takes tens of seconds the
first time on a machine: ``runtime/warmup.py`` says so in one line and compiles them when a model is
loaded, and ``edgelora warmup`` does it ahead of time (at install time on a device).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import llvmlite.binding as llvm
import numba
from numba.core import caching, config

import edgelora
from edgelora import __version__
from edgelora.atomic import edgelora_home, write_text_atomic
from edgelora.errors import EdgeLoraError

#: the folders of edgelora's own modules (their real paths: in a source checkout the subpackages are
#: symlinks to the top-level folders)
_EDGELORA = Path(edgelora.__file__).resolve().parent
_OURS = frozenset({_EDGELORA, *((_EDGELORA / sub).resolve() for sub in ("runtime", "converters", "devices"))})

#: a first compilation's seconds before one is recorded here (bench/bench_startup.py: 5.9 s for
#: stories260K, 13.5 s for the 1B shape)
DEFAULT_COMPILE_SECONDS = 15.0


@functools.lru_cache(maxsize=None)
def cpu_key() -> str:
    """The CPU the kernels are compiled for, as Numba sees it (its name and a digest of its features)."""
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return f"{name}-{hashlib.sha256(features.encode()).hexdigest()[:10]}"


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """A digest of the contents of edgelora's Python files. Numba checks only the time stamp of the
    file a kernel is defined in, not of the files whose functions it inlines (``storage.block_scale``
    into ``runtime/kernels.py``): keying the folder by every source keeps an edited source tree from
    running stale machine code. The same release installed anywhere has the same digest."""
    h = hashlib.sha256()
    for folder in sorted(_OURS):
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def kernel_cache_dir() -> Path:
    """This edgelora's (version and sources), this Numba's and this CPU's kernel folder (fixed when
    first asked: kernels defined at import and the compile notes later must agree even if
    ``EDGELORA_HOME`` changes)."""
    return edgelora_home() / "kernels" / (f"edgelora-{__version__}-{sources_digest()}-numba-{numba.__version__}-"
                                          f"{cpu_key()}")


def _ours(py_file: str) -> bool:
    return Path(py_file).resolve().parent in _OURS


class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba cache locator for edgelora's own kernels: :func:`kernel_cache_dir`, one sub-folder per
    source folder (an installed copy and a source checkout never share entries); Numba itself still
    checks each source file's time stamp and size before using an entry."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(kernel_cache_dir() / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if config.CACHE_DIR or not _ours(py_file):
            return None  # NUMBA_CACHE_DIR set, or not edgelora's: Numba's own locators decide
        return super().from_function(py_func, py_file)  # None when the folder cannot be written


def _locator_list() -> list:
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")  # (renamed in Numba 0.59)
    return impl._locator_classes


def install() -> None:
    """Put :class:`KernelCacheLocator` first in Numba's list (once; other packages are unaffected)."""
    locators = _locator_list()
    if KernelCacheLocator not in locators:
        locators.insert(0, KernelCacheLocator)


# ---------------------------------------------------------------------------------------------
# which configurations are compiled (runtime/warmup.py)
# ---------------------------------------------------------------------------------------------

def _ready_file() -> Path:
    return kernel_cache_dir() / "ready.json"


def compiled_configurations() -> dict:
    """``{signature: seconds its first compilation took}`` of what is compiled on this machine."""
    try:
        known = json.loads(_ready_file().read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def record_compiled(signature: str, seconds: float) -> None:
    known = compiled_configurations()
    known[signature] = round(seconds, 2)
    try:
        write_text_atomic(_ready_file(), json.dumps(known, indent=1, sort_keys=True))
    except EdgeLoraError:
        pass  # an unwritable cache folder only means compiling again next time


def expected_compile_seconds() -> float:
    """How long a first compilation takes here: the longest one recorded, else a typical figure."""
    seconds = [v for v in compiled_configurations().values() if isinstance(v, (int, float)) and v > 0]
    return max(seconds) if seconds else DEFAULT_COMPILE_SECONDS
