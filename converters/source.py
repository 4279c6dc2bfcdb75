"""What the converter asks of a source other than a Hugging Face folder (ONNX graphs, GGUF files).

:class:`~edgelora.converters.hf.HFCheckpoint` defines the interface ``convert`` uses: ``path``,
``args``, ``specs`` (the architecture's tensor map), ``where`` (tensor name -> a reader with
``raw``/``tensors``/``release``/``float32``), ``nf4`` (pre-quantized weights), ``shard_paths``,
``dtypes``, ``source_bytes``, ``tokenizer_files``, ``write_config``, ``source_meta``. A source that
is read through one reader object of its own, and whose config is either a ``config.json`` beside
it (``config_path``) or derived from the file (``config_dict``), shares the rest here.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.converters.hf import TOKENIZER_FILES
from edgelora.errors import UsageError
from edgelora.safetensors_io import DTYPES


def find_source_file(path, suffix: str, what: str, hint: str) -> Path | None:
    """The ``suffix`` file ``path`` names: itself if such a file, the one ``*suffix`` of a folder
    without safetensors weights, else None; a folder with several is a usage error (``hint``
    says what to pass instead)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == suffix else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob(f"*{suffix}"))
    if len(files) > 1:
        raise UsageError(f"the folder holds several {what} ({', '.join(p.name for p in files)}); pass the one to "
                         f"convert ({hint})", path)
    return files[0] if files else None


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of such a source as its reader lists it (``tensors``): the part of a safetensors
    ``TensorInfo`` the converter reads."""

    dtype: str  # F32 | F16 | BF16
    shape: tuple  # [out, in] for projections, as the converter reads it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class DerivedCheckpoint:
    nf4_layout = None  # no pre-quantized weights: such sources are float, quantized ones refused
    nf4: dict = {}  # never written to: a class-level empty mapping is shared safely
    config_path: Path | None = None
    config_dict: dict = {}

    @property
    def _reader(self):
        return next(iter(self.where.values()))

    @property
    def dtypes(self) -> set[str]:
        return {self._reader.tensors[n].dtype for n in self.specs}

    def tensor(self, name: str) -> np.ndarray:
        """A source tensor in float32, ``[out, in]`` for projections, as the converter reads it."""
        return self.where[name].float32(name)

    def source_bytes(self) -> int:
        return sum(self._reader.tensors[n].nbytes for n in self.specs)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def write_config(self, dst: Path) -> None:
        """The bundle's config.json: the one beside the source (cross-checked), else the derived one."""
        if self.config_path is not None:
            shutil.copyfile(self.config_path, dst)
        else:
            Path(dst).write_text(json.dumps(self.config_dict, indent=2) + "\n")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
