"""The calibration corpus: the shipped domains, user files, hostile inputs, token batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_readme.errors import DataError
from edge_readme.refactor.corpus import (
    Document,
    by_domain,
    domains,
    load_builtin,
    load_user_data,
    split_text,
    token_batches,
)

BUILTIN_DOMAINS = {"code", "docs", "legal", "literature", "conversation"}


def byte_encode(s: str) -> list[int]:
    return list(s.encode())


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- builtin corpus ---------------------------------------------------------------------------


def test_builtin_has_five_domains_with_train_and_heldout_text():
    docs = load_builtin()
    assert set(domains(docs)) >= BUILTIN_DOMAINS
    for name, group in by_domain(docs).items():
        train = sum(len(d.text) for d in group if d.split == "train")
        held = sum(len(d.text) for d in group if d.split == "heldout")
        assert train >= 50_000, name
        assert held >= 10_000, name
        assert 0.1 < held / (train + held) < 0.3, name
        assert all(300 <= len(d.text) <= 2000 and d.source for d in group), name


def test_builtin_split_filter_and_disjoint_splits():
    train, held = load_builtin("train"), load_builtin("heldout")
    assert {d.split for d in train} == {"train"} and {d.split for d in held} == {"heldout"}
    assert len(train) + len(held) == len(load_builtin())
    assert not {d.text for d in train} & {d.text for d in held}
    assert load_builtin() == load_builtin()  # deterministic order
    with pytest.raises(ValueError, match="split must be one of"):
        load_builtin("test")


def test_builtin_file_is_small():
    path = Path(__file__).parent.parent / "edge_readme/refactor/data/calibration.jsonl.gz"
    assert path.stat().st_size <= 1_500_000


# --- user data --------------------------------------------------------------------------------


def test_plain_text_file_is_one_domain_split_80_20(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * 80 for i in range(50)]
    path = tmp_path / "recipes.txt"
    path.write_text("\n\n".join(paras), encoding="utf-8")
    docs = load_user_data([path])
    assert domains(docs) == ["recipes"]
    assert all(len(d.text) <= 2000 and d.source == str(path) for d in docs)
    held = [d for d in docs if d.split == "heldout"]
    assert len(held) == len(docs) // 5
    assert docs == load_user_data([str(path)])  # deterministic
    assert "".join(d.text for d in docs).replace("\n", "") == "".join(p.strip() for p in paras)


def test_jsonl_file_with_and_without_split(tmp_path):
    recs = [{"domain": "math", "text": f"sum {i}"} for i in range(10)]
    recs += [{"domain": "law", "text": "statute", "split": "heldout"},
             {"domain": "law", "text": "contract", "split": "train", "extra": 1}]
    docs = load_user_data([write_jsonl(tmp_path / "mixed.jsonl", recs)])
    groups = by_domain(docs)
    assert list(groups) == ["law", "math"]
    assert [d.split for d in groups["law"]] == ["heldout", "train"]
    assert [d.split for d in groups["math"]].count("heldout") == 2
    assert groups["math"][4].split == "heldout" and groups["math"][0].split == "train"


def test_several_files_combine(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("alpha text", encoding="utf-8")
    b = write_jsonl(tmp_path / "b.jsonl", [{"domain": "beta", "text": "beta text"}])
    docs = load_user_data([a, b])
    assert domains(docs) == ["a", "beta"]
    assert docs[0] == Document("a", "alpha text", "train", str(a))


def test_split_text_cuts_long_lines_and_paragraphs():
    docs = split_text("x" * 4500 + "\n\n" + "short", max_chars=2000)
    assert [len(d) for d in docs] == [2000, 2000, 500 + 2 + 5]


# --- hostile inputs ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: calibration file not found"):
        load_user_data([tmp_path / "nope.txt"])


def test_unreadable_path(tmp_path):
    with pytest.raises(DataError, match=r"cannot read calibration file"):
        load_user_data([tmp_path])  # a directory


def test_no_paths():
    with pytest.raises(DataError, match="no calibration files given"):
        load_user_data([])


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"first line\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt: line 2: not UTF-8.*re-save .* UTF-8"):
        load_user_data([path])


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"domain": "a", "text": "ok"}\n{"domain": "a", "text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: malformed JSON.*expected one object"):
        load_user_data([path])


def test_json_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [["a", "b"]])
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, found list"):
        load_user_data([path])


@pytest.mark.parametrize("field", ["text", "domain"])
def test_missing_field(tmp_path, field):
    rec = {"domain": "a", "text": "t"}
    del rec[field]
    path = write_jsonl(tmp_path / "m.jsonl", [{"domain": "a", "text": "ok"}, rec])
    with pytest.raises(DataError, match=rf"m\.jsonl: line 2: missing field '{field}'"):
        load_user_data([path])


@pytest.mark.parametrize("field", ["text", "domain"])
def test_wrong_field_type(tmp_path, field):
    rec = {"domain": "a", "text": "t", field: 3}
    path = write_jsonl(tmp_path / "w.jsonl", [rec])
    with pytest.raises(DataError, match=rf"line 1: field '{field}' must be a string, found int"):
        load_user_data([path])


def test_bad_split_value(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"domain": "a", "text": "t", "split": "test"}])
    with pytest.raises(DataError, match=r"line 1: field 'split' must be 'train' or 'heldout'"):
        load_user_data([path])


def test_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_user_data([path])


def test_empty_text_file_is_a_domain_with_no_text(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(DataError, match=r"poems\.txt: domain 'poems' has no text"):
        load_user_data([path])


def test_jsonl_domain_with_no_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": "a", "text": "fine"},
                                              {"domain": "b", "text": "   "}])
    with pytest.raises(DataError, match=r"d\.jsonl: domain 'b' has no text"):
        load_user_data([path])


# --- token batches ----------------------------------------------------------------------------


def docs_of(domain: str, *texts: str) -> list[Document]:
    return [Document(domain, t, "train", "test") for t in texts]


def test_token_batches_joins_documents_and_cuts_exact_sequences():
    docs = docs_of("a", "abcd", "efgh")  # "abcd\n\nefgh" = 10 bytes
    batches = token_batches(docs, byte_encode, seq_len=4, max_sequences=10)
    assert batches == [list(b"abcd"), list(b"\n\nef")]  # the partial "gh" is dropped
    assert token_batches(docs, byte_encode, seq_len=4, max_sequences=1) == [list(b"abcd")]


def test_token_batches_per_domain_sorted_and_capped():
    docs = docs_of("z", "z" * 9) + docs_of("a", "a" * 9)
    batches = token_batches(docs, byte_encode, seq_len=3, max_sequences=2)
    assert batches == [list(b"aaa")] * 2 + [list(b"zzz")] * 2
    assert all(len(b) == 64 for b in token_batches(load_builtin("heldout"), byte_encode, 64, 3))
    assert len(token_batches(load_builtin("heldout"), byte_encode, 64, 3)) == 3 * 5


def test_token_batches_domain_too_small():
    docs = docs_of("big", "x" * 100) + docs_of("tiny", "abc")
    with pytest.raises(DataError, match=r"domain 'tiny' has 3 tokens but one sequence needs 16"):
        token_batches(docs, byte_encode, seq_len=16, max_sequences=4)


def test_token_batches_no_documents_and_bad_args():
    with pytest.raises(DataError, match="no documents to tokenize"):
        token_batches([], byte_encode, seq_len=4, max_sequences=1)
    with pytest.raises(ValueError, match="seq_len and max_sequences must be >= 1"):
        token_batches(docs_of("a", "abc"), byte_encode, seq_len=0, max_sequences=1)
