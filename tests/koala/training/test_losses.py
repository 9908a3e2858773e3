import pytest
import torch

from koala.training.losses import LOSSES, Teacher, acceptance_lower_bound, expected_acceptance, tvd, tvdpp, tvdpp_exact

V = 40


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(6, V) * 2, torch.randn(6, V) * 2


@pytest.mark.parametrize("name", LOSSES)
def test_zero_when_equal_and_nonnegative(name, logits):
    s, t = logits
    loss = LOSSES[name]
    if not name.startswith("tvdpp"):  # policy-gradient surrogates: only their gradients are meaningful
        assert loss(t.clone(), Teacher.from_logits(t)).abs() < 1e-5
        assert loss(s, Teacher.from_logits(t)) > 0
    s = s.clone().requires_grad_(True)
    loss(s, Teacher.from_logits(t)).backward()
    # sampled TVD++ may draw only tokens that all score the same reward: then it has no signal, and no gradient
    assert torch.isfinite(s.grad).all() and (s.grad.abs().sum() > 0 or name == "tvdpp")


def test_tvdpp_exact_gradient_is_zero_at_the_optimum(logits):
    _, t = logits
    s = t.clone().requires_grad_(True)
    tvdpp_exact(s, Teacher.from_logits(t), normalize=False).backward()
    assert s.grad.abs().max() < 1e-6


def test_tvdpp_exact_without_normalisation_has_tvd_gradient(logits):
    s, t = logits
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    tvd(a, Teacher.from_logits(t)).backward()
    tvdpp_exact(b, Teacher.from_logits(t), normalize=False).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize("loss,steps,kept", [(tvdpp_exact, 150, 0.2), (tvdpp, 400, 0.5)])
def test_tvdpp_descends_tvd(logits, loss, steps, kept):
    """Both descend TVD; the sampled estimator more slowly: a draw from q where p is small scores no reward."""
    torch.manual_seed(1)
    s, t = logits
    s = s.clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=0.05)
    teacher = Teacher.from_logits(t)
    before = tvd(s, teacher).item()
    for _ in range(steps):
        opt.zero_grad()
        loss(s, teacher).backward()
        opt.step()
    assert tvd(s, teacher).item() < kept * before


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


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("source", ["drafter", "data"])
def test_sampled_tvdpp_gradient_points_along_tvds_on_a_toy_distribution(source):
    """The sampled estimator's expected gradient is TVD's up to a positive scale: averaged over many draws, its
    direction matches the exact TVD gradient (drafter tokens; or the data's tokens x ~ p, importance-weighted)."""
    torch.manual_seed(0)
    V, N = 8, 20000
    s0, t0 = torch.randn(1, V), torch.randn(1, V) * 2
    exact = s0.clone().requires_grad_(True)
    tvd(exact, Teacher.from_logits(t0)).backward()
    s = s0.expand(N, V).clone().requires_grad_(True)  # N positions with the same toy distributions
    teacher = Teacher.from_logits(t0.expand(N, V))
    if source == "data":
        teacher.tokens = torch.multinomial(teacher.p[0], N, replacement=True)
    tvdpp(s, teacher, samples=1, source=source).backward()
    # importance weights q/p make the data's estimate noisier where q >> p (here q/p reaches 22)
    assert _cosine(s.grad.sum(0), exact.grad[0]) > (0.95 if source == "drafter" else 0.8)


def test_acceptance_lower_bound_is_exact_at_full_k_and_never_above_the_truth(logits):
    s, t = logits
    lp = torch.log_softmax(t, -1)
    truth = expected_acceptance(s, Teacher.from_logits(t))
    full = lp.topk(V, dim=-1)
    assert torch.allclose(acceptance_lower_bound(s, Teacher.from_topk(full.indices, full.values, V)), truth, atol=1e-6)
    for k in (1, 4, 16, 39):
        top = lp.topk(k, dim=-1)
        teacher = Teacher.from_topk(top.indices, top.values, V)
        assert acceptance_lower_bound(s, teacher) <= truth + 1e-6
        # the renormalised top-k can overstate: the bound is what a top-k teacher reports
        assert acceptance_lower_bound(s, teacher) <= expected_acceptance(s, teacher) + 1e-6


def test_tvdpp_on_data_tokens_leaves_out_tokens_a_top_k_teacher_does_not_know(logits):
    """A data token outside the stored top-k has no known p: it must not get a weight of q / 1e-10."""
    s, t = logits
    lp = torch.log_softmax(t, -1)
    top = lp.topk(4, dim=-1)
    teacher = Teacher.from_topk(top.indices, top.values, V)
    outside = lp.argmin(-1)  # surely not in the top-4
    teacher.tokens = outside
    s = s.clone().requires_grad_(True)
    tvdpp(s, teacher, source="data").backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() == 0  # every token unknown: no signal at all
    teacher.tokens = top.indices[:, 0]  # the teacher's favourite: known, with its stored p
    s.grad = None
    tvdpp(s, teacher, source="data").backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 100
