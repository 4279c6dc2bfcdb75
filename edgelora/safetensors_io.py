"""A bounds-checked, memory-mapped safetensors reader and a seekable writer.

Format (https://github.com/huggingface/safetensors, README "Format"): an unsigned little-endian
64-bit header length N, N bytes of UTF-8 JSON mapping tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the byte after the header) plus an optional
``"__metadata__"`` map of strings, then the data buffer, which the tensors must cover exactly.

The reader validates the whole header before it maps anything and returns NumPy views into a
read-only ``mmap`` of the file: no tensor is copied into the Python heap. bfloat16 has no NumPy
dtype; such tensors come back as ``uint16`` bit patterns and :meth:`SafetensorsFile.float32`
widens them exactly. The writer lays tensors out largest item size first, so every tensor starts
at an offset aligned to its own item size, and accepts their data in any order.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap  # (``mmap`` is a parameter name below)
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.config import open_regular, parse_json_object
from edgelora.errors import FormatError, UnsupportedError

# safetensors dtype name -> (numpy dtype used for the raw view, item size)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NUMPY_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
               np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
               np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
               np.dtype("?"): "BOOL"}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
#: the most tensors a file may declare (a 70B model's NF4 bundle has under 4,000): counted in the raw
#: header before it is parsed, so a legal 95 MiB header of a million empty tensors costs no parse
MAX_TENSORS = 1 << 16
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (round to nearest even), as torch does."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def parse_header(raw: bytes, data_size: int, path) -> tuple[dict, dict[str, TensorInfo]]:
    """Validate a safetensors JSON header against a data buffer of ``data_size`` bytes."""
    declared = raw.count(b"data_offsets")
    if declared > MAX_TENSORS:
        raise FormatError(f"header declares {declared:,} tensors, more than the {MAX_TENSORS:,} edgelora reads", path)
    header = parse_json_object(raw, path, "safetensors header", "; the file is corrupt")
    if len(header) > MAX_TENSORS + 1:  # names whose keys were escaped past the count above
        raise FormatError(f"header declares {len(header):,} tensors, more than the {MAX_TENSORS:,} edgelora reads", path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError("safetensors __metadata__ must map strings to strings", path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"tensor {name!r}: header entry is not an object", path)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise UnsupportedError(f"tensor {name!r}: unsupported dtype {dtype!r}", path)
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise FormatError(f"tensor {name!r}: invalid shape {shape!r}", path)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FormatError(f"tensor {name!r}: invalid data_offsets {offsets!r}", path)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise FormatError(f"tensor {name!r}: data_offsets {offsets} fall outside the {data_size}-byte "
                              f"data buffer; the file is truncated or corrupt", path)
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise FormatError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} "
                              f"(expected {expected})", path)
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            what = "overlaps another tensor" if info.begin < cursor else "leaves a gap before it"
            raise FormatError(f"tensor {info.name!r} {what}; the file is corrupt", path)
        cursor = info.end
    if cursor != data_size:
        raise FormatError(f"data buffer is {data_size} bytes but tensors cover {cursor}; "
                          f"the file is truncated or has trailing bytes", path)
    return meta, tensors


class SafetensorsFile:
    """A read-only safetensors file, memory-mapped. Use as a context manager or call :meth:`close`.

    ``mmap=False`` reads each tensor into process memory instead, once, when it is first asked for
    (llama.cpp's ``--no-mmap``): large NumPy arrays get transparent huge pages on Linux, and a page
    cache mapping does not, which makes streaming reads of the weights up to 1.7x faster on x86-64
    servers (bench/README.md); the mapping shares the page cache and starts instantly."""

    def __init__(self, path, mmap: bool = True):
        self.path = Path(path)
        self.mapped = bool(mmap)
        self._copies: dict[str, np.ndarray] = {}
        self._position = threading.Lock()  # the file position, for ``read_rows`` without ``pread``
        self._fh = open_regular(self.path)
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < 8:
                raise FormatError(f"only {size} bytes: too short for a safetensors file (truncated?)", self.path)
            (n,) = struct.unpack("<Q", self._fh.read(8))
            if n > MAX_HEADER or n > size - 8:
                raise FormatError(f"header length {n} exceeds the file size {size} or the 100 MiB limit; "
                                  f"not a safetensors file, or truncated", self.path)
            raw = self._fh.read(n)
            self.data_start = 8 + n
            self.size = size
            self.metadata, self.tensors = parse_header(raw, size - self.data_start, self.path)
            try:
                self._mm = _mmap.mmap(self._fh.fileno(), 0, access=_mmap.ACCESS_READ) if size and mmap else None
            except OSError as e:  # ENOMEM: an address space limit (ulimit -v) smaller than the file
                raise FormatError(f"cannot map the file ({e.strerror or e}); load with mmap=False (--no-mmap) to "
                                  f"read tensors as they are used instead", self.path) from None
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        # Views handed out keep the mapping alive; closing only drops our references.
        self._mm = None
        self._copies = {}
        if self._fh:
            self._fh.close()
            self._fh = None

    def check_unchanged(self) -> None:
        """Raise ``FormatError`` when the mapped file has shrunk since it was opened: a read of a page
        past its new end would end the process with SIGBUS (a file read into memory, ``mmap=False``,
        is not at risk). One ``fstat``."""
        if self._mm is None or self._fh is None:
            return
        size = os.fstat(self._fh.fileno()).st_size
        if size < self.size:
            raise FormatError(f"the file was truncated to {size} of its {self.size} bytes while this process has it "
                              f"mapped; replace it and load again, or load with mmap=False (--no-mmap) to read the "
                              f"weights into memory so that changes to the file cannot affect a running model",
                              self.path)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def raw(self, name: str) -> np.ndarray:
        """A tensor's data, read-only (bfloat16 as uint16 bit patterns): a zero-copy view of the
        mapping, or with ``mmap=False`` the one copy read into memory."""
        info = self.tensors.get(name)
        if info is None:
            raise FormatError(f"no tensor named {name!r}", self.path)
        dtype = DTYPES[info.dtype]
        if not info.numel:
            arr = np.zeros(0, dtype)
        elif self.mapped:
            arr = np.frombuffer(self._mm, dtype=dtype, count=info.numel, offset=self.data_start + info.begin)
        else:
            arr = self._copies.get(name)
            if arr is None:
                arr = self._copies[name] = self._read(info, dtype)
        return arr.reshape(info.shape)

    def read_rows(self, name: str, ids) -> np.ndarray:
        """Rows ``ids`` (any shape of ints; negative ones count from the end, as NumPy's) of a tensor,
        ``[*ids.shape, *row]``, read from the file (``pread``, once per distinct row) rather than
        through the mapping: they do not enter this process's resident set, whose pages of a tensor
        :meth:`release` let go (a mapped page comes back with its whole large folio of the page cache,
        so a few hundred scattered rows would map most of a 0.5 GB embedding)."""
        info = self.tensors.get(name)
        if info is None or not info.shape:
            raise FormatError(f"no tensor named {name!r} with rows", self.path)
        n, dtype = info.shape[0], DTYPES[info.dtype]
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"row index out of range for tensor {name!r} of {n} rows")
        row = info.nbytes // n if n else 0
        distinct, where = np.unique(ids % n if n else ids, return_inverse=True)
        out = np.empty((distinct.size, row), np.uint8)
        for j, i in enumerate(distinct.tolist()):
            at = self.data_start + info.begin + i * row
            if hasattr(os, "pread"):  # (no file position: threads may read at once)
                data = os.pread(self._fh.fileno(), row, at)
                got = len(data)
                out[j, :got] = np.frombuffer(data, np.uint8)
            else:  # Windows
                with self._position:
                    self._fh.seek(at)
                    got = self._fh.readinto(memoryview(out[j]))
            if got != row:
                raise FormatError(f"tensor {name!r}: read {got} of row {i}'s {row} bytes; the file was truncated "
                                  f"after it was opened", self.path)
        return out.view(dtype).reshape(distinct.size, *info.shape[1:])[where.reshape(ids.shape)]

    def _read(self, info: TensorInfo, dtype) -> np.ndarray:
        arr = np.empty(info.numel, dtype)
        view = memoryview(arr).cast("B")
        self._fh.seek(self.data_start + info.begin)
        got = self._fh.readinto(view)
        if got != info.nbytes:
            raise FormatError(f"tensor {info.name!r}: read {got} of its {info.nbytes} bytes; the file was truncated "
                              f"after it was opened", self.path)
        arr.flags.writeable = False
        return arr

    def float32(self, name: str) -> np.ndarray:
        """A tensor widened to float32 (a copy, except for float32 tensors, which stay views)."""
        info = self.tensors[name] if name in self.tensors else None
        if info is None:
            raise FormatError(f"no tensor named {name!r}", self.path)
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16", self.path)
        raw = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_float32(raw)
        return raw if info.dtype == "F32" else raw.astype(np.float32)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Tell the kernel we are done with bytes ``[first, last)`` of a tensor (all of it by default),
        so that its pages leave this process's resident set. Reading them again stays valid."""
        info = self.tensors.get(name)
        if info is None or self._mm is None or not hasattr(self._mm, "madvise"):
            return
        page = _mmap.PAGESIZE
        end = self.data_start + info.begin + (info.nbytes if last is None else min(last, info.nbytes))
        start = (self.data_start + info.begin + first) // page * page
        if end > start:
            self._mm.madvise(_mmap.MADV_DONTNEED, start, end - start)


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front; data may arrive in any order.

    ``entries`` is a list of ``(name, safetensors dtype, shape)``. Call :meth:`write` once per
    tensor (optionally in several row-ordered pieces with ``offset``), then :meth:`close`, which
    checks every byte was written and fsyncs.
    """

    def __init__(self, path, entries, metadata: dict | None = None):
        self.path = Path(path)
        order = sorted(range(len(entries)), key=lambda i: -DTYPES[entries[i][1]].itemsize)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        cursor = 0
        self._layout: dict[str, tuple[int, int, str]] = {}
        for i in order:
            name, dtype, shape = entries[i]
            if name in self._layout:
                raise ValueError(f"duplicate tensor name {name!r}")
            size = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [cursor, cursor + size]}
            self._layout[name] = (cursor, size, dtype)
            cursor += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.total = self.data_start + cursor
        self._written = {name: 0 for name in self._layout}
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self.total)

    def write(self, name: str, data: np.ndarray, offset: int = 0) -> None:
        begin, size, dtype = self._layout[name]
        buf = np.ascontiguousarray(data)
        if dtype != "BF16" and buf.dtype != DTYPES[dtype]:
            raise TypeError(f"{name}: got {buf.dtype}, layout says {dtype}")
        if offset + buf.nbytes > size:
            raise ValueError(f"{name}: {offset + buf.nbytes} bytes exceed its {size}")
        if buf.nbytes:  # memoryview cannot cast an empty array with a zero in its shape
            self._fh.seek(self.data_start + begin + offset)
            self._fh.write(memoryview(buf).cast("B"))
        self._written[name] += buf.nbytes

    def close(self) -> None:
        missing = [n for n, (b, size, d) in self._layout.items() if self._written[n] != size]
        if missing:
            self._fh.close()
            raise ValueError(f"tensors not fully written: {missing[:5]}")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a dict of NumPy arrays (small files: configs, tests)."""
    entries = [(name, NUMPY_TO_ST[np.dtype(a.dtype).newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype],
                a.shape) for name, a in tensors.items()]
    w = SafetensorsWriter(path, entries, metadata)
    for name, a in tensors.items():
        w.write(name, a)
    w.close()
