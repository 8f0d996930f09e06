"""Lookup tables left in the model file: an embedding row is read when a token needs it.

A token embedding (when the output head is a separate matrix) and the router's embedding are only
ever indexed by token id, one row per token. Held in memory they are the largest dense weights of a
model with a big vocabulary (Qwen2.5's 151,936 rows: 130 MiB as int8 for the 0.5B, against 25 MiB
for all its attention), yet a step touches a handful of rows. `RowFile` says where a matrix's rows
lie in a GGUF or safetensors file and reads the asked rows with `os.pread` on a descriptor of its
own: no mapping of the whole file stays in the process, and readahead is off (`POSIX_FADV_RANDOM`),
so the page cache holds only the pages of rows that were read.

`FileRows` (in `quant`) turns the rows into exactly what the in-memory table would give, so the
choice between the two never changes an answer.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: upper half of a float32
HEADER_LIMIT = 100 << 20  # safetensors' own ceiling on a header


@dataclass
class RowFile:
    """Rows of a [rows, cols] matrix at `offset` in `path`, `row_nbytes` apart, encoded as `kind`:
    "F32", "F16", "BF16" or "gguf:<type id>" (a GGUF block type, rows of whole blocks)."""

    path: Path
    offset: int
    row_nbytes: int
    shape: tuple[int, int]
    kind: str
    _fd: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fd = fd
            return self._fd

    def read(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), cols]; neighbouring ids are read with one call."""
        fd, cols = self._open(), self.shape[1]
        out = np.empty((len(ids), cols), dtype=np.float32)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        i = 0
        while i < len(order):  # runs of consecutive row numbers: one pread each
            j = i + 1
            while j < len(order) and ids[order[j]] - ids[order[j - 1]] <= 1:
                j += 1
            lo, hi = ids[order[i]], ids[order[j - 1]] + 1
            if lo < 0 or hi > self.shape[0]:
                raise IndexError(f"row {lo if lo < 0 else hi - 1} of a {self.shape[0]}-row table")
            n = (hi - lo) * self.row_nbytes
            buf = os.pread(fd, n, self.offset + lo * self.row_nbytes)
            if len(buf) != n:
                raise ModelFormatError(f"{self.path}: truncated while reading rows {lo}..{hi} "
                                       f"(got {len(buf)} of {n} bytes); the file changed after "
                                       "the model was loaded: download or rebuild it")
            block = self._decode(buf, hi - lo)
            for k in order[i:j]:
                out[k] = block[ids[k] - lo]
            i = j
        return out

    def _decode(self, buf: bytes, rows: int) -> np.ndarray:
        cols = self.shape[1]
        if self.kind.startswith("gguf:"):
            import gguf

            qt = gguf.GGMLQuantizationType(int(self.kind[5:]))
            raw = np.frombuffer(buf, dtype=np.uint8).reshape(rows, self.row_nbytes)
            if qt == gguf.GGMLQuantizationType.F32:
                return raw.view(np.float32)
            if qt == gguf.GGMLQuantizationType.F16:
                return raw.view(np.float16).astype(np.float32)
            return gguf.quants.dequantize(raw, qt).reshape(rows, cols)
        if self.kind == "BF16":
            half = np.frombuffer(buf, dtype=np.uint16).reshape(rows, cols)
            return (half.astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(buf, dtype=_FLOATS[self.kind]).reshape(rows, cols).astype(np.float32)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def safetensors_rows(path: Path) -> dict[str, RowFile]:
    """Every 2-D float tensor of a safetensors file, as a `RowFile` (the header is re-read here:
    `safe_open` does not tell where a tensor lies)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_LIMIT:
            return {}
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return {}
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        dtype, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _FLOATS or not isinstance(shape, list) or len(shape) != 2 \
                or not isinstance(span, list) or len(span) != 2:
            continue
        item = 4 if dtype == "F32" else 2
        if span[1] - span[0] != shape[0] * shape[1] * item:
            continue  # safe_open refuses such a file before this is asked
        out[name] = RowFile(path, 8 + n + span[0], shape[1] * item, (shape[0], shape[1]), dtype)
    return out
