"""``edgelora bench``: prompt processing, decode speed, time to first token and peak RSS of a bundle,
with the machine's measured memory bandwidth turned into the decode speed limit.

Each configuration runs in a fresh process so its peak RSS is its own. Decode is bounded by
memory bandwidth: every generated token reads every weight once, so
``bound = bandwidth / bytes read per token`` and the achieved fraction is ``tok/s / bound``.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgelora.child import python_command
from edgelora.errors import EdgeLoraError, UsageError
from edgelora.memory import peak_rss_bytes
from edgelora.runtime.warmup import status_line


def memory_bandwidth(threads: int, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a streaming read of a large float32 array: ``threads`` threads each
    sum a slice with NumPy (which releases the GIL), best of ``repeats``."""
    a = np.ones(size_bytes // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass faults the pages in
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads (every linear, the output head, norms): a weight's copy
    made at load where the step reads that instead of the stored bytes (the int8 path's tiles of
    NF4 weights, the float16 head's int8 codes), else the stored bytes."""
    net = model.net

    def read(lin) -> int:
        return getattr(lin, "resident_nbytes", 0) or lin.nbytes

    total = read(net.w.head) + net.w.norm.nbytes
    for L in net.w.layers:
        total += sum(read(getattr(L, k)) for k in net.arch.PROJECTIONS)
        total += L.attn_norm.nbytes + L.mlp_norm.nbytes + sum(b.nbytes for b in L.biases.values())
    return int(total)


def run_one(path, threads: int, prompt_tokens: int, decode_tokens: int, mmap: bool = True, runs: int = 3,
            products: str = "exact", kv_cache: str | None = None) -> dict:
    """One measurement in this process (call in a fresh process for a clean peak RSS): one warm-up
    generation at full length (pages faulted in, caches filled), then the median of ``runs``."""
    import statistics
    import edgelora
    t = time.perf_counter()
    kw = {} if mmap else {"mmap": False}  # (earlier versions, run by ``bench(env=...)``, have no mmap option)
    try:
        from edgelora.products import DEFAULT_PRODUCTS as default
    except ImportError:  # (nor a products option: they multiply exactly)
        default = "exact"
    if products != default:
        kw["products"] = products
    if kv_cache is not None:  # (None: the load's default, or a deploy folder's plan)
        kw["kv_cache"] = kv_cache
    model = edgelora.load(path, threads=threads, max_context=prompt_tokens + decode_tokens + 8, **kw)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.args.vocab_size, prompt_tokens).tolist()
    model.eos_ids = set()
    list(model.stream(prompt, max_new_tokens=2, temperature=0))  # warm up: compile, fault in, at full length
    long, short, decode = [], [], []
    for _ in range(runs):
        list(model.stream(prompt, max_new_tokens=1, temperature=0))
        long.append(model.last_stats)
        list(model.stream(prompt[:128], max_new_tokens=1, temperature=0))
        short.append(model.last_stats)
        list(model.stream(prompt[:8], max_new_tokens=decode_tokens, temperature=0))  # as the PyTorch benchmark decodes
        decode.append(model.last_stats)
    med = statistics.median
    return {"threads": threads, "mmap": mmap, "products": products,
            "kv_cache": getattr(model, "kv_cache", "float32"), "load_seconds": load_s, "runs": runs, "prompt_tokens": prompt_tokens,
            "prefill_tokens_per_second": med(s.prefill_tokens_per_second for s in long),
            "prefill_128_tokens_per_second": med(s.prefill_tokens_per_second for s in short),
            "decode_tokens": decode_tokens, "decode_tokens_per_second": med(s.decode_tokens_per_second for s in decode),
            "time_to_first_token": med(s.time_to_first_token for s in long), "bytes_per_token": bytes_per_token(model),
            "kv_cache_bytes": model.kv_cache_bytes,
            "peak_rss_bytes": peak_rss_bytes()}


def context_limit(path) -> int:
    """The most positions ``path`` may hold: a deploy folder's planned context, else the model's."""
    from edgelora.bundle import Bundle
    from edgelora.deployment import is_deploy, open_deploy
    if is_deploy(path):
        return open_deploy(path, verify=False, device_check=False).context
    b = Bundle(path, verify=False)
    try:
        return b.args.max_position_embeddings
    finally:
        b.close()


def token_counts(limit: int, prompt_tokens: int | None, decode_tokens: int | None) -> tuple[int, int]:
    """The prompt and decode lengths to measure within ``limit`` positions (8 spare): defaults
    512 and 128, shortened to fit; lengths given that do not fit are refused."""
    room = limit - 8
    decode = decode_tokens if decode_tokens is not None else min(128, max(1, room // 4))
    prompt = prompt_tokens if prompt_tokens is not None else min(512, room - decode)
    if prompt < 1 or decode < 1:
        raise UsageError(f"--prompt-tokens and --decode-tokens must be at least 1, got {prompt} and {decode}")
    if prompt + decode > room:
        raise UsageError(f"--prompt-tokens {prompt} + --decode-tokens {decode} (+8) exceed the {limit} positions "
                         f"this model holds; use at most {room} in all")
    return prompt, decode


def bench(path, threads_list: list[int] | None = None, prompt_tokens: int | None = None,
          decode_tokens: int | None = None, mmap: bool = True, env: dict | None = None, runs: int = 3,
          products: str = "exact", kv_cache: str | None = None) -> dict:
    """One fresh process per thread count (``env``: their environment, e.g. a ``PYTHONPATH`` that
    puts another edgelora version first, for before/after comparisons in one run: the children run
    this module's measurement, :func:`run_one`, on whichever edgelora they import). Each reports
    the median of ``runs`` after one warm-up; ``prompt_tokens``/``decode_tokens`` default to 512
    and 128, shortened to the model's context (:func:`token_counts`). ``products``: ``"exact"`` or
    ``"int8"``, and ``kv_cache`` (None: the load's default), as ``edgelora.load`` takes them."""
    import inspect
    import numba
    cores = numba.config.NUMBA_NUM_THREADS
    threads_list = threads_list or sorted({1, cores})
    for th in threads_list:
        if not 1 <= th <= cores:
            raise UsageError(f"threads must be between 1 and {cores} on this machine, got {th}")
    if runs < 1:
        raise UsageError(f"runs must be at least 1, got {runs}")
    prompt_tokens, decode_tokens = token_counts(context_limit(path), prompt_tokens, decode_tokens)
    measure = "\n".join(inspect.getsource(f) for f in (bytes_per_token, run_one))
    rows = []
    for th in threads_list:
        status_line(f"edgelora bench: {th} thread{'s' * (th != 1)}: loading, one warm-up and {runs} runs "
                    f"of {prompt_tokens} + {decode_tokens} tokens...")
        code = ("import json, sys, time\nimport numpy as np\nfrom edgelora.memory import peak_rss_bytes\n" + measure +
                f"\nprint(json.dumps(run_one(sys.argv[1], {th}, {prompt_tokens}, {decode_tokens}, {mmap!r}, {runs}, "
                f"{products!r}, {kv_cache!r})))")
        r = subprocess.run(python_command(code, path), capture_output=True, text=True, env=env)
        if r.returncode:
            raise EdgeLoraError(f"the benchmark process failed: "
                                f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit code {r.returncode}'}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["bandwidth_bytes_per_second"] = memory_bandwidth(th)
        row["decode_bound_tokens_per_second"] = row["bandwidth_bytes_per_second"] / row["bytes_per_token"]
        row["fraction_of_bound"] = row["decode_tokens_per_second"] / row["decode_bound_tokens_per_second"]
        rows.append(row)
    return {"bundle": str(path), "cores": cores, "results": rows}


def format_bench(report: dict) -> str:
    runs = report["results"][0].get("runs", 1)
    kv = report["results"][0].get("kv_cache", "float32")
    lines = [f"bundle {report['bundle']} ({report['cores']} cores; {kv} KV cache; median of {runs} "
             f"run{'s' * (runs != 1)} after a warm-up)",
             f"| threads | prefill tok/s ({report['results'][0]['prompt_tokens']}) | prefill tok/s (128) | decode tok/s "
             "| TTFT s | bandwidth GB/s "
             "| decode bound tok/s | achieved | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['threads']} | {r['prefill_tokens_per_second']:.1f} | {r['prefill_128_tokens_per_second']:.1f} "
                     f"| {r['decode_tokens_per_second']:.2f} | {r['time_to_first_token']:.3f} "
                     f"| {r['bandwidth_bytes_per_second'] / 1e9:.1f} | {r['decode_bound_tokens_per_second']:.1f} "
                     f"| {r['fraction_of_bound']:.0%} | {r['peak_rss_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)
