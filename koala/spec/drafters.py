"""The drafter interface, and the drafters that need no training: any causal LM, `truncate:N`, prompt lookup.

A drafter proposes `gamma` tokens after the current sequence together with the distribution it drew each from;
the engine verifies them. It keeps its own state (a KV cache, or nothing) and learns after each round how much of
the sequence is still valid (`commit`), so rejected drafts are simply written over in the next round.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from koala.errors import KoalaError
from koala.spec.model import Transformer
from koala.spec.sampling import SamplingParams, logits_to_probs, sample


class Drafter(Protocol):
    name: str
    vocab_size: int | None  # None: proposes only tokens it has seen (prompt lookup), any vocabulary fits
    needs_hidden: bool  # True: commit() receives the target's last hidden states (draft heads)

    def reset(self, max_seq_len: int) -> None: ...

    def propose(
        self, seq: torch.Tensor, n: int, gamma: int, params: SamplingParams, stop_below: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft after seq[:n]: tokens (m,) and the distributions they were drawn from (m, V), m <= gamma.

        With `stop_below`, drafting may stop before a token whose draft probability is below it (m < gamma).
        """
        ...

    def commit(self, n_valid: int, hidden: torch.Tensor | None = None, start: int = 0) -> None:
        """seq[:n_valid] is final; `hidden` (T, C) holds the target's states for positions start..start+T-1."""
        ...


DRAFT_VOCAB = "draft_vocab.safetensors"


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
        q = torch.zeros(*q_k.shape[:-1], self.vocab_size, device=q_k.device).scatter_(
            -1, self.ids.expand(*q_k.shape[:-1], -1), q_k)
        return t, q


def confident(logits: torch.Tensor, stop_below: float | None) -> torch.Tensor | bool:
    """Whether to draft from these logits: the drafter's top probability (temperature 1) reaches `stop_below`.

    Decided from the distribution before drawing, never from the drawn token, so the draft stays a draw from q
    and the rejection rule stays exact.
    """
    if stop_below is None:
        return True
    return torch.softmax(logits.float(), -1).amax(-1) >= stop_below


def _stack(tokens: list, probs: list, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) tokens and (m, V) distributions; m may be 0."""
    if not tokens:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, vocab, device=device)
    return torch.stack(tokens), torch.stack(probs)


def draft_vocab_ids(token_counts: torch.Tensor, k: int) -> torch.Tensor:
    """The k most frequent tokens (counts (V,)), sorted: the drafter's vocabulary."""
    return token_counts.topk(min(k, int((token_counts > 0).sum()) or k)).indices.sort().values


def save_draft_vocab(directory, ids: torch.Tensor) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    save_file({"ids": ids.contiguous()}, str(Path(directory) / DRAFT_VOCAB))


def load_draft_vocab(directory) -> torch.Tensor | None:
    """The draft vocabulary saved beside a drafter (sorted token ids), or None: it drafts over the full vocabulary."""
    from pathlib import Path

    from safetensors.torch import load_file

    import json

    d = Path(str(directory).removeprefix("heads:"))
    f = d / DRAFT_VOCAB
    if f.exists():
        try:
            return load_file(f)["ids"].long()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise KoalaError(f"{f} is damaged ({e}): copy the drafter again or retrain it") from None
    for name in ("koala.json", "heads.json"):  # saved with a draft vocabulary, but the file is gone
        info = json.loads((d / name).read_text()) if (d / name).exists() else {}
        if info.get("draft_vocab_size"):
            raise KoalaError(f"{d} lacks {DRAFT_VOCAB} (its {name} says it drafts over {info['draft_vocab_size']} "
                             "tokens): copy the whole drafter directory again")
    return None


class ModelDrafter:
    """An independent causal LM sharing the target's vocabulary, run in koala's static-cache engine."""

    needs_hidden = False

    def __init__(self, model: Transformer, name: str = "model", draft_vocab: DraftVocab | None = None):
        self.model, self.name, self.draft_vocab = model, name, draft_vocab
        self.vocab_size = model.args.vocab_size
        self.n_cached = 0  # seq[:n_cached] is in this drafter's KV cache

    def reset(self, max_seq_len: int) -> None:
        self.model.setup_caches(max_seq_len)
        self.n_cached = 0

    @torch.no_grad()
    def propose(self, seq, n, gamma, params, stop_below=None):
        dev = seq.device
        dv = self.draft_vocab
        # Feed what the cache lacks: the prompt at first, then 1 token (a correction) or 2 (last draft + bonus);
        # a feed of varying width runs eager, the one-token draft steps compiled when the model is.
        pos = torch.arange(self.n_cached, n, device=dev)
        out = self.model.step(seq[self.n_cached:n][None], pos, n, return_hidden=dv is not None, head=dv is None,
                              eager=n - self.n_cached != 1)
        tokens, probs, fed = [], [], 0
        for i in range(gamma):
            logits = out[0, -1] if dv is None else dv.logits(out[1][0, -1])
            if not bool(confident(logits, stop_below)):
                break  # not confident: verifying a draft here would likely waste its slot
            if dv is None:
                q = logits_to_probs(logits, params)
                t = sample(q, greedy=params.greedy)
            else:
                t, q = dv.pick(logits, params)
            tokens.append(t)
            probs.append(q)
            if i < gamma - 1:
                out = self.model.step(t.view(1, 1), torch.tensor([n + i], device=dev), n + i + 1,
                                      return_hidden=dv is not None, head=dv is None)
                fed += 1
        self.n_cached = n + fed
        return _stack(tokens, probs, self.vocab_size, dev)

    def commit(self, n_valid, hidden=None, start=0):
        # Cached drafts d1..dk at positions n..n+k-1 were accepted; the token at n_valid - 1 is new to the drafter.
        self.n_cached = min(self.n_cached, n_valid - 1)


class PromptLookupDrafter:
    """Prompt lookup decoding (Saxena 2023): copy what followed the latest earlier match of the last n-gram.

    With no match it proposes nothing, and the round is a plain target step: a guessed draft would only cost its
    verification slot (on a CPU each extra verified token costs a few percent of a step).
    """

    needs_hidden = False
    vocab_size = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, vocab_size: int | None = None):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"ngram:{max_ngram}"
        self.target_vocab = vocab_size

    def reset(self, max_seq_len: int) -> None:
        pass

    def propose(self, seq, n, gamma, params, stop_below=None):
        ids = seq[:n].tolist()  # host-side search: this baseline has no device work to keep on the device
        draft: list[int] = []
        for size in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            tail = ids[n - size:]
            for start in range(n - size - 1, -1, -1):
                if ids[start:start + size] == tail:
                    draft = ids[start + size:start + size + gamma]
                    break
            if draft:
                break
        tokens = torch.tensor(draft, dtype=torch.long, device=seq.device)
        # q is one-hot: the rejection rule then accepts token x with probability p(x), which keeps sampling exact.
        return tokens, F.one_hot(tokens, self.target_vocab).float()

    def commit(self, n_valid, hidden=None, start=0):
        pass


class LookupFirstDrafter:
    """Prompt lookup where the context repeats itself, the trained drafter everywhere else (`lookup+SPEC`).

    A lookup draft costs nothing to make, so it goes first; the drafter proposes only when the last n-gram has no
    earlier match. Which of the two drafts depends on the context alone, so each round's draft is still a draw
    from the q it reports and the output stays the target's. The drafter sees every commit, so its cache and
    features stay current and it catches up on the tokens it skipped the next time it is asked.
    """

    def __init__(self, drafter: Drafter, max_ngram: int = 3):
        self.drafter = drafter
        self.lookup = PromptLookupDrafter(max_ngram, vocab_size=drafter.vocab_size)
        self.name = f"lookup+{drafter.name}"
        self.vocab_size = drafter.vocab_size
        self.needs_hidden = drafter.needs_hidden
        self.max_gamma = getattr(drafter, "max_gamma", None)

    def reset(self, max_seq_len: int) -> None:
        self.drafter.reset(max_seq_len)

    def propose(self, seq, n, gamma, params, stop_below=None):
        if self.vocab_size is not None:  # one-hot lookup drafts over the target's vocabulary
            tokens, q = self.lookup.propose(seq, n, gamma, params)
            if tokens.numel():
                return tokens, q
        return self.drafter.propose(seq, n, gamma, params, stop_below)

    def commit(self, n_valid, hidden=None, start=0):
        self.drafter.commit(n_valid, hidden, start)


def drafter_models(drafter) -> list[Transformer]:
    """The engine models a drafter runs (none for prompt lookup; the inner drafter's behind lookup+)."""
    inner = getattr(drafter, "drafter", None)
    if inner is not None:
        return drafter_models(inner)
    return [m for m in (getattr(drafter, "model", None), getattr(drafter, "engine", None)) if isinstance(m, Transformer)]


def check_drafter_spec(spec: str) -> None:
    """Validate a drafter spec without loading anything (the CLI calls it before the target loads): its syntax, that
    the files it names exist and are whole (safetensors headers against file sizes, a .gguf against its .sha256, the
    draft vocabulary its metadata promises).

    Raises:
        KoalaError: naming the spec and the fix.
    """
    from pathlib import Path

    from koala.io import check_safetensors
    from koala.targets import _resolve

    if spec.startswith("lookup+"):
        return check_drafter_spec(spec[len("lookup+"):])
    if spec.startswith("truncate:"):
        if not spec.split(":", 1)[1].isdigit() or int(spec.split(":", 1)[1]) < 1:
            raise KoalaError(f"drafter {spec!r}: write truncate:N with N >= 1 a number of layers, e.g. truncate:2")
        return
    if spec == "ngram" or spec.startswith("ngram:"):
        n = spec.split(":", 1)[1] if ":" in spec else "3"
        if not n.isdigit() or int(n) < 1:
            raise KoalaError(f"drafter {spec!r}: write ngram:N with N >= 1 the longest n-gram to look up, e.g. ngram:3")
        return
    if spec.startswith("heads:"):
        from koala.drafters.heads import HEADS_JSON, HEADS_WEIGHTS

        p = Path(spec.split(":", 1)[1])
        if not (p / HEADS_JSON).exists() or not (p / HEADS_WEIGHTS).exists():
            raise KoalaError(f"drafter {spec!r}: {p} holds no draft heads ({HEADS_JSON} + {HEADS_WEIGHTS}): train "
                             "them with `koala heads --out DIR` and pass heads:DIR/heads")
        check_safetensors(p / HEADS_WEIGHTS)
        load_draft_vocab(p)
        return
    _resolve(spec, role="drafter")  # unknown names, missing files, directories without weights, a bad .gguf
    p = Path(spec)
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")):
            check_safetensors(f)
        load_draft_vocab(p)


def load_drafter(spec: str, target: Transformer, dtype: str = "float32", device: str = "cpu") -> Drafter:
    """A drafter from its spec.

    Args:
        spec: `truncate:N` (the target's first N layers), `ngram[:N]` (prompt lookup), `heads:PATH` (draft heads),
            or any causal LM: a koala drafter directory, a model directory, a Hugging Face id or a .gguf file;
            `lookup+SPEC` puts prompt lookup in front of any of these.
        target: the engine model of the target (truncate and heads share its weights).

    Raises:
        KoalaError: a malformed spec or a drafter that cannot be loaded.
    """
    check_drafter_spec(spec)
    if spec.startswith("lookup+"):
        return LookupFirstDrafter(load_drafter(spec[len("lookup+"):], target, dtype, device))
    if spec.startswith("truncate:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise KoalaError(f"drafter {spec!r}: write truncate:N with N a number of layers, e.g. truncate:2") from None
        return ModelDrafter(target.truncated(n), name=spec)
    if spec == "ngram" or spec.startswith("ngram:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 3  # check_drafter_spec validated it
        return PromptLookupDrafter(max_ngram=n, vocab_size=target.args.vocab_size)
    if spec.startswith("heads:"):
        from koala.drafters.heads import load_heads_drafter

        return load_heads_drafter(spec.split(":", 1)[1], target)
    from koala.targets import load_target

    t = load_target(spec, dtype=dtype, device=device, role="drafter")
    engine = Transformer(t.model)
    from pathlib import Path

    dv = DraftVocab.load(spec, t.model.lm_head, engine.args.vocab_size) if Path(spec).is_dir() else None
    d = ModelDrafter(engine, name=spec, draft_vocab=dv)
    d.source = spec  # where its stored metrics live (koala.spec.calibrate.stored_acceptance)
    return d
