"""Quality cost of NF4 for the token embeddings and the output head, measured, not assumed.

For each storage choice the checkpoint is converted, its dequantized float32 weights are loaded
into transformers' own model, and on the same text we measure the perplexity and the mean
KL(original || quantized) of the next-token distributions, plus the bundle's weight bytes.

    python bench/quant_quality.py CHECKPOINT [--text FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from edgelora.atomic import write_text_atomic

DEFAULT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
    "Lily asked her mom to help her. Her mom smiled and said, \"Let's get it together!\" "
    "They found a long stick and pushed the ball down. Lily was very happy. She thanked her mom "
    "and they played with the ball all day. The sun was warm and the birds sang in the trees. "
    "When it was time to go home, Lily said goodbye to the park and went home with a big smile."
)


def load_dequantized(bundle_path: Path, ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from edgelora.bundle import Bundle
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    state = model.state_dict()
    with Bundle(bundle_path) as b:
        for name in b.names():
            state[name].copy_(torch.from_numpy(b.tensor(name)))
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def measure(ckpt: Path, text: str) -> list[dict]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    import edgelora
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids
    cfg = json.loads((ckpt / "config.json").read_text())
    ids = ids[: cfg.get("max_position_embeddings", 2048)]
    x = torch.tensor([ids])
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref(x).logits[0, :-1], -1)
    tgt = x[0, 1:]
    rows = [{"setting": "original float32", "ppl": float(torch.exp(-ref_logp[range(len(tgt)), tgt].mean())),
             "kl": 0.0, "weight_bytes": None}]
    tied = cfg.get("tie_word_embeddings", False)
    choices = [("float16", "float16"), ("nf4", "float16")] + ([] if tied else [("float16", "nf4"), ("nf4", "nf4")])
    for emb, head in choices:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "b"
            s = edgelora.convert(ckpt, out, embeddings=emb, head=head)
            m = load_dequantized(out, ckpt)
            with torch.no_grad():
                logp = torch.log_softmax(m(x).logits[0, :-1], -1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        label = f"linears NF4, embeddings {emb}" + ("" if tied else f", head {head}") + (" (tied head)" if tied else "")
        rows.append({"setting": label, "ppl": float(torch.exp(-logp[range(len(tgt)), tgt].mean())), "kl": kl,
                     "weight_bytes": s.weights_bytes, "bits_per_weight": s.bits_per_weight})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint folder (with tokenizer.json)")
    p.add_argument("--text", type=Path, help="a text file to measure on (default %(default)s: a short built-in story)")
    p.add_argument("--json", type=Path, help="write the results here (default %(default)s: not written)")
    a = p.parse_args()
    rows = measure(a.checkpoint, a.text.read_text() if a.text else DEFAULT_TEXT)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.json, json.dumps(rows, indent=1))
    print(f"{a.checkpoint.name}:")
    print("| setting | perplexity | KL(orig‖quant) nats/token | weight bytes | bits/weight |")
    print("|---|---|---|---|---|")
    for r in rows:
        wb = "" if r["weight_bytes"] is None else f"{r['weight_bytes']:,}"
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "32"
        print(f"| {r['setting']} | {r['ppl']:.3f} | {r['kl']:.4f} | {wb} | {bpw} |")


if __name__ == "__main__":
    main()
