"""Background loading of experts ahead of use."""

from edge_readme.prefetch.prefetcher import Prefetcher

__all__ = ["Prefetcher"]
