"""Compiling every kernel a model runs, once, before it is timed or used (llama.cpp's warm-up run).

Numba compiles a kernel for each combination of argument types the first time it meets it; which
combinations a model meets depends on its storage (NF4, float16 or float32 tensors), on whether its
weights are mapped (read-only arrays) or read into memory, and on whether products run on one thread
or several. :func:`compile_kernels` runs the model through each path once on throwaway caches: a
prefill long enough for the tile path, a short one for the batched matrix-vector path, single decode
steps and a batched one, with all its threads and with one (the thread governor may drop to one),
and the adapter kernel. Nothing of the model changes.

``load`` does this when the model's configuration is not yet compiled on this machine, after a
one-line notice, so the first generation is not a 15-30 s silence and no speed it reports includes
compilation; :func:`warmup` (``edgelora warmup``) does it ahead of time, e.g. when a device is set up.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from edgelora import kernel_cache
from edgelora.products import DEFAULT_PRODUCTS
from edgelora.runtime.kernels import MATVEC_ROWS_MAX
from edgelora.runtime.int8 import F16Int8Linear
from edgelora.runtime.lora import (BASE, lora_matvec_add, lora_matvec_add_parallel, lora_stack_add,
                                   lora_stack_add_parallel, widened)
from edgelora.runtime.threads import thread_count


def signature(model) -> str:
    """What decides which kernels ``model`` needs: its tensors' storages, mapped or in memory, one
    thread or several, the int8 product path when it is chosen (and whether some weights, rows
    not of whole 64-entry blocks, keep the exact kernels beside it; whether its float16 head runs
    as int8), how its decode steps run, and what its KV cache holds (a float16 one's bits)."""
    storages = "+".join(sorted({e.storage for e in model.bundle.entries.values()}))
    mapped = "mapped" if model.bundle.weights.mapped else "in-memory"
    threads = "parallel" if model.threads > 1 else "serial"
    products = ""
    if model.products == "int8":  # (weights the int8 path cannot take keep the exact kernels)
        net = model.net
        linears = [getattr(L, k) for L in net.w.layers for k in net.arch.PROJECTIONS] + [net.w.head]
        products = "|int8" + ("+exact" if any(getattr(x, "int8", True) is False for x in linears) else "") + (
            "+q8head" if isinstance(net.w.head, F16Int8Linear) else "")
    net = model.net  # decode steps: one compiled call, compiled pieces, or NumPy (runtime/decode.py)
    decode = "one-call" if net.compiled_decode and net.compiled_layers is not None else (
        "pieces" if net.compiled_decode else "numpy")
    kv = "" if model.kv_cache == "float32" else f"|kv-{model.kv_cache}"
    return f"{storages}|{mapped}|{threads}{products}|{decode}{kv}"


def _passes(net) -> None:
    ids = np.arange(min(MATVEC_ROWS_MAX + 1, net.max_context), dtype=np.int64) % net.args.vocab_size
    net.forward(ids, net.new_cache())  # the tile path (more rows than MATVEC_ROWS_MAX)
    caches = [net.new_cache(), net.new_cache()]
    for cache in caches:
        net.forward(ids[:2], cache)  # the batched matrix-vector path (a short prompt)
        if cache.length < net.max_context:
            net.forward(ids[:1], cache)  # a decode step
    if all(c.length < net.max_context for c in caches):
        net.forward_batch(ids[:2], caches, [BASE, BASE])  # a batched decode step


def compile_kernels(model) -> None:
    """Run every kernel ``model`` uses once (compiling it, or loading it from the kernel cache)."""
    for n in sorted({model.threads, 1}, reverse=True):
        with thread_count(n):
            _passes(model.net)
    x, A, Bt = np.zeros(8, np.float32), np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32)
    lora_matvec_add(x, A, Bt, np.float32(1.0), np.zeros(8, np.float32), np.empty(2, np.float32))
    for kind in (np.float32, np.uint16):  # adapters held in float32, and in float16 (as its bits)
        stack = (x, A.astype(kind), Bt.ravel().astype(kind), np.ones(2, np.float32), np.array([0, 1, 2]),
                 np.array([0, 8, 16]), np.array([0, 8]), np.zeros(16, np.float32))  # two modules of one row each
        lora_stack_add(*stack, np.empty(2, np.float32))
        if model.threads > 1:
            lora_stack_add_parallel(*stack, np.empty(2, np.float32), 2)
    widened(np.zeros(8, np.float16))  # a float16 adapter's arrays for a prompt's products
    if model.threads > 1:
        lora_matvec_add_parallel(x, A, Bt, np.float32(1.0), np.zeros(8, np.float32), np.empty(2, np.float32), 2)


def status_line(text: str) -> None:
    """A one-line status for a person watching a terminal (nothing when stderr is not a terminal)."""
    if sys.stderr is not None and sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def ensure_compiled(model, force: bool = False) -> float:
    """Compile every kernel ``model`` runs unless its configuration is compiled on this machine
    already (``force``: run them all anyway); the seconds spent (0 when nothing was to do). The first
    time, a one-line notice on the terminal says how long it will take."""
    sig = signature(model)
    if not force and sig in kernel_cache.compiled_configurations():
        return 0.0
    if sig not in kernel_cache.compiled_configurations():
        status_line(f"edgelora: compiling kernels for this CPU (once, about "
                    f"{kernel_cache.expected_compile_seconds():.0f} s)")
    t = time.perf_counter()
    compile_kernels(model)
    seconds = time.perf_counter() - t
    kernel_cache.record_compiled(sig, seconds)
    return seconds


@dataclass
class WarmupReport:
    bundle: str
    configuration: str  # the compiled configuration (:func:`signature`)
    seconds: float  # spent compiling, or loading compiled kernels
    kernel_cache: str  # where the compiled kernels are

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        return (f"kernels ready for {self.bundle} ({self.configuration}) in {self.seconds:.1f} s\n"
                f"kernel cache: {self.kernel_cache}")


def warmup(path: str | os.PathLike | None = None, threads: int | None = None, mmap: bool = True,
           products: str = DEFAULT_PRODUCTS, kv_cache: str | None = None) -> WarmupReport:
    """Compile every kernel a bundle or deploy folder needs on this machine, ahead of its first use
    (``path=None``: the built-in demo model, whose kernels are those of every bundle stored as
    convert's defaults write it). Later loads with the same options (``products`` and ``kv_cache``
    among them) start without compiling."""
    import edgelora
    if path is None:
        from edgelora.demo import default_workdir, demo_bundle
        path = demo_bundle(default_workdir(), quiet=True)[0]
    model = edgelora.load(path, threads=threads, mmap=mmap, warmup=False, products=products, kv_cache=kv_cache)
    seconds = ensure_compiled(model, force=True)
    return WarmupReport(str(path), signature(model), seconds, str(kernel_cache.kernel_cache_dir()))
