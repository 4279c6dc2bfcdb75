"""The tiles' block scales as their 8-bit codes against decoded float32 scales, in one process.

Every NF4 projection of a bundle's decoder layers (a decode step's products) through
``tiles_parallel``, twice a round, interleaved: once on the tiles as loaded (each block's double-
quantized scale code, a byte, decoded 16 rows at a time in the kernel) and once on the same codes
with float32 scales decoded beforehand (4 bytes a block: the layout before the codes, which the
kernels still run for the float16 head's int8 codes and for NF4 weights without double
quantization). Both give the same bits (checked). Then the same two for one small projection read
again and again from the L2 cache (its weight's time in compute, not memory), one thread; and a
prompt's products (``--prefill-tokens``, the int8 GEMM over every projection, the prefill pool).

    python bench/bench_tile_scales.py BUNDLE --rounds 40 --threads 2 --json bench/results/tile_scales.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np

from bench_common import write_report
import edgelora
from edgelora.runtime.int8 import NF4_I8, quantize_activations
from edgelora.runtime.int8_gemm import GEMM_ROWS, INT8_GEMM_SIMD, block_sums, gemm, tiles_parallel, tiles_slice
from edgelora.runtime.kernels import _pool

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def decoded(tiles):
    """A copy of ``tiles`` with every block's scale decoded to float32 in the tile order (the codes'
    ``storage.block_scale`` in NumPy, which rounds the product, then the sum)."""
    per_row = tiles.k // tiles.bs
    i = np.arange(tiles.sc.size)
    group, rest = i // (per_row * GEMM_ROWS), i % (per_row * GEMM_ROWS)
    block, lane = rest // GEMM_ROWS, rest % GEMM_ROWS
    row = np.minimum(group * GEMM_ROWS + lane, tiles.n - 1)
    out = copy.copy(tiles)
    out.sc = (tiles.dyn[tiles.sc] * tiles.nested[(row * per_row + block) >> tiles.nshift] + tiles.offset).astype(np.float32)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="an edgelora bundle with NF4 projections (int8 products)")
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds of each layout (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of the step's products (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=128, help="tokens of the prompt's products (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args()

    model = edgelora.load(a.bundle, threads=a.threads, max_context=64)
    lins = [getattr(L, name) for L in model.net.w.layers for name in PROJECTIONS]
    if not all(getattr(lin, "tiled", False) and lin.tiles.sc.dtype == np.uint8 for lin in lins):
        raise SystemExit("every projection must be NF4 tiles holding scale codes (x86-64 with AVX2, double quantization)")
    tiles = {"codes": [lin.tiles for lin in lins], "float32": [decoded(lin.tiles) for lin in lins]}
    layouts = {name: [t.args(NF4_I8) for t in ts] for name, ts in tiles.items()}
    rng = np.random.default_rng(0)
    xs = {k: quantize_activations(rng.standard_normal((1, k)).astype(np.float32), lins[0].block_size)
          for k in {lin.in_features for lin in lins}}
    sums = {k: block_sums(q[0], lins[0].block_size) for k, q in xs.items()}
    outs = [np.empty((1, lin.out_features), np.float32) for lin in lins]

    def step(args) -> float:
        t = time.perf_counter()
        for lin, arg, out in zip(lins, args, outs):
            XQ, _, XS = xs[lin.in_features]
            tiles_parallel(*arg, XQ, sums[lin.in_features], XS, out, 0, a.threads)
        return time.perf_counter() - t

    step(layouts["codes"])
    first = [o.copy() for o in outs]
    step(layouts["float32"])
    same = all(np.array_equal(x, o) for x, o in zip(first, outs))
    times = {name: [] for name in layouts}
    for r in range(a.rounds):
        for name in (("codes", "float32") if r % 2 else ("float32", "codes")):
            times[name].append(step(layouts[name]))
    tile_bytes = {"codes": sum(lin.tiles.nbytes for lin in lins)}
    tile_bytes["float32"] = tile_bytes["codes"] + sum(3 * lin.tiles.sc.size - lin.tiles.nested.nbytes for lin in lins)

    small = min(lins, key=lambda lin: lin.out_features * lin.in_features)  # (k: 256 x 2048 for TinyLlama)
    hot_args = {"codes": small.tiles.args(NF4_I8), "float32": decoded(small.tiles).args(NF4_I8)}
    XQ, _, XS = xs[small.in_features]
    groups = -(-small.out_features // GEMM_ROWS)
    out = np.empty((1, small.out_features), np.float32)

    def hot(arg, reps=200) -> float:
        t = time.perf_counter()
        for _ in range(reps):
            tiles_slice(*arg, 0, groups, XQ, sums[small.in_features], XS, out, 0)
        return (time.perf_counter() - t) / reps

    hot_times = {name: [] for name in hot_args}
    for r in range(max(10, a.rounds // 2)):
        for name in hot_args:
            hot_times[name].append(hot(hot_args[name]))
    n_tiles = groups * (small.in_features // small.block_size)

    prompts = {k: quantize_activations(rng.standard_normal((a.prefill_tokens, k)).astype(np.float32),
                                       lins[0].block_size) for k in xs}
    pool = _pool(a.threads) if a.threads > 1 else None

    def prefill(ts) -> float:
        t = time.perf_counter()
        for lin, tile in zip(lins, ts):
            XQ, _, XS = prompts[lin.in_features]
            gemm(INT8_GEMM_SIMD, NF4_I8, tile, XQ, XS, a.threads, pool)
        return time.perf_counter() - t

    for ts in tiles.values():  # (the pool's threads started, every kernel loaded)
        prefill(ts)
    prefill_times = {name: [] for name in tiles}
    for r in range(max(5, a.rounds // 4)):
        for name in (("codes", "float32") if r % 2 else ("float32", "codes")):
            prefill_times[name].append(prefill(tiles[name]))
    report = {"bundle": str(a.bundle), "threads": a.threads, "rounds": a.rounds, "same_bits": same,
              "step_products_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
              "step_products_p25_ms": {n: 1e3 * float(np.percentile(t, 25)) for n, t in times.items()},
              "tile_bytes": tile_bytes,
              "hot_ns_per_tile": {n: 1e9 * statistics.median(t) / n_tiles for n, t in hot_times.items()},
              "hot_shape": [small.out_features, small.in_features], "prefill_tokens": a.prefill_tokens,
              "prefill_products_ms": {n: 1e3 * statistics.median(t) for n, t in prefill_times.items()}}
    report["float32_over_codes"] = report["step_products_ms"]["float32"] / report["step_products_ms"]["codes"]
    for n in layouts:
        print(f"{n:8s} step products {report['step_products_ms'][n]:6.2f} ms (p25 "
              f"{report['step_products_p25_ms'][n]:.2f}), {tile_bytes[n] / 1e6:.0f} MB of tiles; hot "
              f"{report['hot_ns_per_tile'][n]:.1f} ns a tile of 16 x 64 weights (1 thread); "
              f"{a.prefill_tokens} tokens {report['prefill_products_ms'][n]:.0f} ms")
    print(f"float32 / codes: {report['float32_over_codes']:.3f} (same bits: {same})")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
