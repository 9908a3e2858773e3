"""Token distributions and draws, identical for the target and every drafter (gpt-fast's `logits_to_probs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from koala.errors import KoalaError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy: the distribution is one-hot on the argmax
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise KoalaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KoalaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise KoalaError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after top-k, temperature and top-p.

    Greedy decoding is the limit temperature -> 0: a one-hot distribution. Feeding one-hot distributions to the
    rejection rule turns it into exact-match acceptance, so one code path serves both.
    """
    logits = logits.float()
    if params.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Draw one token per row of (..., V) without a host sync: argmax(p / E) with E ~ Exp(1) is a draw from p."""
    if greedy:
        return probs.argmax(-1)  # one-hot rows: the draw is the argmax, no random numbers needed
    e = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / e).argmax(-1)


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator], greedy: bool = False) -> torch.Tensor:
    """One token per row of (B, V), row b drawn with its own generator (a sample reproducible on its own, whatever
    batch it was generated in): an inverse-CDF draw from one uniform per row."""
    if greedy:
        return probs.argmax(-1)
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])[:, None]  # (B, 1)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_max(probs.shape[-1] - 1)
