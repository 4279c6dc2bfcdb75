"""Compiled kernels live in the user's cache folder (never the package), the first use says so in one
line on a terminal, ``edgelora warmup`` compiles ahead, and a loaded model compiles nothing while
it generates (no speed it reports includes compiling)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from conftest import demo_bundle_path

import edgelora

NOTICE = "compiling kernels for this CPU"


def _run_with_terminal(args, env) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``args`` with stderr on a pseudo-terminal (as a person watching would have it)."""
    master, slave = pty.openpty()
    try:
        r = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=900)
        os.close(slave)
        slave = None
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        return r, b"".join(chunks).decode(errors="replace")
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)


def test_kernels_are_cached_in_the_home_folder_or_numba_cache_dir(tmp_path):
    code = ("import edgelora.runtime.kernels as k, edgelora.converters.nf4 as q\n"
            "print(k._nf4_dequant_rows._cache._cache_path); print(q.__file__)\n"
            "print([f for f in vars(q).values() if hasattr(f, '_cache')][0]._cache._cache_path)")
    env = dict(os.environ, EDGELORA_HOME=str(tmp_path / "home"))
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    runtime_dir, nf4_file, nf4_dir = out.stdout.split()
    kernels = tmp_path / "home" / "kernels"
    for d in (runtime_dir, nf4_dir):
        assert Path(d).parent.parent == kernels, d
        assert Path(d).parent.name.startswith(f"edgelora-{edgelora.__version__}-") and "-numba-" in d
    assert not Path(nf4_dir).is_relative_to(Path(nf4_file).parent)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")  # the user's own choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[0].startswith(str(tmp_path / "numba"))


GENERATE = r"""
import json, sys
import numba
import edgelora
from numba.core.registry import CPUDispatcher

def compiled():  # kernels compiled (not loaded from the cache) so far, per kernel of every edgelora module
    return {f"{name}.{n}": sum(f.stats.cache_misses.values()) for name, m in list(sys.modules.items())
            if name.startswith("edgelora") and m is not None for n, f in vars(m).items() if isinstance(f, CPUDispatcher)}

model = edgelora.load(sys.argv[1], threads=int(sys.argv[2]), adapters=json.loads(sys.argv[3]))
before = compiled()
model.generate("Once upon a time", max_new_tokens=6, temperature=0)
model.generate(list(range(3, 60)), max_new_tokens=3, temperature=0)  # the tile path
model.generate_batch(["Hi", "Once"], adapters=[None, next(iter(model.adapters.names))], max_new_tokens=4)
after = compiled()
print(json.dumps({"load": {k: v for k, v in before.items() if v},
                  "generate": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}}))
"""


def test_warmup_compiles_ahead_and_a_loaded_model_compiles_nothing_while_generating(tmp_path):
    from conftest import demo_adapter_paths
    bundle = demo_bundle_path()
    env = dict(os.environ, EDGELORA_HOME=str(tmp_path / "home"))
    env.pop("NUMBA_CACHE_DIR", None)
    threads = str(min(2, os.cpu_count() or 1))
    first, tty = _run_with_terminal([sys.executable, "-m", "edgelora", "warmup", str(bundle), "--threads", threads,
                                     "--json"], env)
    assert first.returncode == 0, tty
    assert NOTICE in tty  # the first use says so, on the terminal
    report = json.loads(first.stdout)
    assert report["seconds"] > 0 and Path(report["kernel_cache"]).is_relative_to(tmp_path / "home" / "kernels")
    assert list(Path(report["kernel_cache"]).rglob("*.nbi"))

    adapters = json.dumps({"pirate": demo_adapter_paths()["pirate"]})
    again, tty = _run_with_terminal([sys.executable, "-c", GENERATE, str(bundle), threads, adapters], env)
    assert again.returncode == 0, tty
    assert NOTICE not in tty  # compiled already: loads from the cache, silently
    # nothing compiled, neither while loading nor while generating: every kernel it runs is cached (a
    # kernel Numba cannot cache, e.g. one that calls numba.get_num_threads(), compiles in every process)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"load": {}, "generate": {}}

    other = dict(env, EDGELORA_HOME=str(tmp_path / "other-home"))  # a machine where nothing is compiled yet:
    cold, tty = _run_with_terminal([sys.executable, "-c", GENERATE, str(bundle), threads, adapters], other)
    assert cold.returncode == 0, tty
    assert NOTICE in tty  # load compiles after the notice ...
    assert json.loads(cold.stdout.strip().splitlines()[-1])["generate"] == {}  # ... so the generation compiles nothing
