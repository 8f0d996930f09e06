"""A fast, strict GGUF reader: metadata, tensor infos and memory-mapped tensor bytes.

The `gguf` package's reader builds a numpy view per metadata item and takes ~8 s on a 49k-token
vocabulary; this one parses the header with `struct` in ~0.1 s, checks every size against the
file, and leaves dequantization to `gguf.quants`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError
from .validate import check_regular, is_int

MAGIC = b"GGUF"
MAX_ARRAY_DEPTH = 4  # metadata arrays of arrays: real files use one level
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value types: id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


DEQUANT_BYTES = 256 << 10  # float32 bytes dequantized at a time: the gguf package's numpy
# temporaries stay below the 1 MiB mmap threshold of a load (memory.bounded_heap)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    qtype: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"unknown type {self.qtype}"


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelFormatError(
                f"{self.path}: GGUF file is truncated or corrupt (header needs byte {self.pos + n},"
                f" the file has {len(self.buf)}). Download it again (`edge-readme pull NAME`) "
                "or re-export it.")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            if depth >= MAX_ARRAY_DEPTH:
                raise ModelFormatError(f"{self.path}: GGUF metadata array at byte {self.pos} is "
                                       f"nested deeper than {MAX_ARRAY_DEPTH}; the file is corrupt")
            itype, count = self.scalar("I"), self.scalar("Q")
            # each item takes at least this many bytes: refuse counts the file cannot hold
            least = np.dtype(_NUMPY[itype]).itemsize if itype in _NUMPY else 8 if itype == 8 else 12
            if count * least > len(self.buf) - self.pos:
                self.take(count * least)  # raises the truncation error
            if itype in _NUMPY:
                size = np.dtype(_NUMPY[itype]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_NUMPY[itype]).tolist()
            return [self.value(itype, depth + 1) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: GGUF metadata value type {vtype} at byte "
                               f"{self.pos} is unknown; the file is corrupt or from a newer GGUF")


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if check_regular(self.path, "GGUF file") < 24:
            raise ModelFormatError(f"{self.path}: GGUF file is truncated (shorter than its "
                                   "24-byte header); download it again")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.scalar("I")
        if self.version not in (2, 3):
            raise ModelFormatError(f"{self.path}: GGUF version {self.version}; supported: 2, 3")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ModelFormatError(f"{self.path}: GGUF header counts are implausible "
                                   f"({n_tensors} tensors, {n_kv} keys); the file is corrupt")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.fields:
                raise ModelFormatError(f"{self.path}: GGUF metadata key {key!r} appears twice; "
                                       "the file is corrupt")
            self.fields[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"{self.path}: tensor {name!r}: expected 1..{MAX_DIMS} "
                                       f"dimensions, found {n_dims}; the file is corrupt")
            dims = tuple(cur.scalar("Q") for _ in range(n_dims))
            infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        if len({i[0] for i in infos}) != len(infos):
            raise ModelFormatError(f"{self.path}: a tensor name appears twice; the file is corrupt")
        align = self.fields.get("general.alignment", 32)
        if not is_int(align) or align < 1 or align & (align - 1) or align > 1 << 20:
            raise ModelFormatError(f"{self.path}: field 'general.alignment': expected a power of "
                                   f"two up to 2^20, found {align!r}; the file is corrupt")
        data_start = -(-cur.pos // align) * align
        misaligned = next((n for n, _, _, off in infos if off % align), None)
        if misaligned is not None:
            raise ModelFormatError(f"{self.path}: tensor {misaligned!r} starts off the file's "
                                   f"{align}-byte alignment; the file is corrupt")
        self.tensors = [self._info(n, d, t, data_start + off) for n, d, t, off in infos]

    def _info(self, name: str, dims: tuple[int, ...], qtype: int, offset: int) -> TensorInfo:
        import gguf

        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelFormatError(f"{self.path}: tensor {name} has unknown type id {qtype}; "
                                   "re-export the model with a common type") from None
        numel = 1
        for d in dims:
            numel *= d
        if not all(dims) or dims[0] % block or numel > len(self._mm) * 8:
            raise ModelFormatError(f"{self.path}: tensor {name}: shape {list(dims)} is not a "
                                   f"whole number of {block}-value blocks per row, or is empty or "
                                   "larger than the file; the file is corrupt")
        nbytes = numel // block * size
        if offset + nbytes > len(self._mm):
            raise ModelFormatError(
                f"{self.path}: GGUF file is truncated or corrupt: tensor {name} needs bytes "
                f"{offset}..{offset + nbytes}, the file has {len(self._mm)}. Download it again.")
        return TensorInfo(name, dims, qtype, offset, nbytes)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as the gguf package expects them: [rows, bytes per row]."""
        import gguf

        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        data = self._mm[t.offset:t.offset + t.nbytes]
        qt = gguf.GGMLQuantizationType(t.qtype)
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if qt == gguf.GGMLQuantizationType.F32 else np.float16
            return data.view(dt).reshape(*reversed(t.shape))
        return data.reshape(rows, t.nbytes // rows)

    def dequantize(self, t: TensorInfo, start: int | None = None,
                   stop: int | None = None) -> np.ndarray:
        """float32 array in row-major (numpy) order: GGUF's shape reversed. start, stop: only
        those rows of a matrix, as [rows, columns]."""
        import gguf

        qt = gguf.GGMLQuantizationType(t.qtype)
        raw = self.raw(t)
        if raw.ndim != 2 or raw.dtype != np.uint8:  # F32 / F16: a view of the file
            arr = np.asarray(raw, dtype=np.float32)
            if start is None:
                return arr.reshape(*reversed(t.shape))
            return arr.reshape(-1, t.shape[0])[start:stop]
        rows = raw if start is None else raw[start:stop]
        cols = t.shape[0]
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        step = max(1, DEQUANT_BYTES // (4 * cols))
        for r in range(0, rows.shape[0], step):  # by rows: its temporaries stay small
            out[r:r + step] = gguf.quants.dequantize(rows[r:r + step], qt).reshape(-1, cols)
        return out if start is not None else out.reshape(*reversed(t.shape))
