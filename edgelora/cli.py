"""The ``edgelora`` command line: thin subcommands over the public functions (as mlx-lm's cli).

Exit codes: 0 success; 1 other edgelora error; 2 usage (bad arguments, output exists);
3 bad input file (missing, corrupt, truncated, checksum); 4 unsupported (architecture, dtype,
format version, pickle); 5 output could not be written (disk full, permissions); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgelora import __version__
from edgelora.errors import EdgeLoraError


def _cmd_convert(ns) -> int:
    from edgelora.converters.convert import convert
    s = convert(ns.src, ns.output, block_size=ns.block_size, double_quant=not ns.no_double_quant,
                embeddings=ns.embeddings, head=ns.head, overwrite=ns.overwrite,
                progress=not ns.quiet and sys.stderr.isatty())
    if ns.json:
        d = s.to_dict()
        if not ns.verbose:
            d.pop("tensors")
        print(json.dumps(d, indent=1))
    else:
        print(s.text())
        if ns.verbose:
            for t in s.tensors:
                print(f"  {t['name']:<48} {t['storage']:<8} {t['params']:>12,}  rel.err {t['rel_error']:.4f}")
    return 0


def _cmd_inspect(ns) -> int:
    from edgelora.inspect import format_inspect, inspect
    info = inspect(ns.path)
    print(json.dumps(info, indent=1) if ns.json else format_inspect(info))
    return 0 if not str(info.get("checksums", "ok")).startswith("FAILED") else 3


def _cmd_demo(ns) -> int:
    from edgelora.demo import run_demo
    return run_demo(ns.workdir, quiet=ns.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora", description="Fine-tuned language models on small devices.")
    p.add_argument("--version", action="version", version=f"edgelora {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="quantize a Hugging Face checkpoint to an NF4 bundle")
    c.add_argument("src", help="checkpoint folder (config.json, *.safetensors, tokenizer.json) or hub id org/name")
    c.add_argument("-o", "--output", required=True, help="bundle folder to create")
    c.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256), help="NF4 block size (64)")
    c.add_argument("--no-double-quant", action="store_true", help="keep block scales in float32")
    c.add_argument("--embeddings", choices=("float16", "nf4"), default="float16",
                   help="storage of the token embeddings (float16)")
    c.add_argument("--head", choices=("float16", "nf4"), default="float16",
                   help="storage of an untied output head (float16)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="per-tensor errors")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="describe a bundle or a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("demo", help="build and convert the built-in demo model (offline)")
    d.add_argument("--workdir", default=None, help="where to put the demo files (default: a user cache folder)")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except EdgeLoraError as e:
        print(f"edgelora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgelora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
