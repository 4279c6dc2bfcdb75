"""The runtime against transformers running the same dequantized weights in float32."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import edgelora
from edgelora.errors import ChecksumError, FormatError, UnsupportedError, UsageError
from tiny_models import close, hf_dequantized, hf_greedy, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# every architecture the runtime runs: the same conformance checks against transformers
ARCHS = ["llama3", "llama_untied", "mistral", "qwen2", "phi3", "phi3_longrope", "gemma", "gemma2", "gemma2_variant"]
MAX_CONTEXT = 64  # within every tiny config's limit (phi3_longrope's short-factor range)


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = make_checkpoint(d / "src", request.param, seed=7)
    edgelora.convert(src, d / "out")
    return src, d / "out"


def test_logits_match_transformers_prefill_and_decode(converted):
    """Prefill, and one token at a time through the decode kernels, against transformers on the
    same dequantized weights (60 positions: past every tiny config's sliding window)."""
    src, out = converted
    model = edgelora.load(out, max_context=MAX_CONTEXT, products="exact")
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, 60)
    with torch.no_grad():
        ref = hf_dequantized(out, src)(torch.from_numpy(ids)[None]).logits[0].numpy()  # [60, V]
    prefill = model.logits(ids)
    assert prefill.shape == ref.shape == (60, model.args.vocab_size)
    assert close(prefill, ref), np.abs(prefill - ref).max()
    cache = model.net.new_cache()
    steps = np.stack([model.net.forward(ids[i:i + 1], cache)[-1] for i in range(len(ids))])  # [60, V]
    assert close(steps, ref), np.abs(steps - ref).max()


def test_every_weight_keeps_the_linear_contract(converted):
    """Every weight the model holds is a ``Linear``, stored as ``make_linear`` decides; one row of
    ``matmul`` and each row of ``matvec_batch`` are ``matvec``'s bits (what a decode step's
    equality alone, in a prefill of one token and in a batch rests on)."""
    from edgelora.runtime.kernels import F16Linear, NF4Linear
    from edgelora.runtime.linear import DenseLinear, Linear, make_linear
    _, out = converted
    model = edgelora.load(out, max_context=MAX_CONTEXT)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    assert isinstance(make_linear(w.astype(np.float16)), F16Linear) and isinstance(make_linear(w), DenseLinear)
    assert isinstance(model.net.w.layers[0].down, NF4Linear)
    layers = [v for L in model.net.w.layers for v in vars(L).values() if not isinstance(v, (np.ndarray, dict))]
    for lin in [*layers, model.net.w.embed, model.net.w.head, make_linear(w.astype(np.float16)), make_linear(w)]:
        assert isinstance(lin, Linear), type(lin)
        X = rng.standard_normal((3, lin.in_features)).astype(np.float32)
        one = lin.matvec(X[1])
        np.testing.assert_array_equal(lin.matmul(X[1:2])[0], one)
        np.testing.assert_array_equal(lin.matvec_batch(X)[1], one)
        assert lin.dequantize_rows(0, 2).shape == (2, lin.in_features) and lin.nbytes > 0


def test_greedy_tokens_match_transformers(converted):
    src, out = converted
    model = edgelora.load(out, max_context=MAX_CONTEXT, products="exact")
    prompt = [1, 5, 9, 3, 7]
    model.eos_ids = set()  # transformers is told not to stop either
    list(model.stream(prompt, max_new_tokens=32, temperature=0))
    mine = model.last_stats.generated_ids
    assert mine == hf_greedy(hf_dequantized(out, src), prompt, 32)


def test_chunked_prefill_equals_one_pass(converted, monkeypatch):
    import edgelora.runtime.model as rm
    _, out = converted
    model = edgelora.load(out, max_context=MAX_CONTEXT, products="exact")
    ids = np.random.default_rng(3).integers(0, model.args.vocab_size, 50)
    whole = model.logits(ids)
    monkeypatch.setattr(rm, "PREFILL_CHUNK", 7)
    np.testing.assert_allclose(model.logits(ids), whole, atol=1e-5)


def test_real_small_model_matches_transformers(stories260k, tmp_path):
    edgelora.convert(stories260k, tmp_path / "out")
    model = edgelora.load(tmp_path / "out", products="exact")
    ids = model.encode("Once upon a time")
    assert ids[0] == 1  # BOS, as transformers adds it
    hf = hf_dequantized(tmp_path / "out", stories260k)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.logits(ids) - ref).max() <= 1e-3 * np.abs(ref).max()
    # golden end-to-end decode: 64 greedy tokens, token for token
    model.eos_ids = set()
    text = model.generate("Once upon a time", max_new_tokens=64, temperature=0)
    assert model.last_stats.generated_ids == hf_greedy(hf, ids, 64)
    assert text.startswith(",") and "Lily" in text  # the NF4 model still tells the published story's opening


def test_bad_inputs(converted):
    _, out = converted
    model = edgelora.load(out, max_context=16)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        model.logits([0, model.args.vocab_size])
    with pytest.raises(UsageError, match="exceed max_context=16"):
        model.logits(list(range(17)))
    with pytest.raises(UsageError, match="unknown"):
        model.generate([1, 2], max_new_tokens=2, temprature=0.5)
    with pytest.raises(UsageError):
        model.generate([1, 2], max_new_tokens=2, top_p=1.5)
    with pytest.raises(UsageError, match="max_context"):
        edgelora.load(out, max_context=10**9)


def test_bad_bundles(converted, tmp_path):
    _, out = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="tokenizer.json"):
        edgelora.load(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="model.safetensors"):
        edgelora.load(bad, verify="full")  # (the default finds it in the background: test_hardening)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    import json
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChecksumError, match="config.json"):
        edgelora.load(bad)
    with pytest.raises(UnsupportedError, match="model_type='falcon'"):
        edgelora.load(bad, verify=False)


def test_every_load_hashes_every_file_the_weights_in_the_background(converted, tmp_path, monkeypatch):
    """No record of an earlier check is trusted (issue 16, 4): each default load hashes every file, the
    weights in a background thread while the model runs; "full" hashes them before returning."""
    import threading
    from edgelora import bundle as bundle_mod
    _, out = converted
    b = tmp_path / "b"
    shutil.copytree(out, b)
    calls = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file",
                        lambda p, *a: calls.append((p.name, threading.current_thread().name)) or real(p, *a))
    for _ in range(2):  # the second load hashes again
        calls.clear()
        model = edgelora.load(b, max_context=8)
        assert model.bundle.verification.wait(60)
        assert ("model.safetensors", "edgelora-verify") in calls
        assert ("config.json", threading.current_thread().name) in calls
    calls.clear()
    model = edgelora.load(b, max_context=8, verify="full")
    assert model.bundle.verification is None and ("model.safetensors", threading.current_thread().name) in calls


def test_llama_family_refuses_other_activations():
    from edgelora.config import ModelArgs
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               vocab_size=10, hidden_act="gelu")
    with pytest.raises(UnsupportedError, match="hidden_act='gelu'"):
        ModelArgs.from_dict(cfg)
