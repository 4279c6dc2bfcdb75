"""Every Python snippet in the README runs as written (issue 18), against the built-in demo model:
in a fresh folder holding the demo checkpoint as ``ckpt/`` and its LoRA adapters as
``adapters/pirate`` and ``adapters/shout``, the blocks run in order in one Python process, as a
reader pasting them one after another would (the first converts ``ckpt/`` to ``model-nf4/``, which
the later ones use)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import ROOT, demo_adapter_paths


def python_blocks(text: str) -> list[str]:
    """The code of each fenced ```python block, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_python_blocks_are_found():
    blocks = python_blocks("x\n```python\na = 1\n```\n```bash\nb\n```\n```python\nc = 2\nd = 3\n```\n")
    assert blocks == ["a = 1\n", "c = 2\nd = 3\n"]


def test_readme_python_snippets_run_on_the_demo_model(tmp_path):
    from edgelora.demo import demo_checkpoint
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    work = tmp_path / "reader"
    shutil.copytree(demo_checkpoint(tmp_path / "demo"), work / "ckpt")
    for name, path in demo_adapter_paths().items():
        shutil.copytree(path, work / "adapters" / name)
    program = "\n".join(f"# --- README block {i + 1}\nexec(compile({b!r}, 'README block {i + 1}', 'exec'))"
                        for i, b in enumerate(blocks))
    r = subprocess.run([sys.executable, "-c", program], cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "model-nf4" / "manifest.json").is_file() and (work / "pi4").is_dir()
