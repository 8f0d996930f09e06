"""edge-readme: run Read-ME mixture-of-experts LLMs under a hard memory budget."""

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
