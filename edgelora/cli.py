"""The ``edgelora`` command line: thin subcommands over the public functions (as mlx-lm's cli).

Exit codes: 0 success; 1 other edgelora error; 2 usage (bad arguments, output exists);
3 bad input file (missing, corrupt, truncated, checksum, an adapter made for another base); 4 unsupported (architecture, dtype,
format version, pickle); 5 output could not be written (disk full, permissions); 6 a memory plan does not fit
its device, or a deploy folder is used beyond its plan or on another kind of device; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgelora import __version__
from edgelora.errors import EdgeLoraError


def _cmd_convert(ns) -> int:
    from edgelora.converters.convert import convert
    s = convert(ns.src, ns.output, block_size=ns.block_size, double_quant=False if ns.no_double_quant else None,
                embeddings=ns.embeddings, head=ns.head, overwrite=ns.overwrite,
                progress=not ns.quiet and sys.stderr.isatty(), merge_adapter=ns.merge_adapter)
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
    from edgelora.inspection import format_inspect, inspect
    info = inspect(ns.path)
    print(json.dumps(info, indent=1) if ns.json else format_inspect(info))
    return 0 if not str(info.get("checksums", "ok")).startswith("FAILED") else 3


def _sampling(ns) -> dict:
    return {"temperature": ns.temperature, "top_k": ns.top_k, "top_p": ns.top_p, "min_p": ns.min_p,
            "repetition_penalty": ns.repetition_penalty, "seed": ns.seed}


def _split_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        from edgelora.errors import UsageError
        raise UsageError(f"--adapter {spec!r}: expected NAME=PATH")
    return name, path


def _load_model(ns):
    """The bundle, with every ``--adapter NAME=PATH`` resident and ``--use`` selected (a single
    adapter is used by default)."""
    import edgelora
    from edgelora.errors import UsageError
    model = edgelora.load(ns.bundle, threads=ns.threads, max_context=ns.max_context,
                          device_check=not ns.any_device, mmap=not ns.no_mmap, products=ns.products)
    for spec in ns.adapter:
        model.adapters.load(*_split_adapter(spec))
    n = len(model.adapters)
    if ns.use is not None:
        model.use(ns.use)  # the text as given: the model parses a mix
    elif n == 1:
        model.use(model.adapters.names[0])
    elif n > 1:
        raise UsageError(f"{n} adapters loaded ({', '.join(model.adapters.names)}): say which to use with --use NAME, "
                         f"--use a=0.5,b=0.5 or --use base")
    return model


def _cmd_run(ns) -> int:
    model = _load_model(ns)
    pieces = []
    for chunk in model.stream_generate(ns.prompt, max_new_tokens=ns.max_tokens, stop=ns.stop or None, **_sampling(ns)):
        pieces.append(chunk.text)
        if not ns.json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    s = chunk.stats  # this generation's (the last item always comes, with its finish reason)
    if ns.json:
        print(json.dumps({"prompt": ns.prompt, "text": "".join(pieces), **s.to_dict()}, indent=1))
    else:
        sys.stdout.write("\n")
        print(f"[{s.prompt_tokens} prompt tokens at {s.prefill_tokens_per_second:.1f} tok/s, {s.generated_tokens} "
              f"generated at {s.decode_tokens_per_second:.1f} tok/s, stop: {s.stop_reason}, adapter: {s.adapter}]",
              file=sys.stderr)
    return 0


CHAT_HELP = ("commands: /adapters lists resident adapters; /use NAME or /use a=0.5,b=0.5 switches; /base uses "
             "the plain base; /load NAME=PATH and /unload NAME change what is resident; /reset clears the "
             "conversation; /exit quits")


def _chat_command(model, cmd: str) -> str:
    """Run one chat slash-command on ``model``; the line to print."""
    import time
    word, _, arg = cmd.partition(" ")
    arg = arg.strip()
    if word == "/adapters":
        if not model.adapters.names:
            return "(no adapters loaded; /load NAME=PATH)"
        rows = []
        for name in model.adapters.names:
            r = model.adapters[name].info()
            rows.append(f"{'*' if name in dict(model.selection.members) else ' '} {name:<16} rank "
                        f"{','.join(map(str, r['ranks']))}, {len(r['targets'])} module kinds, "
                        f"{r['bytes'] / 1e6:.2f} MB  {r['path']}")
        return "\n".join(rows + [f"using: {model.active_adapter}"])
    if word in ("/use", "/base"):
        t = time.perf_counter()
        model.use(None if word == "/base" else arg)
        return f"(using {model.active_adapter}; switched in {(time.perf_counter() - t) * 1e3:.3f} ms)"
    if word == "/load":
        res = model.adapters.load(*_split_adapter(arg))
        return f"(loaded {res.name}: {res.nbytes / 1e6:.2f} MB in {res.load_seconds * 1e3:.1f} ms; /use {res.name})"
    if word == "/unload":
        model.adapters.unload(arg)
        return f"(unloaded {arg}; using {model.active_adapter})"
    return CHAT_HELP


def _cmd_chat(ns) -> int:
    model = _load_model(ns)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    history = list(system)
    model.tokenizer.apply_chat_template(history + [{"role": "user", "content": "hi"}])  # fail early without a template
    print(f"edgelora chat (adapter: {model.active_adapter}). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        if cmd.startswith("/"):
            try:
                print(_chat_command(model, cmd), file=sys.stderr)
            except EdgeLoraError as e:
                print(f"edgelora: error: {e}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer = []
        for chunk in model.stream_generate(model.chat_ids(history), max_new_tokens=ns.max_tokens, **_sampling(ns)):
            answer.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
        s = chunk.stats
        print(f"[{s.adapter}: prefill {s.prompt_tokens} tok at {s.prefill_tokens_per_second:.1f} tok/s, decode "
              f"{s.generated_tokens} tok at {s.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _cmd_bench(ns) -> int:
    from edgelora.benchmark import bench, format_bench
    report = bench(ns.bundle, ns.threads, ns.prompt_tokens, ns.decode_tokens, mmap=not ns.no_mmap,
                   products=ns.products)
    print(json.dumps(report, indent=1) if ns.json else format_bench(report))
    return 0


def _adapters_arg(specs) -> dict:
    out = {}
    for spec in specs:
        name, path = _split_adapter(spec)
        if name in out:
            from edgelora.errors import UsageError
            raise UsageError(f"--adapter {name!r} given twice")
        out[name] = path
    return out


def _cmd_devices(ns) -> int:
    from edgelora.devices.profiles import format_devices, list_devices, user_dirs
    devices = list_devices()
    if ns.json:
        print(json.dumps({n: d.to_dict() for n, d in devices.items()}, indent=1))
    else:
        print(format_devices(devices))
        print(f"\n(add your own profile as a .toml file in {user_dirs()[0]}; see `edgelora devices --show NAME`)")
    if ns.show:
        from edgelora.devices.profiles import get_device
        d = get_device(ns.show)
        print(f"\n# {d.path}\n{d.to_toml()}", end="")
    return 0


def _cmd_plan(ns) -> int:
    from edgelora.devices.planner import measure_peak_rss, plan
    adapters = _adapters_arg(ns.adapter)
    p = plan(ns.bundle, ns.device, context=ns.context, adapters=adapters, threads=ns.threads)
    out = p.to_dict()
    text = p.text()
    if ns.measure:
        peak = measure_peak_rss(ns.bundle, p.context, adapters, threads=p.threads)
        out["measured_peak_rss_bytes"] = peak
        text += (f"\nmeasured on this machine: peak RSS {peak / 1e6:.1f} MB "
                 f"(the plan's total is {p.total_bytes / peak - 1:+.1%} off it)")
    print(json.dumps(out, indent=1) if ns.json else text)
    return 0 if p.fits else 6


def _cmd_deploy(ns) -> int:
    from edgelora.deployment import deploy
    r = deploy(ns.bundle, ns.device, ns.output, adapters=_adapters_arg(ns.adapter), context=ns.context,
               threads=ns.threads, archive=ns.archive, overwrite=ns.overwrite)
    print(r.text())
    return 0


def _cmd_unpack(ns) -> int:
    from edgelora.deployment import unpack
    out = unpack(ns.archive, ns.output, overwrite=ns.overwrite)
    print(f"unpacked and verified {out}")
    return 0


def _add_products_option(p) -> None:
    p.add_argument("--products", choices=("exact", "int8"), default="exact",
                   help="NF4 products: exact float32 (default) or int8 activations with int32 sums (faster, "
                        "approximate; README, The int8 product path)")


def _add_generation_options(p) -> None:
    p.add_argument("bundle", help="bundle folder written by `edgelora convert`, or a deploy folder")
    p.add_argument("--any-device", action="store_true",
                   help="run a deploy folder even on a machine unlike the device it was planned for")
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (all cores)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache length (min(model limit, 2048))")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory instead of mapping the file (slower start; faster decode "
                        "where huge pages apply)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load a PEFT LoRA adapter folder as NAME (repeatable)")
    _add_products_option(p)
    p.add_argument("--use", default=None, metavar="NAME|a=0.5,b=0.5|base",
                   help="adapter to use, or a weighted mix (default: the only --adapter, else required)")


def _cmd_warmup(ns) -> int:
    from edgelora.runtime.warmup import warmup
    report = warmup(ns.bundle, threads=ns.threads, mmap=not ns.no_mmap, products=ns.products)
    print(json.dumps(report.to_dict(), indent=1) if ns.json else report.text())
    return 0


def _cmd_demo(ns) -> int:
    from edgelora.demo import run_demo
    return run_demo(ns.workdir, quiet=ns.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora", description="Fine-tuned language models on small devices.")
    p.add_argument("--version", action="version", version=f"edgelora {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="quantize a Hugging Face checkpoint or an ONNX model to an NF4 bundle")
    c.add_argument("src", help="checkpoint folder (config.json, *.safetensors, tokenizer.json), hub id org/name, "
                               "or an ONNX decoder model.onnx (tokenizer.json and config.json beside it)")
    c.add_argument("-o", "--output", required=True, help="bundle folder to create")
    c.add_argument("--block-size", type=int, default=None, choices=(32, 64, 128, 256),
                   help="NF4 block size (64; a bitsandbytes 4-bit checkpoint keeps its own)")
    c.add_argument("--no-double-quant", action="store_true", help="keep block scales in float32")
    c.add_argument("--embeddings", choices=("float16", "nf4"), default="float16",
                   help="storage of the token embeddings (float16)")
    c.add_argument("--head", choices=("float16", "nf4"), default="float16",
                   help="storage of an untied output head (float16)")
    c.add_argument("--merge-adapter", default=None, metavar="ADAPTER_DIR",
                   help="fold one PEFT LoRA adapter into the weights before quantizing (base speed, not switchable)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="per-tensor errors")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="describe a bundle, a checkpoint or a LoRA adapter folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    r = sub.add_parser("run", help="generate text from a prompt, streamed")
    _add_generation_options(r)
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--json", action="store_true", help="print prompt/generated ids, text and timings as JSON")
    r.set_defaults(func=_cmd_run)

    ch = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_generation_options(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.set_defaults(func=_cmd_chat)

    b = sub.add_parser("bench", help="prefill/decode speed, time to first token, peak RSS, bandwidth bound")
    b.add_argument("bundle")
    b.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (1 and all cores)")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--no-mmap", action="store_true", help="read the weights into memory (as `run --no-mmap`)")
    _add_products_option(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench)

    dv = sub.add_parser("devices", help="list the device profiles (shipped and your own)")
    dv.add_argument("--json", action="store_true")
    dv.add_argument("--show", default=None, metavar="NAME", help="print one profile's file")
    dv.set_defaults(func=_cmd_devices)

    for cmd, text in (("plan", "will a bundle, its context and its adapters fit a device? (exit 6 when not)"),
                      ("deploy", "plan, then write a verified deploy folder for a device (refused when it does not fit)")):
        x = sub.add_parser(cmd, help=text)
        x.add_argument("bundle", help="bundle folder written by `edgelora convert`")
        x.add_argument("--device", required=True, help="device profile name (see `edgelora devices`) or a .toml file")
        x.add_argument("--context", type=int, default=None, help="KV cache positions (min(model limit, 2048))")
        x.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT LoRA adapter to keep resident (repeatable)")
        x.add_argument("--threads", type=int, default=None, help="threads to plan for (the device's cores)")
        if cmd == "plan":
            x.add_argument("--json", action="store_true")
            x.add_argument("--measure", action="store_true",
                           help="also run the plan on this machine (context filled to its end) and report its peak RSS")
            x.set_defaults(func=_cmd_plan)
        else:
            x.add_argument("-o", "--output", required=True, help="deploy folder to create")
            x.add_argument("--archive", action="store_true", help="also write OUTPUT.tar")
            x.add_argument("--overwrite", action="store_true", help="replace an existing output")
            x.set_defaults(func=_cmd_deploy)

    u = sub.add_parser("unpack", help="extract and verify a deploy archive (edgelora deploy --archive)")
    u.add_argument("archive")
    u.add_argument("-o", "--output", required=True, help="folder to create")
    u.add_argument("--overwrite", action="store_true")
    u.set_defaults(func=_cmd_unpack)

    w = sub.add_parser("warmup", help="compile the kernels a bundle needs on this machine, ahead of its first use",
                       description="Compile (once per machine, edgelora version and CPU) every kernel a bundle or "
                                   "deploy folder runs, so that later loads start without compiling: e.g. when a "
                                   "device is set up. Example: edgelora warmup model-nf4")
    w.add_argument("bundle", nargs="?", default=None,
                   help="bundle or deploy folder (default: the built-in demo model, whose kernels are those of any "
                        "bundle written with convert's default options)")
    w.add_argument("--threads", type=int, default=None, help="the thread count it will run with (default: every core)")
    w.add_argument("--no-mmap", action="store_true", help="for running with the weights read into memory")
    _add_products_option(w)
    w.add_argument("--json", action="store_true", help="print the result as JSON")
    w.set_defaults(func=_cmd_warmup)

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
    except BrokenPipeError:  # the reader went away (`edgelora inspect ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
