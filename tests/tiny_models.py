"""Tiny random Hugging Face checkpoints of each supported architecture, written by transformers."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "."]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every id of the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(WORDS), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))


CONFIGS = {
    # llama with llama3 rope scaling, tied head, GQA, MLP width not a multiple of 64
    "llama3": dict(cls="Llama", model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=172,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   max_position_embeddings=256),
    "llama_untied": dict(cls="Llama", model_type="llama", vocab_size=100, hidden_size=96, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=False),
    "mistral": dict(cls="Mistral", model_type="mistral", vocab_size=80, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    sliding_window=None),
    # a 131072-position limit: at its full context the KV cache needs 4.3 GB (32 layers x 2 x 256 x float16
    # a position), more than a Raspberry Pi 4's budget
    "long_context": dict(cls="Llama", model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "qwen2": dict(cls="Qwen2", model_type="qwen2", vocab_size=90, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Phi-3: fused qkv_proj [128, 64] and gate_up_proj [256, 64] (widths multiples of 64 for bitsandbytes),
    # GQA, untied head, a sliding window shorter than the test prompts
    "phi3": dict(cls="Phi3", model_type="phi3", vocab_size=96, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Phi-3.5/Phi-4-mini style: tied head, longrope scaling (short factors within 64 positions) and
    # half of each head rotated
    "phi3_longrope": dict(cls="Phi3", model_type="phi3", vocab_size=80, hidden_size=96, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True,
                          partial_rotary_factor=0.5, max_position_embeddings=256, original_max_position_embeddings=64,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                        "long_factor": [2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0]},
                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Gemma 2: head_dim 32 apart from hidden/heads (q_proj [128, 64]), GQA, tied head, query_pre_attn_scalar
    # not head_dim, soft-caps small enough to bite on random weights, layers 0 and 2 sliding with a
    # window shorter than the test prompts (widths multiples of 64 for bitsandbytes)
    "gemma2": dict(cls="Gemma2", model_type="gemma2", vocab_size=96, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   sliding_window=8, max_position_embeddings=256, initializer_range=0.05,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Gemma 2 otherwise: attention biases, untied head, layer_types not alternating, no attention soft-cap
    "gemma2_variant": dict(cls="Gemma2", model_type="gemma2", vocab_size=80, hidden_size=64, intermediate_size=192,
                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                           query_pre_attn_scalar=40, attn_logit_softcapping=None, final_logit_softcapping=4.0,
                           sliding_window=6, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                           attention_bias=True, tie_word_embeddings=False, max_position_embeddings=256,
                           initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Gemma (1): multi-query attention, head_dim 32 apart from hidden/heads, untied head
    "gemma": dict(cls="Gemma", model_type="gemma", vocab_size=80, hidden_size=64, intermediate_size=192,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  tie_word_embeddings=False, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def make_checkpoint(folder: Path, name: str, dtype: str = "float32", shard: bool = False, seed: int = 0) -> Path:
    """Save a random tiny model (transformers' own initialisation, then widened) to ``folder``."""
    import torch
    import transformers
    spec = dict(CONFIGS[name])
    cls = spec.pop("cls")
    spec.pop("model_type")
    config = getattr(transformers, f"{cls}Config")(**spec)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():  # make norms and biases non-trivial so that copying them is tested
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("norm.weight") else 0.0))
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="60KB" if shard else "5GB")
    write_tokenizer(folder, config.vocab_size)
    return folder


def make_adapter(ckpt: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A PEFT LoRA adapter for the tiny checkpoint at ``ckpt``, saved by PEFT itself.

    ``lora`` are ``peft.LoraConfig`` options. Every trained tensor is made non-trivial (PEFT starts
    ``B`` at zero and saved modules as copies of the base), so that applying it is really tested."""
    import peft
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and ("lora_" in n or "modules_to_save" in n or n.endswith("bias")):
                scale = 0.5 if "lora_B" in n or "lora_A" in n else 0.05
                p.add_(torch.randn_like(p) * scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(out)
    return out


class Converted:
    """``get(arch) -> (checkpoint, bundle)``: each tiny model made and converted once (for a
    module-scoped fixture)."""

    def __init__(self, tmp_path_factory, seed: int, bundle_name: str = "out"):
        self.tmp, self.seed, self.bundle_name, self.made = tmp_path_factory, seed, bundle_name, {}

    def __call__(self, arch: str):
        if arch not in self.made:
            import edgelora
            d = self.tmp.mktemp(arch)
            src = make_checkpoint(d / "src", arch, seed=self.seed)
            edgelora.convert(src, d / self.bundle_name)
            self.made[arch] = (src, d / self.bundle_name)
        return self.made[arch]


class Adapters:
    """``get(arch, seed=0, **lora) -> adapter folder`` for ``converted(arch)``'s checkpoint, each
    made once by PEFT (:func:`make_adapter`)."""

    def __init__(self, converted: Converted, tmp_path_factory):
        self.converted, self.tmp, self.made = converted, tmp_path_factory, {}

    def __call__(self, arch: str, seed: int = 0, name: str | None = None, **lora):
        key = (arch, seed, json.dumps(lora, sort_keys=True))
        if key not in self.made:
            src, _ = self.converted(arch)
            self.made[key] = make_adapter(src, self.tmp.mktemp("ad") / f"{name or arch}-{seed}", seed=seed, **lora)
        return self.made[key]


def hf_dequantized(bundle_path, ckpt):
    """transformers' model with every weight replaced by the bundle's (dequantized) tensor."""
    import torch
    import transformers
    from edgelora.bundle import Bundle
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    state = model.state_dict()
    with Bundle(bundle_path) as b:
        for name in b.names():
            state[name].copy_(torch.from_numpy(b.tensor(name)))
    return model.eval()


def hf_greedy(model, ids, n):
    import torch
    ids = list(ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def close(mine, ref) -> bool:
    """Logits within 1e-3 of the reference's scale: the tolerance every model-level test uses."""
    import numpy as np
    return np.abs(mine - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def assert_same_tensors(a, b) -> None:
    """Two bundles hold the same tensors: NF4 codes, scales, nested scales and offset byte for
    byte, every other tensor equal."""
    import numpy as np
    from edgelora.bundle import Bundle
    with Bundle(a) as x, Bundle(b) as y:
        assert set(x.names()) == set(y.names())
        for n in x.names():
            assert x.entries[n].storage == y.entries[n].storage, n
            if x.entries[n].storage == "nf4":
                p, q = x.nf4(n), y.nf4(n)
                assert np.array_equal(p.packed, q.packed), n
                assert np.array_equal(p.scales, q.scales), n
                assert np.array_equal(p.nested_scales, q.nested_scales), n
                assert p.offset == q.offset, n
            assert np.array_equal(x.tensor(n), y.tensor(n)), n


def assert_logits_match(bundle, src, n: int = 40) -> None:
    """edgelora's logits for ``n`` random tokens equal transformers' on the bundle's dequantized
    weights (the checkpoint ``src`` for the architecture) to 1e-3 of the logit scale."""
    import numpy as np
    import torch
    import edgelora
    model = edgelora.load(bundle, max_context=64, products="exact")  # the exact path: bit-true
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, n)
    with torch.no_grad():
        ref = hf_dequantized(bundle, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    mine = model.logits(ids)
    assert mine.shape == ref.shape
    assert close(mine, ref), np.abs(mine - ref).max()


def reseal(manifest_path: Path, manifest: dict) -> None:
    """Write an edited bundle or deploy manifest with its integrity digest recomputed, as edgelora writes
    one (tests that edit a manifest on purpose, to reach the checks behind its digest)."""
    from edgelora.bundle import sealed_text
    Path(manifest_path).write_text(sealed_text(manifest))


def put_bundle_file(bundle: Path, name: str, data) -> None:
    """Write file ``name`` into a bundle and list it in its manifest (with its checksum, the manifest
    resealed), as `edgelora convert` would have written it."""
    from edgelora.bundle import file_table
    path = Path(bundle) / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    manifest["files"].update(file_table([path]))
    reseal(Path(bundle) / "manifest.json", manifest)
