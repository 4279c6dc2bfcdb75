"""``edgelora fleet``: build, check and evaluate a whole fleet's models and adapters on Ray.

A fleet file (``fleet.toml``, :mod:`edgelora.fleet.spec`) names base models, the LoRA adapters
made for them, device groups (a profile, a context, which adapters) and evaluation sets;
:func:`build` converts every base, checks every adapter against its base, plans and deploys
every device group and evaluates every adapter as a graph of Ray tasks
(:mod:`edgelora.fleet.runner`), redoing only what changed (:mod:`edgelora.fleet.store`), and
writes ``OUT/report.html`` and ``OUT/report.json`` (:mod:`edgelora.fleet.report`)::

    import edgelora.fleet
    result = edgelora.fleet.build("fleet.toml", "out/")        # BuildResult: .counts, .ok, .items
    edgelora.fleet.status("out/")                              # built / stale / failed / missing

Importing this package does not import Ray (``pip install 'edgelora[fleet]'`` for building).
"""

from __future__ import annotations

from edgelora.fleet.report import format_status, status
from edgelora.fleet.runner import BuildResult, build
from edgelora.fleet.spec import Fleet, FleetFileError, read_fleet

__all__ = ["build", "BuildResult", "status", "format_status", "read_fleet", "Fleet", "FleetFileError"]
