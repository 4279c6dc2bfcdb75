"""Phi-3: fused projections kept fused, against transformers, PEFT and bitsandbytes.

Tiny random ``Phi3ForCausalLM`` models (``tiny_models.CONFIGS``): "phi3" (GQA, untied head, a
sliding window shorter than the prompts) and "phi3_longrope" (tied head, longrope scaling, half of
each head rotated). The bundle holds ``qkv_proj`` and ``gate_up_proj`` as single NF4 tensors; the
runtime's logits must match transformers running the same dequantized weights in float32, LoRA
adapters on the fused modules must match PEFT, and a bitsandbytes 4-bit Phi-3 must import byte
for byte.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import edgelora
from edgelora.bundle import Bundle
from edgelora.config import ModelArgs
from edgelora.errors import AdapterMismatchError, FormatError, UnsupportedError
from tiny_models import Adapters, Converted, close, make_adapter, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARCHS = ["phi3", "phi3_longrope"]
MAX_CONTEXT = 64  # phi3_longrope's original_max_position_embeddings: the short factors' range
FUSED = ("self_attn.qkv_proj", "mlp.gate_up_proj")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Converted(tmp_path_factory, seed=7)


@pytest.fixture(scope="module")
def adapters(converted, tmp_path_factory):
    return Adapters(converted, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# conversion and the base model
# ---------------------------------------------------------------------------------------------

def test_fused_weights_stay_fused_nf4_tensors(converted):
    src, out = converted("phi3")
    with Bundle(out) as b:
        a = b.args
        q_dim, kv_dim = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        for i in range(a.num_hidden_layers):
            assert b.entries[f"model.layers.{i}.self_attn.qkv_proj.weight"].shape == (q_dim + 2 * kv_dim, 64)
            assert b.entries[f"model.layers.{i}.mlp.gate_up_proj.weight"].shape == (2 * a.intermediate_size, 64)
            for m in FUSED:
                assert b.entries[f"model.layers.{i}.{m}.weight"].storage == "nf4"
        assert not [n for n in b.names() if "q_proj" in n.replace("qkv_proj", "") or "up_proj" in
                    n.replace("gate_up_proj", "")]


def test_longrope_partial_rotary_tables_equal_transformers(converted):
    from edgelora.runtime.llama import rope_attention_scaling, rope_inv_freq, rope_tables
    src, out = converted("phi3_longrope")
    args = ModelArgs.from_file(out / "config.json")
    assert args.rope_type == "longrope" and args.rotary_dim == args.head_dim // 2
    assert rope_attention_scaling(args) == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))  # 256 / 64
    cos, sin = rope_tables(rope_inv_freq(args), MAX_CONTEXT, rope_attention_scaling(args))
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).model.rotary_emb
    with torch.no_grad():
        ref_cos, ref_sin = hf(torch.zeros(1), torch.arange(MAX_CONTEXT)[None])
    np.testing.assert_allclose(cos, ref_cos[0].numpy(), atol=2e-6)
    np.testing.assert_allclose(sin, ref_sin[0].numpy(), atol=2e-6)


# ---------------------------------------------------------------------------------------------
# what is refused
# ---------------------------------------------------------------------------------------------

def test_longrope_beyond_the_short_range_is_refused(converted):
    _, out = converted("phi3_longrope")
    assert edgelora.load(out).max_context == 64  # the default stays in the exact range
    with pytest.raises(UnsupportedError, match="original_max_position_embeddings=64"):
        edgelora.load(out, max_context=65)


def _phi3_config(**change):
    cfg = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96,
           "max_position_embeddings": 4096}
    cfg.update(change)
    return cfg


@pytest.mark.parametrize("change, error, match", [
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), UnsupportedError, "'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}),
     FormatError, "short_factor must be a list of 8"),
    (dict(partial_rotary_factor=1.5), FormatError, "partial_rotary_factor"),
    (dict(partial_rotary_factor=0.1), FormatError, "even number"),
    (dict(hidden_act="gelu_new"), UnsupportedError, "hidden_act"),
    (dict(model_type="llama", partial_rotary_factor=0.5), UnsupportedError, "only phi3 rotates part"),
    (dict(model_type="llama", rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                            "long_factor": [1.0] * 8}), UnsupportedError, "not supported for llama"),
])
def test_unsupported_phi3_options_are_refused(change, error, match):
    with pytest.raises(error, match=match):
        ModelArgs.from_dict(_phi3_config(**change))


def test_phi3_rope_aliases_and_defaults():
    a = ModelArgs.from_dict(_phi3_config(rope_scaling={"type": "su", "short_factor": [1.0] * 8,
                                                       "long_factor": [2.0] * 8}))
    assert a.rope_type == "longrope" and a.original_max_position_embeddings == 4096  # Phi3Config's default
    a = ModelArgs.from_dict(_phi3_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                          "partial_rotary_factor": 0.75}))
    assert (a.rope_theta, a.partial_rotary_factor, a.rotary_dim) == (5e5, 0.75, 12)


def test_split_or_misshapen_checkpoints_are_refused(converted, tmp_path):
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    src, _ = converted("phi3")

    def rewrite(change):
        ckpt = shutil.copytree(src, tmp_path / f"c{len(list(tmp_path.iterdir()))}")
        with SafetensorsFile(ckpt / "model.safetensors") as st:
            tensors = {k: np.array(st.raw(k)) for k in st.keys()}
        change(tensors)
        (ckpt / "model.safetensors").unlink()
        write_safetensors(ckpt / "model.safetensors", tensors, {"format": "pt"})
        return ckpt

    def split(t):  # a Llama-style export of the same weights
        qkv = t.pop("model.layers.0.self_attn.qkv_proj.weight")
        t["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.k_proj.weight"], \
            t["model.layers.0.self_attn.v_proj.weight"] = np.split(qkv, [64, 96])
    with pytest.raises(UnsupportedError, match="unexpected tensor.*q_proj"):
        edgelora.convert(rewrite(split), tmp_path / "out")
    short = rewrite(lambda t: t.__setitem__("model.layers.1.mlp.gate_up_proj.weight",
                                            t["model.layers.1.mlp.gate_up_proj.weight"][:128].copy()))
    with pytest.raises(FormatError, match=r"gate_up_proj.weight' has shape \[128, 64\].*\[256, 64\]"):
        edgelora.convert(short, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# LoRA adapters on the fused modules
# ---------------------------------------------------------------------------------------------

ADAPTERS = {"all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
            "qkv-only": dict(r=4, lora_alpha=8, target_modules=["qkv_proj"])}  # (vs PEFT: test_lora.py)


def test_qkv_adapter_spans_the_fused_output(converted, adapters):
    _, bundle = converted("phi3")
    res = edgelora.load(bundle, max_context=64).adapters.load("x", adapters("phi3", **ADAPTERS["qkv-only"]))
    assert sorted(res.adapter.pairs) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    assert res.adapter.pairs["model.layers.0.self_attn.qkv_proj"].B.shape == (128, 4)  # q, k and v rows


def test_llama_style_targets_are_refused_on_phi3(converted, tmp_path):
    src, bundle = converted("phi3")
    model = edgelora.load(bundle, max_context=16)
    llama_src = make_checkpoint(tmp_path / "llama", "llama3", seed=1)  # hidden 64 as well
    ad = make_adapter(llama_src, tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterMismatchError, match=r"'[qv]_proj' does not exist.*'gate_up_proj'.*'qkv_proj'"):
        model.adapters.load("x", ad)


def test_merge_adapter_into_fused_weights(converted, adapters, tmp_path):
    from edgelora.converters.nf4 import quantize_nf4
    src, _ = converted("phi3")
    ad = adapters("phi3", **ADAPTERS["qkv-only"])
    edgelora.convert(src, tmp_path / "merged", merge_adapter=ad)
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, ad).merge_and_unload().state_dict()
    with Bundle(tmp_path / "merged") as b:
        name = "model.layers.1.self_attn.qkv_proj.weight"
        want = quantize_nf4(merged[name].numpy())
        assert np.mean(want.packed == b.nf4(name).packed) > 0.999  # an ulp of W + sBA may cross a code boundary
        np.testing.assert_allclose(b.tensor(name), want.dequantize(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a bitsandbytes 4-bit Phi-3 (a QLoRA base)
# ---------------------------------------------------------------------------------------------

def test_bitsandbytes_phi3_imports_byte_for_byte(converted, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_bnb_import import bnb_model, dequantized_float_model, linear4bit_modules, save_bnb
    src, direct = converted("phi3")
    m = bnb_model(src)
    ckpt = save_bnb(m, src, tmp_path / "bnb")
    edgelora.convert(ckpt, tmp_path / "bundle")
    mods = linear4bit_modules(m)
    assert sorted({n.split(".", 3)[3] for n in mods}) == sorted(f"{f}.weight" for f in
                                                                  FUSED + ("self_attn.o_proj", "mlp.down_proj"))

    def parts(q):  # codes, block scales, nested scales, offset
        return [np.ascontiguousarray(x).tobytes() for x in (q.packed, q.scales, q.nested_scales, q.offset)]
    with Bundle(tmp_path / "bundle") as b, Bundle(direct) as d:
        for name, mod in mods.items():
            qs = mod.weight.quant_state
            theirs = parts(SimpleNamespace(packed=mod.weight.data.numpy().reshape(-1), scales=qs.absmax.numpy(),
                                           nested_scales=qs.state2.absmax.numpy(), offset=np.float32(qs.offset.item())))
            # bitsandbytes' own tensors == the imported bundle == converting the float weights directly;
            # one offset for the whole fused tensor
            assert parts(b.nf4(name)) == theirs == parts(d.nf4(name)), name
    ids = np.random.default_rng(0).integers(0, 96, 40)
    with torch.no_grad():
        ref = dequantized_float_model(m, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert close(edgelora.load(tmp_path / "bundle", max_context=MAX_CONTEXT, products="exact").logits(ids), ref)
