"""Two revisions of the tile kernels (``runtime/int8_gemm.py``) in one process, paired and interleaved.

This machine's speed drifts by 30 % and more within minutes (2 vCPUs on one shared core), so two
runs of a benchmark, one a revision, cannot tell a change of 5 % from the drift. This script loads
the installed ``edgelora.runtime.int8_gemm`` and the same file of another checkout (``--base``, e.g.
a ``git worktree`` of the revision before a change) side by side, compiles both (the base without
Numba's cache, whose entries name their module), repacks a bundle's NF4 projections with each
one's own ``Tiles``, and times them in alternating order, round after round:

* a decode step's products: every projection of every layer for ``--tokens`` rows (1: a decode
  step; 2-4: the rows a speculative step verifies), ``tiles_parallel`` over ``--threads``;
* one small projection read again and again from the L2 cache, one thread (its compute alone);
* a prompt's products: the int8 GEMM over every projection for ``--prefill-tokens`` tokens.

It reports each measure's medians and the median of the per-round ratios base / new (> 1: the new
revision is faster), and checks that both give the same bits.

    git worktree add /tmp/ab/base REV
    python bench/bench_gemm_ab.py BUNDLE --base /tmp/ab/base --rounds 30 --json bench/results/gemm_ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from bench_common import write_report
import edgelora
from edgelora.runtime import int8_gemm as NEW
from edgelora.runtime.int8 import NF4_I8, quantize_activations
from edgelora.runtime.kernels import _pool

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def load_base(checkout: Path):
    """``runtime/int8_gemm.py`` of ``checkout`` as a module of its own, its kernels uncached."""
    path = checkout / "runtime" / "int8_gemm.py"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (--base takes a checkout of edgelora, e.g. a git worktree)")
    spec = importlib.util.spec_from_file_location("edgelora_base_int8_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for v in vars(module).values():
        if isinstance(v, CPUDispatcher):
            v._cache = NullCache()
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="an edgelora bundle with NF4 projections (int8 products, tiles)")
    p.add_argument("--base", type=Path, required=True, help="a checkout of the revision to compare against")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of the products (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1, help="rows of the step's products (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=128,
                   help="tokens of the prompt's products, 0 for none (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args()

    revisions = {"base": load_base(a.base), "new": NEW}
    model = edgelora.load(a.bundle, threads=a.threads, max_context=64)
    lins = [getattr(L, name) for L in model.net.w.layers for name in PROJECTIONS]
    if not all(getattr(lin, "tiled", False) for lin in lins):
        raise SystemExit("every projection must be NF4 in tiles (x86-64 with AVX2, int8 products)")
    pool = _pool(a.threads) if a.threads > 1 else None
    tiles = {name: [M.Tiles(lin._iargs, lin.out_features, lin.in_features, a.threads, pool) for lin in lins]
             for name, M in revisions.items()}
    bs = lins[0].block_size
    rng = np.random.default_rng(0)
    widths = {lin.in_features for lin in lins}
    xs = {k: quantize_activations(rng.standard_normal((a.tokens, k)).astype(np.float32), bs) for k in widths}
    sums = {k: NEW.block_sums(q[0], bs) for k, q in xs.items()}
    outs = {name: [np.empty((a.tokens, lin.out_features), np.float32) for lin in lins] for name in revisions}

    def step(name) -> float:
        M, t0 = revisions[name], time.perf_counter()
        for lin, tile, out in zip(lins, tiles[name], outs[name]):
            XQ, _, XS = xs[lin.in_features]
            M.tiles_parallel(*tile.args(NF4_I8), XQ, sums[lin.in_features], XS, out, 0, a.threads)
        return time.perf_counter() - t0

    small = min(range(len(lins)), key=lambda i: lins[i].out_features * lins[i].in_features)
    groups = -(-lins[small].out_features // NEW.GEMM_ROWS)
    n_tiles = groups * (lins[small].in_features // bs)

    def hot(name, reps=200) -> float:
        M, tile, lin = revisions[name], tiles[name][small], lins[small]
        XQ, _, XS = xs[lin.in_features]
        out = np.empty((a.tokens, lin.out_features), np.float32)
        t0 = time.perf_counter()
        for _ in range(reps):
            M.tiles_slice(*tile.args(NF4_I8), 0, groups, XQ, sums[lin.in_features], XS, out, 0)
        return (time.perf_counter() - t0) / reps / n_tiles

    prompts = {k: quantize_activations(rng.standard_normal((a.prefill_tokens, k)).astype(np.float32), bs)
               for k in widths} if a.prefill_tokens else {}

    def prefill(name) -> float:
        M, t0 = revisions[name], time.perf_counter()
        for lin, tile in zip(lins, tiles[name]):
            XQ, _, XS = prompts[lin.in_features]
            M.gemm(M.INT8_GEMM_SIMD, NF4_I8, tile, XQ, XS, a.threads, pool)
        return time.perf_counter() - t0

    measures = {"step_products_ms": (step, 1e3), "hot_ns_per_tile": (hot, 1e9)}
    if a.prefill_tokens:
        measures["prefill_products_ms"] = (prefill, 1e3)
    for name in revisions:  # (every kernel compiled and loaded, the pool's threads started)
        for fn, _ in measures.values():
            fn(name)
    same = all(np.array_equal(x, y) for x, y in zip(outs["base"], outs["new"]))
    times = {m: {name: [] for name in revisions} for m in measures}
    for r in range(a.rounds):
        for m, (fn, unit) in measures.items():
            if m == "prefill_products_ms" and r % 4:  # (a prompt's products take 0.5 s: every 4th round)
                continue
            turn = r // 4 if m == "prefill_products_ms" else r  # (either revision first, in turn)
            for name in (("base", "new") if turn % 2 else ("new", "base")):
                times[m][name].append(unit * fn(name))
    report = {"bundle": str(a.bundle), "base": str(a.base), "threads": a.threads, "tokens": a.tokens,
              "prefill_tokens": a.prefill_tokens, "rounds": a.rounds, "same_bits": same,
              "hot_shape": [lins[small].out_features, lins[small].in_features],
              "median": {m: {n: statistics.median(v) for n, v in t.items()} for m, t in times.items()},
              "base_over_new": {m: statistics.median(b / c for b, c in zip(t["base"], t["new"]))
                                for m, t in times.items()},
              "times": times}
    for m in measures:
        med = report["median"][m]
        print(f"{m:22s} base {med['base']:8.2f}  new {med['new']:8.2f}  base / new (paired) "
              f"{report['base_over_new'][m]:.3f}")
    print(f"same bits: {same}")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
