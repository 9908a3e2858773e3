import pytest
import torch

from koala.training.losses import LOSSES, Teacher, expected_acceptance, tvd, tvdpp

V = 40


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(6, V) * 2, torch.randn(6, V) * 2


@pytest.mark.parametrize("name", LOSSES)
def test_zero_when_equal_and_nonnegative(name, logits):
    s, t = logits
    loss = LOSSES[name]
    if name != "tvdpp":  # a policy-gradient surrogate: only its gradient is meaningful
        assert loss(t.clone(), Teacher.from_logits(t)).abs() < 1e-5
        assert loss(s, Teacher.from_logits(t)) > 0
    s = s.clone().requires_grad_(True)
    loss(s, Teacher.from_logits(t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_tvdpp_gradient_is_zero_at_the_optimum(logits):
    _, t = logits
    s = t.clone().requires_grad_(True)
    tvdpp(s, Teacher.from_logits(t), normalize=False).backward()
    assert s.grad.abs().max() < 1e-6


def test_tvdpp_without_normalisation_has_tvd_gradient(logits):
    s, t = logits
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    tvd(a, Teacher.from_logits(t)).backward()
    tvdpp(b, Teacher.from_logits(t), normalize=False).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_tvdpp_descends_tvd(logits):
    s, t = logits
    s = s.clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=0.05)
    teacher = Teacher.from_logits(t)
    before = tvd(s, teacher).item()
    for _ in range(150):
        opt.zero_grad()
        tvdpp(s, teacher).backward()
        opt.step()
    assert tvd(s, teacher).item() < 0.2 * before


@pytest.mark.parametrize("name", LOSSES)
def test_topk_with_full_vocabulary_equals_full(name, logits):
    s, t = logits
    lp = torch.log_softmax(t, -1)
    top = lp.topk(V, dim=-1)
    full = LOSSES[name](s, Teacher.from_logits(t))
    sparse = LOSSES[name](s, Teacher.from_topk(top.indices, top.values, V))
    assert torch.allclose(full, sparse, atol=1e-5)


def test_expected_acceptance_is_one_minus_tvd(logits):
    s, t = logits
    teacher = Teacher.from_logits(t)
    assert torch.allclose(expected_acceptance(s, teacher), 1 - tvd(s, teacher), atol=1e-6)
    assert torch.allclose(expected_acceptance(t, teacher), torch.tensor(1.0), atol=1e-5)
