"""Fuzzing every reader with malformed input: safetensors files, config.json, adapter_config.json and
adapter weights, bundle and deploy manifests, deploy folders and archives, device profiles, tokenizer
files and Hugging Face checkpoint folders.

The property, for every input: the reader either succeeds or raises an ``EdgeLoraError`` whose message
names the file (or the folder holding it); never another exception, never a hang (hypothesis
deadlines), never a large allocation (``tracemalloc`` peaks where the reader is pure Python + NumPy,
and explicit checks that lengths, offsets and shapes are refused before anything is allocated).

Inputs are random bytes, truncations and byte flips of valid files written by edgelora itself (a
converted demo bundle, the demo adapters, a real deploy folder and archive), and JSON/TOML structures
with wrong types, huge numbers, NaN, deep nesting, unicode, path traversal and absolute paths.
Manifests are mutated both as they are (every change must be caught by their digest) and resealed
(to reach the checks behind the digest). Hostile configurations (issue 16) get their own tests:
catastrophic regular expressions in every adapter field matched as one, chat templates built to
exhaust memory or time, single flipped bytes of manifests (each must be refused), and size bombs
(headers of many tensors, configs of many layers, adapters and contexts beyond memory), each
within a deadline. Every
reader call is counted; the last test checks that the file threw at least ``MIN_INPUTS`` of them.
Hypothesis runs derandomized (the same inputs on every run) without an example database, so CI is
reproducible; set ``EDGELORA_FUZZ_SCALE=10`` (say) to run ten times as many.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import tarfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelora.errors import EdgeLoraError
from conftest import demo_adapter_paths, demo_bundle_path
from tiny_models import reseal

MIN_INPUTS = 10_000
SCALE = float(os.environ.get("EDGELORA_FUZZ_SCALE", "1"))
COUNT: dict[str, int] = {}
OUTCOMES: dict[str, dict[str, int]] = {}  # test -> "ok" or error class -> count (printed at the end)
EXPECTED: dict[str, int] = {}  # test -> max_examples, for the final count
MAX_PEAK = 16 << 20  # bytes a reader may allocate on a small malformed input


def fuzz(n: int, deadline_ms: int = 5000):
    """``@given`` settings for a fuzz test of ``n`` examples, reproducible and database-free."""
    n = max(1, int(n * SCALE))

    def wrap(f):
        EXPECTED[f.__name__] = n
        return settings(max_examples=n, deadline=deadline_ms, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck), print_blob=True)(f)
    return wrap


def check(test: str, call, *names, peak: int | None = None, count: bool = True):
    """Run ``call()``: success, or an ``EdgeLoraError`` naming one of ``names``; anything else fails.
    ``count``: this is a new input (not a second reader of the same one)."""
    COUNT[test] = COUNT.get(test, 0) + count
    if peak is not None:
        tracemalloc.reset_peak()
    try:
        result = call()
    except EdgeLoraError as e:
        msg = str(e)
        assert any(str(n) in msg for n in names), f"{type(e).__name__} does not name the file: {msg}"
        result = e
    outcomes = OUTCOMES.setdefault(test, {})
    kind = type(result).__name__ if isinstance(result, EdgeLoraError) else "ok"
    outcomes[kind] = outcomes.get(kind, 0) + 1
    if peak is not None:
        used = tracemalloc.get_traced_memory()[1]
        assert used < peak, f"reader allocated {used} bytes on a malformed input"
    return result


@contextmanager
def traced():
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

HUGE_INTS = [2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -1, -(2**63), 10**30]
NASTY_TEXT = ["", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "/", "a/../../b", "C:\\x", "\\\\srv\\x",
              "a\0b", "\u202e", "é", "\ud7ff\U0010ffff", "x" * 300, "model.safetensors", "manifest.json",
              "(", "a{99999999999}", "(?P<idx>1)", "*", "all-linear", "NaN", "-1", "1e999", "q_proj", "model",
              "F32", "BF16", "nf4", "float16", "LORA", "llama", "aarch64", "x86_64"]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.integers(-3, 300),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NASTY_TEXT), st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=8) | st.sampled_from(NASTY_TEXT),
                                                                           kids, max_size=4)),
                           max_leaves=12)


def _containers(value, path=()):
    """Every (path, container) in a JSON value, the value itself first."""
    out = [(path, value)]
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                out += _containers(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                out += _containers(v, path + (i,))
    return out


@st.composite
def mutated_json(draw, base, keys=()):
    """A copy of ``base`` with one to three values replaced, removed or added anywhere in it; ``keys``
    are names worth adding (fields the reader knows)."""
    value = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        places = _containers(value)
        _, target = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if isinstance(target, dict):
            if op == "add" or not target:
                key = draw(st.sampled_from(list(keys) or NASTY_TEXT) | st.sampled_from(NASTY_TEXT))
                target[key] = draw(json_values)
            else:
                key = draw(st.sampled_from(sorted(target)))
                if op == "delete":
                    del target[key]
                else:
                    target[key] = draw(json_values)
        elif isinstance(target, list):
            if op == "add" or not target:
                target.append(draw(json_values))
            else:
                i = draw(st.integers(0, len(target) - 1))
                if op == "delete":
                    del target[i]
                else:
                    target[i] = draw(json_values)
    return value


def deep(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


@st.composite
def mutated_bytes(draw, raw: bytes, focus: int | None = None):
    """``raw`` truncated, with bytes flipped, overwritten, inserted or deleted (within its first ``focus``
    bytes when given: a header, say)."""
    data = bytearray(raw)
    span = min(len(data), focus) if focus else len(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "set", "insert", "delete", "truncate", "splice"]))
        i = draw(st.integers(0, max(span - 1, 0)))
        if op == "flip" and data:
            data[min(i, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[min(i, len(data) - 1)] = draw(st.sampled_from([0, 0xFF, ord('"'), ord("{"), ord("9"), ord("-")]))
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=8) | st.sampled_from([b"9999999999999999", b"-1", b"[", b'"..', b"\0"]))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "splice":
            j = draw(st.integers(0, max(len(data) - 1, 0)))
            data[i:i + 4] = data[j:j + 4]
    return bytes(data)


def json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN/Infinity written as json.dumps writes them


def json_inputs(base, keys=()):
    """Encoded JSON inputs for a reader of ``base``-like files: structures, byte damage, special cases."""
    encoded = json.dumps(base).encode()
    special = st.sampled_from([b"", b"null", b"[]", b'"x"', b"1", b"NaN", deep(5000), b"[" * 100000,
                               b'{"a": ' + b"9" * 5000 + b"}", b'{"a": 1e999999}', b"\xff\xfe{}", b"{}" * 3,
                               json.dumps(base).encode("utf-16")])
    return st.one_of(mutated_json(base, keys).map(json_bytes), mutated_bytes(encoded), special,
                     st.binary(max_size=64))


# ---------------------------------------------------------------------------------------------
# fixtures: valid files written by edgelora itself
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def bundle_copy(work):
    dst = work / "bundle"
    shutil.copytree(demo_bundle_path(), dst)
    return dst


@pytest.fixture(scope="module")
def deploy_copy(work):
    from edgelora.deployment import deploy
    out = work / "deploy"
    deploy(demo_bundle_path(), "host", out, adapters=demo_adapter_paths(), context=64, overhead=200_000_000,
           archive=True)
    return out


def _restore(path: Path, original: bytes | None):
    if original is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(original)


@contextmanager
def replaced(path: Path, data: bytes):
    """``path`` holds ``data`` for the duration (then its original content again)."""
    original = path.read_bytes() if path.is_file() else None
    path.write_bytes(data)
    try:
        yield path
    finally:
        _restore(path, original)


def small_safetensors(path: Path) -> bytes:
    from edgelora.safetensors_io import write_safetensors
    write_safetensors(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16),
                             "i": np.arange(4, dtype=np.int64), "u": np.zeros((2, 0), np.uint8),
                             "k": np.arange(6, dtype=np.uint16)}, {"format": "pt"})
    return path.read_bytes()


def st_file(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

ST_KEYS = ["dtype", "shape", "data_offsets", "__metadata__"]
ST_BASE = {"__metadata__": {"format": "pt"},
           "w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
           "b": {"dtype": "BF16", "shape": [2], "data_offsets": [48, 52]}}


def _read_all(path):
    from edgelora.safetensors_io import SafetensorsFile
    with SafetensorsFile(path) as f:
        for name, info in f.tensors.items():
            f.raw(name)
            if info.dtype in ("F32", "F16", "BF16"):
                f.float32(name)
        return f.tensors


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"]) | json_values,
    "shape": st.lists(st.integers(-2, 5) | st.sampled_from(HUGE_INTS), max_size=9) | json_values,
    "data_offsets": st.lists(st.integers(-4, 64) | st.sampled_from(HUGE_INTS), min_size=2, max_size=2) | json_values,
})


@fuzz(2500)
@given(header=st.one_of(st.dictionaries(st.sampled_from(["w", "b", "__metadata__", "", "../x"]) | st.text(max_size=4),
                                        entries | json_values, max_size=4),
                        mutated_json(ST_BASE, ST_KEYS)),
       data=st.binary(max_size=64) | st.just(b"\0" * 52))
def test_safetensors_headers(work, header, data):
    path = work / "h.safetensors"
    path.write_bytes(st_file(header, data))
    with traced():
        check("test_safetensors_headers", lambda: _read_all(path), path, peak=MAX_PEAK)


@fuzz(1500)
@given(st.data())
def test_safetensors_damaged(work, data):
    valid = small_safetensors(work / "valid.safetensors")
    (n,) = struct.unpack("<Q", valid[:8])
    raw = data.draw(mutated_bytes(valid, focus=data.draw(st.sampled_from([8, 8 + n, len(valid)]))) | st.binary(max_size=40))
    path = work / "d.safetensors"
    path.write_bytes(raw)
    with traced():
        check("test_safetensors_damaged", lambda: _read_all(path), path, peak=MAX_PEAK)


@pytest.mark.parametrize("n", [2**40, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1, 9])
def test_safetensors_huge_header_length_fails_fast(work, n):
    """A header length beyond the file or the limit is refused without reading or allocating it."""
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile
    path = work / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", n) + b"{}")
    with traced():
        e = check("huge_header", lambda: SafetensorsFile(path), path, peak=1 << 20)
    assert isinstance(e, FormatError) and "header length" in str(e)


@pytest.mark.parametrize("shape,offsets", [([2**39] * 8, [0, 4]), ([2**40 - 1, 2**40 - 1], [0, 0]),
                                           ([2**31, 2**31, 2**31], [0, 2**63]), ([-1], [0, 4]), ([1], [-4, 0]),
                                           ([1], [4, 0]), ([1], [0, 2**64]), ([True], [0, 4]), ([1.0], [0, 4])])
def test_safetensors_huge_or_negative_shapes_fail_fast(work, shape, offsets):
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile
    path = work / "shape.safetensors"
    path.write_bytes(st_file({"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, b"\0" * 4))
    with traced():
        e = check("huge_shape", lambda: SafetensorsFile(path), path, peak=1 << 20)
    assert isinstance(e, FormatError)


def test_safetensors_overlapping_and_gapped_offsets(work):
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile
    path = work / "overlap.safetensors"
    for a, b in (([0, 8], [4, 12]), ([0, 4], [8, 12]), ([0, 8], [0, 8]), ([0, 12], [4, 8])):
        path.write_bytes(st_file({"x": {"dtype": "U8", "shape": [a[1] - a[0]], "data_offsets": a},
                                  "y": {"dtype": "U8", "shape": [b[1] - b[0]], "data_offsets": b}}, b"\0" * 12))
        assert isinstance(check("overlap", lambda: SafetensorsFile(path), path), FormatError)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def _demo_config() -> dict:
    from edgelora.demo import packaged_demo_model
    return json.loads((packaged_demo_model() / "config.json").read_text())


CONFIG_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "vocab_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "hidden_act", "sliding_window",
               "rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@fuzz(1500)
@given(st.data())
def test_config_json(work, data):
    from edgelora.config import ModelArgs
    base = data.draw(st.sampled_from([_demo_config(), dict(_demo_config(), rope_scaling=LLAMA3, head_dim=None)]))
    path = work / "config.json"
    path.write_bytes(data.draw(json_inputs(base, CONFIG_KEYS)))
    with traced():
        args = check("test_config_json", lambda: ModelArgs.from_file(path), path, peak=MAX_PEAK)
    if isinstance(args, ModelArgs):  # what the runtime then computes from it must work
        from edgelora.architectures import tensor_map
        from edgelora.runtime.llama import rope_inv_freq
        if args.num_hidden_layers <= 64:
            tensor_map(args)
        if args.head_dim <= 4096:
            with np.errstate(all="ignore"):
                rope_inv_freq(args)


@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps"])
@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400], ids=["huge", "minus-huge"])
def test_config_numbers_beyond_float_range(work, field, value):
    from edgelora.config import ModelArgs
    path = work / "config.json"
    path.write_text(json.dumps(dict(_demo_config(), **{field: value})))
    from edgelora.errors import FormatError
    with pytest.raises(FormatError, match=f"{field}=.*finite number"):
        ModelArgs.from_file(path)


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------

ADAPTER_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "lora_bias", "use_dora",
                "modules_to_save", "peft_type", *("layer_replication", "trainable_token_indices", "fan_in_fan_out")]


@pytest.fixture(scope="module")
def adapter_copy(work):
    src = Path(demo_adapter_paths()["pirate"])
    dst = work / "adapter"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def base_modules():
    from edgelora.adapters import BaseModules
    from edgelora.config import ModelArgs
    from edgelora.demo import packaged_demo_model
    return BaseModules.from_args(ModelArgs.from_file(packaged_demo_model() / "config.json"))


@fuzz(1200)
@given(st.data())
def test_adapter_config(adapter_copy, base_modules, data):
    from edgelora.adapters import describe_adapter, read_adapter, read_config
    cfg = adapter_copy / "adapter_config.json"
    base = json.loads(cfg.read_text())
    variant = data.draw(st.sampled_from([base, dict(base, target_modules="all-linear"),
                                         dict(base, target_modules=["q_proj"], layers_to_transform=[0, 1],
                                              layers_pattern="layers"),
                                         dict(base, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2})]))
    raw = data.draw(json_inputs(variant, ADAPTER_KEYS))
    reader = data.draw(st.sampled_from(["config", "config", "config", "describe", "read"]))
    with replaced(cfg, raw):
        if reader == "config":
            check("test_adapter_config", lambda: read_config(adapter_copy), adapter_copy)
        elif reader == "describe":
            check("test_adapter_config", lambda: describe_adapter(adapter_copy), adapter_copy)
        else:
            check("test_adapter_config", lambda: read_adapter(adapter_copy, base_modules), adapter_copy)


@fuzz(500)
@given(st.data())
def test_adapter_weights(adapter_copy, base_modules, data):
    from edgelora.adapters import describe_adapter, read_adapter
    weights = adapter_copy / "adapter_model.safetensors"
    valid = weights.read_bytes()
    (n,) = struct.unpack("<Q", valid[:8])
    raw = data.draw(mutated_bytes(valid, focus=data.draw(st.sampled_from([8 + n, len(valid)]))))
    with replaced(weights, raw):
        check("test_adapter_weights", lambda: describe_adapter(adapter_copy), adapter_copy)
        check("test_adapter_weights", lambda: read_adapter(adapter_copy, base_modules), adapter_copy, count=False)


@pytest.mark.parametrize("layout", ["pickle_only", "no_config", "file", "missing", "config_dir"])
def test_adapter_folder_layouts(work, layout):
    from edgelora.adapters import read_config
    from edgelora.errors import PickleRefusedError
    d = work / f"layout-{layout}"
    shutil.rmtree(d, ignore_errors=True)
    if layout != "missing":
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj"]}))
    if layout == "pickle_only":
        (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")  # never unpickled
    elif layout == "no_config":
        (d / "adapter_config.json").unlink()
    elif layout == "file":
        shutil.rmtree(d)
        d.write_text("x")
    elif layout == "config_dir":
        (d / "adapter_config.json").unlink()
        (d / "adapter_config.json").mkdir()
    e = check("layouts", lambda: read_config(d), d)
    assert isinstance(e, EdgeLoraError)
    if layout == "pickle_only":
        assert isinstance(e, PickleRefusedError)


# ---------------------------------------------------------------------------------------------
# bundles
# ---------------------------------------------------------------------------------------------

MANIFEST_KEYS = ["format", "format_version", "quantization", "files", "tensors", "block_size", "nested_block_size",
                 "size", "sha256", "storage", "shape", "role"]


def _maybe_resealed(data, raw: bytes) -> bytes:
    """``raw`` as it is, or (half the time, when it is a JSON object) resealed with a valid digest, so
    that the structural checks behind the digest are reached too."""
    from edgelora.bundle import sealed_text
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if isinstance(value, dict) and data.draw(st.booleans()):
        try:
            return sealed_text(value).encode()
        except (ValueError, RecursionError):
            return raw
    return raw


def _open_bundle(path, verify):
    from edgelora.bundle import Bundle
    with Bundle(path, verify=verify) as b:
        for name in list(b.names())[:3]:
            e = b.entries[name]
            if e.storage == "nf4":
                b.nf4(name).absmax()
            else:
                b.tensor(name)


@fuzz(700)
@given(st.data())
def test_bundle_manifest(bundle_copy, data):
    mpath = bundle_copy / "manifest.json"
    base = json.loads(mpath.read_text())
    small = dict(base, tensors=dict(list(base["tensors"].items())[:3]))  # mutations then hit real entries
    raw = _maybe_resealed(data, data.draw(json_inputs(data.draw(st.sampled_from([base, small])), MANIFEST_KEYS)))
    verify = data.draw(st.sampled_from([False, True]))
    with replaced(mpath, raw):
        check("test_bundle_manifest", lambda: _open_bundle(bundle_copy, verify), bundle_copy)


@fuzz(500)
@given(st.data())
def test_bundle_weights_and_config(bundle_copy, data):
    """Damaged weights or config with the manifest's checksums updated to match, so that the
    structural checks behind the checksums are what is tested."""
    from edgelora.atomic import sha256_file
    which = data.draw(st.sampled_from(["model.safetensors", "model.safetensors", "config.json"]))
    path = bundle_copy / which
    valid = path.read_bytes()
    if which == "config.json":
        raw = data.draw(json_inputs(json.loads(valid), CONFIG_KEYS))
    else:
        (n,) = struct.unpack("<Q", valid[:8])
        raw = data.draw(mutated_bytes(valid, focus=8 + n))
    mpath = bundle_copy / "manifest.json"
    manifest = json.loads(mpath.read_text())
    with replaced(path, raw):
        manifest["files"][which] = {"size": len(raw), "sha256": sha256_file(path)}
        from edgelora.bundle import sealed_text
        with replaced(mpath, sealed_text(manifest).encode()):
            check("test_bundle_weights_and_config", lambda: _open_bundle(bundle_copy, True), bundle_copy)


def test_bundle_inconsistent_nf4_sizes_refused(bundle_copy, work):
    """NF4 parts too small for the manifest's shape are refused at open, before a kernel reads past them."""
    from edgelora.atomic import sha256_file
    from edgelora.bundle import Bundle
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile, write_safetensors
    bad = work / "bad-bundle"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(bundle_copy, bad)
    with SafetensorsFile(bundle_copy / "model.safetensors") as f:
        tensors = {n: np.array(f.raw(n)) for n in f.keys()}
    name = next(n[:-len(".nf4_codes")] for n in tensors if n.endswith(".nf4_codes"))
    tensors[name + ".nf4_codes"] = tensors[name + ".nf4_codes"][:7]
    write_safetensors(bad / "model.safetensors", tensors)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": (bad / "model.safetensors").stat().st_size,
                                              "sha256": sha256_file(bad / "model.safetensors")}
    reseal(bad / "manifest.json", manifest)
    with pytest.raises(FormatError, match="nf4_codes"):
        Bundle(bad)


# ---------------------------------------------------------------------------------------------
# deploy folders and archives
# ---------------------------------------------------------------------------------------------

DEPLOY_KEYS = ["format", "format_version", "device", "plan", "adapters", "files", "model", "context", "threads",
               "total_bytes", "adapter_bytes", "path", "bytes", "size", "sha256"]


@fuzz(800)
@given(st.data())
def test_deploy_manifest(deploy_copy, data):
    from edgelora.deployment import is_deploy, open_deploy
    mpath = deploy_copy / "manifest.json"
    base = json.loads(mpath.read_text())
    raw = _maybe_resealed(data, data.draw(json_inputs(base, DEPLOY_KEYS)))
    verify = data.draw(st.sampled_from([False, False, True]))
    with replaced(mpath, raw):
        assert is_deploy(deploy_copy) in (True, False)
        check("test_deploy_manifest", lambda: open_deploy(deploy_copy, verify=verify, device_check=False),
              deploy_copy)


DEVICE_TOML = """name = "host"
title = "x"
arch = "x86_64"
cpu = "y"
cores = 2
simd = ["avx2"]
ram_mib = 4096
app_share = 0.8
storage = "z"
storage_gb = 32
sources = ["https://example.org"]
"""
TOML_SNIPPETS = ["cores = 0", "cores = 99999999999999999999", "ram_mib = -1", "app_share = nan",
                 "app_share = inf", "storage_gb = inf", "arch = [1]", "name = \"../x\"", "simd = [1, 2]",
                 "name = 1979-05-27T07:32:00Z", "a = " + "[" * 5000 + "]" * 5000, "a = {b = {c = 1}}",
                 "[[x]]", "name = \"\"\"\n\"\"\"", "ram_mib = 0x10", "cores = 1_000"]


@fuzz(800)
@given(st.data())
def test_device_profile(deploy_copy, work, data):
    from edgelora.devices.profiles import Device
    valid = (deploy_copy / "device.toml").read_bytes() if data.draw(st.booleans()) else DEVICE_TOML.encode()
    lines = valid.decode().splitlines()
    raw = data.draw(st.one_of(
        mutated_bytes(valid),
        st.lists(st.sampled_from(lines + TOML_SNIPPETS), max_size=14).map(lambda ls: "\n".join(ls).encode()),
        st.binary(max_size=64)))
    path = work / "device.toml"
    path.write_bytes(raw)
    with traced():
        check("test_device_profile", lambda: Device.from_file(path), path, peak=MAX_PEAK)


def _tar(members) -> bytes:
    """A tar of ``(name, kind, payload)``: kind file | dir | symlink | hardlink | fifo | chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
                         "sparse": tarfile.GNUTYPE_SPARSE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload.decode("utf-8", "replace") or "/etc/passwd"
                tar.addfile(info)
            elif kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return buf.getvalue()


MEMBER_NAMES = ["deploy", "deploy/manifest.json", "deploy/model", "deploy/model/x", "../x", "deploy/../../x",
                "/etc/x", "deploy//x", "deploy/./x", "deploy/a\\b", "other/x", "deploy/" + "n" * 300,
                "deploy/" + "/".join(["d"] * 40), "deploy/é", "deploy/manifest.json/x", "C:x", "deploy/\udcff"]


@fuzz(500)
@given(st.data())
def test_unpack_archives(deploy_copy, work, data):
    from edgelora.deployment import unpack
    real = deploy_copy.with_name(deploy_copy.name + ".tar")
    kind = data.draw(st.sampled_from(["crafted", "crafted", "damaged", "real_plus"]))
    if kind == "crafted":
        members = data.draw(st.lists(st.tuples(st.sampled_from(MEMBER_NAMES) | st.text(max_size=10),
                                               st.sampled_from(["file", "file", "dir", "symlink", "hardlink",
                                                                "fifo", "chr", "sparse"]),
                                               st.binary(max_size=16)), max_size=6))
        raw = _tar(members)
    elif kind == "damaged":
        raw = data.draw(mutated_bytes(real.read_bytes(), focus=4096))
    else:  # the real archive with one hostile member appended
        name = data.draw(st.sampled_from(MEMBER_NAMES))
        extra = _tar([(name, data.draw(st.sampled_from(["file", "symlink", "hardlink", "dir"])), b"x")])
        body = real.read_bytes().rstrip(b"\0")
        raw = body + b"\0" * (-len(body) % 512) + extra
    archive = work / "a.tar"
    archive.write_bytes(raw)
    out = work / "unpacked"
    shutil.rmtree(out, ignore_errors=True)
    try:
        check("test_unpack_archives", lambda: unpack(archive, out), archive, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert not (work.parent / "x").exists() and not Path("/etc/x").exists()


def test_unpack_refuses_escapes(work):
    from edgelora.deployment import unpack
    from edgelora.errors import FormatError
    for members in ([("deploy", "dir", b""), ("deploy/../../escaped", "file", b"x")],
                    [("/tmp/escaped-abs", "file", b"x")],
                    [("deploy", "dir", b""), ("deploy/link", "symlink", b"/etc/passwd")],
                    [("deploy", "dir", b""), ("deploy/hard", "hardlink", b"../../etc/passwd")],
                    [("deploy/x", "file", b"1"), ("deploy/x", "file", b"2")],
                    [("deploy/x", "file", b"1"), ("deploy/x/y", "file", b"2")],
                    [("deploy/x", "file", b"1"), ("deploy/x", "dir", b"")],
                    [("deploy/sparse", "sparse", b"")]):
        archive = work / "escape.tar"
        archive.write_bytes(_tar(members))
        out = work / "escape-out"
        e = check("escapes", lambda: unpack(archive, out), archive)
        assert isinstance(e, FormatError), members
        assert not out.exists() and not (work.parent / "escaped").exists() and not Path("/tmp/escaped-abs").exists()


# ---------------------------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------------------------

TOKENIZER_KEYS = ["model", "type", "vocab", "merges", "added_tokens", "id", "content", "special", "tokenizer_class",
                  "bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder", "extra_special_tokens",
                  "additional_special_tokens", "chat_template", "eos_token_id", "bos_token_id", "model_type",
                  "split_special_tokens", "legacy", "add_prefix_space", "pre_tokenizer", "decoder", "normalizer",
                  "post_processor", "byte_fallback"]


@pytest.fixture(scope="module")
def tokenizer_copy(work):
    from edgelora.demo import packaged_demo_model
    dst = work / "tok"
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        # re-serialized as the test restores them, so that every example starts from the same bytes
        (dst / name).write_text(json.dumps(json.loads((packaged_demo_model() / name).read_text())))
    return dst


def _small_tokenizer_json(tj: dict) -> dict:
    """The demo's tokenizer.json with a vocabulary of a few entries, so that mutations hit structure."""
    tj = json.loads(json.dumps(tj))
    model = tj["model"]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = dict(list(model["vocab"].items())[:12])
    if isinstance(model.get("merges"), list):
        model["merges"] = model["merges"][:4]
    return tj


@fuzz(700, deadline_ms=10_000)
@given(st.data())
def test_tokenizer_files(tokenizer_copy, data):
    from edgelora.runtime.tokenizer import Tokenizer
    which = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "tokenizer_config.json",
                                       "generation_config.json", "config.json", "special_tokens_map.json",
                                       "chat_template.jinja"]))
    path = tokenizer_copy / which
    # the classes transformers rebuilds from the file's BPE (Qwen2's, and Llama's for a non-byte-level file)
    cls = data.draw(st.sampled_from([None, None, "Qwen2Tokenizer", "LlamaTokenizerFast"]))
    cfg_path = tokenizer_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())  # (files are only changed once every value is drawn)
    variant = cfg if cls is None else dict(cfg, tokenizer_class=cls)
    if which == "chat_template.jinja":
        raw = data.draw(st.binary(max_size=40) | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
    else:
        if which == "special_tokens_map.json":
            base = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
                    "extra_special_tokens": ["<x>"]}
        else:
            base = variant if which == "tokenizer_config.json" else json.loads(path.read_text())
            if which == "tokenizer.json":
                base = _small_tokenizer_json(base)
                if cls == "LlamaTokenizerFast":  # a non-byte-level file, which LlamaTokenizer rebuilds
                    base = json.loads(json.dumps(base).replace('"ByteLevel"', '"Metaspace"'))
        raw = data.draw(json_inputs(base, TOKENIZER_KEYS))
    try:
        cfg_path.write_text(json.dumps(variant))
        with replaced(path, raw):
            tok = check("test_tokenizer_files", lambda: Tokenizer.from_dir(tokenizer_copy), tokenizer_copy)
            if not isinstance(tok, EdgeLoraError):
                tok.decode(tok.encode("the cat sat"))
    finally:
        cfg_path.write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (the converter's reader)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_copy(work):
    from edgelora.demo import packaged_demo_model
    dst = work / "ckpt"
    shutil.copytree(packaged_demo_model(), dst)
    return dst


INDEX_KEYS = ["weight_map", "metadata", "total_size"]


@fuzz(500)
@given(st.data())
def test_checkpoint_folder(checkpoint_copy, data):
    from edgelora.converters.hf import HFCheckpoint
    which = data.draw(st.sampled_from(["index", "index", "config", "weights"]))
    weights = checkpoint_copy / "model.safetensors"
    index = checkpoint_copy / "model.safetensors.index.json"
    if which == "index":
        names = [n for n in json.loads(weights.read_bytes()[8:8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]])
                 if n != "__metadata__"]
        base = {"metadata": {"total_size": 1}, "weight_map": {n: "model.safetensors" for n in names[:4]}}
        target, raw = index, data.draw(json_inputs(base, INDEX_KEYS) | st.sampled_from(
            [json.dumps({"weight_map": {"a": v}}).encode()
             for v in ["../model.safetensors", "/etc/passwd", ".hidden", "sub/x.safetensors", "", "model.bin"]]))
    elif which == "config":
        target, raw = checkpoint_copy / "config.json", data.draw(json_inputs(_demo_config(), CONFIG_KEYS))
    else:
        valid = weights.read_bytes()
        target, raw = weights, data.draw(mutated_bytes(valid, focus=8 + struct.unpack("<Q", valid[:8])[0]))

    def run():
        with HFCheckpoint(checkpoint_copy) as ck:
            for name in list(ck.specs)[:2]:
                ck.tensor(name)
    with replaced(target, raw):
        check("test_checkpoint_folder", run, checkpoint_copy)


def test_pickle_checkpoint_refused_never_loaded(work):
    import pickle  # only to write the file: nothing here loads it
    from edgelora.converters.hf import HFCheckpoint
    from edgelora.errors import PickleRefusedError
    d = work / "pickle-ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_demo_config()))
    marker = work / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PickleRefusedError, match=str(d)):
        HFCheckpoint(d)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# hostile configurations (issue 16): regexes, templates, manifest flips, size bombs
# ---------------------------------------------------------------------------------------------

REGEX_ATOMS = ["q_proj", "v_proj", "lm_head", "layers", r"\.", ".", ".*", ".+", "a", "x", r"\d", r"\d+", "[a-z]",
               "[^.]", "(", ")", "(?:", "|", "*", "+", "?", "{2,}", "{0,99}", "$", "^", r"\1", "(.*.*)*", "(a+)+",
               "(x|x)*", "(.*)*", "(\\w+\\.?)+", "(?=q)", "(?P<idx>\\d+)", "mlp", "self_attn"]
REGEX_FIELDS = ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layers_pattern"]
regexes = st.lists(st.sampled_from(REGEX_ATOMS), min_size=1, max_size=8).map("".join) | st.sampled_from(
    ["(.*.*)*q", "(.*a){25}", "(a|a?)+$", "((.*)*)*z", "(\\w|\\.)*X", ".*" * 30 + "Q"])


@pytest.fixture(scope="module")
def short_regex_budget():
    import edgelora.adapters as adapters
    before, adapters.REGEX_SECONDS = adapters.REGEX_SECONDS, 0.5
    yield
    adapters.REGEX_SECONDS = before


@fuzz(250, deadline_ms=20_000)
@given(st.data())
def test_adapter_regexes(adapter_copy, base_modules, short_regex_budget, data):
    """A regular expression in any field matched as one: the reader answers (or refuses, naming the
    config) within the deadline, however the pattern backtracks."""
    from edgelora.adapters import read_adapter
    cfg_path = adapter_copy / "adapter_config.json"
    base = json.loads(cfg_path.read_text())
    field, pattern = data.draw(st.sampled_from(REGEX_FIELDS)), data.draw(regexes)
    value = {"rank_pattern": {pattern: 4}, "alpha_pattern": {pattern: 8.0}, "modules_to_save": [pattern]}.get(
        field, pattern)
    cfg = dict(base, **{field: value})
    if field == "layers_pattern":
        cfg["layers_to_transform"] = [0]
        cfg["target_modules"] = ["q_proj"]
    with replaced(cfg_path, json.dumps(cfg).encode()):
        check("test_adapter_regexes", lambda: read_adapter(adapter_copy, base_modules), adapter_copy)


TEMPLATE_PIECES = ["{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
                   "{{ 'x' * 300000000 }}", "{{ [1] * 10**9 }}", "{{ '{:>2000000000}'.format(1) }}",
                   "{{ '{:{}}'.format(1, 10**9) }}", "{{ (2**100000)|string }}", "{{ 10**10**10 }}",
                   "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                   "{{ lipsum(10**6) }}", "{{ 'x'|center(2000000000) }}", "{{ '%2000000000d' % 1 }}",
                   "{{ '%*d' % (10**9, 1) }}", "{{ 'x'.ljust(10**9) }}", "{{ 'ab'|indent(10**9) }}",
                   "{{ '%s'|format(1) }}", "{{ 'a'|wordwrap(10**9) }}", "{{ 'ab'.replace('a', 'a' * 5000) }}",
                   "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                   "{{ range(10**9)|list }}", "{{ raise_exception('no') }}", "{{ messages|tojson }}", "{{ x.__class__ }}",
                   "{% if add_generation_prompt %}A:{% endif %}", "{{ bos_token }}", "{{", "{% for %}", "{{ 1/0 }}"]


@pytest.fixture(scope="module")
def small_template_budget():
    import edgelora.runtime.tokenizer as tk
    before = tk.TEMPLATE_STEPS, tk.TEMPLATE_SECONDS
    tk.TEMPLATE_STEPS, tk.TEMPLATE_SECONDS = 300_000, 2.0
    yield
    tk.TEMPLATE_STEPS, tk.TEMPLATE_SECONDS = before


@fuzz(600, deadline_ms=20_000)
@given(st.data())
def test_chat_templates(tokenizer_copy, small_template_budget, data):
    """Chat templates assembled from pieces built to exhaust memory or time: rendering answers or
    refuses (a FormatError naming the template file) within the deadline and never aborts."""
    from edgelora.runtime.tokenizer import Tokenizer
    template = "".join(data.draw(st.lists(st.sampled_from(TEMPLATE_PIECES), min_size=1, max_size=3)))
    with replaced(tokenizer_copy / "chat_template.jinja", template.encode()):
        tok = Tokenizer.from_dir(tokenizer_copy)
        check("test_chat_templates",
              lambda: tok.apply_chat_template([{"role": "user", "content": "hi"}]), "chat_template.jinja", "template")


@fuzz(600)
@given(st.data())
def test_manifest_byte_flips(bundle_copy, deploy_copy, data):
    """One flipped byte anywhere in a bundle's or a deploy folder's manifest is always refused."""
    folder = data.draw(st.sampled_from([bundle_copy, deploy_copy]))
    mpath = folder / "manifest.json"
    raw = mpath.read_bytes()
    pos, bit = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 7))
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit

    def open_it():
        if folder == deploy_copy:
            from edgelora.deployment import open_deploy
            open_deploy(folder, verify=False, device_check=False)
        else:
            _open_bundle(folder, False)
    with replaced(mpath, bytes(flipped)):
        e = check("test_manifest_byte_flips", open_it, folder)
    assert isinstance(e, EdgeLoraError), f"a flip of bit {bit} at byte {pos} went undetected"


@fuzz(120, deadline_ms=20_000)
@given(st.data())
def test_size_bombs(work, bundle_copy, adapter_copy, base_modules, data):
    """Inputs that declare enormous sizes cheaply: refused before the work or memory they declare."""
    from edgelora.atomic import sha256_file
    from edgelora.bundle import sealed_text
    from edgelora.safetensors_io import MAX_TENSORS, SafetensorsFile
    kind = data.draw(st.sampled_from(["tensors", "layers", "adapter", "context"]))
    if kind == "tensors":  # a legal header of many empty tensors
        n = data.draw(st.sampled_from([MAX_TENSORS + 1, 2 * MAX_TENSORS, 300_000]))
        header = "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
        path = work / "many.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
        with traced():
            check("test_size_bombs", lambda: SafetensorsFile(path), path, peak=MAX_PEAK + 4 * len(header))
    elif kind in ("layers", "context"):  # a config of many layers, or a context beyond memory
        cpath, mpath = bundle_copy / "config.json", bundle_copy / "manifest.json"
        cfg, manifest = json.loads(cpath.read_text()), json.loads(mpath.read_text())
        if kind == "layers":
            cfg["num_hidden_layers"] = data.draw(st.sampled_from([10**6, 2**31 - 1, 5000]))
        else:
            cfg["max_position_embeddings"] = 2**31 - 1
        raw = json.dumps(cfg).encode()
        with replaced(cpath, raw):
            manifest["files"]["config.json"] = {"size": len(raw), "sha256": sha256_file(cpath)}
            with replaced(mpath, sealed_text(manifest).encode()):
                if kind == "layers":
                    check("test_size_bombs", lambda: _open_bundle(bundle_copy, True), bundle_copy)
                else:
                    import edgelora
                    ctx = data.draw(st.sampled_from([10**9, 2 * 10**9, 2**31 - 1]))
                    check("test_size_bombs", lambda: edgelora.load(bundle_copy, max_context=ctx, warmup=False),
                          bundle_copy)
    else:  # an adapter whose header declares gigabytes, sparse on disk, against a budget
        from edgelora.adapters import min_resident_bytes
        wpath = adapter_copy / "adapter_model.safetensors"
        n = data.draw(st.sampled_from([10**9, 5 * 10**9, 2**40 // 2]))
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        header = json.dumps({name: {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
        original = wpath.read_bytes()
        try:
            with open(wpath, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header)
                f.truncate(8 + len(header) + 2 * n)
            with traced():
                sized = check("test_size_bombs", lambda: min_resident_bytes(adapter_copy), adapter_copy,
                              peak=MAX_PEAK)
            assert sized == 2 * n
        finally:
            wpath.write_bytes(original)


# ---------------------------------------------------------------------------------------------
# audits
# ---------------------------------------------------------------------------------------------

def test_no_code_path_unpickles():
    """No module of the package loads a pickle (the one ``torch.load`` is in a hint printed to the user)."""
    import re
    from conftest import ROOT
    pattern = re.compile(r"\b(pickle|cPickle|dill|joblib|marshal|shelve)\.(load|loads|Unpickler)\b|torch\.load\(|"
                         r"allow_pickle\s*=\s*True|yaml\.load\(|\beval\(|\bexec\(")
    hits = []
    for folder in ("edgelora", "runtime", "converters", "devices"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "python -c" not in line and "save_file(torch.load(" not in line:
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits


def test_cli_documents_every_exit_code():
    import inspect as _inspect
    import re
    import edgelora.cli
    import edgelora.errors
    doc = edgelora.cli.__doc__
    for name, cls in vars(edgelora.errors).items():
        if _inspect.isclass(cls) and issubclass(cls, EdgeLoraError):
            assert re.search(rf"(?:^|[\s;]){cls.exit_code} \w", doc), (name, cls.exit_code)


# ---------------------------------------------------------------------------------------------
# the count
# ---------------------------------------------------------------------------------------------

def test_zz_at_least_min_inputs_were_thrown():
    """Every fuzz test above ran all its examples: at least MIN_INPUTS malformed inputs in all."""
    if set(EXPECTED) - set(COUNT):
        pytest.skip(f"not every fuzz test ran in this session ({sorted(set(EXPECTED) - set(COUNT))})")
    total = sum(COUNT[name] for name in EXPECTED)
    print(f"fuzz inputs thrown at the readers: {total}")
    for name in EXPECTED:
        print(f"  {name}: {COUNT[name]} {OUTCOMES.get(name)}")
    assert total >= MIN_INPUTS * min(SCALE, 1)
