"""Token distributions and draws, identical for the target and every drafter (gpt-fast's `logits_to_probs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from koala.errors import KoalaError


MIN_TEMPERATURE = 1e-6  # a positive temperature below this is greedy in all but name: refused, 0 says greedy


def check_temperature(t: float) -> None:
    """0 (greedy) or at least MIN_TEMPERATURE; a denormal one would overflow the logits it divides."""
    if not t >= 0:  # also NaN
        raise KoalaError(f"temperature must be >= 0, got {t}: use 0 for greedy decoding or a positive temperature")
    if 0 < t < MIN_TEMPERATURE:
        raise KoalaError(f"temperature {t} is below {MIN_TEMPERATURE}: use 0 for greedy decoding, or a temperature "
                         f">= {MIN_TEMPERATURE}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy: the distribution is one-hot on the argmax
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        check_temperature(self.temperature)
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
    # shifted so the largest logit is 0 before dividing: no overflow at any temperature
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / params.temperature, dim=-1)
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


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """x * m mod 2**32 for int64 x < 2**32, in two 16-bit halves of m so no product overflows int64."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' lowbias32) on int64 tensors holding values < 2**32."""
    x = (x ^ (x >> 16)) & _M32
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) for each (seed, counter) pair of int64 tensors: a counter-based generator, so row b's
    draw number t depends on its own seed and t only, whatever batch or device it is computed in, with no generator
    state to carry and no host sync (it runs inside a compiled step or a CUDA graph)."""
    x = _hash32((seed & _M32) ^ _hash32((counter + 0x9E3779B9) & _M32))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 random bits: every float32 in [0, 1) step 2**-24


def sample_seeded(probs: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, greedy: bool = False
                  ) -> torch.Tensor:
    """One token per row of (B, V) by inverse CDF from counter_uniform(seed, counter) (both (B,) int64): a row's
    draws do not depend on the batch it is in."""
    if greedy:
        return probs.argmax(-1)
    cdf = probs.cumsum(-1)
    u = counter_uniform(seed, counter)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)  # never a p = 0 token
