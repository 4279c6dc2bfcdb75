"""NF4 blockwise quantization with double-quantized scales, bit-for-bit as bitsandbytes does it on CPU.

The quantizer of the format (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3) that
``edgelora/storage.py`` stores and dequantizes:

* A weight tensor is flattened row-major and cut into blocks of ``block_size`` values (64 by
  default). Each block keeps its absolute maximum; each value is divided by it and replaced by the
  index of the nearest of the 16 NormalFloat values (``NF4_CODE``), ties going to the lower code.
  Two 4-bit codes share a byte, the first element in the HIGH nibble; an odd count is padded with
  code 7 (the value 0.0).
* Double quantization: the float32 absmaxes lose their mean (``offset``), and what is left is
  quantized to 8 bits with the signed dynamic map (``DYNAMIC_CODE``, Dettmers 2016,
  arXiv:1511.04561) in blocks of 256, keeping one float32 absmax per 256 blocks
  (``nested_scales``). About 4.127 bits per weight with 64-blocks.
* Dequantization (``storage.NF4Tensor.dequantize``): ``scale[i] = DYNAMIC_CODE[scales[i]] *
  nested_scales[i // 256] + offset`` and ``w = NF4_CODE[code] * scale[block]``, all in float32.

Exactness notes, established against bitsandbytes 0.50 on CPU (see ``tests/test_nf4_codec.py``):

* Full 4-bit blocks multiply by the float32 reciprocal of the absmax (clamped to 1e-38 before the
  reciprocal, stored unclamped); a trailing partial block divides by its absmax and stores the
  clamped value.
* The 8-bit step is not a nearest-value search: the scaled value indexes a 65536-entry table over
  [-1, 1], ``j = uint16((v + 1) * 0.5 * 65535 + 0.5)`` in float32, whose entries hold the first
  code whose midpoint with its successor is not below ``-1 + 2j / 65535``. A 256-block whose
  absmax is 0 gets code 0.
* The offset is PyTorch's float32 ``mean``: ``sum / n`` where ``sum`` is PyTorch's cascade
  summation over vectors of its float width (ATen ``SumKernel.cpp``: 4-way interleave, 4 levels
  of 16-step partial sums), split across threads when there are more than 32768 absmaxes.
  bitsandbytes' own offset therefore depends on torch's thread count for tensors above 2M
  weights, and on its vector width: 8 lanes on x86-64, 4 on aarch64 (NEON). edgelora uses the
  single-thread, 8-lane order by default (``sum_threads=1``, ``sum_lanes=8``) so that its output
  is the same on every machine (the one x86-64 bitsandbytes gives; the arm64 proof run found the
  4-lane order, which ``sum_lanes=4`` reproduces).

Every Numba kernel here has a plain-NumPy twin (``*_reference``); the tests prove them equal and
compare both with bitsandbytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgelora.errors import QuantizationError, UsageError
from edgelora.storage import DYNAMIC_CODE, NESTED_BLOCK_SIZE, NF4_CODE, SUPPORTED_BLOCK_SIZES, NF4Tensor

#: Decision boundaries between neighbouring NF4 values (float32 midpoints).
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

_LUT_SIZE = 65536
_TINY = np.float32(1e-38)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FHALF = np.float32(0.5)
_FLUT = np.float32(_LUT_SIZE - 1)
# Above this many elements PyTorch splits a reduction across threads (at::internal::GRAIN_SIZE).
_TORCH_GRAIN = 32768


def _build_dynamic_lut(code: np.ndarray) -> np.ndarray:
    """The 65536-entry table that maps ``uint16((v+1)/2*65535+0.5)`` to an 8-bit code."""
    mid = (_FHALF * (code[:-1] + code[1:])).astype(np.float32)
    j = np.arange(_LUT_SIZE, dtype=np.float32)  # exact: every j < 2**24
    val = (np.float32(-1.0) + (np.float32(2.0) * j) / _FLUT).astype(np.float32)
    # first code index whose midpoint is not below val
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


DYNAMIC_LUT = _build_dynamic_lut(DYNAMIC_CODE)


# ---------------------------------------------------------------------------------------------
# PyTorch-compatible float32 sum (for the double-quantization offset)
# ---------------------------------------------------------------------------------------------

SUM_LANES = 8  # PyTorch's float vector width on x86-64 (Vectorized<float>); 4 on aarch64

def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


def _row_sum_reference(rows: np.ndarray) -> np.ndarray:
    """ATen ``row_sum``: a 4-way interleaved, 4-level cascade sum over ``rows`` (``[size, lanes]``)."""
    size, lanes = rows.shape
    size_ilp = size // 4
    power = max(4, _ceil_log2(size_ilp) // 4)
    step = 1 << power
    acc = np.zeros((4, 4, lanes), np.float32)
    i = 0
    while i + step <= size_ilp:
        for _ in range(step):
            acc[0] += rows[4 * i:4 * i + 4]
            i += 1
        for j in range(1, 4):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & ((step - 1) << (j * power)):
                break
    while i < size_ilp:
        acc[0] += rows[4 * i:4 * i + 4]
        i += 1
    for j in range(1, 4):
        acc[0] += acc[j]
    partial = acc[0]
    for k in range(size_ilp * 4, size):
        partial[0] += rows[k]
    for k in range(1, 4):
        partial[0] += partial[k]
    return partial[0]


def _torch_sum_serial_reference(x: np.ndarray, lanes: int) -> np.float32:
    n = x.size
    if n < lanes:
        return np.float32(_row_sum_reference(x.reshape(n, 1))[0])
    nv = n // lanes
    vec = _row_sum_reference(x[: nv * lanes].reshape(nv, lanes))
    total = np.float32(0)
    for k in range(nv * lanes, n):
        total = np.float32(total + x[k])
    for lane in range(lanes):
        total = np.float32(total + vec[lane])
    return total


def torch_sum_reference(x: np.ndarray, threads: int = 1, lanes: int = SUM_LANES) -> np.float32:
    """float32 sum in exactly PyTorch's CPU order (one-dimensional contiguous input) for a torch
    whose float vectors have ``lanes`` lanes."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    n = x.size
    if n < _TORCH_GRAIN or threads <= 1:
        return _torch_sum_serial_reference(x, lanes)
    used = min(threads, -(-n // _TORCH_GRAIN))
    chunk = -(-n // used)
    parts = np.zeros(threads, np.float32)
    for t in range(used):
        if t * chunk < n:
            parts[t] = _torch_sum_serial_reference(x[t * chunk: min(n, (t + 1) * chunk)], lanes)
    return _torch_sum_serial_reference(parts, lanes)


@njit(cache=True)
def _row_sum_nb(x, start, size, lanes, out):
    # out[lanes] <- row_sum over `size` vectors of `lanes` float32 starting at x[start]
    size_ilp = size // 4
    cl = 1
    if size_ilp > 2:
        cl = 0
        v = size_ilp - 1
        while v > 0:
            cl += 1
            v >>= 1
    power = max(4, cl // 4)
    step = 1 << power
    acc = np.zeros((4, 4, lanes), np.float32)
    i = 0
    while i + step <= size_ilp:
        for _ in range(step):
            for k in range(4):
                base = start + (4 * i + k) * lanes
                for lane in range(lanes):
                    acc[0, k, lane] += x[base + lane]
            i += 1
        for j in range(1, 4):
            for k in range(4):
                for lane in range(lanes):
                    acc[j, k, lane] += acc[j - 1, k, lane]
                    acc[j - 1, k, lane] = 0
            if i & ((step - 1) << (j * power)):
                break
    while i < size_ilp:
        for k in range(4):
            base = start + (4 * i + k) * lanes
            for lane in range(lanes):
                acc[0, k, lane] += x[base + lane]
        i += 1
    for j in range(1, 4):
        for k in range(4):
            for lane in range(lanes):
                acc[0, k, lane] += acc[j, k, lane]
    for r in range(size_ilp * 4, size):
        for lane in range(lanes):
            acc[0, 0, lane] += x[start + r * lanes + lane]
    for k in range(1, 4):
        for lane in range(lanes):
            acc[0, 0, lane] += acc[0, k, lane]
    for lane in range(lanes):
        out[lane] = acc[0, 0, lane]


@njit(cache=True)
def _torch_sum_serial_nb(x, start, n, lanes):
    if n < lanes:
        one = np.zeros(1, np.float32)
        _row_sum_nb(x, start, n, 1, one)
        return one[0]
    nv = n // lanes
    vec = np.zeros(lanes, np.float32)
    _row_sum_nb(x, start, nv, lanes, vec)
    total = np.float32(0.0)
    for k in range(nv * lanes, n):
        total += x[start + k]
    for lane in range(lanes):
        total += vec[lane]
    return total


@njit(cache=True)
def _torch_sum_nb(x, threads, lanes):
    n = x.size
    if n < 32768 or threads <= 1:
        return _torch_sum_serial_nb(x, 0, n, lanes)
    used = min(threads, (n + 32767) // 32768)
    chunk = (n + used - 1) // used
    parts = np.zeros(threads, np.float32)
    for t in range(used):
        s = t * chunk
        if s < n:
            parts[t] = _torch_sum_serial_nb(x, s, min(n, s + chunk) - s, lanes)
    return _torch_sum_serial_nb(parts, 0, threads, lanes)


def torch_mean(x: np.ndarray, threads: int = 1, lanes: int = SUM_LANES) -> np.float32:
    """PyTorch's float32 ``mean`` on CPU: its ordered sum divided by n in float32."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    return np.float32(_torch_sum_nb(x, threads, _check_lanes(lanes)) / np.float32(x.size))


def torch_mean_reference(x: np.ndarray, threads: int = 1, lanes: int = SUM_LANES) -> np.float32:
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    return np.float32(torch_sum_reference(x, threads, _check_lanes(lanes)) / np.float32(x.size))


def _check_lanes(lanes: int) -> int:
    if lanes not in (4, 8, 16):
        raise UsageError(f"sum_lanes must be 4, 8 or 16 (PyTorch's float vector width), got {lanes!r}")
    return lanes


# ---------------------------------------------------------------------------------------------
# 4-bit step
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _nf4_quantize_nb(x, block_size, mids, packed, absmax):
    n = x.size
    for b in prange(absmax.size):
        s = b * block_size
        e = min(s + block_size, n)
        am = _F0
        for i in range(s, e):
            a = abs(x[i])
            if a > am:
                am = a
        full = e - s == block_size
        amc = max(am, _TINY)
        absmax[b] = am if full else amc
        inv = _F1 / amc
        for i in range(s, e, 2):
            hi = 0
            lo = 7
            for h in range(2):
                if i + h < e:
                    v = x[i + h] * inv if full else x[i + h] / amc
                    v = min(max(v, -_F1), _F1)
                    c = 0
                    for k in range(15):
                        if mids[k] < v:
                            c += 1
                    if h == 0:
                        hi = c
                    else:
                        lo = c
            packed[i >> 1] = (hi << 4) | lo


def nf4_quantize_reference(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of the 4-bit step: ``(packed uint8 [ceil(n/2)], absmax float32 [blocks])``."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    n = x.size
    full = n - n % block_size
    blocks = x[:full].reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    inv = (_F1 / np.maximum(absmax, _TINY)).astype(np.float32)
    scaled = np.clip(blocks * inv[:, None], -_F1, _F1).ravel()
    if full < n:
        am = np.maximum(np.abs(x[full:]).max(), _TINY)
        absmax = np.concatenate([absmax, np.array([am], np.float32)])
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, -_F1, _F1)])
    codes = np.searchsorted(NF4_MIDPOINTS, scaled.astype(np.float32), side="left").astype(np.uint8)
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([7], np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8), absmax.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 8-bit step (double quantization of the absmaxes)
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _dynamic_quantize_nb(x, block_size, lut, codes, absmax):
    n = x.size
    for b in prange(absmax.size):
        s = b * block_size
        e = min(s + block_size, n)
        am = _F0
        for i in range(s, e):
            am = max(am, abs(x[i]))
        absmax[b] = am
        if am == _F0:
            for i in range(s, e):
                codes[i] = 0
            continue
        inv = _F1 / am
        for i in range(s, e):
            v = min(max(x[i] * inv, -_F1), _F1)
            j = np.uint16((v + _F1) * _FHALF * _FLUT + _FHALF)
            codes[i] = lut[j]


def dynamic_quantize_reference(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of the 8-bit blockwise step: ``(codes uint8 [n], absmax float32 [blocks])``."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    n = x.size
    nb = -(-n // block_size)
    pad = np.zeros(nb * block_size, np.float32)
    pad[:n] = x
    blocks = pad.reshape(nb, block_size)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    inv = np.where(absmax > 0, _F1 / np.where(absmax > 0, absmax, _F1), _F0).astype(np.float32)
    v = np.clip(blocks * inv[:, None], -_F1, _F1).astype(np.float32)
    j = ((v + _F1) * _FHALF * _FLUT + _FHALF).astype(np.float32).astype(np.uint16)
    codes = DYNAMIC_LUT[j]
    codes[absmax == 0] = 0
    return codes.ravel()[:n].copy(), absmax


# ---------------------------------------------------------------------------------------------
# Quantization error
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _error_stats_nb(ref, approx):
    diff2 = 0.0
    ref2 = 0.0
    worst = 0.0
    for i in prange(ref.size):
        r = np.float64(ref[i])
        d = np.float64(approx[i]) - r
        diff2 += d * d
        ref2 += r * r
        worst = max(worst, abs(d))
    return diff2, ref2, worst


def error_stats(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float, float]:
    """``(sum (approx-ref)^2, sum ref^2, max |approx-ref|)`` accumulated in float64."""
    a = np.ascontiguousarray(ref, np.float32).ravel()
    b = np.ascontiguousarray(approx, np.float32).ravel()
    if a.size != b.size:
        raise ValueError(f"sizes differ: {a.size} vs {b.size}")
    return _error_stats_nb(a, b)


def error_stats_reference(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float, float]:
    r = np.asarray(ref, np.float64).ravel()
    d = np.asarray(approx, np.float64).ravel() - r
    return float(d @ d), float(r @ r), float(np.abs(d).max(initial=0.0))


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def _check_input(weights, block_size: int) -> np.ndarray:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise QuantizationError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    x = np.asarray(weights)
    if x.dtype.kind != "f":
        raise QuantizationError(f"NF4 quantizes floating-point weights, got dtype {x.dtype}")
    if x.size == 0:
        raise QuantizationError("cannot quantize an empty tensor")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise QuantizationError("weights contain NaN or infinity; NF4 cannot represent them")
    return x


def quantize_blocks(x: np.ndarray, block_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The 4-bit step alone: ``(packed, absmax)`` for a flat float32 array.

    Callers may quantize a long tensor piece by piece when each piece but the last holds a whole
    number of blocks; concatenating the pieces' outputs equals quantizing the whole.
    """
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    packed = np.empty(-(-flat.size // 2), np.uint8)
    absmax = np.empty(-(-flat.size // block_size), np.float32)
    _nf4_quantize_nb(flat, block_size, NF4_MIDPOINTS, packed, absmax)
    return packed, absmax


def double_quantize(absmax: np.ndarray, sum_threads: int = 1,
                    sum_lanes: int = SUM_LANES) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """The 8-bit step: ``(codes uint8, nested_scales float32, offset)`` for the block absmaxes."""
    offset = torch_mean(absmax, sum_threads, sum_lanes)
    centred = (absmax - offset).astype(np.float32)
    codes = np.empty(absmax.size, np.uint8)
    nested = np.empty(-(-absmax.size // NESTED_BLOCK_SIZE), np.float32)
    _dynamic_quantize_nb(centred, NESTED_BLOCK_SIZE, DYNAMIC_LUT, codes, nested)
    return codes, nested, offset


def quantize_nf4(weights: np.ndarray, block_size: int = 64, double_quant: bool = True, sum_threads: int = 1,
                 sum_lanes: int = SUM_LANES) -> NF4Tensor:
    """Quantize a float array to NF4, optionally double-quantizing the block scales.

    Byte-for-byte what ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size,
    quant_type="nf4", compress_statistics=double_quant)`` produces on CPU. ``sum_threads``
    reproduces PyTorch's thread split of the offset's sum (only matters above 2M weights),
    ``sum_lanes`` its float vector width (8 on x86-64, the default everywhere so that a bundle is
    the same wherever it is converted; 4 matches PyTorch on an aarch64 CPU).
    """
    x = _check_input(weights, block_size)
    packed, absmax = quantize_blocks(x, block_size)
    if not double_quant:
        return NF4Tensor(packed, absmax, np.zeros(0, np.float32), np.float32(0), tuple(x.shape), block_size)
    codes, nested, offset = double_quantize(absmax, sum_threads, sum_lanes)
    return NF4Tensor(packed, codes, nested, offset, tuple(x.shape), block_size)


def quantize_nf4_reference(weights, block_size: int = 64, double_quant: bool = True,
                           sum_threads: int = 1, sum_lanes: int = SUM_LANES) -> NF4Tensor:
    """Plain-NumPy twin of :func:`quantize_nf4` (slow; for tests and for reading)."""
    x = _check_input(weights, block_size)
    packed, absmax = nf4_quantize_reference(x, block_size)
    if not double_quant:
        return NF4Tensor(packed, absmax, np.zeros(0, np.float32), np.float32(0), tuple(x.shape), block_size)
    offset = torch_mean_reference(absmax, sum_threads, sum_lanes)
    codes, nested = dynamic_quantize_reference((absmax - offset).astype(np.float32), NESTED_BLOCK_SIZE)
    return NF4Tensor(packed, codes, nested, offset, tuple(x.shape), block_size)
