"""The engine's correctness: exact acceptance cases, greedy equality, distribution preservation, bad input."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from koala.errors import KoalaError
from koala.engine.decode import accept_drafts, accept_greedy_chain, generate
from koala.engine.drafters import LookupFirstDrafter, ModelDrafter, PromptLookupDrafter
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, logits_to_probs

V = 64


class ScriptedDrafter:
    """Proposes the reference continuation, wrong where `wrong(round, i)` says: always/never/sometimes accepted."""

    needs_hidden = False

    def __init__(self, reference: list[int], prompt_len: int, wrong):
        self.ref, self.T, self.wrong, self.round = reference, prompt_len, wrong, 0
        self.name, self.vocab_size = "scripted", V

    def reset(self, max_seq_len):
        self.round = 0

    def propose(self, seq, n, gamma, params, threshold=None):
        out = []
        for i in range(gamma):
            j = n - self.T + i
            tok = self.ref[j] if j < len(self.ref) else 0
            out.append((tok + 1) % V if self.wrong(self.round, i) else tok)
        self.round += 1
        t = torch.tensor(out)
        return t, F.one_hot(t, V).float()

    def commit(self, n_valid, hidden=None, start=0):
        pass


# --- the rejection rule with fixed distributions: exact outcomes ----------------------------------------------

def test_accept_all_when_draft_equals_target():
    p = torch.softmax(torch.randn(4, V), -1)
    d = p[:3].argmax(-1)
    k, _ = accept_drafts(d, p[:3], p)  # p == q: p/q = 1, always accepted
    assert int(k) == 3


def test_never_accept_when_target_gives_zero_mass():
    q = F.one_hot(torch.tensor([5, 6, 7]), V).float()
    p = F.one_hot(torch.tensor([9, 9, 9, 9]), V).float()
    k, nxt = accept_drafts(torch.tensor([5, 6, 7]), q, p)
    assert int(k) == 0 and int(nxt) == 9  # the correction comes from max(p - q, 0) = p


def test_sometimes_accept_stops_at_first_mismatch():
    p = F.one_hot(torch.tensor([5, 6, 1, 2]), V).float()
    q = F.one_hot(torch.tensor([5, 6, 7]), V).float()
    k, nxt = accept_drafts(torch.tensor([5, 6, 7]), q, p)
    assert int(k) == 2 and int(nxt) == 1


def test_bonus_token_when_all_accepted():
    p = F.one_hot(torch.tensor([5, 6, 7, 42]), V).float()
    k, nxt = accept_drafts(torch.tensor([5, 6, 7]), p[:3], p)
    assert int(k) == 3 and int(nxt) == 42


def test_greedy_chain_rule_is_the_one_hot_rule():
    """Greedy verification on token ids gives what the general rule gives on one-hot p and q, at every number of
    matching drafts (none, some, all: the bonus), ties in the logits included."""
    torch.manual_seed(0)
    greedy = SamplingParams(0.0)
    for trial in range(40):
        logits = torch.randn(4, V)
        if trial % 5 == 0:
            logits[1, :] = 0.0  # an all-tie row: both rules take argmax's first index
        best = logits.argmax(-1)
        matched = trial % 4  # 0..3 drafts equal the target's argmax, the next differs
        drafts = torch.stack([best[i] if i < matched else (best[i] + 1) % V for i in range(3)])
        want = accept_drafts(drafts, logits_to_probs(torch.zeros(3, V).scatter_(-1, drafts[:, None], 1.0), greedy),
                             logits_to_probs(logits, greedy))
        got = accept_greedy_chain(drafts, logits)
        assert (int(got[0]), int(got[1])) == (int(want[0]), int(want[1])) == (matched, int(best[matched]))


def test_residual_excludes_the_rejected_token():
    # q puts all mass on token 3, p splits it between 3 and 4; after rejecting 3 the correction must be 4.
    p = torch.zeros(2, V)
    p[:, 3], p[:, 4] = 0.5, 0.5
    q = F.one_hot(torch.tensor([3]), V).float()
    torch.manual_seed(0)
    outcomes = [tuple(int(x) for x in accept_drafts(torch.tensor([3]), q, p)) for _ in range(400)]
    assert {o for o in outcomes if o[0] == 0} == {(0, 4)}
    assert 0.4 < sum(o[0] for o in outcomes) / 400 < 0.6


def test_top_p_and_greedy_probs():
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])
    assert logits_to_probs(logits, SamplingParams(0.0)).tolist() == [1, 0, 0, 0]
    p = logits_to_probs(logits, SamplingParams(1.0, top_p=0.8))
    assert p[3] == 0 and p[2] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))


# --- greedy equality on tiny models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    from tests.conftest import tiny_llama
    return Transformer(tiny_llama(layers=3, vocab=V, seed=0))


PROMPT = [3, 17, 29, 4, 11, 8]


def test_a_prefill_runs_the_lm_head_on_its_last_position_only(target):
    """`last_logits`: the last row of the whole forward's logits, (1, 1, V); the features stay every position's."""
    ids, pos = torch.tensor([PROMPT]), torch.arange(len(PROMPT))
    target.setup_caches(32)
    full, h_full = target.step(ids, pos, len(PROMPT), hidden=True, eager=True)
    target.setup_caches(32)
    last, h_last = target.step(ids, pos, len(PROMPT), hidden=True, eager=True, last_logits=True)
    assert full.shape == (1, len(PROMPT), V) and last.shape == (1, 1, V)
    assert torch.allclose(last[0, 0], full[0, -1], atol=1e-6) and torch.equal(h_last, h_full)


@pytest.mark.parametrize("gamma", range(1, 9))
@pytest.mark.parametrize("mode", ["always", "never", "half"])
def test_greedy_output_equals_target(target, gamma, mode):
    ref = generate(target, PROMPT, 40).tokens
    wrong = {"always": lambda r, i: False, "never": lambda r, i: True, "half": lambda r, i: (r + i) % 2 == 1}[mode]
    res = generate(target, PROMPT, 40, drafter=ScriptedDrafter(ref, len(PROMPT), wrong), gamma=gamma)
    assert res.tokens == ref
    if mode == "always":  # every round but possibly the last (which drafts past the reference) accepts all
        assert res.accept_counts[gamma] >= sum(res.accept_counts) - 1
    if mode == "never":
        assert res.tau == 1.0


@pytest.mark.parametrize("threshold", [None, 0.3, 0.9])
@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_greedy_with_real_drafters(target, gamma, threshold):
    from tests.conftest import tiny_llama
    ref = generate(target, PROMPT, 48, eos_ids={1}).tokens
    for d in (ModelDrafter(target.truncated(1)), ModelDrafter(Transformer(tiny_llama(layers=1, vocab=V, seed=7))),
              PromptLookupDrafter(vocab_size=V), LookupFirstDrafter(ModelDrafter(target.truncated(1)))):
        res = generate(target, PROMPT, 48, drafter=d, gamma=gamma, eos_ids={1}, threshold=threshold)
        assert res.tokens == ref
        assert all(0 <= k <= m <= gamma for m, k in res.rounds)


def test_stops_at_eos_and_max_new_tokens(target):
    ref = generate(target, PROMPT, 30).tokens
    eos = ref[5]
    first = ref.index(eos)
    for d in (None, ModelDrafter(target.truncated(2))):
        res = generate(target, PROMPT, 30, drafter=d, gamma=4, eos_ids={eos})
        assert res.tokens == ref[:first + 1] and res.finish_reason == "eos"
        assert len(generate(target, PROMPT, 7, drafter=d, gamma=4).tokens) == 7


class CountingDrafter(ModelDrafter):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def propose(self, *a, **k):
        self.calls += 1
        return super().propose(*a, **k)


def test_prompt_lookup_drafts_only_on_a_match_and_the_drafter_fills_in(target):
    params = SamplingParams()
    lookup = PromptLookupDrafter(vocab_size=V)
    seq = torch.tensor([5, 6, 7, 9, 5, 6, 0, 0, 0])
    toks, q = lookup.propose(seq, 6, 3, params)  # ...5 6 matches the start: copy 7 9 5
    assert toks.tolist() == [7, 9, 5] and q.argmax(-1).tolist() == [7, 9, 5]
    toks, q = lookup.propose(torch.tensor([1, 2, 3, 4, 0]), 4, 3, params)  # no earlier match: no draft
    assert toks.numel() == 0 and q.shape == (0, V)

    inner = CountingDrafter(target.truncated(1))
    hybrid = LookupFirstDrafter(inner)
    ref = generate(target, PROMPT, 40).tokens
    res = generate(target, PROMPT, 40, drafter=hybrid, gamma=2)
    assert res.tokens == ref
    assert hybrid.name == "lookup+model" and 0 < inner.calls < len(res.rounds)  # lookup took some rounds


def test_lookup_first_takes_matches_of_two_tokens_or_more_and_drafts_them_at_their_own_length(target):
    """A match of the last token alone goes to the drafter; `lookup_len` drafts a match that far whatever the shape
    (a chain of one, a tree), and the output stays the target's."""
    from koala.engine.tree import TreeBudget

    lookup = PromptLookupDrafter(vocab_size=V, min_ngram=2)
    assert lookup.match([5, 6, 7, 6], 3) == (0, [])  # only the last token recurs
    assert lookup.match([5, 6, 7, 5, 6], 3) == (2, [7, 5, 6])
    with pytest.raises(KoalaError, match="n-gram sizes 4..3 are empty"):
        PromptLookupDrafter(3, min_ngram=4)
    with pytest.raises(KoalaError, match="lookup_len 0: give at least 1"):
        LookupFirstDrafter(ModelDrafter(target.truncated(1)), lookup_len=0)
    ref = generate(target, PROMPT, 60).tokens
    inner = CountingDrafter(target.truncated(1))
    hybrid = LookupFirstDrafter(inner, lookup_len=6)
    for kw in ({"gamma": 1}, {"gamma": 2, "tree": TreeBudget(2, 2, 4)}):
        res = generate(target, PROMPT, 60, drafter=hybrid, **kw)
        assert res.tokens == ref
        assert len(res.accept_counts) == 7 and max(m for m, _ in res.rounds) == 6  # some match drafted 6
    assert hybrid.matched[0] > 0 and hybrid.matched[1] >= 6  # rounds and tokens lookup drafted


def test_a_threshold_stops_a_chain_from_its_second_draft_never_before(target, monkeypatch):
    """The first draft's verify slot is about free, so no threshold drops it: an unconfident one goes alone, with no
    drafter step spent after it; later unconfident drafts are dropped."""
    from koala.engine import drafters

    ref = generate(target, PROMPT, 40).tokens
    drafter = ModelDrafter(target.truncated(1))
    steps = []
    step = drafter.model.step
    monkeypatch.setattr(drafter.model, "step", lambda *a, **k: steps.append(1) or step(*a, **k))
    res = generate(target, PROMPT, 40, drafter=drafter, gamma=3, threshold=1.0)
    assert res.tokens == ref and {m for m, _ in res.rounds} == {1}  # nothing is that confident: one draft a round
    assert len(steps) == len(res.rounds)  # each round's catch-up only: the lone draft is not fed
    sure = generate(target, PROMPT, 40, drafter=ModelDrafter(target.truncated(1)), gamma=3, threshold=0.0)
    assert sure.rounds[0][0] == 3
    monkeypatch.setattr(drafters, "FIRST_DRAFT_FREE", False)  # the rule that drops a first draft like any other
    res = generate(target, PROMPT, 40, drafter=ModelDrafter(target.truncated(1)), gamma=3, threshold=1.0)
    assert res.tokens == ref and {m for m, _ in res.rounds} == {0}


def test_a_threshold_keeps_medusas_first_head_and_stops_at_the_next_unsure_one(monkeypatch):
    from types import SimpleNamespace

    from koala.engine import drafters
    from koala.engine.drafters import MedusaDrafter

    C, heads = 8, nn.Module()
    heads.heads = [None] * 3
    heads.forward = lambda f: torch.zeros(3, C)  # flat logits: every head unsure
    stub = SimpleNamespace(args=SimpleNamespace(vocab_size=V, dim=C), lm_head=nn.Linear(C, V, bias=False),
                           dtype=torch.float32, device=torch.device("cpu"))
    d = MedusaDrafter(heads, stub, "medusa")
    d.reset(16)
    seq = torch.zeros(16, dtype=torch.long)
    assert d.propose(seq, 4, 3, SamplingParams(), threshold=0.5)[0].numel() == 1  # the first head's draft, alone
    assert d.propose(seq, 4, 3, SamplingParams(), threshold=0.0)[0].numel() == 3
    monkeypatch.setattr(drafters, "FIRST_DRAFT_FREE", False)
    assert d.propose(seq, 4, 3, SamplingParams(), threshold=0.5)[0].numel() == 0


# --- sampling preserves the target's distribution --------------------------------------------------------------

def _exact_joint(target, prompt, params, vocab, steps):
    """The target's exact distribution over its first `steps` tokens, by enumeration."""
    probs = {}
    for seq in itertools.product(range(vocab), repeat=steps):
        target.setup_caches(64)
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            p = logits_to_probs(target.step(ids, torch.arange(ids.shape[1]), ids.shape[1])[0][0], params)
        T = len(prompt)
        probs[seq] = float(torch.prod(torch.stack([p[T - 1 + j, seq[j]] for j in range(steps)])))
    return probs


@pytest.mark.parametrize("drafter_kind,threshold", [("close", None), ("far", None), ("close", 0.4),
                                                     ("lookup", None), ("lookup", 0.4)])
def test_speculative_sampling_matches_target_distribution(drafter_kind, threshold):
    from tests.conftest import tiny_llama
    vocab, steps, runs = 6, 3, 2000
    tgt = Transformer(tiny_llama(layers=2, vocab=vocab, hidden=16, seed=1, init_std=0.5))
    if drafter_kind == "close":
        drafter = ModelDrafter(tgt.truncated(1))
    elif drafter_kind == "lookup":  # one-hot lookup drafts in some rounds, the model's q in the others
        drafter = LookupFirstDrafter(ModelDrafter(tgt.truncated(1)), max_ngram=2, min_ngram=1, lookup_len=4)
    else:
        drafter = ModelDrafter(Transformer(tiny_llama(layers=1, vocab=vocab, hidden=16, seed=99, init_std=1.0)))
    assert sampled_pvalue(tgt, drafter, vocab, steps, runs, gamma=3, threshold=threshold) > 1e-3


def sampled_pvalue(tgt, drafter, vocab: int, steps: int = 3, runs: int = 2000, prompt=(2, 4, 1), **kw) -> float:
    """`runs` speculative samples of `steps` tokens at temperature 1 (`kw`: gamma, threshold, tree) against the
    target's exact joint distribution: the chi-square test's p-value."""
    params = SamplingParams(temperature=1.0)
    exact = _exact_joint(tgt, list(prompt), params, vocab, steps)
    torch.manual_seed(1234)
    counts = dict.fromkeys(exact, 0)
    for _ in range(runs):
        counts[tuple(generate(tgt, list(prompt), steps, drafter=drafter, params=params, **kw).tokens)] += 1
    return chi_square_pvalue(counts, exact, runs)


def chi_square_pvalue(counts: dict, exact: dict, runs: int) -> float:
    """Observed sequence counts against the exact joint distribution, cells with an expected count under 5 merged
    (so the chi-square approximation holds)."""
    from scipy.stats import chisquare

    big = [s for s in exact if exact[s] * runs >= 5]
    small = [s for s in exact if exact[s] * runs < 5]
    obs = [counts[s] for s in big] + [sum(counts[s] for s in small)]
    exp = [exact[s] * runs for s in big] + [sum(exact[s] for s in small) * runs]
    assert abs(sum(exp) - runs) < 1e-3 * runs
    return chisquare(obs, [e * runs / sum(exp) for e in exp]).pvalue


# --- bad input ---------------------------------------------------------------------------------------------------

def test_vocabulary_mismatch_fails_before_decoding(target):
    from tests.conftest import tiny_llama
    other = ModelDrafter(Transformer(tiny_llama(vocab=V + 1)))
    with pytest.raises(KoalaError, match=f"vocabulary of {V + 1} tokens, the target's has {V}"):
        generate(target, PROMPT, 5, drafter=other)


def test_bad_lengths_and_gamma(target):
    d = ModelDrafter(target.truncated(1))
    with pytest.raises(KoalaError, match="gamma must be >= 1"):
        generate(target, PROMPT, 5, drafter=d, gamma=0)
    with pytest.raises(KoalaError, match="empty prompt"):
        generate(target, [], 5)
    with pytest.raises(KoalaError, match="context is 16"):
        generate(target, list(range(20)), 5, max_context=16)
    with pytest.raises(KoalaError, match="lower max_new_tokens to at most 10"):
        generate(target, PROMPT, 50, max_context=16)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_vocabulary_subset_stays_lossless(target, temperature):
    from koala.engine.drafters import DraftVocab

    ids = torch.arange(0, V, 2)  # half the vocabulary
    dv = DraftVocab(ids, target.truncated(1).lm_head, V)
    d = ModelDrafter(target.truncated(1), draft_vocab=dv)
    params = SamplingParams(temperature)
    torch.manual_seed(0)
    d.reset(64)
    toks, q = d.propose(torch.tensor(PROMPT + [0] * 20), len(PROMPT), 3, params)
    assert q.shape == (3, V) and torch.allclose(q.sum(-1), torch.ones(3)) and (q[:, 1::2] == 0).all()
    assert all(int(t) % 2 == 0 for t in toks)
    if temperature == 0:
        ref = generate(target, PROMPT, 30).tokens
        assert generate(target, PROMPT, 30, drafter=d, gamma=3).tokens == ref
