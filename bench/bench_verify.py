"""Start-up cost of load-time verification, for two source trees (before and after a change).

Converts a random model of a real shape (``bench/make_random_model.py``) once with the current tree,
then, in fresh processes for each tree given by ``--trees`` (each child runs with that tree first on
``PYTHONPATH``, its kernels compiled once beforehand in a home folder of its own), times
``edgelora.load(bundle, verify=...)`` and the first token after it (a 4-token prompt, one token),
and, where the tree hashes the weights in the background (``model.bundle.verification``), the time
from the start of the load until that hash is done. Modes: ``verify=True`` with the checksum
stamps of older trees cold (``verified.json`` removed: every file hashed) and warm (left from the
run before), ``verify="full"`` and ``verify=False``. Rounds interleave the trees; medians of
``--repeats`` rounds. The weights are in the page cache (a device reading them from flash for the
first time pays that read in every mode).

    python bench/bench_verify.py --shape tinyllama-1.1b --trees /tmp/before . --json bench/results/verify.json
"""

from __future__ import annotations

import argparse
import hashlib
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
import edgelora
t0 = time.perf_counter()
m = edgelora.load(sys.argv[1], verify={verify}, max_context=256)
t1 = time.perf_counter()
m.generate([1, 2, 3, 4], max_new_tokens=1)
t2 = time.perf_counter()
check = getattr(m.bundle, "verification", None)
if check is not None:
    check.wait()
t3 = time.perf_counter()
print(t1 - t0, t2 - t0, t3 - t0 if check is not None else "nan")
"""
MODES = (("stamps cold", True), ("stamps warm", True), ("full", "full"), ("off", False))


def _run(tree: Path, bundle: Path, verify, home: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree), EDGELORA_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", CHILD.format(verify=repr(verify)), str(bundle)], env=env,
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout
    return [float(x) for x in out.split()[-3:]]


def _median(values: list) -> float | None:
    """The median rounded to milliseconds; None where the tree measured nothing (NaN)."""
    m = statistics.median(values)
    return None if m != m else round(m, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", default="small-50m", help="a shape of bench/make_random_model.py")
    ap.add_argument("--trees", nargs="+", default=[str(HERE.parent)],
                    help="source trees to compare, each put first on its children's PYTHONPATH")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians reported)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench-verify"),
                    help="where the model, its bundle and each tree's home are made and kept")
    ap.add_argument("--json", help="write the results here (default %(default)s: not written)")
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
    trees = [Path(t).resolve() for t in args.trees]
    homes = {t: work / f"home-{hashlib.sha256(str(t).encode()).hexdigest()[:8]}" for t in trees}
    for t in trees:
        _run(t, bundle, False, homes[t])  # kernels compiled for this tree, outside the timings
    times = {t: {label: [] for label, _ in MODES} for t in trees}
    for _ in range(args.repeats):
        for t in trees:
            for label, verify in MODES:
                if label == "stamps cold":
                    (homes[t] / "verified.json").unlink(missing_ok=True)
                times[t][label].append(_run(t, bundle, verify, homes[t]))
    results = {"shape": args.shape, "bundle_bytes": size, "repeats": args.repeats,
               "columns": ["load s", "load to first token s", "load to weights verified s"], "trees": {}}
    for t in trees:
        row = {label: [_median([r[i] for r in runs]) for i in range(3)] for label, runs in times[t].items()}
        results["trees"][str(t)] = row
        print(f"{t}:")
        for label, (load, first, verified) in row.items():
            print(f"  {label:12s} load {load:.3f} s, first token {first:.3f} s"
                  + (f", weights verified {verified:.3f} s" if verified is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
