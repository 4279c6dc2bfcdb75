"""Where decode and prefill time goes: a profile of edgelora's forward pass, by component.

For each model, one thread (so the profiler sees all the work: prefill tiles run on worker threads
otherwise), in this process:

* **decode**: ``model.generate`` from an 8-token prompt for 33 tokens, greedy, less the same
  for 1 token: 32 decode steps (the kernels, attention, norms, the per-token Python around
  them, sampling, streaming text); the 8-token prompt's own time is reported beside it;
* **prefill**: one ``forward`` over 128 tokens (dequantized weight tiles times the activations).

Python's profiler attributes each function's own time (``tottime``); functions are grouped into
components below. Numba kernels appear as the calls of their dispatchers, so a kernel's time is its
own; NumPy/BLAS products inside a Python function count for that function (``work`` is the
prefill's tile loop: its own time is the BLAS products). The profiler's overhead is reported too
(the same calls timed without it).

    python bench/profile_forward.py --models stories260K llama-3.2-1b --json bench/results/profile.json
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent

# component -> (file name ends with, function names); the first match wins, in this order
COMPONENTS = [
    ("NF4 matvec kernel", "kernels.py", {"_nf4_matvec_rows", "_nf4_matvec_parallel", "_nf4_matvec_batch_rows",
                                         "_nf4_matvec_batch_parallel"}),
    ("float16 matvec kernel (head)", "kernels.py", {"_f16_dot_rows", "_f16_matvec_parallel", "_f16_dot_rows_batch",
                                                    "_f16_matvec_batch_parallel"}),
    ("prefill: dequantize tiles", "kernels.py", {"_nf4_dequant_rows", "_nf4_dequant_parallel", "_f16_rows"}),
    ("prefill: BLAS products", "kernels.py", {"work"}),
    ("LoRA", "lora.py", None),
    ("attention", "llama.py", {"attention", "attention_blockwise", "attention_reference", "softmax", "scaled",
                               "allowed_keys"}),
    ("norms, rotary, activations", ("llama.py", "gemma.py", "_methods.py"), {"rmsnorm", "rope", "silu", "gelu_tanh",
                                                                            "gemma_rmsnorm", "_mean", "softcap"}),
    ("sampling", "sampling.py", None),
    ("tokenizer, text streaming", "tokenizer.py", None),
]
OTHER = "other Python (layer loop, wrappers, allocation)"


def component(filename: str, func: str) -> str:
    for name, files, funcs in COMPONENTS:
        if filename.endswith(files) and (funcs is None or func in funcs):
            return name
    return OTHER


def breakdown(profile: cProfile.Profile) -> dict:
    st = pstats.Stats(profile)
    out: dict[str, float] = {}
    for (filename, _, func), (_, _, tottime, _, _) in st.stats.items():
        key = component(filename, func)
        out[key] = out.get(key, 0.0) + tottime
    return out


def profile_model(bundle: Path, decode_tokens: int = 32, prefill_tokens: int = 128) -> dict:
    import numpy as np
    import edgelora
    model = edgelora.load(bundle, threads=1, max_context=max(256, prefill_tokens + 8))
    model.eos_ids = set()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.args.vocab_size, 8).tolist()
    long = rng.integers(3, model.args.vocab_size, prefill_tokens)
    model.generate(prompt, max_new_tokens=4, temperature=0)  # compile and warm up
    model.net.forward(long[:16], model.net.new_cache())

    def generate(n):
        return lambda: model.generate(prompt, max_new_tokens=n, temperature=0)

    def prefill():
        model.net.forward(long, model.net.new_cache())

    def measure(fn):
        t = time.perf_counter()
        fn()
        plain = time.perf_counter() - t
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        fn()
        prof.disable()
        return plain, time.perf_counter() - t, breakdown(prof)

    runs = {"prefill": (measure(prefill), None, prefill_tokens),
            # decode steps alone: 33 generated tokens less 1 (the prompt's prefill and the first token)
            "decode": (measure(generate(decode_tokens + 1)), measure(generate(1)), decode_tokens)}
    result = {}
    for name, (run, less, per) in runs.items():
        plain, profiled, parts = run
        if less is not None:
            plain, profiled = plain - less[0], profiled - less[1]
            parts = {k: v - less[2].get(k, 0.0) for k, v in parts.items()}
        parts = {k: max(v, 0.0) for k, v in parts.items()}
        total = sum(parts.values())
        result[name] = {"tokens": per, "seconds": plain, "ms_per_token": 1e3 * plain / per,
                        "profiled_seconds": profiled,
                        "components": {k: {"seconds": v, "share": v / total} for k, v in
                                       sorted(parts.items(), key=lambda kv: -kv[1]) if v / total >= 0.0005}}
    prompt_prefill = runs["decode"][1][0]
    result["short_prompt"] = {"prompt_tokens": len(prompt), "seconds_to_first_token": prompt_prefill,
                              "decode_steps_worth": prompt_prefill / (result["decode"]["seconds"] / decode_tokens)}
    return result


def main():
    a, work = parse_args(__doc__, ["stories260K", "llama-3.2-1b"])
    sys.path.insert(0, str(HERE))
    from bench_runtime import prepare
    report = {"threads": 1, "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        r = report["models"][name] = profile_model(bundle)
        sp = r["short_prompt"]
        print(f"\n{name}: an {sp['prompt_tokens']}-token prompt to its first token: {sp['seconds_to_first_token']:.3f} s, "
              f"{sp['decode_steps_worth']:.1f} decode steps' worth")
        for phase in ("decode", "prefill"):
            x = r[phase]
            print(f"\n{name} {phase}: {x['ms_per_token']:.2f} ms/token ({x['tokens']} tokens, 1 thread; "
                  f"{x['profiled_seconds'] / x['seconds']:.2f}x under the profiler)")
            print("| component | share | ms/token |")
            print("|---|---|---|")
            for k, v in x["components"].items():
                print(f"| {k} | {v['share']:.1%} | {1e3 * v['share'] * x['seconds'] / x['tokens']:.2f} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
