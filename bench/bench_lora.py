"""LoRA benchmark: adapter load and swap times, decode with an adapter, and multi-adapter batches.

On one bundle (the random-weight 1B-shape model by default), with random PEFT-format adapters of
rank 16 on all linear layers written by :func:`make_random_adapter`, in one process:

* load: reading and checking one adapter folder until it is resident (median of 5);
* swap: ``model.use(name)`` between resident adapters (median and worst of 2000), and building a
  two-adapter mix;
* decode: tokens/s of the plain base and with one adapter, same prompt, same threads; the ratio is
  the adapter's cost;
* batch: four sequences with four different adapters through ``generate_batch`` against the same
  four generations one after another; the ratio of decode throughputs;
* interleaved: ``--repeats`` rounds of base, adapter, the same adapter from a float16 file (held
  in float16, half the bytes), and adapter with each projection's delta on its own on the calling
  thread (the path before the grouped, threaded one), one after another in the same process;
  medians of tok/s and of the per-round ratios (for a shared machine).

    python bench/bench_lora.py --models llama-3.2-1b --json bench/results/lora.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import parse_args, write_report
from edgelora.atomic import atomic_output_dir

HERE = Path(__file__).resolve().parent
PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_random_adapter(out: Path, bundle: Path, r: int = 16, alpha: float = 32, seed: int = 0,
                        targets=tuple(PROJ), dtype=np.float32) -> Path:
    """A PEFT-format LoRA adapter (config + safetensors, ``dtype``: float32 as PEFT saves, or
    float16, the same values rounded) with random A and B for ``bundle``."""
    from edgelora.adapters import BaseModules, PEFT_PREFIX
    from edgelora.config import ModelArgs
    from edgelora.safetensors_io import write_safetensors
    base = BaseModules.from_args(ModelArgs.from_file(bundle / "config.json"))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (n_out, n_in) in base.linear.items():
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(dtype)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (rng.standard_normal((n_out, r)) * 0.01).astype(dtype)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(targets),
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(bundle)}
    with atomic_output_dir(out, overwrite=out.exists()) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", tensors)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def _decode(model, prompt, n, adapter):
    model.generate(prompt, max_new_tokens=n, adapter=adapter, temperature=0)
    return model.last_stats


class per_module_deltas:
    """The adapter path as it was before the grouped one (for the same-process before/after): each
    projection's delta on its own, on the calling thread (``lora_matvec_add``), as ``apply_group``
    falls back to for prefill rows."""

    def __enter__(self):
        from edgelora.runtime import lora
        self.saved = lora.Selection.apply_group, lora.LORA_PARALLEL_MIN
        lora.Selection.apply_group = lambda sel, modules, layers, x, biases: [
            sel.apply(m, lin, x, b) for m, lin, b in zip(modules, layers, biases)]
        lora.LORA_PARALLEL_MIN = 1 << 62
        return self

    def __exit__(self, *exc):
        from edgelora.runtime import lora
        lora.Selection.apply_group, lora.LORA_PARALLEL_MIN = self.saved


def decode_interleaved(model, prompt, n: int, repeats: int, adapter: str, adapter16: str) -> dict:
    """Decode tok/s of the base, the adapter, the same adapter from a float16 file (held in
    float16: half the bytes), and the adapter with :class:`per_module_deltas`, one after another
    ``repeats`` times (a shared machine's drift hits all alike): the medians, and the medians of
    the per-round ratios."""
    runs = {"base": [], "adapter": [], "adapter_float16": [], "adapter_per_module": []}
    for _ in range(repeats):
        runs["base"].append(_decode(model, prompt, n, None).decode_tokens_per_second)
        runs["adapter"].append(_decode(model, prompt, n, adapter).decode_tokens_per_second)
        runs["adapter_float16"].append(_decode(model, prompt, n, adapter16).decode_tokens_per_second)
        with per_module_deltas():
            runs["adapter_per_module"].append(_decode(model, prompt, n, adapter).decode_tokens_per_second)
    out = {f"{k}_tokens_per_second_median": statistics.median(v) for k, v in runs.items()}
    out.update({f"{k}_tokens_per_second_all": v for k, v in runs.items()})
    for k in ("adapter", "adapter_float16", "adapter_per_module"):
        out[f"{k}_over_base_median"] = statistics.median(a / b for a, b in zip(runs[k], runs["base"]))
    out.update(repeats=repeats, decode_tokens=n)
    return out


def run(bundle: Path, work: Path, threads: int, decode_tokens: int, rank: int, repeats: int = 5,
        interleaved_only: bool = False) -> dict:
    import edgelora
    from edgelora.memory import peak_rss_bytes
    names = [f"a{i}" for i in range(4)]
    paths = {n: make_random_adapter(work / f"adapter-r{rank}-{n}", bundle, r=rank, seed=i)
             for i, n in enumerate(names)}
    half = make_random_adapter(work / f"adapter-r{rank}-a0-float16", bundle, r=rank, seed=0, dtype=np.float16)
    model = edgelora.load(bundle, threads=threads, max_context=256)
    model.adapters.load("a0-float16", half)
    model.eos_ids = set()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.args.vocab_size, 16).tolist() for _ in names]

    if interleaved_only:
        model.adapters.load(names[0], paths[names[0]])
        _decode(model, prompts[0][:4], 4, names[0])  # compile / warm up every path
        _decode(model, prompts[0][:4], 4, "a0-float16")
        with per_module_deltas():
            _decode(model, prompts[0][:4], 4, names[0])
        return {"threads": threads, "rank": rank, "adapter_bytes": model.adapters[names[0]].nbytes,
                "adapter_float16_bytes": model.adapters["a0-float16"].nbytes,
                "interleaved": decode_interleaved(model, prompts[0], decode_tokens, repeats, names[0], "a0-float16")}
    loads = []
    for _ in range(5):
        t = time.perf_counter()
        model.adapters.load("probe", paths["a0"])
        loads.append(time.perf_counter() - t)
        model.adapters.unload("probe")
    for n in names:
        model.adapters.load(n, paths[n])
    adapter_bytes = model.adapters["a0"].nbytes

    swaps = []
    for i in range(2000):
        t = time.perf_counter()
        model.use(names[i % 4])
        swaps.append(time.perf_counter() - t)
    mixes = []
    for i in range(200):
        t = time.perf_counter()
        model.use({"a0": 0.5, "a1": 0.5})
        mixes.append(time.perf_counter() - t)
    model.use(None)

    _decode(model, prompts[0][:4], 4, "a0")  # compile / warm up every path
    _decode(model, prompts[0][:4], 4, "a0-float16")
    model.generate_batch([p[:4] for p in prompts], adapters=names, max_new_tokens=3, temperature=0)
    base = _decode(model, prompts[0], decode_tokens, None)
    lora = _decode(model, prompts[0], decode_tokens, "a0")
    base2 = _decode(model, prompts[0], decode_tokens, None)  # base again: drift check
    base_tps = max(base.decode_tokens_per_second, base2.decode_tokens_per_second)

    seq = [_decode(model, p, decode_tokens, n) for p, n in zip(prompts, names)]
    seq_decode = sum(s.decode_seconds for s in seq)
    seq_tokens = sum(s.generated_tokens - 1 for s in seq)
    model.generate_batch(prompts, adapters=names, max_new_tokens=decode_tokens, temperature=0)
    bstats = model.last_batch_stats
    batch_decode = bstats[0].decode_seconds
    batch_tokens = sum(s.generated_tokens - 1 for s in bstats)
    same = [b.generated_ids for b in bstats] == [s.generated_ids for s in seq]
    ms = 1e3
    return {"threads": threads, "rank": rank, "adapter_bytes": adapter_bytes,
            "adapter_float16_bytes": model.adapters["a0-float16"].nbytes,
            "load_ms_median": statistics.median(loads) * ms, "load_ms_all": [x * ms for x in loads],
            "swap_us_median": statistics.median(swaps) * 1e6, "swap_us_max": max(swaps) * 1e6,
            "mix_build_us_median": statistics.median(mixes) * 1e6,
            "decode_base_tokens_per_second": base_tps,
            "decode_adapter_tokens_per_second": lora.decode_tokens_per_second,
            "adapter_decode_ratio": lora.decode_tokens_per_second / base_tps,
            "sequential_4_adapters_tokens_per_second": seq_tokens / seq_decode,
            "batch_4_adapters_tokens_per_second": batch_tokens / batch_decode,
            "batch_vs_sequential": (batch_tokens / batch_decode) / (seq_tokens / seq_decode),
            "batch_tokens_equal_sequential": same, "peak_rss_bytes": peak_rss_bytes(),
            "interleaved": decode_interleaved(model, prompts[0], decode_tokens, repeats, "a0", "a0-float16")}


def main():
    def add(p):
        p.add_argument("--threads", type=int, nargs="+", default=None,
                       help="thread counts, each in a fresh process (default %(default)s: 1 and every core)")
        p.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
        p.add_argument("--decode-tokens", type=int, default=48, help="tokens generated per decode measurement")
        p.add_argument("--repeats", type=int, default=5, help="rounds of base / adapter / adapter per module, interleaved")
        p.add_argument("--interleaved-only", action="store_true", help="only the interleaved decode comparison")

    a, work = parse_args(__doc__, ["llama-3.2-1b"], add)
    sys.path.insert(0, str(HERE))
    from bench_runtime import prepare
    threads = a.threads or sorted({1, os.cpu_count()})
    report = {"cores": os.cpu_count(), "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        rows = []
        for th in threads:  # each thread count in a fresh process: its own peak RSS
            import subprocess
            code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); from bench_lora import run; "
                    f"from pathlib import Path; print(json.dumps(run(Path({str(bundle)!r}), Path({str(work)!r}), "
                    f"{th}, {a.decode_tokens}, {a.rank}, {a.repeats}, {a.interleaved_only})))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        report["models"][name] = rows
        print(f"\n{name}: one rank-{a.rank} all-linear adapter ({rows[0]['adapter_bytes'] / 1e6:.1f} MB resident; "
              f"from a float16 file {rows[0]['adapter_float16_bytes'] / 1e6:.1f} MB)")
        print("| threads | rounds | base tok/s | adapter tok/s (grouped) | adapter / base | float16 file tok/s "
              "| float16 / base | adapter per module tok/s | per module / base |")
        print("|---|---|---|---|---|---|---|---|---|")
        for o in rows:
            i = o["interleaved"]
            print(f"| {o['threads']} | {i['repeats']} | {i['base_tokens_per_second_median']:.2f} | "
                  f"{i['adapter_tokens_per_second_median']:.2f} | {i['adapter_over_base_median']:.3f} | "
                  f"{i['adapter_float16_tokens_per_second_median']:.2f} | {i['adapter_float16_over_base_median']:.3f} | "
                  f"{i['adapter_per_module_tokens_per_second_median']:.2f} | {i['adapter_per_module_over_base_median']:.3f} |")
        if a.interleaved_only:
            continue
        print("| threads | load ms | swap µs (median / max) | mix build µs | decode base tok/s | with adapter "
              "| adapter / base | 4 seq. one by one tok/s | batch of 4 tok/s | batch / one by one | same tokens "
              "| peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for o in rows:
            print(f"| {o['threads']} | {o['load_ms_median']:.1f} | {o['swap_us_median']:.1f} / {o['swap_us_max']:.0f} | "
                  f"{o['mix_build_us_median']:.0f} | {o['decode_base_tokens_per_second']:.2f} | "
                  f"{o['decode_adapter_tokens_per_second']:.2f} | {o['adapter_decode_ratio']:.2f} | "
                  f"{o['sequential_4_adapters_tokens_per_second']:.2f} | {o['batch_4_adapters_tokens_per_second']:.2f} | "
                  f"{o['batch_vs_sequential']:.2f} | {o['batch_tokens_equal_sequential']} | "
                  f"{o['peak_rss_bytes'] / 1e6:.0f} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
