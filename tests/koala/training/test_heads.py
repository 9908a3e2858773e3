"""KOALA draft heads: shapes for several K, a training step of each loss, the discriminator, save/load, losslessness."""

import pytest
import torch

from koala.training.adversarial import Adversary
from koala.models.discriminator import Discriminator
from koala.config import TrainingConfig
from koala.models.heads import EagleHead, MedusaHeads, build_heads, load_heads, save_heads
from koala.engine.drafters import load_heads_drafter
from koala.errors import KoalaError
from koala.training.features import FeatureSource
from koala.training.heads_objectives import heads_objective
from koala.training.objectives import adversarial_if
from koala.engine.decode import generate
from koala.engine.model import Transformer
from koala.training.data import SequenceData
from tests.conftest import tiny_llama
from tests.koala.training.test_loop import synthetic_rows

V = 64


def _features(target, data, heads) -> FeatureSource:
    """The cached feature source these heads read (EAGLE-3: the target's states at its fused layers too)."""
    return FeatureSource(target, data, cache=True, aux_layers=getattr(heads, "aux_layers", None))


@pytest.fixture(scope="module")
def target():
    m = tiny_llama(layers=2, vocab=V, hidden=32, seed=0)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_a_new_eagle_head_passes_the_feature_through(target):
    """Its fc starts as the identity on the feature plus a tenth of its random weights: [f ; e] -> f, nearly."""
    from koala.models.heads import FC_INIT_SCALE

    torch.manual_seed(0)
    fc = EagleHead(target.config, 1).fc
    C, bound = 32, FC_INIT_SCALE / (2 * 32) ** 0.5  # nn.Linear draws from +-1/sqrt(fan_in)
    w = fc.weight.detach()
    assert (w[:, :C] - torch.eye(C)).abs().max() <= bound + 1e-6
    assert w[:, C:].abs().max() <= bound + 1e-6
    f, e = torch.randn(64, C), torch.randn(64, C)
    out = fc(torch.cat([f, e], -1)).detach()
    assert torch.nn.functional.cosine_similarity(out, f).min() > 0.9


@pytest.mark.parametrize("K", [1, 2, 3])
def test_shapes(target, K):
    f = torch.randn(2, 5, 32)
    assert MedusaHeads(32, 4, K)(f).shape == (4, 2, 5, 32)
    e = EagleHead(target.config, K)
    assert len(e.decoder.layers) == K
    assert e(f, torch.randn(2, 5, 32)).shape == (2, 5, 32)


@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3"])
@pytest.mark.parametrize("adversarial", [False, True])
def test_one_step_decreases_the_loss_on_a_fixed_batch(target, kind, adversarial):
    torch.manual_seed(0)
    data = SequenceData(synthetic_rows(n=4), 32, 0)
    heads = build_heads(kind, target, layers=2, n_heads=3)
    if kind == "medusa":  # zero-initialised blocks start at the identity: perturb so gradients are not degenerate
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.05)
    cfg = TrainingConfig(adversarial=adversarial, adv_warmup_steps=0, adv_lambda=0.1, lr=1e-3)
    obj = adversarial_if(heads_objective(kind, heads, target, _features(target, data, heads)), cfg, "cpu")
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


def test_discriminator_cannot_separate_identical_distributions():
    """Both profiles are read at the same tokens in token-id order: a drafter equal to the target gives the
    discriminator nothing to tell them apart by (the target's sorted top-k would have leaked the label)."""
    torch.manual_seed(0)
    adv = Adversary(TrainingConfig(adv_warmup_steps=0, lr=3e-3), "cpu")
    logp = torch.log_softmax(torch.randn(256, 64) * 3, -1)
    real, fake = adv.profiles(logp, logp.clone())
    assert torch.equal(real, fake)
    accs = [adv.step(real, fake.clone().requires_grad_(True), s)[1]["disc_accuracy"] for s in range(20)]
    assert all(abs(a - 0.5) < 1e-6 for a in accs), accs
    sorted_real = logp.topk(16, dim=-1).values  # the old profile: descending by construction
    assert not torch.equal(real, sorted_real)


def test_the_adversarial_term_reaches_every_medusa_head(target):
    torch.manual_seed(0)
    data = SequenceData(synthetic_rows(n=4), 32, 0)
    heads = build_heads("medusa", target, layers=1, n_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    obj = heads_objective("medusa", heads, target, FeatureSource(target, data, cache=True))
    b = data.batch([0, 1, 2, 3], "cpu")
    _, t, s = obj.supervised(b, logp=True)
    per_head = [int(x[0].shape[0]) for x in obj._predictions(b, obj.features(b))]
    assert t.shape[0] == s.shape[0] == sum(per_head) and len(per_head) == 3


def test_collapse_guard_stops_with_a_clear_message():
    adv = Adversary(TrainingConfig(adv_warmup_steps=0, lr=1e-2), "cpu")
    real, fake = torch.zeros(32, 16), torch.full((32, 16), -20.0)
    with pytest.raises(KoalaError, match="discriminator collapsed at step .* lower training.adv_lambda"):
        for s in range(400):
            adv.step(real, fake.clone().requires_grad_(True), s)


@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3"])
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


@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3"])
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
    from koala.engine.drafters import LookupFirstDrafter
    assert generate(engine, prompt, 40, drafter=LookupFirstDrafter(drafter), gamma=gamma).tokens == ref
    # draft trees (EAGLE-2's dynamic tree; Medusa's from each head's top-k), alone and behind lookup
    from koala.engine.tree import TreeBudget
    tree = TreeBudget(gamma, 3, 2 * gamma + 1)
    for d in (drafter, LookupFirstDrafter(drafter)):
        res = generate(engine, prompt, 40, drafter=d, tree=tree)
        assert res.tokens == ref and res.tree == str(tree)


def test_unrolled_drafts_see_what_drafting_sees(target):
    """Draft 1 of the training-time test is the plain forward; draft p at slot j equals a causal forward over the
    slots drafting's p-th step has: true inputs up to j-p+1, then the head's own predictions."""
    torch.manual_seed(0)
    head = EagleHead(target.config, 2).eval()
    f, e = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    with torch.no_grad():
        d1, d2, d3 = head.unrolled(f, e, 3)
        assert torch.allclose(d1, head(f, e), atol=1e-5)
        j = 6
        x = torch.cat([head.fuse(f[:, :j], e[:, :j]), head.fuse(d1[:, j - 1:j], e[:, j:j + 1])], 1)
        assert torch.allclose(head.decoder(inputs_embeds=x).last_hidden_state[:, -1], d2[:, j], atol=1e-5)
        x = torch.cat([head.fuse(f[:, :j - 1], e[:, :j - 1]), head.fuse(d1[:, j - 2:j - 1], e[:, j - 1:j]),
                       head.fuse(d2[:, j - 1:j], e[:, j:j + 1])], 1)
        assert torch.allclose(head.decoder(inputs_embeds=x).last_hidden_state[:, -1], d3[:, j], atol=1e-5)


def test_a_head_trained_one_draft_deep_is_measured_three_deep(target):
    """The held-out metrics of an EAGLE head cover drafts 1-3 whatever it is trained to unroll (they are what `gamma:
    auto` reads), and do not depend on the trained depth: the same head measures the same at unroll 1 and 3."""
    torch.manual_seed(0)
    head = build_heads("eagle", target, layers=1).eval()
    data = SequenceData(synthetic_rows(n=4), 32, 0)
    b = data.batch(list(range(4)), torch.device("cpu"))
    one = heads_objective("eagle", head, target, FeatureSource(target, data, cache=True), unroll=1).metrics(b)
    three = heads_objective("eagle", head, target, FeatureSource(target, data, cache=True), unroll=3).metrics(b)
    assert {f"heldout_greedy_agreement_pos{p}" for p in (1, 2, 3)} <= set(one)
    assert "heldout_greedy_agreement_pos4" not in one
    assert one == pytest.approx(three)


def _greedy_rows(engine, n: int, seed: int, length: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(2, V, (4,), generator=g).tolist()
        rows.append({"prompt_id": f"{seed}-{i}", "prompt_len": 4,
                     "input_ids": prompt + generate(engine, prompt, length).tokens})
    return rows


def _acceptance_by_position(engine, drafter, rows, gamma: int) -> list[float]:
    reached, accepted = [0] * gamma, [0] * gamma
    for r in rows:
        prompt = r["input_ids"][:4]
        res = generate(engine, prompt, 24, drafter=drafter, gamma=gamma)
        assert res.tokens == r["input_ids"][4:]  # lossless
        for m, k in res.rounds:
            for i in range(min(m, k + 1)):  # draft i+1 was judged when drafts 1..i were accepted
                reached[i] += 1
                accepted[i] += i < k
    return [a / max(n, 1) for a, n in zip(accepted, reached)]


def _rule_following_target() -> torch.nn.Module:
    """A tiny Llama trained in a second to continue x -> (5x + 3) mod V: a target whose greedy output can be learnt."""
    target = tiny_llama(layers=2, vocab=V, hidden=32, seed=0, init_std=0.02).train()
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = [torch.randint(2, V, (32,), generator=g)]
        for _ in range(24):
            x.append((x[-1] * 5 + 3) % V)
        x = torch.stack(x, 1)
        loss = torch.nn.functional.cross_entropy(target(input_ids=x[:, :-1]).logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def test_a_head_trained_on_its_own_features_reproduces_the_target(tmp_path):
    """EAGLE trained as it drafts (drafts 1-3 unrolled, noisy input features) drafts the target's greedy output in
    the engine: every draft position accepted, gamma + 1 tokens per target forward, output unchanged."""
    from koala.training.loop import train

    target = _rule_following_target()
    engine = Transformer(target)
    data = SequenceData(_greedy_rows(engine, 48, seed=1), 64, 0)
    held = _greedy_rows(engine, 8, seed=2)
    torch.manual_seed(0)
    head = build_heads("eagle", target, layers=1)
    cfg = TrainingConfig(steps=120, batch_size=8, lr=3e-3, warmup_steps=10, unroll=3, feature_noise=0.1,
                         checkpoint_every=1000, eval_every=1000)
    obj = heads_objective("eagle", head, target, FeatureSource(target, data, cache=True), unroll=3, noise=0.1)
    train(obj, data, cfg, tmp_path / "run", cfg.steps, progress=False)
    save_heads(head.eval(), tmp_path / "h", {"kind": "eagle", "layers": 1, "hidden_size": 32, "vocab_size": V})
    drafter = load_heads_drafter(str(tmp_path / "h"), engine)
    by_pos = _acceptance_by_position(engine, drafter, held, gamma=3)  # asserts the output is the target's
    assert min(by_pos) >= 0.95, by_pos
    res = generate(engine, held[0]["input_ids"][:4], 24, drafter=drafter, gamma=3)
    assert res.target_forwards == 1 + 24 // 4  # the prefill, then every round accepts all 3 drafts plus the bonus


@pytest.mark.parametrize("kind", ["eagle", "eagle3", "medusa"])
def test_heads_under_bf16_autocast_learn_and_resume_bitwise(tmp_path, target, kind):
    """The heads' recipe in bf16 autocast (float32 master weights and optimizer state): killed after step 3 and
    resumed, it ends bitwise where an uninterrupted training ends, and the loss falls."""
    from safetensors.torch import load_file

    from koala.precision import ComputeDtype
    from koala.training.checkpoints import latest_checkpoint
    from koala.training.loop import train

    data = SequenceData(synthetic_rows(n=16), 32, 0)
    cfg = TrainingConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, unroll=2, checkpoint_every=3, eval_every=3)
    bf16 = ComputeDtype("bfloat16", "test")

    fixed = data.batch(list(range(8)), "cpu")
    losses = []

    def run(out, on_log=None, resume=False, seed=0):
        torch.manual_seed(seed)
        heads = build_heads(kind, target, layers=1, n_heads=2)
        obj = heads_objective(kind, heads, target, _features(target, data, heads), unroll=2,
                             vocab_ids=torch.arange(0, V, 2))
        with torch.no_grad(), bf16.autocast("cpu"):
            losses.append(obj.loss(fixed, 0)[0].item())
        train(obj, data, cfg, out, cfg.steps, on_log=on_log, resume=resume, progress=False, compute=bf16)
        with torch.no_grad(), bf16.autocast("cpu"):
            losses.append(obj.loss(fixed, 0)[0].item())
        return heads

    run(tmp_path / "straight")
    assert losses[1] < losses[0]  # it learns under autocast

    class Killed(Exception):
        pass

    def kill_after_3(step, m):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "resumed", on_log=kill_after_3)
    run(tmp_path / "resumed", resume=True, seed=99)  # another init: everything must come from the checkpoint
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in b.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_compiled_beside_the_decode_engine_reads_its_weights_at_every_call(monkeypatch):
    """The decode engine turns inductor's freezing on for the process (koala.engine.compile.configure_inductor); a
    training compiled after it (held-out evaluations run under no_grad) must still see each step's new weights,
    not the first call's frozen as constants."""
    import torch._inductor.config as ic

    from koala.training.recipes import compiled_for_training

    monkeypatch.setattr(ic, "freezing", True)
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(3, 8)
    compiled = compiled_for_training(layer)
    with torch.no_grad():
        compiled(x)
        layer.weight.add_(1.0)  # an optimizer step
        assert torch.allclose(compiled(x), layer(x))
