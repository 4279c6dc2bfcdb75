"""Shared fixtures: paths, the real small model from ../shared when present, tiny HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = Path(os.environ.get("EDGELORA_SHARED_MODELS", ROOT.parent / "shared" / "models")) / "stories260K"


@pytest.fixture(scope="session")
def stories260k() -> Path:
    if not (SHARED_MODEL / "model.safetensors").is_file():
        pytest.skip(f"real small model not present at {SHARED_MODEL}")
    return SHARED_MODEL


@pytest.fixture(autouse=True, scope="session")
def _private_edgelora_home(tmp_path_factory):
    """Caches (verified checksums, the demo) go to a temporary home, never the user's."""
    old = os.environ.get("EDGELORA_HOME")
    os.environ["EDGELORA_HOME"] = str(tmp_path_factory.mktemp("edgelora-home"))
    yield
    if old is None:
        os.environ.pop("EDGELORA_HOME", None)
    else:
        os.environ["EDGELORA_HOME"] = old


def demo_bundle_path() -> Path:
    """The built-in demo model converted to a bundle (once per test session, in the private home)."""
    from edgelora.atomic import edgelora_home
    from edgelora.demo import demo_bundle
    return demo_bundle(edgelora_home() / "demo", quiet=True)[0]


def demo_adapter_paths() -> dict:
    """``{name: folder}`` of the LoRA adapters shipped for the demo model."""
    from edgelora.demo import packaged_demo_adapters
    return {name: str(path) for name, path in packaged_demo_adapters().items()}
