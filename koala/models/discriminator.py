"""KOALA's discriminator (Zhang, Zhao, Chen 2024): an MLP that tells the target's top-k log-probability profiles from
a drafter's. koala.training.adversarial trains it against the drafter."""

from __future__ import annotations

import torch
import torch.nn as nn

PROFILE_K = 16  # tokens per profile


class Discriminator(nn.Module):
    """MLP: a (N, k) profile -> (N,) logit that it came from the target."""

    def __init__(self, k: int = PROFILE_K, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        return self.net(profile.float()).squeeze(-1)
