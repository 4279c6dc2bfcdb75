"""edgelora now against edgelora at an older git revision, on the same bundle, interleaved.

Each round runs ``edgelora bench``'s measurement (:func:`edgelora.benchmark.run_one`: prefill of the
prompt and of 128 tokens, decode after 8 tokens, peak RSS) once for each version, each in a fresh
process; the report gives each figure's median over the rounds and the ratio now/before. For a
refactor the ratios should be 1 within noise.

    python bench/bench_before_after.py --baseline 9dad959 --models tinyllama-1.1b --threads 2 \\
        --json bench/results/before_after.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import parse_args, write_report  # noqa: E402
from bench_runtime import baseline_env, prepare  # noqa: E402

from edgelora.child import python_command  # noqa: E402

FIGURES = ("prefill_tokens_per_second", "prefill_128_tokens_per_second", "decode_tokens_per_second",
           "peak_rss_bytes")


def measure(bundle: Path, threads: int, prompt: int, decode: int, env: dict | None) -> dict:
    """One run of the (old or new) edgelora's own ``run_one`` in a fresh process."""
    code = ("import json, sys\nfrom edgelora.benchmark import run_one\n"
            f"print(json.dumps(run_one(sys.argv[1], {threads}, {prompt}, {decode})))")
    r = subprocess.run(python_command(code, bundle), capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    def add(p):
        p.add_argument("--baseline", required=True, metavar="REV", help="the older git revision (required)")
        p.add_argument("--threads", type=int, default=2, help="threads of every run, both versions")
        p.add_argument("--prompt-tokens", type=int, default=128, help="tokens of the prompt whose prefill is timed")
        p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded after an 8-token prompt")
        p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of now and before (medians reported)")

    a, work = parse_args(__doc__, ["tinyllama-1.1b"], add)
    old = baseline_env(a.baseline, work)
    report = {"baseline": a.baseline, "threads": a.threads, "models": {}}
    for name in a.models:
        _, bundle = prepare(name, work)
        runs = {"now": [], a.baseline: []}
        for _ in range(a.rounds):  # interleaved: the machine's drift hits both alike
            runs["now"].append(measure(bundle, a.threads, a.prompt_tokens, a.decode_tokens, None))
            runs[a.baseline].append(measure(bundle, a.threads, a.prompt_tokens, a.decode_tokens, old))
        med = {v: {f: statistics.median(r[f] for r in rs) for f in FIGURES} for v, rs in runs.items()}
        report["models"][name] = {"median": med, "runs": runs}
        print(f"\n{name}, {a.threads} threads, median of {a.rounds} interleaved rounds")
        print(f"| figure | {a.baseline} | now | now / before |\n|---|---|---|---|")
        for f in FIGURES:
            before, now = med[a.baseline][f], med["now"][f]
            scale = 1e6 if f == "peak_rss_bytes" else 1
            print(f"| {f.replace('_', ' ')}{' (MB)' if scale > 1 else ''} | {before / scale:.1f} | {now / scale:.1f} "
                  f"| {now / before:.2f} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
