"""The expert cache: file store, eviction policies, and preallocated device slots."""

from edge_readme.cache.expert_cache import CacheStats, ExpertCache, ExpertWeights
from edge_readme.cache.policies import (
    POLICIES,
    Lookahead,
    Policy,
    SimResult,
    UnknownPolicyError,
    make_policy,
    simulate,
)
from edge_readme.cache.store import ExpertStore, aligned_empty

__all__ = [
    "POLICIES",
    "CacheStats",
    "ExpertCache",
    "ExpertStore",
    "ExpertWeights",
    "Lookahead",
    "Policy",
    "SimResult",
    "UnknownPolicyError",
    "aligned_empty",
    "make_policy",
    "simulate",
]
