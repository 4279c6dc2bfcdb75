"""A fleet build's record (``OUT/fleet.json``), its report (``OUT/report.json`` and the
self-contained ``OUT/report.html``: no scripts, no fonts or files fetched, two inline SVG bar
charts) and ``edgelora fleet status``."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from edgelora.atomic import write_text_atomic
from edgelora.errors import FormatError
from edgelora.fleet.store import STATE, HashCache, edgelora_version, item_dir, read_item

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def write_state(out: Path, fleet, items: dict, results: dict) -> None:
    state = {"format": "edgelora-fleet-state", "fleet": str(Path(fleet.path).resolve()), "name": fleet.name,
             "edgelora": edgelora_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "items": {i: {"kind": r["kind"], "name": r["name"], "key": r["key"], "status": r["status"],
                           **({"error": r["error"]} if "error" in r else {})} for i, r in results.items()}}
    write_text_atomic(out / STATE, json.dumps(state, indent=1) + "\n")


def _outcome(r: dict | None) -> dict:
    if r is None:
        return {"status": "not built"}
    d = {"status": r["status"], "key": r["key"]}
    if "error" in r:
        d["error"] = r["error"]
    return d


def build_report(out: Path, fleet, items: dict, results: dict) -> dict:
    """The report as data (what ``report.json`` holds)."""
    counts = {"built": 0, "reused": 0, "failed": 0, "skipped": 0}
    for r in results.values():
        counts[r["status"]] += 1
    rep = {"fleet": {"name": fleet.name, "file": str(Path(fleet.path).resolve())}, "edgelora": edgelora_version(),
           "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "out": str(out),
           "ok": not (counts["failed"] or counts["skipped"]), "counts": counts,
           "bases": {}, "adapters": {}, "devices": {}}
    for name, b in fleet.bases.items():
        r = results.get(f"base:{name}")
        d = {"source": b.source, "options": b.options, **_outcome(r)}
        if r is not None and "result" in r:
            res = r["result"]
            d.update(bundle=res["bundle"], summary=res["summary"], quantization=res["quantization"],
                     weights=res["weights"], files=res["files"], manifest_sha256=res["manifest_sha256"])
        rep["bases"][name] = d
    for name, a in fleet.adapters.items():
        d = {"base": a.base, "path": str(a.path), "check": _outcome(results.get(f"check:{name}"))}
        r = results.get(f"check:{name}")
        if r is not None and "result" in r:
            d["check"].update(r["result"])
        r = results.get(f"eval:{name}")
        if f"eval:{name}" in items:
            d["eval"] = _outcome(r)
            if r is not None and "result" in r:
                d["eval"].update(r["result"])
        d["devices"] = [g.name for g in fleet.devices.values() if name in g.adapters]
        rep["adapters"][name] = d
    for name, g in fleet.devices.items():
        r = results.get(f"deploy:{name}")
        d = {"profile": g.profile, "base": g.base, "adapters": list(g.adapters), **_outcome(r)}
        res = (r or {}).get("result") or (r or {}).get("error", {})
        if "plan" in res:
            p = res["plan"]
            d.update(fits=p["fits"], context=p["context"], max_context=p["max_context"],
                     total_bytes=p["total_bytes"], budget_bytes=p["budget_bytes"], device=p["device"]["name"],
                     plan=p)
        if r is not None and "result" in r:
            for k in ("folder", "manifest_sha256", "archive", "archive_sha256", "archive_bytes", "files"):
                if k in r["result"]:
                    d[k] = r["result"][k]
        rep["devices"][name] = d
    return rep


def write_report(out: Path, fleet, items: dict, results: dict) -> dict:
    rep = build_report(out, fleet, items, results)
    write_text_atomic(out / REPORT_JSON, json.dumps(rep, indent=1) + "\n")
    write_text_atomic(out / REPORT_HTML, render_html(rep))
    return rep


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2")


def bar_chart(chart_id: str, title: str, groups: list, series: list, unit: str, digits: int = 1) -> str:
    """A horizontal grouped bar chart as inline SVG: ``groups`` ``[(label, [value or None per
    series])]``, ``series`` the names of the bars in each group (a legend)."""
    bar, gap, left, width, right = 16, 12, 190, 380, 90
    values = [v for _, vs in groups for v in vs if v is not None]
    top = max(values, default=0) or 1.0
    height = 30 + len(groups) * (len(series) * bar + gap) + 24
    e = html.escape
    parts = [f'<svg class="chart" id="{e(chart_id)}" xmlns="http://www.w3.org/2000/svg" role="img" '
             f'width="{left + width + right}" height="{height}" viewBox="0 0 {left + width + right} {height}">',
             f"<title>{e(title)}</title>"]
    for k, s in enumerate(series):  # legend
        x = left + k * 150
        parts.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{COLOURS[k % len(COLOURS)]}"/>'
                     f'<text x="{x + 16}" y="14" font-size="12">{e(s)}</text>')
    y = 30
    for label, vs in groups:
        parts.append(f'<text x="{left - 8}" y="{y + len(series) * bar / 2 + 4}" font-size="12" '
                     f'text-anchor="end">{e(label)}</text>')
        for k, v in enumerate(vs):
            if v is None:
                parts.append(f'<text x="{left + 4}" y="{y + bar - 4}" font-size="11" fill="#888">n/a</text>')
            else:
                w = max(1.0, width * v / top)
                parts.append(f'<rect class="bar" data-series="{e(series[k])}" x="{left}" y="{y}" width="{w:.1f}" '
                             f'height="{bar - 2}" fill="{COLOURS[k % len(COLOURS)]}"><title>{e(label)}, '
                             f'{e(series[k])}: {v:.{digits}f} {e(unit)}</title></rect>'
                             f'<text x="{left + w + 4:.1f}" y="{y + bar - 4}" font-size="11">{v:.{digits}f}</text>')
            y += bar
        y += gap
    parts.append(f'<line x1="{left}" y1="26" x2="{left}" y2="{y}" stroke="#333"/>'
                 f'<text x="{left + width}" y="{y + 16}" font-size="11" text-anchor="end">{e(unit)}</text></svg>')
    return "".join(parts)


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:,.1f} MB"


def _num(v, digits=4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _status(d: dict) -> str:
    s = d.get("status", "not built")
    cls = {"built": "ok", "reused": "ok", "failed": "bad", "skipped": "bad"}.get(s, "")
    err = d.get("error", {}).get("message") if isinstance(d.get("error"), dict) else None
    return f'<span class="{cls}">{html.escape(s)}</span>' + (f'<div class="err">{html.escape(err)}</div>' if err else "")


def _table(head: list, rows: list) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def memory_chart(rep: dict) -> str:
    groups = [(f"{n} ({d.get('device', d['profile'])})", [d.get("total_bytes") and d["total_bytes"] / 1e6,
                                                          d.get("budget_bytes") and d["budget_bytes"] / 1e6])
              for n, d in rep["devices"].items()]
    return bar_chart("memory-chart", "Memory per device group: planned need against the device's budget",
                     groups, ["needs", "budget"], "MB")


def loss_chart(rep: dict) -> str:
    groups = []
    for name, a in rep["adapters"].items():
        for set_name, s in (a.get("eval", {}).get("sets") or {}).items():
            key = "answer_loss" if s["kind"] == "data" else "nll"
            groups.append((f"{name} / {set_name}", [s["base"].get(key), s["adapter"].get(key)]))
    return bar_chart("loss-chart", "Evaluation loss per adapter (nats per token; lower is better)",
                     groups, ["base alone", "with the adapter"], "nats/token", digits=3)


def render_html(rep: dict) -> str:
    e = html.escape
    c = rep["counts"]
    base_rows = []
    for n, b in rep["bases"].items():
        s = b.get("summary", {})
        worst = max(b.get("weights", []), key=lambda r: r["worst_rel_error"], default=None)
        mean = (sum(r["mean_rel_error"] for r in b["weights"]) / len(b["weights"])) if b.get("weights") else None
        weights = (b.get("files") or {}).get("model.safetensors", {})
        base_rows.append([e(n), _status(b), e(b["source"]), e(b.get("bundle", "")),
                          f"{s['parameters']:,}" if s else "", _num(s.get("bits_per_weight"), 3),
                          _num(mean, 5), (f"{worst['worst_rel_error']:.5f}<div class='small'>{e(worst['worst_tensor'])}"
                                          f"</div>") if worst else "",
                          f"<code>{e(weights.get('sha256', ''))}</code>"])
    ad_rows, samples = [], []
    for n, a in rep["adapters"].items():
        ck = a["check"]
        ev = a.get("eval", {})
        figures = []
        for set_name, s in (ev.get("sets") or {}).items():
            if s["kind"] == "data":
                figures.append(f"{e(set_name)}: answer loss {_num(s['base']['answer_loss'])} → "
                               f"{_num(s['adapter']['answer_loss'])} ({s['adapter']['answer_tokens']} tokens)")
            else:
                figures.append(f"{e(set_name)}: perplexity {_num(s['base']['perplexity'], 3)} → "
                               f"{_num(s['adapter']['perplexity'], 3)} ({s['adapter']['tokens']} tokens)")
        tps = ev.get("tokens_per_second") or {}
        ad_rows.append([e(n), e(a["base"]), _status(ck),
                        (f"rank {','.join(map(str, ck.get('ranks') or []))} on {', '.join(ck.get('targets') or [])}, "
                         f"{ck.get('bytes', 0) / 1e3:,.0f} kB") if "ranks" in ck else "",
                        _status(ev) if ev else "no evaluation set", "<br>".join(figures),
                        f"{_num(tps.get('base'), 1)} / {_num(tps.get('adapter'), 1)}" if tps else "",
                        e(", ".join(a["devices"]))])
        for smp in ev.get("samples") or []:
            prompt = smp["prompt"] if isinstance(smp["prompt"], str) else " | ".join(
                f"{m.get('role')}: {m.get('content')}" for m in smp["prompt"] if isinstance(m, dict))
            samples.append([e(n), e(prompt), e(smp["base"]), e(smp["adapter"])])
    dev_rows = []
    for n, d in rep["devices"].items():
        archive = (f"{e(d['archive'])}<div class='small'><code>{e(d['archive_sha256'])}</code></div>"
                   if d.get("archive") else "")
        dev_rows.append([e(n), _status(d), e(d.get("device", d["profile"])), e(d["base"]), e(", ".join(d["adapters"])),
                         {True: "yes", False: '<span class="bad">no</span>'}.get(d.get("fits"), ""),
                         f"{d['context']:,}" if "context" in d else "", f"{d['max_context']:,}" if "max_context" in d else "",
                         f"{_mb(d.get('total_bytes'))} of {_mb(d.get('budget_bytes'))}" if "total_bytes" in d else "",
                         (f"{e(d['folder'])}<div class='small'>manifest <code>{e(d['manifest_sha256'])}</code></div>"
                          if d.get("folder") else ""), archive])
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}th{background:#f3f3f3}"
             ".ok{color:#2a7d2a;font-weight:600}.bad{color:#b22;font-weight:600}.err{color:#b22;font-size:12px;"
             "max-width:40em}.small{font-size:11px;color:#555}code{font-size:11px}svg{display:block;margin:1em 0}")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgelora fleet {e(rep['fleet']['name'])}</title><style>{style}</style></head><body>",
        f"<h1>Fleet {e(rep['fleet']['name'])}</h1>",
        f"<p>{e(rep['fleet']['file'])} built into {e(rep['out'])} by edgelora {e(rep['edgelora'])} at "
        f"{e(rep['generated'])}: <b>{c['built']}</b> items built, <b>{c['reused']}</b> reused, "
        f"<b>{c['failed']}</b> failed, <b>{c['skipped']}</b> skipped.</p>",
        "<h2>Device groups</h2>", memory_chart(rep),
        _table(["group", "status", "device", "base", "adapters", "fits", "context", "largest context", "memory",
                "deploy folder", "archive (sha256)"], dev_rows),
        "<h2>Adapters</h2>", loss_chart(rep),
        _table(["adapter", "base", "check", "adapter", "evaluation", "base → with adapter", "tokens/s base / adapter",
                "device groups"], ad_rows),
        "<h3>Greedy samples</h3>", _table(["adapter", "prompt", "base alone", "with the adapter"], samples),
        "<h2>Base models</h2>",
        _table(["base", "status", "source", "bundle", "parameters", "bits/weight", "mean ‖W−Q(W)‖/‖W‖",
                "worst (tensor)", "model.safetensors sha256"], base_rows),
        "</body></html>", ""])


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

def status(out) -> dict:
    """What of the fleet built into ``out`` is ``built`` (its output is there for the fleet file's
    current inputs), ``stale`` (built, but its inputs changed since: the next build redoes it),
    ``failed`` / ``skipped`` (in the last build, inputs unchanged) or ``missing`` (never built)."""
    from edgelora.fleet.runner import plan_items
    from edgelora.fleet.spec import read_fleet
    out = Path(out)
    try:
        state = json.loads((out / STATE).read_text())
    except FileNotFoundError:
        raise FormatError(f"no {STATE}: not a fleet output folder (edgelora fleet build FLEET.toml -o OUT)", out) from None
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read {STATE}: {e}", out) from None
    if not isinstance(state, dict) or state.get("format") != "edgelora-fleet-state":
        raise FormatError(f"{STATE} is not a fleet build record", out)
    fleet = read_fleet(state["fleet"])
    hashes = HashCache(out.resolve())
    items = plan_items(fleet, out, hashes)
    hashes.save()
    before = state.get("items", {})
    rows = {}
    for i, it in items.items():
        prev = before.get(i, {})
        if read_item(item_dir(out.resolve(), it.kind, it.name, it.key)) is not None:
            s = "built"
        elif prev.get("key") == it.key and prev.get("status") in ("failed", "skipped"):
            s = prev["status"]
        elif prev:
            s = "stale"
        else:
            s = "missing"
        rows[i] = {"kind": it.kind, "name": it.name, "key": it.key, "status": s,
                   **({"error": prev["error"]} if s in ("failed", "skipped") and "error" in prev else {})}
    counts = {k: sum(r["status"] == k for r in rows.values()) for k in ("built", "stale", "failed", "skipped", "missing")}
    return {"fleet": state["fleet"], "out": str(out), "last_build": state.get("finished"), **counts,
            "up_to_date": counts["built"] == len(rows), "items": rows}


def format_status(st: dict) -> str:
    lines = [f"fleet {st['fleet']} in {st['out']} (last build {st['last_build']}): " +
             ", ".join(f"{st[k]} {k}" for k in ("built", "stale", "failed", "skipped", "missing"))]
    for i, r in st["items"].items():
        err = f"  {r['error']['message']}" if "error" in r else ""
        lines.append(f"  {r['status']:<8} {r['kind']:<7} {r['name']:<24} {r['key']}{err}")
    return "\n".join(lines)
