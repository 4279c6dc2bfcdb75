"""Write the evaluation sets of ``examples/fleet.toml`` from the demo model's own data makers.

    python scripts/make_fleet_eval.py [--out examples/fleet_eval] [--questions 16] [--stories 12]

* ``pirate.jsonl`` and ``shout.jsonl``: one ``{"messages": [user question, assistant answer]}``
  line per question, the answer in the adapter's style (``scripts/train_demo_adapters.py``'s
  ``STYLES``). The questions are the adapters' held-out questions (``heldout_pairs(1000, N)``, the
  seed the training script uses for the set it never trains on), so the loss measures what an
  adapter learnt, not what it memorised; ``edgelora fleet`` scores the answer tokens only, with
  and without the adapter.
* ``stories.txt``: children's stories from ``scripts/demo_corpus.py`` with a seed the demo model
  was not trained on (its training corpus uses seed 0), for perplexity: an adapter that changes
  the answers' style should leave the base's story-telling about as it was.

Standard library and the repository's scripts only (importing the training script needs torch,
as installed for the tests); the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import StoryWriter  # noqa: E402  (sibling scripts)
from train_demo_adapters import STYLES, heldout_pairs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HELDOUT_SEED = 1000  # train_demo_adapters.py: heldout_pairs(args.seed + 1000, ...) with its default seed 0
STORY_SEED = 20261202


def style_set(name: str, n: int) -> str:
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": STYLES[name](a)}]})
             for q, a in heldout_pairs(HELDOUT_SEED, n)]
    return "\n".join(lines) + "\n"


def stories(n: int) -> str:
    r = random.Random(STORY_SEED)
    return "\n\n".join(StoryWriter(r).story() for _ in range(n)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "examples" / "fleet_eval"), help="folder to write")
    ap.add_argument("--questions", type=int, default=16, help="questions per adapter set")
    ap.add_argument("--stories", type=int, default=12, help="stories in stories.txt")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in STYLES:
        (out / f"{name}.jsonl").write_text(style_set(name, args.questions), encoding="utf-8")
    (out / "stories.txt").write_text(stories(args.stories), encoding="utf-8")
    print(f"wrote {', '.join(f'{n}.jsonl' for n in STYLES)} ({args.questions} questions each) and stories.txt "
          f"({args.stories} stories) to {out}")


if __name__ == "__main__":
    main()
