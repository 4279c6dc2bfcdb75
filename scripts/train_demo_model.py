"""Train edgelora's built-in demo model: a tiny Llama that writes simple English stories.

    python scripts/train_demo_model.py --out edgelora/demo_model [--minutes 12 | --steps N]

Everything comes from this repository, nothing is downloaded:

1. the corpus: ``generate_corpus`` from ``scripts/demo_corpus.py`` (procedural children's stories
   and chat-format question/answer dialogues, deterministic for a seed);
2. the tokenizer: a byte-level BPE (``tokenizers``; every text round-trips exactly) with 512
   entries, special tokens ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<|user|>``=3, ``<|assistant|>``=4,
   and a post-processor that prepends ``<s>`` like Llama tokenizers do; saved as ``tokenizer.json``
   plus a transformers ``tokenizer_config.json`` with a chat template;
3. the model: ``LlamaForCausalLM`` (4 layers, hidden 128, grouped-query attention with 2 KV heads,
   tied embeddings, about 0.85M parameters) trained from scratch in float32 with AdamW (peak
   learning rate 5e-3, warmup and cosine decay), on packed sequences of 256 tokens, batches of 32,
   one CPU thread;
4. the output: the checkpoint in bfloat16 (``config.json``, ``generation_config.json``,
   ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``README.md``), written
   to a temporary sibling folder and renamed into place, then loaded back with transformers to
   print a greedy story and a chat answer.

Training length: ``--steps N`` trains exactly N steps (fully reproducible on the same software);
otherwise ``--minutes`` is a wall-clock budget: the step count is planned from the speed of the
first steps, training stops at the budget in any case, and the README records the command that
repeats the run exactly (``--steps``, plus ``--schedule-steps`` when the budget cut the planned
learning-rate schedule short). Same seed, same settings, same software: same weights, bit for bit.
"""

from __future__ import annotations

import os

# Tokenizer training/encoding is Rust code with its own thread pool; keep it on one core too.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import generate_corpus  # noqa: E402  (sibling script)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]  # ids 0..4
BOS_ID, EOS_ID = 1, 2
VOCAB_SIZE = 512
SEQ_LEN = 256

# Renders user/assistant turns exactly like the dialogues in the corpus; system messages are
# skipped (the model never saw any), other roles are an error.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('roles must be user, assistant or system') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

STORY_PROMPT = "Once upon a time"
CHAT_QUESTION = "Lily has a blue hat. What colour is the hat?"
KEEP_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "README.md"}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Byte-level BPE with VOCAB_SIZE entries: 5 special tokens, 256 bytes, 251 merges."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Merges are learnt from plain text: the chat markers are special tokens, not words.
    plain = (d.replace("<|user|>", "").replace("<|assistant|>", "").replace("</s>", "") for d in docs)
    tok.train_from_iterator(plain, trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def check_round_trip(tok: Tokenizer, docs: list[str]) -> None:
    samples = docs[:200] + ["Émile said: naïve café, 3 × 4 = 12 ✓ 🙂\n\ttabs  and   spaces "]
    for d in samples:
        ids = tok.encode(d, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == d, f"round trip failed for {d!r}"
    assert tok.encode("Hi").ids[0] == BOS_ID


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def pack(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream cut into rows of SEQ_LEN tokens (tail dropped).

    Each document is ``<s> text </s>``; dialogues already end with ``</s>`` after each answer.
    """
    stream: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=True):  # adds <s>
        stream.extend(enc.ids)
        if enc.ids[-1] != EOS_ID:
            stream.append(EOS_ID)
    rows = len(stream) // SEQ_LEN
    return torch.tensor(stream[:rows * SEQ_LEN], dtype=torch.long).view(rows, SEQ_LEN)


class Batches:
    """Endless batches of rows, reshuffled every epoch with a seeded generator."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        self.data, self.bs = data, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.order, self.pos = 0, torch.randperm(len(data), generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > len(self.order):
            self.epoch += 1
            self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return self.data[idx]


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------

def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return LlamaForCausalLM(config).float()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10% of it at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=data[i:i + batch_size], labels=data[i:i + batch_size]).loss.item()
              for i in range(0, len(data), batch_size)]
    model.train()
    return float(np.mean(losses))


def train(model, data: torch.Tensor, val: torch.Tensor, args) -> dict:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(data, args.batch_size, args.seed)
    budget_s = None if args.steps else args.minutes * 60.0
    stop = args.steps or 10 ** 9   # steps to train (time-bound: until the budget is spent)
    # Length of the learning-rate schedule: --schedule-steps, else --steps, else planned from the
    # speed of the first steps. The plan is made during the warmup, whose learning rates do not
    # depend on it, so "--steps S --schedule-steps T" repeats a time-bound run exactly.
    total = args.schedule_steps or args.steps or 10 ** 9
    calib_from, calib_to = 3, 13   # steps timed for the plan (the first ones are slower)
    warmup = args.warmup
    recent: list[float] = []
    t0 = time.monotonic()
    t_calib = t0
    step = 0
    model.train()
    while step < stop:
        if step == calib_from:
            t_calib = time.monotonic()
        if budget_s is not None and step == calib_to:
            per_step = (time.monotonic() - t_calib) / (calib_to - calib_from)
            # 97% of the time left: validation passes and slower steps must fit in the budget too.
            total = stop = max(warmup + 10, int(0.97 * (budget_s - (time.monotonic() - t0)) / per_step) + step)
            print(f"{per_step:.2f} s/step: planning {total} steps for {args.minutes:g} minutes", flush=True)
        lr = lr_at(step, total, args.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches.next()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        recent = recent[-50:]
        step += 1
        elapsed = time.monotonic() - t0
        if step % 50 == 0 or step == stop:
            print(f"step {step:5d}/{total}  loss {np.mean(recent):.3f}  lr {lr:.2e}  "
                  f"epoch {batches.epoch}  {elapsed / 60:.1f} min", flush=True)
        if step % 250 == 0:
            print(f"           validation loss {evaluate(model, val, args.batch_size):.3f}", flush=True)
        if budget_s is not None and elapsed >= budget_s:
            print(f"time budget reached after {step} steps", flush=True)
            break
    return {"steps": step, "schedule_steps": total, "train_loss": float(np.mean(recent)), "minutes": (time.monotonic() - t0) / 60,
            "val_loss": evaluate(model, val, args.batch_size), "epochs": step * args.batch_size / len(data)}


# --------------------------------------------------------------------------------------------
# Samples and output
# --------------------------------------------------------------------------------------------

def samples(folder: Path) -> tuple[str, str]:
    """Load ``folder`` with transformers; greedy story continuation and greedy chat answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = tok(STORY_PROMPT, return_tensors="pt").input_ids  # <s> added by the tokenizer
        out = model.generate(ids, max_new_tokens=60, do_sample=False)
        story = tok.decode(out[0], skip_special_tokens=True)
        prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return story, answer


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_readme(folder: Path, n_params: int, stats: dict, story: str, answer: str, args) -> None:
    size_mb = folder_size(folder) / 1e6
    early = stats["schedule_steps"] != stats["steps"]
    sched_note = f" (schedule planned for {stats['schedule_steps']}; the time budget ended it)" if early else ""
    repeat = f"--steps {stats['steps']}" + (f" --schedule-steps {stats['schedule_steps']}" if early else "")
    repeat += "".join(f" --{key.replace('_', '-')} {value}" for key, value in args.changed.items())
    text = f"""# edgelora demo model

A tiny Llama-architecture language model (`LlamaForCausalLM`) that edgelora ships for
`edgelora demo`. It writes very simple English children's stories and answers simple questions
in a chat format. It is a toy for showing the NF4 conversion and runtime end to end, not a useful
assistant.

## Shape

| | |
|---|---|
| parameters | {n_params:,} ({n_params / 1e6:.2f}M; input and output embeddings are tied) |
| layers | 4 |
| hidden size | 128 |
| MLP size | 384 (SwiGLU) |
| attention | 4 query heads, 2 key/value heads (head size 32), RoPE theta 10000 |
| context | 512 positions (trained on 256) |
| vocabulary | 512: byte-level BPE, `<unk>`=0, `<s>`=1, `</s>`=2, `<|user|>`=3, `<|assistant|>`=4 |
| weights | bfloat16 safetensors |
| folder size | {size_mb:.2f} MB |

## Training

Trained from scratch by `scripts/train_demo_model.py` on text generated by
`scripts/demo_corpus.py`: procedural children's stories from templates and word lists (about 80%)
and short question/answer dialogues (about 20%). The corpus is regenerated from a seed, so nothing
here depends on external data.

- corpus: {args.docs:,} documents (seed {args.seed}), {stats['train_tokens']:,} training tokens
- {stats['steps']} steps{sched_note} of {args.batch_size} x {SEQ_LEN} tokens ({stats['epochs']:.2f} epochs), AdamW,
  peak learning rate {args.lr:g}, warmup {args.warmup} steps, cosine decay, weight decay {args.weight_decay:g},
  float32 on one CPU thread
- training time: {stats['minutes']:.1f} minutes
- final training loss: {stats['train_loss']:.3f} nats/token (mean of the last 50 steps)
- validation loss: {stats['val_loss']:.3f} nats/token (documents from seed {args.seed + 1})

Regenerate (`--steps` repeats this exact run; `--minutes` trains for a time budget instead):

```
python scripts/train_demo_model.py --out edgelora/demo_model {repeat}
```

## Chat format

The `chat_template` in `tokenizer_config.json` renders

```
<s><|user|>
question
<|assistant|>
answer</s>
```

and, with `add_generation_prompt`, ends with `<|assistant|>\\n`. System messages are skipped.

## Samples (greedy, from this checkpoint loaded with transformers)

Prompt `{STORY_PROMPT}`, 60 new tokens:

> {story}

Chat question `{CHAT_QUESTION}`:

> {answer}
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an older ``out`` if there is one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("edgelora/demo_model"), help="output folder")
    ap.add_argument("--minutes", type=float, default=12.0, help="training time budget (default 12)")
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps (ignores --minutes)")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="learning-rate schedule length when it differs from --steps (to repeat a run "
                         "that a time budget stopped early)")
    ap.add_argument("--docs", type=int, default=60000, help="corpus documents (default 60000)")
    ap.add_argument("--seed", type=int, default=0, help="corpus, initialisation and data-order seed")
    ap.add_argument("--batch-size", type=int, default=32, help=f"rows of {SEQ_LEN} tokens per step (default 32)")
    # 5e-3 rather than the usual 3e-3: in 7-minute trials it learnt the chat answers (copying a
    # colour out of the question) clearly sooner, with the same story quality.
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    ap.add_argument("--warmup", type=int, default=50, help="warmup steps (default 50)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    args = ap.parse_args()
    # Settings that differ from the defaults, for the README's command that repeats this run.
    args.changed = {k: getattr(args, k) for k in ("docs", "seed", "batch_size", "lr", "warmup", "weight_decay")
                    if getattr(args, k) != ap.get_default(k)}

    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    t_start = time.monotonic()
    docs = generate_corpus(args.docs, args.seed)
    val_docs = generate_corpus(2000, args.seed + 1)
    tok = train_tokenizer(docs)
    check_round_trip(tok, docs)
    data, val = pack(tok, docs), pack(tok, val_docs)[:64]
    n_chars = sum(len(d) for d in docs)
    print(f"corpus: {len(docs)} documents, {n_chars:,} characters, {data.numel():,} tokens "
          f"({n_chars / data.numel():.2f} characters/token), {len(data)} rows of {SEQ_LEN}; "
          f"prepared in {time.monotonic() - t_start:.0f} s", flush=True)

    model = make_model()
    n_params = model.num_parameters()
    print(f"model: {n_params:,} parameters", flush=True)
    stats = train(model, data, val, args)
    stats["train_tokens"] = data.numel()
    print(f"done: {stats['steps']} steps in {stats['minutes']:.1f} min, train loss {stats['train_loss']:.3f}, "
          f"validation loss {stats['val_loss']:.3f}", flush=True)

    from transformers import GenerationConfig
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    for p in tmp.iterdir():
        if p.name not in KEEP_FILES:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            p.chmod(0o644)  # safetensors files are written 0600; the package must be world-readable
    config = json.loads((tmp / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16", config

    story, answer = samples(tmp)
    write_readme(tmp, n_params, stats, story, answer, args)
    replace_dir(tmp, out)

    # Load the final folder back to show that the shipped checkpoint works in transformers.
    story, answer = samples(out)
    print(f"\nwrote {out} ({folder_size(out) / 1e6:.2f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"\n[greedy] {story}")
    print(f"\n[chat] {CHAT_QUESTION}\n[answer] {answer}")


if __name__ == "__main__":
    main()
