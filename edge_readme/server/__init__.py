"""The local OpenAI-compatible server (optional extra: `pip install 'edge-readme[serve]'`).

Importing this package does not import Starlette or uvicorn; `create_app` and `serve` do.
"""

from .app import (
           EngineHolder,
           ServeExtraMissing,
           create_app,
           default_model_name,
           serve,
           serve_loading,
)
from .protocol import APIError, Limits

__all__ = ["APIError", "EngineHolder", "Limits", "ServeExtraMissing", "create_app",
           "default_model_name", "serve", "serve_loading"]
