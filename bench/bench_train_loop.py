"""The whole ``edgelora train`` loop (data, gradients, clipping, AdamW, checkpoints) on a model shape:
tokens/s of the loop, and the training plan (``plan --train``) against the peak RSS measured in a
fresh process running ``edgelora.train`` (``devices/planner.py``'s ``measure_train_peak_rss``).

The models: the built-in demo model and random-weight checkpoints of real shapes
(``make_random_model.py``), converted once into the work folder. Rank 16, all-linear, sequences of
``--tokens`` tokens of random text, ``--steps`` steps, ``--threads`` threads, after one warm-up run
(a first run may compile kernels, which takes more memory than running them). Ratios are from one
run on whatever machine runs it (a shared one is noisy).

    python bench/bench_train_loop.py --models demo small-50m --tokens 256 --json bench/results/train_loop.json
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent


def bundle_for(name: str, work: Path) -> Path:
    import edgelora
    if name == "demo":
        from edgelora.demo import demo_bundle
        return demo_bundle(work / "demo", quiet=True)[0]
    out = work / f"{name}-nf4"
    if not out.exists():
        subprocess.run([sys.executable, str(HERE / "make_random_model.py"), "--shape", name, "--out",
                        str(work / name)], check=True)
        edgelora.convert(work / name, out, progress=False)
    return out


def main() -> None:
    def add(p):
        p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
        p.add_argument("--steps", type=int, default=3, help="steps of the timed run (after a one-step warm-up run)")
        p.add_argument("--threads", type=int, default=2, help="threads of the plan and the training runs")
        p.add_argument("--rank", type=int, default=16, help="rank of the all-linear adapter")
    a, work = parse_args(__doc__, ["demo", "small-50m"], add)
    from edgelora.devices.planner import measure_train_run, plan
    rows = []
    for name in a.models:
        bundle = bundle_for(name, work)
        train = {"rank": a.rank, "tokens": a.tokens}
        p = plan(bundle, "host", threads=a.threads, train=train)
        measure_train_run(bundle, train, threads=a.threads, steps=1)  # a first run may compile kernels (more memory)
        t0 = time.perf_counter()
        run = measure_train_run(bundle, train, threads=a.threads, steps=a.steps)
        peak = run["peak_rss_bytes"]
        wall = time.perf_counter() - t0
        row = {"model": name, "tokens": a.tokens, "rank": a.rank, "threads": a.threads, "steps": a.steps,
               "planned_bytes": p.total_bytes, "measured_peak_rss_bytes": peak,
               "plan_error": p.total_bytes / peak - 1, "process_seconds": wall,
               "tokens_per_second": run["tokens_per_second"],
               "items": {i.name: i.bytes for i in p.items}}
        rows.append(row)
        print(f"{name}: plan {p.total_bytes / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB ({row['plan_error']:+.1%}); "
              f"{a.steps} steps of {a.tokens} tokens at {run['tokens_per_second']:.0f} tokens/s")
    write_report(a.json, {"bench": "train_loop", "rows": rows})


if __name__ == "__main__":
    main()
