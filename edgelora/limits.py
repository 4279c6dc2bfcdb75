"""Process limits the runtime cannot start under, refused with a clear error before they bite.

Under an address-space limit (``ulimit -v``, ``RLIMIT_AS``) of 256 MiB, importing Numba fails deep in
llvmlite (``failed to map segment from shared object``) and NumPy's OpenBLAS prints "Memory
allocation still failed" and exits the process from C, where no exception can be caught. Measured
with ``edgelora run`` on the demo model: it fails at 512 MiB and runs at 768 MiB, so below
:data:`MIN_ADDRESS_SPACE` the CLI and the first use of the Python API raise
:class:`~edgelora.errors.UnsupportedError` instead, before Numba or NumPy is loaded. A model's
weights (mapped or read) need their own size on top.
"""

from __future__ import annotations

from edgelora.errors import UnsupportedError

MIN_ADDRESS_SPACE = 768 << 20  # bytes


def check_address_space() -> None:
    """Raise ``UnsupportedError`` when the address-space limit is below :data:`MIN_ADDRESS_SPACE`."""
    try:
        import resource
    except ImportError:  # not a POSIX system: no such limit
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and 0 <= soft < MIN_ADDRESS_SPACE:
        raise UnsupportedError(f"the address-space limit (ulimit -v) is {soft >> 20} MiB; edgelora's runtime needs at "
                               f"least {MIN_ADDRESS_SPACE >> 20} MiB (Numba's compiler and NumPy's BLAS reserve it when "
                               f"they start) plus the model's size: raise the limit (ulimit -v unlimited)")
