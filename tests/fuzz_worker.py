"""Loads hostile model files one after another under a memory cap; the fuzz tests drive it.

Run as `python tests/fuzz_worker.py LIMIT_MIB`. After its imports it caps its own address space
at (what it uses now + LIMIT_MIB) with RLIMIT_AS, then reads one JSON request a line from stdin:
{"kind": "model" | "manifest", "path": ...}, and answers one JSON line:
{"outcome": "ok" | "typed" | "bug", "detail": ...}. "typed" is an EdgeReadmeError; "bug" is any
other exception, MemoryError included. A hang is the parent's to catch (it times each answer).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
import warnings


def _vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _run(kind: str, path: str) -> None:
    from edge_readme.experts_format import read_manifest
    from edge_readme.loader import load_model
    from edge_readme.tokenizer import Tokenizer

    if kind == "manifest":
        read_manifest(path)
        return
    loaded = load_model(path)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    ids = tok.encode("hello there, 12 bytes ü", add_bos=True)
    if any(not 0 <= i < loaded.config.vocab_size for i in ids):
        raise AssertionError(f"token id outside the vocabulary: {ids}")
    tok.decode(ids)
    if tok.chat_template:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    if os.environ.get("EDGE_README_FUZZ_ENGINE", "1") == "1":  # the runtime on top, one token
        from edge_readme import Engine

        with Engine.load(path, device="cpu", context_length=32) as engine:
            engine.generate("hi", max_tokens=1)


def main() -> None:
    import torch  # noqa: F401  (imported before the cap: the cap bounds what a case adds)

    import edge_readme.engine  # noqa: F401
    import edge_readme.experts_format  # noqa: F401
    import edge_readme.loader  # noqa: F401
    import edge_readme.tokenizer  # noqa: F401
    from edge_readme.errors import EdgeReadmeError

    limit = int(sys.argv[1]) << 20
    cap = _vm_size() + limit
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            _run(req["kind"], req["path"])
            out = {"outcome": "ok", "detail": ""}
        except EdgeReadmeError as e:
            out = {"outcome": "typed", "detail": f"{type(e).__name__}: {e}"}
        except BaseException as e:  # noqa: BLE001 - every other escape is the bug we look for
            out = {"outcome": "bug",
                   "detail": "".join(traceback.format_exception(type(e), e, e.__traceback__))}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
