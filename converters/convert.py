"""``edgelora convert``: a Hugging Face checkpoint in, an NF4 bundle out, streamed tensor by tensor.

Each source tensor is read from its memory map in row chunks, quantized (or narrowed to float16),
written at its place in the output file, checked against the original, and its pages released, so
peak memory stays near the largest tensor's packed size rather than the checkpoint's. The bundle
is built in a temporary sibling folder and renamed into place only when complete.
"""

from __future__ import annotations

import os
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgelora import __version__
from edgelora.atomic import atomic_output_dir, check_output_dir, sha256_file, utc_stamp, write_text_atomic
from edgelora.bundle import FORMAT_NAME, FORMAT_VERSION, MANIFEST, WEIGHTS, file_table, sealed_text
from edgelora.converters import nf4
from edgelora.converters.hf import HFCheckpoint
from edgelora.errors import FormatError, QuantizationError, UnsupportedError, UsageError
from edgelora.runtime.tokenizer import Tokenizer
from edgelora.safetensors_io import SafetensorsWriter, bf16_to_float32
from edgelora.storage import CODE_TENSORS, NESTED_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES, NF4Tensor, storages

CHUNK_ELEMENTS = 1 << 23  # ~8M weights (32 MB of float32) per piece
FLOAT16_MAX = 65504.0
STORAGE_CHOICES = ("float16", "nf4")


@dataclass
class TensorReport:
    name: str
    role: str
    storage: str
    params: int
    bytes: int
    rel_error: float  # ||W - Q(W)|| / ||W||
    max_abs_error: float
    imported: bool = False  # NF4 codes taken from a bitsandbytes checkpoint as they were


@dataclass
class ConversionSummary:
    output: str
    model_type: str
    parameters: int
    nf4_parameters: int
    source_bytes: int
    bundle_bytes: int
    weights_bytes: int
    bits_per_weight: float
    nf4_bits_per_weight: float
    worst_tensor: str
    worst_rel_error: float
    seconds: float
    tensors: list = field(default_factory=list)
    imported: int = 0  # tensors whose NF4 codes were imported unchanged from bitsandbytes

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        mb = 1 / 1e6
        return "\n".join([
            f"wrote {self.output} ({self.model_type})",
            f"  parameters        {self.parameters:,} ({self.nf4_parameters:,} in NF4)",
            f"  bytes             {self.source_bytes * mb:,.1f} MB -> {self.weights_bytes * mb:,.1f} MB of weights "
            f"({self.source_bytes / max(self.weights_bytes, 1):.2f}x smaller); bundle {self.bundle_bytes * mb:,.1f} MB",
            f"  bits per weight   {self.bits_per_weight:.3f} overall, {self.nf4_bits_per_weight:.3f} in NF4 tensors",
            f"  largest error     {self.worst_rel_error:.4f} relative (||W-Q(W)||/||W||) in {self.worst_tensor}",
            *([f"  imported          {self.imported} tensors from bitsandbytes NF4, codes and scales unchanged"]
              if self.imported else []),
            f"  time              {self.seconds:.1f} s",
        ])


def resolve_source(src) -> Path:
    """A local checkpoint folder, or a Hugging Face hub id fetched with huggingface_hub."""
    p = Path(src)
    if p.exists():
        return p
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(src)) and not str(src).lower().endswith((".onnx", ".gguf")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UsageError(f"{src} is not a local folder; to fetch it from the Hugging Face hub install "
                             f"huggingface_hub (pip install 'edgelora[hub]') or download it and pass the folder") from None
        try:
            return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
        except Exception as e:  # network, auth, missing repo: all reported the same way
            raise UsageError(f"could not fetch {src} from the Hugging Face hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); check the id and the network, or "
                             f"download it elsewhere and pass the folder") from None
    raise FormatError("no such file or folder (and not a Hugging Face hub id of the form org/name)", p)


def open_checkpoint(src_path: Path):
    """The source at ``src_path``: a GGUF file or an ONNX model (the file, or a folder holding one
    and no safetensors) or a Hugging Face checkpoint folder."""
    from edgelora.converters.gguf import GGUFCheckpoint, find_gguf
    from edgelora.converters.onnx import ONNXCheckpoint, find_model
    if find_gguf(src_path) is not None:
        return GGUFCheckpoint(src_path)
    return ONNXCheckpoint(src_path) if find_model(src_path) is not None else HFCheckpoint(src_path)


def _storage(role: str, embeddings: str, head: str) -> str:
    return {"linear": "nf4", "embedding": "nf4" if embeddings == "nf4" else "float16",
            "head": "nf4" if head == "nf4" else "float16"}.get(role, "float32")


def _row_chunks(shape, block_size: int):
    """Row ranges whose element counts are whole blocks (but the last), about CHUNK_ELEMENTS each."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape) // rows
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    unit = block_size // math.gcd(cols, block_size)  # rows per whole number of blocks
    step = max(unit, step // unit * unit)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)], cols


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_float32(raw)
    return np.asarray(raw, np.float32)


class _ErrorMeter:
    def __init__(self):
        self.diff2 = 0.0
        self.ref2 = 0.0
        self.max_abs = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        diff2, ref2, worst = nf4.error_stats(ref, approx)
        self.diff2 += diff2
        self.ref2 += ref2
        self.max_abs = max(self.max_abs, worst)

    @property
    def rel(self) -> float:
        return math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else math.sqrt(self.diff2)


class _MergedAdapter:
    """One LoRA adapter folded into the float weights before quantization: ``W + s B A`` for each
    targeted linear, trained biases and saved modules replacing the base's. The merged bundle
    then runs at plain-base speed, but the adapter can no longer be switched off, and its delta
    is quantized together with the base (the unmerged runtime keeps it exact in float32)."""

    def __init__(self, path, args):
        from edgelora.adapters import HEAD, read_adapter
        self.path = Path(path)
        self.adapter = ad = read_adapter(self.path, args)
        if ad.is_dora or ad.config.lora_bias:
            raise UnsupportedError("merging DoRA or lora_bias adapters at conversion is not supported; load "
                                   "the adapter unmerged with --adapter / model.adapters.load", self.path)
        if args.tie_word_embeddings and (HEAD in ad.pairs or ad.saved):
            raise UnsupportedError("this adapter changes the output head or the embeddings of a model whose head "
                                   "is tied to its embeddings; merging would change both. Load it unmerged",
                                   self.path)
        self.saved = {f"{m}.weight": a for m, a in ad.saved.items()}  # lm_head.weight, model.embed_tokens.weight

    def rows(self, name: str, x: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of tensor ``name`` (float32, flattened to its row layout) after merging."""
        module, _, kind = name.rpartition(".")
        if name in self.saved:
            return np.asarray(self.saved[name][r0:r1], np.float32)
        if kind == "bias" and module in self.adapter.biases:
            return self.adapter.biases[module].reshape(x.shape)
        p = self.adapter.pairs.get(module)
        if kind == "weight" and p is not None:
            return x + np.float32(p.scale) * (p.B[r0:r1] @ p.A)
        return x

    def describe(self) -> dict:
        s = self.adapter.summary()
        return {"path": str(self.path), "sha256": sha256_file(self.path / "adapter_model.safetensors"),
                "ranks": s["ranks"], "lora_alpha": s["lora_alpha"], "targets": s["targets"], "modules": s["modules"]}


def _layout(ckpt, block_size, double_quant) -> tuple[int, bool]:
    """The bundle's NF4 block size and double quantization: the user's choice (default 64, on),
    or, for a checkpoint already in NF4, its own, which a different request cannot change."""
    have = ckpt.nf4_layout
    if have is None:
        return 64 if block_size is None else block_size, True if double_quant is None else bool(double_quant)
    if block_size not in (None, have[0]) or double_quant not in (None, have[1]):
        raise UsageError(f"this checkpoint is bitsandbytes NF4 already, in blocks of {have[0]} with double "
                         f"quantization {'on' if have[1] else 'off'}; its codes are imported unchanged, so "
                         f"--block-size / --no-double-quant cannot change them", ckpt.path)
    return have


def convert(src: str | os.PathLike, out: str | os.PathLike, block_size: int | None = None, double_quant: bool | None = None,
            embeddings: str = "float16", head: str = "float16", overwrite: bool = False, progress: bool = False,
            merge_adapter: str | os.PathLike | None = None) -> ConversionSummary:
    """Convert a Hugging Face checkpoint folder (or hub id), an ONNX decoder model
    (``converters/onnx.py``) or a GGUF file (``converters/gguf.py``) into an edgelora NF4 bundle at ``out``.

    ``block_size`` (default 64) and ``double_quant`` (default on) set the NF4 layout; a checkpoint
    saved from a bitsandbytes 4-bit model keeps its own, and its NF4 codes and scales are copied
    byte for byte (its float tensors are converted as usual).
    ``merge_adapter``: a PEFT LoRA adapter folder to fold into the weights before quantization
    (see :class:`_MergedAdapter` for the trade-off)."""
    t0 = time.perf_counter()
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        raise UsageError(f"block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    for what, v in (("embeddings", embeddings), ("head", head)):
        if v not in STORAGE_CHOICES:
            raise UsageError(f"--{what} must be one of {STORAGE_CHOICES}, got {v!r}")
    out = check_output_dir(out, overwrite, owner=FORMAT_NAME)
    src_path = resolve_source(src)
    with open_checkpoint(src_path) as ckpt:
        tok = ckpt.path / "tokenizer.json"
        if not tok.is_file():
            raise FormatError("no tokenizer.json in the checkpoint folder; save the tokenizer with transformers "
                              "(AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC)) to create it", ckpt.path)
        Tokenizer.from_dir(ckpt.path)  # the files the bundle will copy load: a malformed one fails here, not later
        specs = ckpt.specs
        block_size, double_quant = _layout(ckpt, block_size, double_quant)
        if merge_adapter is not None and ckpt.nf4:
            raise UsageError("merging an adapter into an imported bitsandbytes base would re-quantize it and lose "
                             "the base the adapter was trained on; load the adapter unmerged (--adapter)", src_path)
        merge = _MergedAdapter(merge_adapter, ckpt.args) if merge_adapter is not None else None
        layouts = storages(block_size, double_quant)
        storage = {name: layouts[_storage(s.role, embeddings, head)] for name, s in specs.items()}
        entries = [(k, "F32", v.shape) for k, v in CODE_TENSORS.items()]
        for name, spec in specs.items():
            entries += storage[name].entries(name, spec.shape)
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "block_size": str(block_size),
                "double_quant": str(double_quant).lower(), "nested_block_size": str(NESTED_BLOCK_SIZE)}
        reports: list[TensorReport] = []
        total = sum(math.prod(s.shape) for s in specs.values())
        with atomic_output_dir(out, overwrite, owner=FORMAT_NAME) as tmp:
            writer = SafetensorsWriter(tmp / WEIGHTS, entries, meta)
            for k, v in CODE_TENSORS.items():
                writer.write(k, v)
            bar = tqdm(total=total, unit="w", unit_scale=True, desc="quantizing", disable=not progress, leave=False)
            for name, spec in specs.items():
                reports.append(_convert_tensor(ckpt, name, spec, storage[name], writer, block_size, merge))
                bar.update(math.prod(spec.shape))
            bar.close()
            writer.close()
            for f in ckpt.tokenizer_files():
                shutil.copyfile(f, tmp / f.name)
            ckpt.write_config(tmp / "config.json")  # ONNX: the one beside it, or the one read from the graph
            manifest = _manifest(tmp, src, src_path, ckpt, block_size, double_quant, embeddings, head, reports)
            manifest["source"].update(ckpt.source_meta)
            if merge is not None:
                manifest["source"]["merged_adapter"] = merge.describe()
            write_text_atomic(tmp / MANIFEST, sealed_text(manifest))
        source_bytes = ckpt.source_bytes()
        model_type = ckpt.args.model_type
    return _summary(out, model_type, reports, source_bytes, time.perf_counter() - t0)


def _convert_tensor(ckpt, name, spec, storage, writer, block_size, merge=None) -> TensorReport:
    """Tensor ``name`` read, quantized or narrowed, written and measured; ``storage`` (``edgelora/storage.py``)
    lays it out in the bundle."""
    f = ckpt.where[name]
    if name in ckpt.nf4:  # imported from bitsandbytes: its codes and scales as they are, exactly
        q = ckpt.nf4[name]
        storage.write(writer, name, q)
        f.release(name)
        return TensorReport(name, spec.role, storage.kind, q.numel, q.nbytes, 0.0, 0.0, imported=True)
    dtype = f.tensors[name].dtype
    raw = f.raw(name)
    shape = spec.shape
    n = math.prod(shape)
    meter = _ErrorMeter()
    chunks, cols = _row_chunks(shape, block_size)
    raw2d = raw.reshape(-1, cols)
    row_bytes = cols * raw.itemsize

    def done(r0, r1):  # drop the source pages of rows [r0, r1) from our RSS
        f.release(name, r0 * row_bytes, r1 * row_bytes)

    def rows(r0, r1):  # float32 source rows, with the merged adapter's change
        x = _widen(raw2d[r0:r1], dtype)
        return x if merge is None else merge.rows(name, x, r0, r1)

    if storage.kind == "nf4":
        packed = np.empty(-(-n // 2), np.uint8)
        absmax = np.empty(-(-n // block_size), np.float32)
        for r0, r1 in chunks:
            x = rows(r0, r1)
            if not np.isfinite(x).all():
                raise QuantizationError(f"tensor {name!r} contains NaN or infinity", f.path)
            p, a = nf4.quantize_blocks(x, block_size)
            done(r0, r1)
            e0 = r0 * cols
            packed[e0 // 2: e0 // 2 + p.size] = p
            absmax[e0 // block_size: e0 // block_size + a.size] = a
        if storage.double_quant:
            codes, nested, offset = nf4.double_quantize(absmax)
            q = NF4Tensor(packed, codes, nested, offset, shape, block_size)
        else:
            q = NF4Tensor(packed, absmax, np.zeros(0, np.float32), np.float32(0), shape, block_size)
        deq_absmax = q.absmax()
        for r0, r1 in chunks:
            e0, e1 = r0 * cols, r1 * cols
            approx = q.dequantize_blocks(e0 // block_size, -(-e1 // block_size), deq_absmax)
            meter.add(rows(r0, r1).ravel(), approx[: e1 - e0])
            done(r0, r1)
        storage.write(writer, name, q)
        nbytes = q.nbytes
    else:
        written = 0
        for r0, r1 in chunks:
            x = rows(r0, r1)
            if storage.kind == "float16" and np.abs(x).max(initial=0) > FLOAT16_MAX:
                raise QuantizationError(f"tensor {name!r} has values beyond float16's range; "
                                        f"convert with --embeddings nf4 / --head nf4", f.path)
            y = storage.narrow(x)
            meter.add(x, storage.dequantize(y))
            storage.write(writer, name, y, offset=written)
            written += y.nbytes
            done(r0, r1)
        nbytes = written
    return TensorReport(name, spec.role, storage.kind, n, nbytes, meter.rel, meter.max_abs)


def _manifest(tmp: Path, src, src_path: Path, ckpt, block_size, double_quant, embeddings, head, reports) -> dict:
    files = file_table(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    a = ckpt.args
    nf4_params = sum(r.params for r in reports if r.storage == "nf4")
    params = sum(r.params for r in reports)
    weight_bytes = sum(r.bytes for r in reports)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "edgelora_version": __version__,
        "created_utc": utc_stamp(),  # SOURCE_DATE_EPOCH where set
        "architecture": {"model_type": a.model_type, "architectures": a.architectures,
                         "tie_word_embeddings": a.tie_word_embeddings},
        "source": {
            "name": str(src) if not Path(str(src)).exists() else src_path.resolve().name,
            "dtypes": sorted(ckpt.dtypes),
            "config_sha256": sha256_file(tmp / "config.json"),  # a copy of the source's
            "weights_sha256": {p.name: sha256_file(p) for p in ckpt.shard_paths},
        },
        "quantization": {
            "method": "nf4", "block_size": block_size, "double_quant": double_quant,
            "nested_block_size": NESTED_BLOCK_SIZE, "nested_code": "bitsandbytes-dynamic-signed-8bit",
            "embeddings": embeddings, "lm_head": "tied" if a.tie_word_embeddings else head,
            "compatible_with": "bitsandbytes quantize_4bit(quant_type='nf4', compress_statistics=double_quant)",
            **({"source_quantization": "bitsandbytes-nf4 (imported, codes unchanged)",
                "imported_tensors": len(ckpt.nf4)} if ckpt.nf4 else {}),
        },
        "stats": {"parameters": params, "nf4_parameters": nf4_params, "weight_bytes": weight_bytes,
                  "bits_per_weight": round(8 * weight_bytes / params, 4)},
        "tensors": {r.name: {"role": r.role, "storage": r.storage, "shape": list(ckpt.specs[r.name].shape),
                             "rel_error": round(r.rel_error, 6)} for r in reports},
        "files": files,
    }


def _summary(out: Path, model_type, reports, source_bytes, seconds) -> ConversionSummary:
    nf4_reports = [r for r in reports if r.storage == "nf4"]
    params = sum(r.params for r in reports)
    weights_bytes = sum(r.bytes for r in reports)
    quantized_here = [r for r in reports if not r.imported]
    worst = max([r for r in nf4_reports if not r.imported] or quantized_here or reports, key=lambda r: r.rel_error)
    bundle_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    nf4_params = sum(r.params for r in nf4_reports)
    return ConversionSummary(
        output=str(out), model_type=model_type, parameters=params, nf4_parameters=nf4_params,
        source_bytes=source_bytes, bundle_bytes=bundle_bytes, weights_bytes=weights_bytes,
        bits_per_weight=8 * weights_bytes / params,
        nf4_bits_per_weight=8 * sum(r.bytes for r in nf4_reports) / max(nf4_params, 1),
        worst_tensor=worst.name, worst_rel_error=worst.rel_error, seconds=seconds,
        tensors=[asdict(r) for r in reports], imported=sum(r.imported for r in reports))
