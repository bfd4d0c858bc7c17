"""Two owners' chat data from the packaged chatterbot corpus: owner A has the tech-support conversations, owner B
the small talk, trivia and coding ones; each gets a training file and a held-out test file of conversations in the
`messages` format chat models use (a user turn, then the assistant's answer, alternating).

    python examples/llm/chat_data.py WORK_DIR [--train 64] [--test 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import yaml

OWNERS = {"a": lambda topic: topic == "tech_support", "b": lambda topic: topic != "tech_support"}


def conversations(owner: str) -> list[dict]:
    """Every conversation of the owner's topics, as alternating user / assistant messages."""
    root = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    rows = []
    for file in sorted(root.glob("*.yml")):
        if not OWNERS[owner](file.stem):
            continue
        for turns in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            turns = [str(t).strip() for t in turns if isinstance(t, str | int | float) and str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]  # every user turn answered
            if turns:
                roles = ["user", "assistant"] * (len(turns) // 2)
                rows.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=32)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for owner in OWNERS:
        rows = conversations(owner)
        random.Random(0).shuffle(rows)
        for split, part in (("train", rows[: args.train]), ("test", rows[args.train : args.train + args.test])):
            path = args.work / f"owner-{owner}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
            print(f"wrote {path} ({len(part)} conversations)")


if __name__ == "__main__":
    main()
