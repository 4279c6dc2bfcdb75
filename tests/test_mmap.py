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


def test_rows_read_from_the_file_are_the_mapped_rows(tmp_path, monkeypatch):
    """``read_rows`` (the lookups of an embedding whose pages were let go) gives the mapped rows of
    any ids, as NumPy's indexing (negative ids from the end, any shape), through ``pread`` or
    without it (Windows); out-of-range ids are an IndexError, a row cut off a clear error."""
    import os
    from safetensors.numpy import save_file
    from edgelora.errors import FormatError
    from edgelora.safetensors_io import SafetensorsFile
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((5, 3)).astype(np.float32),
               "w": rng.standard_normal((300, 24)).astype(np.float16),
               "z": rng.standard_normal((7, 2, 4)).astype(np.float16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        for name, t in tensors.items():
            n = len(t)
            for ids in ([0], [n - 1, 0, n - 1, 1], [[1, 2], [-1, -n]], np.arange(n)[::-3], np.zeros(0, np.int64)):
                got = f.read_rows(name, ids)
                assert got.dtype == t.dtype and np.array_equal(got, t[np.asarray(ids, np.int64)])
        with monkeypatch.context() as m:
            m.delattr(os, "pread")
            assert np.array_equal(f.read_rows("w", [7, 3, 7]), tensors["w"][[7, 3, 7]])
        for bad in ([300], [-301]):
            with pytest.raises(IndexError):
                f.read_rows("w", bad)
        with pytest.raises(FormatError, match="no tensor"):
            f.read_rows("nope", [0])
    with SafetensorsFile(path, mmap=False) as f:
        info = f.tensors["z"]
        os.truncate(path, f.data_start + info.begin + 8)
        assert info.begin > f.tensors["w"].begin
        with pytest.raises(FormatError, match="truncated"):
            f.read_rows("z", [3])


@pytest.mark.parametrize("mmap", [True, False])
def test_repacked_weights_let_their_stored_pages_go(monkeypatch, mmap):
    """Where the int8 products repack NF4 weights into tiles (``int8.TILED``), the loader lets each
    weight's stored arrays' pages go once it is repacked: every array of it, once; nothing where
    the weights were read into memory, nor for exact products. The pages let go stay readable:
    the exact products (training's) read them again, the stored bytes' bits."""
    import edgelora
    from edgelora.runtime import int8 as I8
    from edgelora.runtime.kernels import NF4Linear
    from edgelora.runtime.linear import exact_linear
    from edgelora.safetensors_io import SafetensorsFile
    released = []
    real = SafetensorsFile.release
    monkeypatch.setattr(SafetensorsFile, "release",
                        lambda self, name, *a: released.append(name) or real(self, name, *a))
    for products in ("int8", "exact"):
        released.clear()
        model = edgelora.load(demo_bundle_path(), products=products, warmup=False, mmap=mmap)
        lins = {m + ".weight": getattr(L, f) for i, L in enumerate(model.net.w.layers)
                for f, m in model.net.names[i].items()}
        tiled = {name for name, lin in lins.items() if getattr(lin, "tiled", False)}
        assert tiled == (set(lins) if I8.TILED and products == "int8" else set())
        keys = [key for name in sorted(tiled) for key in model.bundle.storage(name).keys(name)]
        assert sorted(n for n in released if n in set(keys)) == (sorted(keys) if mmap else [])
        rng = np.random.default_rng(0)
        for name, lin in lins.items():
            x = rng.standard_normal(lin.in_features).astype(np.float32)
            again = NF4Linear(model.bundle.nf4(name))  # the stored bytes, read afresh
            assert np.array_equal(exact_linear(lin).matvec(x), again.matvec(x))
