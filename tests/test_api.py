"""The public API: every name in ``edgelora.__all__`` resolves lazily to what its module defines,
and stays that even after the module of the same name has been imported (``edgelora.inspect`` is
a function, not the ``edgelora.inspection`` module)."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_resolve_to_their_definitions_in_a_fresh_process():
    code = """
import importlib, edgelora
import edgelora.inspection, edgelora.deployment, edgelora.devices.planner  # submodules first
for name in edgelora.__all__:
    value = getattr(edgelora, name)
    if name in edgelora._LAZY:
        assert value is getattr(importlib.import_module(edgelora._LAZY[name]), name), name
        assert getattr(edgelora, name) is value, name  # the second access too
assert callable(edgelora.inspect) and callable(edgelora.deploy) and callable(edgelora.plan)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, edgelora; print(sorted(m for m in ('numba', 'numpy') "
                          "if m in sys.modules))"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
