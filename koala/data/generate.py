"""Sample the target on prompts, in batches: the responses a drafter is distilled on (Goel et al. 2024, stage 2).

Generation runs in koala's static-cache engine with left padding: row b's prompt sits at the right end of the
prompt block, its first `pad[b]` slots are masked and its rotary positions start after them. Each sample draws its
randomness from its own generator seeded with the sample's seed, so a sample can be reproduced on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koala.interrupt import check
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams, logits_to_probs, sample_rows


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "eos" or "length"
    topk_ids: list[list[int]] | None = None  # (response_len, k) the teacher's top-k tokens at each position
    topk_logprobs: list[list[float]] | None = None  # (response_len, k) their log-probabilities (temperature 1)


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
) -> list[Sample]:
    """Generate one response per prompt, all rows together; stops when every row has ended."""
    B, dev = len(prompts), engine.device
    P = max(len(p) for p in prompts)
    max_len = P + max_new_tokens
    engine.setup_caches(max_len, batch=B)
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)
    block = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        block[b, P - len(p):] = torch.tensor(p, device=dev)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]

    logits = engine.step(block, torch.arange(P, device=dev), P, pad=pad)[0][:, -1]  # (B, V)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    top_i = torch.zeros(B, max_new_tokens, max(topk, 1), dtype=torch.int32, device=dev)
    top_v = torch.zeros(B, max_new_tokens, max(topk, 1), dtype=torch.float16, device=dev)
    ended = torch.zeros(B, dtype=torch.bool, device=dev)
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    eos = torch.tensor(sorted(eos_ids), device=dev)
    for t in range(max_new_tokens):
        check()  # SIGINT/SIGTERM: stop between decode steps
        if topk:
            lp = torch.log_softmax(logits.float(), -1).topk(topk, dim=-1)  # the teacher at temperature 1
            top_v[:, t], top_i[:, t] = lp.values.half(), lp.indices.int()
        tok = sample_rows(logits_to_probs(logits, params), gens, greedy=params.greedy)
        out[:, t] = tok
        just = ~ended & torch.isin(tok, eos)
        length = torch.where(just, t + 1, length)
        ended |= just
        if bool(ended.all()) or t == max_new_tokens - 1:
            break
        logits = engine.step(tok[:, None], torch.tensor([P + t], device=dev), P + t + 1, pad=pad)[0][:, -1]

    samples = []
    for b in range(B):
        n = int(length[b])
        s = Sample(prompts[b], out[b, :n].tolist(), "eos" if n <= t + 1 and bool(torch.isin(out[b, n - 1], eos))
                   else "length")
        if topk:
            s.topk_ids, s.topk_logprobs = top_i[b, :n].tolist(), top_v[b, :n].float().tolist()
        samples.append(s)
    return samples
