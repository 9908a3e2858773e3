"""Distillation losses between the target's (p) and the drafter's (q) next-token distributions.

Every loss takes the drafter's logits (N, V) at N response positions and the teacher as `Teacher`: full logits, or
the stored top-k log-probabilities scattered into a dense distribution (renormalised over the k tokens; with
k = V this is exactly the full distribution). Losses are means over positions.

The acceptance metric with a top-k teacher is reported as a lower bound (`acceptance_lower_bound`): sum over the
stored tokens of min(p, q) with the stored, unrenormalised probabilities. The renormalised teacher can read 1.0
where the true acceptance is only the top-k mass; that value is kept under a name that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_EPS = -23.0  # log(1e-10): the log-probability given to tokens outside a top-k teacher


@dataclass
class Teacher:
    """The target's distribution at N positions: log p (N, V), with zeros of p allowed.

    From a stored top-k, `topk_ids` / `topk_logp` (N, k) keep the stored, unrenormalised log-probabilities (for the
    acceptance lower bound); `tokens` (N,) are the dataset's own next tokens where known (TVD++ on data tokens).
    """

    logp: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "Teacher":
        return cls(torch.log_softmax(logits.float(), -1))

    @classmethod
    def from_topk(cls, ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> "Teacher":
        """ids, logprobs: (N, k) -> dense log p over the vocabulary, renormalised over the k stored tokens."""
        lp = torch.log_softmax(logprobs.float(), -1)  # renormalise the k log-probs
        dense = torch.full((ids.shape[0], vocab), LOG_EPS, device=ids.device)
        return cls(dense.scatter(-1, ids.long(), lp), ids.long(), logprobs.float())

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


def tvdpp_exact(student_logits: torch.Tensor, t: Teacher, normalize: bool = True) -> torch.Tensor:
    """TVD's policy gradient with TVD++'s normalised reward, taken exactly over the vocabulary (no sampling).

    With r(x) = 1[p(x) > q(x)], grad TVD = -E_{x~q}[r(x) grad log q(x)] (see `tvdpp`). Here the expectation is
    summed exactly, with r normalised by its q-weighted batch mean and standard deviation:
        loss = -mean_t sum_x stopgrad(q_t(x) * r_hat_t(x)) * log q_t(x).
    Summed exactly, the baseline term vanishes (sum_x q grad log q = 0) and the gradient is TVD's divided by one
    scalar per batch, which AdamW mostly cancels: in effect a second TVD arm, kept to compare with the sampled
    estimator. Without normalisation (r_hat = -1/2 sign(q - p)) the gradient equals grad mean_t TVD_t exactly.
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


TVDPP_SAMPLES = 4  # tokens drawn from the drafter per position
MAX_IMPORTANCE_WEIGHT = 50.0  # TVD++ on data tokens: the largest q/p a token may weigh


def _data_token_p(t: Teacher, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p at the data's tokens x (N, 1) and whether it is known: from the stored top-k (unrenormalised) when the
    teacher is a top-k, else from the full distribution."""
    if t.topk_ids is None:
        return t.p.gather(-1, x), torch.ones_like(x, dtype=torch.float32)
    hit = t.topk_ids == x  # (N, k)
    known = hit.any(-1, keepdim=True).float()
    return (t.topk_logp.exp() * hit).sum(-1, keepdim=True), known


def tvdpp(student_logits: torch.Tensor, t: Teacher, samples: int = TVDPP_SAMPLES, source: str = "drafter"
          ) -> torch.Tensor:
    """TVD++ (Goel et al. 2024) as the paper's estimator: sampled tokens, a normalised reward, a policy gradient.

    Derivation. With q = q_theta, TVD(p, q) = 1/2 sum_x |q(x) - p(x)|, so
        grad TVD = 1/2 sum_x sign(q(x) - p(x)) grad q(x) = -E_{x~q}[ r(x) grad log q(x) ]
    with r(x) = 1[p(x) > q(x)], up to an affine map of r whose constant part vanishes because
    E_{x~q}[grad log q(x)] = grad sum_x q(x) = 0. Minimising TVD is maximising the expected reward r under the
    drafter's own distribution. The estimator draws `samples` tokens x ~ q_t at every position t (without gradient),
    scores them r = 1[p(x) > q(x)], normalises the rewards by the mean and standard deviation over the batch (the
    variance reduction of policy-gradient practice: the mean is a baseline, whose expected contribution is zero), and
    minimises
        loss = -mean_{t, s} r_hat(x_ts) log q_t(x_ts),
    whose expected gradient is grad TVD divided by the batch's reward standard deviation. Unlike `tvdpp_exact`, the
    baseline acts here: it is what reduces the variance of the sampled estimate.

    source="data" scores the dataset's own next tokens instead (the target's answers, x ~ p), importance-weighted
    by q(x)/p(x) so the expectation is still over q. It is exact when the data were sampled from p itself
    (temperature 1, no top-p); tokens sampled at another temperature make it an off-policy approximation. With a
    top-k teacher p(x) is the stored, unrenormalised probability, a token outside the stored top-k is left out
    (its p is unknown), and weights are capped at `MAX_IMPORTANCE_WEIGHT` (a bias traded for bounded variance).
    """
    logq = torch.log_softmax(student_logits.float(), -1)
    with torch.no_grad():
        q = logq.exp()
        if source == "data" and t.tokens is not None:
            x = t.tokens.long()[:, None]  # (N, 1)
            p_x, known = _data_token_p(t, x)
            weight = (q.gather(-1, x) / p_x.clamp_min(1e-12)).clamp_max(MAX_IMPORTANCE_WEIGHT) * known
        else:
            x = torch.multinomial(q, samples, replacement=True)  # (N, S)
            weight = torch.ones_like(x, dtype=q.dtype)
        r = (t.p.gather(-1, x) > q.gather(-1, x)).float()
        r_hat = (r - r.mean()) / r.std(unbiased=False).clamp_min(1e-6)
    return -(weight * r_hat * logq.gather(-1, x)).mean()


def expected_acceptance(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Mean over positions of sum_x min(p(x), q(x)) = 1 - TV(p, q): the chance speculative sampling accepts a draft.

    With a top-k teacher this uses the renormalised top-k, which overstates by up to 1 - (top-k mass) per position:
    report `acceptance_lower_bound` there."""
    q = torch.softmax(student_logits.float(), -1)
    return torch.minimum(t.p, q).sum(-1).mean()


def acceptance_lower_bound(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """A lower bound of the expected acceptance from a stored top-k: mean over positions of the sum over the stored
    tokens of min(p(x), q(x)), with the stored (unrenormalised) p. It never exceeds the truth (the tokens left out
    only add mass) and equals it when k = V. A teacher with the full distribution gives the exact value."""
    if t.topk_ids is None:
        return expected_acceptance(student_logits, t)
    q = torch.softmax(student_logits.float(), -1).gather(-1, t.topk_ids)
    return torch.minimum(t.topk_logp.exp(), q).sum(-1).mean()


def greedy_agreement(student_logits: torch.Tensor, t: Teacher) -> torch.Tensor:
    """Share of positions where the drafter's argmax is the target's: acceptance under greedy decoding."""
    return (student_logits.argmax(-1) == t.logp.argmax(-1)).float().mean()


LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd, "tvdpp": tvdpp, "tvdpp_exact": tvdpp_exact, "jsd": jsd}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss for pretraining: logits (N, V), targets (N,)."""
    return F.cross_entropy(logits.float(), targets)
