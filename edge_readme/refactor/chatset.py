"""The chat question set: short factual, arithmetic, coding and instruction prompts with answers
checked by regular expression, asked through the chat template and answered greedily.

A set is JSONL, one object a line: `id`, `category`, `prompt`, `answer` (a Python regular
expression, searched case-insensitively in the reply) and `source` (where the answer can be
checked). The built-in set (40 prompts) is `edge_readme/refactor/data/chat_set.jsonl`; a second,
held-out set of similar prompts, used only for final checks, is `benchmarks/chat_set/heldout.jsonl`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from edge_readme.errors import DataError

FIELDS = ("id", "category", "prompt", "answer", "source")
MAX_TOKENS = 64  # enough for every expected answer; short replies keep a run to minutes


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    prompt: str
    answer: re.Pattern
    source: str

    def check(self, reply: str) -> bool:
        return self.answer.search(reply.strip()) is not None


def builtin_path() -> Path:
    return Path(str(resources.files("edge_readme.refactor") / "data" / "chat_set.jsonl"))


def load_chat_set(path: str | Path | None = None) -> list[Question]:
    """Read and check a question set (default: the built-in one); errors name file and line."""
    path = Path(path) if path is not None else builtin_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the question set ({exc.strerror}); give a JSONL "
                        "file of {id, category, prompt, answer, source} objects") from None
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg}); each line must be one object") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}")
        for f in FIELDS:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise DataError(f"{where}: field {f!r} must be a non-empty string; "
                                f"got {row.get(f)!r}")
        if row["id"] in seen:
            raise DataError(f"{where}: id {row['id']!r} appears twice; ids must be unique")
        seen.add(row["id"])
        try:
            pattern = re.compile(row["answer"], re.IGNORECASE)
        except re.error as exc:
            raise DataError(f"{where}: field 'answer' is not a valid regular expression "
                            f"({exc}); fix the pattern") from None
        out.append(Question(row["id"], row["category"], row["prompt"], pattern, row["source"]))
    if not out:
        raise DataError(f"{path}: the question set is empty; add at least one question")
    return out


def ask(engine, questions: list[Question], max_tokens: int = MAX_TOKENS,
        progress: bool = True, desc: str = "questions", **sampling: Any) -> list[dict[str, Any]]:
    """Each question in a fresh one-turn chat; greedy unless `sampling` says otherwise."""
    sampling = {"temperature": 0.0, **sampling}
    rows = []
    for q in tqdm(questions, desc=desc, unit="q", disable=not progress):
        r = engine.chat([{"role": "user", "content": q.prompt}], max_tokens=max_tokens,
                        **sampling)
        rows.append({"id": q.id, "category": q.category, "reply": r.text,
                     "correct": q.check(r.text), "tokens": len(r.token_ids),
                     "finish_reason": r.finish_reason})
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    cats: dict[str, list[int]] = {}
    for r in rows:
        c = cats.setdefault(r["category"], [0, 0])
        c[0] += int(r["correct"])
        c[1] += 1
    correct = sum(int(r["correct"]) for r in rows)
    return {"correct": correct, "total": len(rows), "accuracy": correct / len(rows),
            "by_category": {k: f"{a}/{b}" for k, (a, b) in sorted(cats.items())},
            "loops": sum(_loops(r["reply"]) for r in rows)}


def _loops(text: str, n: int = 4) -> bool:
    """Whether a reply repeats some 4-word run three times (a decoding loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= 3 for g in set(grams))


def chat_eval(model, reference=None, path=None, max_tokens: int = MAX_TOKENS,
              progress: bool = True, device: str = "cpu", **sampling: Any) -> dict[str, Any]:
    """Accuracy of MODEL (and of the dense `reference`) on a question set, side by side."""
    from edge_readme.engine import Engine

    questions = load_chat_set(path)
    report: dict[str, Any] = {"set": str(path or builtin_path()), "max_tokens": max_tokens,
                              "sampling": {"temperature": 0.0, **sampling}}
    answers = {}
    for role, name in (("moe", model), ("dense", reference)):
        if name is None:
            continue
        with Engine.load(name, device=device) as engine:
            answers[role] = ask(engine, questions, max_tokens, progress, desc=role, **sampling)
        report[role] = score(answers[role])
    if "dense" in report:
        d = report["dense"]["correct"]
        report["relative"] = report["moe"]["correct"] / d if d else None
    report["items"] = [{"id": q.id, "prompt": q.prompt,
                        **{f"{role}_correct": answers[role][i]["correct"] for role in answers},
                        **{f"{role}_reply": answers[role][i]["reply"] for role in answers}}
                       for i, q in enumerate(questions)]
    return report
