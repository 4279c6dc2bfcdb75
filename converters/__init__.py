"""Converters: checkpoints as people have them (Hugging Face, ONNX, GGUF, bitsandbytes) to NF4 bundles."""

from edgelora.kernel_cache import install as _install_kernel_cache

_install_kernel_cache()  # before the quantizer's kernels are defined: they are cached in the user's cache folder
