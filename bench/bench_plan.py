"""Memory-planner benchmark: each plan's total against the peak RSS of the same plan run for real
on this machine, and what every shipped device profile can hold.

For each model and context (and once with a rank-16 all-linear adapter resident), a fresh process
loads the bundle, fills the KV cache to its end and reports its peak RSS
(:func:`edgelora.devices.planner.measure_peak_rss`); the plan for the same bundle, context, adapters
and thread count is set beside it. Then, per shipped device, the plan's verdict at the model's
default context and the largest context that fits, with the default KV cache and with a float32 one.

    python bench/bench_plan.py --models stories260K llama-3.2-1b --json bench/results/plan.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
CONTEXTS = {"stories260K": [64, 256, 512], "llama-3.2-1b": [512, 2048, 4096]}


def main():
    from edgelora.devices.planner import measure_peak_rss, plan
    from edgelora.devices.profiles import list_devices
    def add(p):
        p.add_argument("--threads", type=int, default=os.cpu_count(),
                       help="threads of the plans and the measured runs (default: every core, here %(default)s)")
        p.add_argument("--rank", type=int, default=16, help="rank of the random all-linear adapter of the adapter case")

    a, work = parse_args(__doc__, ["stories260K", "llama-3.2-1b"], add)
    sys.path.insert(0, str(HERE))
    from bench_lora import make_random_adapter
    from bench_runtime import prepare
    report = {"cores": os.cpu_count(), "threads": a.threads, "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        adapter = make_random_adapter(work / f"adapter-{name}-r{a.rank}", bundle, r=a.rank)
        contexts = CONTEXTS.get(name, [512, 2048])
        cases = [(ctx, {}) for ctx in contexts] + [(contexts[1], {"r16": str(adapter)})]
        rows = []
        for ctx, ads in cases:
            pl = plan(bundle, "host", context=ctx, adapters=ads, threads=a.threads)
            peak = measure_peak_rss(bundle, ctx, ads, threads=a.threads)
            rows.append({"context": ctx, "adapters": len(ads), "planned_bytes": pl.total_bytes,
                         "measured_peak_rss_bytes": peak, "error": pl.total_bytes / peak - 1,
                         "items": {i.name: i.bytes for i in pl.items}})
        devices = []
        for dev in list_devices().values():
            pl = plan(bundle, dev, threads=min(dev.cores, a.threads))
            f32 = plan(bundle, dev, threads=min(dev.cores, a.threads), kv_cache="float32")
            devices.append({"device": dev.name, "context": pl.context, "fits": pl.fits, "total_bytes": pl.total_bytes,
                            "budget_bytes": pl.budget_bytes, "max_context": pl.max_context,
                            "kv_cache": pl.kv_cache, "max_context_float32_cache": f32.max_context,
                            "model_max_context": pl.model_max_context})
        report["models"][name] = {"plans": rows, "devices": devices}
        print(f"\n{name}: plan vs measured peak RSS ({a.threads} threads)")
        print("| context | adapters | KV cache MB | planned MB | measured peak RSS MB | plan − measured |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['context']} | {r['adapters']} | {r['items']['KV cache'] / 1e6:.1f} | "
                  f"{r['planned_bytes'] / 1e6:.1f} | {r['measured_peak_rss_bytes'] / 1e6:.1f} | {r['error']:+.1%} |")
        print(f"\n{name}: shipped devices")
        print("| device | budget MB | plan at default context | fits | largest context that fits | with a float32 cache |")
        print("|---|---|---|---|---|---|")
        for d in devices:
            print(f"| {d['device']} | {d['budget_bytes'] / 1e6:.0f} | {d['total_bytes'] / 1e6:.0f} MB at "
                  f"{d['context']} | {'yes' if d['fits'] else 'no'} | {d['max_context']} of {d['model_max_context']} | "
                  f"{d['max_context_float32_cache']} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
