"""LoRA adapters on the NF4 base against PEFT running the same dequantized base in float32."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

import edgelora
from edgelora.errors import AdapterMismatchError, FormatError, PickleRefusedError, UnsupportedError, UsageError
from edgelora.runtime import lora as lora_module
from edgelora.runtime.lora import (BASE, lora_delta_reference, lora_matvec_add, lora_matvec_add_parallel,
                                    lora_stack_add, lora_stack_add_parallel, parse_mix)
from edgelora.runtime.threads import thread_count
from tiny_models import Adapters, Converted, close, hf_dequantized, put_bundle_file

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (architecture, adapter options): ranks 4 and 16, rsLoRA, patterns, all-linear and attention-only,
# layer selection, saved head/embeddings, trained biases, a bias on B, DoRA
CASES = {
    "r4-attention": ("llama_untied", dict(r=4, lora_alpha=8, target_modules=ATTN)),
    "r16-all-linear": ("llama_untied", dict(r=16, lora_alpha=32, target_modules="all-linear")),
    "rslora": ("llama3", dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "patterns": ("llama_untied", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                      rank_pattern={"v_proj": 8, "layers.1.mlp.down_proj": 2},
                                      alpha_pattern={"q_proj": 32})),
    "regex-layers": ("mistral", dict(r=4, target_modules=r"model\.layers\.1\..*\.(q_proj|up_proj)")),
    "list-layers": ("llama_untied", dict(r=4, target_modules=["gate_proj", "o_proj"], layers_to_transform=0,
                                         layers_pattern="layers")),
    "save-head": ("llama_untied", dict(r=8, target_modules=ATTN, modules_to_save=["lm_head"])),
    "save-embed-tied": ("llama3", dict(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "qwen-bias-all": ("qwen2", dict(r=4, target_modules=["q_proj", "o_proj"], bias="all")),
    "qwen-bias-lora-only": ("qwen2", dict(r=4, target_modules=["k_proj", "v_proj"], bias="lora_only")),
    "lora-bias": ("llama_untied", dict(r=4, target_modules=["up_proj", "o_proj"], lora_bias=True)),
    "dora": ("qwen2", dict(r=8, target_modules="all-linear", use_dora=True)),
    "head-target": ("llama_untied", dict(r=4, target_modules=["lm_head", "q_proj"])),
    # Phi-3: its fused modules, lora_B spanning the fused output
    "phi3-all-linear": ("phi3", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "phi3-qkv-only": ("phi3", dict(r=4, lora_alpha=8, target_modules=["qkv_proj"])),
    "phi3-gate-up-down-rslora": ("phi3_longrope", dict(r=16, lora_alpha=8, use_rslora=True,
                                                       target_modules=["gate_up_proj", "down_proj"])),
    "phi3-dora": ("phi3", dict(r=4, target_modules=["qkv_proj", "gate_up_proj"], use_dora=True)),
    # Gemma: the head target before the soft-cap, a saved embedding scaled like the base's
    "gemma2-all-linear": ("gemma2", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "gemma2-qv-down-rslora": ("gemma2", dict(r=16, lora_alpha=8, use_rslora=True,
                                             target_modules=["q_proj", "v_proj", "down_proj"])),
    "gemma2-dora": ("gemma2", dict(r=4, target_modules=["k_proj", "o_proj", "gate_proj"], use_dora=True)),
    "gemma2-head-target": ("gemma2_variant", dict(r=4, target_modules=["lm_head", "up_proj"])),
    "gemma2-save-embed-head": ("gemma2_variant", dict(r=4, target_modules=["q_proj"],
                                                      modules_to_save=["embed_tokens", "lm_head"])),
    "gemma-all-linear": ("gemma", dict(r=8, lora_alpha=8, target_modules="all-linear")),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Converted bundles of the tiny checkpoints, made once."""
    return Converted(tmp_path_factory, seed=11, bundle_name="nf4")


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    made = Adapters(bases, tmp_path_factory)

    def get(case, seed=0):  # by the name of one of CASES
        arch, opts = CASES[case]
        return made(arch, seed, name=case, **opts)
    return get


def peft_logits(bundle, src, adapter_dirs, ids, weights=None):
    """PEFT on the dequantized base: one adapter, or a weighted 'cat' mix of several."""
    model = hf_dequantized(bundle, src)
    pm = peft.PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    if weights is not None:
        names = [f"a{i}" for i in range(len(adapter_dirs))]
        pm.add_weighted_adapter(names, weights, "mix", combination_type="cat")
        pm.set_adapter("mix")
    pm.eval()
    with torch.no_grad():
        return pm(torch.from_numpy(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_logits_match_peft(case, bases, adapters):
    arch, _ = CASES[case]
    src, bundle = bases(arch)
    ad = adapters(case)
    model = edgelora.load(bundle, max_context=64, products="exact")
    ids = np.random.default_rng(1).integers(0, model.args.vocab_size, 24)
    base = model.logits(ids)
    model.adapters.load("x", ad)
    mine = model.logits(ids, adapter="x")
    ref = peft_logits(bundle, src, [ad], ids)
    assert np.abs(mine - base).max() > 0.05 * np.abs(base).max()  # the adapter really changes the output
    assert close(mine, ref), np.abs(mine - ref).max()
    # the base is untouched: base logits come back exactly
    np.testing.assert_array_equal(model.logits(ids, adapter=None), base)
    # decode (one token at a time through the kernels) agrees with prefill
    model.use("x")
    cache = model.net.new_cache()
    steps = np.stack([model.net.forward(ids[i:i + 1], cache, lora=model.selection)[-1] for i in range(len(ids))])
    np.testing.assert_allclose(steps, mine, atol=2e-4 * max(1.0, np.abs(mine).max()))


def test_weighted_mix_matches_peft_cat(bases, adapters):
    src, bundle = bases("llama_untied")
    a, b = adapters("r16-all-linear", 1), adapters("r4-attention", 2)
    model = edgelora.load(bundle, max_context=64, products="exact")
    model.adapters.load("a", a)
    model.adapters.load("b", b)
    ids = np.random.default_rng(2).integers(0, model.args.vocab_size, 20)
    mine = model.logits(ids, adapter={"a": 0.7, "b": 0.3})
    assert close(mine, peft_logits(bundle, src, [a, b], ids, weights=[0.7, 0.3]))
    # degenerate mixes are exactly the single adapters
    np.testing.assert_array_equal(model.logits(ids, adapter={"a": 1.0}), model.logits(ids, adapter="a"))
    np.testing.assert_array_equal(model.logits(ids, adapter={"a": 0.0, "b": 1.0}), model.logits(ids, adapter="b"))


def test_mix_of_saved_heads_interpolates(bases, adapters):
    src, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    model.adapters.load("h", adapters("save-head"))
    x = np.random.default_rng(0).standard_normal((1, model.args.hidden_size)).astype(np.float32)
    sel_full, sel_half = model.adapters.select("h"), model.adapters.select({"h": 0.5})
    head = model.net.w.head
    base = head.matvec(x[0])
    full = sel_full.apply("lm_head", head, x)[0]
    half = sel_half.apply("lm_head", head, x, base=head.matvec(x[0])[None])[0]
    np.testing.assert_allclose(half, 0.5 * base + 0.5 * full, rtol=1e-5, atol=1e-5)


def test_swap_use_using_unload(bases, adapters):
    src, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=64)
    ids = np.arange(1, 12)
    base = model.logits(ids)
    model.adapters.load("a", adapters("r4-attention"))
    model.adapters.load("b", adapters("r16-all-linear"))
    assert model.adapters.names == ["a", "b"] and model.active_adapter == "base"
    la = model.logits(ids, adapter="a")
    model.use("b")
    lb = model.logits(ids)
    assert model.active_adapter == "b" and not np.array_equal(la, lb)
    with model.using("a"):
        np.testing.assert_array_equal(model.logits(ids), la)
        with model.using(None):
            np.testing.assert_array_equal(model.logits(ids), base)
    np.testing.assert_array_equal(model.logits(ids), lb)
    model.use({"a": 0.5, "b": 0.5})
    assert model.active_adapter == "a=0.5,b=0.5"
    with pytest.warns(UserWarning, match="adapter 'b' was unloaded while the model was using 'a=0.5,b=0.5'; "
                                         "the model now uses the base"):
        model.adapters.unload("b")  # in use: the model falls back to the base, and says so
    assert model.adapters.names == ["a"] and model.active_adapter == "base"
    np.testing.assert_array_equal(model.logits(ids), base)
    with pytest.raises(UsageError, match="no adapter named 'b'"):
        model.use("b")
    with pytest.raises(UsageError, match="already loaded"):
        model.adapters.load("a", adapters("r4-attention"))
    # scale: half the delta of the same adapter at scale 1
    model.adapters.load("half", adapters("r4-attention"), scale=0.5)
    np.testing.assert_allclose(model.logits(ids, adapter="half"), model.logits(ids, adapter={"a": 0.5}), atol=1e-5)


def test_unload_resets_only_a_selection_that_used_it(bases, adapters):
    import warnings
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    model.adapters.load("a", adapters("r4-attention"))
    model.adapters.load("b", adapters("r16-all-linear"))
    assert model.use("base") is BASE and model.use("a=0.5,b=0.5").label == "a=0.5,b=0.5"  # text parsed once, there
    model.use("a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.adapters.unload("b")  # not in use: nothing to say, the selection stays
    assert model.active_adapter == "a"
    model.adapters.load("b", adapters("r16-all-linear"))
    with model.using("b"):
        with pytest.warns(UserWarning, match="adapter 'b' was unloaded while the model was using 'b'"):
            model.adapters.unload("b")
        assert model.active_adapter == "base"
    assert model.active_adapter == "a"  # what was before comes back: it is still resident
    # an adapter of what was before unloaded inside the block: the base comes back instead, and says so
    with pytest.warns(UserWarning, match="adapter 'a' was unloaded while the model was using 'a'; the model now "
                                         "uses the base"):
        with model.using(None):
            model.adapters.unload("a")
    assert model.active_adapter == "base" and model.selection is BASE


def test_unload_returns_memory_after_pinned_generation(bases, adapters):
    import gc
    import weakref
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=64)
    res = model.adapters.load("a", adapters("r16-all-linear"))
    ref = weakref.ref(res)
    gen = model.stream([1, 2, 3], max_new_tokens=5, adapter="a", temperature=0)
    next(gen)  # started: pinned
    del res
    model.adapters.unload("a")
    gc.collect()
    assert ref() is not None  # the running generation still holds it
    list(gen)
    del gen
    gc.collect()
    assert ref() is None


def test_batch_equals_one_by_one(bases, adapters):
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=64)
    model.adapters.load("a", adapters("r4-attention"))
    model.adapters.load("b", adapters("r16-all-linear"))
    model.adapters.load("h", adapters("save-head"))
    model.eos_ids = set()
    prompts = [[1, 5, 9], [3, 4], [7, 8, 9, 10, 11], [2], [6, 6, 6]]
    specs = ["a", None, "b", {"a": 0.3, "b": 0.7}, "h"]
    alone = []
    for p, s in zip(prompts, specs):
        model.generate(p, max_new_tokens=12, adapter=s, temperature=0)
        alone.append(model.last_stats.generated_ids)
    texts = model.generate_batch(prompts, adapters=specs, max_new_tokens=12, temperature=0)
    assert [s.generated_ids for s in model.last_batch_stats] == alone
    assert len(texts) == len(prompts) and len({tuple(a) for a in alone}) > 1
    # sampled generation with a seed is per-sequence identical too
    ref = [model.generate(p, max_new_tokens=8, adapter=s, temperature=0.9, seed=5) for p, s in zip(prompts, specs)]
    assert model.generate_batch(prompts, adapters=specs, max_new_tokens=8, temperature=0.9, seed=5) == ref


def test_batch_reuses_the_base_product_of_a_replaced_module(bases, adapters):
    """A mix with a saved head takes the head's base product from the batch's ``matvec_batch``
    (no second product), and each row is still bit for bit the sequence decoded alone."""
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    model.adapters.load("h", adapters("save-head"))
    model.adapters.load("a", adapters("r4-attention"))
    sels = [model.adapters.select(s) for s in [{"h": 0.5}, {"h": 0.5, "a": 0.5}, "h", None]]
    head = model.net.w.head
    products = []
    matvec = head.matvec
    head.matvec = lambda *a, **k: products.append(1) or matvec(*a, **k)  # counts the head's single products
    caches = [model.net.new_cache() for _ in sels]
    singles = [model.net.new_cache() for _ in sels]
    for step in range(4):
        toks = np.array([3 + step, 7, 11 + 2 * step, 2 * step + 1])
        products.clear()
        out = model.net.forward_batch(toks, caches, sels)
        assert not products
        for b, sel in enumerate(sels):
            np.testing.assert_array_equal(out[b], model.net.forward(toks[b:b + 1], singles[b], lora=sel)[-1])


@pytest.mark.parametrize("arch, one, two", [("qwen2", "dora", "qwen-bias-all"),
                                             ("phi3", "phi3-all-linear", "phi3-qkv-only"),
                                             ("gemma2", "gemma2-all-linear", "gemma2-qv-down-rslora")])
def test_batch_logits_bitwise_equal_to_single_steps(bases, adapters, arch, one, two):
    _, bundle = bases(arch)
    model = edgelora.load(bundle, max_context=32)
    model.adapters.load("d", adapters(one))
    model.adapters.load("q", adapters(two))
    mix = [] if "dora" in one + two else [{"d": 0.5, "q": 0.5}]  # DoRA is used alone
    sels = [model.adapters.select(s) for s in ["d", None, "q", *mix]]
    caches = [model.net.new_cache() for _ in sels]
    singles = [model.net.new_cache() for _ in sels]
    for step in range(10):  # past gemma2's sliding window of 8
        toks = np.array([3 + step, 7, 11 + 2 * step, 2 * step + 1][:len(sels)])
        out = model.net.forward_batch(toks, caches, sels)
        for b, sel in enumerate(sels):
            one = model.net.forward(toks[b:b + 1], singles[b], lora=sel)[-1]
            np.testing.assert_array_equal(out[b], one)


def test_swaps_from_another_thread_never_mix_within_a_sequence(bases, adapters):
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=64)
    names = ["a", "b", "c"]
    for n, case, seed in (("a", "r4-attention", 3), ("b", "r16-all-linear", 4), ("c", "save-head", 5)):
        model.adapters.load(n, adapters(case, seed))
    model.eos_ids = set()
    prompt = [1, 2, 3, 4]
    expected = {}
    for n in names + [None]:
        model.generate(prompt, max_new_tokens=6, adapter=n, temperature=0)
        expected[n] = model.last_stats.generated_ids
    assert len({tuple(v) for v in expected.values()}) == 4
    stop = threading.Event()
    swaps = [0]

    def swapper():
        i = 0
        while not stop.is_set():
            model.use([*names, None, {"a": 0.5, "b": 0.5}][i % 5])
            i += 1
        swaps[0] = i

    errors = []

    def worker(k):
        for it in range(40):
            model.generate(prompt, max_new_tokens=6, temperature=0)  # whatever is current when it starts
            st = model.last_stats  # this thread's own
            want = expected.get(None if st.adapter == "base" else st.adapter, expected_mix)
            if st.generated_ids != want:
                errors.append((k, it, st.adapter, st.generated_ids, want))

    expected_mix = model.generate(prompt, max_new_tokens=6, adapter={"a": 0.5, "b": 0.5}, temperature=0) and \
        model.last_stats.generated_ids
    t = threading.Thread(target=swapper)
    t.start()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert swaps[0] > 1000


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,k,n", [(1, 7, 5), (4, 64, 96), (16, 256, 172), (8, 2048, 512)])
def test_lora_kernel_matches_reference(r, k, n):
    rng = np.random.default_rng(r + k)
    A = rng.standard_normal((r, k)).astype(np.float32)
    B = rng.standard_normal((n, r)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    y0 = rng.standard_normal(n).astype(np.float32)
    y = y0.copy()
    lora_matvec_add(x, A, np.ascontiguousarray(B.T), np.float32(0.37), y, np.empty(r, np.float32))
    ref = y0 + lora_delta_reference(x[None], A, B, 0.37)[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("r,k,n", [(1, 7, 5), (16, 256, 172), (16, 2048, 512)])
def test_threaded_lora_kernel_is_the_serial_one_bit_for_bit(r, k, n):
    rng = np.random.default_rng(r + k + n)
    A = rng.standard_normal((r, k)).astype(np.float32)
    Bt = rng.standard_normal((r, n)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    y0 = rng.standard_normal(n).astype(np.float32)
    serial = y0.copy()
    lora_matvec_add(x, A, Bt, np.float32(0.37), serial, np.empty(r, np.float32))
    for chunks in (1, 2, 3, 7):
        y = y0.copy()
        lora_matvec_add_parallel(x, A, Bt, np.float32(0.37), y, np.empty(r, np.float32), chunks)
        assert np.array_equal(y.view(np.uint32), serial.view(np.uint32))


@pytest.mark.parametrize("held", [np.float32, np.float16])
@pytest.mark.parametrize("ranks,outs,k", [((4, 4, 4), (96, 32, 32), 96), ((16, 8), (344, 344), 128),
                                          ((2, 16, 3), (5, 70, 33), 17), ((16, 16, 16), (2048, 256, 256), 2048)])
def test_stack_kernel_matches_reference(ranks, outs, k, held):
    """The stacked kernel (modules' A rows one after another, their B^T flat) adds to each
    requested module's outputs its own ``coef B (A x)``, within float32 rounding of the reference;
    the threaded form gives the serial one's bits for any number of slices; a module not requested
    (y_off -1) is skipped. Alike for adapters held in float16 (the kernel given their bits), against
    the reference on the same values in float32."""
    rng = np.random.default_rng(sum(ranks) + k)
    As = [rng.standard_normal((r, k)).astype(held).astype(np.float32) for r in ranks]
    Bs = [rng.standard_normal((n, r)).astype(held).astype(np.float32) for r, n in zip(ranks, outs)]
    coefs = [0.5, 2.0, 0.25][:len(ranks)]
    A = lora_module.kernel_array(np.concatenate(As).astype(held))
    Bt = lora_module.kernel_array(np.concatenate([np.ascontiguousarray(B.T).ravel() for B in Bs]).astype(held))
    rows = np.cumsum([0, *ranks]).astype(np.int64)
    b_off = np.cumsum([0] + [B.size for B in Bs]).astype(np.int64)
    coef = np.concatenate([np.full(r, c, np.float32) for r, c in zip(ranks, coefs)])
    x = rng.standard_normal(k).astype(np.float32)
    for skip in (None, 1):
        req = [i for i in range(len(ranks)) if i != skip]
        y_off = np.full(len(ranks), -1, np.int64)
        y_off[req] = np.cumsum([0] + [outs[i] for i in req])[:-1]
        y0 = rng.standard_normal(sum(outs[i] for i in req)).astype(np.float32)
        serial = y0.copy()
        lora_stack_add(x, A, Bt, coef, rows, b_off, y_off, serial, np.empty(A.shape[0], np.float32))
        for i in req:
            o = y_off[i]
            ref = y0[o:o + outs[i]] + lora_delta_reference(x[None], As[i], Bs[i], coefs[i])[0]
            np.testing.assert_allclose(serial[o:o + outs[i]], ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
        for threads in (2, 3, 5):
            y = y0.copy()
            lora_stack_add_parallel(x, A, Bt, coef, rows, b_off, y_off, y, np.empty(A.shape[0], np.float32), threads)
            assert np.array_equal(y.view(np.uint32), serial.view(np.uint32))


def test_widened_float16_is_numpys_cast_bit_for_bit():
    """A float16 adapter array widened for a prompt's products (a compiled loop) is NumPy's own
    float16 -> float32 cast, bit for bit: every float16 value (subnormals, signed zeros, the
    largest), in a 2-D array; a float32 array is returned as it is."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every = every[np.isfinite(every)].reshape(2, -1)
    got = lora_module.widened(every)
    assert got.dtype == np.float32 and got.shape == every.shape
    assert np.array_equal(got.view(np.uint32), every.astype(np.float32).view(np.uint32))
    f = np.ones((2, 3), np.float32)
    assert lora_module.widened(f) is f


def _rewritten(folder, out, dtype):
    """A copy of adapter ``folder`` with every tensor rounded to float16 and stored as ``dtype``."""
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    out.mkdir()
    with SafetensorsFile(folder / "adapter_model.safetensors") as f:
        tensors = {n: f.float32(n).astype(np.float16).astype(dtype) for n in f.keys()}
    write_safetensors(out / "adapter_model.safetensors", tensors)
    shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
    return out


def test_float16_adapters_are_held_in_float16_and_match_peft(bases, adapters, tmp_path):
    """An adapter whose values float16 holds exactly (a float16 file; a float32 file of such
    values) is held in float16: half the bytes, the logits PEFT gives on the same file, a float32
    file of the same values the same bits, decode steps (the one-call step, float16 stacks) what
    the prompt gives. An adapter of other values stays float32."""
    src, bundle = bases("llama_untied")
    ad = adapters("r16-all-linear")
    h16 = _rewritten(ad, tmp_path / "h16", np.float16)
    h32 = _rewritten(ad, tmp_path / "h32", np.float32)
    model = edgelora.load(bundle, max_context=64, products="exact")
    for name, folder in (("f32", ad), ("h16", h16), ("h32", h32)):
        model.adapters.load(name, folder)
    held = {n: {str(a.dtype) for d in model.adapters[n].deltas.values() for a in (d.A, d.Bt)}
            for n in ("f32", "h16", "h32")}
    assert held == {"f32": {"float32"}, "h16": {"float16"}, "h32": {"float16"}}
    assert model.adapters["h16"].nbytes * 2 == model.adapters["f32"].nbytes
    ids = np.random.default_rng(3).integers(0, model.args.vocab_size, 20)
    mine = model.logits(ids, adapter="h16")
    assert close(mine, peft_logits(bundle, src, [h16], ids))
    np.testing.assert_array_equal(model.logits(ids, adapter="h32"), mine)
    model.use("h16")
    cache = model.net.new_cache()
    steps = np.stack([model.net.forward(ids[i:i + 1], cache, lora=model.selection)[-1] for i in range(len(ids))])
    np.testing.assert_allclose(steps, mine, atol=2e-4 * max(1.0, np.abs(mine).max()))
    # the planner counts what the runtime holds
    from edgelora.devices.planner import adapter_resident_bytes
    assert adapter_resident_bytes(h16, model.args) == model.adapters["h16"].nbytes


def test_the_int8_products_hold_adapters_rounded_to_float16(bases, adapters, tmp_path, capsys):
    """With the int8 products (the default) a float32 file's adapter is rounded to float16 at load,
    as ``deploy`` writes it: half the bytes, the bits of loading the rounded copy. ``float32``
    (the load's ``adapter_dtype``, ``adapters.load(dtype=...)``, ``--adapter-dtype``; the exact
    products' default) keeps the file's values. On the exact products a rounded adapter gives
    PEFT's logits on the rounded file, within a hundredth of the adapter's own effect of the
    file's (each value rounded by at most 2^-11 of itself: a product B A by about 2^-10, ten times
    that as the margin); on the int8 ones the logits stay within the int8 products' stated
    tolerance (``test_int8``) of the exact path with the file's values."""
    import peft
    import transformers
    from test_int8 import assert_logits_within_tolerance
    from edgelora.cli import main
    src, bundle = bases("llama_untied")
    ad = adapters("r16-all-linear")
    h16 = _rewritten(ad, tmp_path / "h16", np.float16)
    ids = np.random.default_rng(5).integers(0, 100, 24)
    model = edgelora.load(bundle, max_context=64, kv_cache="float32", adapters={"f32": ad, "h16": h16})
    assert model.products == "int8" and model.adapter_dtype == "float16"
    kept = model.adapters.load("kept", ad, dtype="float32")
    assert (model.adapters["f32"].held, model.adapters["h16"].held, kept.held) == ("float16", "float16", "float32")
    assert model.adapters["f32"].nbytes == model.adapters["h16"].nbytes == kept.nbytes // 2
    rounded = model.logits(ids, adapter="f32")
    np.testing.assert_array_equal(rounded, model.logits(ids, adapter="h16"))
    as_file = model.logits(ids, adapter="kept")
    f32_load = edgelora.load(bundle, max_context=64, kv_cache="float32", adapter_dtype="float32", adapters={"f32": ad})
    assert f32_load.adapters["f32"].held == "float32"
    np.testing.assert_array_equal(f32_load.logits(ids, adapter="f32"), as_file)

    exact = edgelora.load(bundle, max_context=64, products="exact", adapters={"f32": ad})
    assert exact.adapter_dtype == "float32" and exact.adapters["f32"].held == "float32"
    r = exact.adapters.load("r", ad, dtype="float16")
    assert r.held == "float16"
    exact_rounded = exact.logits(ids, adapter="r")
    assert close(exact_rounded, peft_logits(bundle, src, [h16], ids))
    exact_logits = exact.logits(ids, adapter="f32")
    assert 0 < np.abs(exact_rounded - exact_logits).max() < 0.01 * np.abs(exact_logits - exact.logits(ids)).max()
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, ad).eval()
    with torch.no_grad():
        float32_logits = pm(torch.from_numpy(ids)[None]).logits[0].numpy()  # the unquantized base, PEFT
    assert_logits_within_tolerance(exact_logits, rounded, float32_logits)

    with pytest.raises(UsageError, match="adapter dtype"):
        edgelora.load(bundle, max_context=64, adapter_dtype="bfloat16")
    with pytest.raises(UsageError, match="adapter dtype"):
        model.adapters.load("x", ad, dtype="int8")
    assert "x" not in model.adapters

    # the command line: eval's perplexity with --adapter-dtype is the API's
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran to the park " * 6)
    got = {}
    for dtype in ("float16", "float32"):
        assert main(["eval", str(bundle), "--text", str(text), "--adapter", str(ad), "--max-context", "64",
                     "--products", "exact", "--adapter-dtype", dtype, "--json"]) == 0
        got[dtype] = json.loads(capsys.readouterr().out)["perplexity"]
        ref = edgelora.evaluate(bundle, text_file=text, adapters={"a": ad}, max_context=64, products="exact",
                                adapter_dtype=dtype)
        assert got[dtype] == ref.perplexity
    assert got["float16"] == edgelora.evaluate(bundle, text_file=text, adapters={"a": h16}, max_context=64,
                                               products="exact").perplexity
    assert got["float16"] != got["float32"]


def test_a_pair_beyond_float16s_range_stays_float32(bases, adapters, tmp_path):
    """Rounding to float16 keeps a LoRA pair with a value float16 cannot hold (beyond 65504) in
    float32, with its values; the other pairs are rounded."""
    from edgelora.adapters import read_adapter
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    _, bundle = bases("llama_untied")
    ad = adapters("r16-all-linear")
    out = tmp_path / "big"
    out.mkdir()
    shutil.copy(ad / "adapter_config.json", out / "adapter_config.json")
    with SafetensorsFile(ad / "adapter_model.safetensors") as f:
        tensors = {n: f.float32(n).copy() for n in f.keys()}
    big = next(n for n in sorted(tensors) if "q_proj.lora_A" in n)
    tensors[big][0, 0] = 1e5
    write_safetensors(out / "adapter_model.safetensors", tensors)
    model = edgelora.load(bundle, max_context=32)
    got = read_adapter(out, model.args, held="float16")
    module = big[len("base_model.model."):-len(".lora_A.weight")]
    for m, pair in got.pairs.items():
        want = np.float32 if m == module else np.float16
        assert pair.A.dtype == pair.B.dtype == want, m
    assert got.pairs[module].A[0, 0] == 1e5
    with pytest.raises(UsageError, match="adapter dtype"):
        read_adapter(out, model.args, held="half")
    assert model.adapters.load("big", out).held == "float16+float32"


def test_group_stacks_hold_the_deltas_without_a_copy(bases, adapters):
    """q/k/v and gate/up of a layer share one stack; the deltas (and the adapter's pairs) are its
    views, so resident bytes are what they were; a group step equals the module-by-module path up
    to float32 rounding."""
    _, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    res = model.adapters.load("b", adapters("r16-all-linear"))
    names = model.net.names[0]
    q, k, v, gate, up, o = (names[j] for j in ("q", "k", "v", "gate", "up", "o"))
    assert res.stacks[q] is res.stacks[k] is res.stacks[v] and res.stacks[gate] is res.stacks[up]
    assert o not in res.stacks and res.stacks[q] is not res.stacks[gate]
    st = res.stacks[q]
    for m in (q, k, v):
        assert np.shares_memory(res.deltas[m].A, st.A) and np.shares_memory(res.deltas[m].Bt, st.Bt)
        assert np.shares_memory(res.adapter.pairs[m].A, st.A) and np.shares_memory(res.adapter.pairs[m].B, st.Bt)
    assert res.nbytes == res.adapter.nbytes
    L = model.net.w.layers[0]
    x = np.random.default_rng(0).standard_normal((1, L.q.in_features)).astype(np.float32)
    for sel in (res.selection, model.adapters.select({"b": 0.5})):
        group = sel.apply_group([q, k, v], [L.q, L.k, L.v], x, [None] * 3)
        for m, lin, y in zip((q, k, v), (L.q, L.k, L.v), group):
            ref = sel.apply(m, lin, x)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("arch, one, two", [("llama_untied", "r16-all-linear", "patterns"),
                                             ("llama_untied", "r16-all-linear@float16", "patterns"),
                                             ("qwen2", "dora", "qwen-bias-lora-only")])
def test_threaded_adapter_steps_are_single_steps_bit_for_bit(bases, adapters, monkeypatch, tmp_path, arch, one, two):
    """With every delta on two threads (threshold 0), a batched step's rows are the single steps'
    bits, with one adapter, a mix, DoRA and none; an adapter held in float16 too, alone and mixed
    with one in float32."""
    monkeypatch.setattr(lora_module, "LORA_PARALLEL_MIN", 0)
    _, bundle = bases(arch)
    model = edgelora.load(bundle, max_context=32, threads=2)
    case, _, held = one.partition("@")
    model.adapters.load("d", _rewritten(adapters(case), tmp_path / "d", np.float16) if held else adapters(case))
    model.adapters.load("q", adapters(two))
    mix = [] if "dora" in one else [{"d": 0.5, "q": 0.5}]
    sels = [model.adapters.select(s) for s in ["d", None, "q", *mix]]
    caches = [model.net.new_cache() for _ in sels]
    singles = [model.net.new_cache() for _ in sels]
    with thread_count(2):
        for step in range(4):
            toks = np.array([3 + step, 7, 11 + 2 * step, 2 * step + 1][:len(sels)])
            out = model.net.forward_batch(toks, caches, sels)
            for b, sel in enumerate(sels):
                np.testing.assert_array_equal(out[b], model.net.forward(toks[b:b + 1], singles[b], lora=sel)[-1])


def test_parse_mix():
    assert parse_mix("a") == "a" and parse_mix("base") is None and parse_mix("") is None
    assert parse_mix("a=0.5,b=0.25") == {"a": 0.5, "b": 0.25}
    with pytest.raises(UsageError):
        parse_mix("a=x")


# ---------------------------------------------------------------------------------------------
# bad adapters
# ---------------------------------------------------------------------------------------------

def test_bad_adapters_are_refused_clearly(bases, adapters, tmp_path):
    src, bundle = bases("llama_untied")
    model = edgelora.load(bundle, max_context=32)
    good = adapters("r4-attention")

    # made for another base: hidden size differs
    other_src, _ = bases("mistral")
    with pytest.raises(AdapterMismatchError, match="q_proj: lora_A has shape"):
        model.adapters.load("x", adapters("regex-layers"))

    # more layers than the base
    deep = tmp_path / "deep"
    shutil.copytree(good, deep)
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    with SafetensorsFile(deep / "adapter_model.safetensors") as f:
        tensors = {k: np.array(f.raw(k)) for k in f.keys()}
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = \
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    write_safetensors(deep / "adapter_model.safetensors", tensors)
    with pytest.raises(AdapterMismatchError, match="layer 7, the base has 2 layers"):
        model.adapters.load("x", deep)

    # unknown target name
    unk = tmp_path / "unk"
    shutil.copytree(good, unk)
    cfg = json.loads((unk / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "query_key_value"]
    (unk / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="'query_key_value' does not exist"):
        model.adapters.load("x", unk)

    # config and weights disagree: the file has modules the config does not target
    cfg["target_modules"] = ["q_proj", "k_proj"]
    (unk / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="o_proj.*not targeted"):
        model.adapters.load("x", unk)

    # corrupt / truncated weights, malformed config
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        model.adapters.load("x", bad)
    (bad / "adapter_model.safetensors").write_bytes(data)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="adapter_config.json"):
        model.adapters.load("x", bad)

    # pickle: refused, never unpickled, and the message says how to convert
    pk = tmp_path / "pk"
    shutil.copytree(good, pk)
    (pk / "adapter_model.safetensors").unlink()
    (pk / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PickleRefusedError, match="never unpickles.*save_file"):
        model.adapters.load("x", pk)

    # other PEFT methods, embedding LoRA
    ia3 = tmp_path / "ia3"
    shutil.copytree(good, ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (ia3 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="IA3"):
        model.adapters.load("x", ia3)
    assert model.adapters.names == []  # nothing half-loaded

    with pytest.raises(FormatError, match="not an adapter folder"):
        model.adapters.load("x", tmp_path / "missing")


def test_dora_cannot_be_mixed(bases, adapters):
    _, bundle = bases("qwen2")
    model = edgelora.load(bundle, max_context=16)
    model.adapters.load("d", adapters("dora"))
    model.adapters.load("q", adapters("qwen-bias-all"))
    with pytest.raises(UsageError, match="DoRA"):
        model.use({"d": 0.5, "q": 0.5})


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _cli(*args, stdin=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "edgelora", *map(str, args)], capture_output=True, text=True,
                          input=stdin)


def test_cli_run_chat_inspect_with_adapters(bases, adapters, tmp_path):
    _, bundle = bases("llama_untied")
    a, b = adapters("r4-attention"), adapters("r16-all-linear")
    model = edgelora.load(bundle, max_context=64, adapters={"a": a, "b": b})
    prompt = "the cat sat on the"
    want = {}
    for spec in ("a", {"a": 0.5, "b": 0.5}, None):
        model.generate(prompt, max_new_tokens=6, adapter=spec, temperature=0)
        want[str(spec)] = model.last_stats.generated_ids
    common = ["run", bundle, "-p", prompt, "-n", 6, "--json", "--max-context", 64]
    r = _cli(*common, "--adapter", f"a={a}")  # a single adapter is used by default
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["adapter"] == "a" and out["generated_ids"] == want["a"]
    r = _cli(*common, "--adapter", f"a={a}", "--adapter", f"b={b}", "--use", "a=0.5,b=0.5")
    out = json.loads(r.stdout)
    assert out["adapter"] == "a=0.5,b=0.5"
    assert out["generated_ids"] == want[str({"a": 0.5, "b": 0.5})] != want["None"]
    r = _cli(*common, "--adapter", f"a={a}", "--adapter", f"b={b}")
    assert r.returncode == 2 and "--use" in r.stderr
    r = _cli(*common, "--adapter", f"a={bundle}")
    assert r.returncode == 3 and "adapter_config.json" in r.stderr

    # chat: list, switch, mix, base, load, unload, all on the device, between turns
    bundle = shutil.copytree(bundle, tmp_path / "with-template")
    put_bundle_file(bundle, "chat_template.jinja",
                    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}the{% endif %}")
    session = "\n".join(["/adapters", "hello", "/use a", "hello", "/use a=0.5,b=0.5", "/base", f"/load c={a}",
                         "/unload b", "/adapters", "/use nope", "/exit"]) + "\n"
    r = _cli("chat", bundle, "--adapter", f"a={a}", "--adapter", f"b={b}", "--use", "b", "-n", 3, stdin=session)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "* b" in err and "using: b" in err and "(using a; switched in" in err
    assert "(using a=0.5,b=0.5;" in err and "(using base;" in err and "(loaded c:" in err
    assert "(unloaded b; using base)" in err and "no adapter named 'nope'" in err
    assert "[b: prefill" in err and "[a: prefill" in err

    r = _cli("inspect", b)
    assert r.returncode == 0 and "rank 16" in r.stdout and "down_proj" in r.stdout
    info = json.loads(_cli("inspect", a, "--json").stdout)
    assert info["kind"] == "adapter" and info["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------
# merging at conversion
# ---------------------------------------------------------------------------------------------

def test_convert_merge_adapter_equals_peft_merge_then_quantize(bases, adapters, tmp_path):
    from edgelora.bundle import Bundle
    from edgelora.converters.nf4 import quantize_nf4
    import transformers
    src, _ = bases("qwen2")
    ad = adapters("qwen-bias-all")
    out = tmp_path / "merged"
    r = _cli("convert", src, "-o", out, "--merge-adapter", ad)
    assert r.returncode == 0, r.stderr
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, ad).merge_and_unload().state_dict()
    with Bundle(out) as b:
        assert b.manifest["source"]["merged_adapter"]["modules"] == 4
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
            want = quantize_nf4(merged[name].numpy())
            got = b.nf4(name)
            same = np.mean(want.packed == got.packed)
            assert same > 0.999, same  # float rounding of W + sBA may differ by an ulp at a code boundary
            np.testing.assert_allclose(got.dequantize(), want.dequantize(), atol=1e-6)
        for name in ("model.layers.0.self_attn.k_proj.bias", "model.layers.1.self_attn.q_proj.bias"):
            np.testing.assert_array_equal(b.tensor(name), merged[name].numpy())
    with pytest.raises(UnsupportedError, match="DoRA"):
        edgelora.convert(src, tmp_path / "dora", merge_adapter=adapters("dora"))
    assert not (tmp_path / "dora").exists()
