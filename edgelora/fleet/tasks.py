"""The work of a fleet build, one function per kind of item, in plain Python (no Ray here:
``edgelora/fleet/runner.py`` runs them as Ray tasks and actors).

Each returns a small JSON-able dict: ``{"kind", "name", "key", "status", "result" | "error"}``,
``status`` being ``built`` (done now), ``reused`` (its folder was there already: a Ray retry
after the first attempt finished, or another build), ``failed`` (its own error, as the CLI
would print it) or ``skipped`` (an item it needs failed). An item's output is written in a
temporary sibling of ``OUT/store/KIND/NAME-KEY`` and renamed into place only when complete
(:func:`edgelora.atomic.atomic_output_dir`), so a worker killed at any moment leaves nothing
behind that a build would take for finished; the next attempt removes the dead worker's
temporary folder and starts again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgelora.errors import EdgeLoraError, PlanError
from edgelora.fleet.store import ITEM, edgelora_version, item_dir, read_item, relpath


def limit_threads(n: int) -> None:
    """Numba's threads in this worker: the CPUs Ray gave the task (Ray sets OMP_NUM_THREADS alone)."""
    import numba
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _error(e: BaseException) -> dict:
    if isinstance(e, EdgeLoraError):
        return {"type": type(e).__name__, "message": str(e), "exit_code": e.exit_code,
                **getattr(e, "details", {})}
    return {"type": type(e).__name__, "message": f"unexpected error: {type(e).__name__}: {e}", "exit_code": 1}


def run_item(spec: dict, work, deps: list, hook=None) -> dict:
    """Run ``work(tmp_folder, final_folder) -> result`` for the item ``spec`` (``out``, ``kind``,
    ``name``, ``key``, ``inputs``) unless an item of ``deps`` (results of this module's functions)
    did not succeed, and record it atomically."""
    ident = {k: spec[k] for k in ("kind", "name", "key")}
    blocked = [d for d in deps if d["status"] in ("failed", "skipped")]
    if blocked:
        return {**ident, "status": "skipped",
                "error": {"type": "Skipped", "exit_code": 1, "message": "needs " + ", ".join(
                    f"{d['kind']} {d['name']}, which {'failed' if d['status'] == 'failed' else 'was skipped'}"
                    for d in blocked)}}
    out = Path(spec["out"])
    final = item_dir(out, spec["kind"], spec["name"], spec["key"])
    if hook is not None:
        hook(spec["kind"], spec["name"], "start")
    done = read_item(final)
    if done is not None and done.get("key") == spec["key"]:
        return {**ident, "status": "reused", "result": done["result"]}
    from edgelora.atomic import atomic_output_dir
    t0 = time.time()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(final, overwrite=final.exists()) as tmp:
            result = work(Path(tmp), final)
            record = {**ident, "inputs": spec["inputs"], "edgelora": edgelora_version(), "result": result,
                      "seconds": round(time.time() - t0, 3), "pid": os.getpid()}
            (Path(tmp) / ITEM).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            if hook is not None:
                hook(spec["kind"], spec["name"], "written")  # complete, not yet in place
    except Exception as e:  # noqa: BLE001 (every failure is this item's, reported, never fatal to the build)
        return {**ident, "status": "failed", "error": _error(e)}
    return {**ident, "status": "built", "result": result}


# ---------------------------------------------------------------------------------------------
# the kinds of work
# ---------------------------------------------------------------------------------------------

def convert_base(spec: dict, hook=None, num_cpus: int = 1) -> dict:
    """Convert a base (``inputs``: ``source`` path or hub id, ``options``) into ``bundle/``: exactly
    what ``edgelora convert SOURCE -o OUT`` with the same options writes."""
    def work(tmp: Path, final: Path) -> dict:
        from edgelora.converters.convert import convert, resolve_source
        from edgelora.evaluation import weight_report
        limit_threads(num_cpus)
        s = convert(resolve_source(spec["source"]), tmp / "bundle", **spec["options"])
        manifest = json.loads((tmp / "bundle" / "manifest.json").read_text())
        summary = s.to_dict()
        summary.pop("tensors")
        summary.pop("output")
        return {"bundle": relpath(final / "bundle", Path(spec["out"])), "summary": summary,
                "quantization": manifest["quantization"], "weights": weight_report(manifest),
                "files": manifest["files"], "manifest_sha256": manifest["manifest_sha256"]}
    return run_item(spec, work, [], hook)


def check_adapter(spec: dict, hook, base: dict) -> dict:
    """Check that the adapter at ``inputs.path`` fits its base's bundle (module names, shapes,
    vocabulary: :func:`edgelora.adapters.read_adapter`), and describe it."""
    def work(tmp: Path, final: Path) -> dict:
        from edgelora.adapters import read_adapter
        from edgelora.bundle import Bundle
        with Bundle(Path(spec["out"]) / base["result"]["bundle"], verify=False) as b:
            ad = read_adapter(spec["path"], b.args)
        s = ad.summary()
        return {"path": spec["path"], "base": spec["base"], "bytes": ad.nbytes,
                "ranks": s.get("ranks"), "targets": s.get("targets"), "modules": s.get("modules"),
                "checks": ["adapter_config.json and adapter_model.safetensors readable",
                           "every module is a linear layer of the base, with the base's shapes"]}
    return run_item(spec, work, [base], hook)


def deploy_group(spec: dict, hook, base: dict, *checks: dict) -> dict:
    """Plan the group's base with its adapters on its device profile and write the deploy folder
    (and archive): exactly what ``edgelora deploy`` writes. A plan that does not fit fails the item
    with the plan in the report."""
    def work(tmp: Path, final: Path) -> dict:
        from edgelora.atomic import sha256_file
        from edgelora.deployment import deploy
        from edgelora.devices.planner import plan
        out = Path(spec["out"])
        bundle = out / base["result"]["bundle"]
        adapters = {c["name"]: c["result"]["path"] for c in checks}
        opts = dict(context=spec["context"], threads=spec["threads"], overhead=spec["overhead"],
                    kv_cache=spec["kv_cache"])
        p = plan(bundle, spec["profile"], adapters=adapters, **opts)
        summary = {"fits": p.fits, "total_bytes": p.total_bytes, "budget_bytes": p.budget_bytes,
                   "context": p.context, "max_context": p.max_context, "model_max_context": p.model_max_context,
                   "threads": p.threads, "kv_cache": p.kv_cache, "device": p.device.to_dict(),
                   "items": p.to_dict()["items"]}
        if not p.fits:
            e = PlanError(f"does not fit {p.device.name}: needs {p.total_bytes / 1e6:.1f} MB, the budget is "
                          f"{p.budget_bytes / 1e6:.1f} MB" + "".join(f"; {s}" for s in p.suggestions))
            e.details = {"plan": summary}  # (in the report: the plan that did not fit)
            raise e
        r = deploy(bundle, spec["profile"], tmp / spec["name"], adapters=adapters, archive=spec["archive"], **opts)
        result = {"folder": relpath(final / spec["name"], out), "plan": summary,
                  "files": r.files, "manifest_sha256": sha256_file(r.path / "manifest.json")}
        if r.archive is not None:
            result.update(archive=relpath(final / r.archive.name, out), archive_sha256=sha256_file(r.archive),
                          archive_bytes=r.archive.stat().st_size)
        return result
    return run_item(spec, work, [base, *checks], hook)


class Evaluator:
    """One base model resident in a worker (an actor), evaluating adapters one request at a time:
    each request is one adapter on all its evaluation sets, with the base-alone figures of each
    set measured once and kept. Uses :func:`edgelora.evaluation.evaluate`: answer-only loss on
    JSONL data (the masked loss of training), perplexity on text."""

    def __init__(self, bundle: str, options: dict, hook=None):
        import edgelora
        if hook is not None:
            hook("evaluator", Path(bundle).parent.name, "start")
        limit_threads(options["threads"])
        self.options = options
        self.model = edgelora.load(bundle, max_context=options["context"], threads=options["threads"])
        self.base_scores: dict = {}  # eval set path -> figures without an adapter
        self.base_samples: dict = {}  # prompt -> (text, tokens, seconds)

    def ready(self) -> bool:
        return True

    def _scores(self, eval_set: dict, use) -> dict:
        from edgelora.evaluation import evaluate
        kw = {"data": eval_set["path"]} if eval_set["kind"] == "data" else {"text_file": eval_set["path"]}
        r = evaluate(self.model, use=use, window=self.options["window"], **kw)
        if eval_set["kind"] == "data":
            return {"answer_loss": r.answer_loss, "answer_perplexity": r.answer_perplexity,
                    "answer_tokens": r.answer_tokens, "examples": r.examples}
        return {"perplexity": r.perplexity, "nll": r.text_nll, "tokens": r.text_tokens}

    def _prompts(self, sets: list) -> list:
        """The sample prompts: the fleet's own, then the first ``samples`` of each data set."""
        prompts = [{"text": p} for p in self.options["prompts"]]
        for s in sets:
            if s["kind"] != "data":
                continue
            taken = 0
            for line in Path(s["path"]).read_text(encoding="utf-8").splitlines():
                if taken >= self.options["samples"]:
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    msgs = rec["messages"]
                    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"),
                               default=len(msgs))
                    prompts.append({"messages": msgs[:last]})
                    taken += 1
                elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    prompts.append({"text": rec["prompt"], "raw": True})
                    taken += 1
        return prompts

    def _sample(self, prompt: dict, use) -> tuple:
        m, n = self.model, self.options["max_new_tokens"]
        kw = dict(max_new_tokens=n, temperature=0, return_result=True, adapter=use)
        if "messages" in prompt:
            g = m.chat(prompt["messages"], **kw)
        elif self.options["chat"] and not prompt.get("raw") and m.tokenizer.has_chat_template:
            g = m.chat([{"role": "user", "content": prompt["text"]}], **kw)
        else:
            g = m.generate(prompt["text"], **kw)
        return g.text, g.stats.generated_tokens, g.stats.decode_seconds

    def evaluate(self, spec: dict, hook, check: dict) -> dict:
        def work(tmp: Path, final: Path) -> dict:
            name = spec["name"]
            sets = spec["sets"]
            self.model.adapters.load(name, check["result"]["path"])
            try:
                results = {}
                for s in sets:
                    if s["path"] not in self.base_scores:
                        self.base_scores[s["path"]] = self._scores(s, "base")
                    results[s["name"]] = {"kind": s["kind"], "base": self.base_scores[s["path"]],
                                          "adapter": self._scores(s, name)}
                samples, speed = [], {"base": [0, 0.0], "adapter": [0, 0.0]}
                for p in self._prompts(sets):
                    label = json.dumps(p, sort_keys=True)
                    if label not in self.base_samples:
                        self.base_samples[label] = self._sample(p, None)
                    b, a = self.base_samples[label], self._sample(p, name)
                    for who, (_, tokens, secs) in (("base", b), ("adapter", a)):
                        speed[who][0] += max(tokens - 1, 0)
                        speed[who][1] += secs
                    samples.append({"prompt": p.get("messages", p.get("text")), "base": b[0], "adapter": a[0]})
            finally:
                self.model.adapters.unload(name)
            return {"adapter": name, "sets": results, "samples": samples,
                    "tokens_per_second": {k: (t / s if s else None) for k, (t, s) in speed.items()},
                    "context": self.options["context"], "threads": self.options["threads"]}
        return run_item(spec, work, [check], hook)
