"""``edgelora fleet build``: a fleet's work as a graph of Ray tasks.

The driver (this module) reads and checks the fleet file, computes every item's key
(``edgelora/fleet/store.py``), and submits only the items whose output is not in the store:

* one **convert** task per base (``num_cpus=1``, ``memory`` estimated from the checkpoint's
  largest tensor: the converter streams tensor by tensor);
* one **check** task per adapter, after its base (``read_adapter`` against the bundle);
* one **deploy** task per device group, after its base and the checks of its adapters (plan,
  then ``edgelora.deploy``); ``memory`` small, the deploy copies files;
* one **evaluator actor** per base with adapters to evaluate, created when its bundle exists
  with ``memory`` from the planner (:func:`edgelora.plan` on the ``host`` profile at the
  evaluation context with the base's adapters, and a fixed reserve for the runtime itself), the
  bundle resident; each adapter is one request to it (all its evaluation sets), and the actor is
  released when its last request is answered.

Ray retries a task whose worker died (``max_retries``) and restarts an actor (``max_restarts``,
its requests retried); items are written atomically under keys that fix their content, so a
retried item is the same item. A task that fails on its own (an adapter made for another base, a
plan that does not fit) is recorded with its error and its dependants are skipped; everything
else is still built. Then ``OUT/report.json`` and ``OUT/report.html`` are written
(``edgelora/fleet/report.py``), and ``OUT/fleet.json`` records the build for ``fleet status``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeLoraError, UsageError
from edgelora.fleet import tasks
from edgelora.fleet.spec import Fleet, read_fleet
from edgelora.fleet.store import HashCache, item_dir, item_key, prune, read_item, relpath
from edgelora.products import UNPLANNED_KV_CACHE

MB = 1 << 20
#: memory a worker holding a model needs beyond the planner's items for the model (Python, NumPy,
#: Numba, Ray's worker itself), for scheduling evaluators (the planner's measured overhead is the
#: runtime's alone)
WORKER_RESERVE = 400 * MB
#: a deploy task: Python, Ray's worker and file copies in 4 MB pieces
DEPLOY_MEMORY = 300 * MB


def import_ray():
    """Ray, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UsageError("edgelora fleet runs on Ray, which is not installed: pip install 'edgelora[fleet]'") from None
    return ray


@dataclass
class Item:
    """One piece of work: its id ``KIND:NAME``, key, what the task needs and which items it uses."""
    kind: str
    name: str
    key: str
    spec: dict
    deps: list = field(default_factory=list)  # ids

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def _adapter_files_digest(hashes: HashCache, path: Path) -> dict:
    from edgelora.adapters import adapter_files
    return {p.name: hashes.file(p) for p in adapter_files(path)}


def plan_items(fleet: Fleet, out: Path, hashes: HashCache) -> dict:
    """Every item of ``fleet`` with its key, by id, in dependency order."""
    out = out.resolve()
    items: dict = {}
    ev = fleet.evaluation
    for b in fleet.bases.values():
        if b.hub:
            from edgelora.converters.convert import resolve_source
            src = resolve_source(b.source)
            source = {"hub_id": b.source, "files": hashes.tree(src)}
        else:
            src = Path(b.source)
            source = {"name": src.resolve().name, "files": hashes.tree(src)}
        options = dict(b.options)
        if "merge_adapter" in options:
            source["merge_adapter"] = hashes.tree(Path(options["merge_adapter"]))
        key = item_key("base", {"source": source, "options": {k: v for k, v in options.items() if k != "merge_adapter"}})
        items[f"base:{b.name}"] = Item("base", b.name, key, {"source": str(src), "options": options})
    digests = {a.name: _adapter_files_digest(hashes, a.path) for a in fleet.adapters.values()}
    for a in fleet.adapters.values():
        base = items[f"base:{a.base}"]
        key = item_key("check", {"base": base.key, "adapter": digests[a.name]})
        items[f"check:{a.name}"] = Item("check", a.name, key, {"path": str(a.path), "base": a.base}, [base.id])
    from edgelora.devices.profiles import get_device
    for g in fleet.devices.values():
        base = items[f"base:{g.base}"]
        device = get_device(g.profile).to_toml()
        options = {"base": base.key, "device": device, "context": g.context, "threads": g.threads,
                   "archive": g.archive, "overhead": g.overhead, "folder": g.name,
                   "adapters": {n: items[f"check:{n}"].key for n in g.adapters}}
        if g.kv_cache != UNPLANNED_KV_CACHE:  # (float32, the keys of folders built before the cache was planned)
            options["kv_cache"] = g.kv_cache
        key = item_key("deploy", options)
        spec = {"profile": g.profile, "context": g.context, "threads": g.threads, "archive": g.archive,
                "overhead": g.overhead, "kv_cache": g.kv_cache}
        items[f"deploy:{g.name}"] = Item("deploy", g.name, key, spec,
                                         [base.id, *(f"check:{n}" for n in g.adapters)])
    for a in fleet.adapters.values():
        sets = fleet.eval_sets_of(a.name)
        if not sets:
            continue
        base = items[f"base:{a.base}"]
        described = [{"name": s.name, "kind": s.kind, "path": str(s.path)} for s in sets]
        key = item_key("eval", {"base": base.key, "check": items[f"check:{a.name}"].key, "options": ev.to_dict(),
                                "sets": [{"name": s.name, "kind": s.kind, "sha256": hashes.file(s.path)} for s in sets]})
        items[f"eval:{a.name}"] = Item("eval", a.name, key, {"sets": described, "base": a.base},
                                       [base.id, f"check:{a.name}"])
    for it in items.values():
        it.spec.update(out=str(out), kind=it.kind, name=it.name, key=it.key,
                       inputs={k: v for k, v in it.spec.items() if k not in ("out",)})
    return items


def _convert_memory(source: str) -> int:
    """Bytes a convert task may use: a worker's reserve and the largest tensor's working set
    (its float32 rows are read in 32 MB pieces; its packed codes and scales are kept whole)."""
    try:
        from edgelora.converters.convert import open_checkpoint
        with open_checkpoint(Path(source)) as ckpt:
            largest = max(int(__import__("math").prod(s.shape)) for s in ckpt.specs.values())
    except Exception:  # noqa: BLE001 (an unreadable source fails in its task, with the converter's error)
        largest = 0
    return WORKER_RESERVE + 4 * 32 * MB + int(largest * 2.1)  # float16 narrowing: 2 bytes a weight, NF4 ~0.53


def _eval_memory(out: Path, base: dict, adapters: dict, fleet: Fleet) -> int:
    from edgelora.devices.planner import plan
    bundle = out / base["result"]["bundle"]
    ev = fleet.evaluation
    try:
        p = plan(bundle, "host", context=ev.context, adapters=adapters, threads=ev.threads, overhead=0)
    except EdgeLoraError:
        p = plan(bundle, "host", context=ev.context, threads=ev.threads, overhead=0)
    return WORKER_RESERVE + p.total_bytes


@dataclass
class BuildResult:
    """What a fleet build did: every item's outcome and the counts."""
    fleet: str
    out: str
    items: dict  # id -> {"kind", "name", "key", "status", "result" | "error"}
    seconds: float
    pruned: list = field(default_factory=list)

    @property
    def counts(self) -> dict:
        c = {"built": 0, "reused": 0, "failed": 0, "skipped": 0}
        for r in self.items.values():
            c[r["status"]] += 1
        return c

    @property
    def ok(self) -> bool:
        return not (self.counts["failed"] or self.counts["skipped"])

    def to_dict(self) -> dict:
        return {"fleet": self.fleet, "out": self.out, "ok": self.ok, **self.counts, "seconds": round(self.seconds, 3),
                "report": str(Path(self.out) / "report.html"),
                "items": {i: {k: v for k, v in r.items() if k != "result"} for i, r in self.items.items()},
                "pruned": self.pruned}

    def text(self) -> str:
        c = self.counts
        lines = [f"fleet {self.fleet} -> {self.out}: {c['built']} built, {c['reused']} reused, {c['failed']} failed, "
                 f"{c['skipped']} skipped in {self.seconds:.1f} s"]
        for i, r in self.items.items():
            if r["status"] in ("failed", "skipped"):
                lines.append(f"  {r['status']:<8} {i}: {r['error']['message']}")
        lines.append(f"report: {Path(self.out) / 'report.html'}")
        return "\n".join(lines)


def build(fleet: str | os.PathLike, out: str | os.PathLike, *, address: str | None = None,
          num_cpus: int | None = None, max_retries: int = 3, task_hook=None, log=None) -> BuildResult:
    """Build the fleet described by the fleet file ``fleet`` into the folder ``out`` on Ray.

    ``address``: a Ray cluster to join (``ray://HOST:10001``, ``auto``: the one ``ray start``
    began on this machine); by default a local cluster is started with ``num_cpus`` CPUs (default:
    all) and stopped afterwards (an already connected Ray session is used as it is).
    ``max_retries``: how often Ray retries a task whose worker died. ``task_hook(kind, name,
    stage)``: called in the worker when an item starts (``"start"``) and when its output is complete
    but not yet in place (``"written"``), for progress or fault-injection tests. ``log``: a
    callable given one line per finished item. Items whose output is in ``out`` already are reused.
    Returns a :class:`BuildResult`; failures of single items are in it (and in the report), never
    raised: only a fleet file that does not check (:class:`~edgelora.fleet.spec.FleetFileError`) or
    a Ray that cannot start raise."""
    t0 = time.time()
    spec = read_fleet(fleet)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError("output exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    hashes = HashCache(out)
    items = plan_items(spec, out, hashes)
    hashes.save()
    have = {i: stored(out, it) for i, it in items.items()}
    if all(r is not None for r in have.values()):  # nothing to do: no cluster started
        for i, r in have.items():
            (log or (lambda line: None))(f"reused   {i}")
        return _finish(spec, fleet, out, items, have, t0)
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
        started = True
    try:
        results = _run_graph(ray, spec, out, items, have, max_retries, task_hook, log or (lambda line: None))
    finally:
        if started:
            ray.shutdown()
    return _finish(spec, fleet, out, items, results, t0)


def stored(out: Path, it: Item) -> dict | None:
    """The result of ``it`` when its output is in the store already."""
    d = read_item(item_dir(out, it.kind, it.name, it.key))
    if d is None or d.get("key") != it.key:
        return None
    return {"kind": it.kind, "name": it.name, "key": it.key, "status": "reused", "result": d["result"]}


def _finish(spec: Fleet, fleet, out: Path, items: dict, results: dict, t0: float) -> BuildResult:
    keep = {relpath(item_dir(out, r["kind"], r["name"], r["key"]), out) for r in results.values()
            if r["status"] in ("built", "reused")}
    result = BuildResult(str(Path(fleet)), str(out), results, time.time() - t0, prune(out, keep))
    from edgelora.fleet.report import write_report, write_state
    write_state(out, spec, items, results)
    write_report(out, spec, items, results)
    result.seconds = time.time() - t0
    return result


def _run_graph(ray, fleet: Fleet, out: Path, items: dict, have: dict, max_retries: int, hook, log) -> dict:
    cluster_memory = int(ray.cluster_resources().get("memory", 0)) or None

    def memory(n: int) -> int:
        return n if cluster_memory is None else max(1, min(n, int(cluster_memory * 0.9)))

    convert = ray.remote(tasks.convert_base)
    check = ray.remote(tasks.check_adapter)
    deploy = ray.remote(tasks.deploy_group)
    evaluator = ray.remote(tasks.Evaluator)
    results: dict = {}
    values: dict = {}  # id -> result dict, or the ObjectRef that will hold it
    pending: dict = {}  # ObjectRef -> id

    def done(i: str, r: dict) -> None:
        results[i] = values[i] = r
        extra = f": {r['error']['message']}" if r["status"] in ("failed", "skipped") else ""
        log(f"{r['status']:<8} {i}{extra}")

    evals_by_base: dict = {}
    for i, it in items.items():
        if it.kind == "eval":
            r = have[i]
            if r is not None:
                done(i, r)
            else:
                evals_by_base.setdefault(it.spec["base"], []).append(it)
            continue
        r = have[i]
        if r is not None:
            done(i, r)
            continue
        if it.kind == "base":
            ref = convert.options(num_cpus=1, memory=memory(_convert_memory(it.spec["source"])),
                                  max_retries=max_retries).remote(it.spec, hook)
        elif it.kind == "check":
            ref = check.options(num_cpus=1, memory=memory(DEPLOY_MEMORY), max_retries=max_retries).remote(
                it.spec, hook, values[it.deps[0]])
        else:
            ref = deploy.options(num_cpus=1, memory=memory(DEPLOY_MEMORY), max_retries=max_retries).remote(
                it.spec, hook, *(values[d] for d in it.deps))  # (refs as arguments: Ray waits for them)
        values[i] = ref
        pending[ref] = i
    actors: dict = {}  # base -> [actor, outstanding requests]

    def start_evals(base: str) -> None:
        """Start the base's evaluator once the base and the checks of its adapters are done (an actor
        waiting for a check would hold a CPU the check needs)."""
        wanted = evals_by_base.get(base, [])
        if not wanted or f"base:{base}" not in results or any(f"check:{it.name}" not in results for it in wanted):
            return
        del evals_by_base[base]
        b = results[f"base:{base}"]
        if b["status"] not in ("built", "reused"):
            for it in wanted:
                done(it.id, tasks.run_item(it.spec, None, [b]))
            return
        adapters = {it.name: fleet.adapters[it.name].path for it in wanted
                    if results[f"check:{it.name}"]["status"] in ("built", "reused")}
        mem = memory(_eval_memory(out, b, adapters, fleet))
        options = {**fleet.evaluation.to_dict(), "window": fleet.evaluation.window}
        actor = evaluator.options(num_cpus=fleet.evaluation.threads, memory=mem, max_restarts=max_retries,
                                  max_task_retries=max_retries).remote(str(out / b["result"]["bundle"]), options, hook)
        actors[base] = [actor, len(wanted)]
        for it in wanted:
            ref = actor.evaluate.remote(it.spec, hook, results[f"check:{it.name}"])
            pending[ref] = it.id

    for base in list(evals_by_base):
        start_evals(base)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        i = pending.pop(ref)
        it = items[i]
        try:
            r = ray.get(ref)
        except Exception as e:  # noqa: BLE001 (a worker that died more often than retried, an actor lost)
            blocked = [results[d] for d in it.deps if results.get(d, {}).get("status") in ("failed", "skipped")]
            r = tasks.run_item(it.spec, None, blocked) if blocked else {"kind": it.kind, "name": it.name, "key": it.key, "status": "failed",
                 "error": {"type": type(e).__name__, "exit_code": 1,
                           "message": f"the Ray worker failed: {str(e).strip().splitlines()[-1] if str(e) else e}"}}
        done(i, r)
        if it.kind in ("base", "check"):
            start_evals(it.name if it.kind == "base" else fleet.adapters[it.name].base)
        if it.kind == "eval":
            entry = actors[it.spec["base"]]
            entry[1] -= 1
            if entry[1] == 0:
                ray.kill(entry[0])
    return {i: results[i] for i in items}
