"""Giving memory back: freeing a closed model's tensors and returning freed heap to the OS.

On CPU, PyTorch tensors live on the C heap; glibc keeps freed chunks for reuse, so the process
RSS stays high after a load transient (the float32 copies a loader makes) or after close() unless
the heap is trimmed. This module knows nothing about models beyond nn.Module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
