"""The chat question sets: well-formed, sourced, separate, and their answer patterns mean what
they say; the loader's errors name file, line and field."""

import json
from pathlib import Path

import pytest

from edge_readme.errors import DataError
from edge_readme.refactor.chatset import _loops, load_chat_set, score

HELDOUT = Path(__file__).parent.parent / "benchmarks" / "chat_set" / "heldout.jsonl"

# a right and a wrong reply for the patterns most likely to be too loose or too strict
EXAMPLES = {
    "fact-sky": ("Sunlight is scattered by air molecules (Rayleigh scattering).",
                 "The sky is blue because it is a natural color."),
    "code-add": ("```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b): pass"),
    "code-loop": ("for i in range(0, 3, 1):\n    print(i)", "for i in range(1, 3): print(i)"),
    "inst-yes": ("Yes.", "Sure, yes."),
    "inst-colors": ("Red, yellow and blue.", "Red, green and blue."),
    "inst-backwards": ("tac", "The word cat backwards is act."),
    "math-2p2": ("2 + 2 = 4", "2 + 2 = 42"),
    "h-square": ("def square(x):\n    return x ** 2", "def square(x):\n    return x"),
    "h-no": ("No", "I cannot say no."),
    "h-gold": ("The symbol for gold is Au.", "Gold's symbol is Ag... actually it is gold."),
}


def test_builtin_set_is_40_sourced_questions_in_four_categories():
    qs = load_chat_set()
    assert len(qs) == 40
    cats = {q.category for q in qs}
    assert cats == {"factual", "arithmetic", "coding", "instruction"}
    assert all(sum(q.category == c for q in qs) >= 8 for c in cats)
    assert all(len(q.source) > 5 for q in qs)


def test_heldout_set_is_separate():
    main, held = load_chat_set(), load_chat_set(HELDOUT)
    assert len(held) >= 20
    assert not {q.prompt for q in main} & {q.prompt for q in held}
    assert not {q.id for q in main} & {q.id for q in held}


def test_answer_patterns_accept_right_and_reject_wrong_replies():
    qs = {q.id: q for q in load_chat_set() + load_chat_set(HELDOUT)}
    for qid, (right, wrong) in EXAMPLES.items():
        assert qs[qid].check(right), (qid, right)
        assert not qs[qid].check(wrong), (qid, wrong)


@pytest.mark.parametrize("line, match", [
    ("not json", r":1: not JSON"),
    ('["a"]', "expected an object"),
    ('{"id": "a", "category": "c", "prompt": "p", "answer": "x"}', "'source'"),
    ('{"id": "a", "category": "c", "prompt": "", "answer": "x", "source": "s"}', "'prompt'"),
    ('{"id": "a", "category": "c", "prompt": "p", "answer": "[", "source": "s"}',
     "not a valid regular expression"),
])
def test_bad_sets_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "set.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_chat_set(f)
    assert "set.jsonl" in str(e.value)


def test_duplicate_ids_missing_and_empty_files(tmp_path):
    row = json.dumps({"id": "a", "category": "c", "prompt": "p", "answer": "x", "source": "s"})
    f = tmp_path / "dup.jsonl"
    f.write_text(row + "\n" + row + "\n")
    with pytest.raises(DataError, match="dup.jsonl:2: id 'a' appears twice"):
        load_chat_set(f)
    with pytest.raises(DataError, match="cannot read"):
        load_chat_set(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_chat_set(tmp_path / "empty.jsonl")


def test_score_counts_by_category_and_loops():
    rows = [{"category": "a", "correct": True, "reply": "Paris."},
            {"category": "a", "correct": False, "reply": "1. rivers: " * 6},
            {"category": "b", "correct": True, "reply": "4"}]
    s = score(rows)
    assert (s["correct"], s["total"], s["loops"]) == (2, 3, 1)
    assert s["by_category"] == {"a": "1/2", "b": "1/1"}
    assert not _loops("one two three four five six seven")
