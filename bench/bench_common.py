"""What the benchmark scripts share: their command line (models, work folder, JSON output) and
writing the report atomically."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgelora.atomic import write_text_atomic


def parse_args(doc: str, models: list, add=None) -> tuple[argparse.Namespace, Path]:
    """``--models``, ``--workdir``, ``--json`` and what ``add(parser)`` adds; the work folder made."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--workdir", type=Path, default=None, help="where models are made and kept (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    if add is not None:
        add(p)
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgelora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    return a, work


def write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report, indent=1))
