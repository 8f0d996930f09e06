"""The built-in labelled prompt corpus: short code, chat/prose and docs prompts, written for
edge-readme, with a fixed train / held-out split (`data/prompts.jsonl`, one JSON object a line:
`{"domain", "split", "text"}`). It trains the TF-IDF routers and measures every router kind."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgeReadmeError

DOMAINS = ("code", "chat", "docs")
CORPUS = Path(__file__).with_name("data") / "prompts.jsonl"


def load_corpus(split: str | None = None, path: Path = CORPUS) -> list[tuple[str, str]]:
    """(text, domain) pairs of one split ("train" or "test"), or of both when split is None."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, domain, part = row["text"], row["domain"], row["split"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EdgeReadmeError(f"{path}:{n}: expected an object with text, domain and "
                                      f"split ({e}); fix the line") from None
            if domain not in DOMAINS or part not in ("train", "test"):
                raise EdgeReadmeError(f"{path}:{n}: domain {domain!r} / split {part!r}; expected "
                                      f"one of {DOMAINS} / train or test")
            if split is None or part == split:
                out.append((text, domain))
    return out
