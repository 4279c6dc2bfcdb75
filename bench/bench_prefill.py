"""Prefill benchmark: the int8 GEMM (``products="int8"``, ``runtime/int8_gemm.py``) against the exact
path (float32 BLAS over dequantized NF4 tiles) on one bundle, prompts of 128 and 512 tokens.

Both models are loaded in one process (the bundle's pages mapped once) and measured interleaved,
the order alternating each round, so a shared machine's load falls on both alike; the report has
the median and the best of each, and the load average before and after. Prompts are random token
ids; a prefill is ``stream(prompt, max_new_tokens=1)``'s ``prefill_tokens_per_second``.

    python bench/make_random_model.py --shape tinyllama-1.1b --out /tmp/tiny-src
    python -m edgelora convert /tmp/tiny-src -o /tmp/tiny
    python bench/bench_prefill.py /tmp/tiny --threads 2 --rounds 5 --json bench/results/prefill.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from bench_common import write_report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", type=Path, help="the edgelora bundle to measure")
    p.add_argument("--threads", type=int, default=2, help="threads of both models")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="prompt lengths to prefill")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median and best reported)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()

    import edgelora
    from edgelora.runtime.int8_gemm import INT8_GEMM_SIMD
    models = {products: edgelora.load(a.bundle, threads=a.threads, max_context=max(a.tokens) + 8, products=products)
              for products in ("exact", "int8")}
    vocab = models["exact"].args.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, max(a.tokens)).tolist()
    for m in models.values():
        m.eos_ids = set()
        list(m.stream(prompt, max_new_tokens=1, temperature=0))  # warm up: compile, fault in
    load_before = os.getloadavg()
    speed = {(p, T): [] for p in models for T in a.tokens}
    for r in range(a.rounds):
        for products in (("exact", "int8") if r % 2 == 0 else ("int8", "exact")):
            for T in a.tokens:
                list(models[products].stream(prompt[:T], max_new_tokens=1, temperature=0))
                speed[products, T].append(models[products].last_stats.prefill_tokens_per_second)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{p}-{T} {v[-1]:.1f}" for (p, T), v in speed.items()),
              flush=True)
    rows = []
    for T in a.tokens:
        e, i = speed["exact", T], speed["int8", T]
        rows.append({"prompt_tokens": T, "exact_median": statistics.median(e), "int8_median": statistics.median(i),
                     "exact_best": max(e), "int8_best": max(i),
                     "speedup_median": statistics.median(i) / statistics.median(e), "speedup_best": max(i) / max(e),
                     "exact_all": e, "int8_all": i})
        print(f"prefill-{T}: exact {rows[-1]['exact_median']:.1f} tok/s, int8 {rows[-1]['int8_median']:.1f} tok/s "
              f"(median of {a.rounds}; x{rows[-1]['speedup_median']:.2f}, best x{rows[-1]['speedup_best']:.2f})")
    report = {"bundle": str(a.bundle), "threads": a.threads, "rounds": a.rounds, "gemm_variant": INT8_GEMM_SIMD,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": rows}
    write_report(a.json, report)


if __name__ == "__main__":
    main()
