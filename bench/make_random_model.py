"""Write a randomly initialised Hugging Face Llama checkpoint of a real model's shape.

Speed and memory do not depend on the weight values, so benchmarks use random weights with the
exact shapes of real models (the hubs are unreachable here). Tensors are generated and written
one at a time in bfloat16 (as those models are published), so making a 1B model needs little RAM.

    python bench/make_random_model.py --shape llama-3.2-1b --out /tmp/llama1b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


SHAPES = {
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    # TinyLlama-1.1B: 22 layers, hidden 2048, 32 heads, 4 KV heads, MLP 5632, vocab 32000, untied
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=2048, rms_norm_eps=1e-5),
    # a small one for quick runs
    "small-50m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True, rope_theta=10000.0,
                      max_position_embeddings=2048, rms_norm_eps=1e-5),
}


def make_random_model(out: Path, shape: str, seed: int = 0) -> Path:
    from edgelora.architectures import Llama
    from edgelora.atomic import atomic_output_dir
    from edgelora.config import ModelArgs
    from edgelora.safetensors_io import SafetensorsWriter, float32_to_bf16

    cfg = dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    args = ModelArgs.from_dict(cfg)
    specs = Llama.tensor_map(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, overwrite=True) as tmp:  # complete or absent, never half-written
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        writer = SafetensorsWriter(tmp / "model.safetensors", [(n, "BF16", s.shape) for n, s in specs.items()],
                                   {"format": "pt"})
        rng = np.random.default_rng(seed)
        for name, spec in specs.items():
            rows = spec.shape[0]
            cols = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1
            step = max(1, (1 << 22) // cols)
            offset = 0
            for r in range(0, rows, step):
                n = min(step, rows - r) * cols
                if spec.role == "norm":
                    x = 1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)
                else:
                    x = 0.02 * rng.standard_normal(n, dtype=np.float32)
                bits = float32_to_bf16(x)
                writer.write(name, bits, offset)
                offset += bits.nbytes
        writer.close()
        write_word_tokenizer(tmp, args.vocab_size)
    return out


def write_word_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with ``vocab_size`` entries (benchmarks only need valid ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>"}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b", help="the real model whose shape to copy")
    p.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint to (required)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = p.parse_args()
    make_random_model(a.out, a.shape, a.seed)
    print(f"wrote {a.out} ({a.shape})")


if __name__ == "__main__":
    main()
