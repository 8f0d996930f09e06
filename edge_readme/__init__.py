"""edge-readme: run Read-ME mixture-of-experts LLMs under a hard memory budget."""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # OpenMP threads that spin while they wait cost a 10x slower decode on a busy 2-core
    # machine (measured: q8 SmolLM2 2.4 -> 23.9 tok/s); they must sleep. libgomp reads this once,
    # when torch loads it, so it is set before the first torch import. OMP_WAIT_POLICY wins.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine import Chunk, Engine, Result, Stream
from .errors import (
    BudgetError,
    BudgetTooSmallError,
    CancelledError,
    DownloadError,
    EdgeReadmeError,
    ExpertFileError,
    ModelFormatError,
    RequestError,
    UnknownModelError,
)

__version__ = "0.1.0"
__all__ = [
    "BudgetError",
    "BudgetTooSmallError",
    "CancelledError",
    "Chunk",
    "DownloadError",
    "EdgeReadmeError",
    "Engine",
    "ExpertFileError",
    "ModelFormatError",
    "RequestError",
    "Result",
    "Stream",
    "UnknownModelError",
]
