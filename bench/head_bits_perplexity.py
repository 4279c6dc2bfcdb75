"""What a narrower default head would cost: perplexity with the int8 head's codes held to fewer bits.

The default head (a float16 head quantized to int8 at load, ``int8.F16Int8Linear``) is 279 of the
781 MB a Llama-3.2-1B-shaped decode step reads, so on a machine whose decode is bound by memory a
6-bit head (``rint(w * 31 / max|w|)`` per 64 entries, 6.5 bits a weight with the float32 scale,
as llama.cpp's default Q6_K head) would make the step ~9 % shorter. This script measures the price
before any kernel is written: it loads each model with the int8 products and a float32 KV cache,
with the head's codes quantized at ``levels`` (127: the default int8 head; 63: 7 bits; 31: 6 bits;
15: 5 bits; 7: 4 bits) in place of 127, and evaluates perplexity (``edgelora eval``'s
``evaluate``) against the exact path. The codes of ``levels < 127`` still fit the int8 kernels, so
the numbers are those a kernel for the narrower codes would give (its arithmetic is the same).
``--search-scale`` chooses each block's scale by least squares over 31 candidates from 0.7 to
1.0 of ``max|w| / levels`` instead (what llama.cpp's k-quants do).

``--sub-block N`` prices a k-quant-like head instead: each run of N entries (16 in Q5_K and Q6_K)
gets its own scale, the weights are rounded to ``levels`` steps of it and then given to the
default int8 rounding per 64 entries, which the int8 kernels multiply (a kernel for such a head
would multiply the narrow codes by the sub-block scales without that second rounding, so the cost
measured is the narrow head's plus a little; the sub-blocks' scales are kept in float32, where a
k-quant stores them in 6-8 bits). At 5 bits with 16-entry sub-blocks (about 5.5 bits a weight)
the 1B step would read 683 MB, below llama.cpp's 695.

Models and texts: as ``products_perplexity.py`` (the demo model and stories260K; the held-out demo
corpus and each model's own samples).

    EDGELORA_SHARED_MODELS=/work/shared/models python bench/head_bits_perplexity.py \\
        --json bench/results/head_bits_perplexity.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import write_report  # noqa: E402
from products_perplexity import PROMPTS, common_parser, models_and_corpus, sampled_text  # noqa: E402

LEVELS = (127, 63, 31, 15, 7)


def round_blocks(blocks: np.ndarray, levels: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, step)`` of ``blocks`` f32 [n, m, size]: each block's codes in ``-levels .. levels``
    (float) of its step ``max|w| / levels`` (or, with ``search``, the step of least squared error
    over 31 candidates from 0.7 to 1.0 of it); an all-zero block's codes and step 0."""
    amax = np.abs(blocks).max(axis=2)
    safe = np.where(amax > 0, amax, np.float32(1.0))
    best = c = step = None
    for f in (np.linspace(0.7, 1.0, 31, dtype=np.float32) if search else [np.float32(1.0)]):
        d = (safe * f / np.float32(levels)).astype(np.float32)
        cc = np.clip(np.rint(blocks / d[:, :, None]), -levels, levels)
        err = ((cc * d[:, :, None] - blocks) ** 2).sum(axis=2)
        if best is None:
            best, c, step = err, cc, d
        else:
            better = err < best
            best = np.where(better, err, best)
            c = np.where(better[:, :, None], cc, c)
            step = np.where(better, d, step)
    return np.where(amax[:, :, None] > 0, c, 0), np.where(amax > 0, step, 0).astype(np.float32)


def narrow_quantizer(levels: int, search: bool, sub_block: int = 0, default=None):
    """A stand-in for ``int8._quantize_rows`` with codes in ``-levels .. levels``: ``codes`` int8
    [n, k] (a block's even entries, then its odd ones, as the kernels read them), ``scales`` f32
    [n, k / bs] the codes' step times ``int8.CODE_SCALE``. With ``sub_block``, the weights rounded
    to ``levels`` steps of each ``sub_block`` entries' own scale, then to ``default``'s int8 codes."""
    from edgelora.runtime.int8 import CODE_SCALE

    def quantize(X, bs, codes, scales):
        n, k = X.shape
        if sub_block:
            c, step = round_blocks(X.reshape(n, k // sub_block, sub_block), levels, search)
            default((c * step[:, :, None]).reshape(n, k).astype(np.float32), bs, codes, scales)
            return
        c, step = round_blocks(X.reshape(n, k // bs, bs), levels, search)
        codes[:] = np.concatenate([c[:, :, 0::2], c[:, :, 1::2]], axis=2).reshape(n, k).astype(np.int8)
        scales[:] = step * np.float32(CODE_SCALE)

    return quantize


def main():
    p = common_parser(__doc__)
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                   help="the codes' largest magnitude (127: the default head)")
    p.add_argument("--search-scale", action="store_true", help="each block's scale by least squares")
    p.add_argument("--sub-block", type=int, default=0,
                   help="entries of a scale of a k-quant-like head, then the int8 rounding (0: the int8 head's 64)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()

    import edgelora
    from edgelora.evaluation import evaluate
    from edgelora.runtime import int8

    models, corpus = models_and_corpus(a.workdir, a.docs)
    prompts = PROMPTS
    default = int8._quantize_rows
    rows = []
    try:
        for name, bundle in models.items():
            exact = edgelora.load(bundle, products="exact", kv_cache="float32")
            texts = {"demo-corpus": corpus, "own-samples": sampled_text(exact, prompts * 4, 200, seed=7)}
            for tname, text in texts.items():
                base = evaluate(exact, text=text).perplexity
                row = {"model": name, "text": tname, "exact": base, "cost_percent": {}}
                for levels in a.levels:
                    int8._quantize_rows = (default if levels == 127 and not (a.search_scale or a.sub_block)
                                           else narrow_quantizer(levels, a.search_scale, a.sub_block, default))
                    model = edgelora.load(bundle, products="int8", kv_cache="float32")
                    row["cost_percent"][levels] = 100 * (evaluate(model, text=text).perplexity / base - 1)
                int8._quantize_rows = default
                rows.append(row)
                print(f"{name:12s} {tname:12s} exact {base:.4f}  " + "  ".join(
                    f"{levels}: {c:+.3f} %" for levels, c in row["cost_percent"].items()), flush=True)
    finally:
        int8._quantize_rows = default
    write_report(a.json, {"search_scale": a.search_scale, "sub_block": a.sub_block, "results": rows,
                          "max_cost_percent": {lv: max(r["cost_percent"][lv] for r in rows) for lv in a.levels}})


if __name__ == "__main__":
    main()
