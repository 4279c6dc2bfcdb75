"""The README's first command as a new user runs it: ``pip install . && edgelora demo`` in the clone
root, then an editable install over it, commands from other folders, and an uninstall that leaves
nothing behind. A virtual environment (with this machine's packages visible, so nothing is
downloaded) gets a copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                                ".venv", "*.nbi", "*.nbc")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the repository, as a fresh clone has it (the subpackage symlinks kept)."""
    dst = tmp_path_factory.mktemp("clone") / "edgelora"
    shutil.copytree(ROOT, dst, symlinks=True, ignore=IGNORE)
    return dst


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(d)
    return d


def _run(cmd, cwd, env_dir=None, check=True, timeout=900):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_dir is not None:
        env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
        env["VIRTUAL_ENV"] = str(env_dir)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def _pip(env_dir: Path, *args, cwd):
    py = env_dir / "bin" / "python"
    return _run([sys.executable, "-m", "pip", "--python", str(py), "-q", "--disable-pip-version-check", *args,
                 "--no-deps", "--no-build-isolation"] if args[0] == "install" else
                [sys.executable, "-m", "pip", "--python", str(py), "-q", *args], cwd=cwd)


def _site_packages(env_dir: Path) -> Path:
    return next((env_dir / "lib").glob("python*/site-packages"))


def test_install_demo_bench_editable_uninstall_from_the_clone_root(clone, env_dir, tmp_path):
    site = _site_packages(env_dir)
    _pip(env_dir, "install", ".", cwd=clone)
    assert (site / "edgelora" / "runtime" / "model.py").is_file()

    # the README's first command, in the clone root: the story, the swaps and the plan table
    demo = _run(["edgelora", "demo", "--workdir", str(tmp_path / "demo")], cwd=clone, env_dir=env_dir)
    assert "edgelora plan:" in demo.stdout and "raspberry-pi-4-4gb" in demo.stdout, demo.stdout[-1500:]
    assert "runtime itself" in demo.stdout
    # the planner's child process imported the installed package, not the clone's folders
    bundle = tmp_path / "demo" / "demo-llama-nf4"
    bench = _run(["edgelora", "bench", str(bundle), "--prompt-tokens", "16", "--decode-tokens", "8", "--threads", "1",
                  "--json"], cwd=clone, env_dir=env_dir)
    assert '"decode_tokens_per_second"' in bench.stdout

    # no compiled kernels inside the installed package: they live in the user's cache folder
    assert not [p for p in (site / "edgelora").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert list((Path(os.environ["EDGELORA_HOME"]) / "kernels").rglob("*.nbi"))

    # the README's second command installs editable over it; commands work from any folder
    _pip(env_dir, "install", "-e", ".", cwd=clone)
    version = _run(["edgelora", "--version"], cwd=tmp_path, env_dir=env_dir)
    assert version.stdout.strip().startswith("edgelora ")

    _pip(env_dir, "uninstall", "-y", "edgelora", cwd=tmp_path)
    assert not (site / "edgelora").exists()
    assert not list(site.glob("__editable__*edgelora*"))


def test_commands_in_a_folder_holding_another_edgelora_folder(tmp_path):
    """A folder with its own ``edgelora/`` (a stale checkout without the runtime) does not shadow
    the installed package in the planner's and the benchmark's child processes."""
    script = Path(sys.executable).with_name("edgelora")
    if not script.is_file():
        pytest.skip(f"the edgelora command is not installed beside {sys.executable}")
    (tmp_path / "edgelora").mkdir()
    (tmp_path / "edgelora" / "__init__.py").write_text("raise ImportError('the wrong edgelora')\n")
    env = dict(os.environ, EDGELORA_HOME=str(tmp_path / "home"))  # nothing measured yet: the planner's child runs
    demo = subprocess.run([str(script), "demo", "--workdir", str(tmp_path / "work")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "edgelora plan:" in demo.stdout and "runtime itself" in demo.stdout
    bench = subprocess.run([str(script), "bench", str(tmp_path / "work" / "demo-llama-nf4"), "--prompt-tokens", "16",
                            "--decode-tokens", "8", "--threads", "1", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert '"decode_tokens_per_second"' in bench.stdout
