"""Python child processes (the planner's probes, ``edgelora bench``) that import the same edgelora as
the parent, whatever folder they start in.

``python -c CODE`` puts the working folder first on ``sys.path``, so a folder named ``edgelora`` there
(a source checkout, an unrelated project) would be imported instead of the installed package. The
child drops that entry before anything else (Python 3.11's ``-P``, on 3.10 too) and, where the parent
runs from a folder that is not installed, finds the parent's package after everything else on the
path (``PYTHONPATH`` still comes first: ``edgelora bench`` uses it to run another version)."""

from __future__ import annotations

import os
import sys

import edgelora

#: the folder holding the parent's ``edgelora`` package
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(edgelora.__file__)))

_PRELUDE = ("import sys\n"
            "if sys.path and sys.path[0] == '':\n"
            "    del sys.path[0]\n"
            f"if {PACKAGE_ROOT!r} not in sys.path:\n"
            f"    sys.path.append({PACKAGE_ROOT!r})\n")


def python_command(code: str, *args) -> list[str]:
    """The command line of a child Python running ``code`` with ``args`` as ``sys.argv[1:]``."""
    return [sys.executable, "-c", _PRELUDE + code, *(str(a) for a in args)]
