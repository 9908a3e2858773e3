"""Draft trees: exact accept/reject cases, the target's own greedy output for every drafter kind, the target's
distribution when sampling, and one compiled graph for every tree."""

import pytest
import torch

from koala.engine.decode import generate
from koala.engine.drafters import DraftVocab, LookupFirstDrafter, ModelDrafter, PromptLookupDrafter
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams
from koala.engine.tree import Tree, TreeBudget, accept_greedy, accept_sampled, ancestors, parse_tree
from koala.errors import KoalaError
from tests.conftest import tiny_llama

V = 64
PROMPT = [3, 17, 29, 4, 11, 8]


@pytest.fixture(scope="module")
def target():
    return Transformer(tiny_llama(layers=3, vocab=V, seed=0))


def _tree(tokens, parents):
    """root 0 ->  nodes 1, 2 (children of the root), 3 (child of 1), 4 (child of 2), ..."""
    p = torch.tensor(parents)
    depth = torch.zeros(len(parents), dtype=torch.long)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return Tree(torch.tensor(tokens), p, depth, ancestors(p, depth, int(depth.max())))


# --- exact accept/reject cases with fixed target outputs -----------------------------------------------------------

def test_greedy_accepts_the_deepest_path_the_target_agrees_with():
    tree = _tree([9, 5, 6, 7, 8], [0, 0, 0, 1, 2])  # 9 -> {5 -> 7, 6 -> 8}
    logits = torch.full((5, V), -1.0)
    for node, nxt in ((0, 6), (1, 7), (2, 8), (3, 1), (4, 2)):  # the target says 6 after the root, then 8, then 2
        logits[node, nxt] = 1.0
    path, nxt = accept_greedy(tree, logits)
    assert path.tolist() == [0, 2, 4] and int(nxt) == 2
    logits[0] = -1.0
    logits[0, 33] = 1.0  # no child matches: only the root, the target's own token next
    path, nxt = accept_greedy(tree, logits)
    assert path.tolist() == [0] and int(nxt) == 33


def test_sampled_tries_each_child_against_the_residual():
    tree = _tree([9, 5, 6], [0, 0, 0])
    tree.q = torch.zeros(3, V)
    tree.q[0, 5] = tree.q[0, 6] = 0.5  # the children were drawn from q = {5: .5, 6: .5}
    p = torch.zeros(3, V)
    p[0, 6] = 1.0  # the target never says 5: child 1 is rejected, the residual is all on 6, child 2 accepted
    p[2, 40] = 1.0
    for _ in range(20):
        path, nxt = accept_sampled(tree, p)
        assert path.tolist() == [0, 2] and int(nxt) == 40
    p[0] = 0.0
    p[0, 12] = 1.0  # neither child: the token comes from the residual, never 5 or 6
    for _ in range(20):
        path, nxt = accept_sampled(tree, p)
        assert path.tolist() == [0] and int(nxt) == 12


def test_tree_shapes_parse_and_bad_ones_are_refused():
    assert parse_tree("4x3x12") == TreeBudget(4, 3, 12) and parse_tree("3x2") == TreeBudget(3, 2, 6)
    assert parse_tree("chain") is None and str(TreeBudget(4, 3, 40)) == "4x3x12"
    for bad in ("4x", "axb", "0x2x3"):
        with pytest.raises(KoalaError, match="--tree"):
            parse_tree(bad)


# --- greedy: exactly the target's output ----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [TreeBudget(3, 2, 6), TreeBudget(5, 4, 12)])
def test_target_as_its_own_drafter_accepts_a_full_path_every_round(target, budget):
    ref = generate(target, PROMPT, 40).tokens
    d = ModelDrafter(target.truncated(target.args.n_layers))
    generate(target, [9, 9, 2, 7, 5, 1, 33, 12, 40], 20, drafter=d, tree=budget)  # leaves keys in both caches
    res = generate(target, PROMPT, 40, drafter=d, tree=budget)
    assert res.tokens == ref
    assert all(k == budget.depth for _, k in res.rounds[:-1]), res.rounds  # tau = depth + 1 but for the last round
    assert all(m == budget.nodes for m, _ in res.rounds) and res.tree == str(budget)


@pytest.mark.parametrize("budget", [TreeBudget(2, 3, 6), TreeBudget(4, 3, 8)])
def test_every_drafter_kind_gives_the_targets_greedy_output(target, budget):
    ref = generate(target, PROMPT, 40, eos_ids={1}).tokens
    dv = DraftVocab(torch.arange(0, V, 2), target.lm_head, V)
    for d in (ModelDrafter(target.truncated(1)), ModelDrafter(Transformer(tiny_llama(layers=1, vocab=V, seed=7))),
              ModelDrafter(target.truncated(1), draft_vocab=dv), PromptLookupDrafter(vocab_size=V),
              LookupFirstDrafter(ModelDrafter(target.truncated(1)))):
        res = generate(target, PROMPT, 40, drafter=d, eos_ids={1}, tree=budget)
        assert res.tokens == ref, d.name
        lookup = isinstance(d, (PromptLookupDrafter, LookupFirstDrafter))
        assert all(0 <= k <= (budget.nodes if lookup else budget.depth) for _, k in res.rounds)
        if lookup:  # its matches verified past the tree's depth, and stayed lossless
            assert any(m > budget.depth for m, _ in res.rounds), res.rounds


def test_a_lookup_match_fills_the_shapes_verify_slots():
    """Copied text goes on agreeing past a drafter's depth: a match drafts up to the shape's node count, and the
    calibration counts a lookup round against a shape's nodes, a drafter's against its depth and top-k."""
    from koala.engine.calibrate import path_length
    from koala.engine.tree import LOOKUP_RANK

    seq = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    for d in (PromptLookupDrafter(vocab_size=V), LookupFirstDrafter(ModelDrafter(Transformer(tiny_llama(vocab=V))))):
        d.reset(32)
        tree = d.propose_tree(seq, 15, TreeBudget(2, 4, 8), SamplingParams())
        assert tree.tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13] and tree.depth.tolist() == list(range(9))
        assert tree.rank[1:].tolist() == [LOOKUP_RANK] * 8
    lookup, drafted = [LOOKUP_RANK] * 7, [0, 1, 0]  # a lookup round of 7 and a drafter's round of 3
    assert path_length([lookup, drafted], [7, 3], 2, 4) == (7 + 2) / 2  # 2 x 4 verifies 8 slots, 2 levels
    assert path_length([lookup, drafted], [7, 3], 2, 1) == (2 + 1) / 2  # a chain of 2: 2 slots


def test_pruning_keeps_every_nodes_parent_even_at_ties():
    """A drafter certain of every token (log-probabilities 0): the chain's nodes all score 0, as do their first
    children. Kept nodes, fewer than the depth, must be the chain's first ones, each with its parent."""
    from koala.engine.tree import grow

    certain = torch.full((V,), -1e4)
    certain[7] = 0.0
    for total in (2, 3, 5):
        tree = grow(torch.tensor(1), certain, lambda ids, tokens, parents, d: certain.expand(ids.shape[0], -1),
                    TreeBudget(4, 3, total), SamplingParams())
        assert tree.size == total + 1
        assert bool((tree.depth[1:] == tree.depth[tree.parents[1:]] + 1).all())  # every parent kept, one level up
        assert int(tree.depth.max()) == min(total, 4) and tree.tokens[1:].tolist().count(7) >= min(total, 4)


def test_a_tree_accepts_at_least_the_chain_of_its_depth(target):
    d = ModelDrafter(target.truncated(1))
    chain = generate(target, PROMPT, 60, drafter=d, gamma=4)
    tree = generate(target, PROMPT, 60, drafter=d, tree=TreeBudget(4, 3, 10))
    assert tree.tokens == chain.tokens and tree.tau >= chain.tau


# --- sampling: distributed as the target's --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["far", "vocab"])
def test_sampled_tree_output_is_distributed_as_the_targets(kind):
    """Three tokens sampled 2,000 times with a draft tree (two independent draws per expanded node, three levels):
    the sequences' frequencies match the target's exact joint distribution (chi-square, p > 0.001)."""
    from tests.koala.engine.test_decode import sampled_pvalue

    vocab = 6
    tgt = Transformer(tiny_llama(layers=2, vocab=vocab, hidden=16, seed=1, init_std=0.5))
    other = Transformer(tiny_llama(layers=1, vocab=vocab, hidden=16, seed=99, init_std=1.0))
    dv = DraftVocab(torch.tensor([0, 2, 3, 5]), other.lm_head, vocab) if kind == "vocab" else None
    drafter = ModelDrafter(other, draft_vocab=dv)
    assert sampled_pvalue(tgt, drafter, vocab, tree=TreeBudget(3, 2, 6)) > 1e-3


# --- compiled: one graph for every tree -----------------------------------------------------------------------------

def test_compiled_trees_decode_as_eager_with_no_recompilation():
    from koala.engine.compile import compilations

    hf = tiny_llama(layers=3, vocab=V, seed=0)
    eager, comp = Transformer(hf), Transformer(hf).compile(mode="default")
    d = ModelDrafter(Transformer(hf, 1).compile(mode="default"))
    ref = generate(eager, PROMPT, 30).tokens
    assert generate(comp, PROMPT, 30, drafter=d, gamma=3).tokens == ref  # the graphs: one token, 2+ tokens
    before = compilations()  # a tree adds none (on a CPU the drafter's tree levels run eager)
    for budget in (TreeBudget(3, 2, 6), TreeBudget(4, 3, 12), TreeBudget(2, 4, 5), TreeBudget(5, 2, 9)):
        assert generate(comp, PROMPT, 30, drafter=d, tree=budget).tokens == ref
    assert compilations() == before  # trees of every shape verify in the chain's graph
