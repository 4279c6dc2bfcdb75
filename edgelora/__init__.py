"""edgelora: fine-tuned language models on small devices.

Convert a Hugging Face checkpoint to 4-bit NF4 with double-quantized scales (bit-for-bit what
bitsandbytes produces), inspect it, and run it on CPU with hot-swappable LoRA adapters. Public API::

    import edgelora
    q = edgelora.quantize_nf4(weights)            # NF4Tensor: .packed, .scales, .dequantize()
    summary = edgelora.convert("ckpt/", "bundle/") # ConversionSummary
    info = edgelora.inspect("bundle/")             # dict (bundles, checkpoints, adapter folders)
    model = edgelora.load("bundle/")               # Model: generate, stream(_generate), chat, stream_chat, generate_batch
    edgelora.warmup("bundle/")                     # compile its kernels on this machine ahead of first use
    model.adapters.load("pirate", "adapters/pirate"); model.use("pirate")
    p = edgelora.plan("bundle/", "raspberry-pi-4-4gb", context=2048, adapters={"pirate": "adapters/pirate"})
    edgelora.deploy("bundle/", "raspberry-pi-4-4gb", "deploy/", adapters={...}, context=2048)
    model = edgelora.load("deploy/")               # verified; its memory plan enforced
    r = edgelora.evaluate("bundle/", text_file="wiki.txt", data="qa.jsonl")  # Evaluation: perplexity, loss
    eng = edgelora.Engine(model, max_batch=8); req = eng.submit("Hi", adapter="pirate")  # continuous batching
    server = edgelora.serve("bundle/", port=8080, background=True)  # the OpenAI API and a chat page (edgelora[serve])
    h = edgelora.train("bundle/", "qa.jsonl", "adapters/mine", rank=16)  # TrainHistory; a PEFT adapter folder

Every public name is documented in docs/api.md (written from these docstrings by scripts/api_docs.py).
"""

__version__ = "0.1.0"

from edgelora.errors import EdgeLoraError  # noqa: E402


_LAZY = {  # public name -> module that defines it
    "quantize_nf4": "edgelora.converters.nf4", "NF4Tensor": "edgelora.storage",
    "convert": "edgelora.converters.convert", "ConversionSummary": "edgelora.converters.convert",
    "inspect": "edgelora.inspection",
    "load": "edgelora.runtime.model", "Model": "edgelora.runtime.model",
    "Generation": "edgelora.runtime.model", "GenerationChunk": "edgelora.runtime.model",
    "TokenLogprobs": "edgelora.runtime.model", "warmup": "edgelora.runtime.warmup",
    "read_adapter": "edgelora.adapters", "describe_adapter": "edgelora.adapters", "LoraConfig": "edgelora.adapters",
    "open_bundle": "edgelora.bundle", "Bundle": "edgelora.bundle",
    "plan": "edgelora.devices.planner", "Plan": "edgelora.devices.planner",
    "measure_peak_rss": "edgelora.devices.planner",
    "list_devices": "edgelora.devices.profiles", "get_device": "edgelora.devices.profiles",
    "Device": "edgelora.devices.profiles",
    "evaluate": "edgelora.evaluation", "Evaluation": "edgelora.evaluation",
    "deploy": "edgelora.deployment", "open_deploy": "edgelora.deployment", "unpack": "edgelora.deployment",
    "Engine": "edgelora.runtime.engine", "Request": "edgelora.runtime.engine", "PromptCache": "edgelora.runtime.prompt_cache",
    "serve": "edgelora.server", "Server": "edgelora.server",
    "train": "edgelora.training", "TrainHistory": "edgelora.training", "TrainStep": "edgelora.training",
    "TrainDryRun": "edgelora.training",
}


def __getattr__(name):
    # Lazy so that `import edgelora` stays cheap (Numba compiles on first use, not on import).
    if name not in _LAZY:
        raise AttributeError(f"module 'edgelora' has no attribute {name!r}")
    import importlib
    from edgelora.limits import check_address_space
    check_address_space()  # a clear error where Numba and NumPy could not start (ulimit -v)
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__():
    # the lazy names too, so that dir(edgelora) and completion show the whole API
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["EdgeLoraError", "__version__", *_LAZY]
