"""KOALA draft heads: shapes for several K, a training step of each loss, the discriminator, save/load, losslessness."""

import pytest
import torch

from koala.adversarial import Adversary, Discriminator
from koala.config import TrainingConfig
from koala.drafters.heads import EagleHead, MedusaHeads, build_heads, load_heads, load_heads_drafter, save_heads
from koala.errors import KoalaError
from koala.heads_train import FeatureSource, HeadsObjective
from koala.spec.decode import generate
from koala.spec.model import Transformer
from koala.train import SequenceData
from tests.conftest import tiny_llama
from tests.koala.test_train import synthetic_rows

V = 64


@pytest.fixture(scope="module")
def target():
    m = tiny_llama(layers=2, vocab=V, hidden=32, seed=0)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.mark.parametrize("K", [1, 2, 3])
def test_shapes(target, K):
    f = torch.randn(2, 5, 32)
    assert MedusaHeads(32, 4, K)(f).shape == (4, 2, 5, 32)
    e = EagleHead(target.config, K)
    assert len(e.decoder.layers) == K
    assert e(f, torch.randn(2, 5, 32)).shape == (2, 5, 32)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
@pytest.mark.parametrize("adversarial", [False, True])
def test_one_step_decreases_the_loss_on_a_fixed_batch(target, kind, adversarial):
    torch.manual_seed(0)
    data = SequenceData(synthetic_rows(n=4), 32, 0)
    heads = build_heads(kind, target, layers=2, n_heads=3)
    if kind == "medusa":  # zero-initialised blocks start at the identity: perturb so gradients are not degenerate
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.05)
    cfg = TrainingConfig(adversarial=adversarial, adv_warmup_steps=0, adv_lambda=0.1, lr=1e-3)
    adv = Adversary(cfg, "cpu") if adversarial else None
    obj = HeadsObjective(kind, heads, target, FeatureSource(target, data, cache=True), adversary=adv)
    b = data.batch([0, 1, 2, 3], "cpu")
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    before, extra = obj.loss(b, step=0)
    before.backward()
    opt.step()
    opt.zero_grad()
    after, _ = obj.loss(b, step=1)
    assert after.item() < before.item()
    if adversarial:
        assert 0.0 <= extra["disc_accuracy"] <= 1.0 and extra["adv_lambda"] == 0.1


def test_discriminator_step_learns_to_separate():
    cfg = TrainingConfig(adv_warmup_steps=0, lr=3e-3)
    adv = Adversary(cfg, "cpu")
    real = -torch.rand(64, 16) * 2
    fake = -torch.rand(64, 16) * 2 - 5  # clearly different profiles
    accs = [adv.step(real, fake.clone().requires_grad_(True), s)[1]["disc_accuracy"] for s in range(30)]
    assert accs[-1] > 0.9 and isinstance(adv.disc, Discriminator)


def test_collapse_guard_stops_with_a_clear_message():
    adv = Adversary(TrainingConfig(adv_warmup_steps=0, lr=1e-2), "cpu")
    real, fake = torch.zeros(32, 16), torch.full((32, 16), -20.0)
    with pytest.raises(KoalaError, match="discriminator collapsed at step .* lower training.adv_lambda"):
        for s in range(400):
            adv.step(real, fake.clone().requires_grad_(True), s)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_save_load_roundtrip(tmp_path, target, kind):
    heads = build_heads(kind, target, layers=2, n_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.02)
    info = {"kind": kind, "layers": 2, "n_heads": 3, "hidden_size": 32, "vocab_size": V}
    save_heads(heads, tmp_path, info)
    loaded, got = load_heads(tmp_path, target)
    assert got["kind"] == kind
    a, b = heads.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tiny_llama(vocab=V + 1, hidden=32)
    with pytest.raises(KoalaError, match="train heads for this target"):
        load_heads(tmp_path, other)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_head_drafters_are_lossless_in_the_engine(tmp_path, target, kind, gamma):
    heads = build_heads(kind, target, layers=2, n_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_heads(heads, tmp_path, {"kind": kind, "layers": 2, "n_heads": 3, "hidden_size": 32, "vocab_size": V})
    engine = Transformer(target)
    drafter = load_heads_drafter(str(tmp_path), engine)
    prompt = [3, 17, 29, 4, 11, 8]
    ref = generate(engine, prompt, 40).tokens
    res = generate(engine, prompt, 40, drafter=drafter, gamma=gamma)
    assert res.tokens == ref
    # behind prompt lookup the heads skip rounds, then catch up on the features they missed
    from koala.spec.drafters import LookupFirstDrafter
    assert generate(engine, prompt, 40, drafter=LookupFirstDrafter(drafter), gamma=gamma).tokens == ref
