"""Next-token choice: greedy at temperature 0, else temperature / top-k / top-p sampling with a
seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RequestError

# What the sampler can take: below MIN_TEMPERATURE, logits / temperature overflows float32 (use 0
# for greedy); seeds are what torch.Generator.manual_seed accepts.
MIN_TEMPERATURE = 1e-6
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.temperature, (int, float)) and (
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100),
             "temperature", f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, 100]",
             self.temperature),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             "top_p", "a number in (0, 1]", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             "top_k", "an integer >= 0 (0 = off)", self.top_k),
            (self.seed is None or isinstance(self.seed, int)
             and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             "seed", f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", self.seed),
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
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.p.top_p
            keep[0] = True  # the top token stays, however small top_p (1e-300 is 0 in float32)
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.gen))
