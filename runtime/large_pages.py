"""Arrays on 2 MB pages: the repacked weights that every decode step streams through.

A decode step reads every projection's tiles once (``int8_gemm.Tiles``: 0.5-9 MB each for a 1B
model, 112 of them) and the head's (``Q8Tiles``). On 4 KB pages each 4 KB of that stream is a TLB
entry to find: a step of every layer ran 1.02-1.05x faster on the 1B shape (1.01-1.02x on
TinyLlama) from the arrays made here than from the same bytes in NumPy's arrays (bench/README,
*Tiles on 2 MB pages*).
Linux hands out 2 MB pages (transparent huge pages) to anonymous memory advised with
``MADV_HUGEPAGE`` when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise`` (the usual default); NumPy advises its own allocations of 4 MB and more, but they are
not 2 MB-aligned, so their first and last 2 MB stay small pages, and smaller arrays all do.

:func:`empty` maps each array of :data:`MIN_BYTES` or more on its own: a private anonymous
mapping (the standard library's ``mmap``) viewed from its first 2 MB boundary, advised
``MADV_HUGEPAGE`` over the array's own length (rounded up to 4 KB: the tail past the last whole
2 MB stays small pages, and the untouched pages around it take no memory), unmapped when the
array and every view of it are gone. Elsewhere (not Linux, a smaller array, a failed mapping) it
is ``np.empty``. The contents are the caller's to write, as with ``np.empty``; which pages hold
them changes no bit of any result.
"""

from __future__ import annotations

import mmap

import numpy as np

#: the size of a large page (x86-64's and most aarch64 kernels' transparent huge page)
LARGE_PAGE = 2 << 20
#: arrays smaller than this come from ``np.empty``: they hold no whole large page
MIN_BYTES = LARGE_PAGE
#: whether this system takes ``MADV_HUGEPAGE`` (Linux) and private anonymous mappings
AVAILABLE = all(hasattr(mmap, n) for n in ("MADV_HUGEPAGE", "MAP_PRIVATE", "MAP_ANONYMOUS"))


def _mapped(nbytes: int) -> np.ndarray:
    """``nbytes`` uint8 of a private anonymous mapping, starting on a large-page boundary and
    advised ``MADV_HUGEPAGE`` over its length rounded up to 4 KB. The mapping is ``LARGE_PAGE``
    longer, for the boundary; the pages outside the array are never touched, so they take no
    memory. The mapping goes when the last array viewing it does (the array's base holds it)."""
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    mm = mmap.mmap(-1, size + LARGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mm, np.uint8)
    start = -whole.ctypes.data % LARGE_PAGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, size)
    except OSError:  # (a kernel without THP: small pages then)
        pass
    return whole[start:start + nbytes]


def empty(count: int, dtype) -> np.ndarray:
    """A new 1-D array of ``count`` entries of ``dtype``, contents undefined (as ``np.empty``), on
    2 MB pages where the system gives them (module docstring)."""
    dtype = np.dtype(dtype)
    nbytes = int(count) * dtype.itemsize
    if not AVAILABLE or nbytes < MIN_BYTES:
        return np.empty(count, dtype)
    try:
        return _mapped(nbytes).view(dtype)
    except OSError:  # (no mapping to be had: NumPy's memory)
        return np.empty(count, dtype)
