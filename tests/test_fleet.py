"""edgelora fleet on a real local Ray cluster (one per module): 2 tiny bases x 3 adapters x 3
device groups built and evaluated; every deploy folder verifies and equals a manual ``convert`` +
``deploy`` byte for byte (both with ``SOURCE_DATE_EPOCH`` set: the same time stamps); a second build reuses
everything; changing one adapter rebuilds exactly its dependants; a worker killed mid-task is
retried by Ray with the same result, and without retries its item fails leaving nothing behind
and the next build resumes; an adapter made for another base fails its own check while the rest
is built; the fleet file checker reports every problem by table and key; the report renders in
headless Chromium with its charts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import edgelora  # noqa: E402
import edgelora.fleet  # noqa: E402
from edgelora.cli import main  # noqa: E402
from edgelora.deployment import open_deploy, unpack  # noqa: E402
from edgelora.fleet.spec import FleetFileError, read_fleet  # noqa: E402
from tiny_models import make_adapter, make_checkpoint  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
OVERHEAD = 100_000_000  # the runtime's bytes, given so that no test measures it
ADAPTER = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
DATA = [{"prompt": "the cat sat", "completion": " on the mat ."},
        {"prompt": "the dog ran", "completion": " to the park ."},
        {"prompt": "a cat ran to", "completion": " the mat ."}]


EPOCH = "1767225600"  # SOURCE_DATE_EPOCH for the fleet's workers and the manual runs alike


@pytest.fixture(scope="module")
def cluster(compiled):
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", EPOCH)  # before ray.init: the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


def fleet_text(adapters: dict, groups: dict, evals: bool = True, bases=("alpha", "beta")) -> str:
    lines = [f'[bases.{b}]\nsource = "src/{b}"\n' for b in bases]
    lines += [f'[adapters.{n}]\npath = "adapters/{folder}"\nbase = "{base}"\n' for n, (folder, base) in adapters.items()]
    for name, (profile, members) in groups.items():
        lines.append(f'[devices.{name}]\nprofile = "{profile}"\ncontext = 64\noverhead = {OVERHEAD}\n'
                     f'adapters = {json.dumps(members)}\n')
    if evals:
        lines.append('[eval.qa]\ndata = "eval/qa.jsonl"\n\n[eval.text]\ntext = "eval/text.txt"\nadapters = ["a1", "b1"]\n')
        lines.append('[evaluation]\ncontext = 64\nsamples = 1\nprompts = ["the cat"]\nmax_new_tokens = 4\n')
    return "\n".join(lines)


ADAPTERS = {"a1": ("a1", "alpha"), "a2": ("a2", "alpha"), "b1": ("b1", "beta")}
GROUPS = {"boards": ("arm64-board-2gb", ["a1", "a2"]), "pis": ("raspberry-pi-4-4gb", ["a1"]),
          "laptops": ("x86-64-laptop", ["b1"])}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return make_fleet(tmp_path_factory.mktemp("fleet"))


def make_fleet(d: Path) -> Path:
    """A fleet folder: two tiny bases of different shapes, three adapters, evaluation data."""
    make_checkpoint(d / "src" / "alpha", "llama3", seed=1)
    make_checkpoint(d / "src" / "beta", "llama_untied", seed=2)
    make_adapter(d / "src" / "alpha", d / "adapters" / "a1", seed=3, **ADAPTER)
    make_adapter(d / "src" / "alpha", d / "adapters" / "a2", seed=4, **ADAPTER)
    make_adapter(d / "src" / "beta", d / "adapters" / "b1", seed=5, **ADAPTER)
    (d / "eval").mkdir()
    (d / "eval" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA))
    (d / "eval" / "text.txt").write_text("the cat sat on the mat . the dog ran to the park . " * 3)
    (d / "fleet.toml").write_text(fleet_text(ADAPTERS, GROUPS))
    return d


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The converter's and the runtime's kernels compiled once here, before the workers start
    (else each worker compiles them at the same time; in the whole suite earlier tests did it)."""
    d = tmp_path_factory.mktemp("warm")
    make_checkpoint(d / "src", "llama3", seed=0)
    edgelora.convert(d / "src", d / "bundle")
    edgelora.load(d / "bundle", threads=1, max_context=64)


@pytest.fixture(scope="module")
def first(fleet, cluster):
    out = fleet / "out"
    return out, edgelora.fleet.build(fleet / "fleet.toml", out)


def assert_same_folder(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` byte for byte the same."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_a_group_with_a_float32_kv_cache(fleet, first, tmp_path):
    """``kv_cache = "float32"`` in a device group: its deploy folder is ``edgelora deploy --kv-cache
    float32``'s, byte for byte, and the group's key differs from the same group's with the default
    float16 cache (whose key names it: a float32 group keeps the key of folders built before the
    cache was planned, which held float32)."""
    text = fleet_text({"a1": ("a1", "alpha")}, {"pis": ("raspberry-pi-4-4gb", ["a1"])}, evals=False, bases=("alpha",))
    (fleet / "f32.toml").write_text(text.replace("[devices.pis]\n", '[devices.pis]\nkv_cache = "float32"\n'))
    out = tmp_path / "out"
    r = edgelora.fleet.build(fleet / "f32.toml", out)
    assert r.ok, r.text()
    report = json.loads((out / "report.json").read_text())
    folder = out / report["devices"]["pis"]["folder"]
    assert open_deploy(folder, verify="full", device_check=False).kv_cache == "float32"
    manual = edgelora.deploy(out / report["bases"]["alpha"]["bundle"], "raspberry-pi-4-4gb", tmp_path / "manual",
                             adapters={"a1": fleet / "adapters" / "a1"}, context=64, overhead=OVERHEAD,
                             kv_cache="float32")
    assert_same_folder(folder, manual.path)
    # the main fleet's "pis" group is this one with the default float16 cache
    main = json.loads((first[0] / "report.json").read_text())["devices"]["pis"]
    assert main["key"] != report["devices"]["pis"]["key"]
    assert open_deploy(first[0] / main["folder"], verify=False, device_check=False).kv_cache == "float16"


def test_fleet_builds_and_equals_manual_convert_and_deploy(fleet, first, tmp_path):
    out, r = first
    assert r.ok, r.text()
    assert r.counts == {"built": 2 + 3 + 3 + 3, "reused": 0, "failed": 0, "skipped": 0}
    report = json.loads((out / "report.json").read_text())
    for base in ("alpha", "beta"):
        mine = out / report["bases"][base]["bundle"]
        edgelora.convert(fleet / "src" / base, tmp_path / base)
        assert_same_folder(mine, tmp_path / base)
        assert report["bases"][base]["weights"] and report["bases"][base]["summary"]["parameters"] > 0
    for name, (profile, members) in GROUPS.items():
        g = report["devices"][name]
        folder = out / g["folder"]
        open_deploy(folder, verify="full", device_check=False)
        base = "beta" if members == ["b1"] else "alpha"
        (tmp_path / "manual").mkdir(exist_ok=True)
        manual = edgelora.deploy(out / report["bases"][base]["bundle"], profile, tmp_path / "manual" / name,
                                 adapters={m: fleet / "adapters" / m for m in members}, context=64, overhead=OVERHEAD)
        assert_same_folder(folder, manual.path)
        assert g["fits"] and g["context"] == 64 and g["max_context"] >= 64
        from edgelora.atomic import sha256_file
        assert sha256_file(out / g["archive"]) == g["archive_sha256"]
        (tmp_path / "unpacked").mkdir(exist_ok=True)
        assert_same_folder(unpack(out / g["archive"], tmp_path / "unpacked" / name), folder)
    for name in ADAPTERS:
        ev = report["adapters"][name]["eval"]
        qa = ev["sets"]["qa"]
        assert qa["base"]["answer_tokens"] == qa["adapter"]["answer_tokens"] > 0
        assert qa["base"]["answer_loss"] != qa["adapter"]["answer_loss"]  # the adapter changes the model
        assert ("text" in ev["sets"]) == (name != "a2")
        assert ev["samples"] and ev["samples"][0]["prompt"] == "the cat"
    # the evaluation is the library's: the same figures as edgelora.evaluate on the bundle
    ref = edgelora.evaluate(out / report["bases"]["alpha"]["bundle"], data=fleet / "eval" / "qa.jsonl",
                            adapters={"a1": fleet / "adapters" / "a1"}, max_context=64)
    assert ref.answer_loss == pytest.approx(report["adapters"]["a1"]["eval"]["sets"]["qa"]["adapter"]["answer_loss"],
                                            rel=1e-6)


def test_second_build_reuses_everything(fleet, first, capsys):
    out, _ = first
    assert main(["fleet", "build", str(fleet / "fleet.toml"), "-o", str(out), "--json", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["built"], d["reused"], d["failed"]) == (0, 11, 0)
    assert main(["fleet", "status", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["up_to_date"] and st["built"] == 11


def test_changing_one_adapter_rebuilds_exactly_its_dependants(fleet, first, capsys):
    out, _ = first
    folder = fleet / "adapters" / "a2"
    shutil.rmtree(folder)
    make_adapter(fleet / "src" / "alpha", folder, seed=40, **ADAPTER)
    assert main(["fleet", "status", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    stale = {i for i, r in st["items"].items() if r["status"] == "stale"}
    assert stale == {"check:a2", "eval:a2", "deploy:boards"}
    r = edgelora.fleet.build(fleet / "fleet.toml", out)
    built = {i for i, x in r.items.items() if x["status"] == "built"}
    assert built == {"check:a2", "eval:a2", "deploy:boards"} and r.counts["reused"] == 8 and r.ok
    assert len(list((out / "store" / "deploy").iterdir())) == 3  # the old boards folder was removed


def test_killed_worker_is_retried_and_without_retries_nothing_partial_is_left(fleet, first, tmp_path):
    (fleet / "one.toml").write_text(fleet_text({"a1": ("a1", "alpha")}, {"pis": ("raspberry-pi-4-4gb", ["a1"])},
                                               evals=False, bases=("alpha",)))
    marker = tmp_path / "killed"

    def kill_once(kind, name, stage):  # a worker dies with its output complete but not yet in place
        if kind == "base" and stage == "written" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), 9)

    out = tmp_path / "out"
    r = edgelora.fleet.build(fleet / "one.toml", out, max_retries=0, task_hook=kill_once)
    assert marker.exists() and r.items["base:alpha"]["status"] == "failed"
    assert "worker" in r.items["base:alpha"]["error"]["message"].lower()
    assert r.items["deploy:pis"]["status"] == "skipped" and not r.ok
    assert [p.name for p in (out / "store" / "base").iterdir() if not p.name.startswith(".")] == []
    assert json.loads((out / "report.json").read_text())["bases"]["alpha"]["status"] == "failed"
    r = edgelora.fleet.build(fleet / "one.toml", out)  # resumes
    assert r.ok and r.counts["built"] == 3
    assert not [p for p in (out / "store" / "base").iterdir() if p.name.startswith(".")]  # the dead one's removed
    marker.unlink()
    again = tmp_path / "again"
    r2 = edgelora.fleet.build(fleet / "one.toml", again, max_retries=2, task_hook=kill_once)
    assert marker.exists() and r2.ok and r2.counts["built"] == 3  # retried by Ray
    a = json.loads((out / "report.json").read_text())
    b = json.loads((again / "report.json").read_text())
    assert_same_folder(out / a["bases"]["alpha"]["bundle"], again / b["bases"]["alpha"]["bundle"])
    assert a["bases"]["alpha"]["key"] == b["bases"]["alpha"]["key"]
    assert a["devices"]["pis"]["key"] == b["devices"]["pis"]["key"]
    open_deploy(again / b["devices"]["pis"]["folder"], verify="full", device_check=False)


def test_adapter_for_another_base_fails_alone(fleet, first, tmp_path):
    adapters = {**ADAPTERS, "wrong": ("b1", "alpha")}  # beta's adapter declared for alpha
    groups = {**GROUPS, "mixed": ("x86-64-laptop", ["a1", "wrong"])}
    (fleet / "wrong.toml").write_text(fleet_text(adapters, groups, evals=False))
    out = tmp_path / "out"
    r = edgelora.fleet.build(fleet / "wrong.toml", out)
    assert r.items["check:wrong"]["status"] == "failed"
    assert r.items["check:wrong"]["error"]["type"] == "AdapterMismatchError"
    assert r.items["deploy:mixed"]["status"] == "skipped"
    assert r.counts == {"built": 2 + 3 + 3, "reused": 0, "failed": 1, "skipped": 1}
    report = json.loads((out / "report.json").read_text())
    assert report["adapters"]["wrong"]["check"]["status"] == "failed" and not report["ok"]
    assert "another base" in report["adapters"]["wrong"]["check"]["error"]["message"] or \
        report["adapters"]["wrong"]["check"]["error"]["message"]
    assert main(["fleet", "build", str(fleet / "wrong.toml"), "-o", str(out), "-q"]) == 3  # the check's exit code


def test_fleet_file_errors_are_all_reported_by_table_and_key(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "fleet.toml").write_text("""
[bases.demo]
source = "src"
block_size = 48
colour = "red"

[bases.nowhere]
source = "./missing"

[adapters.pirate]
path = "src"
base = "x"

[devices.pi]
profile = "no-such-device"
adapters = ["ghost"]
kv_cache = "int4"

[eval.both]
data = "a.jsonl"
text = "b.txt"

[evaluation]
samples = -1

[extra]
""")
    with pytest.raises(FleetFileError) as e:
        read_fleet(tmp_path / "fleet.toml")
    msg = str(e.value)
    for line in ['[bases.demo] block_size = 48: must be one of 32, 64, 128, 256',
                 '[bases.demo] colour = "red": unknown key',
                 '[bases.nowhere] source = "./missing": no such file or folder',
                 '[adapters.pirate] path = "src": not a PEFT adapter folder',
                 '[adapters.pirate] base = "x": no base named x',
                 '[devices.pi] adapters = ["ghost"]: no adapter named ghost',
                 '[devices.pi] profile = "no-such-device": no device profile named \'no-such-device\'',
                 '[eval.both]: give exactly one of data',
                 '[devices.pi] kv_cache = "int4": must be one of float32, float16',
                 '[evaluation] samples = -1: must be at least 0',
                 '[extra]: unknown table']:
        assert line in msg, line
    assert msg.startswith(f"{tmp_path / 'fleet.toml'}: 11 problems:")
    assert e.value.exit_code == 3
    (tmp_path / "bad.toml").write_text("[bases\n")
    with pytest.raises(FleetFileError, match="not valid TOML"):
        read_fleet(tmp_path / "bad.toml")


def test_import_does_not_need_ray(tmp_path, monkeypatch):
    code = "import sys, edgelora.fleet, edgelora.cli; edgelora.cli.build_parser(); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    from edgelora.fleet.runner import import_ray
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(edgelora.EdgeLoraError, match=r"pip install 'edgelora\[fleet\]'"):
        import_ray()


def test_report_renders_in_headless_chromium(first, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: the report page is not rendered")
    out, _ = first
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (out / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "<h1>Fleet " in dom
    for chart, bars in (("memory-chart", 2 * 3), ("loss-chart", 2 * 5)):  # 3 groups; 3 qa + 2 text sets
        start = dom.index(f'id="{chart}"')
        svg = dom[start:dom.index("</svg>", start)]
        assert svg.count('class="bar"') == bars, chart
    assert "http://" not in dom.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
