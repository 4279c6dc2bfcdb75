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
