"""GGUF files (llama.cpp's format) with F32/F16/BF16 tensors converted to bundles: written here as
llama.cpp's convert_hf_to_gguf.py writes them (gguf's own name tables, the q/k permutation of the
llama architecture, its metadata keys and per-tensor types), checked to load in transformers to the
original weights, then converted: the same NF4 bytes as converting the Hugging Face checkpoint
directly, the same logits as transformers on the dequantized weights, and every refusal."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.bundle import Bundle
from edgelora.converters.gguf import GGUFCheckpoint
from edgelora.errors import FormatError, UnsupportedError, UsageError
from tiny_models import assert_logits_match, assert_same_tensors, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(cfg: dict, rope: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.generate_extra_tensors`` (torch float32, as there)."""
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def write_gguf(src: Path, out: Path, outtype: str = "f32", config: bool = False, tokenizer: bool = True,
               name: str | None = None, arch: str | None = None, extra: dict | None = None,
               drop: tuple = (), qtype: dict | None = None) -> Path:
    """``src`` written to ``out/model.gguf`` the way ``convert_hf_to_gguf.py --outtype OUTTYPE`` does,
    with its tokenizer (and, if ``config``, config.json) beside it. ``extra`` adds tensors, ``drop``
    leaves some out, ``qtype`` forces a GGML type per tensor, ``arch`` overrides the architecture."""
    cfg = json.loads((src / "config.json").read_text())
    mt = cfg["model_type"]
    model_arch = gguf.MODEL_ARCH.QWEN2 if mt == "qwen2" else gguf.MODEL_ARCH.LLAMA  # llama.cpp labels Mistral llama
    arch_name = arch or gguf.MODEL_ARCH_NAMES[model_arch]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    tmap = gguf.get_tensor_name_map(model_arch, cfg["num_hidden_layers"])
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out / "model.gguf", arch_name)
    # TextModel.set_gguf_parameters / LlamaModel.set_gguf_parameters
    w.add_name(name or {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[mt] + " Tiny")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
    if model_arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    # the vocabulary llama.cpp embeds (a BPE-style list of the tokenizer's tokens)
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    tensors = {}
    if rope.get("rope_type") == "llama3":  # generate_extra_tensors
        tensors["rope_freqs.weight"] = _llama3_rope_freqs(cfg, rope)
    for hf_name, t in load_file(src / "model.safetensors").items():
        t = t.to(torch.float32) if t.dtype not in (torch.float16, torch.float32) else t
        a = t.numpy()
        if model_arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.modify_tensors
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                a = _permute(a, n_head, n_head)
            if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                a = _permute(a, n_head, n_kv)
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new is not None, hf_name
        tensors[new] = a
    tensors.update(extra or {})
    for n in drop:
        del tensors[n]
    for new, a in tensors.items():
        # prepare_tensors: 1-D tensors and norms stay F32, the rest take the output type
        kind = Q.F32 if a.ndim <= 1 or new.endswith("_norm.weight") else OUTTYPES[outtype]
        kind = (qtype or {}).get(new, kind)
        data = gguf.quants.quantize(np.asarray(a, np.float32), kind)
        w.add_tensor(new, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for f in src.iterdir():
        if (tokenizer and f.name.startswith("tokenizer")) or (config and f.name == "config.json"):
            shutil.copyfile(f, out / f.name)
    return out / "model.gguf"


def assert_same_bundle(a: Path, b: Path) -> None:
    """Bundles with the same tensors: NF4 codes, scales, nested scales and offset byte for byte,
    other tensors equal; the same architecture (a rope_scaling read from the GGUF has no rope_theta)."""
    assert_same_tensors(a, b)
    with Bundle(a) as x, Bundle(b) as y:
        for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings", "rope_type"):
            assert getattr(x.args, k) == getattr(y.args, k), k
        drop = {"rope_theta"}
        sa, sb = ({k: v for k, v in (s or {}).items() if k not in drop} for s in (x.args.rope_scaling,
                                                                                  y.args.rope_scaling))
        assert sa == sb


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny checkpoint per (architecture, dtype), and the bundle converted from it directly."""
    cache = {}

    def get(name, outtype="f32"):
        key = (name, outtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"src_{name}_{outtype}")
            src = make_checkpoint(d / "hf", name, dtype=TORCH_DTYPES[outtype], seed=5)
            edgelora.convert(src, d / "hf_bundle")
            cache[key] = (src, d / "hf_bundle")
        return cache[key]
    return get


GRID = [(n, t) for n in ("llama3", "llama_untied", "mistral", "qwen2") for t in ("f32", "f16", "bf16")]


@pytest.mark.parametrize("name,outtype", GRID)
def test_gguf_matches_hf_conversion(sources, tmp_path, name, outtype):
    src, hf_bundle = sources(name, outtype)
    path = write_gguf(src, tmp_path / "gguf", outtype)
    # the independent check of the writer: transformers' own GGUF loader (which undoes the q/k
    # permutation itself) reads it back to the checkpoint's weights exactly
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    summary = edgelora.convert(path, tmp_path / "out")
    model_type = json.loads((src / "config.json").read_text())["model_type"]
    assert summary.model_type == model_type
    assert_same_bundle(tmp_path / "out", hf_bundle)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["format"] == "gguf" and m["source"]["config"] == "read from the GGUF metadata"
    assert m["source"]["dtypes"] == sorted({"F32"} | {outtype.upper()})  # norms stay F32, as llama.cpp writes them
    assert list(m["source"]["weights_sha256"]) == ["model.gguf"]
    if outtype != "f16":  # the logits once per architecture and (for llama) per q/k storage width
        assert_logits_match(tmp_path / "out", src)


def test_unpermute_inverts_llama_cpp_permute():
    from edgelora.converters.gguf import _unpermute
    rng = np.random.default_rng(0)
    for n_head, n_kv, hd in ((4, 2, 16), (3, 1, 32), (8, 8, 2)):
        for heads in (n_head, n_kv):
            w = rng.standard_normal((heads * hd, 24)).astype(np.float32)
            p = _permute(w, n_head, heads if heads != n_head else None)
            assert not np.array_equal(p, w) or hd == 2
            assert np.array_equal(_unpermute(p, heads), w)
            b = w[:, 0].copy()
            assert np.array_equal(_unpermute(_permute(b, n_head, heads), heads), b)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_config_beside_the_file(sources, tmp_path, name):
    """config.json beside the GGUF is cross-checked (llama3: against the rope_freqs factors) and
    becomes the bundle's."""
    src, hf_bundle = sources(name)
    path = write_gguf(src, tmp_path / "gguf", config=True)
    edgelora.convert(path.parent, tmp_path / "out")  # the folder works as SRC too
    assert_same_bundle(tmp_path / "out", hf_bundle)
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["config"] == "config.json"
    assert m["source"]["gguf_architecture"] == {"llama3": "llama", "qwen2": "qwen2"}[name]


def test_inferred_llama3_rope_scaling(sources, tmp_path):
    with GGUFCheckpoint(write_gguf(sources("llama3")[0], tmp_path / "gguf")) as c:
        assert c.args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        assert c.args.tie_word_embeddings and c.args.rms_norm_eps == 1e-6


def test_config_must_describe_the_file(sources, tmp_path):
    src, _ = sources("llama_untied")
    path = write_gguf(src, tmp_path / "gguf", config=True)
    cfg = json.loads((path.parent / "config.json").read_text())
    (path.parent / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128, "rms_norm_eps": 1e-5}))
    with pytest.raises(FormatError, match="intermediate_size=128 in config.json, 256 in the GGUF.*rms_norm_eps"):
        GGUFCheckpoint(path)
    src3, _ = sources("llama3")
    path = write_gguf(src3, tmp_path / "g3", config=True)
    cfg = json.loads((path.parent / "config.json").read_text())
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "factor": 4.0}
    (path.parent / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="rope_freqs are not the factors"):
        GGUFCheckpoint(path)


def test_cli_convert_and_inspect(sources, tmp_path):
    src, hf_bundle = sources("qwen2")
    path = write_gguf(src, tmp_path / "gguf", "bf16")
    r = subprocess.run([sys.executable, "-m", "edgelora", "inspect", str(path), "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "gguf" and info["architecture"]["model_type"] == "qwen2"
    assert info["dtypes"] == ["BF16", "F32"] and "model.gguf" in info["files"]
    r = subprocess.run([sys.executable, "-m", "edgelora", "convert", str(path), "-o", str(tmp_path / "out"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Bundle(tmp_path / "out").args.model_type == "qwen2"


# -- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(sources, tmp_path_factory):
    """One GGUF (llama, untied, F16) to break in various ways."""
    return write_gguf(sources("llama_untied")[0], tmp_path_factory.mktemp("written") / "gguf", "f16")


def _copy(path: Path, dst: Path) -> Path:
    shutil.copytree(path.parent, dst)
    return dst / path.name


def test_quantized_gguf_is_refused(sources, tmp_path):
    src, _ = sources("llama_untied")
    path = write_gguf(src, tmp_path / "gguf", "f16", qtype={"blk.0.ffn_up.weight": Q.Q8_0,
                                                            "blk.1.attn_v.weight": Q.Q8_0})
    with pytest.raises(UnsupportedError, match=r"already quantized by llama.cpp \(Q8_0: 2 tensors.*--outtype f16"):
        edgelora.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_required(written, tmp_path):
    path = _copy(written, tmp_path / "g")
    (path.parent / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match=r"no tokenizer.json beside model.gguf.*gguf_file='model.gguf'"
                                          r"\).save_pretrained"):
        edgelora.convert(path, tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 0.99, 40, 1000])
def test_truncated(written, tmp_path, keep):
    path = _copy(written, tmp_path / "g")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(FormatError, match=r"model\.gguf: .*(truncated|not a GGUF)"):
        edgelora.convert(path, tmp_path / "out")


def test_not_gguf(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").write_bytes(b"PK\x03\x04" + bytes(4000))
    with pytest.raises(FormatError, match=r"model\.gguf: not a GGUF file"):
        edgelora.convert(tmp_path / "g" / "model.gguf", tmp_path / "out")
    (tmp_path / "g" / "model.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="not a GGUF file"):
        GGUFCheckpoint(tmp_path / "g")


def test_corrupt_array_length_does_not_hang(written, tmp_path):
    """A token list claiming 2^62 entries: refused from the header walk, not looped over."""
    path = _copy(written, tmp_path / "g")
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, item type STRING, then the count
    data[at:at + 8] = (1 << 62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt GGUF header.*claims"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(sources, tmp_path):
    path = write_gguf(sources("llama_untied")[0], tmp_path / "gguf", arch="gemma")
    with pytest.raises(UnsupportedError, match="GGUF architecture 'gemma' is not supported; supported: llama.*qwen2"):
        edgelora.convert(path, tmp_path / "out")


def test_unexpected_tensor(sources, tmp_path):
    path = write_gguf(sources("llama_untied")[0], tmp_path / "gguf",
                      extra={"blk.0.attn_q_norm.weight": np.ones(32, np.float32),
                             "mystery.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(UnsupportedError, match=r"no place in a llama model: \['blk.0.attn_q_norm.weight', "
                                               r"'mystery.weight'\]"):
        GGUFCheckpoint(path)
    path = write_gguf(sources("llama_untied")[0], tmp_path / "g2", extra={"blk.2.attn_norm.weight":
                                                                            np.ones(96, np.float32)})
    with pytest.raises(UnsupportedError, match=r"unexpected tensor.*model.layers.2.input_layernorm.weight"):
        GGUFCheckpoint(path)


def test_missing_tensor_and_wrong_shape(sources, tmp_path):
    src = sources("llama_untied")[0]
    path = write_gguf(src, tmp_path / "gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(FormatError, match=r"missing tensor\(s\) \['model.layers.1.mlp.down_proj.weight'\]"):
        GGUFCheckpoint(path)
    path = write_gguf(src, tmp_path / "g2", extra={"blk.1.ffn_down.weight": np.ones((96, 128), np.float32)})
    with pytest.raises(FormatError, match=r"'blk.1.ffn_down.weight' .* has shape \[96, 128\].*implies \[96, 256\]"):
        GGUFCheckpoint(path)


def test_gguf_package_missing(written, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UsageError, match=r"pip install 'edgelora\[gguf\]'"):
        GGUFCheckpoint(written)


def test_folder_with_several_files(written, tmp_path):
    path = _copy(written, tmp_path / "g")
    shutil.copyfile(path, path.parent / "other.gguf")
    with pytest.raises(UsageError, match="several GGUF files"):
        edgelora.convert(path.parent, tmp_path / "out")
    with pytest.raises(FormatError, match="no such file"):
        edgelora.convert(tmp_path / "nope" / "model.gguf", tmp_path / "out")


def test_bench_llama3_rope_factors_are_transformers_frequencies():
    """``bench/bench_llamacpp.py`` gives llama.cpp a Llama-3.2-shape checkpoint's rope scaling as
    the ``rope_freqs`` factors llama.cpp divides each rotary frequency by: the base frequencies
    divided by them are transformers' llama3 frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from bench_llamacpp import llama3_rope_factors
    finally:
        sys.path.pop(0)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    factors = llama3_rope_factors(scaling, 500000.0, 64)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    assert factors.dtype == np.float32 and factors.shape == (32,) and factors.min() == 1.0 and factors.max() == 32.0
    np.testing.assert_allclose(base / factors, inv_freq.double().numpy(), rtol=1e-6)


def test_bench_gguf_bytes_per_token_reads_the_head_not_the_embedding(tmp_path):
    """``bench/bench_llamacpp.py``'s bytes a llama.cpp decode step reads: every tensor but the token
    embedding (a step looks up one row of it), unless there is no ``output.weight`` (a tied head,
    read whole)."""
    import gguf
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from bench_llamacpp import gguf_bytes_per_token
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((96, 16)).astype(np.float16),
               "blk.0.attn_q.weight": rng.standard_normal((16, 16)).astype(np.float16),
               "blk.0.attn_norm.weight": np.ones(16, np.float32),
               "output.weight": rng.standard_normal((96, 16)).astype(np.float16)}
    for tied in (False, True):
        path = tmp_path / f"tied-{tied}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        kept = {k: v for k, v in tensors.items() if not (tied and k == "output.weight")}
        for name, a in kept.items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        read = sum(a.nbytes for k, a in kept.items() if tied or k != "token_embd.weight")
        assert gguf_bytes_per_token(path) == read
