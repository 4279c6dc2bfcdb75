"""Conversion round-trips for tiny checkpoints of each architecture, and every bad-input path."""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import edgelora
from edgelora.bundle import Bundle
from edgelora.converters import nf4
from edgelora.converters.hf import HFCheckpoint
from edgelora.errors import (ChecksumError, FormatError, OutputError, PickleRefusedError, UnsupportedError,
                             UsageError)
from test_nf4_codec import bnb_dequantize_flat
from tiny_models import make_checkpoint

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _source_tensors(src: Path) -> dict:
    out = {}
    from safetensors import safe_open
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k).float().numpy()
    return out


@pytest.mark.parametrize("name,dtype,shard", [("llama3", "float32", False), ("llama_untied", "bfloat16", True),
                                              ("mistral", "float16", False), ("qwen2", "float32", True)])
def test_roundtrip(tmp_path, name, dtype, shard):
    src = make_checkpoint(tmp_path / "src", name, dtype, shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    summary = edgelora.convert(src, tmp_path / "out")
    orig = _source_tensors(src)
    with Bundle(tmp_path / "out") as b:
        assert b.args.model_type == edgelora.converters.hf.HFCheckpoint(src).args.model_type
        expected = set(orig) - ({"lm_head.weight"} if b.args.tie_word_embeddings else set())
        assert set(b.names()) == expected
        for tname in b.names():
            e = b.entries[tname]
            w = orig[tname]
            got = b.tensor(tname)
            assert got.shape == w.shape
            if e.storage == "nf4":
                q = b.nf4(tname)
                # same bytes and floats as bitsandbytes on the same float32 weights
                packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                                   compress_statistics=True)
                assert np.array_equal(q.packed, packed.numpy().ravel())
                assert np.array_equal(q.scales, state.absmax.numpy())
                assert np.array_equal(got.ravel(), bnb_dequantize_flat(packed, state))
                # within the NF4 error bound of the original, block by block
                flat, deq = w.ravel(), got.ravel()
                pad = -flat.size % 64
                am = np.abs(np.pad(flat, (0, pad))).reshape(-1, 64).max(1)
                err = np.abs(np.pad(deq - flat, (0, pad))).reshape(-1, 64).max(1)
                assert np.all(err <= am * 0.16 + 1e-6)
            elif e.storage == "float16":
                assert np.array_equal(got, w.astype(np.float16).astype(np.float32))
            else:
                assert np.array_equal(got, w), tname  # norms and biases: identical
        # an independent reader (the safetensors library) sees the same bytes we map
        ref = load_file(str(tmp_path / "out" / "model.safetensors"))
        for k in ref:
            assert np.array_equal(ref[k], b.weights.raw(k))
    assert summary.parameters == sum(v.size for k, v in orig.items() if k in expected)
    assert 4.1 < summary.nf4_bits_per_weight < 4.2
    for f in ("manifest.json", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).is_file()


def test_embeddings_and_head_in_nf4_without_double_quant(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama_untied")
    edgelora.convert(src, tmp_path / "out", block_size=128, double_quant=False, embeddings="nf4", head="nf4")
    orig = _source_tensors(src)
    with Bundle(tmp_path / "out") as b:
        assert b.entries["model.embed_tokens.weight"].storage == "nf4"
        assert b.entries["lm_head.weight"].storage == "nf4"
        q = b.nf4("lm_head.weight")
        assert not q.double_quant and q.block_size == 128
        packed, state = bnbf.quantize_4bit(torch.from_numpy(orig["lm_head.weight"]), blocksize=128,
                                           quant_type="nf4", compress_statistics=False)
        assert np.array_equal(q.packed, packed.numpy().ravel())
        assert np.array_equal(q.scales, state.absmax.numpy())
        assert b.manifest["quantization"]["lm_head"] == "nf4"


def test_chunked_quantization_equals_whole(tmp_path, monkeypatch):
    """Row-chunked streaming gives exactly the whole-tensor result (chunks forced tiny here)."""
    import edgelora.converters.convert as conv
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 200)
    src = make_checkpoint(tmp_path / "src", "llama3")
    conv.convert(src, tmp_path / "out")
    orig = _source_tensors(src)
    with Bundle(tmp_path / "out") as b:
        for n in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"):
            whole = nf4.quantize_nf4(orig[n])
            q = b.nf4(n)
            assert np.array_equal(q.packed, whole.packed) and np.array_equal(q.scales, whole.scales)
            assert q.offset == whole.offset


def test_cli_convert_and_inspect(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2")
    r = subprocess.run([sys.executable, "-m", "edgelora", "convert", str(src), "-o", str(tmp_path / "out"),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["model_type"] == "qwen2" and summary["worst_rel_error"] < 0.15
    r = subprocess.run([sys.executable, "-m", "edgelora", "inspect", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["checksums"] == "ok" and info["quantization"]["block_size"] == 64
    r = subprocess.run([sys.executable, "-m", "edgelora", "inspect", str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and "qwen2" in r.stdout
    r = subprocess.run([sys.executable, "-m", "edgelora", "convert", str(src), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_overwrite_replaces_atomically(tmp_path):
    src = make_checkpoint(tmp_path / "src", "mistral")
    edgelora.convert(src, tmp_path / "out")
    edgelora.convert(src, tmp_path / "out", overwrite=True, block_size=32)
    with Bundle(tmp_path / "out") as b:
        assert b.quantization["block_size"] == 32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the file, a non-zero exit, nothing left behind
# ---------------------------------------------------------------------------------------------

def _expect(tmp_path, src, exc, match):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match) as info:
        edgelora.convert(src, out)
    _no_leftovers(out)
    r = subprocess.run([sys.executable, "-m", "edgelora", "convert", str(src), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == info.value.exit_code != 0
    assert r.stderr.startswith("edgelora: error: ") and len(r.stderr.strip().splitlines()) == 1
    _no_leftovers(out)
    return info.value


def test_missing_config(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    (src / "config.json").unlink()
    _expect(tmp_path, src, FormatError, "no config.json")


def test_malformed_config(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    (src / "config.json").write_text("{ not json")
    e = _expect(tmp_path, src, FormatError, "malformed JSON")
    assert "config.json" in str(e)


def test_config_missing_field(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, src, FormatError, "hidden_size")


def test_unsupported_architecture(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, src, UnsupportedError, "unsupported architecture model_type='gpt2'")


def test_truncated_safetensors(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    e = _expect(tmp_path, src, FormatError, "truncated")
    assert "model.safetensors" in str(e)


def test_corrupt_safetensors_header(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    _expect(tmp_path, src, FormatError, "header")


def test_huge_header_length(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    _expect(tmp_path, src, FormatError, "header length")


def test_unexpected_shape(tmp_path):
    from edgelora.safetensors_io import write_safetensors
    src = make_checkpoint(tmp_path / "src", "llama3")
    t = {k: v.copy() for k, v in load_file(str(src / "model.safetensors")).items()}
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    write_safetensors(src / "model.safetensors", t)
    _expect(tmp_path, src, FormatError, r"up_proj.weight' has shape \[171, 64\].*\[172, 64\]")


def test_unexpected_tensor_and_dtype(tmp_path):
    from edgelora.safetensors_io import write_safetensors
    src = make_checkpoint(tmp_path / "src", "llama3")
    t = {k: v.copy() for k, v in load_file(str(src / "model.safetensors")).items()}
    t["model.layers.0.extra.weight"] = np.zeros(4, np.float32)
    write_safetensors(src / "model.safetensors", t)
    _expect(tmp_path, src, UnsupportedError, "unexpected tensor")
    del t["model.layers.0.extra.weight"]
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    write_safetensors(src / "model.safetensors", t)
    _expect(tmp_path, src, UnsupportedError, "dtype I32")


def test_missing_tensor(tmp_path):
    from edgelora.safetensors_io import write_safetensors
    src = make_checkpoint(tmp_path / "src", "llama3")
    t = dict(load_file(str(src / "model.safetensors")))
    del t["model.layers.1.self_attn.k_proj.weight"]
    write_safetensors(src / "model.safetensors", t)
    _expect(tmp_path, src, FormatError, "missing tensor")


class _Boom:
    def __reduce__(self):
        return (open, ("UNPICKLED_MARKER", "w"))


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make_checkpoint(tmp_path / "src", "llama3")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    e = _expect(tmp_path, src, PickleRefusedError, "never unpickles")
    assert "safe_serialization=True" in str(e)
    assert not (tmp_path / "UNPICKLED_MARKER").exists()


def test_missing_tokenizer(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    (src / "tokenizer.json").unlink()
    _expect(tmp_path, src, FormatError, "tokenizer.json")


def test_not_a_folder_or_hub_id(tmp_path):
    _expect(tmp_path, tmp_path / "nope", FormatError, "no such file")


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="org-that/does-not-exist"):
        edgelora.convert("org-that/does-not-exist", tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    import edgelora.safetensors_io as sio
    src = make_checkpoint(tmp_path / "src", "llama3")
    calls = {"n": 0}
    real = sio.SafetensorsWriter.write

    def full(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(sio.SafetensorsWriter, "write", full)
    with pytest.raises(OutputError, match="disk full"):
        edgelora.convert(src, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_tampered_bundle_fails_checksum(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    edgelora.convert(src, tmp_path / "out")
    f = tmp_path / "out" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.safetensors"):
        Bundle(tmp_path / "out", verify="full")
    b = Bundle(tmp_path / "out")  # the default: the weights hashed in the background, the mismatch kept
    try:
        with pytest.raises(ChecksumError, match="model.safetensors"):
            b.verification.wait(60)
        with pytest.raises(ChecksumError, match="model.safetensors"):
            b.check()  # what every forward step asks first
    finally:
        b.close()
    r = subprocess.run([sys.executable, "-m", "edgelora", "inspect", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "FAILED" in r.stdout


def test_newer_bundle_version_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src", "llama3")
    edgelora.convert(src, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnsupportedError, match="newer"):
        Bundle(tmp_path / "out")


def test_checkpoint_reader_names_the_shard(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2", shard=True)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FormatError) as e:
        HFCheckpoint(src)
    assert shard.name in str(e.value)
