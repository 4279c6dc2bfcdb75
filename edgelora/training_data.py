"""Training and evaluation data: JSON Lines read into token ids and labels with the loss on the
answers only (``edgelora train`` and ``edgelora eval`` share this module).

A line is one of the shapes people have:

* ``{"prompt": str, "completion": str}``: the prompt's tokens (with the tokenizer's special
  tokens, as ``encode`` does) joined to the completion's (without). The two are tokenized
  separately and then joined, so a BPE merge across the boundary cannot move the mask: the loss
  counts exactly the completion's tokens (TRL's prompt-completion format).
* ``{"messages": [...]}``: the conversation rendered by the model's chat template; the loss counts
  every assistant turn (not only the last one). Each turn's span is what the template adds after
  the conversation before it rendered with ``add_generation_prompt=True``, up to the
  conversation rendered through that turn; the template must render each earlier part as a
  prefix of the whole, else the line is refused (its answers could not be located).
* ``{"text": str}``: plain text, every token after the first counted.

For training (``eos=True``) the tokenizer's end-of-sequence token is appended to a completion and
to a text, and counted, so that the model learns to stop (TRL does the same); a chat template
writes its own end-of-turn tokens. Labels follow Hugging Face's convention: ``labels[t]`` is the
token the logits at ``t - 1`` predict, ``-100`` where the loss does not count (``labels[0]`` is
always ``-100``: the first token is predicted from nothing).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import FormatError, UsageError

#: the label of a token the loss does not count (PyTorch's ``ignore_index``)
IGNORE = -100
#: what a line may hold
SHAPES = '{"prompt": str, "completion": str}, {"messages": [...]} or {"text": str}'


def _eos(tok) -> list[int]:
    ids = sorted(tok.eos_token_ids)
    return ids[:1]


def answer_spans(tok, record: dict, where: str, eos: bool = False) -> tuple[list, list]:
    """A data line's token ids and the ``[start, end)`` spans whose tokens the loss counts.
    ``tok``: the model's :class:`~edgelora.runtime.tokenizer.Tokenizer`; ``eos``: append the end
    of sequence to a completion or a text (training)."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object: {SHAPES}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise FormatError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        if not tok.has_chat_template:
            raise UsageError(f"{where}: a {{\"messages\": ...}} line needs a chat template, and this model has none; "
                             f"use {{\"prompt\", \"completion\"}} lines")
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False), add_special_tokens=False)
        spans = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                continue
            before = tok.encode(tok.apply_chat_template(messages[:i], add_generation_prompt=True),
                                add_special_tokens=False)
            upto = tok.encode(tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False),
                              add_special_tokens=False)
            if ids[:len(before)] != before or ids[:len(upto)] != upto:
                raise FormatError(f"{where}: the chat template does not render the conversation before assistant "
                                  f"turn {i} as a prefix of the whole; its answer tokens cannot be located")
            spans.append((len(before), len(upto)))
        return ids, spans
    end = _eos(tok) if eos else []
    if "text" in record and "prompt" not in record:
        text = record["text"]
        if not isinstance(text, str):
            raise FormatError(f"{where}: \"text\" must be a string")
        ids = tok.encode(text) + end
        return ids, [(1, len(ids))]
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise FormatError(f"{where}: expected {SHAPES}")
    p = tok.encode(prompt)
    c = tok.encode(completion, add_special_tokens=False) + end
    return p + c, [(len(p), len(p) + len(c))]


def labels_for(ids: list, spans: list) -> list:
    """``labels[t] = ids[t]`` inside the spans, ``IGNORE`` elsewhere and at position 0."""
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        for t in range(max(a, 1), b):
            labels[t] = ids[t]
    return labels


def read_jsonl(path) -> list:
    """``[(where, record)]`` of a JSON Lines file, blank lines skipped; a line that is not a JSON
    object is refused naming the file and line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError("data file does not exist", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read the data file: {e}", path) from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise FormatError(f"{where}: expected a JSON object: {SHAPES}")
        out.append((where, record))
    return out


@dataclass
class Example:
    """One line as the trainer sees it: token ids and labels (``IGNORE`` where not counted)."""

    ids: list
    labels: list
    where: str  # file:line
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t, v in enumerate(self.labels) if t > 0 and v != IGNORE)


@dataclass
class Dataset:
    """A data file read for training: its examples and what happened to the others."""

    path: str
    examples: list
    lines: int  # non-blank lines read
    truncated: list = field(default_factory=list)  # where of each example cut to max_length
    skipped: list = field(default_factory=list)  # where of each example left out (too long, or nothing to learn)
    max_length: int = 0
    sha256: str = ""

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(e.trained_tokens for e in self.examples)

    def summary(self) -> dict:
        return {"path": self.path, "lines": self.lines, "examples": len(self.examples), "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "max_length": self.max_length,
                "truncated": len(self.truncated), "skipped": len(self.skipped), "sha256": self.sha256}


def read_dataset(tok, path, max_length: int, overflow: str = "truncate", eos: bool = True) -> Dataset:
    """Read a JSONL file for training. An example longer than ``max_length`` tokens is cut to its
    first ``max_length`` (``overflow="truncate"``) or left out (``"skip"``); one left with no
    answer token to learn from is left out too. Both are counted. No example at all is an error."""
    if overflow not in ("truncate", "skip"):
        raise UsageError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer of at least 2, got {max_length!r}")
    records = read_jsonl(path)
    ds = Dataset(str(path), [], len(records), max_length=max_length,
                 sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest())
    for where, record in records:
        ids, spans = answer_spans(tok, record, where, eos=eos)
        ex = Example(ids, labels_for(ids, spans), where)
        if len(ids) > max_length:
            if overflow == "skip":
                ds.skipped.append(where)
                continue
            ex = Example(ids[:max_length], ex.labels[:max_length], where, truncated=True)
        if ex.trained_tokens == 0:
            ds.skipped.append(where)
            continue
        if ex.truncated:
            ds.truncated.append(where)
        ds.examples.append(ex)
    if not ds.examples:
        why = (f"all {len(ds.skipped)} examples were left out (longer than --max-length {max_length}, or no answer "
               f"tokens within it)" if ds.skipped else "it holds no examples")
        raise UsageError(f"nothing to train on: {why}", path)
    return ds


# ---------------------------------------------------------------------------------------------
# the order examples are seen in
# ---------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list:
    """The examples' order in ``epoch``: a permutation drawn from ``(seed, epoch)`` alone, so that
    any position of a run can be found again without replaying it."""
    import numpy as np
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def pack(lengths: list, order: list, batch_tokens: int) -> list:
    """Consecutive examples of ``order`` grouped into micro-batches of at most ``batch_tokens``
    tokens (at least one example each)."""
    batches, cur, size = [], [], 0
    for i in order:
        if cur and size + lengths[i] > batch_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def epoch_batches(lengths: list, seed: int, epoch: int, batch_tokens: int) -> list:
    """The micro-batches (lists of example indices) of ``epoch``."""
    return pack(lengths, epoch_order(len(lengths), seed, epoch), batch_tokens)


def micro_batches(lengths: list, seed: int, batch_tokens: int, start: int = 0):
    """The endless stream of micro-batches over epoch after epoch, from position ``start`` (the
    number consumed before): ``(position, epoch, indices)``."""
    pos, epoch = 0, 0
    while True:
        batches = epoch_batches(lengths, seed, epoch, batch_tokens)
        if pos + len(batches) <= start:
            pos += len(batches)
        else:
            for b in batches:
                if pos >= start:
                    yield pos, epoch, b
                pos += 1
        epoch += 1


def count_micro_batches(lengths: list, seed: int, batch_tokens: int, epochs: int) -> int:
    return sum(len(epoch_batches(lengths, seed, e, batch_tokens)) for e in range(epochs))


# ---------------------------------------------------------------------------------------------
# showing an example
# ---------------------------------------------------------------------------------------------

DIM, RESET = "\x1b[2m", "\x1b[0m"


def render_example(tok, ex: Example, color: bool = False) -> str:
    """The example's text with its masked tokens (not trained) marked: dimmed on a terminal
    (``color``), else each masked run in ``[[ ]]``."""
    from edgelora.cli import printable
    runs = []  # (masked, [ids])
    for t, i in enumerate(ex.ids):
        masked = ex.labels[t] == IGNORE
        if runs and runs[-1][0] == masked:
            runs[-1][1].append(i)
        else:
            runs.append((masked, [i]))
    out, done, shown = [], [], ""
    for masked, ids in runs:
        done += ids
        whole = tok.decode(done)
        # the run's text as it reads inside the whole (a BPE run's leading space belongs to it)
        text = whole[len(shown):] if whole.startswith(shown) else tok.decode(ids)
        shown = whole
        text = printable(text)
        if masked:
            out.append(f"{DIM}{text}{RESET}" if color else f"[[{text}]]")
        else:
            out.append(text)
    return "".join(out)


def describe(ds: Dataset) -> str:
    """One line: examples, tokens, trained tokens, truncated and skipped."""
    s = (f"{len(ds.examples)} examples, {ds.tokens} tokens, {ds.trained_tokens} trained "
         f"({ds.trained_tokens / max(1, ds.tokens):.0%})")
    if ds.truncated:
        s += f"; {len(ds.truncated)} truncated to {ds.max_length} tokens (first: {ds.truncated[0]})"
    if ds.skipped:
        s += f"; {len(ds.skipped)} skipped (first: {ds.skipped[0]})"
    return s


def default_max_length(limit: int) -> int:
    return min(1024, int(limit))
