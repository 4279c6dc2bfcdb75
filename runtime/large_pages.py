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
mapping whose start is 2 MB-aligned, exactly as long as the array (rounded up to 4 KB: the tail
past the last whole 2 MB stays small pages, so no memory is taken that the array does not use),
advised ``MADV_HUGEPAGE``, unmapped when the array and every view of it are gone. Elsewhere (not
Linux, a smaller array, a failed mapping) it is ``np.empty``. The contents are the caller's to
write, as with ``np.empty``; which pages hold them changes no bit of any result.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

#: the size of a large page (x86-64's and most aarch64 kernels' transparent huge page)
LARGE_PAGE = 2 << 20
#: arrays smaller than this come from ``np.empty``: they hold no whole large page
MIN_BYTES = LARGE_PAGE

_LIBC = None
if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.mmap.restype = ctypes.c_void_p
        _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # (no C library to call)
        _LIBC = None
_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """``nbytes`` of anonymous memory starting on a large-page boundary, advised ``MADV_HUGEPAGE``;
    NumPy reads it through ``__array_interface__`` and keeps this object as the array's base, so
    :meth:`__del__` unmaps it once no array uses it."""

    def __init__(self, nbytes: int):
        size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        span = size + LARGE_PAGE  # room to move the start onto a boundary
        addr = _LIBC.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr is None or addr == _FAILED:
            raise MemoryError(f"mmap of {span} bytes failed (errno {ctypes.get_errno()})")
        start = -(-addr // LARGE_PAGE) * LARGE_PAGE
        if start > addr:  # the parts before and after the aligned run go back at once
            _LIBC.munmap(addr, start - addr)
        if addr + span > start + size:
            _LIBC.munmap(start + size, addr + span - start - size)
        _LIBC.madvise(start, size, mmap.MADV_HUGEPAGE)  # (refused where the kernel has no THP: small pages then)
        self.address, self.size = start, size
        self.__array_interface__ = {"data": (start, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}

    def __del__(self):
        if _LIBC is not None and getattr(self, "size", 0):
            _LIBC.munmap(self.address, self.size)
            self.size = 0


def empty(count: int, dtype) -> np.ndarray:
    """A new 1-D array of ``count`` entries of ``dtype``, contents undefined (as ``np.empty``), on
    2 MB pages where the system gives them (module docstring)."""
    dtype = np.dtype(dtype)
    nbytes = int(count) * dtype.itemsize
    if _LIBC is None or nbytes < MIN_BYTES:
        return np.empty(count, dtype)
    try:
        return np.asarray(_Mapping(nbytes)).view(dtype)
    except MemoryError:
        return np.empty(count, dtype)
