"""ExpertStore: one positioned read per expert from experts.safetensors into a caller's buffer.

It knows offsets and checksums, not slots, devices or policies. Reads use pread (no shared file
offset), so any number of threads may read at once. `cold=True` keeps expert bytes out of the OS
page cache (O_DIRECT, else fadvise DONTNEED), so benchmarks measure the disk, not RAM.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import torch

from edge_readme.errors import ExpertFileError
from edge_readme.experts_format import (
    ALIGNMENT,
    ExpertEntry,
    ExpertManifest,
    align_up,
    read_manifest,
)


def aligned_empty(
    nbytes: int, alignment: int = ALIGNMENT, pin_memory: bool = False
) -> torch.Tensor:
    """A uint8 host tensor of nbytes whose first byte sits on an `alignment` boundary."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -raw.data_ptr() % alignment
    return raw[skip:skip + nbytes]


def _open_direct(path: str) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None  # filesystems such as tmpfs refuse O_DIRECT


class ExpertStore:
    """Reads expert bytes by (layer, expert). Counters: reads, bytes_read, read_seconds."""

    def __init__(self, manifest: ExpertManifest, *, verify: bool = False, cold: bool = False):
        self.manifest = manifest
        self.verify = verify
        self.cold = cold
        self.reads = 0
        self.bytes_read = 0
        self.read_seconds = 0.0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._direct_fd: int | None = None
        self._fd = os.open(manifest.path, os.O_RDONLY)
        if cold:
            self._direct_fd = _open_direct(str(manifest.path))

    @classmethod
    def open(cls, folder: str | os.PathLike, **kwargs) -> ExpertStore:
        return cls(read_manifest(folder), **kwargs)

    @property
    def mode(self) -> str:
        """'cached' (page cache), 'direct' (O_DIRECT) or 'fadvise' (dropped after each read)."""
        if not self.cold:
            return "cached"
        return "direct" if self._direct_fd is not None else "fadvise"

    @staticmethod
    def buffer_bytes(manifest: ExpertManifest) -> int:
        """Buffer size that lets every expert take the O_DIRECT path (aligned-up length)."""
        return align_up(manifest.max_length)

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Fill out[:length] with the expert's bytes; return length. out: uint8, contiguous, CPU."""
        entry = self.manifest.entry(layer, expert)
        self._check_buffer(entry, out)
        start = time.perf_counter()
        try:
            got = self._pread(entry, out)
        except OSError as e:  # EIO from a failing disk, ESTALE on NFS...: typed, names the expert
            raise ExpertFileError(
                f"{self.manifest.path}: layer {layer} expert {expert}: read failed at offset "
                f"{entry.offset} ({e.strerror or e}); check the disk, or re-download the model",
                layer, expert,
            ) from e
        elapsed = time.perf_counter() - start
        if got < entry.length:
            raise ExpertFileError(
                f"{self.manifest.path}: layer {layer} expert {expert}: short read at offset "
                f"{entry.offset}: expected {entry.length} bytes, got {got}; the file was "
                "truncated or replaced: re-run the refactor or re-download",
                layer, expert,
            )
        if self.verify:
            self._check_sha(entry, out)
        with self._lock:
            self.reads += 1
            self.bytes_read += entry.length
            self.read_seconds += elapsed
        return entry.length

    def read(self, layer: int, expert: int) -> torch.Tensor:
        """Allocating convenience read: [3, rows, D] in the file dtype (tools and tests only)."""
        entry = self.manifest.entry(layer, expert)
        buf = aligned_empty(align_up(entry.length))
        n = self.read_into(layer, expert, buf)
        rows, hidden = entry.rows, self.manifest.hidden_size
        return buf[:n].view(self.manifest.dtype).view(3, rows, hidden).clone()

    def _check_buffer(self, entry: ExpertEntry, out: torch.Tensor) -> None:
        ok = out.dtype == torch.uint8 and out.device.type == "cpu" and out.is_contiguous()
        if not ok or out.numel() < entry.length:
            raise ValueError(
                f"read_into layer {entry.layer} expert {entry.expert}: expected a contiguous CPU "
                f"uint8 buffer of >= {entry.length} bytes, found {out.dtype} {out.device} "
                f"{out.numel()} bytes"
            )

    def _pread(self, entry: ExpertEntry, out: torch.Tensor) -> int:
        if self._fd is None:
            raise ValueError(f"{self.manifest.path}: ExpertStore is closed")
        aligned = align_up(entry.length)
        fits = out.numel() >= aligned and out.data_ptr() % ALIGNMENT == 0
        if self._direct_fd is not None and fits:
            return min(self._pread_all(self._direct_fd, out[:aligned], entry.offset), entry.length)
        got = self._pread_all(self._fd, out[:entry.length], entry.offset)
        if self.cold:
            os.posix_fadvise(self._fd, entry.offset, entry.length, os.POSIX_FADV_DONTNEED)
        return got

    @staticmethod
    def _pread_all(fd: int, out: torch.Tensor, offset: int) -> int:
        """Positioned read into out; one syscall unless the kernel returns a partial read."""
        view = memoryview(out.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def _check_sha(self, entry: ExpertEntry, out: torch.Tensor) -> None:
        digest = hashlib.sha256(memoryview(out[:entry.length].numpy())).hexdigest()
        if digest != entry.sha256:
            raise ExpertFileError(
                f"{self.manifest.path}: layer {entry.layer} expert {entry.expert}: sha256 "
                f"mismatch: expected {entry.sha256}, got {digest}; the file is corrupt: "
                "re-run the refactor or re-download",
                entry.layer, entry.expert,
            )

    def drop_page_cache(self) -> None:
        """Ask the OS to drop the whole file from the page cache (for cold-start benchmarks)."""
        if self._fd is not None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for name in ("_fd", "_direct_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
