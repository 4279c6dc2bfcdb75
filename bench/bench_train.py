"""Training benchmark: LoRA loss + gradients per second on the NF4 base against PyTorch + PEFT float32.

One model (the random-weight 1B shape by default), rank-16 all-linear adapters, sequences of 256
tokens (the first quarter masked, as a prompt), 2 threads. Each side runs in its own process so
that its peak RSS is its own:

* edgelora: ``runtime/backward.py``'s ``loss_and_grads`` on the NF4 bundle, with each of its
  checkpoint policies: ``layer`` (each layer recomputed in the backward, the default, the least
  memory), ``projections`` (the projections' outputs kept: no base product runs twice);
* PyTorch + PEFT: transformers' model in float32 with the bundle's weights dequantized (saved once
  as a float32 checkpoint, loaded with ``from_pretrained``), ``LoraConfig(r=16, lora_alpha=32,
  target_modules="all-linear")``, ``model(ids, labels=labels).loss.backward()``.

Both compute the loss and the adapters' gradients only (the optimizer's step is the same small
element-wise update on either side). One step warms up; the median of the timed steps counts.

    python bench/bench_train.py --models llama-3.2-1b --json bench/results/train.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent


def data(vocab: int, tokens: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(3, vocab, tokens)
    labels = ids.copy()
    labels[: tokens // 4] = -100
    return ids, labels


def adapter_values(module: str, rank: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The same A [r, in] (PEFT's initial range) and a small non-zero B [out, r] for a module on both sides,
    from a generator seeded by the module's name, so that both compute the same loss."""
    rng = np.random.default_rng(zlib.crc32(module.encode()))
    bound = 1.0 / np.sqrt(n_in)
    A = rng.uniform(-bound, bound, (rank, n_in)).astype(np.float32)
    return A, (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)


def run_edgelora(bundle: Path, threads: int, tokens: int, steps: int, rank: int, checkpoint: str) -> dict:
    import edgelora
    from edgelora.memory import peak_rss_bytes
    from edgelora.runtime.backward import init_lora, loss_and_grads, training_memory
    t0 = time.perf_counter()
    model = edgelora.load(bundle, threads=threads, max_context=tokens)
    load_s = time.perf_counter() - t0
    params = init_lora(model, "all-linear", rank, 2 * rank, False, 0)
    for m in params.A:  # non-zero B: every product of the backward really runs
        params.A[m], params.B[m] = adapter_values(m, rank, params.A[m].shape[1], params.B[m].shape[0])
    ids, labels = data(model.args.vocab_size, tokens)
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss, n, grads = loss_and_grads(model, params, ids, labels, checkpoint=checkpoint)
        times.append(time.perf_counter() - t)
        losses.append(loss / n)
        del grads
    plan = training_memory(model, params, tokens, checkpoint=checkpoint)
    return {"side": f"edgelora-{checkpoint}", "threads": threads, "tokens": tokens,
            "load_s": load_s, "warmup_s": times[0], "step_s": times[1:], "step_s_median": statistics.median(times[1:]),
            "tokens_per_second": tokens / statistics.median(times[1:]), "loss": losses[-1],
            "peak_rss_bytes": peak_rss_bytes(), "planned_training_bytes": plan["total"],
            "base_bytes": sum(p.stat().st_size for p in Path(bundle).glob("*.safetensors"))}


def run_torch(ckpt: Path, threads: int, tokens: int, steps: int, rank: int) -> dict:
    import peft
    import torch
    import transformers
    from edgelora.memory import peak_rss_bytes
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                    lora_dropout=0.0))
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        for n, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                m = n[len("base_model.model."):]
                A, B = adapter_values(m, rank, mod.in_features, mod.out_features)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(A))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(B))
    ids, labels = data(model.config.vocab_size, tokens)
    ids, labels = torch.from_numpy(ids)[None], torch.from_numpy(labels)[None]
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        out = pm(ids, labels=labels)
        out.loss.backward()
        times.append(time.perf_counter() - t)
        losses.append(float(out.loss.detach()))
        pm.zero_grad(set_to_none=True)
        del out
    return {"side": "torch+peft", "threads": threads, "tokens": tokens, "load_s": load_s, "warmup_s": times[0],
            "step_s": times[1:], "step_s_median": statistics.median(times[1:]),
            "tokens_per_second": tokens / statistics.median(times[1:]), "loss": losses[-1],
            "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__}


def dequantized_checkpoint(bundle: Path, src: Path, out: Path) -> Path:
    """The bundle's weights, dequantized, as a float32 Hugging Face checkpoint (made once)."""
    if (out / "model.safetensors").exists():
        return out
    import shutil
    from edgelora.bundle import Bundle
    from edgelora.safetensors_io import write_safetensors
    out.mkdir(parents=True, exist_ok=True)
    with Bundle(bundle) as b:
        tensors = {n: np.ascontiguousarray(b.tensor(n), np.float32) for n in b.names()}
    write_safetensors(out / "model.safetensors", tensors)
    del tensors
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out


def child(kind: str, path: Path, threads: int, tokens: int, steps: int, rank: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_train as b; from pathlib import Path; "
            + (f"r = b.run_torch(Path({str(path)!r}), {threads}, {tokens}, {steps}, {rank})" if kind == "torch" else
               f"r = b.run_edgelora(Path({str(path)!r}), {threads}, {tokens}, {steps}, {rank}, {kind.split('-', 1)[1]!r})")
            + "; print(json.dumps(r))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    def add(p):
        p.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts, each a pass over the sides")
        p.add_argument("--tokens", type=int, default=256, help="tokens per sequence (one sequence a step)")
        p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
        p.add_argument("--rank", type=int, default=16, help="rank of the all-linear adapters (alpha: twice the rank)")
        p.add_argument("--sides", nargs="+", default=["edgelora-layer", "edgelora-projections", "torch"],
                       help="what to run: edgelora-POLICY (checkpoint policy: layer, projections, none) and torch "
                            "(PyTorch + PEFT)")

    a, work = parse_args(__doc__, ["llama-3.2-1b"], add)
    sys.path.insert(0, str(HERE))
    from bench_runtime import prepare
    report = {"cores": os.cpu_count(), "tokens": a.tokens, "rank": a.rank, "targets": "all-linear",
              "load_average_at_start": os.getloadavg(), "models": {}}
    for name, threads in [(n, t) for n in a.models for t in a.threads]:
        src, bundle = prepare(name, work)
        rows = {}
        for side in a.sides:
            if side == "torch":
                ckpt = dequantized_checkpoint(bundle, src, work / f"dequantized-{name}")
                rows[side] = child("torch", ckpt, threads, a.tokens, a.steps, a.rank)
            else:
                rows[side] = child(side, bundle, threads, a.tokens, a.steps, a.rank)
            rows[side]["load_average_after"] = os.getloadavg()
            print(json.dumps(rows[side]), flush=True)
        if "torch" in rows:
            t = rows["torch"]
            for side, r in rows.items():
                if side != "torch":
                    r["speed_vs_torch"] = r["tokens_per_second"] / t["tokens_per_second"]
                    r["peak_rss_vs_torch"] = r["peak_rss_bytes"] / t["peak_rss_bytes"]
        report["models"].setdefault(name, {})[f"threads={threads}"] = rows
        print(f"\n{name}: rank {a.rank} all-linear, {a.tokens} tokens a step, {threads} threads")
        print("| side | tokens/s | step s (median) | peak RSS MB | vs torch speed | vs torch RSS | loss |")
        print("|---|---|---|---|---|---|---|")
        for side, r in rows.items():
            print(f"| {side} | {r['tokens_per_second']:.1f} | {r['step_s_median']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                  f"| {r.get('speed_vs_torch', 1.0):.2f} | {r.get('peak_rss_vs_torch', 1.0):.2f} | {r['loss']:.4f} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
