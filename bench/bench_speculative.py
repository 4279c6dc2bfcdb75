"""Speculative decoding: decode tokens/s of greedy generation with and without prompt-lookup
drafting (and a draft model when ``--draft-model`` names one of the models), on prompts whose
answers repeat their text (a summary, a chat answer that restates), in one process per model, for
each ``--num-draft`` (guesses a verifying forward takes).

Each figure is the best of ``--rounds`` runs of ``generate`` (decode time only: after the
prefill), the rounds interleaved (each runs plain decoding and every drafting once), the drafted
runs checked to give the very tokens of the plain one; ``kept`` is accepted/drafted.

    python bench/bench_speculative.py --models stories260K tinyllama-1.1b --num-draft 1 2 4 --json bench/results/speculative.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
PASSAGE = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog, "
           "Max. One day, Lily and Max found a big red ball under a tree. Lily threw the ball and Max ran to "
           "get it. They played with the red ball all day, and when the sun went down they went home happy.")
PROMPTS = {
    "summary": f"{PASSAGE}\n\nRetell the story in your own words.\nOnce upon a time, there was a little girl",
    "chat": (f"User: Here is my story. {PASSAGE}\nUser: What did Lily and Max find?\n"
             f"Assistant: Lily and Max found a big red ball under a tree. Lily threw the ball and"),
}


def measure(bundle: Path, threads: int, n: int, draft_bundle: Path | None, num_drafts: list, rounds: int) -> dict:
    import edgelora
    model = edgelora.load(bundle, threads=threads, max_context=512)
    drafter = None if draft_bundle is None else edgelora.load(draft_bundle, threads=threads, max_context=512)
    drafts = {}
    for k in num_drafts:
        drafts[f"prompt-lookup, {k}"] = ("prompt-lookup", k)
        if drafter is not None:
            drafts[f"draft model, {k}"] = (drafter, k)
    model.eos_ids = set()  # the same number of tokens every run

    out = {}
    for name, prompt in PROMPTS.items():
        runs = {label: [] for label in ["plain", *drafts]}
        for _ in range(rounds):  # plain and every drafting in turn, each round (the machine's noise spread over all)
            runs["plain"].append(model.generate(prompt, n, return_result=True))
            for label, (draft, k) in drafts.items():
                runs[label].append(model.generate(prompt, n, return_result=True, draft=draft, num_draft=k))
        best = {label: max(rs, key=lambda r: r.decode_tokens_per_second) for label, rs in runs.items()}
        plain = best["plain"]
        row = {"plain_tokens_per_second": plain.decode_tokens_per_second}
        for label in drafts:
            r = best[label]
            assert r.token_ids == plain.token_ids, f"{label}: tokens differ from plain decoding"
            row[label] = {"tokens_per_second": r.decode_tokens_per_second,
                          "speedup": r.decode_tokens_per_second / plain.decode_tokens_per_second,
                          "drafted": r.stats.drafted_tokens, "accepted": r.stats.accepted_tokens}
        out[name] = row
    return out


def main():
    a, work = parse_args(__doc__, ["stories260K", "tinyllama-1.1b"], lambda p: (
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default %(default)s: every core)"),
        p.add_argument("--tokens", type=int, default=128, help="tokens generated per run"),
        p.add_argument("--rounds", type=int, default=3,
                       help="rounds, each running plain decoding and every drafting once; the best of each is kept"),
        p.add_argument("--num-draft", type=int, nargs="+", default=[4],
                       help="guesses each verifying forward takes, one measurement per value"),
        p.add_argument("--draft-model", default=None,
                       help="one of the models, used as the draft of the others "
                            "(default %(default)s: prompt lookup only)")))
    sys.path.insert(0, str(HERE))
    from bench_runtime import prepare
    threads = a.threads or os.cpu_count()
    bundles = {name: prepare(name, work)[1] for name in a.models}
    draft = None if a.draft_model is None else prepare(a.draft_model, work)[1]
    report = {"cores": os.cpu_count(), "threads": threads, "tokens": a.tokens, "rounds": a.rounds, "models": {}}
    for name, bundle in bundles.items():
        if bundle == draft:
            continue
        report["models"][name] = rows = measure(bundle, threads, a.tokens, draft, a.num_draft, a.rounds)
        print(f"\n{name}: greedy decode tok/s, {threads} threads, {a.tokens} tokens (best of {a.rounds}, interleaved)")
        labels = [k for k in rows["summary"] if k != "plain_tokens_per_second"]
        print("| prompt | plain | " + " | ".join(f"{k} guesses (speedup, kept)" for k in labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for prompt, row in rows.items():
            cells = [f"{row[k]['tokens_per_second']:.1f} ({row[k]['speedup']:.2f}x, "
                     f"{row[k]['accepted']}/{row[k]['drafted']})" for k in labels]
            print(f"| {prompt} | {row['plain_tokens_per_second']:.1f} | " + " | ".join(cells) + " |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
