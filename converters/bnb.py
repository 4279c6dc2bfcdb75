"""Importing bitsandbytes 4-bit checkpoints (QLoRA bases) without re-quantizing.

A model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`` and saved with transformers' ``save_pretrained`` stores each
quantized linear ``W`` as (bitsandbytes ``Params4bit`` / ``QuantState.as_dict(packed=True)``):

    W                                        packed codes, ``[ceil(n/2), 1]`` (uint8 unless
                                             ``bnb_4bit_quant_storage`` says otherwise: same bytes)
    W.absmax                                 per block: uint8 codes (double quant) or float32
    W.quant_map                              the 16 NF4 values, float32
    W.nested_absmax, W.nested_quant_map      double quant only: float32 per 256 blocks, the 256-value
                                             dynamic map
    W.quant_state.bitsandbytes__nf4          uint8 bytes of a JSON object: quant_type, blocksize,
                                             dtype, shape, and nested_blocksize, nested_dtype,
                                             nested_offset with double quant

and ``config.json`` carries ``quantization_config`` with ``quant_method: "bitsandbytes"``. These
are exactly the fields of edgelora's :class:`~edgelora.storage.NF4Tensor` (codes, scales,
nested scales, offset, shape), so an import copies them byte for byte: the bundle runs the base
the adapter was trained against. Everything is checked before use: the code books must be the
standard NF4 and dynamic maps (a custom map is refused), the block sizes ones the runtime reads,
every array the size its shape and block size imply. FP4 checkpoints are refused (edgelora runs
NF4 only), as are 8-bit and other quantization methods.

Sources: bitsandbytes ``functional.py`` (``QuantState.as_dict``/``from_dict``), transformers'
``integrations/bitsandbytes.py`` and ``quantizers/quantizer_bnb_4bit.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from edgelora.errors import FormatError, UnsupportedError
from edgelora.storage import DYNAMIC_CODE, NESTED_BLOCK_SIZE, NF4_CODE, SUPPORTED_BLOCK_SIZES, NF4Tensor

STATE_NF4 = ".quant_state.bitsandbytes__nf4"
STATE_FP4 = ".quant_state.bitsandbytes__fp4"
PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", STATE_NF4, STATE_FP4)
MAX_STATE_BYTES = 1 << 16


def quantization_method(config: dict, path) -> str | None:
    """``"bnb-4bit"`` for a bitsandbytes 4-bit checkpoint, ``None`` for a float one; any other
    quantized checkpoint is refused with what to do instead."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise FormatError("quantization_config is not an object", path)
    method = q.get("quant_method")
    if method == "bitsandbytes" and q.get("load_in_4bit"):
        kind = q.get("bnb_4bit_quant_type", "fp4")
        if kind != "nf4":
            raise UnsupportedError(f"a bitsandbytes 4-bit checkpoint of type {kind!r}: edgelora runs NF4 only; "
                                   f"convert the original float checkpoint instead", path)
        return "bnb-4bit"
    what = "bitsandbytes 8-bit" if method == "bitsandbytes" else repr(method)
    raise UnsupportedError(f"a {what} quantized checkpoint: edgelora imports bitsandbytes 4-bit NF4 checkpoints "
                           f"and float (F32/F16/BF16) ones; convert the original float checkpoint instead", path)


def owner(name: str) -> str | None:
    """The weight a bitsandbytes auxiliary tensor belongs to (``W.absmax`` -> ``W``), else None."""
    for suffix in PARTS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_state(where: dict, weight: str) -> dict | None:
    """The parsed quant state of ``weight`` (``None`` when it is not quantized), checked."""
    if weight + STATE_FP4 in where:
        raise UnsupportedError(f"{weight} is FP4-quantized: edgelora runs NF4 only; convert the original float "
                               f"checkpoint instead", where[weight + STATE_FP4].path)
    f = where.get(weight + STATE_NF4)
    if f is None:
        return None
    info = f.tensors[weight + STATE_NF4]
    if info.dtype != "U8" or info.nbytes > MAX_STATE_BYTES:
        raise FormatError(f"{weight}: its quant state is not a small uint8 tensor", f.path)
    try:
        state = json.loads(bytes(np.asarray(f.raw(weight + STATE_NF4))).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{weight}: its quant state is not valid JSON ({e})", f.path) from None
    if not isinstance(state, dict):
        raise FormatError(f"{weight}: its quant state is not a JSON object", f.path)

    def field(key, kind, check, what):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, kind) or not check(v):
            raise FormatError(f"{weight}: quant state field {key!r} must be {what}, got {v!r}", f.path)
        return v

    field("quant_type", str, lambda v: v == "nf4", "'nf4'")
    block = field("blocksize", int, lambda v: v > 0, "a positive integer")
    if block not in SUPPORTED_BLOCK_SIZES:
        raise UnsupportedError(f"{weight}: bitsandbytes block size {block}; edgelora reads "
                               f"{SUPPORTED_BLOCK_SIZES}", f.path)
    shape = field("shape", list, lambda v: 0 < len(v) <= 4 and all(isinstance(d, int) and not isinstance(d, bool)
                                                                   and 0 < d < 1 << 31 for d in v),
                  "a list of positive sizes")
    out = {"blocksize": block, "shape": tuple(shape), "double_quant": "nested_blocksize" in state}
    if out["double_quant"]:
        nested = field("nested_blocksize", int, lambda v: v > 0, "a positive integer")
        if nested != NESTED_BLOCK_SIZE:
            raise UnsupportedError(f"{weight}: nested block size {nested}; edgelora reads {NESTED_BLOCK_SIZE}", f.path)
        off = field("nested_offset", (int, float), math.isfinite, "a finite number")
        out["offset"] = np.float32(off)
    return out


def _array(where: dict, name: str, dtype: str, size: int, owner_name: str) -> np.ndarray:
    f = where.get(name)
    if f is None:
        raise FormatError(f"{owner_name}: bitsandbytes tensor {name} is missing", where[owner_name].path)
    info = f.tensors[name]
    if info.dtype != dtype or info.numel != size:
        raise FormatError(f"{name} is {info.dtype} with {info.numel} values; the quant state implies {dtype} "
                          f"with {size}", f.path)
    return np.asarray(f.raw(name)).reshape(-1)


def load_nf4(where: dict, weight: str, state: dict, want_shape: tuple) -> NF4Tensor:
    """The NF4 tensor a bitsandbytes 4-bit weight stores, its arrays views of the checkpoint's."""
    f = where[weight]
    shape = state["shape"]
    if shape != tuple(want_shape):
        raise FormatError(f"{weight}: the quant state's shape {list(shape)} is not the {list(want_shape)} "
                          f"config.json implies", f.path)
    n = math.prod(shape)
    block = state["blocksize"]
    blocks = -(-n // block)
    info = f.tensors[weight]
    if info.nbytes != -(-n // 2):
        raise FormatError(f"{weight}: {info.nbytes} bytes of packed codes, but {list(shape)} needs {-(-n // 2)}",
                          f.path)
    packed = np.asarray(f.raw(weight)).reshape(-1).view(np.uint8)  # any quant storage dtype: the same bytes
    code = _array(where, weight + ".quant_map", "F32", 16, weight)
    if not np.array_equal(code, NF4_CODE):
        raise UnsupportedError(f"{weight}: its quant_map is not the standard NF4 code book", f.path)
    if state["double_quant"]:
        scales = _array(where, weight + ".absmax", "U8", blocks, weight)
        nested = _array(where, weight + ".nested_absmax", "F32", -(-blocks // NESTED_BLOCK_SIZE), weight)
        nested_code = _array(where, weight + ".nested_quant_map", "F32", 256, weight)
        if not np.array_equal(nested_code, DYNAMIC_CODE):
            raise UnsupportedError(f"{weight}: its nested_quant_map is not bitsandbytes' dynamic 8-bit map", f.path)
        if not np.isfinite(nested).all():
            raise FormatError(f"{weight}: nested_absmax holds NaN or infinity", f.path)
        offset = state["offset"]
    else:
        scales = _array(where, weight + ".absmax", "F32", blocks, weight)
        if not np.isfinite(scales).all():
            raise FormatError(f"{weight}: absmax holds NaN or infinity", f.path)
        nested, offset = np.zeros(0, np.float32), np.float32(0)
    return NF4Tensor(packed, scales, nested, np.float32(offset), tuple(shape), block)
