"""The chunked soft cross-entropy through a frozen head equals the plain one, value and gradient."""

import pytest
import torch

from koala.training import chunked_ce
from koala.training.chunked_ce import linear_soft_cross_entropy


def _plain(s, t, rows, weights, w, temperature=1.0):
    z = t[rows] @ w.T
    p = torch.softmax(z / temperature, -1) if temperature else torch.nn.functional.one_hot(z.argmax(-1), w.shape[0])
    return -(weights[:, None] * p * torch.log_softmax(s @ w.T, -1)).sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_equals_the_plain_loss_across_chunks(monkeypatch, temperature):
    """At any teacher temperature: 0.5 sharpens the target's distribution, 0 is the hard cross-entropy on its top
    token."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 3 * 40)  # 3 rows a chunk: several chunks and a ragged end
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 16, generator=g)  # (K, C) a frozen head
    t = torch.randn(7, 16, generator=g)  # the target's features
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6])  # a later draft taught by rows 2..6 of the first
    weights = torch.rand(12, generator=g)
    s1 = torch.randn(12, 16, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    a = linear_soft_cross_entropy(s1, t, rows, weights, w, temperature)
    b = _plain(s2, t, rows, weights, w, temperature)
    (a * 2.5).backward()
    (b * 2.5).backward()
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-5)


def test_under_bf16_autocast_it_stays_close_to_float32():
    g = torch.Generator().manual_seed(1)
    w, t = torch.randn(64, 32, generator=g) * 0.2, torch.randn(10, 32, generator=g)
    s = torch.randn(10, 32, generator=g, requires_grad=True)
    weights = torch.full((10,), 0.1)
    ref = linear_soft_cross_entropy(s, t, torch.arange(10), weights, w)
    with torch.autocast("cpu", torch.bfloat16):
        low = linear_soft_cross_entropy(s, t, torch.arange(10), weights, w)
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.02 * abs(ref.item())
