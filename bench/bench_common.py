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
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=models,
                   help="models to run: shapes of bench/make_random_model.py (llama-3.2-1b, tinyllama-1.1b, "
                        "small-50m; random weights) or checkpoints in ../shared/models, e.g. stories260K")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where models are made and kept (default %(default)s: a new temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default %(default)s: not written)")
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
