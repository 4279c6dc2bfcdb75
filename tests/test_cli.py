"""The command line as a new user meets it (issue 18): help with defaults and an example on every
subcommand, ``--json`` everywhere (errors too), prompts from standard input or a file, adapters
named after their folder, chat templates from a file, text without special tokens or control
bytes, chat commands that say what went wrong, and ``bench`` within the model's context."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import edgelora
from conftest import ROOT, demo_adapter_paths, demo_bundle_path
from edgelora.benchmark import token_counts
from edgelora.cli import build_parser, drops_system_message, main, printable
from edgelora.devices.profiles import parse_cpuinfo
from edgelora.errors import UsageError


def _cli(*args, stdin=None):
    """``edgelora ARGS`` as a user types it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "edgelora", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


def _subparsers(parser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


# --- 2. help -------------------------------------------------------------------------------

def test_every_option_has_help_and_every_subcommand_an_example(capsys):
    subs = _subparsers(build_parser())
    assert set(subs) >= {"convert", "inspect", "run", "chat", "bench", "devices", "plan", "deploy", "unpack",
                         "warmup", "demo"}
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"example:\n  edgelora {name}" in out, name
    run_help = subs["run"].format_help()
    for shown in ("most tokens to generate (default: 256)", "(default: 0.0)", "(default: 1.0)"):
        assert shown in " ".join(run_help.split()), shown
    convert_help = " ".join(subs["convert"].format_help().split())
    assert "GGUF" in convert_help and "bitsandbytes" in convert_help


# --- 3. JSON -------------------------------------------------------------------------------

def test_json_errors_name_type_file_message_and_exit_code(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["inspect", str(missing), "--json"]) == 3
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "FormatError" and err["exit_code"] == 3 and err["file"] == str(missing)
    assert err["message"] and str(missing) not in err["message"]
    assert main(["run", str(demo_bundle_path()), "--json"]) == 2  # argparse's refusal: no prompt
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "UsageError" and err["exit_code"] == 2 and "--prompt" in err["message"]
    assert main(["run", str(demo_bundle_path())]) == 2  # the same, as text on stderr
    assert "error:" in capsys.readouterr().err


def test_devices_show_prints_only_the_profile_and_host_is_listed(capsys):
    assert main(["devices", "--show", "raspberry-pi-4-4gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)  # one JSON object, nothing after it
    assert d["name"] == "raspberry-pi-4-4gb" and d["cores"] == 4
    assert main(["devices", "--show", "raspberry-pi-4-4gb"]) == 0
    text = capsys.readouterr().out
    assert "android-phone-8gb" not in text  # not the whole table
    assert tomllib.loads(text)["name"] == "raspberry-pi-4-4gb"
    assert main(["devices", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "host" in listed and listed["host"]["cores"] >= 1
    assert main(["devices", "--show", "host", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "host"


def test_host_cpu_and_simd_from_cpuinfo():
    x86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
           "flags\t\t: fpu sse sse2 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni\n\n"
           "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")
    cpu, simd = parse_cpuinfo(x86)
    assert cpu == "Intel(R) Xeon(R) Platinum 8480+"
    assert simd == ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni")
    arm = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes crc32 asimdhp asimddp i8mm\n"
           "CPU implementer\t: 0x41\nCPU part\t: 0xd0b\n")
    cpu, simd = parse_cpuinfo(arm)
    assert cpu == "Arm CPU implementer 0x41 part 0xd0b" and simd == ("neon", "fp16", "dotprod", "i8mm")


def test_deploy_and_unpack_json(tmp_path, capsys):
    out = tmp_path / "dep"
    assert main(["deploy", str(demo_bundle_path()), "--device", "host", "--context", "64",
                 "--adapter", demo_adapter_paths()["pirate"], "-o", str(out), "--archive", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["path"] == str(out) and r["archive"] == str(out.with_name("dep.tar")) and r["plan"]["fits"]
    assert r["plan"]["context"] == 64 and any(i["name"] == "adapter pirate" for i in r["plan"]["items"])
    assert main(["unpack", r["archive"], "-o", str(tmp_path / "u"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path / "u"), "verified": True}
    assert main(["unpack", r["archive"], "-o", str(tmp_path / "u"), "--json"]) != 0  # exists: a JSON error
    assert json.loads(capsys.readouterr().out)["error"]["type"] in ("UsageError", "OutputError")


# --- 4. prompts, adapters, chat templates --------------------------------------------------

def test_prompt_from_stdin_and_file_and_adapter_named_after_its_folder(tmp_path):
    bundle = demo_bundle_path()
    prompt = "Tom has a red ball."
    r = _cli("run", bundle, "-p", "-", "-n", 4, "--json", stdin=prompt)
    assert r.returncode == 0, r.stderr
    from_stdin = json.loads(r.stdout)
    assert from_stdin["prompt"] == prompt
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    r = _cli("run", bundle, "--prompt-file", tmp_path / "p.txt", "-n", 4, "--json",
             "--adapter", demo_adapter_paths()["pirate"] + "/")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == prompt and out["prompt_ids"] == from_stdin["prompt_ids"]
    assert out["adapter"] == "pirate"
    r = _cli("run", bundle, "--prompt-file", tmp_path / "missing.txt")
    assert r.returncode == 3 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_chat_template_file_and_the_dropped_system_message_warning(tmp_path):
    bundle = demo_bundle_path()
    model = edgelora.load(bundle)
    assert drops_system_message(model.tokenizer)  # the demo's template ignores the system role
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    assert not drops_system_message(model.tokenizer, template)
    r = _cli("chat", bundle, "--system", "Be brief.", "-n", 2, stdin="Hello!\n")
    assert r.returncode == 0, r.stderr
    assert "leaves the system message out" in r.stderr
    (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
    r = _cli("chat", bundle, "--system", "Be brief.", "--chat-template", tmp_path / "t.jinja", "-n", 2, "--json",
             stdin="Hello!\n")
    assert r.returncode == 0, r.stderr
    assert "leaves the system message out" not in r.stderr
    (turn,) = [json.loads(line) for line in r.stdout.splitlines()]  # one JSON object per turn
    want = model.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hello!"}], chat_template=template)
    assert turn["prompt"] == "Hello!" and turn["prompt_ids"] == model.tokenizer.encode(want, add_special_tokens=False)
    assert turn["generated_tokens"] == len(turn["generated_ids"]) <= 2


# --- 5. text -------------------------------------------------------------------------------

def test_text_leaves_out_special_tokens_and_control_bytes():
    model = edgelora.load(demo_bundle_path())
    tok = model.tokenizer
    ids = tok.encode("lots of fun.", add_special_tokens=False) + [tok.bos_token_id] + tok.encode(
        "Once upon", add_special_tokens=False)
    from edgelora.runtime.model import _TextOut
    out = _TextOut(tok, [])
    text = "".join(out.push(i) for i in ids) + out.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) and "<s>" not in text
    assert "<s>" in tok.decode(ids)  # what was printed before
    assert printable("a\x00b\ufffd\x1b[2J\nc\td\x7f\x85") == "ab[2J\nc\td"


# --- 6. chat commands ----------------------------------------------------------------------

def test_chat_commands_usage_unknown_and_exit_status(tmp_path):
    bundle = demo_bundle_path()
    pirate = demo_adapter_paths()["pirate"]
    r = _cli("chat", bundle, "--adapter", pirate, "-n", 2, stdin="/use\n/adapters\n/frobnicate\n/help\n")
    assert "usage: /use NAME" in r.stderr
    assert "using: pirate" in r.stderr  # the bare /use switched nothing
    assert "unknown command /frobnicate" in r.stderr and "/exit quits" in r.stderr
    assert r.returncode == 2  # piped input with errors: the last one's exit code when the input ends
    r = _cli("chat", bundle, "-n", 2, stdin="/use nope\n/exit\n")
    assert r.returncode == 0 and "no adapter named 'nope'" in r.stderr  # /exit: a deliberate end
    r = _cli("chat", bundle, "-n", 2, stdin="Hello!\n")
    assert r.returncode == 0, r.stderr


# --- 1. bench ------------------------------------------------------------------------------

def test_bench_token_counts_fit_the_model():
    assert token_counts(4096, None, None) == (512, 128)
    assert token_counts(512, None, None) == (378, 126)  # the demo model: 512 positions
    assert sum(token_counts(64, None, None)) <= 64 - 8
    assert token_counts(512, 16, 8) == (16, 8)
    with pytest.raises(UsageError, match="exceed the 512 positions"):
        token_counts(512, 512, 128)


def test_bench_defaults_on_a_small_context_model_and_bad_threads():
    bundle = demo_bundle_path()
    r = _cli("bench", bundle, "--json", "--threads", "1", "--runs", "2")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["results"]
    assert (row["prompt_tokens"], row["decode_tokens"], row["runs"]) == (378, 126, 2)
    assert row["prefill_tokens_per_second"] > 0 and row["decode_tokens_per_second"] > 0
    r = _cli("bench", bundle, "--threads", "4096")
    assert r.returncode == 2 and "threads must be between 1 and" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", bundle, "--threads", "4096", "--json")
    assert json.loads(r.stdout)["error"]["exit_code"] == 2


# --- 14. slim install ----------------------------------------------------------------------

def test_runtime_needs_no_converter_only_packages(tmp_path):
    """Without onnx installed (it is the ``onnx`` extra), the runtime works and converting an
    ONNX model names the extra to install."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    code = (f"import sys; sys.modules['onnx'] = None\n"
            f"import edgelora\n"
            f"m = edgelora.load({str(demo_bundle_path())!r}, max_context=32)\n"
            f"assert m.generate('Hello', max_new_tokens=2) is not None\n"
            f"from edgelora.cli import main\n"
            f"sys.exit(main(['convert', {str(tmp_path / 'model.onnx')!r}, '-o', {str(tmp_path / 'out')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "pip install 'edgelora[onnx]'" in r.stderr and "Traceback" not in r.stderr
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnx") for d in deps["dependencies"])
    assert "onnx>=1.15" in deps["optional-dependencies"]["onnx"]


# --- 7. wording ----------------------------------------------------------------------------

def test_wording(tmp_path):
    from edgelora.atomic import check_output_dir
    from edgelora.inspection import format_inspect
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        check_output_dir(tmp_path / "file" / "x", overwrite=False)
    with pytest.raises(UsageError, match="parent folder .* does not exist"):
        check_output_dir(tmp_path / "none" / "x", overwrite=False)
    model = edgelora.load(demo_bundle_path())  # max_context is the model's limit, 512
    with pytest.raises(UsageError, match="at most 512 positions: shorten the prompt") as e:
        model.generate([5] * 600, max_new_tokens=1)
    assert "larger max_context" not in str(e.value)
    with pytest.raises(UsageError, match="load with a larger max_context"):
        edgelora.load(demo_bundle_path(), max_context=16).generate([5] * 20, max_new_tokens=1)
    info = edgelora.inspect(demo_bundle_path())
    info["source"] = dict(info["source"], merged_adapter={"path": "adapters/pirate", "ranks": [8], "modules": 28,
                                                          "sha256": "ab" * 32})
    assert "merged        LoRA adapter adapters/pirate (rank 8, 28 modules" in format_inspect(info)
    dep = tmp_path / "dep"
    edgelora.deploy(demo_bundle_path(), "host", dep, context=32, threads=1)
    assert "context 32 (float16 KV cache), 1 thread, " in format_inspect(edgelora.inspect(dep))


# --- 8. progress only on a terminal --------------------------------------------------------

class _Terminal:
    """A stderr that says it is a terminal, keeping what is written."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_status_lines_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    from edgelora.runtime.warmup import status_line
    status_line("edgelora: working")
    assert capsys.readouterr().err == ""  # not a terminal: nothing
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    status_line("edgelora: working")
    assert term.text == "edgelora: working\n"


def test_demo_written_to_a_log_has_no_progress_bar(tmp_path):
    r = _cli("demo", "--workdir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr and "quantizing" not in r.stderr and "it/s" not in r.stderr
