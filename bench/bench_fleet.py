"""Convert several random bases as one fleet on Ray with 2 and with 1 CPU: the speedup and each
worker's peak memory.

    python bench/bench_fleet.py --shape llama-3.2-1b --bases 4 --cpus 2 1 --json bench/results/fleet.json

Each base is a random checkpoint of the shape (``bench/make_random_model.py``, another seed each),
the fleet file lists them alone (no adapters, groups or evaluation: the convert tasks are what
runs in parallel), and each CPU count builds into a fresh output folder on a fresh local Ray
cluster (``edgelora.fleet.build(num_cpus=N)``). The kernels are compiled once before, in this
process. A task hook records each worker's peak RSS (``ru_maxrss``) when its bundle is written;
the memory each convert task declared to Ray (``runner._convert_memory``) is reported beside it.
The build time is the fleet's wall time, Ray's start-up included (reported apart).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import parse_args, write_report  # noqa: E402
from make_random_model import make_random_model  # noqa: E402


def record_peak(folder: str):
    def hook(kind, name, stage):
        if stage == "written":
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            Path(folder, f"{os.getpid()}-{name}.json").write_text(json.dumps({"pid": os.getpid(), "base": name,
                                                                               "peak_rss_bytes": peak}))
    return hook


def main() -> None:
    def add(p):
        p.add_argument("--shape", default="llama-3.2-1b", help="a shape of bench/make_random_model.py")
        p.add_argument("--bases", type=int, default=4, help="random bases in the fleet (another seed each)")
        p.add_argument("--cpus", type=int, nargs="+", default=[2, 1],
                       help="CPU counts of the Ray cluster, one build each")
    a, work = parse_args(__doc__, [], add)
    import edgelora
    import edgelora.fleet
    from edgelora.fleet.runner import _convert_memory
    bases = []
    for i in range(a.bases):
        src = work / f"{a.shape}-{i}"
        if not (src / "model.safetensors").is_file():
            make_random_model(src, a.shape, seed=i)
        bases.append(src)
    fleet = work / "fleet.toml"
    fleet.write_text("".join(f'[bases.b{i}]\nsource = "{src}"\n\n' for i, src in enumerate(bases)))
    warm = work / "warm"
    if not warm.exists():
        edgelora.convert(bases[0], warm)  # compiles the converter's kernels (cached for the workers)
    runs = []
    for cpus in a.cpus:
        out = work / f"out-{cpus}cpu"
        peaks = work / f"peaks-{cpus}cpu"
        for d in (out, peaks):
            if d.exists():
                import shutil
                shutil.rmtree(d)
        peaks.mkdir()
        t0 = time.perf_counter()
        import ray
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        up = time.perf_counter() - t0
        r = edgelora.fleet.build(fleet, out, task_hook=record_peak(str(peaks)))
        wall = time.perf_counter() - t0
        ray.shutdown()
        assert r.ok and r.counts["built"] == a.bases, r.text()
        workers = [json.loads(p.read_text()) for p in sorted(peaks.iterdir())]
        seconds = {i.split(":")[1]: json.loads((out / "report.json").read_text())["bases"][i.split(":")[1]]["summary"]["seconds"]
                   for i in r.items}
        runs.append({"cpus": cpus, "wall_seconds": wall, "ray_start_seconds": up, "build_seconds": wall - up,
                     "convert_seconds": seconds, "workers": workers,
                     "max_peak_rss_bytes": max(w["peak_rss_bytes"] for w in workers)})
        print(f"{cpus} CPU: {wall:.1f} s ({up:.1f} s Ray start), peak worker RSS "
              f"{runs[-1]['max_peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    by = {r["cpus"]: r for r in runs}
    report = {"machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()},
              "shape": a.shape, "bases": a.bases, "declared_memory_bytes": _convert_memory(str(bases[0])),
              "source_bytes": sum(f.stat().st_size for f in bases[0].iterdir()), "runs": runs}
    if 1 in by and 2 in by:
        report["speedup_2_over_1"] = by[1]["build_seconds"] / by[2]["build_seconds"]
        print(f"speedup with 2 CPUs: {report['speedup_2_over_1']:.2f}x (builds without Ray's start)")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
