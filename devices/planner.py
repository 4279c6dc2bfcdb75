"""Memory planning: does a bundle, at a context length, with its adapters, fit a device?

The plan adds what a generation holds at its peak, item by item, each from the runtime's own
allocation pattern (``runtime/llama.py``, ``runtime/model.py``, ``runtime/lora.py``):

* **weights**: the bundle's ``model.safetensors``, memory-mapped; a decode step reads every page
  of it (with an untied head the input embedding is read only at the rows of the tokens used,
  so this is an upper bound there), except a float16 head (or the embedding tied to it) that the
  int8 products copy as int8 at load: its pages are let go as the copy is made (the rows of the
  tokens used come back), and the copy is an item of its own, **head as int8**;
* **KV cache**: keys and values, float16 as a default load holds them (or float32: ``kv_cache``),
  ``2 x layers x context x kv_heads x head_dim``;
* **rotary tables**: cos and sin for every position, float32 ``[context, head_dim]`` each;
* **scratch**: the largest working set of a forward pass at the end of the context: a prefill
  chunk of ``min(256, context)`` tokens attends block by block (``runtime/llama.py``
  ``attention_blockwise``: two ``[heads, chunk, 128]`` score blocks and its running sums, whatever
  the context), a decode step holds its ``[heads, context]`` scores (three at once), the MLP its
  ``[chunk, intermediate]`` activations (three at once); plus one dequantized 4 MB weight tile
  per thread (chunks of more than 32 tokens), the residual stream and the logits;
* **adapters**: A and B in float32 (B transposed once), DoRA's magnitude, trained biases and saved
  modules, exactly as ``model.adapters.load`` keeps them;
* **tokenizer**: measured by building it in this process;
* **runtime**: Python, NumPy, Numba with its compiled kernels and the tokenizer library, measured
  (not guessed) by running the real runtime on the small built-in demo model in a fresh process
  and subtracting that run's own items; the figure is cached per software versions, machine
  architecture, thread count and LoRA use (``$EDGELORA_HOME/overhead.json``). A training plan's is
  measured the same way by a short training run of the demo model (a trainer loads fewer kernels
  than a generating process).

A **training** plan (``train=``, ``edgelora plan --train``) holds, instead of the KV cache and the
forward's scratch, what ``edgelora train`` holds at its peak for sequences of ``tokens`` tokens
(``runtime/backward.py``'s ``training_memory``): the adapter, its gradients (the step's sums
and one sequence's), AdamW's two moments, each layer's input kept for the recomputation, one
layer recomputed with its backward's working arrays, and a chunk of the head's logits; the
rotary tables of ``tokens`` positions; the tokenizer and the runtime as above.
:func:`measure_train_peak_rss` runs such a plan (``plan --train --measure``).

A plan's total is checked against the peak RSS of real runs: :func:`measure_peak_rss` runs a plan
on this machine (``edgelora plan --measure``), ``tests/test_devices.py`` holds plans to within 10%
of it, and ``bench/bench_plan.py`` reports both on a 1B-parameter shape.
"""

from __future__ import annotations

import hashlib
import os
import json
import math
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.architectures import architecture
from edgelora.atomic import edgelora_home, sha256_file, write_text_atomic
from edgelora.child import python_command
from edgelora.config import ModelArgs
from edgelora.devices.profiles import Device, get_device, host_arch, host_device
from edgelora.errors import EdgeLoraError, UsageError
from edgelora.products import DEFAULT_ADAPTER_DTYPE, DEFAULT_KV_CACHE, KV_CACHE_BYTES, check_kv_cache
from edgelora.runtime.kernels import MATVEC_ROWS_MAX, PARALLEL_MIN_WEIGHTS, TILE_ELEMENTS
from edgelora.runtime.llama import KEY_BLOCK, KVCache
from edgelora.runtime.model import PREFILL_CHUNK
from edgelora.runtime.warmup import status_line

F32 = 4
MB = 1e6


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    device: Device
    bundle: str
    context: int
    threads: int
    items: list
    adapters: dict  # name -> resident bytes
    max_context: int  # the largest context that fits (0: none)
    model_max_context: int
    suggestions: list = field(default_factory=list)
    overhead_source: str = ""
    train: dict | None = None  # a training plan's options (context: its tokens per sequence)
    kv_cache: str = DEFAULT_KV_CACHE  # what the KV cache holds (edgelora.products.KV_CACHES)

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def budget_bytes(self) -> int:
        return self.device.budget_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def adapter_bytes(self) -> int:
        return sum(self.adapters.values())

    def to_dict(self) -> dict:
        return {"device": self.device.to_dict(), "bundle": self.bundle, "context": self.context,
                "threads": self.threads, "fits": self.fits, "total_bytes": self.total_bytes,
                "budget_bytes": self.budget_bytes, "headroom_bytes": self.budget_bytes - self.total_bytes,
                "items": [{"name": i.name, "bytes": i.bytes, "note": i.note} for i in self.items],
                "adapters": dict(self.adapters), "adapter_bytes": self.adapter_bytes,
                "max_context": self.max_context, "model_max_context": self.model_max_context,
                "suggestions": list(self.suggestions), "overhead_source": self.overhead_source,
                "train": self.train, "kv_cache": self.kv_cache}

    def text(self) -> str:
        d = self.device
        what = (f"training rank {self.train['rank']} on {self.train['targets']}, sequences of {self.context} tokens"
                if self.train else f"context {self.context}")
        lines = [f"plan: {self.bundle} on {d.name} ({d.title or d.arch}), {what}, "
                 f"{self.threads} thread{'s' if self.threads != 1 else ''}"]
        for i in self.items:
            lines.append(f"  {i.name:<14}{i.bytes / MB:>10.1f} MB  {i.note}")
        lines.append(f"  {'total':<14}{self.total_bytes / MB:>10.1f} MB")
        lines.append(f"  {'budget':<14}{self.budget_bytes / MB:>10.1f} MB  {d.app_share:.0%} of "
                     f"{d.ram_mib / 1024:g} GiB RAM")
        if self.fits:
            unit = "sequence" if self.train else "context"
            largest = (f"every {unit} up to the model's limit ({self.model_max_context}) fits"
                       if self.max_context == self.model_max_context
                       else f"the largest {unit} that fits is {self.max_context}"
                       + (" tokens" if self.train else ""))
            lines.append(f"fits: {(self.budget_bytes - self.total_bytes) / MB:.1f} MB to spare; {largest}")
        else:
            lines.append(f"does not fit: {(self.total_bytes - self.budget_bytes) / MB:.1f} MB over the budget")
        lines.extend(f"  - {s}" for s in self.suggestions)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the items
# ---------------------------------------------------------------------------------------------

def kv_cache_bytes(a: ModelArgs, context: int, kv_cache: str = DEFAULT_KV_CACHE) -> int:
    return KVCache.planned_bytes(a, context, kv_cache)


def rope_bytes(a: ModelArgs, context: int) -> int:
    return 2 * context * a.rotary_dim * F32


def _layer_linears(a: ModelArgs) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each projection of a layer, by module name (fused ones as they are stored)."""
    arch = architecture(a)
    return {arch.PROJECTIONS[field]: shape for field, shape in arch.projection_shapes(a).items()}


def _shapes(a: ModelArgs) -> list[tuple[int, int]]:
    return list(_layer_linears(a).values())


def context_limit(a: ModelArgs) -> int:
    """The longest context the runtime runs this model at (the model's own limit, or less: e.g.
    Phi-3 longrope models run within original_max_position_embeddings)."""
    from edgelora.runtime.loader import FAMILIES
    return FAMILIES[a.family].context_limit(a)


def compiled_decode(a: ModelArgs) -> bool:
    """Whether the model's family decodes through ``runtime/decode.py``'s compiled steps."""
    from edgelora.runtime.loader import FAMILIES
    return a.family in FAMILIES and FAMILIES[a.family].compiled_decode


def uses_parallel_kernels(a: ModelArgs, threads: int) -> bool:
    shapes = _shapes(a) + [(a.vocab_size, a.hidden_size)]
    return threads > 1 and any(n * k >= PARALLEL_MIN_WEIGHTS for n, k in shapes)


def scratch_bytes(a: ModelArgs, context: int, threads: int, kv_cache: str = DEFAULT_KV_CACHE) -> tuple[int, str]:
    """Peak working memory of a forward pass at the end of ``context`` positions (a float16 KV
    cache's key and value blocks are widened as a prompt's attention reads them)."""
    T, S = min(PREFILL_CHUNK, context), context
    nh, hd, H, I, V = a.num_attention_heads, a.head_dim, a.hidden_size, a.intermediate_size, a.vocab_size
    # a prefill chunk's attention, one block of keys at a time: this block's scores while the last
    # block's are still held, or its products with the values, beside the running sum of values;
    # the block's mask and the running maxima and sums
    block, values = nh * T * min(KEY_BLOCK, S) * F32, nh * T * hd * F32
    prefill = max(2 * block, block + values) + values + 2 * T * min(KEY_BLOCK, S) + 6 * nh * T * F32
    if kv_cache != "float32":  # a block of keys and one of values, copied and widened to float32
        prefill += 2 * min(KEY_BLOCK, S) * a.num_key_value_heads * hd * (F32 + KV_CACHE_BYTES[kv_cache])
    decode = 3 * nh * S * F32 + 9 * S  # a decode step's scores (masked copy, softmax), positions and mask
    if kv_cache != "float32" and not compiled_decode(a):  # (a family without the compiled step attends over
        decode += 2 * S * a.num_key_value_heads * hd * (F32 + KV_CACHE_BYTES[kv_cache])  # its keys and values widened)
    attn = max(prefill, decode)
    mlp_in = sum(out for name, (out, k) in _layer_linears(a).items() if name.startswith("mlp.") and k == H)
    mlp = T * (mlp_in + I) * F32  # the MLP's input projections' outputs and their gated product
    stream = 8 * T * max(H, nh * hd) * F32  # x, h, q, k, v, attention output and their rope copies
    tiles = 0  # a prefill product: each thread dequantizes one tile of its rows at a time
    if T > MATVEC_ROWS_MAX:  # fewer rows run on the batched decode kernel: no tiles
        for n, k in _shapes(a):
            used = threads if threads > 1 and n * k >= PARALLEL_MIN_WEIGHTS else 1
            rows = min(max(1, TILE_ELEMENTS // k), -(-n // used))
            tiles = max(tiles, used * rows * k * F32)
    logits = V * F32 + 3 * V * 8  # last-position logits, the sampler's float64 work
    total = max(attn, mlp) + stream + tiles + logits
    what = "attention" if attn >= mlp else "MLP activations"
    return total, f"{T}-token chunk at position {S}: {what} {max(attn, mlp) / MB:.1f} MB, " \
                  f"weight tiles {tiles / MB:.1f} MB"


def adapter_resident_bytes(path, args: ModelArgs) -> int:
    """Bytes ``model.adapters.load`` keeps for this adapter (checked against the base)."""
    from edgelora.adapters import read_adapter
    ad = read_adapter(path, args, held=DEFAULT_ADAPTER_DTYPE)  # as a default load holds it
    dora = sum(p.B.shape[0] * F32 for p in ad.pairs.values() if p.magnitude is not None)  # the norms g
    return ad.nbytes + dora


def tokenizer_bytes(bundle_path: Path) -> tuple[int, str]:
    """Memory a tokenizer built from the bundle holds, measured (else 3x its file). Measured once
    per machine and tokenizer, in a fresh process, and kept in ``$EDGELORA_HOME/overhead.json`` by
    the files' sha256 and the versions: building it again in a process reuses memory the allocator
    kept from the first build, so a measurement in a busy process sees almost nothing grow, and
    plans (which deploy folders keep as ``plan.json``) must not differ with what a process did
    before."""
    files = [p for p in (bundle_path / "tokenizer.json", bundle_path / "tokenizer_config.json") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    digest = hashlib.sha256(b"".join(sha256_file(p).encode() for p in files)).hexdigest()
    key = f"tokenizer {digest}|{_overhead_key(1)}"
    known = _read_overhead_cache()
    if isinstance(known.get(key), int):
        return known[key], "measured"
    done = subprocess.run(python_command(_TOKENIZER_PROBE, bundle_path), capture_output=True, text=True, timeout=300)
    try:
        grown = int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 3 * size, "estimated as 3x tokenizer.json"
    if grown < 0:  # no /proc here
        return 3 * size, "estimated as 3x tokenizer.json"
    _write_overhead_cache(key, max(grown, size))
    return max(grown, size), "measured"


_TOKENIZER_PROBE = r"""
import sys
from pathlib import Path
from edgelora.memory import current_rss_bytes
from edgelora.runtime.tokenizer import Tokenizer
before = current_rss_bytes()
tok = Tokenizer.from_dir(Path(sys.argv[1]))
print(-1 if before is None else current_rss_bytes() - before)
"""


# ---------------------------------------------------------------------------------------------
# the runtime's own overhead, measured
# ---------------------------------------------------------------------------------------------

_PROBE = r"""
import json, sys
import numpy as np
import edgelora
from edgelora.memory import peak_rss_bytes
from edgelora.runtime.kernels import NF4Linear, F16Linear
from edgelora.storage import NF4Tensor
bundle, threads, adapter = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = edgelora.load(bundle, threads=threads, max_context=64)
model.eos_ids = set()
rng = np.random.default_rng(0)
ids = rng.integers(3, model.args.vocab_size, 56).tolist()
model.net.compiled_decode = False  # decode steps through the NumPy layer first (as Phi-3 and Gemma)
model.generate(ids, max_new_tokens=4, temperature=0)
peaks = [peak_rss_bytes()]
del model.net.compiled_decode  # then the compiled decode steps (runtime/decode.py) of the Llama family
model.generate(ids, max_new_tokens=4, temperature=0)
peaks.append(peak_rss_bytes())
# the threaded kernels, which the demo's small weights do not reach: random codes and scales
n = 512 * 256
w = NF4Tensor(rng.integers(0, 256, n // 2, dtype=np.uint8), rng.integers(0, 256, n // 64, dtype=np.uint8),
              np.full(-(-n // 64 // 256), 0.01, np.float32), np.float32(0.0), (512, 256))
x = rng.standard_normal((4, 256)).astype(np.float32)
for lin in (NF4Linear(w), F16Linear((rng.standard_normal((512, 256)) * 0.02).astype(np.float16))):
    lin.matvec(x[0]); lin.matmul(x)
peaks.append(peak_rss_bytes())
model.adapters.load("probe", adapter)
model.generate(ids, max_new_tokens=4, temperature=0, adapter="probe")
peaks.append(peak_rss_bytes())
print(json.dumps(peaks))
"""


#: the revision of what the measured overheads leave out (the planned items they are measured
#: against): 2 since NF4 weights are held as tiles on x86-64 (their items no longer the file's bytes),
#: 3 since the float16 head's int8 codes are too (its rows rounded up to tiles of 16), 4 since NF4
#: tiles hold their blocks' scale codes (a byte a block) instead of float32 scales
OVERHEAD_REVISION = 4


def _overhead_key(threads: int) -> str:
    import numba
    import numpy
    from edgelora import __version__
    return (f"edgelora {__version__}|python {platform.python_version()}|numpy {numpy.__version__}|"
            f"numba {numba.__version__}|{host_arch()}|threads {threads}|items {OVERHEAD_REVISION}")


def measure_runtime_overhead(threads: int, refresh: bool = False) -> dict:
    """The runtime's own memory on this machine, in bytes: ``base`` (Python, NumPy, Numba, the
    tokenizer library, the single-thread kernels), ``decode`` (more for the compiled decode steps of
    the families that have them, ``runtime/decode.py``), ``parallel`` (more for the threaded kernels,
    used with weights of 64K elements or more and more than one thread) and ``lora`` (more for the
    adapter kernels, beyond the adapter's own arrays). A fresh process runs the built-in demo model
    through each in turn (twice: the first run may compile); each figure is its peak RSS growth
    minus that run's own planned items. Cached per versions, architecture and thread count."""
    import numba
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    key = _overhead_key(threads)
    entry = _read_overhead_cache().get(key)
    if not refresh and isinstance(entry, dict) and all(isinstance(entry.get(k), int)
                                                       for k in ("base", "decode", "parallel", "lora")):
        return dict(entry, source=f"measured on this machine ({threads} threads, cached)")
    from edgelora.bundle import Bundle
    from edgelora.demo import demo_bundle, packaged_demo_adapters
    bundle, _ = demo_bundle(edgelora_home() / "demo", quiet=True)
    adapter = next(iter(packaged_demo_adapters().values()))
    args = python_command(_PROBE, bundle, threads, adapter)
    status_line(f"edgelora: measuring the runtime's memory on this machine ({threads} threads; once, some seconds)")
    for _ in range(2):  # the first run may compile kernels (more memory): measure a warm one
        done = subprocess.run(args, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise EdgeLoraError(f"measuring the runtime's memory failed: {done.stderr.strip()[-800:]}")
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    with Bundle(bundle) as b:
        a = b.args
        host = host_device()  # (the weights' items as a plan for this machine has them)
        tiles, tiles_released = tiles_bytes(b, host)
        weights = _weights_bytes(Path(bundle)) - released_head_bytes(b) - tiles_released + int8_head_bytes(b, host) + tiles
        own = weights + kv_cache_bytes(a, 64) + rope_bytes(a, 64) + scratch_bytes(a, 64, 1)[0]
    entry = {"base": max(0, peaks[0] - own), "decode": max(0, peaks[1] - peaks[0]),
             "parallel": max(0, peaks[2] - peaks[1]),
             "lora": max(0, peaks[3] - peaks[2] - adapter_resident_bytes(adapter, a))}
    _write_overhead_cache(key, entry)
    return dict(entry, source=f"measured on this machine ({threads} threads)")


_TRAIN_PROBE = {"rank": 8, "targets": "q,v", "tokens": 64}  # the training run that measures a trainer's own


def measure_train_overhead(threads: int, refresh: bool = False) -> dict:
    """A training process's own memory on this machine, in bytes (``train``: in a training plan, in
    place of :func:`measure_runtime_overhead`'s ``base``, ``decode`` and ``lora``): a short training
    run of the built-in demo model (:func:`measure_train_run`, twice: the first run may compile)
    less that run's planned items. A trainer loads fewer kernels than a generating process (25 MB
    fewer on a Zen 3 machine). Measured only when a training plan asks; cached as
    :func:`measure_runtime_overhead`'s figures."""
    import numba
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    key = f"train|{_overhead_key(threads)}"
    known = _read_overhead_cache().get(key)
    if not refresh and isinstance(known, int) and not isinstance(known, bool):
        return {"train": known, "source": f"measured on this machine ({threads} threads, cached)"}
    from edgelora.demo import demo_bundle
    bundle, _ = demo_bundle(edgelora_home() / "demo", quiet=True)
    status_line(f"edgelora: measuring a trainer's memory on this machine ({threads} threads; once, some seconds)")
    for _ in range(2):  # (the first run may compile kernels: measure a warm one)
        trained = measure_train_run(bundle, _TRAIN_PROBE, threads, steps=2, timeout=900)["peak_rss_bytes"]
    planned = plan(bundle, "raspberry-pi-4-4gb", threads=threads, train=_TRAIN_PROBE, overhead=0).total_bytes
    value = max(0, trained - planned)
    _write_overhead_cache(key, value)
    return {"train": value, "source": f"measured on this machine ({threads} threads)"}


def _read_overhead_cache() -> dict:
    """The measurements kept in ``$EDGELORA_HOME/overhead.json`` (empty when absent or unreadable)."""
    try:
        known = json.loads((edgelora_home() / "overhead.json").read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_overhead_cache(key: str, value) -> None:
    known = _read_overhead_cache()
    known[key] = value
    try:
        write_text_atomic(edgelora_home() / "overhead.json", json.dumps(known, indent=1))
    except EdgeLoraError:
        pass  # an unwritable cache only costs a second measurement


def _weights_bytes(bundle_path: Path) -> int:
    return (bundle_path / "model.safetensors").stat().st_size


_RUN = r"""
import json, sys
import numpy as np
import edgelora
from edgelora.memory import peak_rss_bytes
bundle, ctx, threads, adapters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
kv_cache = sys.argv[5]
model = edgelora.load(bundle, threads=threads, max_context=ctx, adapters=adapters, kv_cache=kv_cache)
if adapters:
    model.use(next(iter(adapters)))
model.eos_ids = set()
prompt = max(1, ctx - 3)
ids = np.random.default_rng(0).integers(3, model.args.vocab_size, prompt).tolist()
model.generate(ids, max_new_tokens=max(1, ctx - prompt), temperature=0)
print(json.dumps(peak_rss_bytes()))
"""


def measure_peak_rss(bundle: str | os.PathLike, context: int, adapters: dict | None = None, threads: int = 1,
                     timeout: float | None = None, kv_cache: str = DEFAULT_KV_CACHE) -> int:
    """Run a plan for real on this machine and return the peak resident memory, in bytes: a fresh
    process loads ``bundle`` with ``adapters`` ``{name: folder}`` resident (the first in use) and
    a KV cache of ``context`` positions (holding ``kv_cache``), then fills that cache to its end (a random prompt of
    ``context - 3`` tokens and 3 generated tokens). Peak RSS is read from ``/proc`` (Linux). A
    load in a process before it compiles the kernels this machine has not compiled yet, so the
    figure is a warm run's (compiling takes memory once, not on every start)."""
    import os
    threads = max(1, min(int(threads), os.cpu_count() or 1))
    named = json.dumps({k: str(v) for k, v in (adapters or {}).items()})
    args = python_command(_RUN, bundle, int(context), threads, named, check_kv_cache(kv_cache))
    warm = python_command(_WARM, bundle, threads, int(context))  # a first load compiles what this machine lacks: not measured
    try:
        subprocess.run(warm, capture_output=True, text=True, timeout=timeout)
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgeLoraError(f"running the plan took more than {timeout:.0f} s", bundle) from None
    if done.returncode != 0:
        raise EdgeLoraError(f"running the plan failed: {done.stderr.strip()[-800:]}", bundle)
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


_WARM = r"""
import sys
import edgelora
edgelora.load(sys.argv[1], threads=int(sys.argv[2]), max_context=int(sys.argv[3]))
"""


_TRAIN = r"""
import json, sys
import edgelora
from edgelora.memory import peak_rss_bytes
bundle, out, data, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
h = edgelora.train(bundle, data, out, progress=False, **opts)
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "tokens_per_second": h.tokens_per_second}))
"""


def measure_train_peak_rss(bundle: str | os.PathLike, train: dict | None = None, threads: int = 1,
                           steps: int = 2, timeout: float | None = None) -> int:
    """Run a training plan for real on this machine and return the peak resident memory, in bytes:
    a fresh process trains ``steps`` steps with :func:`edgelora.train` on random text examples of
    exactly ``train["tokens"]`` tokens each (one a step), with the plan's rank, targets and
    recomputation."""
    return measure_train_run(bundle, train, threads, steps, timeout)["peak_rss_bytes"]


def measure_train_run(bundle: str | os.PathLike, train: dict | None = None, threads: int = 1,
                      steps: int = 2, timeout: float | None = None) -> dict:
    """:func:`measure_train_peak_rss`'s run: ``{"peak_rss_bytes", "tokens_per_second"}``."""
    import tempfile
    import numpy as np
    from edgelora.bundle import Bundle
    from edgelora.runtime.tokenizer import Tokenizer
    t = train_options(train)
    with Bundle(Path(bundle), verify=False) as b:
        vocab = b.args.vocab_size
    tok = Tokenizer.from_dir(Path(bundle))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        lines = []
        for _ in range(steps):  # random text of more tokens than the plan's, cut to them by max_length
            text = tok.decode(rng.integers(3, vocab, 3 * t["tokens"] + 8).tolist(), skip_special_tokens=True)
            lines.append(json.dumps({"text": text}))
        data = Path(work) / "data.jsonl"
        data.write_text("\n".join(lines) + "\n")
        opts = {"rank": t["rank"], "targets": t["targets"], "recompute": t["recompute"], "steps": steps,
                "threads": threads, "batch_tokens": t["tokens"], "max_length": t["tokens"]}
        args = python_command(_TRAIN, bundle, Path(work) / "out", data, json.dumps(opts))
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgeLoraError(f"running the training plan took more than {timeout:.0f} s", bundle) from None
    if done.returncode != 0:
        raise EdgeLoraError(f"running the training plan failed: {done.stderr.strip()[-800:]}", bundle)
    return json.loads(done.stdout.strip().splitlines()[-1])


TRAIN_DEFAULTS = {"rank": 16, "targets": "all-linear", "tokens": 256, "recompute": "layer"}


def train_options(train: dict | bool | None) -> dict:
    """A training plan's options (``rank``, ``targets``, ``tokens`` per sequence, ``recompute``) with
    ``edgelora train``'s defaults (256 tokens: a typical on-device example) for those not given."""
    t = dict(TRAIN_DEFAULTS, **({} if train in (None, True) else dict(train)))
    unknown = set(t) - set(TRAIN_DEFAULTS)
    if unknown:
        raise UsageError(f"train plan options are {', '.join(TRAIN_DEFAULTS)}; got {', '.join(sorted(unknown))}")
    for k in ("rank", "tokens"):
        if not isinstance(t[k], int) or isinstance(t[k], bool) or t[k] < 1:
            raise UsageError(f"train {k} must be a positive integer, got {t[k]!r}")
    return t


class _TrainSizes:
    """A training plan's items for any sequence length (the decoder built once, weights mapped)."""

    def __init__(self, bundle_path: Path, t: dict, threads: int):
        from edgelora.bundle import Bundle
        from edgelora.runtime.backward import target_modules
        from edgelora.runtime.loader import build_model
        from edgelora.training import module_name, resolve_targets
        self.t, self.threads = t, threads
        with Bundle(bundle_path, verify=False) as b:
            self.net = build_model(b, 1)
            self.modules = [module_name(b.args, f) for f in resolve_targets(b.args, t["targets"])]
            self.n_modules = len(target_modules(self.net, self.modules))

    def items(self, tokens: int) -> list:
        from edgelora.runtime.backward import training_memory
        t = self.t
        m = training_memory(self.net, (t["rank"], self.modules), tokens, threads=self.threads,
                            checkpoint=t["recompute"])
        return [Item("adapter", m["adapter"], f"rank {t['rank']} on {self.n_modules} modules, A and B in float32"),
                Item("gradients", 2 * m["grads"], "a sequence's, and the step's sums"),
                Item("optimizer", m["optimizer"], "AdamW's two moments, float32"),
                Item("checkpoints", m["checkpoints"], f"each layer's input, {tokens} tokens (recompute: "
                                                      f"{t['recompute']})"),
                Item("layer", m["layer"], "one layer recomputed, its backward's working arrays and tiles"),
                Item("head", m["head"], "a chunk of logits with its softmax and gradient")]


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

def int8_head_bytes(bundle, dev: Device | None = None) -> int:
    """What the default int8 products hold beside an opened bundle's float16 output head (or the
    float16 embedding tied to it): ``runtime/int8.py``'s ``F16Int8Linear``, an int8 code a weight
    and a float32 scale a block of ``Q8_BLOCK``, rows rounded up to whole tiles of 16 where
    :func:`device_tiles` (``runtime.int8_gemm.Q8Tiles``); 0 where the head stays float16 or is NF4."""
    from edgelora.architectures import EMBED, HEAD
    from edgelora.products import DEFAULT_PRODUCTS
    from edgelora.runtime.int8 import Q8_BLOCK
    from edgelora.runtime.int8_gemm import tiles_nbytes
    e = bundle.entries.get(f"{EMBED if bundle.args.tie_word_embeddings else HEAD}.weight")
    if DEFAULT_PRODUCTS != "int8" or e is None or e.storage != "float16" or len(e.shape) != 2 or e.shape[1] % Q8_BLOCK:
        return 0
    n, k = e.shape
    return tiles_nbytes(n, k, Q8_BLOCK, 8) if dev is not None and device_tiles(dev) else n * k + 4 * n * (k // Q8_BLOCK)


def released_head_bytes(bundle) -> int:
    """The float16 head's (or tied embedding's) bytes of ``model.safetensors`` that are not resident
    while the model runs: those :func:`int8_head_bytes` copies (``runtime.loader.let_go``); 0 otherwise.
    (Training reads the float16 head whole, so a training plan counts its pages.)"""
    from edgelora.architectures import EMBED, HEAD
    if not int8_head_bytes(bundle):
        return 0
    return 2 * math.prod(bundle.entries[f"{EMBED if bundle.args.tie_word_embeddings else HEAD}.weight"].shape)


def device_tiles(dev: Device) -> bool:
    """Whether the default int8 products repack NF4 weights at load on ``dev``
    (``runtime.int8.TILED``: x86-64 with AVX2, as its profile's ``simd`` lists it)."""
    from edgelora.products import DEFAULT_PRODUCTS
    return DEFAULT_PRODUCTS == "int8" and dev.arch == "x86_64" and "avx2" in dev.simd


def _repacked(bundle, shape, role: str) -> bool:
    """Whether the int8 products repack an NF4 weight of ``shape`` and ``role`` of an opened bundle
    where :func:`device_tiles` (``int8.supports_int8``; an embedding not tied to the head is only
    looked up)."""
    from edgelora.runtime.int8 import INT8_BLOCK_MULTIPLE
    bs = bundle.quantization["block_size"]
    return len(shape) == 2 and shape[1] % bs == 0 and bs % INT8_BLOCK_MULTIPLE == 0 and not (
        role == "embedding" and not bundle.args.tie_word_embeddings)


def _nested_block_size(bundle) -> int:
    """The nested block size of an opened bundle's double quantization, 0 without it."""
    from edgelora.storage import NESTED_BLOCK_SIZE
    q = bundle.quantization
    return int(q.get("nested_block_size", NESTED_BLOCK_SIZE)) if q["double_quant"] else 0


def tiles_bytes(bundle, dev: Device) -> tuple[int, int]:
    """``(held, released)`` of an opened bundle on ``dev``: where :func:`device_tiles`, the tiles the
    int8 products make of its NF4 weights at load (``runtime.int8_gemm.Tiles``) and those weights'
    stored bytes in ``model.safetensors``, whose pages are let go once read (``runtime.loader.let_go``);
    ``(0, 0)`` elsewhere. An NF4 embedding not tied to the head is only looked up: not repacked."""
    if not device_tiles(dev):
        return 0, 0
    from edgelora.runtime.int8_gemm import tiles_nbytes
    from edgelora.safetensors_io import DTYPES
    from edgelora.storage import NF4Storage
    bs, dq = bundle.quantization["block_size"], bundle.quantization["double_quant"]
    nested = _nested_block_size(bundle)
    held = released = 0
    for e in bundle.entries.values():
        if e.storage != "nf4" or not _repacked(bundle, e.shape, e.role):
            continue
        held += tiles_nbytes(*e.shape, bs, nested_block_size=nested)
        released += sum(DTYPES[dt].itemsize * math.prod(shape) for _, dt, shape in NF4Storage(bs, dq).entries(e.name, e.shape))
    return held, released


_HEAD_NOTE = "the float16 head's int8 codes and scales (int8 products, made at load)"
_TILES_NOTE = ("the NF4 weights repacked for the int8 products at load (16-row tiles, a block's scale code, or its "
               "float32 scale without double quantization)")


def _items(a: ModelArgs, weights: int, context: int, threads: int, adapters: dict, tok: tuple,
           overhead: tuple, train: "_TrainSizes | None" = None, head: int = 0, tiles: int = 0,
           kv_cache: str = DEFAULT_KV_CACHE) -> list:
    """``overhead``: (bytes, note) of the runtime itself; ``train``: a training plan's sizes
    (``context`` is then the tokens of a sequence); ``head``: :func:`int8_head_bytes`; ``tiles``:
    :func:`tiles_bytes`' held bytes."""
    held = ([Item("head as int8", head, _HEAD_NOTE)] if head else []) + (
        [Item("weights as tiles", tiles, _TILES_NOTE)] if tiles else [])
    let_go = [what for what, size in (("the float16 head's", head), ("the repacked NF4 weights'", tiles)) if size]
    mapped = "model.safetensors, memory-mapped" + (f", less {' and '.join(let_go)} pages (let go once copied)"
                                                   if let_go and train is None else "")
    if train is not None:
        return ([Item("weights", weights, mapped)] + held +
                [Item("rotary tables", rope_bytes(a, context), f"cos and sin, {context} x {a.head_dim} float32")]
                + train.items(context) + [Item("tokenizer", tok[0], tok[1]),
                                          Item("runtime", overhead[0], f"Python, NumPy, Numba and kernels: {overhead[1]}")])
    scratch, scratch_note = scratch_bytes(a, context, threads, kv_cache)
    items = [Item("weights", weights, mapped)] + held + [
             Item("KV cache", kv_cache_bytes(a, context, kv_cache),
                  f"{a.num_hidden_layers} layers x {context} positions x {a.num_key_value_heads} KV heads "
                  f"x {a.head_dim} x 2 x {kv_cache}"),
             Item("rotary tables", rope_bytes(a, context), f"cos and sin, {context} x {a.head_dim} float32"),
             Item("scratch", scratch, scratch_note)]
    for name, size in adapters.items():
        items.append(Item(f"adapter {name}", size, "LoRA A and B in float32"))
    items.append(Item("tokenizer", tok[0], tok[1]))
    items.append(Item("runtime", overhead[0], f"Python, NumPy, Numba and kernels: {overhead[1]}"))
    return items


def plan(bundle: str | os.PathLike, device: str | Device, context: int | None = None, adapters: dict | None = None,
         threads: int | None = None, overhead: int | None = None, train: dict | bool | None = None,
         kv_cache: str = DEFAULT_KV_CACHE) -> Plan:
    """Plan running ``bundle`` on ``device`` (a profile name, a ``.toml`` path or a ``Device``) with
    a KV cache of ``context`` positions (default: the runtime's default, min(model limit, 2048))
    and the LoRA ``adapters`` ``{name: folder}`` resident. ``threads`` defaults to the device's cores.
    ``overhead`` replaces the measured runtime overhead (bytes).

    ``train``: plan ``edgelora train`` instead: ``True`` or ``{"rank": 16, "targets": "all-linear",
    "tokens": 256, "recompute": "layer"}`` (any of them; these are the defaults), ``tokens`` being
    the longest sequence trained (its ``context``); ``max_context`` is then the longest that fits.
    ``kv_cache``: what the KV cache holds, ``"float32"`` or ``"float16"`` (half its bytes)."""
    check_kv_cache(kv_cache)
    if train is not None and train is not False:
        if adapters:
            raise UsageError("a training plan holds the adapter being trained; leave out adapters")
        t = train_options(train)
        if context is not None and context != t["tokens"]:
            raise UsageError(f"a training plan's context is its tokens per sequence ({t['tokens']}); give one of them")
        context = t["tokens"]
    else:
        t = None
    from edgelora.bundle import Bundle
    from edgelora.runtime.loader import DEFAULT_MAX_CONTEXT
    dev = get_device(device)
    bundle_path = Path(bundle)
    with Bundle(bundle_path, verify=False) as b:
        a = b.args
        # a trainer loads exact products (``training.train``): no int8 copies
        head = int8_head_bytes(b, dev) if t is None else 0
        tiles, tiles_released = tiles_bytes(b, dev) if t is None else (0, 0)
        released = released_head_bytes(b) + tiles_released if t is None else 0
    limit = context_limit(a)
    context = min(limit, DEFAULT_MAX_CONTEXT) if context is None else int(context)
    if not 1 <= context <= limit:
        what = "max_position_embeddings" if limit == a.max_position_embeddings else "context limit in edgelora"
        raise UsageError(f"context must be between 1 and the model's {what} ({limit}), got {context}")
    threads = dev.cores if threads is None else int(threads)
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    sizes = {name: adapter_resident_bytes(p, a) for name, p in (adapters or {}).items()}
    training = None if t is None else _TrainSizes(bundle_path, t, threads)
    if overhead is None:
        m = measure_runtime_overhead(threads)
        parallel = [m["parallel"]] if uses_parallel_kernels(a, threads) else []
        if t is not None:  # a trainer's own (its adapter kernels included)
            m = measure_train_overhead(threads)
            parts = [m["train"]] + parallel
        else:
            parts = [m["base"]] + ([m["decode"]] if compiled_decode(a) else []) + parallel + \
                ([m["lora"]] if sizes else [])
        note = m["source"] + ("" if dev.arch == host_arch() else f"; {dev.arch} assumed like {host_arch()}")
        over = (sum(parts), note)
    else:
        over = (int(overhead), "given")
    tok = tokenizer_bytes(bundle_path)
    weights = _weights_bytes(bundle_path) - released

    def total(ctx: int) -> int:
        return sum(i.bytes for i in _items(a, weights, ctx, threads, sizes, tok, over, training, head, tiles, kv_cache))

    lo, hi = 0, limit  # the largest context whose total fits (totals grow with the context)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= dev.budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    p = Plan(device=dev, bundle=str(bundle_path), context=context, threads=threads,
             items=_items(a, weights, context, threads, sizes, tok, over, training, head, tiles, kv_cache),
             adapters=sizes, max_context=lo, model_max_context=limit, overhead_source=over[1], train=t,
             kv_cache=kv_cache)
    p.suggestions = _suggest(p, a)
    return p


def _float16_savings(bundle_path: Path, dev: Device | None = None) -> int:
    """Bytes saved by storing the bundle's float16 embeddings and head in NF4 instead (0 if none): in
    ``model.safetensors`` without ``dev``; with it, in a plan for ``dev``, where an NF4 head (or
    the embedding tied to it) is held as tiles instead of its pages (:func:`tiles_bytes`)."""
    from edgelora.bundle import Bundle
    from edgelora.runtime.int8_gemm import tiles_nbytes
    from edgelora.safetensors_io import DTYPES
    from edgelora.storage import NF4Storage
    with Bundle(bundle_path, verify=False) as b:
        block, dq = b.quantization["block_size"], b.quantization["double_quant"]
        tiled = dev is not None and device_tiles(dev)
        saved = 0
        for e in b.entries.values():
            if e.role in ("embedding", "head") and e.storage == "float16":
                entries = NF4Storage(block, dq).entries(e.name, e.shape)
                nf4 = sum(DTYPES[dt].itemsize * math.prod(shape) for _, dt, shape in entries)
                tiles = tiled and _repacked(b, e.shape, e.role)
                held = tiles_nbytes(*e.shape, block, nested_block_size=_nested_block_size(b)) if tiles else nf4
                saved += 2 * math.prod(e.shape) - held
    return saved


def _suggest(p: Plan, a: ModelArgs) -> list:
    """What to change when a plan does not fit, each with the bytes it frees."""
    if p.fits:
        return []
    over = p.total_bytes - p.budget_bytes
    out = []
    if p.train and p.max_context >= 1:
        out.append(f"train on sequences of at most {p.max_context} tokens (edgelora train --max-length "
                   f"{p.max_context}), or with a lower --rank or fewer --targets")
    elif p.max_context >= 1:
        out.append(f"use --context {p.max_context} (the largest that fits; {p.context} needs {over / MB:.1f} MB more)")
    else:
        fixed = sum(i.bytes for i in p.items if i.name in ("weights", "head as int8", "weights as tiles", "tokenizer",
                                                            "runtime"))
        out.append(f"even a 1-token context does not fit: weights, tokenizer and runtime alone need "
                   f"{fixed / MB:.1f} MB of the {p.budget_bytes / MB:.1f} MB budget")
    for name, size in sorted(p.adapters.items(), key=lambda kv: -kv[1]):
        if size >= over:
            out.append(f"or leave out adapter {name!r} ({size / MB:.1f} MB)")
            break
    else:
        if p.adapters:
            out.append(f"or leave out adapters: all together they take {p.adapter_bytes / MB:.1f} MB")
    kv = next((i.bytes for i in p.items if i.name == "KV cache"), 0)
    if p.kv_cache == "float32" and kv:  # (a float16 cache's widened blocks add a little scratch back)
        halved = kv // 2 - (scratch_bytes(a, p.context, p.threads, "float16")[0]
                            - scratch_bytes(a, p.context, p.threads, "float32")[0])
        enough = "enough" if halved >= over else "not enough alone"
        out.append(f"or --kv-cache float16: {halved / MB:.1f} MB less ({enough}; perplexity within 0.1 %, "
                   f"see README, KV cache)")
    # an NF4 head is not copied, and its pages stay (--products exact would keep the float16 head's
    # pages instead of the int8 copy: more, so it is no suggestion)
    from edgelora.bundle import Bundle
    held = sum(i.bytes for i in p.items if i.name == "head as int8")
    with Bundle(Path(p.bundle), verify=False) as b:
        released = released_head_bytes(b)
    saved = _float16_savings(Path(p.bundle), p.device) + held - released
    if saved >= 0.05 * MB:  # (what prints as 0.0 MB is no suggestion)
        out.append(f"or convert again with --embeddings nf4 --head nf4: {saved / MB:.1f} MB less "
                   f"({'enough' if saved >= over else 'not enough alone'}; at some cost in quality, see README)")
    out.append("or choose a device with more memory, or a smaller model")
    return out
