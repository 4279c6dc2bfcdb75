"""``edgelora train``'s parts: the data and its answer-only mask, the optimizer, clipping and
schedule against PyTorch / transformers, the PEFT adapter it writes against PEFT, the order of
examples, the loss curve; and (with the gradients of ``runtime/backward.py``) training itself:
5 steps equal PEFT + torch.optim.AdamW, resume is bit for bit, the model learns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import edgelora
from edgelora.config import ModelArgs
from edgelora.errors import FormatError, UsageError
from edgelora.runtime.backward import LoraParams
from edgelora.runtime.tokenizer import Tokenizer
from edgelora.training import (AdamW, TrainHistory, TrainStep, clip_grad_norm, cosine_with_warmup, loss_svg,
                               module_order, resolve_targets, write_adapter_files)
from edgelora.training_data import (IGNORE, answer_spans, epoch_batches, labels_for, micro_batches, read_dataset,
                                    render_example)

from conftest import ROOT
from tiny_models import CONFIGS, Converted, close, hf_dequantized

torch = pytest.importorskip("torch")

DEMO = ROOT / "edgelora" / "demo_model"


@pytest.fixture(scope="module")
def demo_tok():
    return Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return Converted(tmp_path_factory, seed=5, bundle_name="nf4")


def _args(arch: str) -> ModelArgs:
    spec = {k: v for k, v in CONFIGS[arch].items() if k != "cls"}
    return ModelArgs.from_dict(spec)


def _write(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------
# data and the mask
# ---------------------------------------------------------------------------------------------

def test_prompt_and_completion_are_tokenized_apart_so_a_merge_cannot_move_the_mask(demo_tok):
    tok = demo_tok
    prompt, completion = "Once upon a ti", "me"
    joined = tok.encode(prompt + completion)
    p, c = tok.encode(prompt), tok.encode(completion, add_special_tokens=False)
    assert joined != p + c  # this prompt's last token merges with the answer's first when tokenized together
    ids, spans = answer_spans(tok, {"prompt": prompt, "completion": completion}, "x:1", eos=True)
    eos = min(tok.eos_token_ids)
    assert ids == p + c + [eos] and spans == [(len(p), len(ids))]
    labels = labels_for(ids, spans)
    assert labels == [IGNORE] * len(p) + c + [eos]
    # without eos (eval), exactly the completion's tokens
    ids, spans = answer_spans(tok, {"prompt": prompt, "completion": completion}, "x:1")
    assert ids == p + c and spans == [(len(p), len(p) + len(c))]


def test_every_assistant_turn_is_trained_and_nothing_else(demo_tok):
    tok = demo_tok
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Who is Tom?"},
                {"role": "assistant", "content": "A boy with a red ball."}]
    ids, spans = answer_spans(tok, {"messages": messages}, "x:1", eos=True)
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    labels = labels_for(ids, spans)
    trained = [[i for i, lab in zip(ids[a:b], labels[a:b]) if lab != IGNORE] for a, b in spans]
    eot = tok.decode([min(tok.eos_token_ids)])
    # each assistant turn's tokens, with the end-of-turn token the template writes after it, and only them
    assert [tok.decode(t) for t in trained] == ["Hello friend" + eot, "A boy with a red ball." + eot]
    assert sum(lab != IGNORE for lab in labels) == sum(len(t) for t in trained)
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert "Who is Tom?" in masked and "Hi there" in masked
    assert "friend" not in masked and "ball" not in masked
    shown = render_example(tok, SimpleNamespace(ids=ids, labels=labels))
    assert "]]Hello friend" in shown and shown.startswith("[[")


def test_text_lines_train_every_token_after_the_first(demo_tok):
    ids, spans = answer_spans(demo_tok, {"text": "The cat sat."}, "x:1", eos=True)
    labels = labels_for(ids, spans)
    assert labels[0] == IGNORE and labels[1:] == ids[1:] and ids[-1] in demo_tok.eos_token_ids


def test_bad_data_is_refused_naming_file_and_line(demo_tok, tmp_path):
    good = {"prompt": "a", "completion": "b"}
    bad = _write(tmp_path / "bad.jsonl", [good, "", '{"prompt": "x", "completion": ', good])
    with pytest.raises(FormatError, match=r"bad\.jsonl:3: not JSON"):
        read_dataset(demo_tok, bad, 64)
    for line, what in (("[1, 2]", "expected a JSON object"), ('{"prompt": "x"}', "expected"),
                       ('{"messages": []}', "non-empty list"), ('{"text": 3}', "must be a string")):
        f = _write(tmp_path / "one.jsonl", [good, line])
        with pytest.raises(FormatError, match=rf"one\.jsonl:2: .*{what}"):
            read_dataset(demo_tok, f, 64)
    with pytest.raises(UsageError, match="nothing to train on: it holds no examples"):
        read_dataset(demo_tok, _write(tmp_path / "empty.jsonl", ["", "  "]), 64)
    with pytest.raises(FormatError, match="does not exist"):
        read_dataset(demo_tok, tmp_path / "missing.jsonl", 64)
    stories = Tokenizer.from_dir(DEMO)
    stories.chat_template = None
    with pytest.raises(UsageError, match=r"chat\.jsonl:1: .*needs a chat template"):
        read_dataset(stories, _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]}]), 64)


def test_long_examples_are_truncated_or_skipped_and_counted(demo_tok, tmp_path):
    long = {"prompt": "Tom", "completion": " had a red ball and a blue ball and a big dog." * 3}
    short = {"prompt": "Tom", "completion": " ran."}
    prompt_only = {"prompt": "Once upon a time there was a little girl named Lily", "completion": " She"}
    f = _write(tmp_path / "d.jsonl", [short, long, prompt_only])
    n_long = len(answer_spans(demo_tok, long, "", eos=True)[0])
    n_prompt = len(demo_tok.encode(prompt_only["prompt"]))
    L = 12
    assert n_long > L and n_prompt > L
    ds = read_dataset(demo_tok, f, L)
    assert [e.where for e in ds.examples] == [f"{f}:1", f"{f}:2"] and ds.examples[1].truncated
    assert len(ds.examples[1].ids) == L and ds.truncated == [f"{f}:2"]
    assert ds.skipped == [f"{f}:3"]  # its answer lies beyond the cut: nothing left to learn
    ds = read_dataset(demo_tok, f, L, overflow="skip")
    assert [e.where for e in ds.examples] == [f"{f}:1"] and ds.skipped == [f"{f}:2", f"{f}:3"]
    with pytest.raises(UsageError, match="all 2 examples were left out"):
        read_dataset(demo_tok, _write(tmp_path / "l.jsonl", [long, prompt_only]), L, overflow="skip")


def test_epoch_order_packing_and_resume_position():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    b0 = epoch_batches(lengths, 3, 0, 12)
    assert sorted(i for b in b0 for i in b) == list(range(8))  # every example once per epoch
    assert all(sum(lengths[i] for i in b) <= 12 or len(b) == 1 for b in b0)
    assert epoch_batches(lengths, 3, 1, 12) != b0 or epoch_batches(lengths, 3, 2, 12) != b0  # reshuffled
    stream = micro_batches(lengths, 3, 12)
    first = [next(stream) for _ in range(25)]
    assert [p for p, _, _ in first] == list(range(25))
    for start in (0, 1, len(b0), 17):
        again = micro_batches(lengths, 3, 12, start=start)
        assert [next(again) for _ in range(25 - start)] == first[start:]


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def test_targets_map_to_each_architectures_modules():
    llama, phi3 = _args("llama_untied"), _args("phi3")
    assert resolve_targets(llama, "all-linear") == ["q", "k", "v", "o", "gate", "up", "down"]
    assert resolve_targets(llama, "v,q") == ["q", "v"]
    assert resolve_targets(llama, ["q_proj", "mlp.down_proj", "q"]) == ["q", "down"]
    assert resolve_targets(phi3, "all-linear") == ["qkv", "o", "gate_up", "down"]
    assert resolve_targets(phi3, "qkv_proj,o") == ["qkv", "o"]
    with pytest.raises(UsageError, match=r"target 'q' is not a linear module of this phi3 model.*qkv \(qkv_proj\)"):
        resolve_targets(phi3, "q,v")
    assert resolve_targets(llama, "lm_head,q") == ["q", "lm_head"]
    with pytest.raises(UsageError, match="target 'embed_tokens'"):
        resolve_targets(llama, "q,embed_tokens")
    assert module_order(llama, ["q", "down"]) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                                  "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


# ---------------------------------------------------------------------------------------------
# the optimizer against PyTorch
# ---------------------------------------------------------------------------------------------

def test_adamw_clip_and_schedule_equal_torch_over_5_steps():
    from transformers import get_cosine_schedule_with_warmup
    rng = np.random.default_rng(0)
    shapes = {"a.lora_A": (4, 24), "a.lora_B": (16, 4), "b.lora_A": (4, 16), "b.lora_B": (24, 4)}
    mine = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
    ref = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in mine.values()]
    lr, wd, total, warmup = 3e-3, 0.05, 7, 2
    opt_t = torch.optim.AdamW(ref, lr=lr, weight_decay=wd)
    sched = get_cosine_schedule_with_warmup(opt_t, warmup, total)
    opt = AdamW(mine, weight_decay=wd)
    for step in range(5):
        grads = {k: rng.standard_normal(s).astype(np.float32) * (3.0 if step % 2 else 0.01) for k, s in shapes.items()}
        for p, g in zip(ref, grads.values()):
            p.grad = torch.from_numpy(g.copy())
        norm_t = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        norm = clip_grad_norm(grads, 1.0)
        assert abs(norm - float(norm_t)) <= 1e-6 * float(norm_t)
        for p, g in zip(ref, grads.values()):
            np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-6, atol=1e-9)
        rate = lr * cosine_with_warmup(step, warmup, total)
        assert abs(rate - sched.get_last_lr()[0]) <= 1e-15
        opt_t.step()
        sched.step()
        opt.step(grads, rate)
        for p, v in zip(ref, mine.values()):
            np.testing.assert_allclose(v, p.detach().numpy(), rtol=0, atol=1e-6)
    assert opt.t == 5 and cosine_with_warmup(0, warmup, total) == 0.0  # the first warm-up step has lr 0


def test_schedule_equals_transformers_everywhere():
    from transformers import get_cosine_schedule_with_warmup
    for warmup, total in ((0, 1), (0, 10), (3, 10), (10, 10), (5, 37)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        s = get_cosine_schedule_with_warmup(opt, warmup, total)
        for step in range(total):
            assert abs(cosine_with_warmup(step, warmup, total) - s.get_last_lr()[0]) <= 1e-12, (warmup, total, step)
            opt.step()
            s.step()


# ---------------------------------------------------------------------------------------------
# the adapter folder
# ---------------------------------------------------------------------------------------------

def _random_lora(model, fields, rank, alpha, rslora, seed=0):
    rng = np.random.default_rng(seed)
    A, B, scaling = {}, {}, {}
    base = model.adapters.base.linear
    for m in module_order(model.args, fields):
        out, inp = base[m]
        A[m] = (rng.standard_normal((rank, inp)) * 0.2).astype(np.float32)
        B[m] = (rng.standard_normal((out, rank)) * 0.2).astype(np.float32)
        scaling[m] = alpha / (math.sqrt(rank) if rslora else rank)
    return LoraParams(A, B, scaling)


@pytest.mark.parametrize("arch,targets,rslora", [("llama_untied", "all-linear", False), ("phi3", "qkv,down", True)])
def test_written_adapter_loads_in_peft_and_edgelora_with_the_same_logits(bases, tmp_path, arch, targets, rslora):
    peft = pytest.importorskip("peft")
    from edgelora.training import selection_of, target_modules
    src, bundle = bases(arch)
    model = edgelora.load(bundle, max_context=64, products="exact")  # (compared with PEFT in float32)
    fields = resolve_targets(model.args, targets)
    lora = _random_lora(model, fields, 4, 8, rslora)
    cfg = dict(output=str(tmp_path / "ad"), base_model="tiny", rank=4, alpha=8, rslora=rslora,
               target_modules=target_modules(model.args, fields), dropout=0.0)
    (tmp_path / "ad").mkdir()
    write_adapter_files(tmp_path / "ad", lora, cfg)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["use_rslora"] is rslora and conf["base_model_name_or_path"] == "tiny"
    ids = np.random.default_rng(2).integers(0, model.args.vocab_size, 20)
    model.adapters.load("t", tmp_path / "ad")
    mine = model.logits(ids, adapter="t")
    assert np.abs(mine - model.logits(ids, adapter=None)).max() > 0.05  # the adapter counts
    ref_model = peft.PeftModel.from_pretrained(hf_dequantized(bundle, src), tmp_path / "ad").eval()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert close(mine, ref), np.abs(mine - ref).max()
    # the in-memory selection used for eval during training is the same adapter
    np.testing.assert_array_equal(model.logits(ids, adapter=selection_of(model, lora, cfg)), mine)


def test_loss_curve_svg_and_history_round_trip():
    h = TrainHistory("out", "b", [TrainStep(i + 1, 3.0 / (i + 1), 1e-3, 0.5, 100, 40, 0.1) for i in range(6)],
                [[3, 1.2], [6, 0.9]], total_steps=6)
    svg = loss_svg(h)
    assert svg.startswith("<svg") and svg.count("<circle") == 2 and "<polyline" in svg
    import xml.dom.minidom
    xml.dom.minidom.parseString(svg)  # well-formed
    again = TrainHistory.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again.loss == h.loss and again.evals == h.evals and again.tokens_per_second == h.tokens_per_second
    assert abs(h.tokens_per_second - 1000.0) < 1e-9


# ---------------------------------------------------------------------------------------------
# training (with runtime/backward.py's gradients)
# ---------------------------------------------------------------------------------------------

TINY_LINES = [{"prompt": "the cat sat on", "completion": " the mat ."},
              {"prompt": "a dog", "completion": " ran to the park . the dog sat"},
              {"prompt": "the", "completion": " cat"},
              {"messages": None},  # replaced below when the tokenizer has no template
              {"text": "the dog ran to the mat . a cat sat"},
              {"prompt": "a cat ran to", "completion": " the park"}]


def _tiny_data(tmp_path: Path) -> Path:
    lines = [x for x in TINY_LINES if "messages" not in x]
    return _write(tmp_path / "tiny.jsonl", lines)


def _peft_reference(bundle, src, lora0, data, opts, steps):
    """PEFT on the dequantized base + torch.optim.AdamW + clip_grad_norm_ + transformers' schedule,
    over the same micro-batches, from the same initial A and B: per-step losses and final tensors."""
    peft = pytest.importorskip("peft")
    from transformers import get_cosine_schedule_with_warmup
    model = edgelora.load(bundle, max_context=64)
    ds = read_dataset(model.tokenizer, data, 64)
    cfg = peft.LoraConfig(r=opts["rank"], lora_alpha=opts["alpha"], target_modules=opts["targets"], lora_dropout=0.0)
    pm = peft.get_peft_model(hf_dequantized(bundle, src), cfg)
    named = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            for part, mine in (("lora_A", lora0.A), ("lora_B", lora0.B)):
                if f".{part}." in name:
                    module = name.split(f".{part}.")[0][len("base_model.model."):]
                    p.copy_(torch.from_numpy(mine[module]))
                    named[(module, part)] = p
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    warmup = math.ceil(opts["warmup_ratio"] * steps)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    stream = micro_batches([len(e.ids) for e in ds.examples], opts["seed"], opts["batch_tokens"])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total, count = 0.0, 0
        for _ in range(opts["grad_accum"]):
            for i in next(stream)[2]:
                ex = ds.examples[i]
                logits = pm(torch.tensor([ex.ids])).logits[0]
                labels = torch.tensor(ex.labels)
                total = total + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                                                  reduction="sum")
                count += int((labels[1:] != -100).sum())
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, {k: p.detach().numpy().copy() for k, p in named.items()}


def test_five_steps_equal_peft_and_torch_adamw(bases, tmp_path):
    from edgelora.runtime.backward import init_lora
    src, bundle = bases("llama3")
    data = _tiny_data(tmp_path)
    opts = dict(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], lr=2e-2, batch_tokens=20, grad_accum=2,
                seed=3, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=0.5)
    model = edgelora.load(bundle, max_context=64, threads=1)
    h = edgelora.train(model, data, tmp_path / "ad", steps=5, progress=False, **opts)
    assert len(h.steps) == 5 and h.total_steps == 5
    assert any(s.grad_norm > opts["max_grad_norm"] for s in h.steps)  # clipping bites
    lora0 = init_lora(model, opts["targets"], 4, 8, False, 3)
    ref_losses, ref = _peft_reference(bundle, src, lora0, data, opts, 5)
    np.testing.assert_allclose(h.loss, ref_losses, rtol=1e-4)
    from safetensors.numpy import load_file
    mine = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert len(mine) == 2 * len(lora0.A) == len(ref)
    for (module, part), want in ref.items():
        got = mine[f"base_model.model.{module}.{part}.weight"]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (module, part)
    assert np.abs(mine["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]).max() > 1e-3  # it moved


def test_resume_continues_bit_for_bit(bases, tmp_path):
    src, bundle = bases("llama3")
    data = _tiny_data(tmp_path)
    model = edgelora.load(bundle, max_context=64, threads=1)
    opts = dict(rank=4, alpha=8, steps=6, lr=1e-2, batch_tokens=16, dropout=0.1, seed=1, save_every=2,
                progress=False, eval_data=data, eval_every=3)
    whole = edgelora.train(model, data, tmp_path / "whole", **opts)

    class Stop(Exception):
        pass

    def stop_after_3(h):
        if len(h.steps) == 3:
            raise Stop
    with pytest.raises(Stop):
        edgelora.train(model, data, tmp_path / "cut", on_step=stop_after_3, **opts)
    assert [s for s, _ in __import__("edgelora.training", fromlist=["x"]).checkpoint_dirs(tmp_path / "cut")] == [2]
    again = edgelora.train(model, data, tmp_path / "cut", resume=True, **opts)
    assert again.resumed_from == 2
    assert again.loss == whole.loss and again.evals == whole.evals  # the same curve, to the bit
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    curve = json.loads((tmp_path / "cut" / "loss_curve.json").read_text())
    assert [s["loss"] for s in curve["steps"]] == whole.loss
    # resuming with another option is refused, naming it
    with pytest.raises(UsageError, match="lr was 0.01 and is now 0.02"):
        edgelora.train(model, data, tmp_path / "cut", resume=True, **dict(opts, lr=2e-2))


def test_bad_runs_are_refused_before_training(bases, tmp_path, monkeypatch):
    src, bundle = bases("llama3")
    data = _tiny_data(tmp_path)
    model = edgelora.load(bundle, max_context=64, threads=1)
    out = tmp_path / "ad"
    calls = []
    import edgelora.runtime.backward as backward
    real = backward.loss_and_grads
    monkeypatch.setattr(backward, "loss_and_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(UsageError, match="target 'gate_up'"):
        edgelora.train(model, data, out, targets="q,gate_up", steps=1)
    with pytest.raises(UsageError, match="nothing to resume"):
        edgelora.train(model, data, out, resume=True, steps=1)
    with pytest.raises(UsageError, match="--epochs or --steps"):
        edgelora.train(model, data, out, epochs=1, steps=1)
    with pytest.raises(UsageError, match="max_length 100 is more than the model's context"):
        edgelora.train(model, data, out, max_length=100)
    monkeypatch.setattr("edgelora.devices.profiles.host_ram_bytes", lambda: 1 << 20)
    from edgelora.errors import PlanError
    with pytest.raises(PlanError, match="training needs about"):
        edgelora.train(model, data, out, steps=1)
    assert calls == [] and not out.exists()
    monkeypatch.undo()
    edgelora.train(model, data, out, steps=1, rank=2, progress=False)
    with pytest.raises(UsageError, match="output already exists"):
        edgelora.train(model, data, out, steps=1)
    (out / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="holds 'mine.txt'"):
        edgelora.train(model, data, out, steps=1, overwrite=True)
    (out / "mine.txt").unlink()
    edgelora.train(model, data, out, steps=1, overwrite=True, rank=3, progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def test_dry_run_counts_and_shows_the_mask(bases, tmp_path):
    src, bundle = bases("llama3")
    data = _tiny_data(tmp_path)
    d = edgelora.train(bundle, data, tmp_path / "ad", dry_run=True, batch_tokens=20, grad_accum=2, epochs=2)
    assert not (tmp_path / "ad").exists()
    assert d.data["examples"] == 5 and d.data["skipped"] == 0
    assert d.example == "[[the cat sat on]] the mat . </s>"
    assert d.total_steps >= 2 and d.memory["total"] > 0 and "lora" not in d.to_dict()
    text = d.text()
    assert "5 examples" in text and "[[" in text


def test_hot_hand_off_to_a_running_model(bases, tmp_path):
    src, bundle = bases("llama3")
    data = _tiny_data(tmp_path)
    running = edgelora.load(bundle, max_context=64)
    ids = running.encode("the cat sat on")
    before = running.logits(ids)
    edgelora.train(bundle, data, tmp_path / "fresh", steps=3, lr=5e-2, rank=4, progress=False)
    res = running.adapters.load("fresh", tmp_path / "fresh")  # no restart
    assert res.name == "fresh"
    after = running.logits(ids, adapter="fresh")
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(running.logits(ids, adapter=None), before)


# ---------------------------------------------------------------------------------------------
# it learns: stories260K taught a reply style
# ---------------------------------------------------------------------------------------------

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue", "Max", "Anna"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck"]


def style_task(seed: int = 0) -> tuple[list, list]:
    """A small task in a reply style the base never uses: "NAME had a ANIMAL." answered " The ANIMAL
    said hello to NAME."; 36 pairs to train on, 8 held out (each name and animal seen in training,
    never together)."""
    import random
    pairs = [(n, a) for n in NAMES for a in ANIMALS]
    random.Random(seed).shuffle(pairs)

    def line(n, a):
        return {"prompt": f"{n} had a {a}.", "completion": f" The {a} said hello to {n}."}
    return [line(*p) for p in pairs[:36]], [line(*p) for p in pairs[36:44]]


def test_stories260k_learns_a_reply_style_and_peft_agrees(stories260k, tmp_path):
    peft = pytest.importorskip("peft")
    bundle = tmp_path / "nf4"
    edgelora.convert(stories260k, bundle)
    train_lines, held_lines = style_task()
    data, held = _write(tmp_path / "train.jsonl", train_lines), _write(tmp_path / "held.jsonl", held_lines)
    model = edgelora.load(bundle, max_context=128, products="exact")  # (its logits are compared with PEFT's)
    before = edgelora.evaluate(model, data=held).answer_loss
    h = edgelora.train(model, data, tmp_path / "style", steps=30, lr=1e-2, rank=8, alpha=16, batch_tokens=128,
                       progress=False, eval_data=held, eval_every=10)
    assert h.loss[-1] < 0.3 * h.loss[0] and h.evals[-1][1] < h.evals[0][1]
    model.adapters.load("style", tmp_path / "style")
    after = edgelora.evaluate(model, data=held, use="style").answer_loss
    assert after < 0.1 * before, (before, after)  # held-out answers: a clear margin
    right_before = right_after = 0
    for x in held_lines:
        want = x["completion"].strip()
        right_before += model.generate(x["prompt"], max_new_tokens=12, temperature=0).strip().startswith(want)
        right_after += model.generate(x["prompt"], max_new_tokens=12, temperature=0,
                                      adapter="style").strip().startswith(want)
    assert right_before == 0 and right_after >= 6, (right_before, right_after)  # greedy answers in the new style
    ids = np.asarray(model.encode(held_lines[0]["prompt"] + held_lines[0]["completion"]))
    ref_model = peft.PeftModel.from_pretrained(hf_dequantized(bundle, stories260k), tmp_path / "style").eval()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)[None]).logits[0].numpy()
    mine = model.logits(ids, adapter="style")
    assert close(mine, ref), np.abs(mine - ref).max()


# ---------------------------------------------------------------------------------------------
# the training plan
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS needs Linux /proc")
def test_training_plan_is_within_10_percent_of_a_measured_run(capsys):
    from conftest import demo_bundle_path
    from edgelora.cli import main
    from edgelora.devices.planner import measure_train_peak_rss, plan
    bundle = demo_bundle_path()
    train = {"rank": 8, "tokens": 256, "targets": "q,v,down"}
    p = plan(bundle, "raspberry-pi-4-4gb", threads=1, train=train)
    items = {i.name: i.bytes for i in p.items}
    assert "KV cache" not in items and items["optimizer"] == 2 * items["adapter"] == items["gradients"]
    assert p.context == 256 and p.fits and p.train["rank"] == 8
    peak = measure_train_peak_rss(bundle, train, threads=1, timeout=600)
    assert abs(p.total_bytes / peak - 1) < 0.10, (p.total_bytes, peak)
    small = plan(bundle, "raspberry-pi-4-4gb", threads=1, train=train, overhead=0)
    import dataclasses
    pi = edgelora.get_device("raspberry-pi-4-4gb")
    tight = dataclasses.replace(pi, app_share=(small.total_bytes - items["layer"] // 2) / (pi.ram_mib * 2 ** 20))
    over = plan(bundle, tight, threads=1, train=train, overhead=0)
    assert not over.fits and 1 <= over.max_context < 256 and "--max-length" in over.suggestions[0]
    assert main(["plan", str(bundle), "--device", "raspberry-pi-4-4gb", "--train", "--tokens", "64", "--threads", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["tokens"] == 64 and out["context"] == 64
    with pytest.raises(UsageError, match="leave out adapters"):
        plan(bundle, "raspberry-pi-4-4gb", train=True, adapters={"a": "x"})
