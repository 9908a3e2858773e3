"""EAGLE-3 heads: the fused layers are the ones named, the training-time test drafts as the engine does, the masked
and decayed loss, and the engine's output unchanged with an EAGLE-3 drafter (greedy exact, sampled by chi-square)."""

import pytest
import torch
import torch.nn.functional as F

from koala.engine.decode import generate
from koala.engine.drafters import Eagle3Drafter, load_heads_drafter
from koala.engine.model import Transformer, rms_norm
from koala.errors import KoalaError
from koala.models.heads import Eagle3Head, aux_states, build_heads, reference_aux_layers, save_heads
from koala.training.data import SequenceData
from koala.training.features import FeatureSource
from koala.training.heads_objectives import heads_objective
from tests.conftest import tiny_llama
from tests.koala.training.test_loop import synthetic_rows

V = 64


@pytest.fixture(scope="module")
def target():
    m = tiny_llama(layers=4, vocab=V, hidden=32, seed=0)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_reference_layers():
    assert reference_aux_layers(30) == [2, 15, 27]  # SmolLM2-135M: as speculators and vLLM read a 30-layer target
    assert reference_aux_layers(32) == [2, 16, 29]
    assert len(set(reference_aux_layers(4))) == 3 and max(reference_aux_layers(2)) <= 2
    with pytest.raises(KoalaError, match=r"drafter.aux_layers \[1, 9\] must be distinct target layers in 0..4"):
        Eagle3Head(tiny_llama(layers=4).config, 1, [1, 9])


def test_fusion_reads_the_layers_it_names():
    """A target whose layer i adds the constant i + 1 to the residual stream (everything else zeroed): the state at
    the input of layer l is emb + l (l + 1) / 2, in training's reader and in the engine's alike."""
    m = tiny_llama(layers=4, vocab=V, hidden=32, seed=0)
    m.config.mlp_bias = True
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj = torch.nn.Linear(layer.mlp.down_proj.in_features, 32, bias=True)
            layer.mlp.down_proj.weight.zero_()
            layer.mlp.down_proj.bias.fill_(i + 1.0)
    ids = torch.tensor([[3, 9, 27, 5]])
    emb = m.model.embed_tokens(ids)
    layers = [1, 3, 4]
    got = aux_states(m, ids, None, layers)
    C = 32
    for k, l in enumerate(layers):
        assert torch.allclose(got[..., k * C:(k + 1) * C], emb + l * (l + 1) / 2, atol=1e-5), l
    assert torch.allclose(got[..., 3 * C:], m.model(input_ids=ids).last_hidden_state, atol=1e-6)
    engine = Transformer(m)
    engine.setup_caches(16)
    _, h = engine.forward(ids, torch.arange(4), hidden=tuple(layers))
    assert torch.allclose(h, got[..., :3 * C], atol=1e-5)


def test_unrolled_drafts_are_what_the_engine_drafts(target):
    """Draft 1 of the training-time test at slot j is the head's causal forward over the true states; draft p at slot
    j is the engine's static-cache forward over what drafting's p-th step has: true states up to slot j-p+1, then the
    head's own pre-norm outputs of the drafts before, each one slot on."""
    torch.manual_seed(0)
    head = Eagle3Head(target.config, 2, [1, 2, 3]).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    aux, e = torch.randn(1, 10, 96), torch.randn(1, 10, 32)
    drafter = Eagle3Drafter(head, Transformer(target), "t")
    eng = drafter.engine
    eps = head.config.rms_norm_eps

    def run(inputs):  # [(embedding, state)] at slots 0.. -> pre-norm outputs (T, C)
        eng.setup_caches(32)
        x = torch.stack([torch.cat([a, b]) for a, b in inputs])[None]
        return eng.forward(None, torch.arange(len(inputs)), embeds=x, hidden=True, logits=False)[1][0]

    with torch.no_grad():
        d1, d2, d3 = head.unrolled(aux, e, 3)
        g = head.fc(aux)[0]
        j = 6
        true = [(e[0, i], g[i]) for i in range(10)]
        x1 = run(true)
        assert torch.allclose(rms_norm(x1, head.norm.weight, eps), d1[0], atol=1e-5)
        x2 = run(true[:j] + [(e[0, j], x1[j - 1])])
        assert torch.allclose(rms_norm(x2[-1], head.norm.weight, eps), d2[0, j], atol=1e-5)
        x2_prev = run(true[:j - 1] + [(e[0, j - 1], x1[j - 2])])  # draft 2 at slot j-1
        x3 = run(true[:j - 1] + [(e[0, j - 1], x1[j - 2]), (e[0, j], x2_prev[-1])])
        assert torch.allclose(rms_norm(x3[-1], head.norm.weight, eps), d3[0, j], atol=1e-5)


def test_the_loss_is_masked_and_decayed(target):
    """Cross-entropy alone, draft p weighted 0.8^(p-1), over the trained positions whose target top token lies in the
    draft vocabulary; the held-out metrics keep every position (as the engine meets them)."""
    torch.manual_seed(0)
    data = SequenceData(synthetic_rows(n=4), 32, 0)
    head = build_heads("eagle3", target, layers=1)
    vocab = torch.arange(0, V, 2)
    feats = FeatureSource(target, data, cache=True, aux_layers=head.aux_layers)
    obj = heads_objective("eagle3", head, target, feats, unroll=3, vocab_ids=vocab)
    b = data.batch([0, 1, 2, 3], "cpu")
    f = feats(b)
    top = target.lm_head(f[:, 1:, -32:]).argmax(-1)
    inside = top % 2 == 0
    expect = b.positions[:, 1:] & inside
    assert 0 < int(expect.sum()) < int(b.positions[:, 1:].sum())  # the mask takes some positions, not all
    preds = obj._predictions(b, f, train=True, source=feats)
    assert preds[0][0].shape[0] == int(expect.sum())
    assert [w for _, _, w, _ in preds] == pytest.approx([1.0, 0.8, 0.64])
    held = obj._predictions(b, f)
    assert held[0][0].shape[0] == int(b.positions[:, 1:].sum())

    with torch.no_grad():
        w = target.lm_head.weight[vocab]
        want = 0.0
        for s, t, wt, rows in preds:
            tt = t if rows is None else preds[0][1][rows]
            p = torch.softmax(tt @ w.T, -1)
            want += wt * -(p * torch.log_softmax(s @ w.T, -1)).sum(-1).mean()
        assert torch.allclose(obj.supervised(b)[0], want, atol=1e-5)


def test_a_source_for_other_layers_is_refused(target):
    data = SequenceData(synthetic_rows(n=2), 32, 0)
    head = build_heads("eagle3", target, layers=1)
    with pytest.raises(KoalaError, match="build it with aux_layers=heads.aux_layers"):
        heads_objective("eagle3", head, target, FeatureSource(target, data, cache=True), unroll=3)


def _eagle3_drafter(tmp_path, target, vocab=None):
    torch.manual_seed(0)
    head = build_heads("eagle3", target, layers=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_heads(head, tmp_path, {"kind": "eagle3", "layers": 2, "hidden_size": 32, "vocab_size": V}, vocab)
    engine = Transformer(target)
    return engine, load_heads_drafter(str(tmp_path), engine)


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_is_the_targets_with_a_draft_vocabulary(tmp_path, target, gamma):
    engine, drafter = _eagle3_drafter(tmp_path, target, torch.arange(0, V, 3))
    prompt = [3, 17, 29, 4, 11, 8]
    ref = generate(engine, prompt, 40).tokens
    assert generate(engine, prompt, 40, drafter=drafter, gamma=gamma).tokens == ref
    from koala.engine.tree import TreeBudget
    assert generate(engine, prompt, 40, drafter=drafter, tree=TreeBudget(gamma + 1, 3, 8)).tokens == ref


def test_sampled_output_is_distributed_as_the_targets(tmp_path):
    """Three tokens sampled 2,000 times speculatively with an EAGLE-3 drafter over a draft vocabulary (q zero outside
    it): the sequences' frequencies match the target's exact joint distribution (chi-square, p > 0.001)."""
    from tests.koala.engine.test_decode import sampled_pvalue

    vocab, draft_vocab = 6, [0, 2, 3, 5]
    hf = tiny_llama(layers=4, vocab=vocab, hidden=16, seed=1, init_std=0.5)
    torch.manual_seed(0)
    head = build_heads("eagle3", hf, layers=1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_heads(head, tmp_path, {"kind": "eagle3", "layers": 1, "hidden_size": 16, "vocab_size": vocab},
               torch.tensor(draft_vocab))
    tgt = Transformer(hf)
    assert sampled_pvalue(tgt, load_heads_drafter(str(tmp_path), tgt), vocab, gamma=3) > 1e-3


def test_states_stored_by_teacher_forcing_are_the_ones_computed_online(target):
    """teacher_forced.aux_layers stores the states before the features: an EAGLE-3 head over the same layers reads
    them from the rows, one over other layers computes its own, and EAGLE-1 reads the features (the last C)."""
    from koala.data.teacher import force_batch

    seqs = [([3, 5, 7, 9, 11, 13, 15], 2), ([4, 6, 8, 10, 12], 1)]
    forced = force_batch(target, seqs, topk=4, features=True, aux_layers=[1, 2, 3])
    assert forced[0].features.shape == (7, 4 * 32)

    def rows():
        return [{"prompt_id": f"p{i}", "input_ids": f.input_ids, "prompt_len": f.prompt_len,
                 "features": f.features.tobytes()} for i, f in enumerate(forced)]

    for layers in ([1, 2, 3], [0, 1, 2], None):
        data = SequenceData(rows(), 32, 0)
        src = FeatureSource(target, data, cache=True, aux_layers=layers, stored_layers=[1, 2, 3])
        b = data.batch([0, 1], "cpu")
        got = src(b)
        for row, (ids, _) in enumerate(seqs):
            x = torch.tensor([ids])
            want = (aux_states(target, x, None, layers) if layers else target.model(input_ids=x).last_hidden_state)[0]
            assert torch.allclose(got[row, :len(ids)], want.half().float(), atol=2e-3), layers
