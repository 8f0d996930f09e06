"""Coverage-guided fuzzing of the model readers with atheris (manual; not collected by pytest).

    pip install 'edge-readme[fuzz]'
    python tests/fuzz_atheris.py gguf -max_total_time=600 -rss_limit_mb=2048 -timeout=10
    python tests/fuzz_atheris.py config -max_total_time=600 -rss_limit_mb=2048 -timeout=10
    python tests/fuzz_atheris.py manifest -max_total_time=600 -rss_limit_mb=2048 -timeout=10

The input is the whole file (a GGUF, a config.json, an experts.json), seeded with the tiny
fixtures' real files. The invariant is the CI fuzz tests' one (tests/test_fuzz.py): a load, or an
EdgeReadmeError; anything else is a crash that atheris saves as `crash-*` for a regression test.
libFuzzer's -rss_limit_mb and -timeout give the memory and time bounds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401  (imported uninstrumented: coverage is wanted in edge_readme only)

with atheris.instrument_imports(include=["edge_readme"]):
    from edge_readme.errors import EdgeReadmeError
    from edge_readme.experts_format import read_manifest
    from edge_readme.loader import load_model
    from edge_readme.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf, write_moe  # noqa

WORK = Path(tempfile.mkdtemp(prefix="edge-readme-atheris-"))


def _seed(kind: str) -> tuple[Path, str]:
    """(folder holding the real files, the file the fuzzer replaces)."""
    c = tiny_config(layers=1)
    if kind == "gguf":
        write_gguf(WORK / "m.gguf", c, tiny_tensors(c))
        return WORK, "m.gguf"
    if kind == "config":
        return write_hf(WORK / "hf", c, tiny_tensors(c)), "config.json"
    return write_moe(WORK / "moe", num_experts=2, layers=1), "experts.json"


def main() -> None:
    kind = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "gguf"
    base, name = _seed(kind)
    corpus = WORK / f"corpus-{kind}"
    corpus.mkdir()
    shutil.copy(base / name, corpus / name)
    case = WORK / "case"
    shutil.copytree(base, case, dirs_exist_ok=True)

    def one_input(data: bytes) -> None:
        (case / name).write_bytes(data)
        try:
            if kind == "manifest":
                read_manifest(case)
                return
            loaded = load_model(case / name if kind == "gguf" else case)
            Tokenizer(loaded.tokenizer, loaded.chat_template).encode("hello")
        except EdgeReadmeError:
            pass

    atheris.Setup(sys.argv + [str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
