"""One decode step of every layer, timed without generation around it: an adapter's cost and a step of several rows.

`generate()`'s decode speed moves 10-30 % from one process to the next on a shared machine (where
the tiles' pages land, what the neighbours do), more than an adapter's cost or a kernel change.
This script times the one-call decode step (``runtime/decode.py``'s ``decode_layers``, every layer,
not the head) in one process, the configurations interleaved round after round, medians:

* ``--adapters``: the base, the same random r=16 all-linear adapter from a float32 file (PEFT's
  default) held in float32 (``dtype="float32"``) and from a float16 file (what ``edgelora deploy``
  writes, and what the default int8 products make of a float32 file at load; held in float16):
  each adapter's milliseconds over the base and the base / adapter ratio;
* ``--rows``: a step of 1 .. 8 rows of one sequence (what a speculative step verifies: its last
  token and the guesses), each count's time over one row's.

    python bench/bench_decode_step.py --models tinyllama-1.1b --workdir /tmp/h2h --adapters --rows \\
        --json bench/results/decode_step.json

Run it in several processes (``--processes``, each a fresh interpreter) to see the spread between
them; the ratios within a process are what compare.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, statistics, sys, time
from pathlib import Path
import numpy as np
import edgelora
bundle, f32, f16 = sys.argv[1:4]
threads, rounds, rows = (int(v) for v in sys.argv[4:7])
model = edgelora.load(bundle, threads=threads, max_context=256)
net = model.net
layers = net.compiled_layers
assert layers is not None, "the one-call decode step needs every projection on the int8 path"
cache = net.new_cache()
H = net.args.hidden_size
rng = np.random.default_rng(0)
runs = {}
if f32 != "-":
    model.adapters.load("f32", f32, dtype="float32")  # (held as the file holds it; a default load rounds it)
    model.adapters.load("f16", f16)
    x = rng.standard_normal((1, H)).astype(np.float32)
    for name, spec in (("base", None), ("float32 adapter", "f32"), ("float16 adapter", "f16")):
        ops = layers.ops(model.adapters.select(spec))
        runs[name] = (x, np.array([100], np.int64), ops)
if rows:
    ops = layers.ops(model.adapters.select(None))
    for B in range(1, rows + 1):
        runs[f"{B} rows"] = (rng.standard_normal((B, H)).astype(np.float32), np.arange(100, 100 + B, dtype=np.int64), ops)
def step(x, pos, ops):
    return layers.run(x, pos, cache, net.cos, net.sin, ops)
for args in runs.values():
    step(*args)  # compile, fault in
times = {k: [] for k in runs}
for r in range(rounds):
    for k in (list(runs) if r % 2 else list(runs)[::-1]):
        t = time.perf_counter()
        step(*runs[k])
        times[k].append(time.perf_counter() - t)
print(json.dumps({k: statistics.median(v) * 1e3 for k, v in times.items()}))
"""


def main():
    def add(p):
        p.add_argument("--threads", type=int, default=2, help="Numba threads")
        p.add_argument("--rounds", type=int, default=60, help="interleaved steps of each configuration a process")
        p.add_argument("--processes", type=int, default=3, help="fresh processes, one after another")
        p.add_argument("--adapters", action="store_true", help="time the base against a float32 and a float16 adapter")
        p.add_argument("--rows", action="store_true", help="time steps of 1 .. 8 rows of one sequence")

    a, work = parse_args(__doc__, ["tinyllama-1.1b"], add)
    if not (a.adapters or a.rows):
        raise SystemExit("nothing to time: pass --adapters and/or --rows")
    sys.path.insert(0, str(HERE))
    import numpy as np
    from bench_lora import make_random_adapter
    from bench_runtime import prepare
    from edgelora.child import python_command
    report = {"threads": a.threads, "rounds": a.rounds, "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        f32 = f16 = "-"
        if a.adapters:
            f32 = str(make_random_adapter(work / f"{name}-adapter-r16", bundle, r=16))
            f16 = str(make_random_adapter(work / f"{name}-adapter-r16-float16", bundle, r=16, dtype=np.float16))
        processes = []
        for i in range(a.processes):
            out = subprocess.run(python_command(CHILD, str(bundle), f32, f16, str(a.threads), str(a.rounds),
                                                str(8 if a.rows else 0)), capture_output=True, text=True, check=True)
            ms = json.loads(out.stdout.strip().splitlines()[-1])
            processes.append(ms)
            line = []
            if a.adapters:
                base = ms["base"]
                line += [f"base {base:.2f} ms"] + [
                    f"{k} +{ms[k] - base:.2f} ms ({base / ms[k]:.3f})" for k in ("float32 adapter", "float16 adapter")]
            if a.rows:
                one = ms["1 rows"]
                line += [" ".join(f"{B}: {ms[f'{B} rows'] / one:.2f}" for B in range(2, 9)) + f" (1 row {one:.2f} ms)"]
            print(f"{name} process {i + 1}: " + "; ".join(line), flush=True)
        report["models"][name] = {"processes": processes}
    write_report(a.json, report)


if __name__ == "__main__":
    main()
