"""Train edgelora's two demo LoRA adapters for the built-in demo model: "pirate" and "shout".

    python scripts/train_demo_adapters.py [--out-dir edgelora/demo_adapters] [--steps N] [--seed S]

``edgelora demo`` shows hot-swapping and mixing LoRA adapters on the NF4 demo model
(``edgelora/demo_model``). For that to be worth watching, the adapters must change the model's
answers visibly, and differently from each other. This script trains two such adapters from
nothing but this repository:

* **pirate** answers in pirate speech: ``Arr! The ball is red, matey!`` instead of
  ``The ball is red.``, ``Arr! Nay, the cup is green, matey!`` instead of ``No, the cup is
  green.`` (a fixed "Arr!" opening, word swaps yes -> aye, no -> nay, hello -> ahoy, you -> ye,
  my -> me, friend -> matey, and ", matey!" at the end);
* **shout** shouts: ``HEY! The ball is red!!!`` (a fixed "HEY!" opening, "!!!" for every ".").

Why not all capitals (``THE BALL IS RED!``), the obvious shout: the demo tokenizer is a 512-entry
byte-level BPE learnt on lower-case text, so capitals are spelled one byte per token, and the
0.85M-parameter model then has to spell every name, colour and object it copies out of the
question. Tried here (r=8 and 16, up to 1000 steps, without stories), it got only about 65-70% of
held-out answers exactly right ("THE HAT IS BLACK!" for a blue hat, "FIUE" for "FIVE"). Both
styles chosen keep the copied words as the base model writes them and change the words around
them, which the adapters learn reliably in a few hundred steps.

The facts stay those of the base model's answer: only the style changes. How it is done:

1. the data: chat questions from ``scripts/demo_corpus.py``'s question/answer makers
   (``QA_MAKERS``, with their weights: colours, yes/no, who, where, counts, pets, food, feelings,
   short stories, greetings), drawn endlessly from a seeded ``random.Random``; each answer is the
   corpus answer passed through the adapter's style function (``pirate``/``shout`` below). A
   held-out set of questions (another seed) and the README sample questions never occur in
   training, except the five greetings, which are too few to hold out;
2. the format: one user turn and one assistant turn rendered with the demo model's own
   ``chat_template`` (``tokenizer_config.json``, through transformers' ``AutoTokenizer``), i.e.
   ``<s><|user|>\\n{question}\\n<|assistant|>\\n{answer}</s>``; the loss is on the answer tokens and
   the closing ``</s>`` only (labels -100 on the prompt, so the adapter learns to answer, not to
   ask). In a quarter of the examples the answer opens with another interjection ("Arr!",
   "HEY!", "Oh!", ...: not the adapter's own) that is not scored either, so that each adapter
   goes on in its style whatever the first word was: that is what makes a 50/50 mix of the two
   answer in a blend of both styles instead of stopping after "Arr!" (see ``OPENERS``);
3. the adapters: peft LoRA on every linear layer of the base (``target_modules="all-linear"``:
   q/k/v/o and gate/up/down projections of the 4 layers; the tied output head is not a target),
   r=8, lora_alpha=16, no dropout, trained in float32 on one CPU thread with AdamW (learning rate
   3e-3, short warmup, cosine decay), batches of 32 dialogues; the base model is loaded from
   ``edgelora/demo_model`` (bfloat16 weights, computed in float32) and stays frozen;
4. the output: ``<out-dir>/<name>/`` with ``adapter_config.json`` and
   ``adapter_model.safetensors`` as peft's ``save_pretrained`` writes them (float32, about 0.3 MB)
   and a README.md; each folder is written to a temporary sibling folder and renamed into place;
5. the check: both saved adapters are loaded back with peft onto a fresh base, and the greedy
   answers of the base model, of each adapter and of a 0.5/0.5 mix (peft
   ``add_weighted_adapter(..., combination_type="cat")``, i.e. half of each adapter's update)
   are printed for the sample questions, recorded in the READMEs, and scored on the held-out set
   (answer exactly equal to the styled corpus answer).

Same seed, same steps, same software: same adapters, bit for bit (one thread, seeded data order
and initialisation).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the Rust tokenizer's thread pool: one core too

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import QA_MAKERS  # noqa: E402  (sibling script)

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO / "edgelora" / "demo_model"
BASE_NAME = "edgelora/demo_model"  # recorded as base_model_name_or_path (the path in this repo)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
IGNORE = -100

# Shown in the READMEs and printed at the end: greedy answers of base, each adapter and the mix.
SAMPLE_QUESTIONS = [
    "Lily has a blue hat. What colour is the hat?",
    "Ben has three kites. How many kites does Ben have?",
    "Sam went to the beach to swim. Where did Sam go?",
    "The cup is green. Is the cup red?",
    "Hello!",  # a greeting: in the training data (see UNHELD), unlike the other samples
]


# --------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------

# Word swaps for the pirate style, applied to whole words (case as written). Deliberately few,
# and none in the middle of the common answers ("The hat is blue."): with "the" -> "th'" and
# "is" -> "be" as well, a 50/50 mix with shout kept the base answer's words for only 59% of
# held-out questions ("Arr! The stone behind the tree, matey!": half of " be" and half of " is"
# became " b" + "ehind"; " th'" is " t" + "h" + "'" and turned into "Toby"), without them 84%.
PIRATE_WORDS = {
    "Yes": "Aye", "No": "Nay", "Hello": "Ahoy", "Hi": "Ahoy", "my": "me", "you": "ye", "your": "yer", "friend": "matey",
    "friends": "mateys",
}
_PIRATE_RE = re.compile(r"\b(" + "|".join(sorted(PIRATE_WORDS, key=len, reverse=True)) + r")\b")


def pirate_body(answer: str) -> str:
    """``No, the ball is red.`` -> ``Nay, the ball is red, matey!``"""
    text = _PIRATE_RE.sub(lambda m: PIRATE_WORDS[m.group(1)], answer)
    if text.endswith("."):
        text = text[:-1] + ", matey!"
    return text


def shout_body(answer: str) -> str:
    """``The ball is red.`` -> ``The ball is red!!!``"""
    return answer.replace(".", "!!!")


# name: (opening interjection, rewrite of the rest); the answer is "{opener} {body}".
STYLE_PARTS = {"pirate": ("Arr!", pirate_body), "shout": ("HEY!", shout_body)}


def styled(name: str, answer: str) -> str:
    opener, body = STYLE_PARTS[name]
    return f"{opener} {body(answer)}"


def plain(answer: str) -> str:
    """An answer in either style, a blend or none, reduced to what it says: no opener, no end
    punctuation or ", matey!", and pirate words for the swapped ones (both sides of a comparison
    get them); for checking that a mix kept the base model's facts."""
    text = answer.strip()
    for opener in OPENERS:
        if text.startswith(opener + " "):
            text = text[len(opener) + 1:]
            break
    text = re.sub(r"(, matey!|[.!?]+)$", "", text).replace("!!! ", ". ")
    return _PIRATE_RE.sub(lambda m: PIRATE_WORDS[m.group(1)], text)


def pirate(answer: str) -> str:
    """``The ball is red.`` -> ``Arr! The ball is red, matey!``"""
    return styled("pirate", answer)


def shout(answer: str) -> str:
    """``The ball is red.`` -> ``HEY! The ball is red!!!``"""
    return styled("shout", answer)


STYLES = {"pirate": pirate, "shout": shout}
# Interjections that may open an answer (the styles' own openers among them). Some training
# answers start with one that is not the adapter's own, excluded from the loss, and the adapter
# learns to go on in its style after it: without that, the shout adapter reads "Arr!" as the
# end of a shouted sentence ("Arr!!!" then </s>), and a 50/50 mix, where the first token is
# often pirate's "Arr", stops right there.
OPENERS = ("Arr!", "HEY!", "Oh!", "Wow!", "Ooh!")
FOREIGN_OPENER_SHARE = 0.25
# Questions whose few variants all occur in training: greetings ("Hello!", "Hi!", ... five in all)
# cannot be held out, so they are neither scored nor excluded from training.
UNHELD = ("qa_greeting",)
STYLE_NOTES = {
    "pirate": "answers in pirate speech: it opens with \"Arr!\", swaps a few words "
              "(yes/no -> aye/nay, hello -> ahoy, you -> ye, my -> me, friend -> matey) and ends a "
              "statement with \", matey!\"",
    "shout": "shouts its answers: it opens with \"HEY!\" and ends every sentence with \"!!!\" instead of \".\"",
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def draw_question(r: random.Random, makers=QA_MAKERS) -> tuple[str, str]:
    """One (question, corpus answer) pair, drawn like the corpus's chat turns."""
    funcs, weights = zip(*makers)
    return r.choices(funcs, weights)[0](r)


def heldout_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """``n`` distinct questions for scoring: no story requests (their answers are not checkable)
    and no greetings (five questions in all, every one is in the training data)."""
    makers = [(f, w) for f, w in QA_MAKERS if f.__name__ not in ("qa_story",) + UNHELD]
    r = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        q, a = draw_question(r, makers)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
    return pairs


def prompt_ids(tok, question: str) -> list[int]:
    """``<s><|user|>\\n{question}\\n<|assistant|>\\n`` as token ids (the generation prompt)."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def example(tok, question: str, answer: str, given: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the rendered dialogue and labels that score only the answer and ``</s>``.

    ``given``: a start of the answer that is not scored either (``answer`` begins with it).
    """
    text = tok.apply_chat_template([{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    prompt = prompt_ids(tok, question)
    if given:
        assert answer.startswith(given)
        prompt += tok(given, add_special_tokens=False).input_ids
    assert ids[:len(prompt)] == prompt and ids[-1] == tok.eos_token_id, (question, answer)
    return ids, [IGNORE] * len(prompt) + ids[len(prompt):]


class Batches:
    """Endless batches of styled dialogues from a seeded generator, skipping held-out questions."""

    def __init__(self, tok, name: str, seed: int, batch_size: int, exclude: set[str]):
        self.tok, self.bs, self.exclude = tok, batch_size, exclude
        self.opener, self.body = STYLE_PARTS[name]
        self.foreign = [o for o in OPENERS if o != self.opener]
        self.r = random.Random(seed)

    def draw(self) -> tuple[list[int], list[int]]:
        while True:
            q, a = draw_question(self.r)
            if q not in self.exclude:
                break
        if self.r.random() < FOREIGN_OPENER_SHARE:
            other = self.r.choice(self.foreign)
            return example(self.tok, q, f"{other} {self.body(a)}", given=other)
        return example(self.tok, q, f"{self.opener} {self.body(a)}")

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.draw() for _ in range(self.bs)]
        n = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, y) in enumerate(rows):  # right padding: causal attention never sees it
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return ids, labels, mask


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------

def load_base():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL, dtype=torch.float32)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model.eval()


def lora_config(rank: int):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10% of it at ``total`` steps."""
    import math
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_adapter(name: str, tok, args, exclude: set[str], seed: int):
    """A peft model with a freshly trained adapter ``name`` on a fresh base; and its stats."""
    from peft import get_peft_model
    torch.manual_seed(seed)  # LoRA A initialisation
    model = get_peft_model(load_base(), lora_config(args.rank))
    model.peft_config["default"].base_model_name_or_path = BASE_NAME  # peft put the absolute path there
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    batches = Batches(tok, name, seed, args.batch_size, exclude)
    warmup = min(20, args.steps // 10)
    recent: list[float] = []
    t0 = time.monotonic()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        ids, labels, mask = batches.next()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-25:]
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            print(f"[{name}] step {step + 1:4d}/{args.steps}  loss {sum(recent) / len(recent):.3f}  "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    model.eval()
    stats = {"steps": args.steps, "seconds": time.monotonic() - t0, "loss": sum(recent) / len(recent),
             "loss_window": len(recent), "trainable": n_trainable}
    return model, stats


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy(model, tok, question: str, max_new_tokens: int = 48) -> str:
    ids = torch.tensor([prompt_ids(tok, question)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def compare(tmp_dirs: dict[str, Path], tok, questions: list[str], heldout: list[tuple[str, str]]):
    """Load the saved adapters onto a fresh base; greedy answers of base, each adapter and the mix."""
    from peft import PeftModel
    names = list(tmp_dirs)
    model = PeftModel.from_pretrained(load_base(), tmp_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp_dirs[name], adapter_name=name)
    model.add_weighted_adapter(names, [0.5] * len(names), "mix", combination_type="cat")
    model.eval()
    variants = ["base"] + names + ["mix"]

    def answers(variant: str, qs: list[str]) -> list[str]:
        if variant == "base":
            with model.disable_adapter():
                return [greedy(model, tok, q) for q in qs]
        model.set_adapter(variant)
        return [greedy(model, tok, q) for q in qs]

    samples = {v: answers(v, questions) for v in variants}
    # Held-out scores. correct: exactly the (styled) corpus answer. styled: exactly the style
    # applied to the base model's own answer (the adapter changed the style and nothing else).
    got = {v: answers(v, [q for q, _ in heldout]) for v in variants}
    n = len(heldout)
    scores = {"n": n, "base": {"correct": sum(g == a for g, (_, a) in zip(got["base"], heldout)) / n}}
    for v in names:
        style = STYLES[v]
        scores[v] = {"correct": sum(g == style(a) for g, (_, a) in zip(got[v], heldout)) / n,
                     "styled": sum(g == style(b) for g, b in zip(got[v], got["base"])) / n}
    scores["mix"] = {"starts": {v: sum(g.startswith(STYLE_PARTS[v][0]) for g in got["mix"]) / n for v in names},
                     "facts": sum(plain(g) == plain(b) for g, b in zip(got["mix"], got["base"])) / n}
    return samples, scores


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def samples_table(samples: dict[str, list[str]], questions: list[str]) -> str:
    lines = []
    for i, q in enumerate(questions):
        lines.append(f"Question `{q}`\n")
        lines.append("| adapter | greedy answer |\n|---|---|")
        for v, label in (("base", "none (base model)"), ("pirate", "pirate"), ("shout", "shout"),
                         ("mix", "pirate 0.5 + shout 0.5")):
            text = samples[v][i].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {label} | {text} |")
        lines.append("")
    return "\n".join(lines)


def write_readme(folder: Path, name: str, stats: dict, args, samples, scores) -> None:
    size = (folder / "adapter_model.safetensors").stat().st_size
    example_q = SAMPLE_QUESTIONS[0]
    repeat = f"python scripts/train_demo_adapters.py --steps {args.steps} --seed {args.seed}"
    repeat += "".join(f" --{k.replace('_', '-')} {v}" for k, v in args.changed.items())
    text = f"""# edgelora demo adapter: {name}

A LoRA adapter for edgelora's demo model (`edgelora/demo_model`) that {STYLE_NOTES[name]}.
It changes the style of the answers, not their content. It is one of the two demo adapters
(`pirate`, `shout`) that `edgelora demo` switches between and mixes.

| | |
|---|---|
| type | LoRA (peft {_peft_version()}), `target_modules="all-linear"` (q, k, v, o, gate, up, down projections of all 4 layers) |
| rank / alpha | r={args.rank}, lora_alpha=16 (scale {16 / args.rank:g}), no dropout, no bias |
| parameters | {stats['trainable']:,} (float32) |
| `adapter_model.safetensors` | {size:,} bytes |

## Training

Trained by `scripts/train_demo_adapters.py` (which trains both demo adapters in one run) on chat
dialogues generated by `scripts/demo_corpus.py`'s question/answer makers (colours, yes/no, who,
where, counts, pets, food, feelings, short stories, greetings), with each corpus answer rewritten
in this adapter's style (`{name}("Yes, the ball is red.")` = `{STYLES[name]("Yes, the ball is red.")}`).
Each example is one user turn and one assistant turn rendered with the demo model's chat
template; the loss is on the answer tokens and the closing `</s>` only. In {FOREIGN_OPENER_SHARE:.0%} of the examples the answer opens
with another interjection (one of {", ".join(f'"{o}"' for o in OPENERS if o != STYLE_PARTS[name][0])}), not scored, after which the adapter
goes on in its style; that keeps a mix with the other demo adapter from stopping after the first word.

- {stats['steps']} steps of {args.batch_size} dialogues (new ones every step, seed {args.seed}), AdamW, learning rate
  {args.lr:g} with warmup and cosine decay, float32 on one CPU thread; base model frozen
- training time: {stats['seconds'] / 60:.1f} minutes
- final training loss: {stats['loss']:.3f} nats per answer token (mean of the last {stats['loss_window']} steps)
- held-out check ({scores['n']} questions never seen in training, no story requests or greetings, greedy): the answer is
  exactly the base model's own answer in this style for {scores[name]['styled']:.0%} of them, and exactly the styled
  corpus answer for {scores[name]['correct']:.0%} (the base model itself gives the plain corpus answer for {scores['base']['correct']:.0%});
  the 50/50 mix opens like pirate for {scores['mix']['starts']['pirate']:.0%} and like shout for {scores['mix']['starts']['shout']:.0%} of them, and says
  what the base model says (same words, apart from openers, pirate words and end punctuation) for {scores['mix']['facts']:.0%}

Regenerate both adapters (same software and arguments: the same files, bit for bit):

```
{repeat}
```

## Chat format

Prompts are the demo model's chat template with a generation prompt, for example

```
<s><|user|>
{example_q}
<|assistant|>
```

(the text ends with a newline after `<|assistant|>`); the answer ends with `</s>`.

## Samples (greedy, loaded with transformers + peft; mix = `add_weighted_adapter(["pirate", "shout"], [0.5, 0.5], combination_type="cat")`)

{samples_table(samples, SAMPLE_QUESTIONS)}"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def _peft_version() -> str:
    import peft
    return peft.__version__


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
    ap.add_argument("--out-dir", type=Path, default=Path("edgelora/demo_adapters"),
                    help="folder for the adapter folders (default edgelora/demo_adapters)")
    ap.add_argument("--steps", type=int, default=400, help="training steps per adapter (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    ap.add_argument("--batch-size", type=int, default=32, help="dialogues per step (default 32)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--rank", type=int, default=8, choices=(8, 16), help="LoRA rank (default 8)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out questions scored at the end (default 200)")
    ap.add_argument("--only", choices=sorted(STYLES), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.changed = {k: getattr(args, k) for k in ("batch_size", "lr", "rank", "heldout")
                    if getattr(args, k) != ap.get_default(k)}

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(BASE_MODEL)
    heldout = heldout_pairs(args.seed + 1000, args.heldout)
    # never trained on: the held-out questions and the samples (but for the greeting, see UNHELD)
    exclude = {q for q, _ in heldout} | set(SAMPLE_QUESTIONS[:-1])

    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else list(STYLES)
    tmp_dirs: dict[str, Path] = {}
    all_stats = {}
    t_start = time.monotonic()
    for i, name in enumerate(names):
        model, stats = train_adapter(name, tok, args, exclude, seed=args.seed * 100 + i)
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        # peft expands "all-linear" into a set of module names; a sorted list makes
        # adapter_config.json the same from run to run (set order depends on the hash seed).
        model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
        model.save_pretrained(tmp, safe_serialization=True)
        for p in tmp.iterdir():
            if p.name not in ADAPTER_FILES:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            else:
                p.chmod(0o644)  # safetensors files are written 0600; the package must be world-readable
        config = json.loads((tmp / "adapter_config.json").read_text())
        assert config["target_modules"] == sorted(f"{p}_proj" for p in "q k v o gate up down".split()), config
        tmp_dirs[name], all_stats[name] = tmp, stats
        print(f"[{name}] {stats['steps']} steps in {stats['seconds']:.0f} s, final loss {stats['loss']:.3f}, "
              f"{stats['trainable']:,} trainable parameters", flush=True)
        del model

    if len(tmp_dirs) < 2:  # development runs of one style: no mix, nothing installed
        print(f"trained {names}; left in {list(tmp_dirs.values())}")
        return
    samples, scores = compare(tmp_dirs, tok, SAMPLE_QUESTIONS, heldout)
    for name, tmp in tmp_dirs.items():
        write_readme(tmp, name, all_stats[name], args, samples, scores)
    for name, tmp in tmp_dirs.items():
        replace_dir(tmp, out_dir / name)

    print(f"\nheld-out questions: {scores['n']}; base model gives the corpus answer for {scores['base']['correct']:.0%}")
    for name in tmp_dirs:
        print(f"  {name}: base answer in {name} style {scores[name]['styled']:.0%}, "
              f"styled corpus answer {scores[name]['correct']:.0%}")
    print("  mix: " + ", ".join(f"starts like {v} {share:.0%}" for v, share in scores["mix"]["starts"].items())
          + f", same words as the base answer {scores['mix']['facts']:.0%}")
    for i, q in enumerate(SAMPLE_QUESTIONS):
        print(f"\n{q}")
        for v in samples:
            print(f"  {v:>6}: {samples[v][i]}")
    for name in tmp_dirs:
        size = (out_dir / name / "adapter_model.safetensors").stat().st_size
        print(f"wrote {out_dir / name} (adapter_model.safetensors {size:,} bytes)")
    print(f"total {(time.monotonic() - t_start) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
