"""The perplexity cost of the int8 product path: ``edgelora eval``'s perplexity with
``products="exact"`` and ``"int8"`` on real models and real text (issue 14 item 5: the default).

Models: stories260K (``$EDGELORA_SHARED_MODELS/stories260K``, converted here) and the built-in demo
model. Texts: held-out documents of the demo corpus (``scripts/demo_corpus.py`` with a seed the demo
model was not trained on: children's stories and chat dialogues, the demo's domain and
TinyStories') and, for each model, text it sampled itself (the exact path, temperature 1, seeded):
text the model finds likely, where a product error shows most in the loss.

Perplexity windows are whole prefills, so the int8 numbers are those of the prefill GEMM
(``runtime/int8_gemm.py``); decode shares its quantization of x.

    EDGELORA_SHARED_MODELS=/work/shared/models python bench/products_perplexity.py \\
        --json bench/results/products_perplexity.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import write_report  # noqa: E402


def sampled_text(model, prompts: list, tokens: int, seed: int) -> str:
    """The model's own continuations of ``prompts`` (exact path, temperature 1, seeded)."""
    return "\n\n".join(p + model.generate(p, max_new_tokens=tokens, temperature=1.0, seed=seed + i)
                       for i, p in enumerate(prompts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edgelora-products-ppl"),
                   help="where the bundles are made and kept")
    p.add_argument("--docs", type=int, default=120, help="held-out demo-corpus documents")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()

    import edgelora
    from edgelora.demo import demo_bundle
    from edgelora.evaluation import evaluate
    from demo_corpus import generate_corpus

    a.workdir.mkdir(parents=True, exist_ok=True)
    corpus = "\n\n".join(generate_corpus(a.docs, seed=12345))
    models = {"demo": demo_bundle(a.workdir, quiet=True)[0]}
    shared = os.environ.get("EDGELORA_SHARED_MODELS")
    if shared and (Path(shared) / "stories260K").is_dir():
        out = a.workdir / "stories260K-nf4"
        if not out.exists():
            edgelora.convert(Path(shared) / "stories260K", out)
        models["stories260K"] = out
    prompts = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog went to the park.",
               "The sun was shining and", "There was a big red ball", "Mia wanted to"]
    rows = []
    for name, bundle in models.items():
        exact = edgelora.load(bundle, products="exact")
        int8 = edgelora.load(bundle, products="int8")
        texts = {"demo-corpus": corpus, "own-samples": sampled_text(exact, prompts * 4, 200, seed=7)}
        for tname, text in texts.items():
            e, i = evaluate(exact, text=text), evaluate(int8, text=text)
            rows.append({"model": name, "text": tname, "tokens": e.text_tokens, "window": e.window,
                         "exact": e.perplexity, "int8": i.perplexity,
                         "cost_percent": 100 * (i.perplexity / e.perplexity - 1)})
            print(f"{name:12s} {tname:12s} {e.text_tokens:6d} tokens: exact {e.perplexity:.4f}  int8 "
                  f"{i.perplexity:.4f}  ({rows[-1]['cost_percent']:+.3f} %)", flush=True)
    write_report(a.json, {"results": rows, "max_cost_percent": max(r["cost_percent"] for r in rows)})


if __name__ == "__main__":
    main()
