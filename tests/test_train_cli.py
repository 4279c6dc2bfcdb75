"""``edgelora train`` on the command line: help, the dry run, errors (as JSON too), the summary, and
SIGKILL at random moments leaving the last complete checkpoint, from which ``--resume`` ends with
the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgelora
from edgelora.cli import main
from edgelora.training import checkpoint_dirs, load_checkpoint

from tiny_models import Converted

CLI = [sys.executable, "-c", "import sys; from edgelora.cli import main; sys.exit(main())"]
LINES = [{"prompt": "the cat sat on", "completion": " the mat ."},
         {"prompt": "a dog", "completion": " ran to the park . the dog sat"},
         {"prompt": "the", "completion": " cat"},
         {"text": "the dog ran to the mat . a cat sat"},
         {"prompt": "a cat ran to", "completion": " the park"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Converted(tmp_path_factory, seed=7, bundle_name="nf4")("llama3")[1]


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return p


def test_help_lists_every_option_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--data", "--output", "--rank", "--alpha", "--targets", "--rslora", "--dropout", "--lr", "--epochs",
                "--steps", "--batch-tokens", "--grad-accum", "--max-length", "--seed", "--resume", "--eval",
                "--eval-every", "--save-every", "--threads", "--dry-run", "--json", "--recompute"):
        assert opt in out, opt
    assert "example:\n  edgelora train" in out and "(default: 16)" in out


def test_dry_run_prints_counts_and_the_mask(tiny, data, tmp_path, capsys):
    assert main(["train", str(tiny), "--data", str(data), "-o", str(tmp_path / "ad"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 lines -> 5 examples" in out and "[[the cat sat on]] the mat . </s>" in out
    assert not (tmp_path / "ad").exists()
    assert main(["train", str(tiny), "--data", str(data), "-o", str(tmp_path / "ad"), "--dry-run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["data"]["examples"] == 5 and d["data"]["trained_tokens"] > 0 and d["total_steps"] == 1


def test_errors_name_the_line_and_come_as_json(tiny, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + "{oops\n")
    assert main(["train", str(tiny), "--data", str(bad), "-o", str(tmp_path / "ad")]) == 3
    assert f"{bad}:6: not JSON" in capsys.readouterr().err
    assert main(["train", str(tiny), "--data", str(data), "-o", str(tmp_path / "ad"), "--targets", "qkv",
                 "--json"]) == 2
    err = json.loads(capsys.readouterr().out.splitlines()[0])["error"]
    assert err["type"] == "UsageError" and "target 'qkv'" in err["message"]
    assert main(["train", str(tiny), "--data", str(data), "-o", str(tmp_path / "ad"), "--steps", "2",
                 "--epochs", "1"]) == 2
    assert main(["train", str(tiny), "--data", str(data), "-o", str(tmp_path / "ad"), "--eval-every", "2"]) == 2
    assert not (tmp_path / "ad").exists()


def test_train_prints_a_summary_and_the_command_to_try_it(tiny, data, tmp_path, capsys):
    out = tmp_path / "mine"
    assert main(["train", str(tiny), "--data", str(data), "-o", str(out), "--steps", "2", "--rank", "2",
                 "--eval", str(data), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 steps" in text and "eval loss" in text
    assert f"edgelora chat {tiny} --adapter mine={out}" in text
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "loss_curve.json", "loss_curve.svg"}
    assert main(["run", str(tiny), "--adapter", f"mine={out}", "-p", "the cat", "-n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == "mine"


def _run(args, delay):
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if delay is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return 0
    try:
        proc.wait(timeout=delay)
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_leaves_the_last_complete_checkpoint_and_resume_ends_the_same(tiny, data, tmp_path):
    common = ["--data", str(data), "--steps", "14", "--save-every", "1", "--rank", "4", "--lr", "1e-2",
              "--batch-tokens", "16", "--dropout", "0.1", "--threads", "1", "-q"]
    whole = tmp_path / "whole"
    t0 = time.perf_counter()
    _run(["train", str(tiny), "-o", str(whole)] + common, None)
    full = time.perf_counter() - t0
    out = tmp_path / "cut"
    rng = random.Random(0)
    steps_seen = []
    for attempt in range(3):
        resume = ["--resume"] if checkpoint_dirs(out) else (["--overwrite"] if out.exists() else [])
        rc = _run(["train", str(tiny), "-o", str(out)] + common + resume, rng.uniform(0.3, 1.0) * full)
        found = checkpoint_dirs(out)
        assert len(found) <= 2  # the newest, and at most the one before it while being removed
        for step, folder in found:  # every checkpoint that is there is complete
            state, tensors, moments = load_checkpoint(folder)
            assert state["step"] == step and len(tensors) == 2 * 7 * 2 and len(moments) == 2 * len(tensors)
            edgelora.load(tiny, max_context=64).adapters.load("c", folder)
        assert not [p for p in out.iterdir() if p.name.startswith("checkpoint-") and p not in dict(found).values()]
        steps_seen.append(found[-1][0] if found else 0)
        if rc == 0:
            break
    resume = ["--resume"] if checkpoint_dirs(out) else ["--overwrite"]
    _run(["train", str(tiny), "-o", str(out)] + common + resume, None)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), (name, steps_seen)
    a = json.loads((out / "loss_curve.json").read_text())["steps"]
    b = json.loads((whole / "loss_curve.json").read_text())["steps"]
    assert [s["loss"] for s in a] == [s["loss"] for s in b]
