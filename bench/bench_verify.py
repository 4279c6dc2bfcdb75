"""Start-up cost of load-time verification, for two source trees (before and after a change).

Converts a random model of a real shape (``bench/make_random_model.py``) once with the current tree,
then times ``edgelora.load(bundle, verify=..., warmup=False)`` in fresh processes for each tree given
by ``--trees`` (each child runs with that tree first on ``PYTHONPATH``): ``verify=True`` with the
checksum stamps cold (an empty ``EDGELORA_HOME``: every file hashed) and warm (the stamps of the run
before), and ``verify="full"``. Kernels are not compiled (``warmup=False``), so the figure is
opening, checking and mapping. Median of ``--repeats`` runs each.

    python bench/bench_verify.py --shape small-50m --trees /tmp/before . --json bench/results/verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import sys, time
t0 = time.perf_counter()
import edgelora
t1 = time.perf_counter()
m = edgelora.load(sys.argv[1], verify={verify}, warmup=False)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _time(tree: Path, bundle: Path, verify, home: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), EDGELORA_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", CHILD.format(verify=repr(verify)), str(bundle)], env=env,
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout
    return float(out.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small-50m")
    ap.add_argument("--trees", nargs="+", default=[str(HERE.parent)])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench-verify"))
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from make_random_model import make_random_model
    import edgelora
    work = Path(args.workdir)
    src, bundle = work / f"{args.shape}-hf", work / f"{args.shape}-nf4"
    if not (src / "config.json").is_file():
        make_random_model(src, args.shape)
    if not (bundle / "manifest.json").is_file():
        edgelora.convert(src, bundle, overwrite=bundle.exists())
    size = sum(p.stat().st_size for p in bundle.iterdir())
    results = {"shape": args.shape, "bundle_bytes": size, "trees": {}}
    for tree in args.trees:
        tree = Path(tree).resolve()
        row = {}
        for label, verify in (("stamps cold", True), ("stamps warm", True), ("full", "full"), ("off", False)):
            times = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as home:
                    if label == "stamps warm":
                        _time(tree, bundle, True, Path(home))  # fills the stamps
                    times.append(_time(tree, bundle, verify, Path(home)))
            row[label] = round(statistics.median(times), 3)
        results["trees"][str(tree)] = row
        print(f"{tree}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
