"""Conversion benchmark: seconds per billion parameters and peak RSS against the source size.

Each conversion runs in a fresh child process (so its peak RSS is its own), after one warm-up
conversion of a tiny model has filled Numba's on-disk cache. Writes a JSON report and prints a
Markdown table.

    python bench/bench_convert.py --shapes small-50m llama-3.2-1b --json bench/results/convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import write_report

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
from edgelora.memory import peak_rss_bytes
t = time.perf_counter()
import edgelora
s = edgelora.convert(sys.argv[1], sys.argv[2])
d = s.to_dict(); d.pop("tensors")
d["wall_s"] = time.perf_counter() - t
d["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(d))
"""


BASELINE = r"""
import json
from edgelora.memory import peak_rss_bytes
import numpy as np
import edgelora
from edgelora.converters import convert, nf4
nf4.quantize_nf4(np.ones(4096, np.float32)).dequantize()
print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
"""


def baseline_rss() -> int:
    """Peak RSS of a process that imported edgelora and ran its (cached) kernels once."""
    r = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def convert_in_child(src: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    sys.path.insert(0, str(HERE))
    from make_random_model import make_random_model
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small-50m", "llama-3.2-1b"],
                   help="shapes of bench/make_random_model.py to make and convert")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the source checkpoints are made and kept (default %(default)s: a new temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="edgelora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # warm Numba's cache so that compile time is not counted in the figures
    warm = make_random_model(work / "warm", "small-50m")
    shutil.rmtree(work / "warm-out", ignore_errors=True)
    convert_in_child(warm, work / "warm-out")
    base = baseline_rss()
    rows = []
    for shape in a.shapes:
        src = work / f"src-{shape}"
        if not (src / "model.safetensors").exists():
            t = time.perf_counter()
            make_random_model(src, shape)
            print(f"made {shape} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        out = work / f"out-{shape}"
        shutil.rmtree(out, ignore_errors=True)
        r = convert_in_child(src, out)
        r["shape"] = shape
        r["s_per_billion"] = r["wall_s"] / (r["parameters"] / 1e9)
        r["baseline_rss_bytes"] = base
        r["rss_over_source"] = r["peak_rss_bytes"] / r["source_bytes"]
        rows.append(r)
        shutil.rmtree(out, ignore_errors=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "cores": os.cpu_count()},
              "results": rows}
    write_report(a.json, report)
    print("| model shape | parameters | source (bf16) | bundle weights | bits/weight | time | s per 1B params | peak RSS | of which baseline | peak RSS / source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['parameters'] / 1e9:.3f} B | {r['source_bytes'] / 1e9:.2f} GB | "
              f"{r['weights_bytes'] / 1e9:.2f} GB | {r['bits_per_weight']:.2f} | {r['wall_s']:.1f} s | "
              f"{r['s_per_billion']:.1f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | {base / 1e9:.2f} GB | "
              f"{r['rss_over_source']:.2f} |")


if __name__ == "__main__":
    main()
