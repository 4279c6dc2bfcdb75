"""``edgelora eval`` / ``edgelora.evaluate``: the perplexity of a text equals transformers' on the
bundle's dequantized weights (float32, the perplexity guide's windows with stride = window) to
1e-4 relative, on stories260K and a tiny random model; the answer-only loss equals torch's
cross-entropy with the prompt's labels masked (with an adapter through PEFT, and on chat
messages); the weight report is ``‖W − Q(W)‖/‖W‖`` against the source weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import edgelora
from edgelora.cli import main
from edgelora.errors import FormatError, UsageError
from edgelora.evaluation import text_windows
from tiny_models import hf_dequantized, make_adapter, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. One day, "
         "she saw a big dog in the park. The dog was very friendly and wagged its tail. Lily and the dog played "
         "together all day. When it was time to go home, Lily said goodbye to the dog and went home happy. ") * 3
WORDS = "the cat sat on the mat . a dog ran to the park . the cat ran to a mat . " * 6
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (with a chat template) and its bundle."""
    d = tmp_path_factory.mktemp("eval")
    src = make_checkpoint(d / "src", "llama_untied", seed=3)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    edgelora.convert(src, d / "out")
    return src, d / "out"


def hf_perplexity(model, ids, window):
    """transformers' perplexity guide with stride = max_length: each window's loss on its labels
    (the first token of a window is context only), weighted by the tokens it predicts."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in [ids[s:s + window] for s in range(0, len(ids), window)]:
            if len(w) < 2:
                continue
            x = torch.tensor([w])
            loss = model(input_ids=x, labels=x).loss
            nll, count = nll + float(loss) * (len(w) - 1), count + len(w) - 1
    return math.exp(nll / count), count


def hf_masked_loss(model, examples):
    """Token-weighted cross-entropy over ``(ids, labels)`` with -100 on the tokens not counted."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
            target = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100,
                                                             reduction="sum"))
            count += int((target != -100).sum())
    return total / count, count


def test_windows_are_consecutive_and_drop_a_lone_last_token():
    assert text_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert text_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("window", [None, 64, 50])
def test_perplexity_equals_transformers_on_stories260k(stories260k, tmp_path_factory, window):
    out = tmp_path_factory.getbasetemp() / "stories-eval"
    if not out.exists():
        edgelora.convert(stories260k, out)
    r = edgelora.evaluate(out, text=STORY, window=window, products="exact")
    ids = transformers.AutoTokenizer.from_pretrained(stories260k)(STORY)["input_ids"]
    ref, count = hf_perplexity(hf_dequantized(out, stories260k), ids, window or len(ids) + 1)
    assert r.text_tokens == count
    assert abs(r.perplexity - ref) <= 1e-4 * ref, (r.perplexity, ref)
    assert r.window == (window or 512)


@pytest.mark.parametrize("window", [None, 16])
def test_perplexity_equals_transformers_on_a_tiny_model(tiny, tmp_path, window):
    src, bundle = tiny
    path = tmp_path / "text.txt"
    path.write_text(WORDS)
    r = edgelora.evaluate(bundle, text_file=path, window=window, max_context=128, products="exact")
    ids = transformers.AutoTokenizer.from_pretrained(src)(WORDS)["input_ids"]
    ref, count = hf_perplexity(hf_dequantized(bundle, src), ids, window or 128)
    assert r.text_tokens == count and abs(r.perplexity - ref) <= 1e-4 * ref, (r.perplexity, ref)


def test_answer_loss_is_masked_cross_entropy_with_an_adapter(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    src, bundle = tiny
    adapter = make_adapter(src, tmp_path / "ad", seed=4, r=4, target_modules=["q_proj", "down_proj"])
    lines = [{"prompt": "the cat sat on", "completion": " the mat ."},
             {"prompt": "a dog", "completion": " ran to the park . the dog sat"},
             {"prompt": "the", "completion": " cat"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    r = edgelora.evaluate(bundle, data=data, adapters={"a": str(adapter)}, max_context=64)
    assert r.adapter == "a" and r.perplexity is None
    tok = transformers.AutoTokenizer.from_pretrained(src)
    examples = []
    for x in lines:
        p = tok(x["prompt"])["input_ids"]
        c = tok(x["completion"], add_special_tokens=False)["input_ids"]
        examples.append((p + c, [-100] * len(p) + c))
    ref = peft.PeftModel.from_pretrained(hf_dequantized(bundle, src), adapter).eval()
    loss, count = hf_masked_loss(ref, examples)
    assert r.examples == 3 and r.answer_tokens == count
    assert abs(r.answer_loss - loss) <= 1e-4 * loss, (r.answer_loss, loss)
    assert abs(r.answer_perplexity - math.exp(loss)) <= 1e-4 * math.exp(loss)
    base = edgelora.evaluate(bundle, data=data, max_context=64)  # the base differs: the adapter counts
    assert base.adapter == "base" and abs(base.answer_loss - r.answer_loss) > 1e-3
    model = edgelora.load(bundle, max_context=64, adapters={"a": str(adapter)})
    assert edgelora.evaluate(model, data=data, use="a").answer_loss == r.answer_loss
    assert model.active_adapter == "base"  # ``use`` for the call only
    assert edgelora.evaluate(model, data=data).answer_loss == base.answer_loss


def test_answer_loss_on_messages_counts_every_assistant_turn(tiny, tmp_path):
    src, bundle = tiny
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"},
                {"role": "user", "content": "a dog"}, {"role": "assistant", "content": "ran to the park"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    r = edgelora.evaluate(bundle, data=data, max_context=64)
    # the rendering "user the cat . assistant sat on the mat . user a dog . assistant ran to the park . ",
    # the answers (with the " ." that closes each turn) counted
    words = "user the cat . assistant sat on the mat . user a dog . assistant ran to the park .".split()
    counted = [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(counted)
    loss, count = hf_masked_loss(hf_dequantized(bundle, src),
                                 [(ids, [i if c else -100 for i, c in zip(ids, counted)])])
    assert r.answer_tokens == count == 10 and abs(r.answer_loss - loss) <= 1e-4 * loss


def test_weight_report_is_the_error_against_the_source(tiny):
    from safetensors.numpy import load_file
    src, bundle = tiny
    r = edgelora.evaluate(bundle, max_context=64)
    assert r.perplexity is None and r.answer_loss is None
    assert [row["layer"] for row in r.weights] == [None, 0, 1]
    source = {}
    for f in src.glob("*.safetensors"):
        source.update(load_file(f))
    with edgelora.open_bundle(bundle) as b:
        for row in r.weights:
            for name, err in row["tensors"].items():
                w = source[name].astype(np.float64)
                ref = np.linalg.norm(b.tensor(name).astype(np.float64) - w) / np.linalg.norm(w)
                assert abs(err - ref) <= 1e-6, (name, err, ref)
            assert row["worst_rel_error"] == max(row["tensors"].values())
    assert any(0.05 < e < 0.15 for row in r.weights for e in row["tensors"].values())  # NF4's typical error


def test_product_report_is_the_twins_error_on_transformers_activations(tmp_path):
    """With int8 products, each projection's reported ``‖y_int8 − y_exact‖/‖y_exact‖`` is what the
    NumPy twins give on the rows transformers feeds that projection (the dequantized model, the
    text's first 128 tokens): layer 0's q_proj and the float16 head quantized to int8; the exact
    path reports nothing."""
    from edgelora.runtime import int8 as I8
    from edgelora.runtime.int8_gemm import INT8_GEMM_SIMD
    src = make_checkpoint(tmp_path / "src", "mistral", seed=4)  # hidden 64: every projection int8
    edgelora.convert(src, tmp_path / "b")
    text = WORDS * 2
    r = edgelora.evaluate(tmp_path / "b", text=text, max_context=256, products="int8")
    ids = transformers.AutoTokenizer.from_pretrained(src)(text)["input_ids"][:128]
    assert r.product_tokens == len(ids) == 128
    assert [row["layer"] for row in r.products] == [0, 1, None]
    assert set(r.products[0]["projections"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(0 < e < 0.05 for row in r.products for e in row["projections"].values())
    hf = hf_dequantized(tmp_path / "b", src)
    seen = {}

    def keep(key):
        def hook(module, args):
            seen[key] = args[0][0].numpy().copy()  # (returns None: the input goes on unchanged)
        return hook

    hooks = [m.register_forward_pre_hook(keep(key))
             for key, m in (("q", hf.model.layers[0].self_attn.q_proj), ("head", hf.lm_head))]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    with edgelora.open_bundle(tmp_path / "b") as b:
        q = b.nf4("model.layers.0.self_attn.q_proj.weight")
        head = b.tensor("lm_head.weight").astype(np.float32)
    X = seen["q"]
    exact = X.astype(np.float64) @ q.dequantize_reference().astype(np.float64).T
    twin = I8.nf4_int8_matmul_reference(q, X) if INT8_GEMM_SIMD else I8.nf4_int8_matvec_batch_reference(q, X)
    ref = np.linalg.norm(twin - exact) / np.linalg.norm(exact)
    assert abs(r.products[0]["projections"]["q"] - ref) <= 0.02 * ref, (r.products[0]["projections"]["q"], ref)
    X = seen["head"]
    codes = I8.quantize_activations_reference(head, I8.Q8_BLOCK)[0]
    amax = np.abs(head.reshape(head.shape[0], -1, I8.Q8_BLOCK)).max(axis=2)
    scales = amax / np.float32(127) * np.float32(I8.CODE_SCALE)  # (the activations' scales divide by CODE_SCALE)
    exact = X.astype(np.float64) @ head.astype(np.float64).T
    ref = np.linalg.norm(I8.q8_matvec_batch_reference(codes, scales, X) - exact) / np.linalg.norm(exact)
    assert abs(r.products[2]["projections"]["head"] - ref) <= 0.02 * ref, (r.products[2], ref)
    assert edgelora.evaluate(tmp_path / "b", text=text, max_context=256, products="exact").products == []


def test_cli_eval(tiny, tmp_path, capsys):
    src, bundle = tiny
    text, data = tmp_path / "t.txt", tmp_path / "d.jsonl"
    text.write_text(WORDS)
    data.write_text(json.dumps({"prompt": "the cat", "completion": " sat on the mat"}) + "\n")
    assert main(["eval", str(bundle), "--text", str(text), "--data", str(data), "--window", "20",
                 "--max-context", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = edgelora.evaluate(bundle, text_file=text, data=data, window=20, max_context=64).to_dict()
    assert out == json.loads(json.dumps(ref))
    assert main(["eval", str(bundle), "--text", str(text), "--window", "20", "--max-context", "64"]) == 0
    shown = capsys.readouterr().out
    assert f"perplexity   {ref['perplexity']:.4f}" in shown and "layer 1" in shown
    data.write_text("{not json\n")
    assert main(["eval", str(bundle), "--data", str(data), "--max-context", "64"]) == FormatError.exit_code
    assert "d.jsonl:1" in capsys.readouterr().err


def test_usage_errors(tiny, tmp_path):
    src, bundle = tiny
    model = edgelora.load(bundle, max_context=16)
    with pytest.raises(UsageError):
        edgelora.evaluate(model, text="the cat sat", window=1)
    with pytest.raises(UsageError):
        edgelora.evaluate(model, text="the cat sat", max_context=8)
    with pytest.raises(UsageError):
        edgelora.evaluate(model, text="the")  # one token: nothing to predict
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": WORDS, "completion": " cat"}) + "\n")
    with pytest.raises(UsageError):
        edgelora.evaluate(model, data=long)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the"}) + "\n")
    with pytest.raises(FormatError):
        edgelora.evaluate(model, data=bad)
