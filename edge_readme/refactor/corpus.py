"""Labelled calibration text for the dense -> MoE refactoring: one domain becomes one expert.

The builtin corpus ships inside the package (`data/calibration.jsonl.gz`, built by
`tools/build_corpus.py`, sources in `data/SOURCES.md`); users may bring their own files instead.
This module only reads, splits and tokenizes text. It knows nothing of models or activations:
the tokenizer arrives as a plain `encode` callable.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_readme.errors import DataError

__all__ = [
    "Document",
    "SPLITS",
    "by_domain",
    "domains",
    "load_builtin",
    "load_user_data",
    "split_text",
    "token_batches",
]

SPLITS = ("train", "heldout")
BUILTIN_RESOURCE = "calibration.jsonl.gz"
MAX_DOC_CHARS = 2000
HELDOUT_EVERY = 5  # documents without a split: every fifth one of a domain is held out (80/20)


@dataclass(frozen=True)
class Document:
    domain: str
    text: str
    split: str
    source: str


def load_builtin(split: str | None = None) -> list[Document]:
    """The shipped corpus, in file order; `split` keeps only "train" or "heldout" documents."""
    _check_split_arg(split)
    ref = resources.files("edge_readme.refactor").joinpath("data", BUILTIN_RESOURCE)
    try:
        raw = ref.read_bytes()
    except OSError as exc:
        raise DataError(
            f"builtin calibration corpus {BUILTIN_RESOURCE} is missing from the installed package "
            f"({exc}); reinstall edge-readme or rebuild it with tools/build_corpus.py"
        ) from exc
    docs: list[Document] = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        rec = json.loads(line)
        docs.append(Document(rec["domain"], rec["text"], rec["split"], rec["source"]))
    return [d for d in docs if split is None or d.split == split]


def load_user_data(paths: Sequence[str | Path]) -> list[Document]:
    """Documents from user files: a `.jsonl` file holds records with `text` and `domain` (and an
    optional `split`); any other file is plain UTF-8 text forming one domain named by its stem.

    Documents that carry no split get a deterministic 80/20 train/heldout split within their domain.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no calibration files given; pass at least one .txt or .jsonl file")
    unsplit: list[tuple[str, str, str | None]] = []  # (domain, text, split or None), in order
    sources: list[str] = []
    for p in paths:
        path = Path(p)
        text = _read_text(path)
        if path.suffix.lower() == ".jsonl":
            records = _parse_jsonl(path, text)
        else:
            records = _parse_plain(path, text)
        unsplit.extend(records)
        sources.extend([str(path)] * len(records))
    if not any(t.strip() for _, t, _ in unsplit):
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"calibration data has no text at all (files: {names}); add text to them")
    return _assign_splits(unsplit, sources)


def domains(docs: Iterable[Document]) -> list[str]:
    return sorted({d.domain for d in docs})


def by_domain(docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Documents grouped by domain, keys sorted, each list in its input order."""
    groups: dict[str, list[Document]] = {}
    for d in docs:
        groups.setdefault(d.domain, []).append(d)
    return {k: groups[k] for k in sorted(groups)}


def token_batches(
    docs: Iterable[Document],
    tokenizer_encode: Callable[[str], list[int]],
    seq_len: int,
    max_sequences: int,
) -> list[list[int]]:
    """Token sequences of exactly `seq_len` cut from each domain's documents joined by "\\n\\n".

    Domains come in sorted order, each contributing at most `max_sequences` sequences taken from
    the start of its text; a trailing partial sequence is dropped. Pass one domain's documents to
    get that domain's batches alone.
    """
    if seq_len < 1 or max_sequences < 1:
        raise ValueError(f"seq_len and max_sequences must be >= 1, got {seq_len}, {max_sequences}")
    groups = by_domain(docs)
    if not groups:
        raise DataError("no documents to tokenize; load a corpus with at least one domain first")
    out: list[list[int]] = []
    for name, group in groups.items():
        ids = list(tokenizer_encode("\n\n".join(d.text for d in group)))
        if len(ids) < seq_len:
            raise DataError(
                f"domain {name!r} has {len(ids)} tokens but one sequence needs {seq_len}; "
                f"add text to this domain or lower the sequence length"
            )
        n = min(max_sequences, len(ids) // seq_len)
        out.extend(ids[i * seq_len : (i + 1) * seq_len] for i in range(n))
    return out


def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into documents of at most `max_chars`, at blank lines where possible, else at
    line ends, else anywhere. Paragraphs are packed greedily and rejoined with a blank line."""
    pieces: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n").rstrip()
        if not para.strip():
            continue
        pieces.extend(_cut_long(para, max_chars))
    docs: list[str] = []
    cur = ""
    for piece in pieces:
        if cur and len(cur) + 2 + len(piece) > max_chars:
            docs.append(cur)
            cur = piece
        else:
            cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        docs.append(cur)
    return docs


def _cut_long(para: str, max_chars: int) -> list[str]:
    if len(para) <= max_chars:
        return [para]
    out: list[str] = []
    cur = ""
    for line in para.split("\n"):
        while len(line) > max_chars:  # one line longer than a document: cut it anywhere
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur.strip():
        out.append(cur)
    return out


def _check_split_arg(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: calibration file not found; check the path") from None
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read calibration file ({exc.strerror}); check the path and permissions"
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def _parse_plain(path: Path, text: str) -> list[tuple[str, str, str | None]]:
    domain = path.stem
    if not text.strip():
        raise DataError(f"{path}: domain {domain!r} has no text; add text or drop the file")
    return [(domain, doc, None) for doc in split_text(text)]


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, str, str | None]]:
    records: list[tuple[str, str, str | None]] = []
    domain_chars: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); expected one "
                f'object per line like {{"domain": "code", "text": "..."}}'
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(rec).__name__}")
        for field in ("text", "domain"):
            if field not in rec:
                raise DataError(f"{where}: missing field {field!r}; every record needs a string "
                                f"'text' and a string 'domain'")
            if not isinstance(rec[field], str):
                raise DataError(f"{where}: field {field!r} must be a string, found "
                                f"{type(rec[field]).__name__}; fix the record")
        if not rec["domain"].strip():
            raise DataError(f"{where}: field 'domain' is empty; name the record's domain")
        split = rec.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: field 'split' must be 'train' or 'heldout', found "
                            f"{split!r}; fix it or leave the field out")
        domain_chars[rec["domain"]] = domain_chars.get(rec["domain"], 0) + len(rec["text"].strip())
        if rec["text"].strip():
            records.append((rec["domain"], rec["text"], split))
    if not domain_chars:
        raise DataError(f"{path}: no records; expected one JSON object per line with "
                        f"'text' and 'domain' fields")
    for name, chars in domain_chars.items():
        if chars == 0:
            raise DataError(f"{path}: domain {name!r} has no text (all its records have an "
                            f"empty 'text'); add text or drop its records")
    return records


def _assign_splits(
    records: list[tuple[str, str, str | None]], sources: list[str]
) -> list[Document]:
    seen: dict[str, int] = {}  # per domain: documents without a split so far
    docs: list[Document] = []
    for (domain, text, split), source in zip(records, sources):
        if split is None:
            k = seen.get(domain, 0)
            seen[domain] = k + 1
            split = "heldout" if k % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
        docs.append(Document(domain, text, split, source))
    return docs
