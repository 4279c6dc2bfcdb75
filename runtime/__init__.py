"""The edgelora CPU runtime (NumPy + Numba): runs NF4 bundles with unmerged LoRA adapters."""
