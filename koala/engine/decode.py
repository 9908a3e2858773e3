"""Autoregressive and speculative decoding over static caches (after gpt-fast's `generate.py`).

Speculative sampling follows Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318):
draft gamma tokens from q, verify them in one target forward that yields p at every draft position, accept draft i
with probability min(1, p(x_i) / q(x_i)), on the first rejection resample from max(p - q, 0) renormalised, and when
every draft is accepted take a bonus token from p. The output is distributed exactly as the target's; with
temperature 0 both distributions are one-hot and the rule becomes exact-match acceptance.

Invariant between rounds: `seq[:n]` is final and the target's cache holds positions 0..n-2, so the next verify
forward feeds seq[n-1] followed by the drafts. A round may instead verify a draft tree (koala.engine.tree), which
keeps the same invariant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from koala.errors import KoalaError
from koala.engine.drafters import Drafter
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, logits_to_probs, sample
from koala.engine.tree import TreeBudget, tree_round
from koala.threads import share_cores

# Called after each round with (new tokens, how many of them were accepted drafts); the last one is the target's.
StreamFn = Callable[[list[int], int], None]


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only, cut at max_new_tokens and after the first EOS
    target_forwards: int  # prefill included
    wall_s: float
    accept_counts: list[int] = field(default_factory=list)  # accept_counts[k]: rounds that accepted k drafts
    finish_reason: str = "length"
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted m, accepted k) per speculative round
    draft_s: float = 0.0  # time in drafter.propose (measured when profile=True)
    verify_s: float = 0.0  # time in the target's verify forwards (measured when profile=True)
    tree: str | None = None  # the draft tree's shape (DEPTHxTOPKxNODES) when rounds verified trees
    ranks: list[list[int]] = field(default_factory=list)  # per tree round: each accepted node's rank among siblings
    # (a round that accepted none: its first draft's, which tells a prompt-lookup round apart)
    prefill_s: float = 0.0  # of wall_s, the prompt's forward up to the first new token (decoding is the rest)

    @property
    def tau(self) -> float:
        """Tokens per target forward, the bonus token included: 1.0 for plain decoding."""
        return len(self.tokens) / max(self.target_forwards, 1)


def accept_drafts(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule on whole tensors, with no host sync.

    Args:
        draft_tokens: (gamma,) proposed tokens.
        draft_probs: (gamma, V) q, the distributions they were drawn from.
        target_probs: (gamma + 1, V) p at each draft position plus the bonus position.

    Returns:
        (n_accepted, next_token): 0-dim tensors; next_token is the correction drawn from max(p - q, 0) at the first
        rejection, or the bonus token from p when all gamma drafts were accepted.
    """
    gamma = draft_tokens.shape[0]
    idx = draft_tokens[:, None]
    p = target_probs[:gamma].gather(-1, idx).squeeze(-1)  # (gamma,) p(x_i)
    q = draft_probs.gather(-1, idx).squeeze(-1)  # (gamma,) q(x_i)
    accepted = torch.rand_like(p) < p / q  # u < 1 always accepts when p >= q; q(x_i) > 0 since x_i ~ q
    n_accepted = accepted.long().cumprod(0).sum()  # length of the all-accepted prefix
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(1, target_probs.shape[-1])])  # row gamma: bonus, residual = p
    residual = (target_probs[n_accepted] - q_pad[n_accepted]).clamp_min(0)
    mass = residual.sum()
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs[n_accepted])
    return n_accepted, sample(residual)


def accept_greedy_chain(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding's rejection rule, on token ids: the drafts that match the target's argmax in order, then the
    target's argmax after them. What `accept_drafts` returns for one-hot p and q, without building either.

    Args:
        draft_tokens: (gamma,) proposed tokens.
        target_logits: (gamma + 1, V) the target's logits at each draft position plus the bonus position.
    """
    best = target_logits.argmax(-1)  # (gamma + 1,): as logits_to_probs picks the one-hot's token
    n_accepted = (draft_tokens == best[:-1]).long().cumprod(0).sum()
    return n_accepted, best[n_accepted]


def _check_lengths(prompt_len: int, max_new_tokens: int, max_context: int, gamma: int) -> int:
    if prompt_len == 0:
        raise KoalaError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise KoalaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len >= max_context:
        raise KoalaError(
            f"prompt has {prompt_len} tokens but the target's context is {max_context}: shorten the prompt"
        )
    if prompt_len + max_new_tokens > max_context:
        raise KoalaError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the target's context "
            f"({max_context}): lower max_new_tokens to at most {max_context - prompt_len}"
        )
    need = prompt_len + max_new_tokens + gamma + 1
    return -(-need // 256) * 256  # round up, so caches are reused across prompts of similar length


def check_drafter(target: Transformer, drafter: Drafter | None, gamma: int) -> None:
    if drafter is None:
        return
    if gamma < 1:
        raise KoalaError(f"gamma must be >= 1, got {gamma}")
    vocab = target.args.vocab_size
    if drafter.vocab_size is not None and drafter.vocab_size != vocab:
        raise KoalaError(
            f"drafter {drafter.name} has a vocabulary of {drafter.vocab_size} tokens, the target's has {vocab}: "
            "train the drafter with the target's tokenizer"
        )


def prefill(target: Transformer, seq: torch.Tensor, T: int, params: SamplingParams, hidden: bool):
    """The whole prompt seq[:T] in one forward; returns the first new token and, for heads, the features."""
    logits, h = target.step(seq[None, :T], torch.arange(T, device=seq.device), T, hidden=hidden, eager=True,
                            last_logits=True)
    return sample(logits_to_probs(logits[0, -1], params), greedy=params.greedy), h


def decode_one_token(target: Transformer, seq: torch.Tensor, n: int, params: SamplingParams) -> torch.Tensor:
    """A plain step: feed seq[n-1], return the token for position n."""
    logits, _ = target.step(seq[None, n - 1:n], torch.tensor([n - 1], device=seq.device), n)
    return sample(logits_to_probs(logits[0, -1], params), greedy=params.greedy)


def verify(target: Transformer, seq: torch.Tensor, n: int, m: int, drafts: torch.Tensor, q: torch.Tensor,
           params: SamplingParams, hidden: bool):
    """One target forward over seq[n-1] and the m drafts in seq[n:n+m], then the rejection rule.

    Returns (n_accepted, next token, the target's features at the m + 1 positions or None). A compiled target runs
    every width from 2 up as one graph (koala.engine.compile), so a short draft costs no recompilation.
    """
    logits, h = target.step(seq[None, n - 1:n + m], torch.arange(n - 1, n + m, device=seq.device), n + m,
                            hidden=hidden)
    if params.greedy:  # one-hot p and q: the rule reduces to matching argmaxes (no (m + 1) x V tensors)
        k, nxt = accept_greedy_chain(drafts, logits[0])
    else:
        k, nxt = accept_drafts(drafts, q, logits_to_probs(logits[0], params))
    return k, nxt, None if h is None else h[0]


def speculative_round(target: Transformer, drafter: Drafter, seq: torch.Tensor, n: int, gamma: int,
                      params: SamplingParams, threshold: float | None, hidden: bool, profile: bool):
    """Draft after seq[:n], verify in one target forward, write the accepted drafts and the next token into seq.

    Returns (drafted m, accepted k, draft seconds, verify seconds); the times are 0 unless `profile`.
    """
    dev = seq.device
    t0 = _clock(dev, profile)
    drafts, q = drafter.propose(seq, n, gamma, params, threshold=threshold)
    m = drafts.shape[0]  # gamma, or fewer when drafting stopped at an unconfident token
    seq[n:n + m] = drafts
    t1 = _clock(dev, profile)
    k, nxt, h = verify(target, seq, n, m, drafts, q, params, hidden)
    k = int(k)  # the one host sync of a round: the next round's shapes depend on it
    t2 = _clock(dev, profile)
    seq[n + k] = nxt
    drafter.commit(n + k + 1, None if h is None else h[:k + 1], n - 1)
    return m, k, t1 - t0, t2 - t1


@torch.no_grad()
def generate(
    target: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    drafter: Drafter | None = None,
    gamma: int = 4,
    params: SamplingParams = SamplingParams(),
    eos_ids: set[int] | frozenset[int] = frozenset(),
    max_context: int | None = None,
    stream: StreamFn | None = None,
    profile: bool = False,
    threshold: float | None = None,
    tree: TreeBudget | None = None,
) -> GenerationResult:
    """Decode after `prompt`, autoregressively (drafter None) or speculatively with `drafter` proposing gamma tokens,
    or a draft tree of shape `tree` (koala.engine.tree; a tree of top-k 1 is the chain of `tree.depth` drafts).

    `target` is the engine model (eager, or compiled with `Transformer.compile`); `prompt` token ids with the chat
    template applied; `params` (temperature, top-p) apply identically to target and drafter; generation stops after
    `max_new_tokens` or any of `eos_ids`; `max_context` is the target's context; `stream` gets each round's new
    tokens. `threshold`: from the second draft on (`drafters.FIRST_DRAFT_FREE`), draft only while the drafter's
    probability of its token is at least this (decided by the drafter alone, so the output distribution is
    unchanged; chains only: a tree's size is its budget). `profile` times drafter and verify forwards apart (a
    device sync on CUDA: keep it off for runs whose wall time is reported).

    Raises:
        KoalaError: empty prompt, prompt or generation longer than the context, gamma < 1, vocabulary mismatch.
    """
    seq, gamma, tree = _start(target, drafter, prompt, max_new_tokens, max_context, gamma, tree, params.greedy)
    T, hidden = len(prompt), drafter is not None and drafter.needs_hidden
    start = time.perf_counter()
    seq[T], h = prefill(target, seq, T, params, hidden)
    n, forwards, draft_s, verify_s = T + 1, 1, 0.0, 0.0
    if h is not None:
        drafter.commit(n, h[0], 0)
    accept_counts, rounds, ranks = [0] * (_longest_round(drafter, gamma, tree) + 1), [], []
    emitted, prefill_s = [int(seq[T])], time.perf_counter() - start  # the first token read, then the clock
    if stream:
        stream(emitted[:], 0)

    while len(emitted) < max_new_tokens and not (eos_ids and emitted[-1] in eos_ids):
        share_cores(target.device)
        m, k, t_draft, t_verify, r = _round(target, drafter, seq, n, gamma, tree, params, threshold, hidden, profile)
        if drafter is not None:
            draft_s, verify_s = draft_s + t_draft, verify_s + t_verify
            accept_counts[k] += 1
            rounds.append((m, k))
            ranks += [] if r is None else [r]
        new = _until_eos(seq[n:n + k + 1].tolist(), eos_ids)[:max_new_tokens - len(emitted)]
        emitted += new
        if stream:
            stream(new, k)
        n, forwards = n + k + 1, forwards + 1

    if target.device.type == "cuda":
        torch.cuda.synchronize()
    wall, tokens = time.perf_counter() - start, emitted[:max_new_tokens]
    reason = "eos" if eos_ids and tokens[-1] in eos_ids else "length"
    return GenerationResult(tokens, forwards, wall, accept_counts, reason, rounds, draft_s, verify_s,
                            None if tree is None else str(tree), ranks, prefill_s)


def _round(target, drafter, seq, n, gamma, tree, params, threshold, hidden, profile):
    """One round after seq[:n]: a plain step, a chain or a tree. Returns (drafted, accepted k, draft seconds,
    verify seconds, the accepted nodes' ranks among their siblings or None) and leaves seq[n:n + k + 1] final."""
    if drafter is None:
        seq[n] = decode_one_token(target, seq, n, params)
        return 0, 0, 0.0, 0.0, None
    if tree is not None:
        return tree_round(target, drafter, seq, n, tree, params, hidden, lambda: _clock(seq.device, profile))
    return (*speculative_round(target, drafter, seq, n, gamma, params, threshold, hidden, profile), None)


def _start(target: Transformer, drafter: Drafter | None, prompt: list[int], max_new_tokens: int,
           max_context: int | None, gamma: int, tree: TreeBudget | None, greedy: bool = True):
    """Check the request, size the caches (room past the last token for a chain's or a tree's drafts), and return
    the sequence buffer with the prompt written in, gamma (a tree's depth) and the tree (None for a chain; sampled,
    with all its depth x top-k draws, which a sampled tree keeps)."""
    if tree is not None and (tree.is_chain or drafter is None):
        gamma, tree = tree.depth, None
    if tree is not None and not greedy:
        tree = TreeBudget(tree.depth, tree.topk, tree.drafter_slots)
    gamma = tree.depth if tree is not None else gamma  # the longest accepted path
    room = gamma if tree is None else max(tree.nodes, tree.drafter_slots) + 1
    room = max(room, _lookup_len(drafter) + (tree is not None))  # a lookup match's own length, where it has one
    check_drafter(target, drafter, gamma)
    max_len = _check_lengths(len(prompt), max_new_tokens, max_context or 1 << 30, room if drafter else 0)
    target.setup_caches(max_len)
    if drafter is not None:
        drafter.reset(max_len)
    seq = torch.zeros(max_len, dtype=torch.long, device=target.device)
    seq[:len(prompt)] = torch.tensor(prompt, device=target.device)
    return seq, gamma, tree


def _longest_round(drafter: Drafter | None, gamma: int, tree: TreeBudget | None) -> int:
    """The most drafts one round can accept: a chain's gamma, a tree's node count (a prompt-lookup match fills every
    verify slot of the shape) or a lookup match's own length where it is set, none without a drafter."""
    if drafter is None:
        return 0
    return max(gamma if tree is None else max(gamma, tree.nodes), _lookup_len(drafter))


def _lookup_len(drafter: Drafter | None) -> int:
    """How many tokens a prompt-lookup match drafts whatever the shape (`LookupFirstDrafter.lookup_len`), else 0."""
    return getattr(drafter, "lookup_len", None) or 0


def _until_eos(new: list[int], eos_ids) -> list[int]:
    """`new` cut after its first EOS token, if any."""
    if eos_ids and any(t in eos_ids for t in new):
        return new[:next(i for i, t in enumerate(new) if t in eos_ids) + 1]
    return new


def _clock(dev: torch.device, profile: bool) -> float:
    if not profile:
        return 0.0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()

