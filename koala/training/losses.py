"""Distillation losses between the target's (p) and the drafter's (q) next-token distributions.

Every loss takes the drafter's logits (N, V) at N response positions and the teacher as `Teacher`: full logits, or
the stored top-k log-probabilities scattered into a dense distribution (renormalised over the k tokens; with
k = V this is exactly the full distribution). Losses are means over positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_EPS = -23.0  # log(1e-10): the log-probability given to tokens outside a top-k teacher


@dataclass
class Teacher:
    """The target's distribution at N positions: log p (N, V), with zeros of p allowed."""

    logp: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "Teacher":
        return cls(torch.log_softmax(logits.float(), -1))

    @classmethod
    def from_topk(cls, ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> "Teacher":
        """ids, logprobs: (N, k) -> dense log p over the vocabulary, renormalised over the k stored tokens."""
        lp = torch.log_softmax(logprobs.float(), -1)  # renormalise the k log-probs
        dense = torch.full((ids.shape[0], vocab), LOG_EPS, device=ids.device)
        return cls(dense.scatter(-1, ids.long(), lp))

    @classmethod
    def from_topk_over(cls, ids: torch.Tensor, logprobs: torch.Tensor, vocab_ids: torch.Tensor,
                       vocab: int) -> tuple["Teacher", torch.Tensor]:
        """The stored top-k restricted to the tokens `vocab_ids` (K,) and renormalised there: (log p (M, K), keep (N,)).

        `keep` marks the positions whose top-k holds any of those tokens; the others have nothing to teach a drafter
        over that vocabulary and are left out (M = keep.sum()).
        """
        index = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
        index[vocab_ids] = torch.arange(len(vocab_ids), device=ids.device)
        sub = index[ids.long()]  # (N, k): place in the subset, -1 outside it
        keep = (sub >= 0).any(-1)
        sub = sub[keep]
        lp = torch.log_softmax(logprobs[keep].float().masked_fill(sub < 0, float("-inf")), -1)
        K = len(vocab_ids)
        dense = torch.full((sub.shape[0], K + 1), LOG_EPS, device=ids.device)  # column K collects the outsiders
        dense.scatter_(-1, torch.where(sub >= 0, sub, K), lp.clamp_min(LOG_EPS))
        return cls(torch.log_softmax(dense[:, :K], -1)), keep

    @property
    def p(self) -> torch.Tensor:
        return self.logp.exp()


def forward_kl(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """KL(p || q): mass-covering; the classic distillation loss."""
    logq = torch.log_softmax(student_logits.float(), -1)
    return (t.p * (t.logp - logq)).sum(-1).mean()


def reverse_kl(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """KL(q || p): mode-seeking."""
    logq = torch.log_softmax(student_logits.float(), -1)
    return (logq.exp() * (logq - t.logp)).sum(-1).mean()


def tvd(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Total variation distance 1/2 sum |p - q|: one minus the acceptance probability of speculative sampling."""
    q = torch.softmax(student_logits.float(), -1)
    return 0.5 * (t.p - q).abs().sum(-1).mean()


def jsd(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Jensen-Shannon divergence with equal weights."""
    logq = torch.log_softmax(student_logits.float(), -1)
    p, q = t.p, logq.exp()
    logm = torch.log((p + q) / 2 + 1e-30)
    return 0.5 * ((p * (t.logp - logm)).sum(-1) + (q * (logq - logm)).sum(-1)).mean()


def tvdpp(student_logits: torch.Tensor, t: Teacher, normalize: bool = True) -> torch.Tensor:
    """TVD++ (Goel et al. 2024): TVD's gradient as a policy gradient with a normalised per-token reward.

    Derivation. With q = q_theta, TVD(p, q) = 1/2 sum_x |q(x) - p(x)|, so
        grad TVD = 1/2 sum_x sign(q(x) - p(x)) grad q(x) = -E_{x~q}[ r(x) grad log q(x) ] (+ a term that is zero)
    where r(x) = 1[p(x) > q(x)] up to an affine map (sign(p - q) = 2 * 1[p > q] - 1, and the constant part
    vanishes because E_{x~q}[grad log q(x)] = grad sum_x q(x) = 0). Minimising TVD is therefore maximising the
    expected reward r under the drafter's own distribution: the drafter is rewarded for putting mass where the
    target has more than it. TVD++ normalises r as in policy-gradient practice: r_hat = (r - mu) / sigma with mu and
    sigma the mean and standard deviation of r over the batch (every position, tokens weighted by q), and takes the
    exact expectation over the vocabulary instead of sampling x:
        loss = -mean_t sum_x stopgrad(q_t(x) * r_hat_t(x)) * log q_t(x)
    whose gradient is -mean_t E_{x~q_t}[r_hat_t(x) grad log q_t(x)]. Without normalisation (r_hat = -1/2 sign(q - p))
    the gradient equals grad mean_t TVD_t exactly; the loss value itself is a surrogate (only its gradient matters),
    so `expected_acceptance` is what to watch.
    """
    logq = torch.log_softmax(student_logits.float(), -1)
    q = logq.exp()
    p = t.p
    if normalize:
        r = (p > q).float()
        w = q.detach() / q.shape[0]  # each position weighs 1, tokens by q
        mu = (w * r).sum()
        sigma = ((w * (r - mu) ** 2).sum()).sqrt().clamp_min(1e-6)
        r = (r - mu) / sigma
    else:
        r = -0.5 * torch.sign(q - p)
    return -((q * r).detach() * logq).sum(-1).mean()


def expected_acceptance(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Mean over positions of sum_x min(p(x), q(x)) = 1 - TV(p, q): the chance speculative sampling accepts a draft."""
    q = torch.softmax(student_logits.float(), -1)
    return torch.minimum(t.p, q).sum(-1).mean()


def greedy_agreement(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Share of positions where the drafter's argmax is the target's: acceptance under greedy decoding."""
    return (student_logits.argmax(-1) == t.logp.argmax(-1)).float().mean()


LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd, "tvdpp": tvdpp, "jsd": jsd}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss for pretraining: logits (N, V), targets (N,)."""
    return F.cross_entropy(logits.float(), targets)
