"""The batched sampler: continuous batching over a static cache (rows refilled as they finish) decodes each prompt as
the single-sequence engine does, a sample depends on its seed only, and the counter-based draws are uniform."""

import math

import pytest
import torch

from koala.data.generate import generate_batch
from koala.engine.decode import generate
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, counter_uniform, sample_seeded
from tests.conftest import tiny_llama

V, EOS = 64, 5  # 5 ends some greedy answers of the tiny model early, not others
PROMPTS = [[3, 17, 29, 4], [9, 2], [5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [22, 23, 24], [8, 8, 8, 8, 8, 31]]


def _engine(seed=0):
    return Transformer(tiny_llama(layers=2, vocab=V, seed=seed))


@pytest.mark.parametrize("rows,refill_at", [(1, 1), (2, 1), (3, 2), (6, None)])
def test_greedy_rows_decode_each_prompt_as_the_single_sequence_engine(rows, refill_at):
    engine = _engine()
    ref = [generate(engine, p, 20, eos_ids={EOS}).tokens for p in PROMPTS]
    assert any(r[-1] == EOS for r in ref) and any(len(r) == 20 for r in ref)  # both ways of finishing occur
    got = generate_batch(engine, PROMPTS, list(range(len(PROMPTS))), SamplingParams(), 20, frozenset({EOS}),
                         rows=rows, refill_at=refill_at)
    assert [s.response_ids for s in got] == ref
    assert [s.finish_reason for s in got] == ["eos" if r[-1] == EOS else "length" for r in ref]
    assert [s.prompt_ids for s in got] == PROMPTS


def test_a_sample_depends_on_its_seed_only_not_on_its_batch():
    engine = _engine(1)
    params = SamplingParams(temperature=1.0)
    seeds = [11, 12, 13, 14, 15, 16]
    alone = [generate_batch(engine, [p], [s], params, 16, frozenset({EOS}))[0].response_ids
             for p, s in zip(PROMPTS, seeds)]
    together = generate_batch(engine, PROMPTS[::-1], seeds[::-1], params, 16, frozenset({EOS}), rows=4, refill_at=1)
    assert [s.response_ids for s in together][::-1] == alone
    other = generate_batch(engine, PROMPTS, [s + 100 for s in seeds], params, 16, frozenset({EOS}), rows=3)
    assert [s.response_ids for s in other] != alone  # the seed decides


def test_topk_logprobs_are_the_targets_own_at_each_response_position():
    hf = tiny_llama(layers=2, vocab=V, seed=2)
    engine = Transformer(hf)
    got = generate_batch(engine, PROMPTS[:3], [1, 2, 3], SamplingParams(temperature=0.8), 12, frozenset({EOS}),
                         topk=5, rows=2, refill_at=1)
    for s in got:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0].float(), -1)[len(s.prompt_ids) - 1:-1]  # predicts each response token
        top = lp.topk(5, dim=-1)
        assert torch.equal(torch.tensor(s.topk_ids), top.indices)
        torch.testing.assert_close(torch.tensor(s.topk_logprobs), top.values, atol=2e-2, rtol=1e-3)  # stored float16


def test_compiled_batched_step_decodes_as_eager():
    """The same compiled function the GPU path uses (mode reduce-overhead: CUDA graphs there, skipped on a CPU)."""
    eager = generate_batch(_engine(), PROMPTS, list(range(6)), SamplingParams(), 20, frozenset({EOS}), rows=3,
                           refill_at=1)
    engine = _engine().compile(mode="reduce-overhead")
    got = generate_batch(engine, PROMPTS, list(range(6)), SamplingParams(), 20, frozenset({EOS}), rows=3, refill_at=1)
    assert [s.response_ids for s in got] == [s.response_ids for s in eager]


def test_counter_uniform_is_uniform_deterministic_and_keyed_by_seed():
    n = 200_000
    seed = torch.randint(0, 2**32, (n,), generator=torch.Generator().manual_seed(0))
    counter = torch.arange(n) % 97
    u = counter_uniform(seed, counter)
    assert torch.equal(u, counter_uniform(seed.clone(), counter.clone()))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    chi2 = float(((counts - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < 45, chi2  # 19 degrees of freedom: p ~ 0.001
    one = counter_uniform(torch.full((1000,), 7), torch.arange(1000))  # one sample's draws along its steps
    assert abs(float(one.mean()) - 0.5) < 0.05 and len(set(one.tolist())) == 1000


def test_sample_seeded_draws_from_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 60_000
    tok = sample_seeded(probs.expand(n, -1), torch.arange(n), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(tok, minlength=6).float() / n
    assert freq[probs == 0].sum() == 0
    for p, f in zip(probs.tolist(), freq.tolist()):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (p, f)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (the CPU test above runs the code)")
def test_cuda_graph_batched_sampler_equals_eager():
    hf = tiny_llama(layers=2, vocab=V, seed=0).cuda()
    args = (PROMPTS, list(range(6)), SamplingParams(), 20, frozenset({EOS}))
    eager = generate_batch(Transformer(hf), *args, rows=3, refill_at=1)
    got = generate_batch(Transformer(hf).compile(), *args, rows=3, refill_at=1)
    assert [s.response_ids for s in got] == [s.response_ids for s in eager]


def test_a_prefill_split_into_several_forwards_decodes_the_same(monkeypatch):
    import koala.data.generate as G

    engine = _engine()
    args = (PROMPTS, list(range(6)), SamplingParams(), 20, frozenset({EOS}))
    whole = generate_batch(engine, *args, rows=6)
    monkeypatch.setattr(G, "PREFILL_TOKENS", 12)  # 9-token prompt alone; the others two or three to a forward
    calls = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda *a, **k: calls.append(k.get("rows")) or step(*a, **k))
    split = generate_batch(engine, *args, rows=6)
    assert [s.response_ids for s in split] == [s.response_ids for s in whole]
    assert sum(r is not None for r in calls) >= 3  # the prefill took several forwards
