"""Atomic file writes: a temporary file beside the target, fsync, then rename over it.

An interrupted write leaves either the old file or the new one, never half of one. Temporaries
carry their writer's PID, so a later run removes only those whose writer is dead
(`remove_orphans`), never a live writer's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None],
                 mode: str = "w") -> None:
    """Call write(file) on a temp file beside `path` (opened with `mode`), then publish it."""
    path = Path(path)
    remove_orphans(path.parent, f".{path.name}.")  # a killed writer's temporary of this file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is not what users expect
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphans(folder: Path, prefix: str) -> list[Path]:
    """Remove `folder/{prefix}{PID}...` files or folders whose writer PID is dead; return them.

    A live writer's temporaries are left alone, so concurrent runs never delete each other's.
    """
    removed = []
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:\D|$)")
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            m = pattern.match(p.name)
            if m is None or pid_alive(int(m.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed
