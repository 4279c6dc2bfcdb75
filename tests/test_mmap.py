"""Weights read into memory (``mmap=False``, llama.cpp's ``--no-mmap``) instead of mapped: the same
bytes, so the same logits and tokens bit for bit; a file cut short after opening is an error."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import demo_bundle_path


def test_read_weights_give_the_mapped_results_bit_for_bit():
    import edgelora
    path = demo_bundle_path()
    mapped, read = edgelora.load(path, mmap=True), edgelora.load(path, mmap=False)
    assert read.bundle.weights._mm is None and not read.bundle.weights.mapped
    lin = read.net.w.layers[0].q
    assert lin.packed.flags.owndata or lin.packed.base.flags.owndata  # an array of its own, not a view of a mapping
    assert not lin.packed.flags.writeable
    ids = mapped.encode("Once upon a time")
    assert np.array_equal(mapped.logits(ids), read.logits(ids))
    assert mapped.generate(ids, max_new_tokens=12) == read.generate(ids, max_new_tokens=12)


def test_a_tensor_is_read_once():
    from edgelora.bundle import Bundle
    b = Bundle(demo_bundle_path(), mmap=False)
    name = next(iter(b.weights.keys()))
    assert np.shares_memory(b.weights.raw(name), b.weights.raw(name))


def test_cli_run_no_mmap_prints_the_same_text():
    path = str(demo_bundle_path())
    outs = [subprocess.run([sys.executable, "-m", "edgelora", "run", path, "-p", "Once upon", "-n", "8", *flag],
                           capture_output=True, text=True, timeout=300) for flag in ([], ["--no-mmap"])]
    assert all(o.returncode == 0 for o in outs), outs[1].stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.strip()


def test_file_cut_short_after_opening_is_a_clear_error(tmp_path):
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile
    src = demo_bundle_path() / "model.safetensors"
    copy = tmp_path / "model.safetensors"
    shutil.copy(src, copy)
    st = SafetensorsFile(copy, mmap=False)
    last = max(st.tensors.values(), key=lambda t: t.end)
    with open(copy, "r+b") as f:
        f.truncate(st.data_start + last.end - 1)
    with pytest.raises(FormatError, match="truncated"):
        st.raw(last.name)
    st.close()
