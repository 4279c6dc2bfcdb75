"""Nothing lost: ``edgelora convert`` and ``edgelora deploy`` killed (SIGKILL) at random moments
leave either the complete old output or no output at all, never a half-written folder that loads.

Each run is a fresh ``edgelora`` process killed after a random delay spread over the time a whole
run takes (measured first), with and without an old output to replace."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelora.bundle import Bundle
from edgelora.deployment import open_deploy
from edgelora.errors import EdgeLoraError

from conftest import demo_adapter_paths, demo_bundle_path

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
CLI = [sys.executable, "-c", "import sys; from edgelora.cli import main; sys.exit(main())"]


def _run(args, delay: float | None) -> int | None:
    """Run the CLI; kill it after ``delay`` seconds (None: let it finish). Its exit code or None."""
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if delay is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return 0
    try:
        proc.wait(timeout=delay)
        return proc.returncode  # finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _state(out: Path, opener) -> str:
    """'absent', or the identity of the complete output that is there (its manifest's sha256s);
    fails the test if something is there that does not open and verify completely."""
    if not out.exists():
        return "absent"
    try:
        opener(out)
    except EdgeLoraError as e:
        pytest.fail(f"a killed run left a folder that does not verify: {e}")
    return json.dumps(json.loads((out / "manifest.json").read_text())["files"], sort_keys=True)


def _kill_trials(make_args, out: Path, opener, trials: int, seed: int):
    """Kill runs at random moments; check the output each time; returns the kinds of outcome seen."""
    t0 = time.perf_counter()
    _run(make_args(overwrite=False), None)  # a complete first output, and how long a run takes
    full = time.perf_counter() - t0
    old = _state(out, opener)
    assert old != "absent"
    rng = random.Random(seed)
    seen = set()
    for i in range(trials):
        replacing = i % 2 == 0
        if not replacing:
            shutil.rmtree(out, ignore_errors=True)
        before = _state(out, opener)
        code = _run(make_args(overwrite=replacing), rng.uniform(0.05, full * 1.1))
        after = _state(out, opener)
        if code is None:  # killed: whatever is there verified completely (_state), old or new
            seen.add("killed-" + ("old" if after == before else "absent" if after == "absent" else "new"))
        else:
            assert code == 0 and after != "absent"
            seen.add("finished")
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        for name in leftovers:  # temporary siblings a kill leaves are hidden and never look like an output
            assert ".tmp-" in name or ".old-" in name, name
        if after == "absent":
            _run(make_args(overwrite=False), None)  # an old output again for the next trial
    return seen


def test_convert_killed_at_random_points(tmp_path):
    src = tmp_path / "ckpt"
    from edgelora.demo import demo_checkpoint
    shutil.copytree(demo_checkpoint(tmp_path / "w"), src)
    out = tmp_path / "bundle"

    def args(overwrite):
        return ["convert", str(src), "-o", str(out), "-q"] + (["--overwrite"] if overwrite else [])

    seen = _kill_trials(args, out, lambda p: Bundle(p, verify="full").close(), trials=12, seed=1)
    assert any(s.startswith("killed") for s in seen), seen


def test_deploy_killed_at_random_points(tmp_path):
    bundle = demo_bundle_path()
    out = tmp_path / "deploy"
    adapters = sum((["--adapter", f"{n}={p}"] for n, p in demo_adapter_paths().items()), [])
    from edgelora.devices.planner import measure_runtime_overhead
    measure_runtime_overhead(os.cpu_count() or 1)  # measured once, before the timed runs

    def args(overwrite):
        return ["deploy", str(bundle), "--device", "x86-64-laptop", "--context", "128", "-o", str(out),
                *adapters] + (["--overwrite"] if overwrite else [])

    seen = _kill_trials(args, out, lambda p: open_deploy(p, verify="full", device_check=False), trials=12, seed=2)
    assert any(s.startswith("killed") for s in seen), seen
