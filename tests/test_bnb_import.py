"""Importing bitsandbytes 4-bit checkpoints (QLoRA bases), checked against bitsandbytes itself.

Each checkpoint is made in the test by transformers + bitsandbytes: a tiny random model loaded
with ``BitsAndBytesConfig(load_in_4bit=True, ...)`` and saved with ``save_pretrained``. The
imported bundle's codes, scales, nested scales and offset must equal the bitsandbytes model's own
``Params4bit`` data and ``QuantState`` byte for byte, and its logits must match transformers
running that model dequantized in float32 (bitsandbytes' ``dequantize_4bit``) to 1e-3.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgelora
from edgelora.bundle import Bundle
from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.safetensors_io import SafetensorsFile, write_safetensors
from tiny_models import make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

# widths that are multiples of 64 or of no 32: bitsandbytes 0.50's CPU dequantizer mis-indexes
# 2-D weights whose width is a multiple of 32 but not of the block size (docs/format.md)
ARCHS = ["llama3", "mistral"]


def bnb_model(src, double_quant=True, quant_type="nf4"):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant,
                                          bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu").eval()


def save_bnb(model, src, out):
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, out / name)
    return out


def linear4bit_modules(model):
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def dequantized_float_model(bnb_m, src):
    """transformers' float32 model holding bitsandbytes' own dequantization of every 4-bit weight."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = ref.state_dict()
    with torch.no_grad():
        for name, m in linear4bit_modules(bnb_m).items():
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            state[name].copy_(w.reshape(state[name].shape))
        for name, p in bnb_m.state_dict().items():  # norms, embeddings, head: as bnb's model holds them
            if name in state and p.dtype == torch.float32 and p.shape == state[name].shape:
                state[name].copy_(p)
    return ref


@pytest.fixture(scope="module", params=ARCHS)
def imported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"bnb-{request.param}")
    src = make_checkpoint(d / "src", request.param, seed=3)
    m = bnb_model(src)
    ckpt = save_bnb(m, src, d / "bnb")
    summary = edgelora.convert(ckpt, d / "bundle")
    return src, m, ckpt, d / "bundle", summary


def test_codes_and_scales_equal_bitsandbytes_own_tensors(imported):
    src, m, _, bundle, summary = imported
    mods = linear4bit_modules(m)
    assert len(mods) == 7 * 2
    with Bundle(bundle) as b:
        assert b.quantization["source_quantization"] == "bitsandbytes-nf4 (imported, codes unchanged)"
        for name, mod in mods.items():
            q, qs = b.nf4(name), mod.weight.quant_state
            assert np.array_equal(q.packed, mod.weight.data.numpy().reshape(-1)), name
            assert np.array_equal(q.scales, qs.absmax.numpy()), name
            assert np.array_equal(q.nested_scales, qs.state2.absmax.numpy()), name
            assert q.offset.tobytes() == np.float32(qs.offset.item()).tobytes(), name
            assert q.shape == tuple(qs.shape) and q.block_size == qs.blocksize == 64
    # bitsandbytes quantized the float32 weights on load: converting them directly gives the same bytes
    with Bundle(bundle) as b, Bundle(edgelora.convert(src, bundle.parent / "direct").output) as direct:
        for name in mods:
            for part in ("packed", "scales", "nested_scales", "offset"):
                assert np.asarray(getattr(b.nf4(name), part)).tobytes() == \
                    np.asarray(getattr(direct.nf4(name), part)).tobytes(), (name, part)
    assert {t["name"]: t["rel_error"] for t in summary.tensors if t["storage"] == "nf4"}  # reported


def test_logits_match_the_bitsandbytes_model_dequantized(imported):
    src, m, _, bundle, _ = imported
    model = edgelora.load(bundle, max_context=128, products="exact")
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, 40)
    mine = model.logits(ids)
    with torch.no_grad():
        ref = dequantized_float_model(m, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    # (bitsandbytes' own CPU 4-bit forward is no reference here: it repacks the weights in place
    # for its CPU GEMM, which needs output sizes these tiny models do not have)
    assert np.abs(mine - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_without_double_quantization_imports_float_scales(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3", seed=4)
    m = bnb_model(src, double_quant=False)
    ckpt = save_bnb(m, src, tmp_path / "bnb")
    edgelora.convert(ckpt, tmp_path / "bundle")
    with Bundle(tmp_path / "bundle") as b:
        assert b.quantization["double_quant"] is False
        for name, mod in linear4bit_modules(m).items():
            q = b.nf4(name)
            assert q.scales.dtype == np.float32 and np.array_equal(q.scales, mod.weight.quant_state.absmax.numpy())
            assert np.array_equal(q.packed, mod.weight.data.numpy().reshape(-1))
    ids = np.arange(3, 30)
    with torch.no_grad():
        ref = dequantized_float_model(m, src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(edgelora.load(tmp_path / "bundle", products="exact").logits(ids) - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_block_size_cannot_be_changed_on_import(imported, tmp_path):
    _, _, ckpt, _, _ = imported
    with pytest.raises(UsageError, match="blocks of 64"):
        edgelora.convert(ckpt, tmp_path / "x", block_size=128)
    assert not (tmp_path / "x").exists()


def test_fp4_and_8bit_checkpoints_are_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3", seed=5)
    fp4 = save_bnb(bnb_model(src, quant_type="fp4"), src, tmp_path / "fp4")
    with pytest.raises(UnsupportedError, match="NF4 only"):
        edgelora.convert(fp4, tmp_path / "out")
    cfg = json.loads((fp4 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (fp4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="8-bit"):
        edgelora.convert(fp4, tmp_path / "out")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fp4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="gptq"):
        edgelora.convert(fp4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite(ckpt, change):
    """Rewrite the checkpoint's weights with ``change(tensors)`` applied."""
    path = ckpt / "model.safetensors"
    with SafetensorsFile(path) as st:
        tensors = {k: np.array(st.raw(k)) for k in st.keys()}
    change(tensors)
    path.unlink()
    write_safetensors(path, tensors, {"format": "pt"})


@pytest.mark.parametrize("damage, error, match", [
    (lambda t: t["model.layers.0.mlp.up_proj.weight.quant_map"].__setitem__(3, 0.5), UnsupportedError, "code book"),
    (lambda t: t["model.layers.0.mlp.up_proj.weight.nested_quant_map"].__setitem__(9, 0.5), UnsupportedError,
     "dynamic"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight.absmax",
                             t["model.layers.1.self_attn.q_proj.weight.absmax"][:-1].copy()), FormatError, "absmax"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight.nested_absmax"), FormatError, "nested_absmax"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4",
                             np.frombuffer(b'{"quant_type": "nf4", "blocksize": 64, "shape": [32, 32]}', np.uint8)
                             .copy()), FormatError, "shape"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4",
                             np.frombuffer(b'{"quant_type": "nf4", "blocksize": 4096, "shape": [32, 64]}',
                                           np.uint8).copy()), UnsupportedError, "block size 4096"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4",
                             np.frombuffer(b'{not json', np.uint8).copy()), FormatError, "JSON"),
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight.stray", np.zeros(3, np.float32)),
     UnsupportedError, "unexpected"),
])
def test_damaged_bitsandbytes_checkpoints_are_refused(imported, tmp_path, damage, error, match):
    _, _, ckpt, _, _ = imported
    copy = shutil.copytree(ckpt, tmp_path / "ckpt")
    _rewrite(copy, damage)
    with pytest.raises(error, match=match) as e:
        edgelora.convert(copy, tmp_path / "out")
    assert str(copy) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_inspects_a_bnb_checkpoint(imported, tmp_path, capsys):
    from edgelora.cli import main
    _, _, ckpt, _, _ = imported
    assert main(["inspect", str(ckpt)]) == 0
    assert "bitsandbytes-nf4" in capsys.readouterr().out
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "b"), "-q"]) == 0
    assert "imported" in capsys.readouterr().out
