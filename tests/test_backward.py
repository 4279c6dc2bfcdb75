"""LoRA gradients through the NF4 base against PEFT + torch autograd on the same dequantized base."""

from __future__ import annotations

import numpy as np
import pytest

import edgelora
from edgelora.errors import UsageError
from edgelora.runtime.backward import (LoraParams, init_lora, loss_and_grads, matmul_t, matmul_t_reference,
                                       target_modules, training_memory)
from edgelora.runtime.linear import DenseLinear
from edgelora.runtime.kernels import NF4Linear
from tiny_models import Converted, hf_dequantized

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# (architecture, LoraConfig options): all-linear on every family, rsLoRA, a head target
CASES = {
    "llama3": ("llama3", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama_untied-head": ("llama_untied", dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj", "lm_head"])),
    "mistral": ("mistral", dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
    "qwen2": ("qwen2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "phi3": ("phi3", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "phi3_longrope": ("phi3_longrope", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma": ("gemma", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma2": ("gemma2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma2_variant": ("gemma2_variant", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj",
                                                                                 "lm_head"])),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return Converted(tmp_path_factory, seed=5, bundle_name="nf4")


def batch(vocab: int, T: int, prompt: int, seed: int = 0):
    """Token ids and labels with the first ``prompt`` positions masked (-100), as an answer-only loss."""
    ids = np.random.default_rng(seed).integers(3, vocab, T)
    labels = ids.copy()
    labels[:prompt] = -100
    return ids, labels


def random_params(model, opts, seed=0) -> LoraParams:
    """PEFT-initialised A, and a non-zero B so that every gradient is non-trivial."""
    targets = opts["target_modules"]
    p = init_lora(model, targets, opts["r"], opts["lora_alpha"], opts.get("use_rslora", False), seed)
    rng = np.random.default_rng(seed + 1)
    for m in p.B:
        p.B[m] = (rng.standard_normal(p.B[m].shape) * 0.2).astype(np.float32)
    return p


def peft_grads(bundle, src, opts, params: LoraParams, ids, labels):
    """PEFT's loss (a mean) and its gradients w.r.t. every lora_A / lora_B, float32, A and B set to ours."""
    model = hf_dequantized(bundle, src)
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **opts))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            for part, mine in (("lora_A", params.A), ("lora_B", params.B)):
                if f".{part}." in name:
                    module = name.split(f".{part}.")[0][len("base_model.model."):]
                    p.copy_(torch.from_numpy(mine[module]))
    out = pm(torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None])
    out.loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            part = "lora_A" if ".lora_A." in name else "lora_B"
            module = name.split(f".{part}.")[0][len("base_model.model."):]
            grads.setdefault(module, {})[part] = p.grad.numpy()
    return float(out.loss.detach()), grads


def assert_grads_match(mine: dict, n: int, ref: dict) -> None:
    assert set(mine) == set(ref)
    for m, (dA, dB) in mine.items():
        for got, want in ((dA / n, ref[m]["lora_A"]), (dB / n, ref[m]["lora_B"])):
            scale = np.abs(want).max()
            assert scale > 0, m
            assert np.abs(got - want).max() <= 1e-4 * scale, (m, np.abs(got - want).max() / scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grads_match_peft(case, bases):
    arch, opts = CASES[case]
    src, bundle = bases(arch)
    model = edgelora.load(bundle, max_context=64)
    params = random_params(model, opts)
    assert set(params.A) == {m for m in target_modules(model, opts["target_modules"])}
    ids, labels = batch(model.args.vocab_size, 24, 9)
    loss, n, grads = loss_and_grads(model, params, ids, labels)
    ref_loss, ref = peft_grads(bundle, src, opts, params, ids, labels)
    assert n == 24 - 9
    assert abs(loss / n - ref_loss) <= 1e-5 * max(1.0, ref_loss)
    assert_grads_match(grads, n, ref)


def test_grads_match_peft_on_stories260k(stories260k, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("s260k") / "nf4"
    edgelora.convert(stories260k, bundle)
    model = edgelora.load(bundle, max_context=64)
    opts = dict(r=8, lora_alpha=16, target_modules="all-linear")
    params = random_params(model, opts, seed=3)
    ids, labels = batch(model.args.vocab_size, 48, 20, seed=3)
    loss, n, grads = loss_and_grads(model, params, ids, labels)
    ref_loss, ref = peft_grads(bundle, stories260k, opts, params, ids, labels)
    assert abs(loss / n - ref_loss) <= 1e-5 * max(1.0, ref_loss)
    assert_grads_match(grads, n, ref)


@pytest.mark.parametrize("arch", ["llama3", "gemma2", "phi3"])
def test_recompute_equals_keeping_everything(arch, bases):
    """Recomputing each layer in the backward (from its input, or from its projections' outputs)
    gives the bits of keeping its values from the forward, with dropout too (the recomputed layer
    draws the same masks)."""
    _, bundle = bases(arch)
    model = edgelora.load(bundle, max_context=64)
    params = random_params(model, dict(r=4, lora_alpha=8, target_modules="all-linear"))
    ids, labels = batch(model.args.vocab_size, 20, 5, seed=1)
    for dropout in (0.0, 0.3):
        ref = loss_and_grads(model, params, ids, labels, dropout=dropout, rng=np.random.default_rng(7),
                             checkpoint="none")
        for checkpoint in ("layer", "projections"):
            got = loss_and_grads(model, params, ids, labels, dropout=dropout, rng=np.random.default_rng(7),
                                 checkpoint=checkpoint)
            assert got[:2] == ref[:2]
            for m in ref[2]:
                np.testing.assert_array_equal(got[2][m][0], ref[2][m][0])
                np.testing.assert_array_equal(got[2][m][1], ref[2][m][1])


def test_dropout_grads_match_finite_differences(bases):
    """With dropout the masks are fixed by the rng: the gradient is that of the masked function."""
    _, bundle = bases("qwen2")
    model = edgelora.load(bundle, max_context=32)
    params = random_params(model, dict(r=2, lora_alpha=4, target_modules=["v_proj"]))
    ids, labels = batch(model.args.vocab_size, 12, 3, seed=2)
    m = "model.layers.1.self_attn.v_proj"
    loss, n, grads = loss_and_grads(model, params, ids, labels, dropout=0.5, rng=np.random.default_rng(1))
    eps = 1e-2
    for idx in [(0, 0), (1, 5)]:
        plus, minus = params.copy(), params.copy()
        plus.A[m][idx] += eps
        minus.A[m][idx] -= eps
        lp = loss_and_grads(model, plus, ids, labels, dropout=0.5, rng=np.random.default_rng(1))[0]
        lm = loss_and_grads(model, minus, ids, labels, dropout=0.5, rng=np.random.default_rng(1))[0]
        assert abs((lp - lm) / (2 * eps) - grads[m][0][idx]) <= 2e-2 * max(1.0, abs(grads[m][0][idx]))


@pytest.mark.parametrize("out_f,in_f,T,threads", [(300, 64, 7, 1), (4096, 512, 5, 2), (1000, 1088, 3, 2)])
def test_transposed_product_equals_its_twin(out_f, in_f, T, threads):
    from edgelora.converters.nf4 import quantize_nf4
    from edgelora.runtime import backward
    from edgelora.runtime.kernels import F16Linear
    rng = np.random.default_rng(out_f)
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    dy = rng.standard_normal((T, out_f)).astype(np.float32)
    q = quantize_nf4(w, block_size=64)
    old = backward.TILE_ELEMENTS
    backward.TILE_ELEMENTS = 64 * in_f  # many tiles, split between the threads
    try:
        for lin, ref in [(DenseLinear(w), w), (NF4Linear(q), q.dequantize_reference()),
                         (F16Linear(w.astype(np.float16)), w.astype(np.float16).astype(np.float32))]:
            got = matmul_t(lin, dy, threads)
            np.testing.assert_allclose(got, matmul_t_reference(ref, dy), rtol=1e-5, atol=1e-5 * np.abs(got).max())
    finally:
        backward.TILE_ELEMENTS = old


def test_init_is_peft_shaped_and_targets_checked(bases):
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    p = init_lora(model, ["q_proj", "v_proj"], 8, 16, False, 0)
    assert len(p.A) == 2 * model.args.num_hidden_layers
    for m, A in p.A.items():
        assert A.shape == (8, model.args.hidden_size) and np.all(p.B[m] == 0) and p.scaling[m] == 2.0
        assert np.abs(A).max() <= 1 / np.sqrt(model.args.hidden_size)
    assert init_lora(model, "all-linear", 4, 8, True, 0).scaling["model.layers.0.mlp.up_proj"] == 4.0
    np.testing.assert_array_equal(p.A["model.layers.0.self_attn.q_proj"],
                                  init_lora(model, ["q_proj", "v_proj"], 8, 16, False, 0).A[
                                      "model.layers.0.self_attn.q_proj"])
    with pytest.raises(UsageError, match="qq_proj"):
        init_lora(model, ["qq_proj"], 8, 16, False, 0)
    # a zero B: the loss is the base model's, the A gradients zero
    ids, labels = batch(model.args.vocab_size, 10, 4)
    loss, n, grads = loss_and_grads(model, p, ids, labels)
    logits = model.logits(ids)
    z = logits[np.arange(9)]
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    want = (lse - z[np.arange(9), ids[1:]])[3:].sum()
    assert abs(loss - want) <= 1e-4 * abs(want) and n == 6
    assert all(np.all(g[0] == 0) for g in grads.values())
    # PEFT's tensors round-trip
    q = init_lora(model, ["q_proj", "v_proj"], 8, 16, False, 1)
    q.set_from_peft(p.peft_tensors())
    np.testing.assert_array_equal(q.A["model.layers.1.self_attn.v_proj"], p.A["model.layers.1.self_attn.v_proj"])


def test_bad_inputs_are_refused(bases):
    _, bundle = bases("llama3")
    model = edgelora.load(bundle, max_context=32)
    p = init_lora(model, "all-linear", 2, 4, False, 0)
    ids, labels = batch(model.args.vocab_size, 8, 2)
    with pytest.raises(UsageError, match="vocabulary"):
        loss_and_grads(model, p, ids + 1000, labels)
    with pytest.raises(UsageError, match="same shape"):
        loss_and_grads(model, p, ids, labels[:-1])
    with pytest.raises(UsageError, match="longer than"):
        loss_and_grads(model, p, *batch(model.args.vocab_size, model.args.max_position_embeddings + 1, 2))
    with pytest.raises(UsageError, match="rng"):
        loss_and_grads(model, p, ids, labels, dropout=0.1)
    # nothing counted: zero loss, zero gradients
    loss, n, grads = loss_and_grads(model, p, ids, np.full_like(labels, -100))
    assert loss == 0.0 and n == 0 and all(not g[0].any() for g in grads.values())


def test_training_memory_counts_the_parts(bases):
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    p = init_lora(model, "all-linear", 8, 16, False, 0)
    mem = training_memory(model, p, 256)
    assert mem["adapter"] == p.nbytes and mem["grads"] == p.nbytes and mem["optimizer"] == 2 * p.nbytes
    a = model.args
    assert mem["checkpoints"] == (a.num_hidden_layers + 1) * 256 * a.hidden_size * 4
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert training_memory(model, p, 512)["layer"] > mem["layer"]
    assert mem["checkpoints"] < training_memory(model, p, 256, checkpoint="projections")["checkpoints"] \
        < training_memory(model, p, 256, checkpoint="none")["checkpoints"]
    assert training_memory(model, (8, "all-linear"), 256) == mem
    assert training_memory(model.args, (8, "all-linear"), 256, threads=model.threads) == mem  # before loading
    with pytest.raises(UsageError, match="checkpoint"):
        loss_and_grads(model, p, *batch(model.args.vocab_size, 8, 2), checkpoint="some")
