"""The drafter interface and every drafter the engine runs: causal LMs (any model, `truncate:N`), Medusa and EAGLE
heads, and prompt lookup.

A drafter proposes `gamma` tokens after the current sequence together with the distribution it drew each from;
the engine verifies them. It keeps its own state (a KV cache, or nothing) and learns after each round how much of
the sequence is still valid (`commit`), so rejected drafts are simply written over in the next round. Model-backed
drafters that draft a chain token by token (a causal LM, EAGLE) share one draft loop (`ChainDrafter`).
Which drafter a spec string names is decided in koala.engine.drafter_spec.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from koala.engine.compile import AotStep
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, logits_to_probs, sample
from koala.engine.tree import LOOKUP_RANK, Tree, TreeBudget, chain_tree, grow, visible
from koala.errors import KoalaError
from koala.models.vocab import load_draft_vocab

class Drafter(Protocol):
    name: str
    vocab_size: int | None  # None: proposes only tokens it has seen (prompt lookup), any vocabulary fits
    # True: commit() receives the target's features (what its LM head reads); a tuple of layer indices: the residual
    # stream at those layers' inputs, concatenated (EAGLE-3); False: nothing
    needs_hidden: bool | tuple[int, ...]

    def reset(self, max_seq_len: int) -> None: ...

    def propose(
        self, seq: torch.Tensor, n: int, gamma: int, params: SamplingParams, threshold: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft after seq[:n]: tokens (m,) and the distributions they were drawn from (m, V), m <= gamma.

        With `threshold`, drafting may stop before a token whose draft probability is below it (m < gamma).
        """
        ...

    def commit(self, n_valid: int, hidden: torch.Tensor | None = None, start: int = 0) -> None:
        """seq[:n_valid] is final; `hidden` (T, C) holds the target's states for positions start..start+T-1."""
        ...

    def propose_tree(self, seq: torch.Tensor, n: int, budget: TreeBudget, params: SamplingParams) -> Tree:
        """Draft a tree after seq[:n] (koala.engine.tree): its root is seq[n-1]. Every drafter here has one."""
        ...


class DraftVocab:
    """Draft over the K most frequent tokens only (FR-Spec, Zhao et al. 2025): the drafter's head costs K/V as much.

    The draft distribution q is zero outside the subset, which the rejection rule handles exactly (greedy: a token
    outside the subset is simply never proposed), so the output stays the target's.
    """

    def __init__(self, ids: torch.Tensor, lm_head: torch.nn.Linear, vocab_size: int):
        self.ids = ids.to(lm_head.weight.device).long()  # (K,)
        self.weight = lm_head.weight.detach()[self.ids]  # (K, C): a copy, K/V of the full head
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, directory, lm_head, vocab_size) -> "DraftVocab | None":
        ids = load_draft_vocab(directory)
        return None if ids is None else cls(ids, lm_head, vocab_size)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Features (..., C) -> logits over the subset (..., K)."""
        return (h @ self.weight.T).float()

    def pick(self, logits_k: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Subset logits (..., K) -> (token ids (...), q over the full vocabulary (..., V))."""
        q_k = logits_to_probs(logits_k, params)  # (..., K)
        t = self.ids[sample(q_k, greedy=params.greedy)]
        return t, self.full(q_k)

    def full(self, q_k: torch.Tensor) -> torch.Tensor:
        """Probabilities over the subset (..., K) -> over the full vocabulary (..., V), zero outside the subset."""
        return torch.zeros(*q_k.shape[:-1], self.vocab_size, device=q_k.device).scatter_(
            -1, self.ids.expand(*q_k.shape[:-1], -1), q_k)

    def grow_args(self) -> dict:
        """The draft-vocabulary mappings `koala.engine.tree.grow` takes."""
        return {"to_vocab": lambda i: self.ids[i], "full_probs": self.full}


# A threshold never drops a chain's first draft: verifying it beside the target's own token costs about a plain
# step (exactly one on a compiled CPU engine, whose one-token step runs its 2-token package), and the drafter step
# that gave its distribution runs every round anyway. An unconfident first draft is proposed alone: no drafter step
# is spent on the draft after it. False restores a first draft dropped like any other (bench/threshold.py).
FIRST_DRAFT_FREE = True


def wide_eager(engine: Transformer) -> bool:
    """Whether a drafter's feed of several tokens (a catch-up after a round, a tree level) runs eager. Not where the
    engine's steps are compiled ahead of time: its one wide step serves every width and is built once per machine.
    On a CPU otherwise yes: compiling one more graph per process costs minutes for a step of a few milliseconds."""
    return engine.device.type == "cpu" and not isinstance(engine.compiled, AotStep)


def confident(logits: torch.Tensor, threshold: float | None) -> torch.Tensor | bool:
    """Whether to draft from these logits: the drafter's top probability (temperature 1) reaches `threshold`.

    Decided from the distribution before drawing, never from the drawn token, so the draft stays a draw from q
    and the rejection rule stays exact. A chain's first draft is kept whatever its probability (`FIRST_DRAFT_FREE`).
    """
    if threshold is None:
        return True
    return torch.softmax(logits.float(), -1).amax(-1) >= threshold


def _stack(tokens: list, probs: list, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) tokens and (m, V) distributions; m may be 0."""
    if not tokens:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, vocab, device=device)
    return torch.stack(tokens), torch.stack(probs)


class ChainDrafter:
    """The draft loop of every drafter that drafts a chain token by token from an engine model with its own cache.

    A subclass says how to catch its cache up on the sequence (`_catch_up`), how to feed it one drafted token
    (`_feed`) and how to feed it a level of a draft tree (`_tree_feed`); each returns the step's (logits or None,
    features or None), from which `_dist` reads the next draft distribution: the full LM head's logits, or the draft
    vocabulary's over the features. Heads also pass each step's `_state` on to the steps after it.
    """

    name: str
    vocab_size: int
    draft_vocab: "DraftVocab | None"
    n_cached: int

    def _catch_up(self, seq: torch.Tensor, n: int) -> tuple:
        raise NotImplementedError

    def _feed(self, token: torch.Tensor, out: tuple, n: int, i: int) -> tuple:
        raise NotImplementedError

    def _tree_feed(self, tokens: torch.Tensor, states: torch.Tensor | None, slots: torch.Tensor, end: int,
                   tree: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        """Feed tree nodes `tokens` (W,) at cache `slots` with `tree` (positions, visible); `states` (W, C): the
        state of each node's parent step (heads), else None. Call `_tree_step` with the engine's step arguments."""
        raise NotImplementedError

    def _tree_step(self, *args, **kwargs) -> tuple:
        """A tree level through the drafter's engine: compiled where the engine is (see `wide_eager`)."""
        engine = self._engine()
        return engine.step(*args, **kwargs, eager=wide_eager(engine))

    def _tree_base(self, n: int) -> int:
        """The first cache slot (and rotary position) of a tree's depth-1 nodes: the slot after the cached prefix."""
        return n

    def _engine(self) -> Transformer:
        return self.model

    def _dist(self, out: tuple) -> torch.Tensor:
        """(T, V') draft logits after each row of a step's output."""
        return out[0][0] if self.draft_vocab is None else self.draft_vocab.logits(out[1][0])

    def _state(self, out: tuple) -> torch.Tensor | None:
        """(T, C) what the step after each row reads besides its token (heads: the predicted feature); else None."""
        return None

    @torch.no_grad()
    def propose_tree(self, seq, n, budget, params):
        out = self._catch_up(seq, n)
        state = self._state(out)
        M, S = 1 + budget.drafter_slots, budget.drafter_slots
        states = None if state is None else state.new_zeros(M, state.shape[-1])
        if states is not None:
            states[0] = state[-1]  # the root's: depth-1 nodes read it
        anc = torch.zeros(M, S, dtype=torch.bool, device=seq.device)  # tree slots each node's step sees
        base, used, width = self._tree_base(n), 0, self._engine().max_seq_len

        def expand(ids, tokens, parents, d):
            nonlocal used
            W = ids.shape[0]
            own = torch.arange(used, used + W, device=seq.device)
            seen = anc[parents]
            seen[torch.arange(W, device=seq.device), own] = True
            anc[ids] = seen
            pos = torch.full((W,), base + d - 2, dtype=torch.long, device=seq.device)
            o = self._tree_feed(tokens, None if states is None else states[parents], base + own, base + used + W,
                                (pos, visible(seen, base, width)))
            used += W
            if states is not None:
                states[ids] = self._state(o)
            return self._dist(o)

        dv = self.draft_vocab
        return grow(seq[n - 1], self._dist(out)[-1], expand, budget, params, **(dv.grow_args() if dv else {}))

    @torch.no_grad()
    def propose(self, seq, n, gamma, params, threshold=None):
        dv = self.draft_vocab
        out = self._catch_up(seq, n)
        tokens, probs, fed = [], [], 0
        for i in range(gamma):
            logits = self._dist(out)[-1]
            sure = bool(confident(logits, threshold))
            if not sure and (i or not FIRST_DRAFT_FREE):
                break  # not confident: verifying a draft here would likely waste its slot
            if dv is None:
                q = logits_to_probs(logits, params)
                t = sample(q, greedy=params.greedy)
            else:
                t, q = dv.pick(logits, params)
            tokens.append(t)
            probs.append(q)
            if not sure:
                break  # an unconfident first draft goes alone (`FIRST_DRAFT_FREE`): no drafter step for a second
            if i < gamma - 1:
                out = self._feed(t, out, n, i)
                fed += 1
        self.n_cached += fed  # the drafts fed: commit() drops those rejected
        return _stack(tokens, probs, self.vocab_size, seq.device)


class ModelDrafter(ChainDrafter):
    """An independent causal LM sharing the target's vocabulary, run in koala's static-cache engine."""

    needs_hidden = False

    def __init__(self, model: Transformer, name: str = "model", draft_vocab: DraftVocab | None = None):
        self.model, self.name, self.draft_vocab = model, name, draft_vocab
        self.vocab_size = model.args.vocab_size
        self.n_cached = 0  # seq[:n_cached] is in this drafter's KV cache

    def reset(self, max_seq_len: int) -> None:
        self.model.setup_caches(max_seq_len)
        self.n_cached = 0

    def _catch_up(self, seq, n):
        # Feed what the cache lacks: the prompt at first, then 1 token (a correction) or 2 (last draft + bonus);
        # the one-token draft steps run compiled when the model is, a wider feed as `wide_eager` says.
        pos = torch.arange(self.n_cached, n, device=seq.device)
        dv = self.draft_vocab
        out = self.model.step(seq[self.n_cached:n][None], pos, n, hidden=dv is not None, logits=dv is None,
                              eager=n - self.n_cached != 1 and wide_eager(self.model))
        self.n_cached = n
        return out

    def _feed(self, token, out, n, i):
        dv = self.draft_vocab
        return self.model.step(token.view(1, 1), torch.tensor([n + i], device=token.device), n + i + 1,
                               hidden=dv is not None, logits=dv is None)

    def _tree_feed(self, tokens, states, slots, end, tree):
        dv = self.draft_vocab
        return self._tree_step(tokens[None], slots, end, hidden=dv is not None, logits=dv is None, tree=tree)

    def commit(self, n_valid, hidden=None, start=0):
        # Cached drafts d1..dk at positions n..n+k-1 were accepted; the token at n_valid - 1 is new to the drafter.
        # (A tree round's drafts sit in other slots and were never counted as cached.)
        self.n_cached = min(self.n_cached, n_valid - 1)


class PromptLookupDrafter:
    """Prompt lookup decoding (Saxena 2023): copy what followed the latest earlier match of the last n-gram.

    With no match it proposes nothing, and the round is a plain target step: a guessed draft would only cost its
    verification slot (on a CPU each extra verified token costs a few percent of a step).
    """

    needs_hidden = False
    vocab_size = None

    def __init__(self, max_ngram: int = 3, vocab_size: int | None = None, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise KoalaError(f"prompt lookup's n-gram sizes {min_ngram}..{max_ngram} are empty: give 1 <= min_ngram "
                             f"<= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"ngram:{max_ngram}"
        self.target_vocab = vocab_size

    def reset(self, max_seq_len: int) -> None:
        pass

    def match(self, ids: list[int], gamma: int) -> tuple[int, list[int]]:
        """(size of the longest n-gram of at least `min_ngram` tokens ending `ids` that occurred before, up to
        `gamma` tokens that followed its latest earlier occurrence); (0, []) when there is none."""
        n = len(ids)
        for size in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            tail = ids[n - size:]
            for start in range(n - size - 1, -1, -1):
                if ids[start:start + size] == tail:
                    return size, ids[start + size:start + size + gamma]
        return 0, []

    def propose(self, seq, n, gamma, params, threshold=None):
        # host-side search: this baseline has no device work to keep on the device
        _, draft = self.match(seq[:n].tolist(), gamma)
        tokens = torch.tensor(draft, dtype=torch.long, device=seq.device)
        # q is one-hot: the rejection rule then accepts token x with probability p(x), which keeps sampling exact.
        return tokens, F.one_hot(tokens, self.target_vocab).float()

    def propose_tree(self, seq, n, budget, params, length: int | None = None):
        """The match as a one-branch tree of up to `length` tokens; by default filling the shape's verify slots
        (`budget.nodes` tokens, not just its depth). A match is copied text, and where the context repeats itself it
        goes on agreeing far past a drafter's depth."""
        tokens, q = self.propose(seq, n, length or max(budget.depth, budget.nodes), params)
        return chain_tree(seq[n - 1], tokens, None if params.greedy else q, rank=LOOKUP_RANK)

    def commit(self, n_valid, hidden=None, start=0):
        pass


class LookupFirstDrafter:
    """Prompt lookup where the context repeats itself, the trained drafter everywhere else (`lookup+SPEC`).

    A lookup draft costs nothing to make, so it goes first; the drafter proposes only where the last n-gram (of at
    least `min_ngram` tokens) has no earlier match. Which of the two drafts depends on the context alone, so each
    round's draft is still a draw from the q it reports and the output stays the target's. The drafter sees every
    commit, so its cache and features stay current and it catches up on the tokens it skipped the next time it is
    asked.

    `min_ngram` 2: the copy after a match of the last token alone agrees with the target's next token about one time
    in five (`bench/results/lookup_depth.json`: 19-21% on ShareGPT and MT-bench answers), less often than a trained
    drafter that pays at all, so such a position goes to the drafter. `lookup_len`: how many tokens a match drafts,
    whatever the drafter's shape (a match goes on agreeing far past a drafter's depth: 80% of 3-gram matches agree
    on their first token, about half through their fourth); None fills the shape's verify slots. `gamma: auto` sets
    it from the evaluation's probes and the measured cost by width (`koala.engine.calibrate.choose_lookup_len`).
    """

    def __init__(self, drafter: Drafter, max_ngram: int = 3, min_ngram: int = 2, lookup_len: int | None = None):
        if lookup_len is not None and lookup_len < 1:
            raise KoalaError(f"lookup_len {lookup_len}: give at least 1, or None to fill the drafter's shape")
        self.drafter = drafter
        self.lookup = PromptLookupDrafter(max_ngram, vocab_size=drafter.vocab_size, min_ngram=min_ngram)
        self.lookup_len = lookup_len
        self.matched = [0, 0]  # rounds and tokens lookup drafted, so far: the drafter's own cost is timed apart
        self.name = f"lookup+{drafter.name}"
        self.vocab_size = drafter.vocab_size
        self.needs_hidden = drafter.needs_hidden
        self.max_gamma = getattr(drafter, "max_gamma", None)

    def reset(self, max_seq_len: int) -> None:
        self.drafter.reset(max_seq_len)

    def propose(self, seq, n, gamma, params, threshold=None):
        if self.vocab_size is not None:  # one-hot lookup drafts over the target's vocabulary
            tokens, q = self.lookup.propose(seq, n, self.lookup_len or gamma, params)
            if tokens.numel():
                self._count(tokens.numel())
                return tokens, q
        return self.drafter.propose(seq, n, gamma, params, threshold)

    def propose_tree(self, seq, n, budget, params):
        """The lookup match as a one-branch tree where there is one, the drafter's tree everywhere else."""
        if self.vocab_size is not None:
            tree = self.lookup.propose_tree(seq, n, budget, params, self.lookup_len)
            if tree.size > 1:
                self._count(tree.size - 1)
                return tree
        return self.drafter.propose_tree(seq, n, budget, params)

    def _count(self, tokens: int) -> None:
        self.matched[0] += 1
        self.matched[1] += tokens

    def commit(self, n_valid, hidden=None, start=0):
        self.drafter.commit(n_valid, hidden, start)


def drafter_models(drafter) -> list[Transformer]:
    """The engine models a drafter runs (none for prompt lookup; the inner drafter's behind lookup+)."""
    inner = getattr(drafter, "drafter", None)
    if inner is not None:
        return drafter_models(inner)
    return [m for m in (getattr(drafter, "model", None), getattr(drafter, "engine", None)) if isinstance(m, Transformer)]


class _EagleLM(nn.Module):
    """Presents an EAGLE head to the engine as a causal LM: its decoder, the target's LM head."""

    def __init__(self, head: nn.Module, target_model):
        super().__init__()
        self.config = copy.copy(head.config)
        self.config.vocab_size = target_model.config.vocab_size
        self.model = head.decoder
        self.lm_head = target_model.lm_head


class MedusaDrafter:
    """Proposes one chain: the top-1 (or a draw) of each head on the target's latest known feature."""

    needs_hidden = True

    def __init__(self, heads: nn.Module, target: Transformer, name: str, draft_vocab: DraftVocab | None = None):
        self.heads, self.target, self.name, self.draft_vocab = heads, target, name, draft_vocab
        self.vocab_size = target.args.vocab_size
        self.max_gamma = len(heads.heads)  # one token per head
        self.feat: torch.Tensor | None = None

    def reset(self, max_seq_len: int) -> None:
        self.feat = torch.zeros(max_seq_len, self.target.args.dim, dtype=self.target.dtype, device=self.target.device)

    @torch.no_grad()
    def propose(self, seq, n, gamma, params, threshold=None):
        if gamma > len(self.heads.heads):
            raise KoalaError(f"gamma {gamma} exceeds the {len(self.heads.heads)} Medusa heads: use --gamma "
                             f"<= {len(self.heads.heads)}")
        # f_{n-2} is the newest target feature; head i on it predicts token n-1+i, i = 1..gamma
        hs = self.heads(self.feat[n - 2])[:gamma]  # (gamma, C)
        dv = self.draft_vocab
        logits = self.target.lm_head(hs).float() if dv is None else dv.logits(hs)
        if threshold is not None:  # keep the chain up to the first head that is not confident
            m = int(torch.as_tensor(confident(logits, threshold)).long().cumprod(0).sum())
            logits = logits[:max(m, 1) if FIRST_DRAFT_FREE else m]  # an unconfident first draft goes alone
        if dv is not None:
            return dv.pick(logits, params)
        q = logits_to_probs(logits, params)
        return sample(q, greedy=params.greedy), q

    @torch.no_grad()
    def propose_tree(self, seq, n, budget, params):
        """A tree from each head's top-k (head d proposes depth d's children, whatever their parent)."""
        depth = min(budget.depth, len(self.heads.heads))
        budget = TreeBudget(depth, budget.topk, budget.total)
        hs = self.heads(self.feat[n - 2])[:depth]
        dv = self.draft_vocab
        logits = self.target.lm_head(hs).float() if dv is None else dv.logits(hs)
        return grow(seq[n - 1], logits[0], lambda ids, tokens, parents, d: logits[d - 1].expand(ids.shape[0], -1),
                    budget, params, **(dv.grow_args() if dv else {}))

    def commit(self, n_valid, hidden=None, start=0):
        if hidden is not None:
            self.feat[start:start + hidden.shape[0]] = hidden


class EagleDrafter(ChainDrafter):
    """Runs the EAGLE head autoregressively on features: true ones where known, its own predictions after.

    EAGLE slot j reads (f_j, x_{j+1}) and predicts f_{j+1}; slots 0..n_cached-1 hold inputs built from true target
    features, later ones the head's own predictions, which commit() drops.
    """

    needs_hidden = True

    def __init__(self, head, target: Transformer, name: str, draft_vocab: DraftVocab | None = None):
        self.head, self.target, self.name, self.draft_vocab = head, target, name, draft_vocab
        self.engine = Transformer(_EagleLM(head, target.hf_model[0]))
        self.vocab_size = target.args.vocab_size
        self.n_cached = 0
        self.feat: torch.Tensor | None = None

    def reset(self, max_seq_len: int) -> None:
        self.engine.setup_caches(max_seq_len)
        self.feat = torch.zeros(max_seq_len, self.target.args.dim, dtype=self.target.dtype, device=self.target.device)
        self.n_cached = 0

    def _catch_up(self, seq, n):
        js = torch.arange(self.n_cached, n - 1, device=seq.device)
        x = self.head.fuse(self.feat[js], self.target.embed(seq[js + 1]))[None]
        out = self.engine.step(None, js, n - 1, embeds=x, hidden=True, logits=self.draft_vocab is None,
                               eager=js.numel() != 1 and wide_eager(self.engine))
        self.n_cached = n - 1
        return out

    def _feed(self, token, out, n, i):
        x = self.head.fuse(out[1][:, -1:], self.target.embed(token.view(1, 1)))
        return self.engine.step(None, torch.tensor([n - 1 + i], device=token.device), n + i, embeds=x, hidden=True,
                                logits=self.draft_vocab is None)

    def _tree_base(self, n):
        return n - 1  # slot j reads (f_j, x_{j+1}): the depth-1 nodes x_n go in slot n - 1

    def _engine(self):
        return self.engine

    def _state(self, out):
        return out[1][0]  # the predicted next feature

    def _tree_feed(self, tokens, states, slots, end, tree):
        x = self.head.fuse(states[None], self.target.embed(tokens[None]))
        return self._tree_step(None, slots, end, embeds=x, hidden=True, logits=self.draft_vocab is None, tree=tree)

    def commit(self, n_valid, hidden=None, start=0):
        if hidden is not None:
            self.feat[start:start + hidden.shape[0]] = hidden
        self.n_cached = min(self.n_cached, start)  # slots from `start` on were fed predicted features


class _Eagle3LM(nn.Module):
    """Presents an EAGLE-3 head to the engine as a causal LM: its layers and norm, the target's LM head."""

    def __init__(self, head: nn.Module, target_model):
        super().__init__()
        self.config = copy.copy(head.config)
        self.config.vocab_size = target_model.config.vocab_size
        self.model = nn.Module()
        self.model.embed_tokens, self.model.layers = target_model.model.embed_tokens, head.layers
        self.model.norm, self.model.rotary_emb = head.norm, head.rotary_emb
        self.lm_head = target_model.lm_head


class Eagle3Drafter(EagleDrafter):
    """Runs an EAGLE-3 head autoregressively: slot j reads [emb(x_{j+1}) ; fc(target states at j)] where the target's
    states are known, the head's own pre-norm output of the step before after that (which commit() drops)."""

    def __init__(self, head, target: Transformer, name: str, draft_vocab: DraftVocab | None = None):
        self.head, self.target, self.name, self.draft_vocab = head, target, name, draft_vocab
        self.needs_hidden = tuple(head.aux_layers)
        self.engine = Transformer(_Eagle3LM(head, target.hf_model[0]))
        self.engine.features_before_norm = True
        self.vocab_size = target.args.vocab_size
        self.n_cached = 0
        self.feat: torch.Tensor | None = None

    def reset(self, max_seq_len: int) -> None:
        self.engine.setup_caches(max_seq_len)
        A = len(self.needs_hidden) * self.target.args.dim
        self.feat = torch.zeros(max_seq_len, A, dtype=self.target.dtype, device=self.target.device)
        self.n_cached = 0

    def _dist(self, out):
        if self.draft_vocab is None:
            return out[0][0]
        from koala.engine.model import rms_norm  # the step returns the residual stream before the head's norm

        return self.draft_vocab.logits(rms_norm(out[1][0], self.head.norm.weight, self.head.config.rms_norm_eps))

    def _catch_up(self, seq, n):
        js = torch.arange(self.n_cached, n - 1, device=seq.device)
        x = torch.cat([self.target.embed(seq[js + 1]), self.head.fc(self.feat[js])], dim=-1)[None]
        out = self.engine.step(None, js, n - 1, embeds=x, hidden=True, logits=self.draft_vocab is None,
                               eager=js.numel() != 1 and wide_eager(self.engine))
        self.n_cached = n - 1
        return out

    def _feed(self, token, out, n, i):
        x = torch.cat([self.target.embed(token.view(1, 1)), out[1][:, -1:]], dim=-1)
        return self.engine.step(None, torch.tensor([n - 1 + i], device=token.device), n + i, embeds=x, hidden=True,
                                logits=self.draft_vocab is None)

    def _tree_feed(self, tokens, states, slots, end, tree):
        x = torch.cat([self.target.embed(tokens[None]), states[None]], dim=-1)
        return self._tree_step(None, slots, end, embeds=x, hidden=True, logits=self.draft_vocab is None, tree=tree)


HEAD_DRAFTERS = {"medusa": MedusaDrafter, "eagle": EagleDrafter, "eagle3": Eagle3Drafter}


def load_heads_drafter(path: str, target: Transformer):
    """`heads:PATH` for the engine: Medusa, EAGLE or EAGLE-3 heads on the given target."""
    from koala.models.heads import load_heads

    hf = target.hf_model[0]
    module, info = load_heads(path, hf)
    name = f"heads:{info['kind']}-K{info['layers']}{'-adv' if info.get('adversarial') else ''}"
    dv = DraftVocab.load(path, hf.lm_head, target.args.vocab_size)
    d = HEAD_DRAFTERS[info["kind"]](module, target, name, dv)
    d.source = path  # where its stored metrics live (koala.engine.calibrate.stored_acceptance)
    return d
