"""Draft trees: grown by the drafter, verified in one target forward, the longest agreed path accepted.

A tree round replaces a chain's single path of drafts with a tree of candidates rooted at the last final token
seq[n-1]. The target runs every node in one forward (each node attends to the committed prefix and its own
ancestors, at rotary position n-1 + depth), and the round keeps the longest root-to-node path the target agrees
with. The accepted nodes' keys and values are then moved into the slots a chain would have written, so the next
round sees an ordinary sequence.

How the tree is grown (`grow`):

* **Greedy** (EAGLE-2's dynamic tree, Li et al. 2024, SafeAILab/EAGLE `cnets.py::topK_genrate`): each frontier node
  is expanded into its top-k children; a node's score is the sum of draft log-probabilities along its path; the k
  best-scoring children become the next frontier; after the last depth the `total` best-scoring nodes are kept
  (a parent always scores at least as high as its children, so kept nodes keep their parents). The drafter's own
  chain (its first choice after its first choice) is always kept, so a tree accepts at least what the chain of its
  depth would.
* **Sampled** (SpecInfer, Miao et al. 2024; Recursive Speculative Decoding, Jeon et al. 2024): each expanded node's
  children are k independent draws from the drafter's q at that node, and all of them are kept; which nodes are
  expanded may depend on tokens already drawn (here: the best-scoring node of each depth), never on the children
  themselves; so a sampled tree keeps all its depth x k draws (`TreeBudget.total` does not apply). Verification walks down from the root, trying a node's children in turn with the rejection rule and
  replacing p by the normalised residual max(p - q, 0) after each rejection; when no child is accepted the token is
  drawn from the residual. Every emitted token is then distributed exactly as the target's (multi-candidate
  speculative sampling with replacement).

Greedy verification is vectorised (no loop over nodes): a node is accepted when every node on its path matches the
target's argmax at its parent, and the deepest accepted node ends the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from koala.errors import KoalaError
from koala.engine.sampling import SamplingParams, logits_to_probs, sample


@dataclass(frozen=True)
class TreeBudget:
    """The shape of a draft tree: `depth` levels, `topk` children per expanded node, at most `total` nodes besides
    the root. topk 1 is a chain of `depth` drafts."""

    depth: int
    topk: int
    total: int

    def __post_init__(self):
        if self.depth < 1 or self.topk < 1 or self.total < 1:
            raise KoalaError(f"a draft tree needs depth, top-k and total >= 1, got {self.depth}/{self.topk}/"
                             f"{self.total}: write --tree DEPTHxTOPKxTOTAL, e.g. --tree 4x3x12")

    @property
    def nodes(self) -> int:
        """Nodes verified besides the root, at most."""
        return min(self.total, self.depth * self.topk)

    @property
    def drafter_slots(self) -> int:
        """Cache slots a drafter writes while growing the tree (beyond the sequence)."""
        return self.depth * self.topk

    @property
    def is_chain(self) -> bool:
        return self.topk == 1

    def __str__(self) -> str:
        return f"{self.depth}x{self.topk}x{self.nodes}"


def parse_tree(value: str | None) -> TreeBudget | None:
    """`DEPTHxTOPKxTOTAL` (e.g. `4x3x12`) or `DEPTHxTOPK` (every node kept) -> TreeBudget; None/'' -> None."""
    if value is None or str(value).strip() in ("", "none", "chain"):
        return None
    parts = str(value).lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3):
        raise KoalaError(f"tree {value!r} is not DEPTHxTOPKxTOTAL: write e.g. --tree 4x3x12 (4 levels, 3 children "
                         "each, 12 nodes)")
    depth, topk = nums[:2]
    return TreeBudget(depth, topk, nums[2] if len(nums) == 3 else depth * topk)


@dataclass
class Tree:
    """A draft tree as tensors; node 0 is the root (seq[n-1]), nodes are in topological order (parents first).

    tokens (N,), parents (N,) (root: 0), depth (N,) (root: 0), anc (N, N) bool: anc[i, j] when j is i or an
    ancestor of i. q (N, V): for sampled trees, the distribution node i's children were drawn from (None: greedy).
    rank (N,): a greedy node's index among the nodes its depth kept, best first (0: the drafter's own chain; at
    depth 1 its rank among the root's children; `LOOKUP_RANK` for a prompt-lookup match), from which
    `koala.engine.calibrate.path_length` tells whether a narrower tree would have held it.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    anc: torch.Tensor
    q: torch.Tensor | None = None
    rank: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def ancestors(parents: torch.Tensor, depth: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(N, N) bool ancestor-or-self matrix, one vectorised step per depth (parents precede their children)."""
    N = parents.shape[0]
    eye = torch.eye(N, dtype=torch.bool, device=parents.device)
    anc = eye
    for d in range(1, max_depth + 1):  # masks, not indices: no host sync
        anc = torch.where((depth == d)[:, None], anc[parents] | eye, anc)
    return anc


LOOKUP_RANK = -1  # the rank of a prompt-lookup chain's nodes: copied text, held by any shape up to its node count


def chain_tree(root: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, rank: int = 0) -> Tree:
    """A chain of drafts as a tree (each node the one child of the one before): prompt lookup's match, k = 1.
    `rank`: its nodes' rank (`LOOKUP_RANK` for a lookup match, which `koala.engine.calibrate.path_length` counts
    against a shape's node count rather than its depth)."""
    m, dev = drafts.shape[0], drafts.device
    tokens = torch.cat([root.view(1), drafts])
    idx = torch.arange(m + 1, device=dev)
    qq = None
    if q is not None:
        qq = torch.cat([q, q.new_zeros(1, q.shape[-1])])  # row i: node i's one child was drawn from q[i]
    return Tree(tokens, (idx - 1).clamp_min(0), idx, torch.ones(m + 1, m + 1, dtype=torch.bool, device=dev).tril(),
                qq, torch.full((m + 1,), rank, dtype=torch.long, device=dev))


# expand(frontier node ids (W,), their tokens (W,), their parents' ids (W,), depth d of their children)
#   -> the draft logits of their children (W, V')
ExpandFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def grow(root: torch.Tensor, root_logits: torch.Tensor, expand: ExpandFn, budget: TreeBudget,
         params: SamplingParams, to_vocab: Callable[[torch.Tensor], torch.Tensor] | None = None,
         full_probs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Tree:
    """Grow a draft tree below `root` (seq[n-1]) from the drafter's logits for the next token.

    `expand` feeds frontier nodes to the drafter and returns the logits of their children; `to_vocab` maps draft
    vocabulary indices to token ids (identity when None); `full_probs` maps draft-vocabulary probabilities to the
    target's vocabulary (sampled trees only).
    """
    if params.greedy:
        return _grow_greedy(root, root_logits, expand, budget, to_vocab)
    return _grow_sampled(root, root_logits, expand, budget, params, to_vocab, full_probs)


def _ids(to_vocab, idx):
    return idx if to_vocab is None else to_vocab(idx)


def _grow_greedy(root, root_logits, expand, budget: TreeBudget, to_vocab) -> Tree:
    k, dev = budget.topk, root_logits.device
    lp = torch.log_softmax(root_logits.float(), -1)
    top = lp.topk(k)
    tok, score = [_ids(to_vocab, top.indices)], [top.values]  # per depth: (k,) tokens, scores
    parent = [torch.zeros(k, dtype=torch.long, device=dev)]  # node ids; node 0 is the root
    rank = [torch.arange(k, device=dev)]
    first = 1  # id of the first node of the current depth; its first node is always the drafter's own chain
    for d in range(2, budget.depth + 1):
        ids = torch.arange(first, first + k, device=dev)
        lp = torch.log_softmax(expand(ids, tok[-1], parent[-1], d).float(), -1)  # (k, V')
        top = lp.topk(k)
        cand = (score[-1][:, None] + top.values).flatten()  # (k * k,)
        keep = cand.clone()
        keep[0] = float("inf")  # the chain's next node (first choice of the first node) always stays, first
        best = keep.topk(k).indices  # best first, the chain's node at index 0
        tok.append(_ids(to_vocab, top.indices.flatten()[best]))
        score.append(cand[best])
        parent.append(ids[best // k])
        rank.append(torch.arange(k, device=dev))
        first += k
    tokens, scores = torch.cat(tok), torch.cat(score)
    parents, ranks = torch.cat(parent), torch.cat(rank)
    depth = torch.arange(1, budget.depth + 1, device=dev).repeat_interleave(k)
    n_keep = budget.nodes
    if n_keep < tokens.shape[0]:
        # The best-scoring nodes, the chain's first (a tree never verifies less than the chain of its depth). A
        # child never outscores its parent (log-probabilities are <= 0) and nodes are in topological order, so a
        # stable sort keeps every kept node's parent, ties included.
        key = scores.index_fill(0, torch.arange(0, tokens.shape[0], k, device=dev), float("inf"))
        order = torch.sort(key, descending=True, stable=True).indices[:n_keep].sort().values
    else:
        order = torch.arange(tokens.shape[0], device=dev)
    return _select(root, tokens, parents, depth, ranks, order, budget.depth, None)


def _grow_sampled(root, root_logits, expand, budget: TreeBudget, params, to_vocab, full_probs) -> Tree:
    k, dev = budget.topk, root_logits.device

    def draw(logits):  # k independent draws from q, with q over the target's vocabulary and log q of each draw
        q_small = logits_to_probs(logits.float(), params)
        idx = sample(q_small.expand(k, -1).contiguous())
        q = q_small if full_probs is None else full_probs(q_small)
        return _ids(to_vocab, idx), q, q_small[idx].clamp_min(1e-30).log()

    t, q, s = draw(root_logits)
    tok, score, parent, qs = [t], [s], [torch.zeros(k, dtype=torch.long, device=dev)], {0: q}
    first = 1
    for d in range(2, budget.depth + 1):
        b = int(score[-1].argmax())  # the best-scoring node of the last depth is expanded (decided from its draw)
        node = first + b
        logits = expand(torch.tensor([node], device=dev), tok[-1][b:b + 1], parent[-1][b:b + 1], d)[0]
        t, q, s = draw(logits)
        tok.append(t)
        score.append(score[-1][b] + s)
        parent.append(torch.full((k,), node, dtype=torch.long, device=dev))
        qs[node] = q
        first += k
    tokens, parents = torch.cat(tok), torch.cat(parent)
    depth = torch.arange(1, budget.depth + 1, device=dev).repeat_interleave(k)
    N = tokens.shape[0] + 1
    q_all = torch.zeros(N, qs[0].shape[-1], device=dev)
    for node, q in qs.items():
        q_all[node] = q
    order = torch.arange(tokens.shape[0], device=dev)
    ranks = torch.arange(k, device=dev).repeat(budget.depth)
    return _select(root, tokens, parents, depth, ranks, order, budget.depth, q_all)


def _select(root, tokens, parents, depth, ranks, order, max_depth, q) -> Tree:
    """The tree of the root and nodes `order` (ascending ids of the grown nodes, 1-based below), parents remapped."""
    dev = tokens.device
    new_id = torch.zeros(tokens.shape[0] + 1, dtype=torch.long, device=dev)
    new_id[order + 1] = torch.arange(1, order.shape[0] + 1, device=dev)
    t = torch.cat([root.view(1), tokens[order]])
    p = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), new_id[parents[order]]])
    dp = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), depth[order]])
    r = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), ranks[order]])
    qq = None if q is None else q[torch.cat([torch.zeros(1, dtype=torch.long, device=dev), order + 1])]
    return Tree(t, p, dp, ancestors(p, dp, max_depth), qq, r)


def visible(seen: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """(W, size) bool attention mask of W tree nodes whose tree occupies slots start..start+S-1: the prefix before
    `start`, and the tree slots `seen` (W, S) marks (each node's ancestors and itself)."""
    vis = torch.zeros(seen.shape[0], size, dtype=torch.bool, device=seen.device)
    vis[:, :start] = True
    vis[:, start:start + seen.shape[1]] = seen
    return vis


def accept_greedy(tree: Tree, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(path node ids, root first; the target's next token) for greedy decoding; one host sync."""
    best_tok = target_logits.argmax(-1)  # (N,) the target's token after each node
    ok = tree.tokens == best_tok[tree.parents]
    ok[0] = True
    accepted = ~(tree.anc & ~ok[None]).any(-1)  # every node on the path agrees
    best = int(torch.where(accepted, tree.depth, -1).argmax())  # the deepest: siblings differ, so it is unique
    path = tree.anc[best].nonzero().squeeze(-1)  # ascending ids: root to `best`
    return path, best_tok[best]


def accept_sampled(tree: Tree, target_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(path node ids, next token) by multi-candidate recursive rejection: each node's children in turn, p replaced
    by the normalised residual after each rejection; exact for children drawn independently from q."""
    parents, dev = tree.parents.tolist(), tree.tokens.device
    children: dict[int, list[int]] = {}
    for i in range(1, len(parents)):
        children.setdefault(parents[i], []).append(i)
    tokens = tree.tokens.tolist()
    node, path, p = 0, [0], target_probs[0]
    while True:
        kids = children.get(node, [])
        q = tree.q[node]
        chosen = None
        for c in kids:
            x = tokens[c]
            if float(torch.rand((), device=dev)) * float(q[x]) < float(p[x]):  # u < p(x) / q(x), q(x) > 0
                chosen = c
                break
            residual = (p - q).clamp_min(0)
            mass = residual.sum()
            p = residual / mass if float(mass) > 0 else p
        if chosen is None:
            return torch.tensor(path, device=dev), sample(p)
        path.append(chosen)
        node, p = chosen, target_probs[chosen]


def verify_tree(target, seq: torch.Tensor, n: int, tree: Tree, params: SamplingParams, hidden):
    """One target forward over the tree's nodes (root seq[n-1] at slot n-1, node i at slot n-1+i), then the path.

    Returns (path node ids (k+1,), next token, the target's features at the path's nodes or None).
    """
    N, dev = tree.size, seq.device
    slots = torch.arange(n - 1, n - 1 + N, device=dev)
    vis = visible(tree.anc, n - 1, target.max_seq_len)
    logits, h = target.step(tree.tokens[None], slots, n - 1 + N, hidden=hidden,
                            tree=(n - 1 + tree.depth, vis))
    if params.greedy:
        path, nxt = accept_greedy(tree, logits[0])
    else:
        path, nxt = accept_sampled(tree, logits_to_probs(logits[0], params))
    return path, nxt, None if h is None else h[0][path]


def tree_round(target, drafter, seq: torch.Tensor, n: int, budget: TreeBudget, params: SamplingParams, hidden,
               clock):
    """Grow a tree after seq[:n], verify it, keep the accepted path: seq, the target's cache and the drafter updated.

    Returns (nodes verified, accepted k, draft seconds, verify seconds, rank of each accepted node among its
    siblings; a round that accepted none: its first draft's, which tells a prompt-lookup round apart).
    """
    t0 = clock()
    tree = drafter.propose_tree(seq, n, budget, params)
    t1 = clock()
    path, nxt, h = verify_tree(target, seq, n, tree, params, hidden)
    k = path.shape[0] - 1  # one host sync (the path's length), as a chain's round has
    t2 = clock()
    seq[n:n + k] = tree.tokens[path[1:]]
    seq[n + k] = nxt
    if k:
        target.move_slots(n - 1 + path[1:], torch.arange(n, n + k, device=seq.device))
    drafter.commit(n + k + 1, h, n - 1)
    ranks = []
    if tree.rank is not None:  # none accepted: the first draft's rank, which tells a lookup round apart
        ranks = tree.rank[path[1:] if k else slice(1, 2)].tolist()
    return tree.size - 1, k, t1 - t0, t2 - t1, ranks
