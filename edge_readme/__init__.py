"""edge-readme: run Read-ME mixture-of-experts LLMs under a hard memory budget."""

from .threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads libgomp; see threads.py

from .engine import Chunk, Engine, Result, Stream  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError,
    BudgetTooSmallError,
    CancelledError,
    DownloadError,
    EdgeReadmeError,
    ExpertFileError,
    ModelFormatError,
    QueueFullError,
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
    "QueueFullError",
    "RequestError",
    "Result",
    "Stream",
    "UnknownModelError",
]
