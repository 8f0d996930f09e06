"""Typed errors a user can cause. Each message names the file or field, what was expected, and
what to do.

The CLI turns every `EdgeReadmeError` into a one-line message and exit code 2; the server into a
4xx body.
"""

from __future__ import annotations


class EdgeReadmeError(Exception):
    """Base class of every error caused by input (files, flags, requests), never by a bug."""


class ModelFormatError(EdgeReadmeError):
    """A model file or folder is missing, truncated, corrupt, or of an unsupported kind."""


class UnknownModelError(EdgeReadmeError):
    """A registry name that the model registry does not know."""


class DownloadError(EdgeReadmeError):
    """Fetching a registry model failed; nothing partial is left in the model store."""


class ExpertFileError(ModelFormatError):
    """An expert's bytes are missing, truncated, or fail their checksum. Names layer and expert."""

    def __init__(self, message: str, layer: int | None = None, expert: int | None = None):
        super().__init__(message)
        self.layer = layer
        self.expert = expert


class BudgetError(EdgeReadmeError):
    """A memory budget that cannot be parsed."""


class BudgetTooSmallError(BudgetError):
    """A memory budget below the minimum the model needs; the message states the minimum."""

    def __init__(self, message: str, minimum_bytes: int, budget_bytes: int):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.budget_bytes = budget_bytes


class CancelledError(EdgeReadmeError):
    """A request was cancelled by its caller (stream.cancel(), Ctrl-C, a client disconnect)."""


class QueueFullError(EdgeReadmeError):
    """Too many requests wait for a sequence slot; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(EdgeReadmeError):
    """A request field of the wrong type or out of its limits (prompt too long, bad max_tokens)."""


class DataError(EdgeReadmeError):
    """Calibration or evaluation data that is unreadable, empty or too small for what was asked."""
