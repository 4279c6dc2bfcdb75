"""edgelora: fine-tuned language models on small devices.

Convert a Hugging Face checkpoint to 4-bit NF4 with double-quantized scales (bit-for-bit what
bitsandbytes produces), inspect it, and run it on CPU with hot-swappable LoRA adapters. Public API::

    import edgelora
    q = edgelora.quantize_nf4(weights)            # NF4Tensor: .packed, .scales, .dequantize()
    summary = edgelora.convert("ckpt/", "bundle/") # ConversionSummary
    info = edgelora.inspect("bundle/")             # dict (bundles, checkpoints, adapter folders)
    model = edgelora.load("bundle/")               # Model: generate, stream, chat, generate_batch
    model.adapters.load("pirate", "adapters/pirate"); model.use("pirate")
"""

__version__ = "0.1.0"

from edgelora.errors import EdgeLoraError  # noqa: E402


def __getattr__(name):
    # Lazy so that `import edgelora` stays cheap (Numba compiles on first use, not on import).
    if name in ("quantize_nf4", "NF4Tensor"):
        from edgelora.converters import nf4
        return getattr(nf4, name)
    if name in ("convert", "ConversionSummary"):
        from edgelora.converters import convert as _convert
        return getattr(_convert, name)
    if name in ("inspect",):
        from edgelora.inspect import inspect
        return inspect
    if name in ("load", "Model"):
        from edgelora.runtime import model
        return getattr(model, name)
    if name in ("read_adapter", "describe_adapter", "LoraConfig"):
        from edgelora import adapters
        return getattr(adapters, name)
    if name in ("open_bundle", "Bundle"):
        from edgelora import bundle
        return getattr(bundle, name)
    raise AttributeError(f"module 'edgelora' has no attribute {name!r}")


__all__ = ["EdgeLoraError", "NF4Tensor", "quantize_nf4", "convert", "ConversionSummary", "inspect", "load", "Model",
           "open_bundle", "Bundle", "read_adapter", "describe_adapter", "LoraConfig", "__version__"]
