"""``edgelora train`` / :func:`train`: LoRA fine-tuning on the device, on the frozen NF4 base.

The gradients come from :mod:`edgelora.runtime.backward` (forward through the NF4 base, backward
for the LoRA A and B only); this module is everything around them:

* **Data** (:mod:`edgelora.training_data`): JSONL lines to ids and answer-only labels; each epoch
  visits the examples in an order drawn from ``(seed, epoch)``, grouped into micro-batches of at
  most ``batch_tokens`` tokens; ``grad_accum`` micro-batches make one optimizer step. A step's
  loss is the sum of its token losses over its counted tokens (each counted token weighs the
  same, however the examples are grouped).
* **Optimizer**: AdamW exactly as ``torch.optim.AdamW`` (bias correction, decoupled weight decay,
  float32 state), the gradients first clipped to a global norm as
  ``torch.nn.utils.clip_grad_norm_``, the learning rate on transformers'
  ``get_cosine_schedule_with_warmup`` (linear warm-up from 0, then a half cosine to 0).
* **Output**: a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` in
  PEFT's tensor names) that PEFT and ``edgelora --adapter`` load as it is, with the loss curve
  beside it (``loss_curve.json``, ``loss_curve.svg``). Every ``save_every`` steps a checkpoint
  ``checkpoint-STEP/`` (the adapter, the optimizer state, the dropout generator's state, the data
  position and the history) is written atomically, then the one before removed, so a kill at any
  moment leaves the last complete checkpoint; ``resume=True`` continues from it bit for bit, with
  the options it was started with (a different one is refused).
* **Feedback**: a progress bar on a terminal only (loss, tokens/s, ETA), the loss on ``eval_data``
  every ``eval_every`` steps (by the inference runtime, with the adapter being trained in force).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from edgelora.architectures import HEAD, architecture
from edgelora.atomic import _tmp_sibling, atomic_output_dir, clean_stale, os_error, write_text_atomic
from edgelora.errors import FormatError, PlanError, UsageError
from edgelora.training_data import (Dataset, count_micro_batches, default_max_length, micro_batches, read_dataset,
                                    render_example)

if TYPE_CHECKING:
    from edgelora.runtime.model import Model

CHECKPOINT_FORMAT = "edgelora-train-checkpoint"
CHECKPOINT_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CURVE_FILES = ("loss_curve.json", "loss_curve.svg")


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def resolve_targets(args, targets) -> list:
    """The projections (the runtime's Layer fields: ``q``, ``up``, Phi-3's ``qkv``) that
    ``targets`` names: ``"all-linear"`` (every projection of every layer), or a list or a
    comma-separated text of short names (``q,k,v``) or module names (``q_proj``,
    ``self_attn.q_proj``), and ``lm_head`` (the output head, as PEFT can target it). A name this
    architecture does not have is refused."""
    arch = architecture(args)
    fields = list(arch.PROJECTIONS)
    if targets is None or targets == "all-linear":
        return fields
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    by_name = {HEAD: HEAD}
    for f, module in arch.PROJECTIONS.items():
        by_name[f] = by_name[module] = by_name[module.rsplit(".", 1)[-1]] = f
    out = []
    for n in names:
        if not isinstance(n, str) or n not in by_name:
            known = ", ".join(f"{f} ({m.rsplit('.', 1)[-1]})" for f, m in arch.PROJECTIONS.items())
            raise UsageError(f"target {n!r} is not a linear module of this {args.model_type} model; its modules: "
                             f"{known}, lm_head, or all-linear")
        if by_name[n] not in out:
            out.append(by_name[n])
    if not out:
        raise UsageError("no target modules given; use all-linear or names like q,k,v")
    return [f for f in fields + [HEAD] if f in out]


def target_modules(args, fields: list) -> list:
    """PEFT's ``target_modules`` for the fields: the modules' last names (``q_proj``), sorted."""
    return sorted(module_name(args, f) for f in fields)


def module_name(args, field: str) -> str:
    """A field's module name as PEFT's ``target_modules`` lists it (``q`` -> ``q_proj``)."""
    return HEAD if field == HEAD else architecture(args).PROJECTIONS[field].rsplit(".", 1)[-1]


def module_order(args, fields: list) -> list:
    """Every targeted module's full name (``model.layers.3.self_attn.q_proj``), layer by layer in
    the architecture's order of projections (the order PyTorch lists the parameters in)."""
    arch = architecture(args)
    return [arch.module(i, f) for i in range(args.num_hidden_layers) for f in arch.PROJECTIONS if f in fields] + \
        ([HEAD] if HEAD in fields else [])


# ---------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------

def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier of (0-based) optimizer step ``step``: transformers'
    ``get_cosine_schedule_with_warmup(num_cycles=0.5)``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale ``grads`` (float32 arrays, in place) so that their global L2 norm is at most
    ``max_norm``; the norm before clipping (``torch.nn.utils.clip_grad_norm_``)."""
    norms = np.array([np.linalg.norm(g.ravel()) for g in grads.values()], np.float32)
    total = np.float32(np.linalg.norm(norms))
    coef = np.float32(max_norm) / (total + np.float32(1e-6))
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return float(total)


class AdamW:
    """``torch.optim.AdamW`` on float32 NumPy arrays, updated in place: decoupled weight decay
    ``p *= 1 - lr * wd``, then ``m = lerp(m, g, 1 - b1)``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""

    def __init__(self, params: dict, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = params  # name -> float32 array, updated in place
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, grads: dict, lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        step_size, c2_sqrt = lr / c1, c2 ** 0.5
        for k, p in self.params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            p *= np.float32(1.0 - lr * self.weight_decay)
            m += np.float32(1.0 - b1) * (g - m)
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * (g * g)
            denom = np.sqrt(v) / np.float32(c2_sqrt) + np.float32(self.eps)
            p += np.float32(-step_size) * (m / denom)

    def state_arrays(self) -> dict:
        return {**{f"{k}.exp_avg": m for k, m in self.m.items()}, **{f"{k}.exp_avg_sq": v for k, v in self.v.items()}}

    def load_state_arrays(self, arrays: dict, t: int) -> None:
        for k in self.params:
            self.m[k][...] = arrays[f"{k}.exp_avg"]
            self.v[k][...] = arrays[f"{k}.exp_avg_sq"]
        self.t = int(t)


def flat_params(lora) -> dict:
    """``{module.lora_A: A, module.lora_B: B}``: the adapter's arrays by PEFT's parameter names."""
    out = {}
    for m in lora.A:
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = lora.A[m], lora.B[m]
    return out


# ---------------------------------------------------------------------------------------------
# the adapter folder
# ---------------------------------------------------------------------------------------------

def adapter_config(cfg: dict) -> dict:
    """``adapter_config.json`` for a trained adapter, with PEFT's field names."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg["base_model"],
            "r": cfg["rank"], "lora_alpha": cfg["alpha"], "use_rslora": cfg["rslora"],
            "target_modules": cfg["target_modules"], "lora_dropout": cfg["dropout"], "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False, "lora_bias": False, "revision": None, "exclude_modules": None}


def write_adapter_files(folder: Path, lora, cfg: dict) -> None:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``folder``, each file
    atomically."""
    write_safetensors_atomic(folder / "adapter_model.safetensors", lora.peft_tensors(), {"format": "pt"})
    write_text_atomic(folder / "adapter_config.json", json.dumps(adapter_config(cfg), indent=2) + "\n")


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict) -> None:
    """A safetensors file written to a temporary sibling, then renamed into place."""
    from edgelora.safetensors_io import write_safetensors
    tmp = _tmp_sibling(path, "tmp")
    try:
        write_safetensors(tmp, tensors, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, path) from None


# ---------------------------------------------------------------------------------------------
# history and the loss curve
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainStep:
    step: int  # 1-based optimizer step
    loss: float  # mean loss per counted token of the step
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # tokens run forward and backward
    trained_tokens: int  # tokens the loss counted
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainHistory:
    """What :func:`train` did: per step the loss, learning rate, gradient norm and speed; the eval
    losses ``[(step, loss)]``; where the adapter is."""

    adapter_dir: str
    bundle: str
    steps: list = field(default_factory=list)  # TrainStep
    evals: list = field(default_factory=list)  # [step, loss]
    total_steps: int = 0
    data: dict = field(default_factory=dict)  # the dataset's summary
    resumed_from: int = 0  # the checkpoint step continued from (0: a fresh start)
    seconds: float = 0.0

    @property
    def loss(self) -> list:
        return [s.loss for s in self.steps]

    @property
    def lr(self) -> list:
        return [s.lr for s in self.steps]

    @property
    def tokens_per_second(self) -> float:
        secs = sum(s.seconds for s in self.steps)
        return sum(s.tokens for s in self.steps) / secs if secs > 0 else 0.0

    @property
    def eval_loss(self) -> list:
        return [loss for _, loss in self.evals]

    def to_dict(self) -> dict:
        return {"adapter_dir": self.adapter_dir, "bundle": self.bundle, "total_steps": self.total_steps,
                "resumed_from": self.resumed_from, "seconds": self.seconds, "data": self.data,
                "tokens_per_second": self.tokens_per_second,
                "steps": [dict(asdict(s), tokens_per_second=s.tokens_per_second) for s in self.steps],
                "evals": [{"step": s, "loss": v} for s, v in self.evals]}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainHistory":
        steps = [TrainStep(**{k: s[k] for k in TrainStep.__dataclass_fields__}) for s in d["steps"]]
        return cls(d["adapter_dir"], d["bundle"], steps, [[e["step"], e["loss"]] for e in d["evals"]],
                   d["total_steps"], d.get("data", {}), d.get("resumed_from", 0), d.get("seconds", 0.0))


def loss_svg(history: TrainHistory, width: int = 640, height: int = 360) -> str:
    """The training loss per step (and the eval losses as dots) as a small standalone SVG."""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 28, 40
    pts = [(s.step, s.loss) for s in history.steps]
    evs = [(s, v) for s, v in history.evals]
    values = [v for _, v in pts + evs] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(1, history.total_steps, *(s for s, _ in pts + evs)) if pts or evs else 1

    def x(s):
        return pad_l + (width - pad_l - pad_r) * (s / n)

    def y(v):
        return pad_t + (height - pad_t - pad_b) * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="18" text-anchor="middle">training loss (edgelora train)</text>',
           f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="black"/>',
           f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="black"/>']
    for v in (lo, (lo + hi) / 2, hi):
        out.append(f'<text x="{pad_l - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for s in (0, n // 2, n):
        out.append(f'<text x="{x(s):.1f}" y="{height - pad_b + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(pad_l + width - pad_r) / 2:.0f}" y="{height - 6}" text-anchor="middle">step</text>')
    if pts:
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>')
    for s, v in evs:
        out.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#d62728"><title>eval {v:.4f} at step '
                   f'{s}</title></circle>')
    out.append(f'<text x="{width - pad_r}" y="{pad_t - 8}" text-anchor="end" fill="#1f77b4">train</text>')
    if evs:
        out.append(f'<text x="{width - pad_r - 40}" y="{pad_t - 8}" text-anchor="end" fill="#d62728">eval</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoint_dirs(out: Path) -> list:
    """``[(step, folder)]`` of the complete checkpoints in ``out``, oldest first (a checkpoint is
    renamed into place only once complete; temporary folders have other names)."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            name = p.name
            if name.startswith("checkpoint-") and name[11:].isdigit() and (p / "trainer_state.json").is_file():
                found.append((int(name[11:]), p))
    return sorted(found)


def save_checkpoint(out: Path, step: int, lora, opt: AdamW, state: dict, cfg: dict) -> Path:
    """Write ``out/checkpoint-STEP`` atomically (adapter, optimizer state, trainer state), then
    remove the older ones."""
    from edgelora.safetensors_io import write_safetensors
    folder = out / f"checkpoint-{step}"
    with atomic_output_dir(folder, overwrite=folder.exists()) as tmp:
        write_adapter_files(tmp, lora, cfg)
        write_safetensors(tmp / "optimizer.safetensors", opt.state_arrays(), metadata={"format": "np"})
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": step,
             "optimizer_step": opt.t, **state}, indent=1))
    for s, old in checkpoint_dirs(out):
        if s != step:
            aside = _tmp_sibling(old, "tmp")  # removed by clean_stale if a kill interrupts the removal
            os.rename(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path) -> tuple:
    """``(trainer state, adapter tensors, optimizer arrays)`` of a checkpoint folder."""
    from edgelora.safetensors_io import SafetensorsFile
    where = folder / "trainer_state.json"
    try:
        state = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"unreadable checkpoint state: {e}", where) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"not an {CHECKPOINT_FORMAT} file", where)
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise FormatError(f"checkpoint format version {state.get('format_version')!r}; this edgelora reads "
                          f"{CHECKPOINT_VERSION}", where)
    with SafetensorsFile(folder / "adapter_model.safetensors", mmap=False) as f:
        tensors = {k: np.array(f.float32(k)) for k in f.keys()}
    with SafetensorsFile(folder / "optimizer.safetensors", mmap=False) as f:
        arrays = {k: np.array(f.float32(k)) for k in f.keys()}
    return state, tensors, arrays


# ---------------------------------------------------------------------------------------------
# evaluation with the adapter being trained
# ---------------------------------------------------------------------------------------------

def selection_of(model, lora, cfg: dict):
    """The runtime's selection for the adapter being trained (the arrays copied: later steps do
    not change it)."""
    from edgelora.adapters import Adapter, LoraConfig, LoraPair
    from edgelora.runtime.lora import build_selection, make_resident
    pairs = {m: LoraPair(lora.A[m].copy(), lora.B[m].copy(), float(lora.scaling[m])) for m in lora.A}
    ad = Adapter(Path(cfg["output"]), LoraConfig.from_dict(adapter_config(cfg)), pairs, {}, {})
    res = make_resident("training", ad, 1.0, model.net.module)
    return build_selection([(res, 1.0)], model.net.base_bias)


def eval_loss(model, examples: list, selection) -> float:
    """Mean loss per counted token over ``examples`` (by the inference runtime)."""
    total, count = 0.0, 0
    for ex in examples:
        lp = model.token_logprobs(ex.ids, adapter=selection)  # [T - 1]
        labels = np.asarray(ex.labels[1:])
        keep = labels != -100
        total -= float(lp[keep].sum())
        count += int(keep.sum())
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainDryRun:
    """What :func:`train` would do (``dry_run=True``): the data, the steps, one example with its
    mask, and the memory it needs."""

    data: dict
    total_steps: int
    micro_batches_per_step: int
    example: str  # one example, the masked tokens in [[ ]]
    example_where: str
    targets: list
    memory: dict
    eval_data: dict | None = None

    example_color: str = ""  # the same, the masked tokens dimmed (for a terminal)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("example_color")
        return d

    def text(self, color: bool = False) -> str:
        d = self.data
        lines = [f"data      {d['path']}: {d['lines']} lines -> {d['examples']} examples, {d['tokens']} tokens, "
                 f"{d['trained_tokens']} trained ({d['trained_tokens'] / max(1, d['tokens']):.0%})",
                 f"          {d['truncated']} truncated to {d['max_length']} tokens, {d['skipped']} skipped"]
        if self.eval_data:
            e = self.eval_data
            lines.append(f"eval      {e['path']}: {e['examples']} examples, {e['trained_tokens']} answer tokens")
        lines.append(f"steps     {self.total_steps} ({self.micro_batches_per_step} micro-batches each)")
        lines.append(f"targets   {', '.join(self.targets)}")
        lines.append(f"memory    {self.memory.get('total', 0) / 1e6:.1f} MB beside the base weights (adapter, "
                     f"gradients, optimizer state, activations for the longest example)")
        lines.append(f"example   {self.example_where} (masked tokens, not trained, "
                     f"{'dimmed' if color else 'in [[ ]]'}):")
        lines.append(self.example_color if color else self.example)
        return "\n".join(lines)


def _total_steps(ds: Dataset, seed: int, batch_tokens: int, grad_accum: int, epochs, steps) -> int:
    if steps is not None:
        return int(steps)
    lengths = [len(e.ids) for e in ds.examples]
    return -(-count_micro_batches(lengths, seed, batch_tokens, int(epochs)) // grad_accum)


def _check_options(o: dict) -> None:
    def bad(msg):
        raise UsageError(msg)
    if o["epochs"] is not None and o["steps"] is not None:
        bad("give --epochs or --steps, not both")
    for k in ("rank", "batch_tokens", "grad_accum"):
        if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 1:
            bad(f"{k} must be a positive integer, got {o[k]!r}")
    for k in ("epochs", "steps", "eval_every", "save_every"):
        if o[k] is not None and (not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 1):
            bad(f"{k} must be a positive integer, got {o[k]!r}")
    if not 0.0 <= o["dropout"] < 1.0:
        bad(f"dropout must be in [0, 1), got {o['dropout']}")
    if not (o["lr"] > 0 and math.isfinite(o["lr"])):
        bad(f"lr must be a positive number, got {o['lr']}")
    if not 0.0 <= o["warmup_ratio"] <= 1.0:
        bad(f"warmup_ratio must be in [0, 1], got {o['warmup_ratio']}")
    if not o["max_grad_norm"] > 0:
        bad(f"max_grad_norm must be positive, got {o['max_grad_norm']}")
    if o["weight_decay"] < 0:
        bad(f"weight_decay must not be negative, got {o['weight_decay']}")


#: options that must be the same to resume a run bit for bit
RESUME_KEYS = ("rank", "alpha", "targets", "rslora", "dropout", "lr", "total_steps", "batch_tokens", "grad_accum",
               "max_length", "overflow", "seed", "warmup_ratio", "weight_decay", "max_grad_norm", "data_sha256",
               "base_model", "eval_sha256", "eval_every")


def _output_ready(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless resuming or replacing one written by train)."""
    clean_stale(out)
    for _, ck in checkpoint_dirs(out):
        clean_stale(ck)
    if resume:
        if not checkpoint_dirs(out):
            raise UsageError("nothing to resume: no checkpoint-STEP folder in it (train with --save-every N to "
                             "write checkpoints)", out)
        return
    if out.exists():
        if not overwrite:
            raise UsageError("output already exists; continue it with --resume, replace it with --overwrite, or "
                             "choose another folder", out)
        ours = set(ADAPTER_FILES) | set(CURVE_FILES)
        for p in out.iterdir():
            if not (p.name in ours or (p.is_dir() and p.name.startswith("checkpoint-"))):
                raise UsageError(f"--overwrite replaces only a folder edgelora train wrote, and it holds {p.name!r}; "
                                 f"remove it yourself or choose another output", out)
    elif not out.parent.is_dir():
        raise UsageError(f"parent folder {out.parent} does not exist", out)


def _progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", desc="training", leave=False, dynamic_ncols=True)


def train(bundle: "str | os.PathLike | Model", data: str | os.PathLike, output: str | os.PathLike, *, rank: int = 16,
          alpha: float = 32, targets: str | list = "all-linear", rslora: bool = False,
          dropout: float = 0.0, lr: float = 2e-4, epochs: int | None = None, steps: int | None = None,
          batch_tokens: int = 1024, grad_accum: int = 1, max_length: int | None = None, overflow: str = "truncate",
          seed: int = 0, resume: bool = False, eval_data: str | os.PathLike | None = None, eval_every: int | None = None,
          save_every: int | None = None, threads: int | None = None, warmup_ratio: float = 0.05,
          weight_decay: float = 0.0, max_grad_norm: float = 1.0, recompute: str = "layer", dry_run: bool = False,
          overwrite: bool = False, progress: bool | None = None,
          on_step: "Callable[[TrainHistory], None] | None" = None) -> "TrainHistory | TrainDryRun":
    """Fine-tune a LoRA adapter on ``bundle``'s frozen NF4 base with the JSONL file ``data``;
    write it to ``output`` as a PEFT adapter folder and return the :class:`TrainHistory`.

    ``bundle``: a bundle path or a loaded :class:`~edgelora.runtime.model.Model` (its resident
    adapters are left alone). ``rank``, ``alpha``, ``rslora`` (scale ``alpha / sqrt(rank)``
    instead of ``alpha / rank``), ``targets`` (``"all-linear"`` or names: ``"q,k,v"``,
    ``["q_proj", "v_proj"]``) and ``dropout`` are PEFT's ``LoraConfig`` options. ``epochs`` or
    ``steps`` (default: one epoch); ``batch_tokens``: most tokens in a micro-batch;
    ``grad_accum``: micro-batches per optimizer step; ``max_length``: longest example in tokens
    (default: min(1024, the model's context limit)), longer ones truncated or, with
    ``overflow="skip"``, left out. ``eval_data``: a JSONL file whose answer loss is measured every
    ``eval_every`` steps (default: 10 times in the run) and at the end. ``save_every``: write a
    checkpoint every N steps (and at the end); ``resume``: continue from the last one in
    ``output``. ``warmup_ratio``: share of the steps spent warming the learning rate up.
    ``recompute``: what the backward recomputes rather than keeps (``"layer"``: each layer, the
    least memory; ``"projections"``: all but the base products, faster; ``"none"``: keeps all; the
    same bits each way). ``dry_run``: read and check everything, train nothing, return a
    :class:`TrainDryRun`.
    ``progress``: a progress bar (default: on a terminal). ``on_step(history)``: called after
    every step."""
    from edgelora.runtime.model import Model, load
    from edgelora.runtime import backward
    opts = dict(rank=rank, alpha=alpha, targets=targets, rslora=bool(rslora), dropout=float(dropout), lr=float(lr),
                epochs=epochs, steps=steps, batch_tokens=batch_tokens, grad_accum=grad_accum, seed=seed,
                eval_every=eval_every, save_every=save_every, warmup_ratio=float(warmup_ratio),
                weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm))
    _check_options(opts)
    out = Path(output)
    if not dry_run:
        _output_ready(out, resume, overwrite)
    # (exact products: the trainer differentiates them, and holds no int8 copies of the weights)
    model = bundle if isinstance(bundle, Model) else load(bundle, threads=threads, products="exact")
    fields = resolve_targets(model.args, targets)
    limit = model.max_context
    max_length = default_max_length(limit) if max_length is None else max_length
    if isinstance(max_length, int) and max_length > limit:
        raise UsageError(f"max_length {max_length} is more than the model's context ({limit})")
    ds = read_dataset(model.tokenizer, data, max_length, overflow)
    ev = None if eval_data is None else read_dataset(model.tokenizer, eval_data, max_length, overflow)
    if epochs is None and steps is None:
        epochs = 1
    total = _total_steps(ds, seed, batch_tokens, grad_accum, epochs, steps)
    warmup = int(math.ceil(warmup_ratio * total))
    eval_every = eval_every or max(1, total // 10)
    longest = max(len(e.ids) for e in ds.examples)
    modules = [module_name(model.args, f) for f in fields]
    if recompute not in backward.CHECKPOINTS:
        raise UsageError(f"recompute must be one of {', '.join(backward.CHECKPOINTS)}, got {recompute!r}")
    memory = backward.training_memory(model, (rank, modules), longest, checkpoint=recompute)
    _check_fits(model, memory)
    source = model.bundle.manifest.get("source", {}).get("name") or str(model.path)
    cfg = dict(output=str(out), base_model=source, rank=rank, alpha=alpha, rslora=bool(rslora),
               target_modules=target_modules(model.args, fields), dropout=float(dropout))
    if dry_run:
        ex = ds.examples[0]
        return TrainDryRun(ds.summary(), total, grad_accum, render_example(model.tokenizer, ex), ex.where,
                      target_modules(model.args, fields), memory, None if ev is None else ev.summary(),
                      render_example(model.tokenizer, ex, color=True))

    fingerprint = dict(rank=rank, alpha=alpha, targets=fields, rslora=bool(rslora), dropout=float(dropout),
                       lr=float(lr), total_steps=total, batch_tokens=batch_tokens, grad_accum=grad_accum,
                       max_length=max_length, overflow=overflow, seed=seed, warmup_ratio=float(warmup_ratio),
                       weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm), data_sha256=ds.sha256,
                       base_model=model.bundle.manifest.get("manifest_sha256", source),
                       eval_sha256=None if ev is None else ev.sha256, eval_every=eval_every)
    lora = backward.init_lora(model, modules, rank, alpha, bool(rslora), seed)
    drop_rng = np.random.default_rng([seed, 1])
    history = TrainHistory(str(out), str(model.path), total_steps=total, data=ds.summary())
    position, start, moments = 0, 0, None
    if resume:
        step0, folder = checkpoint_dirs(out)[-1]
        state, tensors, moments = load_checkpoint(folder)
        changed = [k for k in RESUME_KEYS if state["options"].get(k) != json.loads(json.dumps(fingerprint[k]))]
        if changed:
            k = changed[0]
            raise UsageError(f"--resume continues a run with the options it was started with; {k} was "
                             f"{state['options'].get(k)!r} and is now {fingerprint[k]!r}", folder)
        lora.set_from_peft(tensors)
        drop_rng.bit_generator.state = state["dropout_rng"]
        history = TrainHistory.from_dict(state["history"])
        history.resumed_from = step0
        position, start = state["position"], step0
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
    params = flat_params(lora)
    opt = AdamW(params, weight_decay=weight_decay)
    if moments is not None:
        opt.load_state_arrays(moments, state["optimizer_step"])

    def save(step: int) -> None:
        save_checkpoint(out, step, lora, opt, {"position": position, "dropout_rng": drop_rng.bit_generator.state,
                                               "options": json.loads(json.dumps(fingerprint)),
                                               "history": history.to_dict()}, cfg)

    lengths = [len(e.ids) for e in ds.examples]
    stream = micro_batches(lengths, seed, batch_tokens, start=position)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = _progress_bar(total, start, show)
    t_run = time.perf_counter()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            grads = {k: np.zeros_like(p) for k, p in params.items()}
            loss_sum, counted, tokens = 0.0, 0, 0
            for _ in range(grad_accum):
                position, _, batch = next(stream)
                position += 1
                for i in batch:
                    ex = ds.examples[i]
                    s, n, g = backward.loss_and_grads(model, lora, np.asarray(ex.ids, np.int64),
                                                      np.asarray(ex.labels, np.int64), dropout=dropout, rng=drop_rng,
                                                      checkpoint=recompute)
                    loss_sum, counted, tokens = loss_sum + s, counted + n, tokens + len(ex.ids)
                    for m, (dA, dB) in g.items():
                        grads[f"{m}.lora_A"] += dA
                        grads[f"{m}.lora_B"] += dB
            for g in grads.values():
                g /= np.float32(counted)
            norm = clip_grad_norm(grads, max_grad_norm)
            rate = lr * cosine_with_warmup(step, warmup, total)
            opt.step(grads, rate)
            history.steps.append(TrainStep(step + 1, loss_sum / counted, rate, norm, tokens, counted,
                                           time.perf_counter() - t0))
            if ev is not None and ((step + 1) % eval_every == 0 or step + 1 == total):
                history.evals.append([step + 1, eval_loss(model, ev.examples, selection_of(model, lora, cfg))])
            if bar is not None:
                last = history.steps[-1]
                post = f"loss {last.loss:.4f}, {last.tokens_per_second:.0f} tok/s"
                if history.evals:
                    post += f", eval {history.evals[-1][1]:.4f}"
                bar.set_postfix_str(post, refresh=False)
                bar.update(1)
            if save_every and ((step + 1) % save_every == 0 or step + 1 == total):
                save(step + 1)
            if on_step is not None:
                on_step(history)
    finally:
        if bar is not None:
            bar.close()
    history.seconds += time.perf_counter() - t_run
    write_adapter_files(out, lora, cfg)
    write_text_atomic(out / "loss_curve.json", json.dumps(history.to_dict(), indent=1))
    write_text_atomic(out / "loss_curve.svg", loss_svg(history))
    return history


def _check_fits(model, memory: dict) -> None:
    """A run whose planned memory exceeds this machine's available memory is refused before it starts."""
    from edgelora.devices.profiles import host_ram_bytes
    ram = host_ram_bytes()
    need = int(memory.get("total", 0))
    if ram and need > ram:
        raise PlanError(f"training needs about {need / 1e9:.2f} GB ({', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in memory.items() if k != 'total')}), "
                        f"more than this machine's {ram / 1e9:.2f} GB; lower --batch-tokens/--max-length or --rank, "
                        f"or target fewer modules", model.path)


def summary_text(history: TrainHistory, bundle: str, name: str | None = None) -> str:
    """The end of ``edgelora train``: what was done and the command to try the adapter."""
    h = history
    name = name or Path(h.adapter_dir).name
    first, last = (h.steps[0].loss, h.steps[-1].loss) if h.steps else (float("nan"), float("nan"))
    lines = [f"trained {len(h.steps)} steps{f' (resumed at {h.resumed_from})' if h.resumed_from else ''} in "
             f"{h.seconds:.1f} s, {h.tokens_per_second:.0f} tokens/s; loss {first:.4f} -> {last:.4f}"]
    if h.evals:
        lines.append(f"eval loss {h.evals[0][1]:.4f} at step {h.evals[0][0]} -> {h.evals[-1][1]:.4f} at step "
                     f"{h.evals[-1][0]}")
    lines.append(f"adapter   {h.adapter_dir} (PEFT LoRA; loss curve: loss_curve.svg, loss_curve.json)")
    lines.append(f"try it:   edgelora chat {bundle} --adapter {name}={h.adapter_dir}")
    lines.append(f"          edgelora run {bundle} --adapter {name}={h.adapter_dir} -p \"...\"")
    return "\n".join(lines)


__all__ = ["train", "TrainHistory", "TrainStep", "TrainDryRun", "AdamW", "clip_grad_norm", "cosine_with_warmup",
           "resolve_targets"]
