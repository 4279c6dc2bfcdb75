"""The edgelora CPU runtime (NumPy + Numba): runs NF4 bundles with unmerged LoRA adapters."""

from edgelora.kernel_cache import install as _install_kernel_cache

_install_kernel_cache()  # before any kernel is defined: compiled kernels go to the user's cache folder
