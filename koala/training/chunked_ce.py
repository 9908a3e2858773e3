"""Soft-label cross-entropy through a frozen LM head, in chunks of rows: the heads' distillation loss without ever
holding an (N, K) tensor.

The heads' loss is -sum_r w_r sum_k p_r[k] log q_r[k], where q_r = softmax(W s_r) is the head's distribution over
the (draft) vocabulary of K tokens and p_r = softmax(W t_r) the target's, both read through the target's frozen LM
head W (K, C). Written plainly it builds the teacher's logits, probabilities, the student's logits, log-probabilities
and their gradients, each an (N, K) float32 tensor of tens of MB that streams through memory several times: on a CPU
that traffic, not the GEMMs, bounds the step. Here each chunk of rows goes through both GEMMs, the softmaxes and the
gradient (w_r (q_r - p_r)) W while it is in cache, and the backward only scales the gradient kept from the forward
(W is frozen: no gradient for it). The GEMMs run in the autocast dtype when autocast is on (bf16 on AMX), the
softmaxes in float32. Liger-Kernel's fused linear cross-entropy does the same on GPUs.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (rows x K): 16 MB of float32, 512 rows at K = 8192


class _LinearSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, t_rows, weights, w_compute, temperature):
        loss = torch.zeros((), dtype=torch.float32, device=s.device)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        rows = max(1, CHUNK_ELEMENTS // w_compute.shape[0])
        for a in range(0, s.shape[0], rows):
            b = min(a + rows, s.shape[0])
            sc = s[a:b].to(w_compute.dtype)
            logq = torch.log_softmax((sc @ w_compute.T).float(), -1)  # (n, K)
            tc = t[t_rows[a:b]].to(w_compute.dtype)
            p = teacher_probs((tc @ w_compute.T).float(), temperature)  # (n, K) the target's distribution
            w = weights[a:b, None]
            loss = loss - (w * p * logq).sum()
            if grad is not None:
                dz = (logq.exp_().sub_(p)).mul_(w)  # d loss / d logits = w (q - p)
                grad[a:b] = (dz.to(w_compute.dtype) @ w_compute).to(s.dtype)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None, None, None


def teacher_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T); T = 0: one-hot on each row's top logit."""
    if temperature == 0:
        return torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(z if temperature == 1 else z / temperature, -1)


def linear_soft_cross_entropy(s: torch.Tensor, t: torch.Tensor, t_rows: torch.Tensor, weights: torch.Tensor,
                              w_head: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """sum_r weights[r] * CE(softmax(W t[t_rows[r]] / T), softmax(W s[r])) for a frozen head W (K, C).

    Args:
        s: (N, C) the heads' features (the gradient flows to them).
        t: (M, C) the target's features; t_rows (N,) long: the row of t each row of s is taught by.
        weights: (N,) float32 per-row weights (a draft's weight over its row count gives its mean).
        w_head: (K, C) the frozen LM head, already restricted to the draft vocabulary.
        temperature: the teacher's; below 1 it sharpens, 0 puts all its mass on the target's top token.
    """
    dev = s.device.type
    w_compute = w_head
    if torch.is_autocast_enabled(dev) and w_head.dtype != torch.get_autocast_dtype(dev):
        w_compute = w_head.to(torch.get_autocast_dtype(dev))
    with torch.autocast(dev, enabled=False):
        return _LinearSoftCE.apply(s, t.detach(), t_rows, weights, w_compute, float(temperature))
