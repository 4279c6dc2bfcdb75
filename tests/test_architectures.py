"""The architecture descriptions (``edgelora/architectures.py``): one per family, the runtime's
model classes built from them, importable without the runtime."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from edgelora.architectures import ARCHITECTURES, TensorSpec, architecture, layer_index, layer_prefix, tensor_map
from edgelora.config import ModelArgs

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=100)


def test_runtime_models_are_built_from_their_family():
    from edgelora.runtime.loader import FAMILIES
    assert FAMILIES.keys() == ARCHITECTURES.keys()
    for family, model_cls in FAMILIES.items():
        assert model_cls.arch is ARCHITECTURES[family]
        layer_fields = {f.name for f in dataclasses.fields(model_cls.Layer)}
        assert layer_fields == {*model_cls.arch.PROJECTIONS, *model_cls.arch.NORMS, "biases"}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "phi3", "gemma", "gemma2"])
def test_tensor_map_is_the_family_projections_norms_and_biases(model_type):
    a = ModelArgs.from_dict(dict(TINY, model_type=model_type, attention_bias=True, mlp_bias=True,
                                 hidden_act="gelu_pytorch_tanh" if "gemma" in model_type else "silu",
                                 hidden_activation="gelu_pytorch_tanh"))
    arch = architecture(a)
    specs = tensor_map(a)
    shapes = arch.projection_shapes(a)
    assert list(shapes) == list(arch.PROJECTIONS)
    for i in range(a.num_hidden_layers):
        for field, shape in shapes.items():
            name = f"{arch.module(i, field)}.weight"
            assert specs[name] == TensorSpec(name, shape, "linear")
        for field in arch.NORMS:
            name = f"{arch.module(i, field)}.weight"
            assert specs[name] == TensorSpec(name, (a.hidden_size,), "norm")
        biases = {n for n, s in specs.items() if s.role == "bias" and layer_index(n) == i}
        assert biases == {f"{arch.module(i, field)}.bias" for field in arch.biased(a)}
    n_biases = {"llama": 7, "mistral": 7, "qwen2": 3, "phi3": 0, "gemma": 4, "gemma2": 4}[model_type]
    assert len(arch.biased(a)) == n_biases
    outside = 2 if a.tie_word_embeddings else 3  # embeddings, final norm, an untied head
    assert len(specs) == outside + a.num_hidden_layers * (len(arch.PROJECTIONS) + len(arch.NORMS) + n_biases)


def test_layer_prefix_and_index_agree():
    assert layer_prefix(3) == "model.layers.3."
    assert layer_index(layer_prefix(12) + "mlp.up_proj") == 12
    assert layer_index("lm_head") is None and layer_index("base_model.model.model.layers.1.mlp") is None


def test_importable_without_the_runtime():
    """Converters and the planner read the architectures; that must not load Numba or the kernels."""
    code = ("import sys, edgelora.architectures; "
            "print(sorted(m for m in sys.modules if m == 'numba' or m.startswith('edgelora.runtime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
