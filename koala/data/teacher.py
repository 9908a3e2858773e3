"""Teacher-forced shards: the target run once over conversations that already have answers (ShareGPT's own assistant
turns, any log with responses), storing its top-k log-probabilities, and optionally its features, at every answer
position.

A forward over given text generates nothing, so it yields many times the tokens per CPU-hour of sampling
(`bench/sampling.py` measures both). Rows share the sampled shards' schema with `source = "teacher_forced"`; shards
are planned, written and resumed exactly like sampled ones (`koala.data.build.plan(..., source="teacher_forced")`).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from koala.config import KoalaConfig
from koala.data import prompts as P
from koala.data import shards as S
from koala import precision
from koala.interrupt import check
from koala.targets import Target, encode_chat, target_facts


@dataclass
class Forced:
    """One conversation as the target reads it: prompt then the logged answer, and what the target made of it."""

    input_ids: list[int]
    prompt_len: int
    topk_ids: np.ndarray  # (response_len, k) int32: the target's top-k for each answer token
    topk_logprobs: np.ndarray  # (response_len, k) float16, temperature 1
    features: np.ndarray | None  # (len(input_ids), C) float16 (with aux layers: (len, (A + 1) C), states first)


def tokenize(tokenizer, record: P.PromptRecord, max_seq_len: int) -> tuple[list[int], int] | None:
    """(prompt + answer ids, prompt length), the answer closed by the template's end of turn; None when the
    template does not render the prompt as a prefix of the whole chat, or no answer token fits."""
    prompt = encode_chat(tokenizer, list(record.messages))
    full = encode_chat(tokenizer, [*record.messages, {"role": "assistant", "content": record.response}],
                       add_generation_prompt=False)
    if full[:len(prompt)] != prompt or len(prompt) >= min(len(full), max_seq_len):
        return None
    eos = tokenizer.eos_token_id
    if eos is not None and eos in full[len(prompt):]:  # the template's text after the end of turn is not an answer
        full = full[:len(full) - full[::-1].index(eos)]
    return full[:max_seq_len], len(prompt)


@torch.no_grad()
def force_batch(model, seqs: list[tuple[list[int], int]], topk: int, features: bool, pad_id: int = 0,
                compute: precision.ComputeDtype | None = None, aux_layers: list[int] | None = None) -> list[Forced]:
    """One right-padded forward of the Hugging Face target over several conversations, under `compute`'s autocast
    (the log-softmax is taken in float32 either way). With `aux_layers`, the stored features are the states at
    those layers' inputs, then the features (koala.models.heads.aux_states)."""
    dev = model.device
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=dev)
    att = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
    for b, (s, _) in enumerate(seqs):
        ids[b, :len(s)], att[b, :len(s)] = torch.tensor(s, device=dev), 1
    autocast = compute.autocast(dev) if compute is not None else nullcontext()
    with autocast:
        if aux_layers and features:
            from koala.models.heads import aux_states

            stored = aux_states(model, ids, att, aux_layers)  # (B, T, (A + 1) C)
            h = stored[..., -model.config.hidden_size:]
        else:
            h = stored = model.model(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, C)
    out = []
    for b, (s, p) in enumerate(seqs):  # one row's (n, V) logits at a time: V is large
        with autocast:  # position t predicts token t+1: the answer's tokens p..len-1 are predicted at p-1..len-2
            z = model.lm_head(h[b, p - 1:len(s) - 1]).float()  # the top-k of the logits are the log-probs', less lse
        top = z.topk(topk, dim=-1)
        values = top.values - torch.logsumexp(z, -1, keepdim=True)
        out.append(Forced(s, p, top.indices.int().cpu().numpy(), values.half().cpu().numpy(),
                          stored[b, :len(s)].half().cpu().numpy() if features else None))
    return out


def teacher_force_shard(cfg: KoalaConfig, target: Target, spec: S.ShardSpec, records: dict[str, P.PromptRecord],
                        out_dir: str | Path, progress: bool = True) -> S.ShardEntry:
    """Teacher-force every conversation of one shard and write it; returns its manifest entry with tokens/s."""
    tc = cfg.teacher_forced
    h = S.settings_hash(tc.model_dump(), "teacher_forced")
    compute = precision.for_model(cfg.compute_dtype, target.model)
    precision.announce(compute, "teacher forcing")
    tok = target.tokenizer
    jobs = []  # (record, ids, prompt_len); conversations the template cannot split are left out
    for pid in spec.prompt_ids:
        seq = tokenize(tok, records[pid], tc.max_seq_len)
        if seq is not None:
            jobs.append((records[pid], *seq))
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][1]))  # similar lengths together: less padding
    rows: dict[int, dict] = {}
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(jobs), desc=spec.file, unit="conv", disable=not progress, leave=False)
    for batch in (order[i:i + tc.batch_size] for i in range(0, len(order), tc.batch_size)):
        check()  # SIGINT/SIGTERM: stop between batches
        forced = force_batch(target.model, [(jobs[i][1], jobs[i][2]) for i in batch], tc.topk_logprobs, tc.features,
                             tok.pad_token_id or 0, compute, tc.aux_layers)
        for i, f in zip(batch, forced):
            r = jobs[i][0]
            n = len(f.input_ids) - f.prompt_len
            rows[i] = {
                "sample_id": S.sample_id(r.id, 0, 0, h), "prompt_id": r.id, "source": "teacher_forced",
                "prompt_source": r.source, "category": r.category,
                "messages": json.dumps(list(r.messages), ensure_ascii=False),
                "response_text": tok.decode(f.input_ids[f.prompt_len:], skip_special_tokens=True),
                "input_ids": f.input_ids, "prompt_len": f.prompt_len, "response_len": n,
                "finish_reason": "log" if n < tc.max_seq_len - f.prompt_len else "length",
                "temperature": None, "top_p": None, "seed": None,
                "topk_ids": f.topk_ids.tolist(), "topk_logprobs": f.topk_logprobs.astype(np.float32).tolist(),
            }
            if tc.features:
                rows[i]["features"] = f.features.tobytes()
            tokens += n
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    meta = {**S.shard_metadata(target_facts(target), tc.model_dump()), "compute_dtype": compute.to_dict()}
    entry = S.write_shard(Path(out_dir), spec, [rows[i] for i in range(len(jobs))], meta, topk=True,
                          features=tc.features)
    wall = time.perf_counter() - t0
    return entry.model_copy(update={"wall_s": wall, "new_tokens": tokens, "tokens_per_s": tokens / wall,
                                    "compute_dtype": compute.name})


def features_of(row: dict, hidden: int, max_len: int | None = None, width: int | None = None) -> torch.Tensor:
    """A row's stored features as a (len(input_ids), width) float16 tensor (default width: `hidden`, the features
    alone, the last `hidden` columns of rows that store states too), the first `max_len` positions only."""
    a = np.frombuffer(row["features"], dtype=np.float16).reshape(len(row["input_ids"]), -1)
    return torch.from_numpy(a[:max_len, -(width or hidden):].copy())


def stored_width(row: dict) -> int:
    """Columns per position of a row's stored features: C, or (A + 1) C with states of A layers."""
    return len(row["features"]) // 2 // max(len(row["input_ids"]), 1)
