"""Write docs/api.md, the API reference, from the docstrings and signatures of every public name
of ``edgelora`` (``edgelora.__all__``): functions, then classes with their public methods and
properties. ``--check`` exits 1 when docs/api.md is not what this script writes (the test suite
runs it: tests/test_api_docs.py).

    python scripts/api_docs.py           # rewrite docs/api.md
    python scripts/api_docs.py --check   # is it current?
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _signature(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _members(cls) -> list[tuple[str, object]]:
    """The public methods and properties ``cls`` defines or inherits from edgelora classes, in
    source order."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("edgelora"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
                out[name] = value
    return list(out.items())


def _class_section(name: str, cls) -> list[str]:
    lines = [f"## class `{name}`", "", f"`edgelora.{name}` (defined in `{cls.__module__}`)", "", _doc(cls), ""]
    for member, value in _members(cls):
        if isinstance(value, property):
            lines += [f"### `{name}.{member}` (property)", "", _doc(value) if value.__doc__ else "", ""]
            continue
        func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if member == "__init__" and not func.__doc__:
            shown = f"{name}{inspect.signature(cls)}"
            lines += [f"### `{name}(...)`", "", "```python", shown, "```", ""]
            continue
        lines += [f"### `{name}.{member}`", "", "```python", _signature(member, func), "```", "", _doc(func), ""]
    return lines


def render() -> str:
    """The text of docs/api.md for the edgelora on the path."""
    import edgelora
    names = [n for n in edgelora.__all__ if n != "__version__"]
    objects = {n: getattr(edgelora, n) for n in names}
    functions = [n for n, o in objects.items() if inspect.isfunction(o)]
    classes = [n for n, o in objects.items() if inspect.isclass(o)]
    lines = ["# edgelora API reference", "",
             "Written by `scripts/api_docs.py` from the docstrings; do not edit by hand (the tests check that it "
             "is current).", "", _doc(edgelora), "", "## Functions", ""]
    for n in functions:
        f = objects[n]
        lines += [f"### `edgelora.{n}`", "", f"(defined in `{f.__module__}`)", "", "```python",
                  _signature(n, f), "```", "", _doc(f), ""]
    for n in classes:
        lines += _class_section(n, objects[n])
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is not current")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
