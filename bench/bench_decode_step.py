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
  token and the guesses), each count's time over one row's;
* ``--bound``: the base step against its products alone (every layer's ``decode._products``, in
  the step's order and split between the threads as the step splits them, none of the work between
  them) and against a plain read of the same bytes (every projection's tiles and block scales, in
  the same order, each split between the threads alike, summed as 32-bit words): the tiles' GB/s in
  each, so how near the step's products come to what this machine streams at that moment.

    python bench/bench_decode_step.py --models tinyllama-1.1b --workdir /tmp/h2h --adapters --rows \\
        --json bench/results/decode_step.json
    python bench/bench_decode_step.py --models tinyllama-1.1b llama-3.2-1b --workdir /tmp/h2h --bound
    python bench/bench_decode_step.py --models tinyllama-1.1b --workdir /tmp/h2h --bound --baseline HEAD~1

With ``--baseline REV`` each process runs twice, once with the working tree's edgelora and once
with REV's (``bench_runtime.baseline_env``), the two alternating: with ``--bound``, the step over its
products in the same process is the comparison that survives the machine's changing state (the
products alone are the same code in both, ``decode._products``; REV needs them).

Run it in several processes (``--processes``, each a fresh interpreter) to see the spread between
them; the ratios within a process are what compare.
"""

from __future__ import annotations

import json
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
threads, rounds, rows, bound = (int(v) for v in sys.argv[4:8])
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
calls = {k: (lambda args=args: step(*args)) for k, args in runs.items()}
nbytes = 0
if bound:
    import numba
    from numba import njit, prange
    from edgelora.runtime import decode as D
    from edgelora.runtime.int8 import NF4_I8
    from edgelora.storage import DYNAMIC_CODE

    @njit(parallel=True)
    def products(x, w, dims, threads, ops, op_start, uoff, stacked, a_rows, L):
        nh, nkv, hd, inter, H = dims
        B, nq, nk = x.shape[0], nh * hd, nkv * hd
        qkv, o, gu = np.empty((B, nq + 2 * nk), np.float32), np.empty((B, H), np.float32), np.empty((B, 2 * inter), np.float32)
        U = np.empty(B * max(a_rows, 1), np.float32)
        att, act = np.ones((B, nq), np.float32), np.ones((B, inter), np.float32)
        h, a, m = D._quantized(x, w[6]), D._quantized(att, w[6]), D._quantized(act, w[6])
        for i in range(L):  # the step's four product regions a layer, nothing between them
            j, g = 7 * i, 4 * i
            D._products(j, (nq, nk, nk), w, h[0], h[1], h[2], h[3], qkv, threads, ops, op_start[g], op_start[g + 1], x, U, uoff, stacked[g])
            D._products(j + 3, (H,), w, a[0], a[1], a[2], a[3], o, threads, ops, op_start[g + 1], op_start[g + 2], att, U, uoff, stacked[g + 1])
            D._products(j + 4, (inter, inter), w, h[0], h[1], h[2], h[3], gu, threads, ops, op_start[g + 2], op_start[g + 3], x, U, uoff, stacked[g + 2])
            D._products(j + 6, (H,), w, m[0], m[1], m[2], m[3], o, threads, ops, op_start[g + 3], op_start[g + 4], act, U, uoff, stacked[g + 3])
        return o

    @njit(parallel=True)
    def read(arrays, nbytes, threads, out):
        # projection after projection: its tiles then its block scales, each split between the threads
        for j in range(arrays.shape[0]):
            for col in range(2):
                n = nbytes[j, col] // 4
                words = numba.carray(D._u32_ptr(arrays[j, col]), n)
                for c in prange(threads):
                    acc = np.uint32(0)
                    for i in range(np.uint64(c * n // threads), np.uint64((c + 1) * n // threads)):  # (unsigned: vectorized)
                        acc += words[i]
                    out[c] += acc

    nh, nkv, hd, inter, _ = layers.dims
    w = (NF4_I8, DYNAMIC_CODE, layers.arrays, layers.lengths, layers.nshift, layers.offset, layers.bs, layers.sc_kind)
    ops = layers.ops(model.adapters.select(None))
    x = rng.standard_normal((1, H)).astype(np.float32)
    dims = (nh, nkv, hd, inter, H)
    held = np.array([[a.nbytes for a in col] for col in layers._held[:2]], np.int64).T.copy()  # [7 L, 2]
    nbytes = int(held.sum())
    sums = np.zeros(threads, np.uint32)
    calls["step"] = lambda: step(x, np.array([100], np.int64), ops)
    calls["products"] = lambda: products(x, w, dims, threads, ops.table, ops.start, ops.uoff, ops.stacked, ops.a_rows,
                                         net.args.num_hidden_layers)
    calls["read"] = lambda: read(layers.arrays, held, threads, sums)
for f in calls.values():
    f()  # compile, fault in
times = {k: [] for k in calls}
for r in range(rounds):
    names = list(calls)
    for k in names[r % len(names):] + names[:r % len(names)]:
        t = time.perf_counter()
        calls[k]()
        times[k].append(time.perf_counter() - t)
out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
if bound:
    out["bytes"] = nbytes
print(json.dumps(out))
"""


def main():
    def add(p):
        p.add_argument("--threads", type=int, default=2, help="Numba threads")
        p.add_argument("--rounds", type=int, default=60, help="interleaved steps of each configuration a process")
        p.add_argument("--processes", type=int, default=3, help="fresh processes, one after another")
        p.add_argument("--adapters", action="store_true", help="time the base against a float32 and a float16 adapter")
        p.add_argument("--rows", action="store_true", help="time steps of 1 .. 8 rows of one sequence")
        p.add_argument("--bound", action="store_true",
                       help="time the base step against its products alone and a plain read of the same bytes")
        p.add_argument("--baseline", default=None, metavar="REV",
                       help="also run every process at this git revision (installed apart), the two alternating")

    a, work = parse_args(__doc__, ["tinyllama-1.1b"], add)
    if not (a.adapters or a.rows or a.bound):
        raise SystemExit("nothing to time: pass --adapters, --rows and/or --bound")
    sys.path.insert(0, str(HERE))
    import numpy as np
    from bench_lora import make_random_adapter
    from bench_runtime import baseline_env, prepare
    from edgelora.child import python_command
    report = {"threads": a.threads, "rounds": a.rounds, "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        f32 = f16 = "-"
        if a.adapters:
            f32 = str(make_random_adapter(work / f"{name}-adapter-r16", bundle, r=16))
            f16 = str(make_random_adapter(work / f"{name}-adapter-r16-float16", bundle, r=16, dtype=np.float16))
        processes, baseline = [], []
        labels = ("tree", "baseline") if a.baseline else ("tree",)
        runs = [(i, label) for i in range(a.processes) for label in (labels if i % 2 == 0 else labels[::-1])]
        for i, label in runs:
            out = subprocess.run(python_command(CHILD, str(bundle), f32, f16, str(a.threads), str(a.rounds),
                                                str(8 if a.rows else 0), str(int(a.bound))),
                                 capture_output=True, text=True, check=True,
                                 env=baseline_env(a.baseline, work) if label == "baseline" else None)
            ms = json.loads(out.stdout.strip().splitlines()[-1])
            (baseline if label == "baseline" else processes).append(ms)
            line = []
            if a.adapters:
                base = ms["base"]
                line += [f"base {base:.2f} ms"] + [
                    f"{k} +{ms[k] - base:.2f} ms ({base / ms[k]:.3f})" for k in ("float32 adapter", "float16 adapter")]
            if a.rows:
                one = ms["1 rows"]
                line += [" ".join(f"{B}: {ms[f'{B} rows'] / one:.2f}" for B in range(2, 9)) + f" (1 row {one:.2f} ms)"]
            if a.bound:
                gbs = {k: ms["bytes"] / ms[k] / 1e6 for k in ("read", "products", "step")}
                line += [", ".join(f"{k} {ms[k]:.2f} ms {v:.1f} GB/s" for k, v in gbs.items())
                         + f" (products / read {gbs['products'] / gbs['read']:.2f}, step / read {gbs['step'] / gbs['read']:.2f},"
                         f" step / products {ms['step'] / ms['products']:.3f})"]
            print(f"{name} process {i + 1}{f' ({label})' if a.baseline else ''}: " + "; ".join(line), flush=True)
        report["models"][name] = {"processes": processes}
        if a.baseline:
            report["models"][name]["baseline"] = {"rev": a.baseline, "processes": baseline}
    write_report(a.json, report)


if __name__ == "__main__":
    main()
