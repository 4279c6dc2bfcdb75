"""``edgelora fleet build`` and ``edgelora fleet status``: the arguments (registered by
``edgelora/cli.py``) and the thin commands over :func:`edgelora.fleet.build` and :func:`edgelora.fleet.status`."""

from __future__ import annotations

import json
import sys


def _cmd_build(ns) -> int:
    from edgelora.fleet import build
    log = None if ns.quiet else (lambda line: print(f"edgelora fleet: {line}", file=sys.stderr, flush=True))
    r = build(ns.fleet, ns.output, address=ns.address, num_cpus=ns.num_cpus, max_retries=ns.max_retries, log=log)
    print(json.dumps(r.to_dict(), indent=1) if ns.json else r.text())
    if r.ok:
        return 0
    codes = {it["error"]["exit_code"] for it in r.items.values() if it["status"] == "failed"}
    return codes.pop() if len(codes) == 1 else 1


def _cmd_status(ns) -> int:
    from edgelora.fleet import format_status, status
    st = status(ns.output)
    print(json.dumps(st, indent=1) if ns.json else format_status(st))
    return 0


def register(command) -> None:
    """Add ``fleet build`` and ``fleet status`` with ``command(name, help, example, **kw)`` (edgelora/cli.py's)."""
    from edgelora.cli import _HelpFormatter
    f = command("fleet", "build, check and evaluate a fleet's models, adapters and device groups on Ray",
                "edgelora fleet build examples/fleet.toml -o fleet-out")
    sub = f.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND",
                           help="build: build the fleet into a folder; status: what of it is built, stale or failed")

    def subcommand(name, help, example):
        return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                              epilog=f"example:\n  {example}", formatter_class=_HelpFormatter)

    b = subcommand("build", "convert every base, check every adapter, deploy every device group and evaluate every "
                            "adapter as Ray tasks, redoing only what changed; writes OUT/report.html and report.json",
                   "edgelora fleet build examples/fleet.toml -o fleet-out --num-cpus 2")
    b.add_argument("fleet", help="the fleet file (TOML: [bases.NAME], [adapters.NAME], [devices.NAME], [eval.NAME])")
    b.add_argument("-o", "--output", required=True, help="output folder (created; items already in it are reused)")
    b.add_argument("--address", default=None, metavar="ray://HOST:PORT|auto",
                   help="join this Ray cluster (auto: the one `ray start` began here; default: start a local one)")
    b.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: every core)")
    b.add_argument("--max-retries", type=int, default=3, help="how often Ray retries a task whose worker died")
    b.add_argument("-q", "--quiet", action="store_true", help="no line per finished item on standard error")
    b.add_argument("--json", action="store_true", help="print the result (counts, items; and errors) as JSON")
    b.set_defaults(func=_cmd_build)

    s = subcommand("status", "what of a fleet output is built, stale (inputs changed since), failed or missing",
                   "edgelora fleet status fleet-out --json")
    s.add_argument("output", help="the output folder of `edgelora fleet build`")
    s.add_argument("--json", action="store_true", help="print the status (and errors) as JSON")
    s.set_defaults(func=_cmd_status)
