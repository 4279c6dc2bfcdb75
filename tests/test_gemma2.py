"""Gemma 2 (and Gemma) against transformers, PEFT and bitsandbytes.

Tiny random models (``tiny_models.CONFIGS``): "gemma2" (GQA, head_dim apart from hidden/heads,
tied head, query_pre_attn_scalar not head_dim, both soft-caps small enough to bite, every other
layer sliding with a window shorter than the prompts), "gemma2_variant" (attention biases, untied
head, its own layer_types, no attention soft-cap) and "gemma" (Gemma 1: multi-query attention,
untied head). The runtime's logits must match transformers running the same dequantized weights
in float32, adapters must match PEFT, and a bitsandbytes 4-bit Gemma 2 must import byte for byte.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import edgelora
from edgelora.bundle import Bundle
from edgelora.config import ModelArgs
from edgelora.errors import FormatError, UnsupportedError
from edgelora.safetensors_io import SafetensorsFile
from tiny_models import Adapters, Converted, close, hf_dequantized

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARCHS = ["gemma2", "gemma2_variant", "gemma"]
MAX_CONTEXT = 64
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Converted(tmp_path_factory, seed=7)


@pytest.fixture(scope="module")
def adapters(converted, tmp_path_factory):
    return Adapters(converted, tmp_path_factory)


def reference(out, src, ids):
    with torch.no_grad():
        return hf_dequantized(out, src)(torch.from_numpy(ids)[None]).logits[0].numpy()  # [T, V]


# ---------------------------------------------------------------------------------------------
# conversion and the base model
# ---------------------------------------------------------------------------------------------

def test_norms_are_stored_as_the_checkpoint_holds_them(converted):
    src, out = converted("gemma2")
    with Bundle(out) as b, SafetensorsFile(src / "model.safetensors") as st:
        a = b.args
        assert a.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert "lm_head.weight" not in b.names()  # tied
        for i in range(a.num_hidden_layers):
            for norm in NORMS:
                name = f"model.layers.{i}.{norm}.weight"
                assert b.entries[name].storage == "float32"
                np.testing.assert_array_equal(b.tensor(name), st.float32(name))  # no 1 added
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                assert b.entries[f"model.layers.{i}.{m}.weight"].storage == "nf4"
        assert b.entries["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32, not 64 / 4
        np.testing.assert_array_equal(b.tensor("model.norm.weight"), st.float32("model.norm.weight"))


def _no_plus_one(monkeypatch, net):
    import edgelora.runtime.gemma as g
    monkeypatch.setattr(g, "gemma_rmsnorm", g.rmsnorm)


def _silu(monkeypatch, net):
    import edgelora.runtime.gemma as g
    from edgelora.runtime.llama import silu
    monkeypatch.setattr(g, "gelu_tanh", silu)


# each of Gemma 2's differences, undone, must break the match: the tiny model exercises them all
SENSITIVITY = {
    "attention soft-cap": lambda mp, net: setattr(net, "attn_cap", None),
    "final soft-cap": lambda mp, net: setattr(net, "final_cap", None),
    "norms' 1 + w": _no_plus_one,
    "query_pre_attn_scalar": lambda mp, net: setattr(net, "scale", net.args.head_dim ** -0.5),
    "embedding scale": lambda mp, net: setattr(net, "normalizer", np.float32(1.0)),
    "sliding window": lambda mp, net: setattr(net, "windows", [None] * net.args.num_hidden_layers),
    "GELU (not Llama's SiLU)": _silu,
}


@pytest.mark.parametrize("undo", sorted(SENSITIVITY))
def test_each_gemma2_difference_matters(undo, converted, monkeypatch):
    src, out = converted("gemma2")
    model = edgelora.load(out, max_context=MAX_CONTEXT)
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, 40)
    ref = reference(out, src, ids)
    SENSITIVITY[undo](monkeypatch, model.net)
    mine = model.logits(ids)
    assert not close(mine, ref), f"undoing the {undo} left the logits within tolerance"


def test_llama_attention_is_unchanged_by_the_new_parameters():
    from edgelora.runtime.llama import attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((5, 4, 16), (9, 2, 16), (9, 2, 16)))
    pos = np.arange(4, 9)
    base = attention(q, k, v, pos, None)
    np.testing.assert_allclose(attention(q, k, v, pos, None, scale=0.25), base, atol=1e-6)  # 16 ** -0.5
    capped = attention(q, k, v, pos, 3, scale=0.25, softcap=1.0)
    assert np.abs(capped - attention(q, k, v, pos, 3)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# configuration: transformers' defaults, and what is refused
# ---------------------------------------------------------------------------------------------

def _gemma2_config(**change):
    cfg = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 96}
    cfg.update(change)
    return {k: v for k, v in cfg.items() if v is not ...}  # ...: leave the key out


def test_gemma2_defaults_are_transformers():
    # a Gemma 2 config.json as the hub has them: no layer_types, no tie_word_embeddings, hidden_act (ignored)
    a = ModelArgs.from_dict(_gemma2_config(hidden_act="gelu_pytorch_tanh", cache_implementation="hybrid"))
    want = transformers.Gemma2Config(**_gemma2_config())
    assert a.layer_types == want.layer_types == ["sliding_attention", "full_attention"] * 2
    assert a.tie_word_embeddings is want.tie_word_embeddings is True
    assert (a.head_dim, a.query_pre_attn_scalar, a.sliding_window, a.max_position_embeddings) == \
        (want.head_dim, want.query_pre_attn_scalar, want.sliding_window, want.max_position_embeddings)
    assert (a.attn_logit_softcapping, a.final_logit_softcapping) == (want.attn_logit_softcapping,
                                                                     want.final_logit_softcapping)
    assert a.activation == want.hidden_activation == "gelu_pytorch_tanh"
    a = ModelArgs.from_dict(_gemma2_config(attn_logit_softcapping=None, final_logit_softcapping=None))
    assert (a.attn_logit_softcapping, a.final_logit_softcapping) == (None, None)  # null: no soft-cap


def test_gemma_legacy_gelu_is_the_tanh_approximation():
    cfg = _gemma2_config(model_type="gemma", hidden_act="gelu")
    assert ModelArgs.from_dict(cfg).activation == transformers.GemmaConfig(**cfg).hidden_act == "gelu_pytorch_tanh"
    assert ModelArgs.from_dict(_gemma2_config(model_type="gemma")).tie_word_embeddings is True


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden_activation="gelu"), UnsupportedError, "hidden_activation='gelu' is not supported"),
    (dict(model_type="gemma", hidden_act="silu"), UnsupportedError, "hidden_act='silu' is not supported for gemma"),
    (dict(use_bidirectional_attention=True), UnsupportedError, "use_bidirectional_attention"),
    (dict(model_type="gemma", use_bidirectional_attention=True), UnsupportedError, "use_bidirectional_attention"),
    (dict(layer_types=["full_attention"] * 3), FormatError, "layer_types"),
    (dict(layer_types=["full_attention", "chunked_attention"] * 2), FormatError, "layer_types"),
    (dict(sliding_window=None), FormatError, "sliding_window is null"),
    (dict(query_pre_attn_scalar=None), FormatError, "query_pre_attn_scalar"),
    (dict(query_pre_attn_scalar=0), FormatError, "query_pre_attn_scalar"),
    (dict(attn_logit_softcapping=-1.0), FormatError, "attn_logit_softcapping"),
    (dict(final_logit_softcapping="30"), FormatError, "final_logit_softcapping"),
    (dict(partial_rotary_factor=0.5), UnsupportedError, "only phi3 rotates part"),
])
def test_unsupported_gemma_options_are_refused(change, error, match):
    with pytest.raises(error, match=match):
        ModelArgs.from_dict(_gemma2_config(**change))


def test_full_attention_everywhere_needs_no_window():
    a = ModelArgs.from_dict(_gemma2_config(sliding_window=None, layer_types=["full_attention"] * 4))
    assert a.sliding_window is None


def test_mislabelled_or_incomplete_checkpoints_are_refused(converted, tmp_path):
    from edgelora.safetensors_io import write_safetensors
    src, _ = converted("gemma2")
    as_gemma = shutil.copytree(src, tmp_path / "as_gemma")  # Gemma 2 weights with a Gemma 1 config
    cfg = json.loads((as_gemma / "config.json").read_text())
    (as_gemma / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma",
                                                      "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(UnsupportedError, match="unexpected tensor.*feedforward_layernorm"):
        edgelora.convert(as_gemma, tmp_path / "out")
    lacking = shutil.copytree(src, tmp_path / "lacking")
    with SafetensorsFile(lacking / "model.safetensors") as st:
        tensors = {k: np.array(st.raw(k)) for k in st.keys() if "1.post_feedforward" not in k}
    (lacking / "model.safetensors").unlink()
    write_safetensors(lacking / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(FormatError, match="missing tensor.*layers.1.post_feedforward_layernorm"):
        edgelora.convert(lacking, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------

ADAPTERS = {"all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear")}  # (vs PEFT: test_lora.py)


def test_planner_plans_a_gemma2_bundle(converted, adapters):
    from edgelora.devices.planner import kv_cache_bytes, plan
    _, bundle = converted("gemma2")
    ad = adapters("gemma2", **ADAPTERS["all-linear"])
    p = plan(bundle, "x86-64-laptop", context=MAX_CONTEXT, adapters={"a": ad}, threads=1, overhead=0)
    model = edgelora.load(bundle, max_context=MAX_CONTEXT, adapters={"a": ad}, threads=1)
    items = {i.name: i.bytes for i in p.items}
    assert items["KV cache"] == model.net.new_cache().nbytes == kv_cache_bytes(model.args, MAX_CONTEXT)
    assert items["adapter a"] == model.adapters["a"].nbytes
    assert p.fits and p.max_context == model.args.max_position_embeddings


# ---------------------------------------------------------------------------------------------
# a bitsandbytes 4-bit Gemma 2 (a QLoRA base)
# ---------------------------------------------------------------------------------------------

def test_bitsandbytes_gemma2_imports_byte_for_byte(converted, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_bnb_import import bnb_model, dequantized_float_model, linear4bit_modules, save_bnb
    src, direct = converted("gemma2")
    m = bnb_model(src)
    ckpt = save_bnb(m, src, tmp_path / "bnb")
    edgelora.convert(ckpt, tmp_path / "bundle")
    mods = linear4bit_modules(m)
    assert len(mods) == 7 * 3

    def parts(q):  # codes, block scales, nested scales, offset
        return [np.ascontiguousarray(x).tobytes() for x in (q.packed, q.scales, q.nested_scales, q.offset)]
    with Bundle(tmp_path / "bundle") as b, Bundle(direct) as d:
        for name, mod in mods.items():
            qs = mod.weight.quant_state
            theirs = parts(SimpleNamespace(packed=mod.weight.data.numpy().reshape(-1), scales=qs.absmax.numpy(),
                                           nested_scales=qs.state2.absmax.numpy(), offset=np.float32(qs.offset.item())))
            assert parts(b.nf4(name)) == theirs == parts(d.nf4(name)), name
        for i in range(3):  # the norms as stored, the 1 not added
            for norm in NORMS:
                name = f"model.layers.{i}.{norm}.weight"
                np.testing.assert_array_equal(b.tensor(name), d.tensor(name))
    ids = np.random.default_rng(0).integers(0, 96, 40)
    with torch.no_grad():
        ref = dequantized_float_model(m, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert close(edgelora.load(tmp_path / "bundle", max_context=MAX_CONTEXT, products="exact").logits(ids), ref)
