"""Startup benchmark: Numba compilation on first use of a bundle, then cold start with the cache warm.

Every measurement is a fresh ``sys.executable`` process with its own, private ``NUMBA_CACHE_DIR``
and ``EDGELORA_HOME`` (temp folders, so neither the runtime's ``__pycache__`` nor the user's
verified-checksum stamps are used), in this order for each model:

* first use: the cache empty; ``import edgelora``, ``edgelora.load(bundle)``, the first token of a
  short text prompt and the first decode step after it (what a user waits for), then the paths a
  session reaches later: a prompt long enough for the dequantized-tile prefill, one LoRA adapter
  loaded and decoded with, and a two-sequence batch with it. Each phase's Numba compile time is
  recorded (``numba:compile`` events; self time per function);
* cold start, cache warm: the same child again on the now-populated cache, ``--repeats`` times;
  any compile there is a cache miss and is listed;
* cache warm, another thread count: the same with ``--other-threads`` (1; the parallel kernels
  run only with more than one thread), when the machine has more than one core; and the other way
  round on a new empty cache: first use at that thread count, then one start with every core.

Times are measured inside the child with ``time.perf_counter`` from its first line; as that clock
is system-wide on Linux the child also reports its first token counted from the parent's spawn
(interpreter start included). The parent's own wall time per child (to its exit) and the child's
peak RSS (``VmHWM``) are reported too. The operating system's page cache is not dropped: the
bundle's files are in memory after the first run, as they usually are on a machine that just used
them.

    python bench/bench_startup.py --json bench/results/startup.json
    python bench/bench_startup.py --models stories260K llama-3.2-1b --workdir /tmp/bench-work --snapshot \\
        --json bench/results/startup.json

``--snapshot`` runs the children on a copy of the sources taken at the start: Numba's cache index
is keyed on each kernel file's size and modification time, so an edit to ``runtime/kernels.py``
in the middle of a run would otherwise make a "warm" start compile everything again (the run
warns when the runtime's sources changed).
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
RUNTIME = HERE.parent / "runtime"
PROMPT = "Once upon a time, there was a little girl named Lily."

# The measured child. Its first line starts the clock; nothing of edgelora or Numba is imported
# before it. argv[1]: a JSON object (bundle, threads, prompt, long_tokens, adapter, spawn).
CHILD = r"""
import time
T0 = time.perf_counter()
import json, sys
cfg = json.loads(sys.argv[1])
phases = {}
def mark(name, t):
    phases[name] = {"start": t - T0, "end": time.perf_counter() - T0}

import edgelora
mark("import", T0)
t = time.perf_counter()
import numba
from numba.core import caching, dispatcher, event
import edgelora.runtime.model
mark("runtime_import", t)

compiles, stack = [], []  # every compile: [name, start, inclusive s, self s, depth]
class Recorder(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        stack.append([f"{d.py_func.__module__}.{d.py_func.__qualname__}", time.perf_counter(), 0.0])
    def on_end(self, ev):
        name, start, children = stack.pop()
        dt = time.perf_counter() - start
        if stack:
            stack[-1][2] += dt
        compiles.append([name, start - T0, dt, dt - children, len(stack)])
event.register("numba:compile", Recorder())

lookups = []  # every look-up of compiled code in NUMBA_CACHE_DIR: [name, start, seconds, hit]
_load = caching.Cache.load_overload
def load_overload(self, sig, ctx):
    t = time.perf_counter()
    r = _load(self, sig, ctx)
    lookups.append([getattr(self, "_name", "?"), t - T0, time.perf_counter() - t, r is not None])
    return r
caching.Cache.load_overload = load_overload

t = time.perf_counter()
model = edgelora.load(cfg["bundle"], threads=cfg["threads"])
mark("load", t)
model.eos_ids = set()

t = time.perf_counter()
model.generate(cfg["prompt"], max_new_tokens=2, temperature=0)
end = time.perf_counter()
s = model.last_stats
first = end - s.decode_seconds  # the first token was out when the decode step began
phases["first_token"] = {"start": t - T0, "end": first - T0}
phases["decode_step"] = {"start": first - T0, "end": end - T0}
ttft, prompt_tokens = s.time_to_first_token, s.prompt_tokens

n = min(cfg["long_tokens"], model.max_context - 2)
ids = [3 + (7 * i) % (model.args.vocab_size - 3) for i in range(n)]
t = time.perf_counter()
model.generate(ids, max_new_tokens=1, temperature=0)
mark("long_prompt", t)

t = time.perf_counter()
model.adapters.load("a", cfg["adapter"])
mark("adapter_load", t)
t = time.perf_counter()
model.generate(cfg["prompt"], max_new_tokens=2, adapter="a", temperature=0)
mark("adapter_decode", t)
t = time.perf_counter()
model.generate_batch([cfg["prompt"], cfg["prompt"]], adapters=["a", None], max_new_tokens=2, temperature=0)
mark("batch", t)

for p in phases.values():
    inside = [c for c in compiles if c[4] == 0 and p["start"] <= c[1] < p["end"]]
    p["seconds"] = p["end"] - p["start"]
    p["compile_seconds"] = sum(c[2] for c in inside)
    p["compiled"] = len([c for c in compiles if p["start"] <= c[1] < p["end"]])
    inside = [c for c in lookups if p["start"] <= c[1] < p["end"]]
    p["cache_lookup_seconds"], p["cache_hits"] = sum(c[2] for c in inside), sum(c[3] for c in inside)

cache = {}  # per kernel: cache hits and misses (a miss of a cache=True kernel is a compile)
for mod in [m for k, m in list(sys.modules.items()) if k.startswith("edgelora")]:
    for obj in vars(mod).values():
        if isinstance(obj, dispatcher.Dispatcher) and obj.__module__ == mod.__name__:
            st = obj.stats
            h, m = sum(st.cache_hits.values()), sum(st.cache_misses.values())
            if h or m:
                cache[f"{mod.__name__}.{obj.py_func.__qualname__}"] = {"hits": h, "misses": m}

from edgelora.memory import peak_rss_bytes
print(json.dumps({
    "threads": model.threads, "package": edgelora.__file__,
    "interpreter_start_seconds": T0 - cfg["spawn"],
    "phases": phases, "prompt_tokens": prompt_tokens, "long_prompt_tokens": n,
    "time_to_first_token_stats": ttft,
    "first_token_since_child_start": phases["first_token"]["end"],
    "first_token_since_spawn": phases["first_token"]["end"] + T0 - cfg["spawn"],
    "compile_seconds": sum(c[2] for c in compiles if c[4] == 0), "compiled": len(compiles),
    "compiles": [{"function": c[0], "at": c[1], "seconds": c[2], "self_seconds": c[3], "depth": c[4]}
                 for c in compiles],
    "cache_lookups": {"calls": len(lookups), "hits": sum(c[3] for c in lookups),
                      "seconds": sum(c[2] for c in lookups), "first_seconds": lookups[0][2] if lookups else 0.0},
    "cache_misses": sorted(k for k, v in cache.items() if v["misses"]), "peak_rss_bytes": peak_rss_bytes()}))
"""


def snapshot_sources(dst: Path) -> Path:
    """A copy of the package's sources laid out as installed (``[tool.setuptools] package-dir`` of
    pyproject.toml): children that put it first on ``PYTHONPATH`` import it instead of the editable
    working tree, so edits made meanwhile cannot invalidate the Numba cache in the middle of a run."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    root = HERE.parent
    dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for pkg, src in sorted(dirs.items()):  # parents before their subpackages
        shutil.copytree(root / src, dst / pkg.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compileall.compile_dir(dst, quiet=1)  # bytecode as an install leaves it: not part of the first start
    return dst


def child(bundle: Path, adapter: Path, threads: int | None, env: dict, long_tokens: int, cwd: Path) -> dict:
    """One measured process; its report plus the parent's wall time to its exit."""
    load_average = os.getloadavg()[0]
    spawn = time.perf_counter()
    cfg = {"bundle": str(bundle), "adapter": str(adapter), "threads": threads, "prompt": PROMPT,
           "long_tokens": long_tokens, "spawn": spawn}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env,
                       cwd=cwd)
    wall = time.perf_counter() - spawn
    if r.returncode:
        raise SystemExit(f"startup child failed:\n{r.stderr}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["parent_wall_seconds"] = wall
    if env.get("EDGELORA_STARTUP_SNAPSHOT") and not row["package"].startswith(env["EDGELORA_STARTUP_SNAPSHOT"]):
        raise SystemExit(f"the child imported edgelora from {row['package']}, not from the snapshot")
    row["load_average_1min_before"] = load_average  # other work on the machine makes the times noisy
    if not 0 <= row["interpreter_start_seconds"] < wall:  # perf_counter not one clock across processes
        row["interpreter_start_seconds"] = row["first_token_since_spawn"] = None
    return row


def source_stamps() -> dict:
    """The runtime sources' (size, mtime): Numba's cache index is keyed on them, so an edit
    during the run would turn a warm start into a recompilation."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(RUNTIME.glob("*.py"))}


def by_function(rows: list[dict]) -> list[dict]:
    """Compile self-time per function over ``rows``' compiles, largest first."""
    acc: dict[str, list] = {}
    for c in rows:
        a = acc.setdefault(c["function"], [0, 0.0, 0.0])
        a[0] += 1
        a[1] += c["self_seconds"]
        a[2] += c["seconds"] if c["depth"] == 0 else 0.0
    return sorted(({"function": f, "signatures": n, "self_seconds": s, "top_level_seconds": t}
                   for f, (n, s, t) in acc.items()), key=lambda d: -d["self_seconds"])


def run_model(name: str, work: Path, repeats: int, long_tokens: int, threads_other: int | None,
              snapshot: Path | None) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_lora import make_random_adapter
    from bench_runtime import prepare
    _, bundle = prepare(name, work)
    adapter = work / f"adapter-startup-{name}"
    if not (adapter / "adapter_config.json").exists():
        make_random_adapter(adapter, bundle)
    bundle, adapter = bundle.resolve(), adapter.resolve()
    with tempfile.TemporaryDirectory(prefix="edgelora-startup-") as base:
        base = Path(base)

        def fresh_env(tag: str) -> dict:
            """A new empty Numba cache and edgelora home (verified-checksum stamps) under ``base``."""
            env = dict(os.environ, NUMBA_CACHE_DIR=str(base / tag / "numba-cache"),
                       EDGELORA_HOME=str(base / tag / "home"))
            env.pop("EDGELORA_THREADS", None)
            env.pop("NUMBA_NUM_THREADS", None)
            if snapshot is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(snapshot), *filter(None, [os.environ.get("PYTHONPATH")])])
                env["EDGELORA_STARTUP_SNAPSHOT"] = str(snapshot)
            return env

        # children run in ``base``: ``python -c`` puts its working folder first on sys.path, and the
        # repository root's edgelora/ there would shadow the snapshot
        run = lambda env, threads: child(bundle, adapter, threads, env, long_tokens, base)
        env = fresh_env("a")
        before = source_stamps()
        cold = run(env, None)
        warm = [run(env, None) for _ in range(repeats)]
        other = [run(env, threads_other) for _ in range(repeats)] if threads_other else []
        cache_bytes = sum(p.stat().st_size for p in (base / "a" / "numba-cache").rglob("*") if p.is_file())
        reverse = []  # the other way round: a cache first filled at the other thread count, then every core
        if threads_other:
            env2 = fresh_env("b")
            reverse = [run(env2, threads_other), run(env2, None)]
        changed = sorted(k for k, v in source_stamps().items() if before.get(k) != v)
    return {"bundle": str(bundle), "bundle_bytes": sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()),
            "numba_cache_bytes": cache_bytes,
            "first_use": cold, "warm": warm, "warm_other_threads": other,
            "first_use_other_threads_then_all": reverse,
            "compile_by_function": by_function(cold["compiles"]),
            "warm_first_token_since_spawn": summary([r["first_token_since_spawn"] for r in warm]),
            "warm_other_threads_first_token_since_spawn": summary([r["first_token_since_spawn"] for r in other]),
            "sources": "snapshot of the working tree" if snapshot else "working tree",
            "runtime_sources_changed_during_run": [] if snapshot else changed}


def summary(xs: list) -> dict | None:
    xs = sorted(x for x in xs if x is not None)
    return {"best": xs[0], "median": statistics.median(xs), "worst": xs[-1], "n": len(xs)} if xs else None


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def table(name: str, m: dict) -> list[str]:
    lines = [f"\n{name} ({m['bundle_bytes'] / 1e6:.1f} MB bundle; Numba cache {m['numba_cache_bytes'] / 1e6:.1f} MB)",
             "| run | threads | interpreter s | import s | runtime import s | load s | first token s | to first token "
             "(from spawn) s | first decode step s | later paths s | compile s (functions) | cache hits (look-up s) "
             "| child exit (parent) s | peak RSS MB | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    later = ("long_prompt", "adapter_load", "adapter_decode", "batch")
    rows = [("first use (empty cache)", m["first_use"])] + [(f"cache warm #{i + 1}", r) for i, r in enumerate(m["warm"])] \
        + [(f"cache warm, other threads #{i + 1}", r) for i, r in enumerate(m["warm_other_threads"])]
    if m["first_use_other_threads_then_all"]:
        a, b = m["first_use_other_threads_then_all"]
        rows += [(f"first use at {a['threads']} thread(s) (new empty cache)", a),
                 (f"then {b['threads']} threads on that cache", b)]
    for label, r in rows:
        p = r["phases"]
        lines.append(
            f"| {label} | {r['threads']} | {fmt(r['interpreter_start_seconds'], '.3f')} | {p['import']['seconds']:.3f} "
            f"| {p['runtime_import']['seconds']:.3f} | {p['load']['seconds']:.3f} | {p['first_token']['seconds']:.3f} "
            f"| {fmt(r['first_token_since_spawn'], '.3f')} | {p['decode_step']['seconds']:.3f} "
            f"| {sum(p[k]['seconds'] for k in later):.3f} | {r['compile_seconds']:.2f} ({r['compiled']}) "
            f"| {r['cache_lookups']['hits']} ({r['cache_lookups']['seconds']:.3f}) | {r['parent_wall_seconds']:.2f} "
            f"| {r['peak_rss_bytes'] / 1e6:.0f} | {r['load_average_1min_before']:.1f} |")
    for key, label in (("warm_first_token_since_spawn", "cache warm"),
                       ("warm_other_threads_first_token_since_spawn", "cache warm, other threads")):
        if m[key]:
            lines.append(f"\n{label}: first token {m[key]['median']:.2f} s after spawn (median of {m[key]['n']}; "
                         f"best {m[key]['best']:.2f}, worst {m[key]['worst']:.2f})")
    w = m["warm"][-1]["cache_lookups"] if m["warm"] else None
    if w and w["calls"]:
        lines.append(f"\ncache warm, Numba cache look-ups: the first {w['first_seconds']:.3f} s (it includes Numba's "
                     f"one-time CPU target initialisation, which an empty cache pays too), the other {w['calls'] - 1} "
                     f"{w['seconds'] - w['first_seconds']:.3f} s together")
    cold = m["first_use"]["phases"]
    lines += ["", "first use, compile time by phase: " + ", ".join(
        f"{k} {v['compile_seconds']:.2f} s ({v['compiled']})" for k, v in cold.items() if v["compiled"])]
    lines += ["", "| kernel (first use) | signatures | compile self s |", "|---|---|---|"]
    lines += [f"| `{f['function'].replace('edgelora.', '')}` | {f['signatures']} | {f['self_seconds']:.2f} |"
              for f in m["compile_by_function"][:12]]
    for label, r in rows:
        if r["compiled"] and r is not m["first_use"] and not label.startswith("first use"):
            names = sorted({c["function"] for c in r["compiles"]})
            lines.append(f"\n{label}: {r['compiled']} compiles despite the warm cache: {', '.join(names)}")
    if m["runtime_sources_changed_during_run"]:
        lines.append(f"\nwarning: runtime sources changed during the run: {m['runtime_sources_changed_during_run']}")
    return lines


def main():
    def add(p):
        p.add_argument("--repeats", type=int, default=3, help="cold starts on the warm cache (each a process)")
        p.add_argument("--long-prompt-tokens", type=int, default=64,
                       help="prompt of the later phase that takes the dequantized-tile prefill (> 32 tokens)")
        p.add_argument("--other-threads", type=int, default=1,
                       help="thread count of the extra warm runs (0: none); the first runs use every core")
        p.add_argument("--snapshot", action="store_true",
                       help="run the children on a copy of the package sources taken at the start, so that edits "
                            "to the working tree meanwhile cannot invalidate the Numba cache mid-run")

    a, work = parse_args(__doc__, ["stories260K"], add)
    import numba
    cores = numba.config.NUMBA_NUM_THREADS
    other = a.other_threads if a.other_threads and a.other_threads != cores else None
    report = {"cores": cores, "machine": platform.machine(), "python": platform.python_version(),
              "numba": numba.__version__, "load_average_before": list(os.getloadavg()), "models": {}}
    snap = Path(tempfile.mkdtemp(prefix="edgelora-startup-src-")) if a.snapshot else None
    try:
        if snap is not None:
            snapshot_sources(snap)
        for name in a.models:
            m = run_model(name, work, a.repeats, a.long_prompt_tokens, other, snap)
            report["models"][name] = m
            print("\n".join(table(name, m)), flush=True)
    finally:
        if snap is not None:
            shutil.rmtree(snap, ignore_errors=True)
    report["load_average_after"] = list(os.getloadavg())
    write_report(a.json, report)


if __name__ == "__main__":
    main()
