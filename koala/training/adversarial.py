"""KOALA's adversarial term (Zhang, Zhao, Chen 2024): a discriminator tells the target's outputs from the drafter's.

The discriminator is an MLP over *top-k log-probability profiles*: at each position, the log-probabilities that each
distribution gives to the same k tokens, the k most likely under the mixture (p + q) / 2, in token-id order. Read
at the target's own top-k in the target's order, the real profile would be sorted by construction and the
discriminator could win by spotting any inversion (a label leak); chosen from the mixture and ordered by token id,
two identical distributions give identical profiles. The target's own profile is "real",
the drafter's (independent drafter, Medusa head or EAGLE head alike) is "fake", so one module serves every drafter
kind and works from stored top-k teachers without the target in memory. Updates alternate: a discriminator step on
detached profiles, then the drafter adds lambda times the non-saturating generator loss -log D(fake). Under DDP the
discriminator's gradients are averaged over ranks, so every rank keeps one and the same discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.models.discriminator import PROFILE_K, Discriminator
from koala.training.losses import LOG_EPS

COLLAPSE_STEPS = 50  # consecutive steps at ~0% or ~100% accuracy that count as a collapse


class Adversary:
    """The discriminator, its optimizer, the lambda warm-up and the collapse guard."""

    def __init__(self, cfg: TrainingConfig, device, k: int = PROFILE_K):
        self.cfg, self.k = cfg, k
        self.disc = Discriminator(k).to(device)
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.extreme_steps = 0

    def state_dict(self) -> dict:
        """Everything a resume needs to continue bitwise: weights, optimizer, collapse counter."""
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict(), "extreme_steps": self.extreme_steps}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
        self.extreme_steps = int(state["extreme_steps"])

    def profiles(self, target_logp: torch.Tensor, drafter_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) log-probs of both -> (N, k) profiles (real, fake) at the k most likely tokens of the mixture, in
        token-id order: both read at the same tokens, in an order that does not tell which is real."""
        with torch.no_grad():
            mixture = torch.logaddexp(target_logp, drafter_logp.detach())
            # only tokens the teacher knows: outside a stored top-k its log p is a constant filler, not a profile
            mixture = mixture.masked_fill(target_logp <= LOG_EPS + 1e-3, float("-inf"))
            idx = mixture.topk(min(self.k, mixture.shape[-1]), dim=-1).indices.sort(-1).values
        return target_logp.gather(-1, idx).clamp_min(-30), drafter_logp.gather(-1, idx).clamp_min(-30)

    def lam(self, step: int) -> float:
        return 0.0 if step < self.cfg.adv_warmup_steps else self.cfg.adv_lambda

    def step(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """One discriminator update, then the drafter's adversarial loss (already weighted by lambda).

        Raises:
            KoalaError: the discriminator has been always right or always wrong for COLLAPSE_STEPS steps.
        """
        d_real, d_fake = self.disc(real.detach()), self.disc(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        _average_over_ranks(self.disc)
        self.opt.step()
        with torch.no_grad():  # averaged over ranks: every rank sees one accuracy, so the guard stops all or none
            acc = _mean_over_ranks(0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())).item()
        self._guard(acc, step)
        for p in self.disc.parameters():
            p.requires_grad_(False)
        g = self.disc(fake)
        g_loss = F.binary_cross_entropy_with_logits(g, torch.ones_like(g))  # non-saturating: -log D(fake)
        for p in self.disc.parameters():
            p.requires_grad_(True)
        lam = self.lam(step)
        return lam * g_loss, {"disc_loss": d_loss.item(), "disc_accuracy": acc, "adv_loss": g_loss.item(),
                              "adv_lambda": lam}

    def _guard(self, acc: float, step: int) -> None:
        self.extreme_steps = self.extreme_steps + 1 if (acc >= 0.995 or acc <= 0.005) else 0
        if self.extreme_steps >= COLLAPSE_STEPS and step >= self.cfg.adv_warmup_steps:
            raise KoalaError(
                f"the discriminator collapsed at step {step + 1} (accuracy {acc:.3f} for {self.extreme_steps} steps): "
                "lower training.adv_lambda or the learning rate, or train without --adversarial"
            )


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the DDP ranks, in place (unchanged when not distributed); returns x."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _average_over_ranks(module: torch.nn.Module) -> None:
    """Under DDP, the gradients averaged over ranks: the discriminators of all ranks take the same step and stay one
    (they start equal: seeded by training.seed)."""
    for p in module.parameters():
        if p.grad is not None:
            _mean_over_ranks(p.grad)
