"""Decode speed at 1..N threads while other processes keep cores busy (a drone's flight stack, a
phone's other apps, a shared CI machine).

For each number of busy cores (0, then 1, ...) and each thread count (1..N and the default), a fresh
process loads the bundle, warms up, and decodes ``--decode`` tokens after an 8-token prompt; the
busy cores are spinning child processes. Thread counts are interleaved and repeated, medians are
reported. What to read: with one core taken, N threads should not decode slower than N-1.

    python bench/bench_contention.py --models small-50m --json bench/results/contention.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import parse_args, write_report  # noqa: E402
from make_random_model import make_random_model  # noqa: E402

from edgelora.child import python_command  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import edgelora
path, threads, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = edgelora.load(path, threads=None if threads == "default" else int(threads), max_context=n + 16)
model.eos_ids = set()
prompt = list(range(3, 11))
model.generate(prompt, max_new_tokens=4, temperature=0)  # warm
model.generate(prompt, max_new_tokens=n, temperature=0)
print(json.dumps({"threads": model.threads, "decode": model.last_stats.decode_tokens_per_second}))
"""

HOG = "while True: pass"


def decode_speed(bundle: Path, threads: str, n: int) -> dict:
    r = subprocess.run(python_command(CHILD, bundle, threads, n), capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(r.stderr.strip()[-600:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    def add(p):
        p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="numbers of cores kept busy, one pass each")
        p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
        p.add_argument("--decode", type=int, default=64, help="tokens decoded per run")

    a, work = parse_args(__doc__, ["small-50m"], add)
    import edgelora
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {"cores": cores, "models": {}}
    for shape in a.models:
        bundle = work / f"{shape}-nf4"
        if not bundle.exists():
            edgelora.convert(make_random_model(work / shape, shape), bundle)
        rows = []
        for busy in a.busy:
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(busy)]
            try:
                time.sleep(0.5)
                configs = [str(t) for t in range(1, cores + 1)] + ["default"]
                runs = {c: [] for c in configs}
                used = {}
                for _ in range(a.repeats):  # interleaved
                    for c in configs:
                        r = decode_speed(bundle, c, a.decode)
                        runs[c].append(r["decode"])
                        used[c] = r["threads"]
                for c in configs:
                    rows.append({"busy_cores": busy, "threads": c, "threads_used": used[c],
                                 "decode_tokens_per_second": statistics.median(runs[c]), "runs": runs[c]})
                    print(f"{shape}: busy {busy}, threads {c} ({used[c]}): "
                          f"{statistics.median(runs[c]):.1f} tok/s  {[round(x, 1) for x in runs[c]]}", flush=True)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
        report["models"][shape] = rows
    write_report(a.json, report)


if __name__ == "__main__":
    main()
