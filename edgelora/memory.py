"""Resident-memory readings of the current process (Linux ``/proc``, ``getrusage`` elsewhere).

Light on purpose (standard library only) so benchmark children can import it without pulling in
NumPy or Numba.
"""

from __future__ import annotations

import resource
import sys


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's ``VmHWM`` belongs to the current address space. ``ru_maxrss`` is only the fallback:
    Linux carries it across ``exec`` from the forking parent, so a child started by a large
    process would report the parent's peak.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int | None:
    """Resident memory now (Linux only; ``None`` elsewhere)."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024
