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
from edgelora.memory import peak_rss_bytes


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
    """Weight bytes one decode step reads (every linear, the output head, norms)."""
    net = model.net
    total = net.w.head.nbytes + net.w.norm.nbytes
    for L in net.w.layers:
        total += sum(getattr(L, k).nbytes for k in net.arch.PROJECTIONS)
        total += L.attn_norm.nbytes + L.mlp_norm.nbytes + sum(b.nbytes for b in L.biases.values())
    return int(total)


def run_one(path, threads: int, prompt_tokens: int, decode_tokens: int, mmap: bool = True,
            products: str = "exact") -> dict:
    """One measurement in this process (call in a fresh process for a clean peak RSS)."""
    import edgelora
    t = time.perf_counter()
    kw = {} if mmap else {"mmap": False}  # (earlier versions, run by ``bench(env=...)``, have no mmap option)
    if products != "exact":
        kw["products"] = products  # (nor a products option)
    model = edgelora.load(path, threads=threads, max_context=prompt_tokens + decode_tokens + 8, **kw)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.args.vocab_size, prompt_tokens).tolist()
    list(model.stream(prompt[:8], max_new_tokens=4, temperature=0))  # compile / warm up
    model.eos_ids = set()
    list(model.stream(prompt, max_new_tokens=1, temperature=0))
    long = model.last_stats
    list(model.stream(prompt[:128], max_new_tokens=1, temperature=0))
    short = model.last_stats
    list(model.stream(prompt[:8], max_new_tokens=decode_tokens, temperature=0))  # as the PyTorch benchmark decodes
    decode = model.last_stats
    return {"threads": threads, "mmap": mmap, "products": products, "load_seconds": load_s,
            "prompt_tokens": prompt_tokens,
            "prefill_tokens_per_second": long.prefill_tokens_per_second,
            "prefill_128_tokens_per_second": short.prefill_tokens_per_second,
            "decode_tokens": decode_tokens, "decode_tokens_per_second": decode.decode_tokens_per_second,
            "time_to_first_token": long.time_to_first_token, "bytes_per_token": bytes_per_token(model),
            "kv_cache_bytes": model.kv_cache_bytes,
            "peak_rss_bytes": peak_rss_bytes()}


def bench(path, threads_list=None, prompt_tokens: int = 512, decode_tokens: int = 128, mmap: bool = True,
          env: dict | None = None, products: str = "exact") -> dict:
    """One fresh process per thread count (``env``: their environment, e.g. a ``PYTHONPATH`` that
    puts another edgelora version first, for before/after comparisons in one run: the children run
    this module's measurement, :func:`run_one`, on whichever edgelora they import). ``products``:
    ``"exact"`` or ``"int8"``, as ``edgelora.load`` takes it."""
    import inspect
    import numba
    cores = numba.config.NUMBA_NUM_THREADS
    threads_list = threads_list or sorted({1, cores})
    measure = "\n".join(inspect.getsource(f) for f in (bytes_per_token, run_one))
    rows = []
    for th in threads_list:
        code = ("import json, sys, time\nimport numpy as np\nfrom edgelora.memory import peak_rss_bytes\n" + measure +
                f"\nprint(json.dumps(run_one(sys.argv[1], {th}, {prompt_tokens}, {decode_tokens}, {mmap!r}, "
                f"{products!r})))")
        r = subprocess.run(python_command(code, path), capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "benchmark failed")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["bandwidth_bytes_per_second"] = memory_bandwidth(th)
        row["decode_bound_tokens_per_second"] = row["bandwidth_bytes_per_second"] / row["bytes_per_token"]
        row["fraction_of_bound"] = row["decode_tokens_per_second"] / row["decode_bound_tokens_per_second"]
        rows.append(row)
    return {"bundle": str(path), "cores": cores, "results": rows}


def format_bench(report: dict) -> str:
    lines = [f"bundle {report['bundle']} ({report['cores']} cores)",
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
