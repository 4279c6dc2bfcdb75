"""Short prompts: prefill time of T tokens with products of up to ``MATVEC_ROWS_MAX`` rows on the
batched decode kernel, against the same prefill forced through dequantized tiles and BLAS (the
path every multi-row product took before), in one process, per thread count.

Chat turns and commands on a device are mostly short, so their time to first token is this
prefill. Each figure is the best of 3 runs of ``model.net.forward`` over T random tokens into a
fresh KV cache.

    python bench/bench_short_prompts.py --models llama-3.2-1b --json bench/results/short_prompts.json
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
LENGTHS = (2, 4, 8, 16, 32, 48, 64, 128)


def measure(bundle: Path, threads: int) -> list:
    import numpy as np
    import edgelora
    from edgelora.runtime import kernels
    model = edgelora.load(bundle, threads=threads, max_context=256)
    ids = np.random.default_rng(0).integers(3, model.args.vocab_size, max(LENGTHS))
    batched = kernels.MATVEC_ROWS_MAX

    def best(T):
        out = []
        for _ in range(3):
            t = time.perf_counter()
            model.net.forward(ids[:T], model.net.new_cache())
            out.append(time.perf_counter() - t)
        return min(out)

    rows = []
    for T in LENGTHS:
        best(T)  # warm up (compilation, page cache)
        kernels.MATVEC_ROWS_MAX = 1
        tiles = best(T)
        kernels.MATVEC_ROWS_MAX = batched
        now = best(T)
        rows.append({"tokens": T, "tiles_seconds": tiles, "seconds": now, "speedup": tiles / now})
    return rows


def main():
    a, work = parse_args(__doc__, ["llama-3.2-1b"],
                         lambda p: p.add_argument("--threads", type=int, nargs="+", default=None,
                                                   help="thread counts to run (default %(default)s: 1 and every core)"))
    sys.path.insert(0, str(HERE))
    from bench_runtime import prepare
    threads = a.threads or sorted({1, os.cpu_count()})
    report = {"cores": os.cpu_count(), "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        report["models"][name] = {th: measure(bundle, th) for th in threads}
        print(f"\n{name}: prefill of a short prompt (best of 3), tiled path vs batched kernel")
        print("| tokens | " + " | ".join(f"{th} thread{'s' if th > 1 else ''}: tiles / now (speedup)" for th in threads)
              + " |")
        print("|---|" + "---|" * len(threads))
        for i, T in enumerate(LENGTHS):
            cells = [report["models"][name][th][i] for th in threads]
            print(f"| {T} | " + " | ".join(f"{c['tiles_seconds'] * 1e3:.0f} ms / {c['seconds'] * 1e3:.0f} ms "
                                             f"({c['speedup']:.2f}x)" for c in cells) + " |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
