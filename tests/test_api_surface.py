"""The Python API as a new user discovers it (issue 18): ``dir(edgelora)`` shows the API, the
package is marked typed, public functions are annotated, sampling options are named parameters,
a model has a useful repr, docs/api.md is current, and errors from Python name Python parameters."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import edgelora
from conftest import ROOT, demo_adapter_paths, demo_bundle_path
from edgelora.errors import UsageError


def test_dir_shows_every_public_name_and_the_package_is_typed():
    shown = dir(edgelora)
    for name in edgelora.__all__:
        assert name in shown, name
    assert (Path(edgelora.__file__).parent / "py.typed").is_file()
    data = (ROOT / "pyproject.toml").read_text()
    assert '"py.typed"' in data  # installed with the package


def test_public_functions_are_annotated():
    for name in edgelora.__all__:
        obj = getattr(edgelora, name)
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            untyped = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
            assert not untyped, f"edgelora.{name}: {untyped} not annotated"
            assert sig.return_annotation is not inspect.Parameter.empty, name


@pytest.mark.parametrize("method", ["generate", "stream", "stream_generate", "chat", "stream_chat", "generate_batch"])
def test_sampling_options_are_named_parameters(method):
    sig = inspect.signature(getattr(edgelora.Model, method))
    params = sig.parameters
    for name, default in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0),
                          ("repetition_penalty", 1.0), ("seed", None)):
        assert params[name].default == default and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert [p for p, v in params.items() if v.kind is inspect.Parameter.VAR_KEYWORD] == ["unknown"]  # typos only
    assert "object at 0x" not in str(sig)  # the "current selection" default has a readable repr


def test_named_sampling_parameters_reach_the_sampler():
    model = edgelora.load(demo_bundle_path(), max_context=64)
    a = model.generate("Once upon a time", max_new_tokens=8, temperature=1.5, top_k=20, seed=7)
    assert a == model.generate("Once upon a time", max_new_tokens=8, temperature=1.5, top_k=20, seed=7)
    assert list(model.stream("Once upon a time", max_new_tokens=8, temperature=1.5, top_k=20, seed=7)) != []
    with pytest.raises(UsageError, match="top_p"):
        model.generate("x", top_p=0.0)
    for call in (model.generate, model.stream, model.stream_generate, model.generate_batch):
        with pytest.raises(UsageError, match="unknown sampling option 'top_q'; valid options: temperature"):
            out = call(["x"] if call == model.generate_batch else "x", top_q=0.5)
            list(out)  # (the streams check when they start)
    with pytest.raises(UsageError, match="'top_q'"):
        model.chat([{"role": "user", "content": "hi"}], top_q=0.5)
    with pytest.raises(UsageError, match="'top_q'"):
        list(model.stream_chat([{"role": "user", "content": "hi"}], top_q=0.5))


def test_model_repr():
    model = edgelora.load(demo_bundle_path(), max_context=64, adapters=demo_adapter_paths())
    model.use("pirate")
    text = repr(model)
    assert text.startswith("Model(path=") and str(demo_bundle_path()) in text
    for part in ("model_type='llama'", "layers=4", "max_context=64", "'pirate'", "'shout'",
                 "active_adapter='pirate'"):
        assert part in text, part


def test_api_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "docs" / "api.md").read_text()
    for name in edgelora.__all__:
        if name != "__version__":
            assert f"edgelora.{name}" in text, name
    assert "### `Model.stream_chat`" in text and "temperature: 'float' = 0.0" in text


def test_a_deploy_folder_with_one_adapter_uses_it_from_python_as_from_the_cli(tmp_path):
    out = tmp_path / "one"
    edgelora.deploy(demo_bundle_path(), "host", out, adapters={"pirate": demo_adapter_paths()["pirate"]}, context=64)
    model = edgelora.load(out)
    assert model.active_adapter == "pirate"
    r = subprocess.run([sys.executable, "-m", "edgelora", "run", str(out), "-p", "Hello!", "-n", "3", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"adapter": "pirate"' in r.stdout


def test_python_errors_name_python_parameters(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "f").write_text("x")
    with pytest.raises(edgelora.EdgeLoraError) as e:
        edgelora.convert(demo_bundle_path(), out)
    assert "overwrite=True" in str(e.value)  # the parameter (and the CLI flag)


def test_load_converts_a_checkpoint_once_into_the_cache(tmp_path):
    """``edgelora.load`` of a Hugging Face folder converts it once into $EDGELORA_HOME/bundles and
    gives the same model as converting it explicitly; the second load reuses the bundle, other
    options convert again, and ``edgelora run`` takes the folder too."""
    from edgelora.autoconvert import cache_dir
    from edgelora.demo import demo_checkpoint
    ckpt = demo_checkpoint(tmp_path / "demo")
    model = edgelora.load(ckpt, max_context=64)
    assert model.path.parent == cache_dir()
    edgelora.convert(ckpt, tmp_path / "explicit")
    explicit = edgelora.load(tmp_path / "explicit", max_context=64)
    ids = model.encode("Once upon a time")
    assert (model.logits(ids) == explicit.logits(ids)).all()  # the same bundle, byte for byte
    stamp = (model.path / "manifest.json").stat().st_mtime_ns
    again = edgelora.load(ckpt, max_context=64)
    assert again.path == model.path and (again.path / "manifest.json").stat().st_mtime_ns == stamp
    other = edgelora.load(ckpt, max_context=64, convert_options={"block_size": 32})
    assert other.path != model.path and other.bundle.quantization["block_size"] == 32
    with pytest.raises(UsageError, match="unknown convert option 'merge'"):
        edgelora.load(ckpt, convert_options={"merge": "x"})
    r = subprocess.run([sys.executable, "-m", "edgelora", "run", str(ckpt), "-p", "Once upon a time", "-n", "5",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout)["generated_ids"] == again.generate("Once upon a time", max_new_tokens=5,
                                                                   return_result=True).token_ids
