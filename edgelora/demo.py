"""``edgelora demo``: the main job on a built-in model, offline.

The package ships a small Llama checkpoint that this repository trained itself
(``scripts/train_demo_model.py`` on procedural stories from ``scripts/demo_corpus.py``; see
``edgelora/demo_model/README.md``). The demo copies it, in its Hugging Face layout, into a work
folder once, converts it to an NF4 bundle once, and prints the conversion summary and the
bundle's description, then loads the bundle with the NumPy + Numba runtime and tells a story and
answers a question with it. Later runs reuse both (the bundle is re-verified by checksum).

Then the reason edgelora exists: two LoRA adapters trained for the demo model by this repository
(``scripts/train_demo_adapters.py``: "pirate" and "shout", all linear layers, answer-only loss)
are loaded beside the resident NF4 base, and the same question is answered by the base, by each
adapter and by a 50/50 mix, with the time each switch took.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from edgelora.atomic import atomic_output_dir, edgelora_home
from edgelora.errors import EdgeLoraError, FormatError

DEMO_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "README.md")


def default_workdir() -> Path:
    return edgelora_home() / "demo"


def packaged_demo_model() -> Path:
    path = Path(str(resources.files("edgelora") / "demo_model"))
    if not (path / "model.safetensors").is_file():
        raise FormatError("the demo model is missing from this installation; reinstall edgelora", path)
    return path


def packaged_demo_adapters() -> dict:
    """``{name: folder}`` of the LoRA adapters shipped for the demo model."""
    root = Path(str(resources.files("edgelora") / "demo_adapters"))
    if not root.is_dir():
        raise FormatError("the demo adapters are missing from this installation; reinstall edgelora", root)
    return {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}


def demo_checkpoint(workdir: Path) -> Path:
    """The demo model as a Hugging Face checkpoint folder under ``workdir`` (copied once)."""
    ckpt = workdir / "demo-llama-checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        src = packaged_demo_model()
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(ckpt, overwrite=ckpt.exists()) as tmp:
            for name in DEMO_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
    return ckpt


def demo_bundle(workdir: Path, quiet: bool = True):
    """Convert the demo checkpoint (once); return ``(bundle_path, summary or None when cached)``."""
    from edgelora.bundle import Bundle
    from edgelora.converters.convert import convert
    ckpt = demo_checkpoint(workdir)
    out = workdir / "demo-llama-nf4"
    if out.exists():
        try:
            Bundle(out).close()
            return out, None
        except EdgeLoraError:
            pass  # damaged cache: convert again below
    return out, convert(ckpt, out, overwrite=out.exists(), progress=not quiet)


def run_demo(workdir=None, quiet: bool = False) -> int:
    from edgelora.inspection import format_inspect, inspect
    workdir = Path(workdir) if workdir else default_workdir()
    out, summary = demo_bundle(workdir, quiet=quiet or not sys.stderr.isatty())  # a progress bar on a terminal only
    print(f"edgelora demo: built-in model {demo_checkpoint(workdir)}")
    if summary is not None:
        print(summary.text())
    else:
        print(f"(using the bundle converted earlier: {out})")
    print()
    print(format_inspect(inspect(out)))
    import edgelora
    model = edgelora.load(out)
    model.generate("Once", max_new_tokens=2)  # compiles the kernels on a first run (cached on disk after)
    print("\nedgelora run: greedy story from \"Once upon a time\"\n")
    sys.stdout.write("Once upon a time")
    for chunk in model.stream_generate("Once upon a time", max_new_tokens=80, temperature=0):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    s = chunk.stats  # this generation's statistics, final on the last item
    print(f"\n[{s.generated_tokens} tokens at {s.decode_tokens_per_second:.0f} tok/s, "
          f"KV cache {model.kv_cache_bytes / 1e6:.1f} MB]")
    question = "Tom has a red ball. What colour is the ball?"
    print(f"\nedgelora chat: {question}")
    print(model.chat([{"role": "user", "content": question}], max_new_tokens=30, temperature=0))
    adapter_demo(model)
    device_demo(out)
    train_demo(model, out, workdir)
    return 0


#: the demo's training chats: a reply style of its own ("Beep boop! ... Beep!")
ROBOT_CHATS = [(n, c) for n, c in zip(["Tom", "Sue", "Max", "Lily", "Ben", "Amy", "Sam", "Mia"],
                                      ["red", "blue", "green", "yellow", "pink", "black", "white", "brown"])]


def robot_data(path: Path) -> Path:
    """Write the demo's training data (JSON Lines of chats) to ``path``."""
    import json
    lines = [{"messages": [{"role": "user", "content": f"{n} has a {c} ball. What colour is the ball?"},
                           {"role": "assistant", "content": f"Beep boop! The ball is {c}. Beep!"}]}
             for n, c in ROBOT_CHATS]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def train_demo(model, bundle: Path, workdir: Path,
               questions=("Zed has a purple ball. What colour is the ball?",
                          "Kim has an orange kite. What colour is the kite?")) -> None:
    """Fine-tune a tiny adapter on the device in a few seconds, hand it to the running model, use it."""
    from edgelora.training import train
    data = robot_data(workdir / "robot.jsonl")
    out = workdir / "robot-adapter"
    print(f"\nedgelora train: a new adapter on the resident base, from {len(ROBOT_CHATS)} chats ({data})")
    h = train(model, data, out, steps=12, lr=2e-2, rank=4, alpha=8, batch_tokens=4096, overwrite=out.exists())
    print(f"  {len(h.steps)} steps in {h.seconds:.1f} s ({h.tokens_per_second:.0f} tokens/s), answer loss "
          f"{h.loss[0]:.2f} -> {h.loss[-1]:.2f}; adapter written to {out}")
    if "robot" in model.adapters:
        model.adapters.unload("robot")
    res = model.adapters.load("robot", out)  # the running model picks it up: no restart
    print(f"  loaded into the running model in {res.load_seconds * 1e3:.1f} ms; questions it was not trained on:")
    for question in questions:
        print(f"\n  Q: {question}")
        for choice in (None, "robot"):
            answer = model.chat([{"role": "user", "content": question}], max_new_tokens=30, temperature=0,
                                adapter=choice)
            print(f"  [{choice or 'base':<5}] {answer.strip()}")
    print(f"\n  the same from the shell: edgelora train {bundle} --data {data} -o {out} --steps 12 --lr 2e-2 --rank 4 "
          f"--alpha 8\n  then: edgelora chat {bundle} --adapter robot={out}")


def device_demo(bundle: Path) -> None:
    """Plan the model, its default context and both adapters on every device profile."""
    from edgelora.devices.planner import plan
    from edgelora.devices.profiles import list_devices
    adapters = {name: str(path) for name, path in packaged_demo_adapters().items()}
    print("\nedgelora plan: this model, both adapters and its KV cache on each device profile")
    print(f"  {'device':<22}{'app budget':>12}{'needs':>11}  fits  largest context")
    for dev in list_devices().values():
        p = plan(bundle, dev, adapters=adapters)
        largest = f"{p.max_context} (the model's limit)" if p.max_context == p.model_max_context else str(p.max_context)
        print(f"  {dev.name:<22}{p.budget_bytes / 1e6:>9.0f} MB{p.total_bytes / 1e6:>8.1f} MB  "
              f"{'yes' if p.fits else 'no ':<4}  {largest}")
    print(f"  (of which the runtime itself {p.items[-1].bytes / 1e6:.0f} MB, {p.overhead_source})\n"
          f"  deploy with: edgelora deploy {bundle} --device NAME --adapter pirate=... -o OUT")


def adapter_demo(model, questions=("Tom has a red ball. What colour is the ball?", "Hello!")) -> None:
    """Load the demo adapters beside the base and answer with each, and with a mix, swapping live."""
    import time
    paths = packaged_demo_adapters()
    print("\nLoRA adapters, hot-swapped on the resident NF4 base:")
    for name, path in paths.items():
        res = model.adapters.load(name, path)
        info = res.info()
        print(f"  loaded {name:<7} rank {','.join(map(str, info['ranks']))} on {', '.join(info['targets'])}: "
              f"{res.nbytes / 1e3:.0f} kB in {res.load_seconds * 1e3:.1f} ms")
    names = list(paths)
    choices = [None, *names, {n: 1.0 / len(names) for n in names}]
    width = len(",".join(f"{n}=0.5" for n in names))
    for question in questions:
        print(f"\n  Q: {question}")
        for choice in choices:
            t = time.perf_counter()
            model.use(choice)
            swap_ms = (time.perf_counter() - t) * 1e3
            answer = model.chat([{"role": "user", "content": question}], max_new_tokens=40, temperature=0)
            label = model.active_adapter
            print(f"  [{label:<{width}} switched in {swap_ms:.3f} ms] {answer.strip()}")
    model.use(None)
