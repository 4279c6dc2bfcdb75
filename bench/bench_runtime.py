"""Runtime benchmark: edgelora against PyTorch + transformers float32, same model, same threads, one run.

For each model: ``edgelora bench`` figures (prefill of 512 and 128 tokens, decode over 128 tokens,
time to first token, peak RSS, measured bandwidth and the decode bound) and the same model in
transformers float32 with the same thread count, each configuration in a fresh process.

    python bench/bench_runtime.py --models stories260K llama-3.2-1b --json bench/results/runtime.json

``--baseline REV`` also runs edgelora as it was at git revision REV (installed into the work folder,
put first on the children's ``PYTHONPATH``) on the same bundle in the same run: before and after on
one machine. ``--no-mmap`` adds edgelora with the weights read into memory, ``--nf4-embeddings``
a second bundle whose (tied) embeddings and head are NF4 too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "models"

TORCH_CHILD = r"""
import json, sys, time
import torch
from edgelora.memory import peak_rss_bytes
from transformers import AutoModelForCausalLM
src, threads, n_prompt, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
V = model.config.vocab_size
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, V, (1, n_prompt), generator=g)
def prefill(ids):
    with torch.no_grad():
        model(ids[:, :8])
        t = time.perf_counter(); model(ids); return ids.shape[1] / (time.perf_counter() - t)
p512 = prefill(prompt)
p128 = prefill(prompt[:, :128])
with torch.no_grad():
    model.generate(prompt[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    out = model.generate(prompt[:, :8], max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    t1 = time.perf_counter()
    out = model.generate(prompt[:, :8], max_new_tokens=n_decode + 1, min_new_tokens=n_decode + 1, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    t2 = time.perf_counter()
decode = n_decode / ((t2 - t1) - (t1 - t))
print(json.dumps({"threads": threads, "prefill_tokens_per_second": p512, "prefill_128_tokens_per_second": p128,
                  "decode_tokens_per_second": decode,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def torch_run(src: Path, threads: int, n_prompt: int, n_decode: int) -> dict:
    r = subprocess.run([sys.executable, "-c", TORCH_CHILD, str(src), str(threads), str(n_prompt), str(n_decode)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(name: str, work: Path, embeddings: str = "float16", head: str = "float16") -> tuple[Path, Path]:
    import edgelora
    sys.path.insert(0, str(HERE))
    from make_random_model import SHAPES, make_random_model
    if name in SHAPES:
        src = work / f"src-{name}"
        if not (src / "model.safetensors").exists():
            make_random_model(src, name)
    else:
        src = SHARED / name
        if not src.is_dir():
            raise SystemExit(f"{src} not found")
    out = work / (f"bundle-{name}" if embeddings == "float16" else f"bundle-{name}-{embeddings}-embeddings")
    if head != "float16":
        out = out.with_name(f"{out.name}-{head}-head")
    if not out.exists():
        edgelora.convert(src, out, embeddings=embeddings, head=head)
    return src, out


def baseline_env(rev: str, work: Path) -> dict:
    """The environment that runs edgelora at git revision ``rev`` (exported and installed once)."""
    target = work / f"edgelora-{rev}"
    if not (target / "edgelora").is_dir():
        src = work / f"src-edgelora-{rev}"
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                        str(target), str(src)], check=True)
    # PYTHONSAFEPATH: ``python -c`` children would otherwise import the edgelora of their working folder first
    return {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1", "NUMBA_CACHE_DIR": str(work / f"numba-cache-{rev}")}


def main():
    from edgelora.benchmark import bench
    def add(p):
        p.add_argument("--threads", type=int, nargs="+", default=None,
                       help="thread counts, each in a fresh process (default %(default)s: 1 and every core)")
        p.add_argument("--prompt-tokens", type=int, default=512,
                       help="tokens of the long prefill (fewer where the model's context is shorter)")
        p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded after an 8-token prompt")
        p.add_argument("--baseline", default=None, metavar="REV", help="also run edgelora at this git revision")
        p.add_argument("--no-mmap", action="store_true", help="also run with the weights read into memory")
        p.add_argument("--nf4-embeddings", action="store_true", help="also run a bundle with NF4 (tied) embeddings")

    a, work = parse_args(__doc__, ["stories260K", "llama-3.2-1b"], add)
    threads = a.threads or sorted({1, os.cpu_count()})
    report = {"cores": os.cpu_count(), "models": {}}
    for name in a.models:
        src, bundle = prepare(name, work)
        prompt = min(a.prompt_tokens, json.loads((src / "config.json").read_text())["max_position_embeddings"]
                     - a.decode_tokens - 16)
        runs = {"edgelora": lambda: bench(bundle, threads, prompt, a.decode_tokens)["results"]}
        if a.baseline:
            env = baseline_env(a.baseline, work)
            runs[f"edgelora@{a.baseline}"] = lambda: bench(bundle, threads, prompt, a.decode_tokens, env=env)["results"]
        if a.no_mmap:
            runs["edgelora --no-mmap"] = lambda: bench(bundle, threads, prompt, a.decode_tokens, mmap=False)["results"]
        if a.nf4_embeddings:
            nf4_bundle = prepare(name, work, embeddings="nf4")[1]
            runs["edgelora, NF4 embeddings"] = lambda: bench(nf4_bundle, threads, prompt, a.decode_tokens)["results"]
            if a.no_mmap:
                runs["edgelora, NF4 embeddings --no-mmap"] = lambda: bench(nf4_bundle, threads, prompt, a.decode_tokens,
                                                                           mmap=False)["results"]
        results = {system: run() for system, run in runs.items()}
        theirs = [torch_run(src, th, prompt, a.decode_tokens) for th in threads]
        report["models"][name] = {"prompt_tokens": prompt, **results, "torch": theirs}
        print(f"\n{name} (prompt {prompt} tokens, decode {a.decode_tokens} tokens)")
        print("| threads | system | prefill tok/s | prefill 128 tok/s | decode tok/s | peak RSS MB | decode vs torch "
              "| prefill-128 vs torch | bandwidth bound tok/s | achieved of bound |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for i, t in enumerate(theirs):
            print(f"| {t['threads']} | PyTorch fp32 | {t['prefill_tokens_per_second']:.1f} | "
                  f"{t['prefill_128_tokens_per_second']:.1f} | {t['decode_tokens_per_second']:.2f} | "
                  f"{t['peak_rss_bytes'] / 1e6:.0f} | 1.00 | 1.00 | | |")
            for system, rows in results.items():
                o = rows[i]
                print(f"| {o['threads']} | {system} | {o['prefill_tokens_per_second']:.1f} | "
                      f"{o['prefill_128_tokens_per_second']:.1f} | {o['decode_tokens_per_second']:.2f} | "
                      f"{o['peak_rss_bytes'] / 1e6:.0f} | "
                      f"{o['decode_tokens_per_second'] / t['decode_tokens_per_second']:.2f} | "
                      f"{o['prefill_128_tokens_per_second'] / t['prefill_128_tokens_per_second']:.2f} | "
                      f"{o['decode_bound_tokens_per_second']:.1f} | {o['fraction_of_bound']:.0%} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
