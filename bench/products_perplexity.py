"""The perplexity cost of the int8 product path: ``edgelora eval``'s perplexity with
``products="exact"`` and ``"int8"`` on real models and real text (issue 14 item 5: the default),
both with a float32 KV cache; with ``--compare kv-cache``, that of a float16 KV cache against
float32 (both with the default products); with ``--compare defaults``, that of a default load
(int8 products, float16 cache, adapters rounded to float16) against the exact path (exact products,
float32 cache, adapters as their files hold them); with ``--compare adapter-dtype``, that of
adapters held in float16 against float32 (both with the default products, or ``--products``).

``--adapters`` (implied by ``--compare adapter-dtype``) also evaluates the demo model with each
of its trained demo adapters (``pirate``, ``shout``: float32 files, as PEFT saves them) in use.

Models: stories260K (``$EDGELORA_SHARED_MODELS/stories260K``, converted here) and the built-in demo
model. Texts: held-out documents of the demo corpus (``scripts/demo_corpus.py`` with a seed the demo
model was not trained on: children's stories and chat dialogues, the demo's domain and
TinyStories') and, for each model, text it sampled itself (the exact path, temperature 1, seeded):
text the model finds likely, where a product error shows most in the loss.

Perplexity windows are whole prefills, so the int8 numbers are those of the prefill GEMM
(``runtime/int8_gemm.py``); decode shares its quantization of x.

    EDGELORA_SHARED_MODELS=/work/shared/models python bench/products_perplexity.py \\
        --json bench/results/products_perplexity.json
    EDGELORA_SHARED_MODELS=/work/shared/models python bench/products_perplexity.py --compare kv-cache \\
        --json bench/results/kv_cache_perplexity.json
    EDGELORA_SHARED_MODELS=/work/shared/models python bench/products_perplexity.py --compare defaults \\
        --json bench/results/defaults_perplexity.json
    python bench/products_perplexity.py --compare adapter-dtype --json bench/results/adapter_dtype_perplexity.json
    python bench/products_perplexity.py --compare adapter-dtype --products exact \\
        --json bench/results/adapter_dtype_perplexity_exact.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import write_report  # noqa: E402

#: --compare: (the base's label and load options, the other's)
COMPARE = {"products": (("exact", {"products": "exact", "kv_cache": "float32"}),
                        ("int8", {"products": "int8", "kv_cache": "float32"})),
           "kv-cache": (("float32", {"kv_cache": "float32"}), ("float16", {"kv_cache": "float16"})),
           "defaults": (("exact", {"products": "exact"}), ("defaults", {})),
           "adapter-dtype": (("float32", {"adapter_dtype": "float32"}), ("float16", {"adapter_dtype": "float16"}))}


#: the prompts each model continues for its "own-samples" text
PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog went to the park.",
           "The sun was shining and", "There was a big red ball", "Mia wanted to"]


def models_and_corpus(workdir: Path, docs: int) -> tuple[dict, str]:
    """``({name: bundle}, corpus)``: the demo model and, where ``$EDGELORA_SHARED_MODELS`` holds it,
    stories260K converted into ``workdir``; ``docs`` held-out demo-corpus documents."""
    import edgelora
    from edgelora.demo import demo_bundle
    from demo_corpus import generate_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    corpus = "\n\n".join(generate_corpus(docs, seed=12345))
    models = {"demo": demo_bundle(workdir, quiet=True)[0]}
    shared = os.environ.get("EDGELORA_SHARED_MODELS")
    if shared and (Path(shared) / "stories260K").is_dir():
        out = workdir / "stories260K-nf4"
        if not out.exists():
            edgelora.convert(Path(shared) / "stories260K", out)
        models["stories260K"] = out
    return models, corpus


def common_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options these perplexity scripts share: ``--workdir``, ``--docs``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edgelora-products-ppl"),
                   help="where the bundles are made and kept")
    p.add_argument("--docs", type=int, default=120, help="held-out demo-corpus documents")
    return p


def sampled_text(model, prompts: list, tokens: int, seed: int) -> str:
    """The model's own continuations of ``prompts`` (exact path, temperature 1, seeded)."""
    return "\n\n".join(p + model.generate(p, max_new_tokens=tokens, temperature=1.0, seed=seed + i)
                       for i, p in enumerate(prompts))


def main():
    p = common_parser(__doc__)
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    p.add_argument("--compare", choices=tuple(COMPARE), default="products",
                   help="exact against int8 products, a float32 against a float16 KV cache, or the exact path "
                        "against a default load, or adapters held in float32 against float16")
    p.add_argument("--adapters", action="store_true",
                   help="also evaluate the demo model with each demo adapter in use (implied by --compare adapter-dtype)")
    p.add_argument("--products", choices=("exact", "int8"), default=None,
                   help="the products of both loads where the comparison does not set them (default: the load's)")
    a = p.parse_args()
    with_adapters = a.adapters or a.compare == "adapter-dtype"

    import edgelora
    from edgelora.evaluation import evaluate

    models, corpus = models_and_corpus(a.workdir, a.docs)
    prompts = PROMPTS
    rows = []
    (base, base_options), (other, other_options) = COMPARE[a.compare]
    if a.products is not None:
        base_options, other_options = ({"products": a.products, **o} for o in (base_options, other_options))
    for name, bundle in models.items():
        adapters = ({n: Path(edgelora.__file__).parent / "demo_adapters" / n for n in ("pirate", "shout")}
                    if with_adapters and name == "demo" else {})
        first = edgelora.load(bundle, adapters=adapters, **base_options)
        second = edgelora.load(bundle, adapters=adapters, **other_options)
        sampler = first if first.products == "exact" else edgelora.load(bundle, products="exact",
                                                                        adapters=adapters)
        selections = ([None] if a.compare != "adapter-dtype" else []) + list(adapters)
        for use in selections:
            for m in (first, second, sampler):
                m.use(use)
            label = name if use is None else f"{name}+{use}"
            texts = {"demo-corpus": corpus, "own-samples": sampled_text(sampler, prompts * 4, 200, seed=7)}
            for tname, text in texts.items():
                e, i = evaluate(first, text=text), evaluate(second, text=text)
                rows.append({"model": label, "text": tname, "tokens": e.text_tokens, "window": e.window,
                             base: e.perplexity, other: i.perplexity,
                             "cost_percent": 100 * (i.perplexity / e.perplexity - 1)})
                print(f"{label:12s} {tname:12s} {e.text_tokens:6d} tokens: {base} {e.perplexity:.4f}  {other} "
                      f"{i.perplexity:.4f}  ({rows[-1]['cost_percent']:+.3f} %)", flush=True)
    write_report(a.json, {"compare": a.compare, "results": rows,
                          "max_cost_percent": max(r["cost_percent"] for r in rows)})


if __name__ == "__main__":
    main()
