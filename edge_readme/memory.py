"""Giving memory back: freeing a closed model's tensors and returning freed heap to the OS.

On CPU, PyTorch tensors live on the C heap; glibc keeps freed chunks for reuse, so the process
RSS stays high after a load transient (the float32 copies a loader makes) or after close() unless
the heap is trimmed. This module knows nothing about models beyond nn.Module.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc's malloc_trim); False where there is none."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    return bool(trim(0))


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
RELAXED_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (64-bit)


def _set_mmap_threshold(nbytes: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes)) if mallopt is not None else False


@contextlib.contextmanager
def bounded_heap(threshold: int = 1 << 20) -> Iterator[None]:
    """While loading: serve allocations of `threshold` bytes or more with mappings of their own,
    returned to the OS when freed (glibc's M_MMAP_THRESHOLD; process-wide).

    glibc's default threshold starts at 128 KiB and rises to the size of any mapped block that
    is freed: after a load's first big temporaries are freed, the next ones come from the heap and
    stay there, and the load's peak RSS climbs back towards a float32 copy of the model. The
    loader's chunk temporaries are kept under 1 MiB, so they reuse heap memory, and its outputs
    get mappings of their own. Afterwards the threshold is set to 32 MiB (the ceiling glibc's
    dynamic threshold reaches anyway): decode with 1 MiB left in force measured 3-5% slower
    (allocations of a MiB or more mapped and faulted afresh each step). No-op without glibc."""
    _set_mmap_threshold(threshold)
    try:
        yield
    finally:
        _set_mmap_threshold(RELAXED_THRESHOLD)


def release_tensors(*modules: nn.Module | None) -> None:
    """Free every parameter's and buffer's storage (each becomes an empty tensor of its dtype and
    device), so a closed model's memory comes back even while the objects are still referenced."""
    with torch.no_grad():
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            for sub in m.modules():  # quantized weights are plain attributes, not parameters
                for name, v in list(vars(sub).items()):
                    if hasattr(v, "dequantize"):
                        setattr(sub, name, None)
