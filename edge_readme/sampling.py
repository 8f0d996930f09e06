"""Next-token choice: greedy at temperature 0, else temperature / top-k / top-p sampling with a
seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             "temperature", "a number in [0, 100]", self.temperature),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             "top_p", "a number in (0, 1]", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             "top_k", "an integer >= 0 (0 = off)", self.top_k),
            (self.seed is None or isinstance(self.seed, int), "seed", "an integer", self.seed),
        ]
        for ok, name, want, got in checks:
            if not ok or isinstance(got, bool):
                raise RequestError(f"{name}: expected {want}, got {got!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] -> token id."""
        if self.p.greedy:
            return int(torch.argmax(logits))
        x = logits.float() / self.p.temperature
        if self.p.top_k:
            kth = torch.topk(x, min(self.p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if self.p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.p.top_p  # always keeps the top one
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.gen))
