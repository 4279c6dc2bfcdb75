"""The ``edgelora`` command line: thin subcommands over the public functions (as mlx-lm's cli).

Exit codes: 0 success; 1 other edgelora error; 2 usage (bad arguments, output exists);
3 bad input file (missing, corrupt, truncated, checksum, an adapter made for another base); 4 unsupported (architecture, dtype,
format version, pickle); 5 output could not be written (disk full, permissions); 6 a memory plan does not fit
its device, or a deploy folder is used beyond its plan or on another kind of device; 7 busy (a batching engine's
queue is full, or it is closed: try again); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from edgelora import __version__
from edgelora.errors import EdgeLoraError, FormatError, UsageError


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
    """``NAME=PATH``, or a bare ``PATH`` named after its folder (``adapters/pirate/`` -> ``pirate``)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not name or not path:
        raise UsageError(f"--adapter {spec!r}: expected PATH or NAME=PATH")
    return name, path


def _read_prompt(ns) -> str:
    """The prompt: ``--prompt TEXT`` (``-`` reads standard input) or ``--prompt-file FILE``."""
    if ns.prompt_file is not None:
        try:
            return Path(ns.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FormatError("prompt file does not exist", ns.prompt_file) from None
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"cannot read the prompt file: {e}", ns.prompt_file) from None
    if ns.prompt == "-":
        return sys.stdin.read()
    return ns.prompt


#: C0/C1 control characters other than newline and tab, and U+FFFD (an undecodable byte run):
#: never written to a terminal as generated text
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def printable(text: str) -> str:
    """``text`` without control bytes (but newlines and tabs) or replacement characters."""
    return _UNPRINTABLE.sub("", text)


def _load_model(ns):
    """The bundle, with every ``--adapter [NAME=]PATH`` resident and ``--use`` selected (a single
    adapter is used by default)."""
    import edgelora
    model = edgelora.load(ns.bundle, threads=ns.threads, max_context=ns.max_context,
                          device_check=not ns.any_device, mmap=not ns.no_mmap, products=ns.products,
                          kv_cache=ns.kv_cache, adapter_dtype=ns.adapter_dtype)
    seen = set()
    for spec in ns.adapter:
        name, path = _split_adapter(spec)
        if name in seen:
            raise UsageError(f"--adapter {name!r} given twice; name them apart with NAME=PATH")
        seen.add(name)
        if name not in model.adapters.names:  # a deploy folder's own adapters are resident already
            model.adapters.load(name, path)
    n = len(model.adapters)
    if ns.use is not None:
        model.use(ns.use)  # the text as given: the model parses a mix
    elif n == 1:
        model.use(model.adapters.names[0])
    elif n > 1:
        raise UsageError(f"{n} adapters loaded ({', '.join(model.adapters.names)}): say which to use with --use NAME, "
                         f"--use a=0.5,b=0.5 or --use base")
    return model


def _draft_options(ns, model) -> dict:
    """``--draft``/``--num-draft`` as generation options: ``prompt-lookup``, or a draft bundle loaded
    beside the model (same threads and context)."""
    options = {} if ns.num_draft is None else {"num_draft": ns.num_draft}
    if ns.draft is None or ns.draft == "prompt-lookup":
        return {"draft": ns.draft, **options}
    import edgelora
    return {"draft": edgelora.load(ns.draft, threads=ns.threads, max_context=model.max_context,
                                   device_check=not ns.any_device, mmap=not ns.no_mmap), **options}


def _stats_line(s) -> str:
    drafted = f", drafted {s.drafted_tokens}, kept {s.accepted_tokens}" if s.drafted_tokens else ""
    return (f"[{s.prompt_tokens} prompt tokens at {s.prefill_tokens_per_second:.1f} tok/s, {s.generated_tokens} "
            f"generated at {s.decode_tokens_per_second:.1f} tok/s, stop: {s.stop_reason}, adapter: {s.adapter}"
            f"{drafted}]")


def _cmd_run(ns) -> int:
    prompt = _read_prompt(ns)
    model = _load_model(ns)
    pieces = []
    for chunk in model.stream_generate(prompt, max_new_tokens=ns.max_tokens, stop=ns.stop or None,
                                       **_draft_options(ns, model), **_sampling(ns)):
        pieces.append(chunk.text)
        if not ns.json and chunk.text:
            sys.stdout.write(printable(chunk.text))
            sys.stdout.flush()
    s = chunk.stats  # this generation's (the last item always comes, with its finish reason)
    if ns.json:
        print(json.dumps({"prompt": prompt, "text": "".join(pieces), **s.to_dict()}, indent=1))
    else:
        sys.stdout.write("\n")
        print(_stats_line(s), file=sys.stderr)
    return 0


def _cmd_eval(ns) -> int:
    from edgelora.evaluation import evaluate
    result = evaluate(_load_model(ns), text_file=ns.text, data=ns.data, window=ns.window)
    print(json.dumps(result.to_dict(), indent=1) if ns.json else result.format())
    return 0


CHAT_HELP = ("commands: /adapters lists resident adapters; /use NAME or /use a=0.5,b=0.5 switches; /base uses "
             "the plain base; /load [NAME=]PATH and /unload NAME change what is resident; /reset clears the "
             "conversation; /help shows this; /exit quits")

#: each chat command with an argument, and its usage line
CHAT_USAGE = {"/use": "usage: /use NAME, /use a=0.5,b=0.5 or /use base", "/load": "usage: /load [NAME=]PATH",
              "/unload": "usage: /unload NAME"}


def _chat_command(model, cmd: str) -> str:
    """Run one chat slash-command on ``model``; the line to print (a ``UsageError`` for an unknown
    command or a missing argument)."""
    import time
    word, _, arg = cmd.partition(" ")
    arg = arg.strip()
    if word in CHAT_USAGE and not arg:
        raise UsageError(CHAT_USAGE[word])
    if word == "/help":
        return CHAT_HELP
    if word == "/adapters":
        if not model.adapters.names:
            return "(no adapters loaded; /load [NAME=]PATH)"
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
        return f"(loaded {res.name}: {res.nbytes / 1e6:.2f} MB, {res.held}, in {res.load_seconds * 1e3:.1f} ms; /use {res.name})"
    if word == "/unload":
        model.adapters.unload(arg)
        return f"(unloaded {arg}; using {model.active_adapter})"
    raise UsageError(f"unknown command {word}; {CHAT_HELP}")


def _read_template(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError("chat template file does not exist", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read the chat template: {e}", path) from None


def drops_system_message(tokenizer, template: str | None = None) -> bool:
    """Whether the chat template leaves a system message out of the prompt it renders."""
    mark = "edgelora-system-7f3a"
    text = tokenizer.apply_chat_template([{"role": "system", "content": mark}, {"role": "user", "content": "hi"}],
                                         chat_template=template)
    return mark not in text


def fit_history(history: list, keep: int, count, limit: int) -> int:
    """Drop the oldest turns of ``history`` (after its first ``keep`` messages, the system's; never
    the last message) until ``count(history) <= limit``; how many messages were dropped."""
    dropped = 0
    while count(history) > limit and len(history) - keep > 1:
        pair = len(history) - keep > 2 and history[keep + 1]["role"] == "assistant"  # a question and its answer
        del history[keep:keep + 1 + pair]
        dropped += 1 + pair
    return dropped


def _cmd_chat(ns) -> int:
    from edgelora.runtime.prompt_cache import conversation_cache
    template = None if ns.chat_template is None else _read_template(ns.chat_template)
    model = _load_model(ns)
    model.prompt_cache = conversation_cache(model)  # each turn prefills only what is new
    tok = model.tokenizer
    if template is None and not tok.has_chat_template:
        raise UsageError("this model has no chat template: give one with --chat-template FILE (a Jinja file as "
                         "in transformers), or use `edgelora run -p TEXT` with a plain prompt", model.path)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    history = list(system)
    tok.apply_chat_template(history + [{"role": "user", "content": "hi"}], chat_template=template)  # fail early
    if system and drops_system_message(tok, template):
        print("edgelora: warning: this model's chat template leaves the system message out; --system has no "
              "effect (give a template that uses it with --chat-template FILE)", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows
            pass
    print(f"edgelora chat (adapter: {model.active_adapter}). {CHAT_HELP}", file=sys.stderr)
    failed = 0  # with piped input, the exit code of the last error: the session's when its input ends

    def encode(messages):
        return tok.encode(tok.apply_chat_template(messages, chat_template=template), add_special_tokens=False)

    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return failed
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):  # a deliberate end: success
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
                failed = 0 if interactive else e.exit_code
            continue
        history.append({"role": "user", "content": line})
        room = min(ns.max_tokens, model.max_context // 2)  # kept for the answer when old turns must go
        dropped = fit_history(history, len(system), lambda h: len(encode(h)), model.max_context - room)
        if dropped:
            print(f"(the conversation outgrew the {model.max_context}-token context: dropped its oldest "
                  f"{dropped} message{'s' * (dropped > 1)})", file=sys.stderr)
        ids = encode(history)
        if len(ids) > model.max_context:
            print(f"edgelora: error: this message makes a prompt of {len(ids)} tokens, more than the "
                  f"{model.max_context}-token context; say it shorter (or load with a larger --max-context)",
                  file=sys.stderr)
            history.pop()
            failed = 0 if interactive else UsageError.exit_code
            continue
        answer = []
        for chunk in model.stream_generate(ids, max_new_tokens=ns.max_tokens, **_sampling(ns)):
            answer.append(chunk.text)
            if not ns.json:
                sys.stdout.write(printable(chunk.text))
                sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer)})
        s = chunk.stats
        if ns.json:  # one object per turn
            print(json.dumps({"prompt": line, "text": "".join(answer), **s.to_dict()}), flush=True)
        else:
            print()
            cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
            print(f"[{s.adapter}: prefill {s.prompt_tokens} tok{cached} at {s.prefill_tokens_per_second:.1f} tok/s, "
                  f"decode {s.generated_tokens} tok at {s.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _cmd_bench(ns) -> int:
    from edgelora.benchmark import bench, format_bench
    report = bench(ns.bundle, ns.threads, ns.prompt_tokens, ns.decode_tokens, mmap=not ns.no_mmap, runs=ns.runs,
                   products=ns.products, kv_cache=ns.kv_cache)
    print(json.dumps(report, indent=1) if ns.json else format_bench(report))
    return 0


def _adapters_arg(specs) -> dict:
    out = {}
    for spec in specs:
        name, path = _split_adapter(spec)
        if name in out:
            raise UsageError(f"--adapter {name!r} given twice; name them apart with NAME=PATH")
        out[name] = path
    return out


def _cmd_devices(ns) -> int:
    from edgelora.devices.profiles import format_devices, get_device, list_devices, user_dirs
    if ns.show:
        d = get_device(ns.show)
        print(json.dumps(d.to_dict(), indent=1) if ns.json else (f"# {d.path}\n" if d.path else "") + d.to_toml(),
              end="\n" if ns.json else "")
        return 0
    devices = list_devices()
    if ns.json:
        print(json.dumps({n: d.to_dict() for n, d in devices.items()}, indent=1))
    else:
        print(format_devices(devices))
        print(f"\n(add your own profile as a .toml file in {user_dirs()[0]}; see `edgelora devices --show NAME`)")
    return 0


def _cmd_plan(ns) -> int:
    from edgelora.devices.planner import measure_peak_rss, measure_train_peak_rss, plan
    adapters = _adapters_arg(ns.adapter)
    train = ({"rank": ns.rank, "targets": ns.targets, "tokens": ns.tokens, "recompute": ns.recompute}
             if ns.train else None)
    p = plan(ns.bundle, ns.device, context=ns.context, adapters=adapters, threads=ns.threads, train=train,
             kv_cache=ns.kv_cache)
    out = p.to_dict()
    text = p.text()
    if ns.measure:
        peak = (measure_train_peak_rss(ns.bundle, train, threads=p.threads) if train
                else measure_peak_rss(ns.bundle, p.context, adapters, threads=p.threads, kv_cache=ns.kv_cache))
        out["measured_peak_rss_bytes"] = peak
        text += (f"\nmeasured on this machine: peak RSS {peak / 1e6:.1f} MB "
                 f"(the plan's total is {p.total_bytes / peak - 1:+.1%} off it)")
    print(json.dumps(out, indent=1) if ns.json else text)
    return 0 if p.fits else 6


def _cmd_deploy(ns) -> int:
    from edgelora.deployment import deploy
    from edgelora.runtime.warmup import status_line  # (the CLI imports what each command needs when it runs)
    status_line(f"edgelora deploy: planning for {ns.device}, then writing and hashing {ns.output}...")
    r = deploy(ns.bundle, ns.device, ns.output, adapters=_adapters_arg(ns.adapter), context=ns.context,
               threads=ns.threads, archive=ns.archive, overwrite=ns.overwrite, kv_cache=ns.kv_cache)
    if ns.json:
        print(json.dumps({"path": str(r.path), "archive": None if r.archive is None else str(r.archive),
                          "files": len(r.files) + 1, "total_file_bytes": r.total_file_bytes,
                          "plan": r.plan.to_dict()}, indent=1))
    else:
        print(r.text())
    return 0


def _cmd_unpack(ns) -> int:
    from edgelora.deployment import unpack
    out = unpack(ns.archive, ns.output, overwrite=ns.overwrite)
    print(json.dumps({"path": str(out), "verified": True}, indent=1) if ns.json else f"unpacked and verified {out}")
    return 0


def _cmd_train(ns) -> int:
    from edgelora.training import summary_text, train
    from edgelora.runtime.warmup import status_line
    if ns.eval_every is not None and ns.eval is None:
        raise UsageError("--eval-every needs --eval DATA")
    if not ns.dry_run:
        status_line(f"edgelora train: reading {ns.data} and loading {ns.bundle}...")
    result = train(ns.bundle, ns.data, ns.output, rank=ns.rank, alpha=ns.alpha, targets=ns.targets,
                   rslora=ns.rslora, dropout=ns.dropout, lr=ns.lr, epochs=ns.epochs, steps=ns.steps,
                   batch_tokens=ns.batch_tokens, grad_accum=ns.grad_accum, max_length=ns.max_length,
                   overflow=ns.overflow, seed=ns.seed, resume=ns.resume, eval_data=ns.eval,
                   eval_every=ns.eval_every, save_every=ns.save_every, threads=ns.threads,
                   warmup_ratio=ns.warmup_ratio, weight_decay=ns.weight_decay, max_grad_norm=ns.max_grad_norm,
                   recompute=ns.recompute, dry_run=ns.dry_run, overwrite=ns.overwrite, progress=None if not ns.quiet else False)
    if ns.json:
        print(json.dumps(result.to_dict(), indent=1))
    elif ns.dry_run:
        print(result.text(color=sys.stdout.isatty()))
    else:
        print(summary_text(result, ns.bundle))
    return 0


def _add_products_option(p, kv_default: str | None = None, adapters: bool = True) -> None:
    """``--products``, ``--kv-cache`` (``kv_default``: None where a deploy folder's plan decides)
    and, for a command that loads adapters, ``--adapter-dtype``."""
    from edgelora.products import ADAPTER_DTYPES, DEFAULT_ADAPTER_DTYPES, DEFAULT_PRODUCTS, PRODUCTS
    p.add_argument("--products", choices=PRODUCTS, default=DEFAULT_PRODUCTS,
                   help="NF4 products: exact float32, or int8 activations with int32 sums, a float16 head "
                        "quantized to int8 at load (faster, approximate; README, The int8 product path)")
    _add_kv_cache_option(p, kv_default)
    if adapters:
        by_products = ", ".join(f"{d} with {products} products" for products, d in DEFAULT_ADAPTER_DTYPES.items())
        p.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default=None,
                       help="how adapters' A and B are held: float16 (each value rounded once at load, as deploy "
                            "writes them: half the bytes a decode step reads of a float32 file's) or float32 (the "
                            f"file's values exactly, as PEFT computes; README, LoRA adapters) (default: {by_products})")


def _add_kv_cache_option(p, default: str | None) -> None:
    from edgelora.products import DEFAULT_KV_CACHES, KV_CACHES
    by_products = ", ".join(f"{kv} with {products} products" for products, kv in DEFAULT_KV_CACHES.items())
    planned = "" if default is not None else f" (default: {by_products}, or what a deploy folder was planned with)"
    p.add_argument("--kv-cache", choices=KV_CACHES, default=default,
                   help="what the KV cache holds: float16 (llama.cpp's default: half the cache's memory and of "
                        "what a decode step reads of it, perplexity within 0.1 %%) or float32 (attention as the "
                        "references compute it; README, KV cache)" + planned)


def _cmd_warmup(ns) -> int:
    from edgelora.runtime.warmup import warmup
    report = warmup(ns.bundle, threads=ns.threads, mmap=not ns.no_mmap, products=ns.products, kv_cache=ns.kv_cache)
    print(json.dumps(report.to_dict(), indent=1) if ns.json else report.text())
    return 0


def _cmd_serve(ns) -> int:
    from edgelora.server import serve
    adapters = {}
    for spec in ns.adapter:
        name, path = _split_adapter(spec)
        if name in adapters:
            raise UsageError(f"--adapter {name!r} given twice; name them apart with NAME=PATH")
        adapters[name] = path
    serve(ns.bundle, adapters=adapters, host=ns.host, port=ns.port, threads=ns.threads, max_context=ns.max_context,
          max_batch=ns.max_batch, max_queue=ns.max_queue, api_key=ns.api_key, model_name=ns.model_name,
          max_body_bytes=ns.max_body_bytes,
          prompt_cache_bytes=None if ns.prompt_cache_mb is None else int(ns.prompt_cache_mb * 1e6),
          allow_adapter_loading=not ns.no_adapter_loading, log_level=ns.log_level,
          device_check=not ns.any_device, mmap=not ns.no_mmap, products=ns.products, kv_cache=ns.kv_cache,
          adapter_dtype=ns.adapter_dtype)
    return 0


def _cmd_demo(ns) -> int:
    from edgelora.demo import run_demo
    return run_demo(ns.workdir, quiet=ns.quiet)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help (none for flags and options without one); examples
    in the epilog kept on their own lines."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _ArgumentError(Exception):
    """A command line argparse refuses (reported by :func:`main`, as JSON with ``--json``)."""

    def __init__(self, parser, message):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(self, message)


def _add_generation_options(p) -> None:
    p.add_argument("bundle", help="bundle folder written by `edgelora convert`, or a deploy folder")
    p.add_argument("--any-device", action="store_true",
                   help="run a deploy folder even on a machine unlike the device it was planned for")
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens whose probabilities sum to p (nucleus); 1 = all")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min_p times the most likely one; 0 = none")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (as transformers); 1 = none")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one per run)")
    p.add_argument("--threads", type=int, default=None, help="most CPU threads (default: every core)")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length (default: min(model limit, 2048); a deploy folder's planned context)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory instead of mapping the file (slower start; faster decode "
                        "where huge pages apply)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="load a PEFT LoRA adapter folder, named NAME or after its folder (repeatable)")
    p.add_argument("--use", default=None, metavar="NAME|a=0.5,b=0.5|base",
                   help="adapter to use, or a weighted mix (default: the only adapter, else required)")
    _add_products_option(p)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgelora", description="Fine-tuned language models on small devices.",
                formatter_class=_HelpFormatter, epilog="start with: edgelora demo\n"
                                                      "each command's options: edgelora COMMAND --help")
    p.add_argument("--version", action="version", version=f"edgelora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, example, **kw):
        return sub.add_parser(name, help=help, description=kw.pop("description", help[:1].upper() + help[1:] + "."),
                              epilog=f"example:\n  {example}", formatter_class=_HelpFormatter, **kw)

    c = command("convert", "quantize a Hugging Face checkpoint (float or bitsandbytes 4-bit), a GGUF file or an "
                           "ONNX model to an NF4 bundle", "edgelora convert TinyLlama/TinyLlama-1.1B-Chat-v1.0 -o tinyllama-nf4")
    c.add_argument("src", help="checkpoint folder (config.json, *.safetensors, tokenizer.json; float or saved from a "
                               "bitsandbytes 4-bit model), hub id org/name, a GGUF file (model.gguf), or an ONNX "
                               "decoder model.onnx (tokenizer.json and config.json beside it)")
    c.add_argument("-o", "--output", required=True, help="bundle folder to create")
    c.add_argument("--block-size", type=int, default=None, choices=(32, 64, 128, 256),
                   help="NF4 block size (default: 64; a bitsandbytes 4-bit checkpoint keeps its own)")
    c.add_argument("--no-double-quant", action="store_true", help="keep block scales in float32")
    c.add_argument("--embeddings", choices=("float16", "nf4"), default="float16",
                   help="storage of the token embeddings")
    c.add_argument("--head", choices=("float16", "nf4"), default="float16",
                   help="storage of an untied output head")
    c.add_argument("--merge-adapter", default=None, metavar="ADAPTER_DIR",
                   help="fold one PEFT LoRA adapter into the weights before quantizing (base speed, not switchable)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print the summary (and errors) as JSON")
    c.add_argument("-v", "--verbose", action="store_true", help="per-tensor errors")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar (none either when not on a terminal)")
    c.set_defaults(func=_cmd_convert)

    i = command("inspect", "describe a bundle, a deploy folder, a checkpoint or a LoRA adapter folder",
                "edgelora inspect tinyllama-nf4")
    i.add_argument("path", help="the folder (or GGUF/ONNX file) to describe; bundles are checked against their "
                                "checksums (exit 3 when one fails)")
    i.add_argument("--json", action="store_true", help="print the description (and errors) as JSON")
    i.set_defaults(func=_cmd_inspect)

    r = command("run", "generate text from a prompt, streamed", 'edgelora run tinyllama-nf4 -p "Once upon a time" -n 64')
    _add_generation_options(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the prompt text; - reads it from standard input")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--json", action="store_true", help="print prompt/generated ids, text and timings (and errors) as JSON")
    r.add_argument("--draft", default=None, metavar="prompt-lookup|BUNDLE",
                   help="speculative decoding: guess tokens from earlier text, or with a smaller bundle of the same "
                        "tokenizer; the output is exactly that of plain decoding (default: none)")
    r.add_argument("--num-draft", type=int, default=None, metavar="K",
                   help="the most guesses a step verifies (default: 4); prompt lookup verifies as many of them as "
                        "pay, by the share kept and the measured step times")
    r.set_defaults(func=_cmd_run)

    e = command("eval", "perplexity of a text, answer-only loss on JSONL data, the weights' quantization error "
                        "per layer and (int8 products) each projection's product error", "edgelora eval tinyllama-nf4 --text wiki.txt --data qa.jsonl --json")
    e.add_argument("bundle", help="bundle folder written by `edgelora convert`, or a deploy folder")
    e.add_argument("--text", default=None, metavar="FILE", help="text file: perplexity over non-overlapping windows")
    e.add_argument("--data", default=None, metavar="JSONL",
                   help='lines {"prompt", "completion"} or {"messages"}: loss on the answer tokens only')
    e.add_argument("--window", type=int, default=None, help="tokens per perplexity window (default: the max context)")
    e.add_argument("--max-context", type=int, default=None, help="KV cache length (default: min(model limit, 2048))")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    e.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="LoRA adapter to load (repeatable)")
    e.add_argument("--use", default=None, metavar="NAME|a=0.5,b=0.5|base", help="adapter selection to evaluate")
    _add_products_option(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_eval, any_device=False, no_mmap=False)

    ch = command("chat", "interactive chat with the model's chat template (commands: /help)",
                 'edgelora chat tinyllama-nf4 --system "You are terse."')
    _add_generation_options(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--chat-template", default=None, metavar="FILE",
                    help="a Jinja chat template file (as transformers' chat_template.jinja) to use instead of the "
                         "model's, or for a model without one")
    ch.add_argument("--json", action="store_true", help="print each turn (prompt, text, timings) as one JSON line")
    ch.set_defaults(func=_cmd_chat)

    b = command("bench", "prefill/decode speed, time to first token, peak RSS, bandwidth bound",
                "edgelora bench tinyllama-nf4 --threads 1 4")
    b.add_argument("bundle", help="bundle or deploy folder to measure")
    b.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, one fresh process each (default: 1 and every core)")
    b.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length of the prefill measurement (default: 512, less to fit the model's context)")
    b.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens generated in the decode measurement (default: 128, less to fit the model's context)")
    b.add_argument("--runs", type=int, default=3, help="measurements after one warm-up; the median is reported")
    b.add_argument("--no-mmap", action="store_true", help="read the weights into memory (as `run --no-mmap`)")
    _add_products_option(b, adapters=False)
    b.add_argument("--json", action="store_true", help="print the results (and errors) as JSON")
    b.set_defaults(func=_cmd_bench)

    t = command("train", "fine-tune a LoRA adapter on the frozen NF4 base, the loss on the answers only",
                "edgelora train tinyllama-nf4 --data chats.jsonl -o adapters/mine --rank 16 --epochs 2")
    t.add_argument("bundle", help="bundle folder written by `edgelora convert`")
    t.add_argument("--data", required=True, metavar="JSONL",
                   help='training data: lines {"prompt", "completion"}, {"messages": [...]} (every assistant turn '
                        'trained) or {"text"}')
    t.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR",
                   help="the PEFT adapter folder to write (with checkpoint-STEP/ folders and the loss curve)")
    t.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    t.add_argument("--alpha", type=float, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    t.add_argument("--targets", default="all-linear", metavar="all-linear|q,k,v,...",
                   help="modules to adapt: all-linear, or names such as q,k,v,o,gate,up,down (q_proj too), lm_head")
    t.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    t.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapters' inputs")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    how_long = t.add_mutually_exclusive_group()
    how_long.add_argument("--epochs", type=int, default=None, help="passes over the data (default: 1)")
    how_long.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-tokens", type=int, default=1024, help="most tokens in a micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-length", type=int, default=None,
                   help="longest example in tokens (default: min(1024, the model's context))")
    t.add_argument("--overflow", choices=("truncate", "skip"), default="truncate",
                   help="what to do with an example longer than --max-length (either way it is counted)")
    t.add_argument("--warmup-ratio", type=float, default=0.05, help="share of the steps warming the learning rate up")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients to this global norm")
    t.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation, data order and dropout")
    t.add_argument("--eval", default=None, metavar="JSONL", help="held-out data whose answer loss is measured")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: a tenth of the run)")
    t.add_argument("--save-every", type=int, default=None,
                   help="write a checkpoint every N steps (atomically; the last one kept) for --resume")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    t.add_argument("--overwrite", action="store_true", help="replace an output folder edgelora train wrote")
    t.add_argument("--threads", type=int, default=None, help="most CPU threads (default: every core)")
    t.add_argument("--recompute", choices=("layer", "projections", "none"), default="layer",
                   help="what the backward recomputes instead of keeping: each layer (least memory), all but the "
                        "base products (faster), nothing (most memory); the same result each way")
    t.add_argument("--dry-run", action="store_true",
                   help="read and check the data, show one example with its mask and the memory needed; train nothing")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar (none either when not on a terminal)")
    t.add_argument("--json", action="store_true", help="print the history (or the dry run, and errors) as JSON")
    t.set_defaults(func=_cmd_train)

    dv = command("devices", "list the device profiles (this machine as `host`, the shipped ones and your own)",
                 "edgelora devices --show raspberry-pi-4-4gb")
    dv.add_argument("--json", action="store_true", help="print the profiles (and errors) as JSON")
    dv.add_argument("--show", default=None, metavar="NAME", help="print only this profile, as its TOML file")
    dv.set_defaults(func=_cmd_devices)

    from edgelora.products import DEFAULT_KV_CACHE
    for cmd, text, example in (
            ("plan", "will a bundle, its context and its adapters fit a device? (exit 6 when not)",
             "edgelora plan tinyllama-nf4 --device raspberry-pi-4-4gb --context 2048 --adapter adapters/pirate"),
            ("deploy", "plan, then write a verified deploy folder for a device (refused when it does not fit)",
             "edgelora deploy tinyllama-nf4 --device raspberry-pi-4-4gb --adapter adapters/pirate -o pi4 --archive")):
        x = command(cmd, text, example)
        x.add_argument("bundle", help="bundle folder written by `edgelora convert`")
        x.add_argument("--device", required=True, help="device profile name (see `edgelora devices`) or a .toml file")
        x.add_argument("--context", type=int, default=None, help="KV cache positions (default: min(model limit, 2048))")
        x.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                       help="a PEFT LoRA adapter to keep resident, named NAME or after its folder (repeatable)")
        x.add_argument("--threads", type=int, default=None, help="threads to plan for (default: the device's cores)")
        x.add_argument("--json", action="store_true", help="print the result (and errors) as JSON")
        _add_kv_cache_option(x, DEFAULT_KV_CACHE)  # (a deploy folder's loads get what it was planned with)
        if cmd == "plan":
            x.add_argument("--measure", action="store_true",
                           help="also run the plan on this machine (context filled to its end) and report its peak RSS")
            x.add_argument("--train", action="store_true",
                           help="plan `edgelora train` instead: base, adapter, gradients, optimizer state and "
                                "activations for sequences of --tokens tokens")
            x.add_argument("--rank", type=int, default=16, help="with --train: the LoRA rank")
            x.add_argument("--targets", default="all-linear", help="with --train: the modules adapted")
            x.add_argument("--tokens", type=int, default=256, help="with --train: tokens of the longest sequence")
            x.add_argument("--recompute", choices=("layer", "projections", "none"), default="layer",
                           help="with --train: what the backward recomputes (as `edgelora train --recompute`)")
            x.set_defaults(func=_cmd_plan)
        else:
            x.add_argument("-o", "--output", required=True, help="deploy folder to create")
            x.add_argument("--archive", action="store_true", help="also write OUTPUT.tar")
            x.add_argument("--overwrite", action="store_true", help="replace an existing output")
            x.set_defaults(func=_cmd_deploy)

    u = command("unpack", "extract and verify a deploy archive (edgelora deploy --archive)",
                "edgelora unpack pi4.tar -o pi4")
    u.add_argument("archive", help="the .tar written by `edgelora deploy --archive`")
    u.add_argument("-o", "--output", required=True, help="folder to create")
    u.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    u.add_argument("--json", action="store_true", help="print the result (and errors) as JSON")
    u.set_defaults(func=_cmd_unpack)

    w = command("warmup", "compile the kernels a bundle needs on this machine, ahead of its first use",
                "edgelora warmup tinyllama-nf4",
                description="Compile (once per machine, edgelora version and CPU) every kernel a bundle or "
                            "deploy folder runs, so that later loads start without compiling: e.g. when a "
                            "device is set up.")
    w.add_argument("bundle", nargs="?", default=None,
                   help="bundle or deploy folder (default: the built-in demo model, whose kernels are those of any "
                        "bundle written with convert's default options)")
    w.add_argument("--threads", type=int, default=None, help="the thread count it will run with (default: every core)")
    w.add_argument("--no-mmap", action="store_true", help="for running with the weights read into memory")
    _add_products_option(w, adapters=False)
    w.add_argument("--json", action="store_true", help="print the result (and errors) as JSON")
    w.set_defaults(func=_cmd_warmup)

    sv = command("serve", "serve a model over the OpenAI API (per-request adapters batched together, a chat page at /)",
                 "edgelora serve tinyllama-nf4 --adapter pirate=adapters/pirate --port 8080")
    sv.add_argument("bundle", help="bundle folder written by `edgelora convert`, or a deploy folder")
    sv.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                    help="a PEFT LoRA adapter to make resident, named NAME or after its folder (repeatable); "
                         "requests choose it with model=NAME")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on (0: a free one)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="bearer token every /v1 route needs (default: $EDGELORA_API_KEY; none when unset)")
    sv.add_argument("--threads", type=int, default=None, help="most CPU threads (default: every core)")
    sv.add_argument("--max-context", type=int, default=None,
                    help="KV cache length per sequence (default: min(model limit, 2048); a deploy folder's planned "
                         "context)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot; more are refused with 429 and Retry-After")
    sv.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                    help="largest request body (413 beyond)")
    sv.add_argument("--prompt-cache-mb", type=float, default=None, metavar="MB",
                    help="memory for cached prompt prefixes (default: the engine's; 0: none)")
    sv.add_argument("--model-name", default=None,
                    help="the base model's id in the API (default: the bundle's folder name)")
    sv.add_argument("--no-adapter-loading", action="store_true",
                    help="refuse POST/DELETE /v1/adapters (adapters only from --adapter)")
    sv.add_argument("--any-device", action="store_true",
                    help="serve a deploy folder even on a machine unlike the device it was planned for")
    sv.add_argument("--no-mmap", action="store_true", help="read the weights into memory (as `run --no-mmap`)")
    _add_products_option(sv)
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="server log detail (info: one line per request)")
    sv.set_defaults(func=_cmd_serve)

    d = command("demo", "build and convert the built-in demo model (offline), then run, plan and swap adapters",
                "edgelora demo")
    d.add_argument("--workdir", default=None, help="where to put the demo files (default: a user cache folder)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)

    from edgelora.fleet.cli import register as register_fleet  # edgelora fleet build / status
    register_fleet(command)
    return p


def json_error(e: EdgeLoraError) -> dict:
    """An error as ``--json`` prints it: its class, the file it names (or null), the message and
    the exit code."""
    message = str(e)
    if e.path and message.startswith(f"{e.path}: "):
        message = message[len(e.path) + 2:]  # the file has its own field
    return {"error": {"type": type(e).__name__, "file": e.path, "message": message, "exit_code": e.exit_code}}


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        ns = build_parser().parse_args(argv)
    except _ArgumentError as e:  # (with --json, also as JSON on standard output)
        if as_json:
            print(json.dumps(json_error(UsageError(str(e)))))
        e.parser.print_usage(sys.stderr)
        print(f"{e.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        from edgelora.limits import check_address_space
        check_address_space()  # (before Numba or NumPy loads: under `ulimit -v 256M` they fail in C)
        return ns.func(ns)
    except EdgeLoraError as e:
        if getattr(ns, "json", False):
            print(json.dumps(json_error(e)))
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
