"""How a bundle stores its tensors (``docs/format.md``): one class per storage type.

A storage type knows the safetensors entries a tensor of a given shape takes, checks that a file
holds them, writes a tensor into them and reads it back as views of the mapped file, and
dequantizes what it read, as gguf-py's ``quants.py`` has one class per quantization type. The
bundle checks and reads its weights through these classes, the converter writes through them, and
the runtime's NF4 kernels form their block scales with :func:`block_scale`, the one definition of
the scale formula.

* ``nf4`` (:class:`NF4Storage`): :class:`NF4Tensor`'s arrays, in five entries ``W.nf4_codes``,
  ``W.nf4_scales``, ``W.nf4_nested``, ``W.nf4_offset``, ``W.nf4_shape``. With double quantization
  the block scales are 8-bit codes into ``DYNAMIC_CODE`` with a float32 scale per
  ``NESTED_BLOCK_SIZE`` blocks and an offset (``scale[b] = DYNAMIC_CODE[scales[b]] *
  nested_scales[b // 256] + offset``); without it, the float32 absmaxes themselves. The weights
  are ``w = NF4_CODE[code] * scale[block]``, all in float32.
* ``float16``, ``float32`` (:class:`FloatStorage`): the tensor under its own name, in that type.

Quantizing to NF4, bit for bit as bitsandbytes does it, is ``converters/nf4.py``'s. Every Numba
kernel here has a plain-NumPy twin (``*_reference``); the tests prove them equal and compare both
with bitsandbytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from edgelora.errors import FormatError
from edgelora.kernel_cache import install as _install_kernel_cache
from edgelora.safetensors_io import DTYPES

_install_kernel_cache()  # before the kernels below are defined: they are cached in the user's cache folder

#: The 16 NormalFloat values (QLoRA appendix; bitsandbytes ``get_4bit_type("nf4")``), as float32.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

_DYNAMIC_CODE_BITS = """
    bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000
    bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333
    bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666
    bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a
    bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a
    bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000
    bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd
    be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334
    bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a
    bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
    bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148
    bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148
    bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4
    bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d
    ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
    b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000
    3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b
    398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d
    3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4
    3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
    3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148
    3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d
    3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a
    3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334
    3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd
    3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000
    3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a
    3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a
    3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666
    3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
    3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000
    3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000
"""
#: The signed 8-bit dynamic map (bitsandbytes ``create_dynamic_map()``): 256 sorted float32 values
#: from -0.99296874 to 1.0, stored as their exact IEEE-754 bit patterns.
DYNAMIC_CODE = np.array([int(h, 16) for h in _DYNAMIC_CODE_BITS.split()], dtype=np.uint32).view(np.float32)

#: The code books, stored once in every bundle.
CODE_TENSORS = {"edgelora.nf4_code": NF4_CODE, "edgelora.dynamic_code": DYNAMIC_CODE}
SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256)
NESTED_BLOCK_SIZE = 256  # block scales per nested scale (double quantization)


# ---------------------------------------------------------------------------------------------
# Block scales
# ---------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=False)
def block_scale(dyn, qscale, nested, nshift, offset, b):
    """Block ``b``'s absmax from its double-quantized scale, ``dyn[qscale[b]] * nested[b >> nshift]
    + offset`` (``dyn`` the dynamic map, ``nshift`` log2 of the nested block size), rounded as the
    format defines it: the product to float32, then the sum; never fused into one FMA.

    The one definition of the formula: the kernels that form scales call it (the SIMD ones from
    their LLVM IR, ``runtime/simd.py``), and :func:`dequantize_scales_reference` evaluates this
    body with NumPy on index arrays. ``fastmath=False`` is stated so that it is never inherited:
    Numba compiles a callee that sets none with its caller's, and a ``contract`` flag would let LLVM
    fuse the product and the sum wherever it inlines them (one ulp off). Kernels cached on disk
    inline it: after editing it, delete ``runtime/__pycache__/kernels.*``."""
    return dyn[qscale[b]] * nested[b >> nshift] + offset


@njit(cache=True)
def block_scales(dyn, qscale, nested, nshift, offset, b0, out):
    """``out[i]`` = the absmax of block ``b0 + i`` (:func:`block_scale`)."""
    for i in range(out.size):
        out[i] = block_scale(dyn, qscale, nested, nshift, offset, b0 + i)


def dequantize_scales_reference(q, nested, offset, nested_block_size=NESTED_BLOCK_SIZE) -> np.ndarray:
    """NumPy twin of :func:`block_scales` over all blocks: float32 absmaxes from their 8-bit codes,
    nested scales and offset (NumPy too rounds the product and then the sum)."""
    q = np.asarray(q, np.uint8)
    b = np.arange(q.size)
    nshift = int(nested_block_size).bit_length() - 1
    return block_scale.py_func(DYNAMIC_CODE, q, np.asarray(nested, np.float32), nshift, np.float32(offset), b)


# ---------------------------------------------------------------------------------------------
# NF4 tensors
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _nf4_dequantize_nb(packed, absmax, n, block_size):
    out = np.empty(n, np.float32)
    code = NF4_CODE
    for b in prange(absmax.size):
        s = b * block_size
        e = min(s + block_size, n)
        scale = absmax[b]
        for i in range(s, e):
            byte = np.int64(packed[i >> 1])
            c = (byte >> 4) if (i & 1) == 0 else (byte & 15)
            out[i] = code[c] * scale
    return out


def nf4_dequantize_reference(packed: np.ndarray, absmax: np.ndarray, n: int, block_size: int) -> np.ndarray:
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 15
    values = NF4_CODE[codes[:n]]
    scale = np.repeat(np.asarray(absmax, np.float32), block_size)[:n]
    return (values * scale).astype(np.float32)


@dataclass(frozen=True)
class NF4Tensor:
    """A weight quantized to NF4: codes, scales and (with double quantization) nested scales.

    ``packed``         uint8 ``[ceil(n/2)]``: two codes a byte, first element in the high nibble.
    ``scales``         per ``block_size`` block: uint8 codes into ``DYNAMIC_CODE`` when
                       ``double_quant`` (bitsandbytes ``state.absmax``), else float32 absmaxes.
    ``nested_scales``  float32 ``[ceil(blocks/256)]`` (bitsandbytes ``state.state2.absmax``);
                       empty without double quantization.
    ``offset``         float32 mean subtracted before the 8-bit step (``state.offset``); 0 without.
    ``shape``          the original tensor shape.
    """

    packed: np.ndarray
    scales: np.ndarray
    nested_scales: np.ndarray
    offset: np.float32
    shape: tuple
    block_size: int = 64
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.scales.dtype == np.uint8

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of quantized data (codes, scales, nested scales and offset)."""
        extra = self.nested_scales.nbytes + 4 if self.double_quant else 0
        return self.packed.nbytes + self.scales.nbytes + extra

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def scale_args(self) -> tuple[np.ndarray, np.ndarray, int, np.float32]:
        """``(qscale, nested, nshift, offset)``: the block scales as :func:`block_scale` takes them.
        Without double quantization the float32 absmaxes are the nested scales of blocks of one
        (shift 0), under codes of 255 (``DYNAMIC_CODE[255] == 1.0``) and an offset of 0, which
        gives each absmax back exactly: one formula serves both layouts."""
        if self.double_quant:
            nshift = int(self.nested_block_size).bit_length() - 1
            return self.scales, self.nested_scales, nshift, np.float32(self.offset)
        return np.full(self.scales.size, 255, np.uint8), np.asarray(self.scales, np.float32), 0, np.float32(0.0)

    def absmax(self) -> np.ndarray:
        """The float32 per-block scales (after undoing double quantization)."""
        if not self.double_quant:
            return np.asarray(self.scales, dtype=np.float32)
        out = np.empty(self.scales.size, np.float32)
        block_scales(DYNAMIC_CODE, *self.scale_args(), 0, out)
        return out

    def dequantize(self) -> np.ndarray:
        """The float32 weights, shaped like the original tensor."""
        flat = _nf4_dequantize_nb(self.packed, self.absmax(), self.numel, self.block_size)
        return flat.reshape(self.shape)

    def dequantize_blocks(self, first: int, last: int, absmax: np.ndarray | None = None) -> np.ndarray:
        """Flat float32 values of blocks ``first`` to ``last - 1`` (pass ``absmax`` to reuse it)."""
        absmax = self.absmax() if absmax is None else absmax
        start = first * self.block_size
        n = min(last * self.block_size, self.numel) - start
        return _nf4_dequantize_nb(self.packed[start // 2:], absmax[first:last], n, self.block_size)

    def dequantize_reference(self) -> np.ndarray:
        """Plain-NumPy twin of :meth:`dequantize`."""
        absmax = self.absmax() if not self.double_quant else dequantize_scales_reference(
            self.scales, self.nested_scales, self.offset, self.nested_block_size)
        return nf4_dequantize_reference(self.packed, absmax, self.numel, self.block_size).reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# Storage types
# ---------------------------------------------------------------------------------------------

def _check_entries(st, name: str, kind: str, shape: tuple, entries) -> None:
    """Every entry ``(key, dtype, shape)`` in ``st`` as listed, so that no kernel ever reads past an array."""
    for key, _, _ in entries:
        if key not in st:
            raise FormatError(f"manifest lists {name!r} but {key!r} is not in {st.path.name}", st.path)
    for key, dtype, want in entries:
        info = st.tensors[key]
        if (info.dtype, info.shape) != (dtype, want):
            raise FormatError(f"tensor {key!r} is {info.dtype}{list(info.shape)}, but the manifest's "
                              f"{kind} {list(shape)} needs {dtype}{list(want)}", st.path)


@dataclass(frozen=True)
class NF4Storage:
    """Storage ``nf4``: a tensor as :class:`NF4Tensor`'s arrays, in ``block_size`` blocks, its
    scales double-quantized in groups of ``nested_block_size`` or not."""

    block_size: int
    double_quant: bool = True
    nested_block_size: int = NESTED_BLOCK_SIZE

    kind = "nf4"
    PARTS = ("nf4_codes", "nf4_scales", "nf4_nested", "nf4_offset", "nf4_shape")

    @classmethod
    def stored(cls, st, name: str, block_size: int, nested_block_size: int) -> NF4Storage:
        """The storage of tensor ``name`` in the safetensors file ``st``: double-quantized when its
        scales are 8-bit codes."""
        scales = st.tensors.get(f"{name}.nf4_scales")
        return cls(block_size, scales is not None and scales.dtype == "U8", nested_block_size)

    def keys(self, name: str) -> list[str]:
        return [f"{name}.{part}" for part in self.PARTS]

    def entries(self, name: str, shape) -> list[tuple[str, str, tuple]]:
        """The safetensors entries ``(key, dtype, shape)`` of a tensor of logical ``shape``."""
        n = math.prod(shape)
        blocks = -(-n // self.block_size)
        nested = -(-blocks // self.nested_block_size) if self.double_quant else 0
        codes, scales, nested_scales, offset, stored_shape = self.keys(name)
        return [(codes, "U8", (-(-n // 2),)), (scales, "U8" if self.double_quant else "F32", (blocks,)),
                (nested_scales, "F32", (nested,)), (offset, "F32", (1,)), (stored_shape, "I64", (len(shape),))]

    def check(self, st, name: str, shape: tuple) -> None:
        """``st`` holds tensor ``name`` of logical ``shape`` as this storage lays it out."""
        _check_entries(st, name, self.kind, shape, self.entries(name, shape))
        key = self.keys(name)[-1]  # the stored shape
        if tuple(int(d) for d in st.raw(key)) != shape:
            raise FormatError(f"tensor {key!r} disagrees with the manifest's shape {list(shape)}", st.path)
        _, scales, nested, offset, _ = self.keys(name)  # the scales' float parts, small: finite, or every
        for key in (nested, offset) if self.double_quant else (scales, offset):  # weight of a block is NaN
            if not np.isfinite(st.raw(key)).all():
                raise FormatError(f"tensor {key!r} holds NaN or infinite scales; the file is corrupt", st.path)

    def write(self, writer, name: str, q: NF4Tensor) -> None:
        parts = (q.packed, q.scales, q.nested_scales, np.array([q.offset], np.float32), np.array(q.shape, np.int64))
        for key, data in zip(self.keys(name), parts):
            writer.write(key, data)

    def read(self, st, name: str) -> NF4Tensor:
        """The stored tensor, its arrays being views into the mapped file."""
        packed, scales, nested, offset, shape = (st.raw(key) for key in self.keys(name))
        return NF4Tensor(packed=packed, scales=scales, nested_scales=nested, offset=np.float32(offset[0]),
                         shape=tuple(int(d) for d in shape), block_size=self.block_size,
                         nested_block_size=self.nested_block_size)

    @staticmethod
    def dequantize(q: NF4Tensor) -> np.ndarray:
        return q.dequantize()


@dataclass(frozen=True)
class FloatStorage:
    """Storage ``float16`` / ``float32``: the tensor under its own name, as safetensors ``dtype``."""

    kind: str
    dtype: str

    def entries(self, name: str, shape) -> list[tuple[str, str, tuple]]:
        return [(name, self.dtype, tuple(shape))]

    def check(self, st, name: str, shape: tuple) -> None:
        _check_entries(st, name, self.kind, shape, self.entries(name, shape))

    def narrow(self, x: np.ndarray) -> np.ndarray:
        """Float32 values in this storage's type (what :meth:`write` takes)."""
        return x.astype(DTYPES[self.dtype])

    @staticmethod
    def write(writer, name: str, w: np.ndarray, offset: int = 0) -> None:
        """``w`` (narrowed) at byte ``offset`` of the tensor: a large one is written in row pieces."""
        writer.write(name, w, offset=offset)

    @staticmethod
    def read(st, name: str) -> np.ndarray:
        """The stored array, a view into the mapped file."""
        return st.raw(name)

    @staticmethod
    def dequantize(w: np.ndarray) -> np.ndarray:
        return w.astype(np.float32)


FLOAT16 = FloatStorage("float16", "F16")
FLOAT32 = FloatStorage("float32", "F32")
FLOAT_STORAGES = {s.kind: s for s in (FLOAT16, FLOAT32)}
#: the storage types a bundle's manifest may give a tensor
KINDS = (NF4Storage.kind, *FLOAT_STORAGES)


def storages(block_size: int, double_quant: bool) -> dict:
    """Each storage type by its manifest name, NF4 in this layout (what the converter writes)."""
    return {NF4Storage.kind: NF4Storage(block_size, double_quant), **FLOAT_STORAGES}
