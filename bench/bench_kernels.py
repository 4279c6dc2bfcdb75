"""Kernel benchmark: NF4 matrix-vector throughput against the machine's streaming-read bandwidth,
for 1 to N threads, on the weight shapes of one Llama-3.2-1B decoder layer.

Reports weights per second, the bytes per second that implies (NF4 codes + scales: ~0.516 bytes a
weight) and that as a fraction of a streaming read measured in the same run with the same threads.

Then batched decode: ``matvec_batch`` of B vectors against B sequential ``matvec`` calls (each
sequence through every matrix in turn, as B separate decodes would run) on the 2048x5632 and
5632x2048 NF4 shapes, in weight-vector products per second (each weight counted once per vector)
and the ratio batch / sequential.

Then the two product paths side by side (``load(products=...)``): ``matvec`` and ``matvec_batch``
of ``--product-vectors`` vectors (4, and 5: a speculative step's last token and four guesses) on
5632x2048 NF4 matrices (gate/up of TinyLlama), exact float32 against the int8 path
(``runtime/int8.py``), in G weights/s (each weight counted once per vector).

    python bench/bench_kernels.py --threads 1 2 --json bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numba
import numpy as np

from bench_common import write_report
from edgelora.benchmark import memory_bandwidth
from edgelora.converters.nf4 import quantize_nf4
from edgelora.runtime.int8 import INT8_SIMD, NF4Int8Linear
from edgelora.runtime.kernels import NF4Linear

# (out, in) of q, k, v, o, gate, up, down in Llama-3.2-1B
LAYER = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
BATCH_SHAPES = [(2048, 5632), (5632, 2048)]  # (out, in): down and gate/up of a 2048-wide model with a 5632 MLP
PRODUCTS_SHAPE = (5632, 2048)  # (out, in) of the exact / int8 comparison
PRODUCTS = {"exact": NF4Linear, "int8": NF4Int8Linear}


def time_layer(lins, xs, repeats: int) -> float:
    for lin, x in zip(lins, xs):
        lin.matvec(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for lin, x in zip(lins, xs):
            lin.matvec(x)
        best = min(best, time.perf_counter() - t)
    return best


def time_batch(lins, X, repeats: int) -> tuple[float, float]:
    """Best seconds for one ``matvec_batch(X)`` through every matrix, and for ``len(X)`` sequential
    ``matvec`` passes through them."""
    def batched():
        for lin in lins:
            lin.matvec_batch(X)

    def sequential():
        for x in X:
            for lin in lins:
                lin.matvec(x)

    times = []
    for run in (batched, sequential):
        run()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        times.append(best)
    return times[0], times[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts to run (default %(default)s: 1, 2, 4, 8, 16 and Numba's count, none above it)")
    p.add_argument("--layers", type=int, default=4, help="distinct layers (so weights do not stay in cache)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each measurement (the best kept)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="vectors for matvec_batch")
    p.add_argument("--product-vectors", type=int, nargs="+", default=[1, 4, 5],
                   help="vectors of the exact / int8 comparison")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()
    cores = numba.config.NUMBA_NUM_THREADS
    threads = a.threads or sorted({1, 2, 4, 8, 16, cores} & set(range(1, cores + 1)))
    rng = np.random.default_rng(0)
    lins, xs = [], []
    for _ in range(a.layers):
        for n, k in LAYER:
            lins.append(NF4Linear(quantize_nf4((rng.standard_normal((n, k)) * 0.02).astype(np.float32))))
            xs.append(rng.standard_normal(k).astype(np.float32))
    weights = sum(lin.out_features * lin.in_features for lin in lins)
    nbytes = sum(lin.nbytes for lin in lins)
    rows = []
    for th in threads:
        numba.set_num_threads(th)
        dt = time_layer(lins, xs, a.repeats)
        bw = memory_bandwidth(th)
        rows.append({"threads": th, "gweights_per_s": weights / dt / 1e9, "gbytes_per_s": nbytes / dt / 1e9,
                     "stream_gbytes_per_s": bw / 1e9, "fraction_of_stream": nbytes / dt / bw})
    batch_lins = {shape: [NF4Linear(quantize_nf4((rng.standard_normal(shape) * 0.02).astype(np.float32)))
                          for _ in range(a.layers)] for shape in BATCH_SHAPES}
    batch_rows = []
    for th in threads:
        numba.set_num_threads(th)
        for (n, k), blins in batch_lins.items():
            for b in a.batches:
                X = rng.standard_normal((b, k)).astype(np.float32)
                t_batch, t_seq = time_batch(blins, X, a.repeats)
                products = n * k * b * len(blins)
                batch_rows.append({"threads": th, "shape": [n, k], "batch": b,
                                   "batch_gweights_per_s": products / t_batch / 1e9,
                                   "sequential_gweights_per_s": products / t_seq / 1e9,
                                   "batch_over_sequential": t_seq / t_batch})
    tensors = [quantize_nf4((rng.standard_normal(PRODUCTS_SHAPE) * 0.02).astype(np.float32)) for _ in range(a.layers)]
    product_rows = []
    for th in threads:
        numba.set_num_threads(th)
        for path, cls in PRODUCTS.items():
            plins = [cls(q) for q in tensors]
            for b in a.product_vectors:
                X = rng.standard_normal((b, PRODUCTS_SHAPE[1])).astype(np.float32)
                dt = time_layer(plins, [X[0]] * len(plins), a.repeats) if b == 1 else time_batch(plins, X, a.repeats)[0]
                product_rows.append({"threads": th, "products": path, "batch": b,
                                     "gweights_per_s": b * PRODUCTS_SHAPE[0] * PRODUCTS_SHAPE[1] * len(plins) / dt / 1e9})
    report = {"cpu_count": os.cpu_count(), "weights": weights, "bytes": nbytes, "results": rows,
              "batch_results": batch_rows, "int8_kernel": INT8_SIMD or "portable", "product_results": product_rows}
    write_report(a.json, report)
    print(f"{weights / 1e6:.0f}M NF4 weights ({nbytes / 1e6:.0f} MB), {a.layers} Llama-3.2-1B layers")
    print("| threads | G weights/s | GB/s read | streaming read GB/s | fraction |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['gweights_per_s']:.2f} | {r['gbytes_per_s']:.1f} | "
              f"{r['stream_gbytes_per_s']:.1f} | {r['fraction_of_stream']:.0%} |")
    print(f"\nBatched decode: matvec_batch of B vectors vs B sequential matvec passes, {a.layers} matrices a shape")
    print("| threads | shape (out x in) | B | batch G weights/s | sequential G weights/s | batch / sequential |")
    print("|---|---|---|---|---|---|")
    for r in batch_rows:
        print(f"| {r['threads']} | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['batch_gweights_per_s']:.2f} | "
              f"{r['sequential_gweights_per_s']:.2f} | {r['batch_over_sequential']:.2f} |")
    print(f"\nExact vs int8 products ({INT8_SIMD or 'portable'} kernel), {PRODUCTS_SHAPE[0]}x{PRODUCTS_SHAPE[1]}, "
          f"{a.layers} matrices")
    print("| threads | vectors | exact G weights/s | int8 G weights/s | int8 / exact |")
    print("|---|---|---|---|---|")
    by = {(r["threads"], r["batch"], r["products"]): r["gweights_per_s"] for r in product_rows}
    for th in threads:
        for b in a.product_vectors:
            e, i = by[th, b, "exact"], by[th, b, "int8"]
            print(f"| {th} | {b} | {e:.2f} | {i:.2f} | {i / e:.2f} |")


if __name__ == "__main__":
    main()
