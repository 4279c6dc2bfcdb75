"""``edgelora demo`` (the README's first command): it converts the packaged model, tells a story,
answers a question, and then swaps the packaged LoRA adapters on the resident base, each of which
must visibly change the answer the way it was trained to (scripts/train_demo_adapters.py)."""

from __future__ import annotations

import re

import edgelora
from edgelora.cli import main
from edgelora.demo import packaged_demo_adapters


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bundle:" in out and "checksums     ok" in out
    assert "The ball is red." in out  # the base model's greedy answer
    answers = dict(re.findall(r"^  \[(\S+)\s+switched in [0-9.]+ ms\] (.*)$", out, re.M)[:4])
    assert set(answers) == {"base", "pirate", "shout", "pirate=0.5,shout=0.5"}
    assert answers["base"] == "The ball is red."
    assert answers["pirate"].startswith("Arr!") and "matey" in answers["pirate"]
    assert answers["shout"].startswith("HEY!") and answers["shout"].endswith("!!!")
    assert len(set(answers.values())) == 4  # the mix is neither adapter nor the base
    plans = re.findall(r"^  (\S+)\s+\d+ MB\s+[0-9.]+ MB  (yes|no)\s", out, re.M)  # every profile planned
    assert {d for d, _ in plans} >= {"raspberry-pi-4-4gb", "voxl2-qrb5165", "arm64-board-2gb"}
    assert all(fits == "yes" for _, fits in plans)  # the 0.9M-parameter demo fits every device
    # it ends by training an adapter on the spot, handed to the running model: held-out questions in its style
    trained = re.findall(r"^  \[(base |robot)\] (.*)$", out, re.M)
    assert [who for who, _ in trained] == ["base ", "robot"] * 2
    assert all(a.startswith("Beep boop!") != (who == "base ") for who, a in trained), trained
    assert (tmp_path / "robot-adapter" / "adapter_model.safetensors").is_file()

    # a second run reuses the bundle and gives the same answers
    assert main(["demo", "--workdir", str(tmp_path), "-q"]) == 0
    again = capsys.readouterr().out
    assert "using the bundle converted earlier" in again
    assert dict(re.findall(r"^  \[(\S+)\s+switched in [0-9.]+ ms\] (.*)$", again, re.M)[:4]) == answers


def test_packaged_adapters_fit_the_packaged_model():
    """Both adapters are all-linear LoRA for the packaged model, checked tensor by tensor."""
    import json
    from edgelora.adapters import read_adapter
    from edgelora.config import ModelArgs
    from edgelora.demo import packaged_demo_model
    args = ModelArgs.from_dict(json.loads((packaged_demo_model() / "config.json").read_text()))
    paths = packaged_demo_adapters()
    assert sorted(paths) == ["pirate", "shout"]
    for path in paths.values():
        adapter = read_adapter(path, args)
        assert len(adapter.pairs) == 7 * args.num_hidden_layers
        info = edgelora.describe_adapter(path)
        assert info["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
