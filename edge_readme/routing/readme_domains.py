"""A prompt classifier from a Read-ME router: its per-token expert scores over the prompt.

In a Read-ME refactoring expert i is calibration domain i (`moe.domains` in config.json), so the
router's softmax, averaged over the prompt's tokens (and layers, for per-layer routing), is a
distribution over domains. Each Read-ME domain is mapped to a routing label (code, chat, docs);
the label with the most mass wins. This module knows the router and the tokenizer of one model,
never the models it routes to.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import EdgeReadmeError

# Read-ME calibration domains -> routing labels (unknown domains count as chat/prose)
DOMAIN_LABELS = {"code": "code", "conversation": "chat", "literature": "chat", "prose": "chat",
                 "chat": "chat", "docs": "docs", "legal": "docs", "wiki": "docs"}
MAX_TOKENS = 256  # the head of a long prompt is enough to classify it


class ReadmeDomainRouter:
    kind = "readme"

    def __init__(self, router, encode, domains: Sequence[str], labels: Sequence[str],
                 domain_labels: Mapping[str, str] | None = None):
        """router: an `edge_readme.router.Router`; encode: text -> token ids of its model."""
        if not domains or len(domains) != router.num_experts:
            raise EdgeReadmeError(
                f"route kind 'readme': the model's router has {router.num_experts} experts but "
                f"config.json names {len(domains)} domains (moe.domains); use a Read-ME build "
                "that records its calibration domains, or another route kind")
        table = {**DOMAIN_LABELS, **(domain_labels or {})}
        self.labels = sorted(set(labels))
        self.router, self.encode, self.domains = router, encode, list(domains)
        m = np.zeros((len(domains), len(self.labels)), np.float32)  # [E, labels]
        for i, d in enumerate(domains):
            lab = table.get(d, "chat")
            m[i, self.labels.index(lab if lab in self.labels else self.labels[0])] = 1
        self.to_labels = torch.from_numpy(m)

    def domain_distribution(self, text: str) -> torch.Tensor:
        """Mean router softmax over the prompt's tokens: [E], summing to 1."""
        ids = self.encode(text)[:MAX_TOKENS] or [0]
        dev = self.router.norm.device
        with torch.inference_mode():
            logits = self.router(torch.tensor(ids, device=dev))  # [T, E] or [T, L, E]
            p = torch.softmax(logits.float(), dim=-1)
            return p.reshape(-1, p.shape[-1]).mean(0).cpu()

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([(self.domain_distribution(t) @ self.to_labels).numpy() for t in texts])

    def predict(self, text: str) -> str:
        return self.labels[int(np.argmax(self.scores([text])[0]))]


def from_model(path, labels: Sequence[str], domain_labels: Mapping[str, str] | None = None,
               device: str = "cpu") -> ReadmeDomainRouter:
    """Build from a Read-ME model folder on disk: only its router and tokenizer are loaded."""
    from ..loader import load_model
    from ..router import Router
    from ..tokenizer import Tokenizer

    loaded = load_model(path)
    c = loaded.config
    if c.moe is None:
        raise EdgeReadmeError(f"route kind 'readme': {path} is a dense model with no router; "
                              "name a Read-ME (-readme) model for routing")
    router = Router.from_tensors(c.moe.router, c.moe.num_experts, c.num_layers, c.moe.routing,
                                 {k: v for k, v in loaded.tensors.items()
                                  if k.startswith("router.")}, device)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    return ReadmeDomainRouter(router, tok.encode, c.moe.domains, labels, domain_labels)
