"""Sample the target on prompts, in batches: the responses a drafter is distilled on (Goel et al. 2024, stage 2).

Continuous batching over a static cache. `rows` sequences decode together, each in its own cache row at its own
slots (slot = position: no padding, no per-row offsets); when rows finish (EOS or max_new_tokens) the next prompts
are prefilled into them, so the decode step keeps one shape from the first prompt to the last: on a compiled engine
it is compiled once (replayed as a CUDA graph on a GPU). Each sample draws its randomness from a counter-based
generator keyed by the sample's seed (`counter_uniform`): its draws are the same in any batch, so a sample can be
reproduced on its own, its tokens equal up to floating-point differences between batch shapes (a near-tie).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from koala.interrupt import check
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, logits_to_probs, sample_seeded


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "eos" or "length"
    topk_ids: list[list[int]] | None = None  # (response_len, k) the teacher's top-k tokens at each position
    topk_logprobs: list[list[float]] | None = None  # (response_len, k) their log-probabilities (temperature 1)


PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward: bounds its activations, not a speed setting


def refill_threshold(rows: int) -> int:
    """Free rows that start a prefill of waiting prompts: an eighth of the rows. A prefill fills all the rows freed
    in as few forwards as fit (each a fixed cost on a GPU, beside its tokens), so waiting for a few rows to free up
    trades a little idle width for fewer prefills. Not tuned on a GPU yet (none was available)."""
    return max(1, rows // 8)


@torch.no_grad()
def generate_batch(
    engine: Transformer,
    prompts: list[list[int]],
    seeds: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    topk: int = 0,
    pad_id: int = 0,
    rows: int | None = None,
    refill_at: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[Sample]:
    """One response per prompt, in the prompts' order.

    Args:
        rows: sequences decoded together (default: every prompt at once); a finished row takes the next prompt.
        refill_at: free rows that start a prefill while prompts wait (default `refill_threshold(rows)`); the last
            waiting prompts, or an idle batch, are prefilled at once.
        on_done: called with the number of samples finished, as they finish (a progress bar).
    """
    if not prompts:
        return []
    batch = _Batch(engine, prompts, seeds, params, max_new_tokens, eos_ids, topk, pad_id,
                   max(1, min(rows or len(prompts), len(prompts))))
    refill_at = max(1, min(refill_at or refill_threshold(batch.B), batch.B))
    while True:
        free = batch.free
        if batch.waiting and (len(free) >= min(refill_at, len(batch.waiting)) or len(free) == batch.B):
            batch.prefill(free[:len(batch.waiting)])
        if len(batch.free) == batch.B:
            return batch.results
        check()  # SIGINT/SIGTERM: stop between decode steps
        tok, done = batch.draw()
        if bool(done.any()):  # the one host sync of a step
            finished = batch.harvest(done)
            if on_done:
                on_done(finished)
            if len(batch.free) == batch.B:
                continue  # every row finished: prefill the next prompts, or stop
        batch.decode(tok)


class _Batch:
    """The state of `generate_batch`: per row on the device its slot, draw count and seed; on the host which
    prompt it decodes (-1: free) and its fed slot minus the decode step number (for `end`)."""

    def __init__(self, engine, prompts, seeds, params, max_new_tokens, eos_ids, topk, pad_id, B):
        self.engine, self.prompts, self.seeds, self.params = engine, prompts, seeds, params
        self.max_new, self.eos_ids, self.topk, self.pad_id, self.B = max_new_tokens, eos_ids, topk, pad_id, B
        engine.setup_caches(max(len(p) for p in prompts) + max_new_tokens, batch=B)
        dev = self.dev = engine.device
        self.ar = torch.arange(B, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)  # the slot the row's next fed token is written at
        self.count = torch.zeros(B, dtype=torch.long, device=dev)  # tokens drawn so far by the row's sample
        self.seed = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        self.top_i = torch.zeros(B, max_new_tokens, max(topk, 1), dtype=torch.int32, device=dev)
        self.top_v = torch.zeros(B, max_new_tokens, max(topk, 1), dtype=torch.float16, device=dev)
        self.eos = torch.tensor(sorted(eos_ids) or [-1], device=dev)
        self.waiting, self.job, self.offset = deque(range(len(prompts))), [-1] * B, [0] * B
        self.results: list[Sample | None] = [None] * len(prompts)
        self.logits: torch.Tensor | None = None
        self.steps = 0

    @property
    def free(self) -> list[int]:
        return [b for b in range(self.B) if self.job[b] < 0]

    def prefill(self, take: list[int]) -> None:
        """The next waiting prompts into rows `take`: right-padded forwards of at most PREFILL_TOKENS tokens (a pad
        writes past its row's prompt, into slots the row's own tokens overwrite before anything attends to them),
        the LM head run at each prompt's last position only."""
        js = [self.waiting.popleft() for _ in take]
        lens = [len(self.prompts[j]) for j in js]
        for b, j, n in zip(take, js, lens):
            self.job[b], self.offset[b] = j, n - self.steps
        i = 0
        while i < len(js):
            k = 1  # rows in this forward: as many as fit in PREFILL_TOKENS at the longest prompt among them
            while i + k < len(js) and (k + 1) * max(lens[i:i + k + 1]) <= PREFILL_TOKENS:
                k += 1
            self._prefill(take[i:i + k], js[i:i + k], lens[i:i + k])
            i += k

    def _prefill(self, take: list[int], js: list[int], lens: list[int]) -> None:
        dev, L, n = self.dev, max(lens), len(js)
        block = torch.full((n, L), self.pad_id, dtype=torch.long, device=dev)
        for i, j in enumerate(js):
            block[i, :lens[i]] = torch.tensor(self.prompts[j], device=dev)
        r = torch.tensor(take, device=dev)
        _, h = self.engine.step(block, torch.arange(L, device=dev).expand(n, L), L, rows=r, eager=True, logits=False)
        last = self.engine.lm_head(h[torch.arange(n, device=dev), torch.tensor(lens, device=dev) - 1]).float()
        if self.logits is None:
            self.logits = torch.zeros(self.B, last.shape[-1], dtype=torch.float32, device=dev)
        self.logits[r] = last
        self.pos[r], self.count[r], self.active[r] = torch.tensor(lens, device=dev), 0, True
        self.seed[r] = torch.tensor([self.seeds[j] for j in js], dtype=torch.long, device=dev)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's next token (and the teacher's top-k); returns (tokens, rows that just finished)."""
        at = self.count.clamp_max(self.max_new - 1)  # a free row's count runs on: clamped, never read
        if self.topk:
            lp = torch.log_softmax(self.logits, -1).topk(self.topk, dim=-1)  # the teacher at temperature 1
            self.top_v[self.ar, at], self.top_i[self.ar, at] = lp.values.half(), lp.indices.int()
        tok = sample_seeded(logits_to_probs(self.logits, self.params), self.seed, self.count,
                            greedy=self.params.greedy)
        self.out[self.ar, at] = tok
        self.count += 1
        return tok, self.active & (torch.isin(tok, self.eos) | (self.count >= self.max_new))

    def harvest(self, done: torch.Tensor) -> int:
        """Copy the finished rows' samples out and free their rows; returns how many finished."""
        finished = done.nonzero().flatten().tolist()
        for b, n in zip(finished, self.count[done].tolist()):
            ids = self.out[b, :n].tolist()
            s = Sample(self.prompts[self.job[b]], ids, "eos" if ids[-1] in self.eos_ids else "length")
            if self.topk:
                s.topk_ids, s.topk_logprobs = self.top_i[b, :n].tolist(), self.top_v[b, :n].float().tolist()
            self.results[self.job[b]], self.job[b] = s, -1
        self.active &= ~done
        return len(finished)

    def decode(self, tok: torch.Tensor) -> None:
        """One step of every row (the compiled step, when the engine is compiled): the logits of the next draw."""
        end = self.steps + max(self.offset[b] for b in range(self.B) if self.job[b] >= 0) + 1
        feed = torch.where(self.active, self.pos, 0)  # a free row writes its junk token at its own slot 0, unread
        self.logits = self.engine.step(tok[:, None], feed[:, None], end)[0][:, -1]
        self.pos += self.active.long()
        self.steps += 1
