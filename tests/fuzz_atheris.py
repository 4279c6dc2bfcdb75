"""Coverage-guided fuzzing of edgelora's readers with atheris (libFuzzer for Python), by hand.

Not part of the test suite (atheris is optional and not a dependency of edgelora); the same readers
are fuzzed in CI by ``tests/test_fuzz.py`` with hypothesis. To run::

    pip install atheris
    python tests/fuzz_atheris.py --write-seeds corpus   # the valid files, one per reader
    python tests/fuzz_atheris.py -max_total_time=300 -rss_limit_mb=4096 corpus

Each input's first byte picks a reader, the rest is the content of the file it reads: a safetensors
file, config.json, adapter_config.json (with the demo adapter's weights, checked against the demo
model), a bundle manifest.json or model.safetensors (in a copy of the converted demo bundle), a
deploy manifest.json or archive, a device profile, tokenizer_config.json or tokenizer.json. The
property is the one ``tests/test_fuzz.py`` checks: the reader succeeds or raises an ``EdgeLoraError``
whose message names the file or its folder; any other exception is a crash that libFuzzer reports
(with the input saved as ``crash-*``; replay it with ``python tests/fuzz_atheris.py crash-...``).
``-rss_limit_mb`` turns an unbounded allocation into a reported crash too.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import numpy  # noqa: F401  (third-party code, and Numba-compiled modules, stay uninstrumented:
import tokenizers  # noqa: F401  Numba cannot compile instrumented bytecode)
import edgelora.converters.nf4  # noqa: F401

with atheris.instrument_imports(include=["edgelora"]):
    from edgelora.adapters import read_adapter, read_config
    from edgelora.bundle import Bundle
    from edgelora.config import ModelArgs
    from edgelora.deployment import open_deploy, unpack
    from edgelora.devices.profiles import Device
    from edgelora.errors import EdgeLoraError
    from edgelora.runtime.tokenizer import Tokenizer
    from edgelora.safetensors_io import SafetensorsFile

WORK = Path(tempfile.mkdtemp(prefix="edgelora-atheris-"))
os.environ.setdefault("EDGELORA_HOME", str(WORK / "home"))


def _setup():
    from edgelora.deployment import deploy
    from edgelora.demo import demo_bundle, packaged_demo_adapters, packaged_demo_model
    bundle = demo_bundle(WORK / "demo", quiet=True)[0]
    shutil.copytree(bundle, WORK / "bundle")
    adapters = {k: str(v) for k, v in packaged_demo_adapters().items()}
    shutil.copytree(adapters["pirate"], WORK / "adapter")
    deploy(bundle, "host", WORK / "deploy", adapters=adapters, context=64, overhead=200_000_000)
    (WORK / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(packaged_demo_model() / name, WORK / "tok" / name)
    return ModelArgs.from_file(packaged_demo_model() / "config.json")


BASE = _setup()


def _read_st(p):
    with SafetensorsFile(p) as f:
        for name in f.keys():
            f.raw(name)


# (file written with the input, what names it in an error, reader)
TARGETS = [
    (WORK / "x.safetensors", WORK / "x.safetensors", _read_st),
    (WORK / "config.json", WORK / "config.json", ModelArgs.from_file),
    (WORK / "adapter" / "adapter_config.json", WORK / "adapter", lambda p: read_config(p.parent)),
    (WORK / "adapter" / "adapter_config.json", WORK / "adapter", lambda p: read_adapter(p.parent, BASE)),
    (WORK / "bundle" / "manifest.json", WORK / "bundle", lambda p: Bundle(p.parent, verify=False).close()),
    (WORK / "bundle" / "model.safetensors", WORK / "bundle", lambda p: Bundle(p.parent, verify=False).close()),
    (WORK / "deploy" / "manifest.json", WORK / "deploy", lambda p: open_deploy(p.parent, device_check=False)),
    (WORK / "device.toml", WORK / "device.toml", Device.from_file),
    (WORK / "tok" / "tokenizer_config.json", WORK / "tok", lambda p: Tokenizer.from_dir(p.parent)),
    (WORK / "tok" / "tokenizer.json", WORK / "tok", lambda p: Tokenizer.from_dir(p.parent)),
    (WORK / "a.tar", WORK / "a.tar", lambda p: unpack(p, WORK / "unpacked")),
]
ORIGINALS = {t[0]: (t[0].read_bytes() if t[0].is_file() else None) for t in TARGETS}


def one_input(data: bytes) -> None:
    if not data:
        return
    path, named, reader = TARGETS[data[0] % len(TARGETS)]
    path.write_bytes(data[1:])
    try:
        reader(path)
    except EdgeLoraError as e:
        if str(named) not in str(e):
            raise AssertionError(f"error does not name {named}: {e}") from None
    finally:
        shutil.rmtree(WORK / "unpacked", ignore_errors=True)
        original = ORIGINALS[path]
        if original is not None:
            path.write_bytes(original)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":  # a starting corpus: each valid file
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, (path, _, _) in enumerate(TARGETS):
            if ORIGINALS[path] is not None:
                (out / f"seed-{i}").write_bytes(bytes([i]) + ORIGINALS[path])
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
