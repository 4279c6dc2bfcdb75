"""Device profiles, the memory planner, deploy folders and archives.

The planner is checked against what really happens: its total against the peak RSS of real runs
of the same plan (fresh processes, context filled to the end), its KV cache and adapter items
against the runtime's own arrays. Deploy folders are checked for tampering (one byte of any file),
for enforcement of their plan, and archives for members that would escape the output folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.cli import main
from edgelora.deployment import deploy, open_deploy, unpack
from edgelora.devices.planner import kv_cache_bytes, measure_peak_rss, plan
from edgelora.devices.profiles import Device, get_device, host_arch, list_devices
from edgelora.errors import ChecksumError, FormatError, PlanError, UsageError
from edgelora.runtime import int8 as I8

from conftest import ROOT, demo_adapter_paths, demo_bundle_path
from tiny_models import make_checkpoint

SHIPPED = ["android-phone-8gb", "arm64-board-2gb", "jetson-orin-nano-8gb", "raspberry-pi-4-4gb",
           "raspberry-pi-5-8gb", "voxl2-qrb5165", "x86-64-laptop"]


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------

def test_shipped_profiles():
    devices = list_devices()
    assert set(SHIPPED) <= set(devices)
    for name in SHIPPED:
        d = devices[name]
        assert d.sources and all(s.startswith("http") for s in d.sources), name
        assert 0 < d.budget_bytes <= d.ram_bytes
        assert d.arch == ("x86_64" if name == "x86-64-laptop" else "aarch64")
        assert Device.from_dict(__import__("tomllib").loads(d.to_toml())) == d  # round trip
    assert devices["raspberry-pi-4-4gb"].ram_mib == 4096 and devices["raspberry-pi-4-4gb"].cores == 4


def test_user_profile_added_and_listed(capsys):
    folder = Path(os.environ["EDGELORA_HOME"]) / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my-board.toml").write_text('name = "my-board"\narch = "arm64"\ncores = 2\nram_mib = 1024\n'
                                          'app_share = 0.5\ntitle = "my board"\n')
    try:
        assert get_device("my-board").arch == "aarch64"
        assert main(["devices"]) == 0
        assert "my-board" in capsys.readouterr().out
        (folder / "broken.toml").write_text('name = "broken"\narch = "mips"\ncores = 1\nram_mib = 64\napp_share = 1\n')
        with pytest.raises(FormatError, match="broken.toml.*arch"):
            list_devices()
    finally:
        for p in folder.glob("*.toml"):
            p.unlink()


@pytest.mark.parametrize("bad", ['name = "x"', 'name = "x"\narch = "aarch64"\ncores = 0\nram_mib = 64\napp_share = 1',
                                 'name = "x"\narch = "aarch64"\ncores = 1\nram_mib = 64\napp_share = 1.5',
                                 'name = "../x"\narch = "aarch64"\ncores = 1\nram_mib = 64\napp_share = 1',
                                 'not toml [', '\xff'])
def test_bad_profiles_are_format_errors(tmp_path, bad):
    p = tmp_path / "bad.toml"
    p.write_bytes(bad.encode("utf-8", "surrogateescape") if bad != '\xff' else b"\xff\xfe")
    with pytest.raises(FormatError, match="bad.toml"):
        Device.from_file(p)


# ---------------------------------------------------------------------------------------------
# the planner against the runtime
# ---------------------------------------------------------------------------------------------

def test_plan_items_are_the_runtimes_arrays():
    bundle = demo_bundle_path()
    adapters = demo_adapter_paths()
    p = plan(bundle, "x86-64-laptop", context=300, adapters=adapters, threads=1)
    model = edgelora.load(bundle, max_context=300, adapters=adapters, threads=1)
    items = {i.name: i.bytes for i in p.items}
    assert items["KV cache"] == model.net.new_cache().nbytes == kv_cache_bytes(model.args, 300)
    for name in adapters:
        assert items[f"adapter {name}"] == model.adapters[name].nbytes
    # the default int8 products copy the float16 head as int8 and let its mapped pages go; on the
    # profile's x86-64 CPU with AVX2 they repack the NF4 weights as tiles and let theirs go too (as
    # this machine's runtime does where it has AVX2)
    f16 = model.net.w.head.weight
    assert f16.dtype == np.float16
    lins = [(m + ".weight", getattr(L, f)) for i, L in enumerate(model.net.w.layers)
            for f, m in model.net.names[i].items()]
    stored = sum(model.bundle.weights.tensors[key].nbytes for name, _ in lins
                 for key in model.bundle.storage(name).keys(name))
    assert items["weights"] == (Path(bundle) / "model.safetensors").stat().st_size - f16.nbytes - stored
    assert items["head as int8"] == model.net.w.head.resident_nbytes > 0
    if I8.TILED:
        assert items["weights as tiles"] == sum(lin.resident_nbytes for _, lin in lins) > 0
    assert p.fits and p.max_context == model.args.max_position_embeddings
    pi = {i.name: i.bytes for i in plan(bundle, "raspberry-pi-4-4gb", context=300, threads=1).items}
    assert "weights as tiles" not in pi and pi["weights"] == items["weights"] + stored  # aarch64: the mapped codes


def _peak_rss(bundle, ctx, adapters=()) -> int:
    return measure_peak_rss(bundle, ctx, dict(a.split("=", 1) for a in adapters), threads=1, timeout=600)


@pytest.fixture(scope="module")
def small_50m(tmp_path_factory) -> Path:
    """A random model with the shape of a small real one (42M parameters, 46 MB bundle)."""
    work = tmp_path_factory.mktemp("small50m")
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_random_model.py"), "--shape", "small-50m",
                    "--out", str(work / "src")], check=True, capture_output=True, timeout=600)
    edgelora.convert(work / "src", work / "bundle", progress=False)
    return work / "bundle"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS needs Linux /proc")
def test_plan_total_within_10_percent_of_measured_peak_rss(small_50m, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_lora import make_random_adapter  # a PEFT-format adapter of any shape
    finally:
        sys.path.remove(str(ROOT / "bench"))
    demo = demo_bundle_path()
    adapter = make_random_adapter(tmp_path / "r16", small_50m, r=16)
    cases = [(demo, 64, ()), (demo, 256, ()), (demo, 512, ()),
             (small_50m, 128, ()), (small_50m, 1024, ()), (small_50m, 2048, ()),
             (small_50m, 1024, (f"a={adapter}",))]
    _peak_rss(demo, 16)  # compile anything not yet in Numba's cache (compiling takes more memory)
    _peak_rss(small_50m, 16)
    report = []
    for bundle, ctx, ads in cases:
        measured = _peak_rss(bundle, ctx, ads)
        planned = plan(bundle, "x86-64-laptop", context=ctx, threads=1,
                       adapters=dict(a.split("=", 1) for a in ads)).total_bytes
        report.append((Path(bundle).name, ctx, len(ads), planned / 1e6, measured / 1e6, planned / measured - 1))
    print("\n".join(f"{b} ctx {c} adapters {a}: plan {p:.1f} MB, measured {m:.1f} MB ({e:+.1%})"
                    for b, c, a, p, m, e in report))
    for b, c, a, p, m, e in report:
        assert abs(e) < 0.10, (b, c, a, p, m)


# ---------------------------------------------------------------------------------------------
# refusing, suggesting, deploying, running
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_context_bundle(tmp_path_factory) -> Path:
    """A tiny model with a 131072-position limit: at its full context it does not fit a Pi 4."""
    work = tmp_path_factory.mktemp("longctx")
    make_checkpoint(work / "src", "long_context")
    edgelora.convert(work / "src", work / "bundle", progress=False)
    return work / "bundle"


def test_pi4_refuses_then_suggested_context_deploys_and_runs(long_context_bundle, tmp_path, capsys):
    b = str(long_context_bundle)
    assert main(["plan", b, "--device", "raspberry-pi-4-4gb", "--context", "131072"]) == 6
    out = capsys.readouterr().out
    assert "does not fit" in out and "MB over the budget" in out
    p = plan(b, "raspberry-pi-4-4gb", context=131072)
    assert not p.fits and p.total_bytes > p.budget_bytes == int(4096 * 2 ** 20 * 0.80)
    suggested = p.max_context
    assert f"use --context {suggested}" in out and 1 <= suggested < 131072
    assert plan(b, "raspberry-pi-4-4gb", context=suggested).fits
    assert not plan(b, "raspberry-pi-4-4gb", context=suggested + 1).fits

    # deploy refuses the plan that does not fit, with the numbers, and writes nothing
    assert main(["deploy", b, "--device", "raspberry-pi-4-4gb", "--context", "131072", "-o",
                 str(tmp_path / "no")]) == 6
    err = capsys.readouterr().err
    assert "does not fit raspberry-pi-4-4gb" in err and f"--context {suggested}" in err
    assert not (tmp_path / "no").exists()

    out_dir = tmp_path / "pi4"
    assert main(["deploy", b, "--device", "raspberry-pi-4-4gb", "--context", str(suggested), "-o", str(out_dir)]) == 0
    assert json.loads((out_dir / "manifest.json").read_text())["plan"]["context"] == suggested
    args = ["run", str(out_dir), "-p", "the cat sat", "-n", "5"]
    if host_arch() != "aarch64":  # planned for an aarch64 board: refused here unless asked
        assert main(args) == 6
        assert "planned for raspberry-pi-4-4gb (aarch64)" in capsys.readouterr().err
        args.append("--any-device")
    assert main(args) == 0
    model = edgelora.load(out_dir, device_check=False)
    assert model.max_context == suggested
    assert model.generate("the cat sat", max_new_tokens=5, temperature=0) == \
        edgelora.load(b, max_context=64).generate("the cat sat", max_new_tokens=5, temperature=0)


def test_plan_knows_fused_projections_and_the_runtimes_context_limit(tmp_path):
    """Phi-3: fused qkv/gate_up weights, and a longrope model runs only within its original context."""
    from edgelora.benchmark import bytes_per_token
    make_checkpoint(tmp_path / "src", "phi3_longrope")
    bundle = edgelora.convert(tmp_path / "src", tmp_path / "bundle").output
    model = edgelora.load(bundle, threads=1)
    p = plan(bundle, "host", threads=1)
    assert p.context == p.model_max_context == model.max_context == model.args.original_max_position_embeddings
    assert {i.name: i.bytes for i in p.items}["KV cache"] == model.net.new_cache().nbytes
    with pytest.raises(UsageError, match="context limit"):
        plan(bundle, "host", context=p.context + 1)
    linears = sum(model.net.module(n).nbytes for d in model.net.names for n in d.values())
    assert bytes_per_token(model) > linears > 0
    peak = measure_peak_rss(bundle, p.context, threads=1, timeout=600)
    # never under the measured peak; above it by the runtime's own memory measured on the demo model
    # (a Llama, whose run loads more kernels than this tiny Phi-3's: 16-20 MB of a 184 MB peak, 9-10 %)
    assert 1.0 <= p.total_bytes / peak < 1.12


def test_plan_measure_from_the_cli(capsys):
    bundle = str(demo_bundle_path())
    assert main(["plan", bundle, "--device", "host", "--context", "128", "--threads", "1", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["context"] == 128 and out["threads"] == 1
    assert abs(out["total_bytes"] / out["measured_peak_rss_bytes"] - 1) < 0.10
    assert main(["plan", bundle, "--device", "host", "--context", "128", "--threads", "1", "--measure"]) == 0
    assert "measured on this machine: peak RSS" in capsys.readouterr().out


def test_suggestions_when_nothing_fits_name_what_each_frees(small_50m, tmp_path):
    from edgelora.devices.planner import _float16_savings
    bundle = demo_bundle_path()
    tiny = Device(name="tiny", arch=host_arch(), cores=1, ram_mib=64, app_share=1.0)
    p = plan(bundle, tiny, context=64, adapters=demo_adapter_paths(), threads=1)
    assert not p.fits and p.max_context == 0
    text = "\n".join(p.suggestions)
    assert "even a 1-token context does not fit" in text and "leave out adapters" in text
    # the NF4-embeddings saving is what converting that way really saves: the file's bytes, and the
    # int8 copy of the tied float16 embedding with the pages it lets go (a 32000 x 512 embedding)
    edgelora.convert(small_50m.parent / "src", tmp_path / "nf4", embeddings="nf4", head="nf4", progress=False)
    weights = lambda b: (Path(b) / "model.safetensors").stat().st_size  # noqa: E731
    assert abs(_float16_savings(small_50m) - (weights(small_50m) - weights(tmp_path / "nf4"))) < 4096
    smaller = Device(name="smaller", arch=host_arch(), cores=1, ram_mib=32, app_share=1.0)
    p, q = (plan(b, smaller, context=64, threads=1, overhead=0) for b in (small_50m, tmp_path / "nf4"))
    items = {i.name: i.bytes for i in p.items}
    assert items["head as int8"] > 0 and "head as int8" not in {i.name for i in q.items}
    assert items["weights"] < weights(small_50m)  # the float16 embedding's pages are not counted
    saved = p.total_bytes - q.total_bytes
    assert saved > 1e6 and not p.fits
    assert f"--embeddings nf4 --head nf4: {saved / 1e6:.1f} MB less" in "\n".join(p.suggestions)
    assert "--products exact" not in text  # it keeps the float16 head resident: more, not less
    assert _float16_savings(tmp_path / "nf4") == 0


@pytest.fixture(scope="module")
def demo_deploy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "demo-laptop"
    r = deploy(demo_bundle_path(), "host", out, adapters=demo_adapter_paths(), context=256, archive=True)
    assert r.archive == out.with_name("demo-laptop.tar") and r.plan.fits
    return out


def test_deploy_folder_loads_with_its_plan(demo_deploy):
    m = json.loads((demo_deploy / "manifest.json").read_text())
    assert m["format"] == "edgelora-deploy" and m["edgelora_version"] == edgelora.__version__
    assert set(m["adapters"]) == {"pirate", "shout"}
    for rel in m["files"]:
        assert (demo_deploy / rel).is_file()
    # adapters are stored in float16 and give the same answers as the originals (to float16 rounding)
    from edgelora.safetensors_io import SafetensorsFile
    with SafetensorsFile(demo_deploy / "adapters/pirate/adapter_model.safetensors") as st:
        assert {st.tensors[k].dtype for k in st.keys()} == {"F16"}
    model = edgelora.load(demo_deploy)
    assert model.deployment is not None and model.max_context == 256
    assert model.adapters.names == ["pirate", "shout"]
    question = [{"role": "user", "content": "Tom has a red ball. What colour is the ball?"}]
    assert model.chat(question, max_new_tokens=20, temperature=0, adapter="pirate").startswith("Arr!")
    ref = edgelora.load(demo_bundle_path(), adapters=demo_adapter_paths())
    assert model.chat(question, max_new_tokens=20, temperature=0, adapter="shout") == \
        ref.chat(question, max_new_tokens=20, temperature=0, adapter="shout")

    # the plan is enforced: no larger context, no adapter beyond the planned bytes
    with pytest.raises(PlanError, match="planned for"):
        edgelora.load(demo_deploy, max_context=257)
    with pytest.raises(PlanError, match="memory plan leaves"):
        model.adapters.load("third", demo_adapter_paths()["pirate"])
    model.adapters.unload("shout")  # room again, for an adapter as the folder holds them (float16)
    model.adapters.load("third", demo_deploy / "adapters/shout")
    assert model.adapters["third"].held == "float16"


def test_a_float16_kv_cache_is_planned_deployed_and_loaded(tmp_path, capsys):
    """``kv_cache="float16"`` (the default with the default int8 products; float32 with the exact
    ones): the plan's KV cache is the runtime's float16 cache (half the bytes), the deploy folder
    records it and loads with it, a float32 cache beyond the plan is refused, a folder made before
    the cache was planned holds float32, and a manifest naming another kind is a FormatError."""
    bundle = demo_bundle_path()
    p32, p16 = (plan(bundle, "x86-64-laptop", context=300, threads=1, kv_cache=kv) for kv in ("float32", "float16"))
    k32, k16 = ({i.name: i.bytes for i in p.items}["KV cache"] for p in (p32, p16))
    model = edgelora.load(bundle, max_context=300, threads=1)
    assert model.kv_cache == "float16" and plan(bundle, "x86-64-laptop", context=300, threads=1).kv_cache == "float16"
    assert edgelora.load(bundle, max_context=300, threads=1, products="exact").kv_cache == "float32"
    assert k16 == model.net.new_cache().nbytes == model.kv_cache_bytes == k32 // 2
    assert p16.to_dict()["kv_cache"] == "float16" and p16.max_context >= p32.max_context
    # a float32 plan over the budget names the float16 cache and what it frees, which is its plan's saving
    roomy = Device(name="roomy", arch=host_arch(), cores=1, ram_mib=64, app_share=1.0)
    r32, r16 = (plan(bundle, roomy, context=512, threads=1, overhead=0, kv_cache=kv) for kv in ("float32", "float16"))
    tight = Device(name="tight", arch=host_arch(), cores=1, ram_mib=16,
                   app_share=(r16.total_bytes + r32.total_bytes) / 2 / (16 << 20))  # between the two totals
    q32, q16 = (plan(bundle, tight, context=512, threads=1, overhead=0, kv_cache=kv) for kv in ("float32", "float16"))
    assert q16.fits and not q32.fits
    note = next(x for x in q32.suggestions if "--kv-cache float16" in x)
    assert f"{(q32.total_bytes - q16.total_bytes) / 1e6:.1f} MB less (enough" in note
    assert main(["plan", str(bundle), "--device", "x86-64-laptop", "--context", "300", "--threads", "1",
                 "--kv-cache", "float16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == "float16"

    out = tmp_path / "f16"
    assert main(["deploy", str(bundle), "--device", "host", "-o", str(out), "--context", "128"]) == 0  # (the default)
    capsys.readouterr()
    assert json.loads((out / "manifest.json").read_text())["plan"]["kv_cache"] == "float16"
    deployed = edgelora.load(out)
    assert deployed.kv_cache == "float16" and deployed.net.new_cache().k.dtype == np.float16
    ids = [5, 6, 7, 8, 9]
    assert deployed.generate(ids, max_new_tokens=8, temperature=0) == \
        edgelora.load(bundle, max_context=128, kv_cache="float16").generate(ids, max_new_tokens=8, temperature=0)
    with pytest.raises(PlanError, match="float16"):
        edgelora.load(out, kv_cache="float32")
    assert main(["deploy", str(bundle), "--device", "host", "-o", str(tmp_path / "f32"), "--context", "128",
                 "--kv-cache", "float32"]) == 0
    assert edgelora.load(tmp_path / "f32").net.new_cache().k.dtype == np.float32

    # a folder made before the cache was planned (no kv_cache in its plan) holds float32
    from edgelora.atomic import sha256_file
    from edgelora.bundle import sealed_text
    m = json.loads((tmp_path / "f32" / "manifest.json").read_text())
    planned = json.loads((tmp_path / "f32" / "plan.json").read_text())
    del m["plan"]["kv_cache"], planned["kv_cache"]
    (tmp_path / "f32" / "plan.json").write_text(json.dumps(planned))
    m["files"]["plan.json"].update(size=(tmp_path / "f32" / "plan.json").stat().st_size,
                                   sha256=sha256_file(tmp_path / "f32" / "plan.json"))
    (tmp_path / "f32" / "manifest.json").write_text(sealed_text(m))
    assert edgelora.load(tmp_path / "f32").kv_cache == "float32"
    m = json.loads((out / "manifest.json").read_text())
    m["plan"]["kv_cache"] = "int4"  # (sealed again: the manifest's own checks, not its digest, refuse it)
    (out / "manifest.json").write_text(sealed_text(m))
    with pytest.raises(FormatError, match="manifest plan kv_cache must be one of float32, float16"):
        edgelora.load(out)
    m["plan"]["kv_cache"] = "float32"  # the manifest's summary and plan.json disagree
    (out / "manifest.json").write_text(sealed_text(m))
    with pytest.raises(FormatError, match="plan.json's kv_cache differs"):
        edgelora.load(out)


def test_inspect_describes_a_deploy_folder(demo_deploy, tmp_path, capsys):
    import shutil
    info = edgelora.inspect(demo_deploy)
    assert info["kind"] == "deploy" and info["checksums"] == "ok" and info["runs_here"] == "yes"
    assert set(info["adapters"]) == {"pirate", "shout"} and info["plan"]["context"] == 256
    assert info["architecture"]["model_type"] == "llama"
    assert main(["inspect", str(demo_deploy)]) == 0
    out = capsys.readouterr().out
    assert "device        host" in out and "runs here     yes" in out
    copy = tmp_path / "d"
    shutil.copytree(demo_deploy, copy)
    with open(copy / "plan.json", "ab") as f:
        f.write(b" ")
    assert edgelora.inspect(copy)["checksums"].startswith("FAILED") and "plan.json" in edgelora.inspect(copy)["checksums"]


def test_deploy_for_another_architecture_is_refused_unless_asked(tmp_path):
    other = "raspberry-pi-5-8gb" if host_arch() == "x86_64" else "x86-64-laptop"
    out = tmp_path / "other"
    deploy(demo_bundle_path(), other, out, context=64)
    with pytest.raises(PlanError, match=f"planned for {other}"):
        edgelora.load(out)
    assert edgelora.load(out, device_check=False).max_context == 64


def test_tampering_any_deployed_file_fails_with_its_name(demo_deploy, tmp_path):
    import shutil
    files = json.loads((demo_deploy / "manifest.json").read_text())["files"]
    assert len(files) >= 10
    for rel in files:
        copy = tmp_path / "t"
        shutil.copytree(demo_deploy, copy)
        p = copy / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        with pytest.raises(ChecksumError, match=str(p).replace("+", r"\+")):
            edgelora.load(copy, verify="full")  # (the default finds the weights' mismatch in the background)
        shutil.rmtree(copy)


def test_deploying_a_corrupt_bundle_writes_nothing(tmp_path):
    import shutil
    bundle = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a weight byte: the layout still reads, the sha256 does not match
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=str(weights)):
        deploy(bundle, "host", tmp_path / "out", context=64)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_mismatched_adapter_is_refused_naming_the_users_folder(tmp_path):
    """deploy compacts the adapters before planning them; an adapter that does not fit the base is
    refused naming the folder the user gave (not a compacted copy), and nothing is written."""
    import shutil
    from edgelora.errors import AdapterMismatchError
    bad = shutil.copytree(demo_adapter_paths()["pirate"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] *= 2
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match=str(bad)) as e:
        deploy(demo_bundle_path(), "host", tmp_path / "out", adapters={"p": bad}, context=64)
    assert "edgelora-deploy-" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_archive_round_trip_and_hostile_archives(demo_deploy, tmp_path):
    out = unpack(demo_deploy.with_name("demo-laptop.tar"), tmp_path / "unpacked")
    assert open_deploy(out, verify="full").adapters.keys() == {"pirate", "shout"}
    assert main(["unpack", str(demo_deploy.with_name("demo-laptop.tar")), "-o", str(tmp_path / "u2")]) == 0

    def tar_with(*members) -> Path:
        path = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.tar"
        with tarfile.open(path, "w") as t:
            for name, kind, data in members:
                info = tarfile.TarInfo(name)
                info.type = kind
                if kind == tarfile.SYMTYPE:
                    info.linkname = "/etc/passwd"
                info.size = len(data)
                t.addfile(info, io.BytesIO(data) if data else None)
        return path

    hostile = [tar_with(("d/../../escape", tarfile.REGTYPE, b"x")),
               tar_with(("/abs/file", tarfile.REGTYPE, b"x")),
               tar_with(("d/link", tarfile.SYMTYPE, b"")),
               tar_with(("a/x", tarfile.REGTYPE, b"x"), ("b/y", tarfile.REGTYPE, b"y")),
               tar_with(("d/manifest.json", tarfile.REGTYPE, b"{}"))]
    for i, bad in enumerate(hostile):
        with pytest.raises(FormatError):
            unpack(bad, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    assert not (tmp_path.parent / "escape").exists()
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(demo_deploy.with_name("demo-laptop.tar").read_bytes()[:20000])
    with pytest.raises(FormatError):
        unpack(truncated, tmp_path / "trunc-out")
    assert not (tmp_path / "trunc-out").exists()


@pytest.mark.parametrize("bad", [{"format": "edgelora-deploy"}, {"format": "edgelora-deploy", "format_version": 1,
                                                                 "device": {}, "plan": {"context": 1, "threads": 1,
                                                                 "total_bytes": 1, "adapter_bytes": 0},
                                                                 "adapters": {}, "model": "model",
                                                                 "files": {"../../etc/passwd": {"size": 1,
                                                                                                "sha256": "0" * 64}}}])
def test_malformed_deploy_manifests(tmp_path, bad):
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="manifest.json"):
        edgelora.load(tmp_path)


def test_adapter_names_that_are_paths_are_refused(tmp_path):
    with pytest.raises(UsageError):
        deploy(demo_bundle_path(), "host", tmp_path / "x", adapters={"../evil": demo_adapter_paths()["pirate"]})
    assert not (tmp_path / "x").exists()
