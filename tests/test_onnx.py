"""ONNX decoder graphs (torch.onnx.export, TorchScript and dynamo exporters) converted to bundles:
the same NF4 bytes as converting the Hugging Face checkpoint directly, the same logits as
transformers on the dequantized weights, and every refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.bundle import Bundle
from edgelora.converters.onnx import ONNXCheckpoint
from edgelora.errors import FormatError, UnsupportedError, UsageError
from tiny_models import assert_logits_match, assert_same_tensors, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def export(src: Path, out: Path, exporter: str = "torchscript", config: bool = True, dtype=None) -> Path:
    """``src``'s model exported by ``torch.onnx.export`` to ``out/model.onnx`` (logits only, no
    cache), with its tokenizer and, if ``config``, its config.json beside it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):  # an explicit mask keeps transformers' packed-sequence check out of the trace
            return self.m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 50, (1, 8))
    kw = dict(input_names=["input_ids"], output_names=["logits"])
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        kw.update(dynamo=True, dynamic_shapes={"ids": {1: torch.export.Dim("seq", max=256)}})
    else:
        kw.update(dynamo=False, opset_version=17, dynamic_axes={"input_ids": {1: "seq"}})
    torch.onnx.export(Logits(model).eval(), (ids,), str(out / "model.onnx"), **kw)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or (config and f.name == "config.json"):
            shutil.copyfile(f, out / f.name)
    return out / "model.onnx"


def rewrite(path: Path, opaque: bool = False, external: bool = False, transpose_nodes: bool = False) -> Path:
    """Re-save an exported model: every initializer renamed to an opaque name, weights as external
    data, or each ``MatMul`` weight stored ``[out, in]`` behind a Transpose node."""
    m = onnx.load(str(path))
    g = m.graph
    if transpose_nodes:
        inits = {t.name: t for t in g.initializer}
        new_nodes = []
        for n in g.node:
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
                t = inits[n.input[1]]
                w = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), t.name))
                new_nodes.append(helper.make_node("Transpose", [t.name], [t.name + "_T"], perm=[1, 0]))
                n.input[1] = t.name + "_T"
            new_nodes.append(n)
        del g.node[:]
        g.node.extend(new_nodes)
    if opaque:
        names = {t.name: f"w{i}" for i, t in enumerate(g.initializer)}
        for t in g.initializer:
            t.name = names[t.name]
        for n in g.node:
            for i, x in enumerate(n.input):
                if x in names:
                    n.input[i] = names[x]
        for v in g.input:
            if v.name in names:
                v.name = names[v.name]
    path.unlink()
    (path.parent / "model.onnx.data").unlink(missing_ok=True)
    if external:
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(m, str(path))
    return path


def assert_same_bundle(a: Path, b: Path) -> None:
    """Bundles with the same tensors (byte for byte) and the same architecture."""
    assert_same_tensors(a, b)
    with Bundle(a) as x, Bundle(b) as y:
        assert x.args == y.args or _args_equal(x.args, y.args)


def _args_equal(a, b) -> bool:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps",
            "tie_word_embeddings", "attention_bias", "mlp_bias")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"src_{name}")
            src = make_checkpoint(d / "hf", name, seed=7)
            edgelora.convert(src, d / "hf_bundle")
            cache[name] = (src, d / "hf_bundle")
        return cache[name]
    return get


@pytest.mark.parametrize("name,exporter", [("llama_untied", "torchscript"), ("qwen2", "torchscript"),
                                           ("llama3", "torchscript"), ("qwen2", "dynamo"),
                                           ("llama_untied", "dynamo")])
def test_onnx_matches_hf_conversion(sources, tmp_path, name, exporter):
    src, hf_bundle = sources(name)
    onnx_path = export(src, tmp_path / "onnx", exporter)
    summary = edgelora.convert(onnx_path, tmp_path / "out")
    assert summary.model_type == json.loads((src / "config.json").read_text())["model_type"]
    assert_same_bundle(tmp_path / "out", hf_bundle)
    assert_logits_match(tmp_path / "out", src)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["format"] == "onnx" and m["source"]["config"] == "config.json"
    # the dynamo exporter writes the weights as external data, the TorchScript one inline
    assert list(m["source"]["weights_sha256"]) == ["model.onnx"] + (["model.onnx.data"] if exporter == "dynamo" else [])


@pytest.mark.parametrize("name,exporter", [("qwen2", "torchscript"), ("llama_untied", "dynamo")])
def test_opaque_names_external_data_no_config(sources, tmp_path, name, exporter):
    """Every initializer renamed, weights in an external file, no config.json: mapped from the
    graph alone, config inferred, same bytes as the Hugging Face path."""
    src, hf_bundle = sources(name)
    path = rewrite(export(src, tmp_path / "onnx", exporter, config=False), opaque=True, external=True)
    with ONNXCheckpoint(path) as c:
        assert all(const.startswith("w") for const, _ in c.sources.values())
        assert c.config_path is None and c.shard_paths == [path, path.parent / "model.onnx.data"]
    edgelora.convert(path.parent, tmp_path / "out")  # the folder works as SRC too
    assert_same_bundle(tmp_path / "out", hf_bundle)
    assert_logits_match(tmp_path / "out", src)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["config"] == "inferred from the ONNX graph"
    assert set(m["source"]["weights_sha256"]) == {"model.onnx", "model.onnx.data"}


def test_past_key_values_interface(sources, tmp_path):
    """The interface Optimum exports for generation: input ids, mask, positions and past keys and
    values in; logits and present keys and values out (k and v go through a Concat)."""
    from transformers import DynamicCache
    src, hf_bundle = sources("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    cfg, n = model.config, model.config.num_hidden_layers

    class WithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask, pos, *past):
            cache = DynamicCache(config=cfg)
            for i in range(n):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers[:n] for t in (layer.keys, layer.values)])

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    past = [torch.randn(1, cfg.num_key_value_heads, 3, head_dim) for _ in range(2 * n)]
    names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    out = tmp_path / "onnx"
    out.mkdir()
    torch.onnx.export(WithPast(model).eval(), (torch.randint(0, 50, (1, 4)), torch.ones(1, 7, dtype=torch.long),
                                               torch.arange(3, 7)[None], *past), str(out / "model.onnx"),
                      dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask", "position_ids", *names],
                      output_names=["logits", *[x.replace("past_key_values", "present") for x in names]],
                      dynamic_axes={"input_ids": {1: "s"}, "attention_mask": {1: "t"}, "position_ids": {1: "s"},
                                    **{x: {2: "p"} for x in names}})
    for f in ("tokenizer.json", "config.json"):
        shutil.copyfile(src / f, out / f)
    edgelora.convert(out, tmp_path / "out")
    assert_same_bundle(tmp_path / "out", hf_bundle)


def test_bfloat16_export(tmp_path):
    src = make_checkpoint(tmp_path / "hf", "llama_untied", dtype="bfloat16", seed=3)
    path = export(src, tmp_path / "onnx", "dynamo", dtype=torch.bfloat16)
    with ONNXCheckpoint(path) as c:
        assert c.dtypes == {"BF16"}
    edgelora.convert(path, tmp_path / "out")
    edgelora.convert(src, tmp_path / "hf_bundle")
    assert_same_bundle(tmp_path / "out", tmp_path / "hf_bundle")


def test_weights_behind_transpose_nodes(sources, tmp_path):
    src, hf_bundle = sources("llama_untied")
    path = rewrite(export(src, tmp_path / "onnx"), opaque=True, transpose_nodes=True)
    edgelora.convert(path, tmp_path / "out")
    assert_same_bundle(tmp_path / "out", hf_bundle)


def test_gemm_weights(sources, tmp_path):
    """Gemm with transB=1 (weights stored [out, in]), as some exporters write 2-D projections."""
    src, hf_bundle = sources("qwen2")
    path = export(src, tmp_path / "onnx")
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
            n.op_type = "Gemm"
            n.attribute.append(helper.make_attribute("transB", 1))
    onnx.save(m, str(path))
    edgelora.convert(path, tmp_path / "out")
    assert_same_bundle(tmp_path / "out", hf_bundle)


def test_exported_graph_computes_the_original_logits(sources, tmp_path):
    """The graph being mapped is the model: onnx's reference evaluator on the export gives
    transformers' logits (so the mapping is checked against a faithful graph)."""
    from onnx.reference import ReferenceEvaluator
    src, _ = sources("qwen2")
    path = export(src, tmp_path / "onnx")
    ids = np.array([[1, 5, 9, 3, 7, 2]], np.int64)
    got = ReferenceEvaluator(str(path)).run(None, {"input_ids": ids})[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_cli_convert_and_inspect(sources, tmp_path):
    src, hf_bundle = sources("qwen2")
    path = export(src, tmp_path / "onnx")
    r = subprocess.run([sys.executable, "-m", "edgelora", "convert", str(path), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "qwen2" in r.stdout
    assert_same_bundle(tmp_path / "out", hf_bundle)
    r = subprocess.run([sys.executable, "-m", "edgelora", "inspect", str(path), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "onnx" and info["architecture"]["layers"] == 2 and "model.onnx" in info["files"]


# -- refusals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    """A TorchScript export of tiny Llama, inline weights, with config.json and tokenizer."""
    src, _ = sources("llama_untied")
    return export(src, tmp_path_factory.mktemp("exported") / "onnx").parent


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst / "model.onnx"


def test_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf at all\n" * 10)
    with pytest.raises(FormatError, match=r"model\.onnx.*not an ONNX model"):
        edgelora.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated(exported, tmp_path):
    path = _copy(exported, tmp_path / "m")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="not an ONNX model, or truncated"):
        edgelora.convert(path, tmp_path / "out")


def test_unmappable_graph_lists_what_was_not_understood(tmp_path):
    """A two-layer ReLU MLP: no embedding, no attention, an unknown operator, stray weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "fc1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "fc2")
    nodes = [helper.make_node("MatMul", ["x", "fc1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "fc2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    onnx.save(helper.make_model(g), str(tmp_path / "mlp.onnx"))
    with pytest.raises(UnsupportedError) as e:
        edgelora.convert(tmp_path / "mlp.onnx", tmp_path / "out")
    msg = str(e.value)
    assert "Llama-family" in msg and "operators Relu" in msg and "no token embedding" in msg
    assert "no attention block" in msg and "fc1" in msg and "fc2" in msg


def test_fused_qkv_is_refused(exported, tmp_path):
    """q, k and v merged into one projection (as Phi-3 exports are): not understood, and said so."""
    path = _copy(exported, tmp_path / "m")
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    first_q = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    w = numpy_helper.to_array(inits[first_q.input[1]])
    extra = numpy_helper.from_array(w.copy(), "extra_proj")
    m.graph.initializer.append(extra)
    m.graph.node.append(helper.make_node("MatMul", [first_q.input[0], "extra_proj"], ["extra_out"]))
    m.graph.output.append(helper.make_tensor_value_info("extra_out", TensorProto.FLOAT, None))
    onnx.save(m, str(path))
    with pytest.raises(UnsupportedError, match="4 projections reading the normalised output"):
        ONNXCheckpoint(path)


def test_missing_external_data(sources, tmp_path):
    src, _ = sources("llama_untied")
    path = rewrite(export(src, tmp_path / "onnx"), external=True)
    (path.parent / "model.onnx.data").unlink()
    with pytest.raises(FormatError, match=r"external data file 'model.onnx.data'.*missing"):
        edgelora.convert(path, tmp_path / "out")


def test_truncated_external_data(sources, tmp_path):
    src, _ = sources("llama_untied")
    path = rewrite(export(src, tmp_path / "onnx"), external=True)
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(FormatError, match="truncated"):
        edgelora.convert(path, tmp_path / "out")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../outside.data"])
def test_external_data_outside_the_folder(sources, tmp_path, location):
    src, _ = sources("llama_untied")
    path = rewrite(export(src, tmp_path / "onnx"), external=True)
    shutil.copyfile(path.parent / "model.onnx.data", tmp_path / "outside.data")
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(path))
    with pytest.raises(FormatError, match="outside the model's folder"):
        edgelora.convert(path, tmp_path / "out")


def test_symlinked_external_data_outside_the_folder(sources, tmp_path):
    src, _ = sources("llama_untied")
    path = rewrite(export(src, tmp_path / "onnx"), external=True)
    data = path.parent / "model.onnx.data"
    shutil.move(data, tmp_path / "elsewhere.data")
    data.symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(FormatError, match="outside the model's folder"):
        ONNXCheckpoint(path)


def test_config_must_describe_the_graph(exported, tmp_path):
    path = _copy(exported, tmp_path / "m")
    cfg = json.loads((path.parent / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path.parent / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="intermediate_size=128 in config.json, 256 in the graph"):
        edgelora.convert(path, tmp_path / "out")


def test_config_fields_the_graph_cannot_tell(sources, tmp_path):
    """llama3 rope scaling changes inv_freq: without config.json the error names the fields to add."""
    src, _ = sources("llama3")
    path = export(src, tmp_path / "onnx", config=False)
    with pytest.raises(UnsupportedError, match="no config.json.*rope_theta, rope_scaling"):
        edgelora.convert(path, tmp_path / "out")


def test_misleading_initializer_names_are_caught(exported, tmp_path):
    """The structure wins, but a name that says otherwise is an error rather than a guess."""
    path = _copy(exported, tmp_path / "m")
    m = onnx.load(str(path))
    names = {"m.model.layers.0.input_layernorm.weight": "m.model.layers.0.post_attention_layernorm.weight",
             "m.model.layers.0.post_attention_layernorm.weight": "m.model.layers.0.input_layernorm.weight"}
    for t in m.graph.initializer:
        t.name = names.get(t.name, t.name)
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            n.input[i] = names.get(x, x)
    onnx.save(m, str(path))
    with pytest.raises(UnsupportedError, match="refusing to guess"):
        ONNXCheckpoint(path)


def test_tokenizer_required(exported, tmp_path):
    path = _copy(exported, tmp_path / "m")
    (path.parent / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="no tokenizer.json"):
        edgelora.convert(path, tmp_path / "out")


def test_folder_with_several_models(exported, tmp_path):
    path = _copy(exported, tmp_path / "m")
    shutil.copyfile(path, path.parent / "decoder_with_past_model.onnx")
    with pytest.raises(UsageError, match="several ONNX models"):
        edgelora.convert(path.parent, tmp_path / "out")
    edgelora.convert(path, tmp_path / "out")  # naming the file picks it


def test_missing_onnx_file_is_not_a_hub_id(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        edgelora.convert("nowhere/model.onnx", tmp_path / "out")
