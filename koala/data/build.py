"""Build a distillation set: plan shards over the prompts, sample each shard, record it; resumable and incremental.

`plan` is cheap and idempotent: it keeps the shards already planned in the manifest (same prompts, same files),
appends shards for prompts not yet in the dataset (incremental mode over a growing directory of prompt logs), and
lists which shards still need sampling. `sample_shard` does the expensive part for one shard.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from koala import precision
from koala.config import KoalaConfig
from koala.data import prompts as P
from koala.data import shards as S
from koala.errors import KoalaError
from koala.data.generate import generate_batch
from koala.data.teacher import teacher_force_shard, tokenize
from koala.engine.sampling import SamplingParams
from koala.targets import Target, encode_chat, target_facts


@dataclass
class Plan:
    out_dir: Path
    shards: list[S.ShardSpec]  # every shard of the dataset, old and new
    todo: list[S.ShardSpec]  # shards not yet present and valid
    records: dict[str, P.PromptRecord]  # prompt id -> record, for the shards in todo
    skipped: dict = field(default_factory=dict)  # prompts left out, by reason
    recovered: int | None = None  # ShareGPT: complete conversations read


def _settings(cfg: KoalaConfig, source: str) -> dict:
    return (cfg.sampling if source == "generated" else cfg.teacher_forced).model_dump()


def select_prompts(cfg: KoalaConfig, target: Target, skipped: dict, stats: P.ShareGPTStats,
                   source: str = "generated") -> list[P.PromptRecord]:
    """The configured prompt source, de-duplicated, length-filtered (prompts that cannot fit are counted).

    Teacher forcing keeps only conversations that carry an answer, and reads up to teacher_forced.limit of them.
    """
    pc, sc = cfg.prompts, cfg.sampling
    forced = source == "teacher_forced"
    room = target.info.max_context - (0 if forced else sc.max_new_tokens)  # longer prompts cannot fit
    limit = cfg.teacher_forced.limit if forced else pc.limit
    it = P.iter_source(pc.source, pc.sharegpt_turns, False, pc.prompt_col, pc.category_col, pc.messages_col, stats,
                       pc.response_col)
    kept = []
    for r in P.dedupe(it):
        if forced and r.response is None:
            skipped["no_answer"] = skipped.get("no_answer", 0) + 1
            continue
        n = len(encode_chat(target.tokenizer, list(r.messages)))
        reason = ("longer_than_context" if n > room else "too_long" if n > pc.max_prompt_tokens
                  else "too_short" if n < pc.min_prompt_tokens else None)
        if forced and reason is None and tokenize(target.tokenizer, r, cfg.teacher_forced.max_seq_len) is None:
            # the prompt leaves no room for an answer token, or the chat template does not render the prompt as
            # the start of the whole conversation (then the answer's positions cannot be found)
            reason = "no_room_for_answer" if n >= cfg.teacher_forced.max_seq_len else "template_not_a_prefix"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kept.append(r)
        if limit and len(kept) >= limit:
            break
    return kept


def plan(cfg: KoalaConfig, target: Target, out_dir: str | Path | None = None, source: str = "generated") -> Plan:
    """Plan (or extend) the dataset in out_dir; writes the plan into the manifest.

    Args:
        source: "generated" (sample the target: cfg.sampling) or "teacher_forced" (run it over logged answers:
            cfg.teacher_forced).

    Raises:
        KoalaError: no prompts after filters, or out_dir holds another target's or settings' data.
    """
    settings = _settings(cfg, source)
    if source == "teacher_forced" and not cfg.teacher_forced.limit:
        raise KoalaError("teacher_forced.limit is 0 (off): set how many conversations to teacher-force, e.g. "
                         "--set teacher_forced.limit=1000")
    out = Path(out_dir or settings["out_dir"])
    facts = target_facts(target)
    h = S.settings_hash(settings, source)
    S.check_compatible(S.read_manifest(out) or S.DatasetManifest(), facts, h, out)
    skipped: dict = {}
    stats = P.ShareGPTStats()
    records = select_prompts(cfg, target, skipped, stats, source)
    if not records:
        raise KoalaError(f"no prompts left from {cfg.prompts.source!r} after filters ({skipped or 'none read'}): "
                         "relax prompts.max_prompt_tokens / min_prompt_tokens or use another source")
    by_id = {r.id: r for r in records}
    with S.locked_manifest(out) as m:
        S.check_compatible(m, facts, h, out)
        planned = [S.ShardSpec(s.index, tuple(s.prompt_ids)) for s in m.plan]
        S.check_plan(m, out)
        have = {pid for s in planned for pid in s.prompt_ids}
        new = [r.id for r in records if r.id not in have]
        size = settings["shard_size"]
        # new shards never reuse a number: not a planned one, not one recorded as done, not a file on disk
        start = 1 + max([s.index for s in planned] + [e.index for e in m.done.values()]
                        + [int(hit[1]) for f in out.glob("shard-*.parquet")
                           if (hit := re.fullmatch(r"shard-(\d+)\.parquet", f.name))], default=-1)
        planned += [S.ShardSpec(start + i, tuple(new[j:j + size])) for i, j in enumerate(range(0, len(new), size))]
        m.koala_version, m.target, m.source, m.settings_hash, m.skipped = S.__version__, facts, source, h, skipped
        m.sampling = {**settings, "out_dir": str(out)}  # the directory written, not the profile's default
        m.plan = [S.PlannedShard(file=s.file, index=s.index, prompt_ids=list(s.prompt_ids)) for s in planned]
        done = dict(m.done)
    todo = [s for s in planned if s.file not in done or not S.shard_valid(out, done[s.file])]
    missing = [pid for s in todo for pid in s.prompt_ids if pid not in by_id]
    if missing:
        pc = cfg.prompts
        extra = P.dedupe(P.iter_source(pc.source, pc.sharegpt_turns, False, pc.prompt_col, pc.category_col,
                                       pc.messages_col, None, pc.response_col))
        by_id.update({r.id: r for r in extra if r.id in set(missing)})
    lost = [pid for s in todo for pid in s.prompt_ids if pid not in by_id]
    if lost:
        raise KoalaError(f"{out}: {len(lost)} planned prompts are no longer in {cfg.prompts.source!r} (first "
                         f"{lost[0]}): restore the prompt logs or start a new --out directory")
    return Plan(out, planned, todo, {pid: by_id[pid] for s in todo for pid in s.prompt_ids}, skipped,
                stats.recovered if cfg.prompts.source in P.SHAREGPT else None)


def sample_shard(cfg: KoalaConfig, target: Target, engine, spec: S.ShardSpec, records: dict[str, P.PromptRecord],
                 out_dir: str | Path, eos_ids: frozenset[int], progress: bool = True) -> S.ShardEntry:
    """Sample every prompt of one shard and write it; returns its manifest entry (with samples/s, tokens/s)."""
    sc = cfg.sampling
    h = S.settings_hash(sc.model_dump())
    params = SamplingParams(sc.temperature, sc.top_p, sc.top_k)
    tok = target.tokenizer
    jobs = []  # (record, sample index, seed, prompt ids)
    for pid in spec.prompt_ids:
        r = records[pid]
        ids = encode_chat(tok, list(r.messages))
        for k in range(sc.samples_per_prompt):
            jobs.append((r, k, S.sample_seed(sc.seed, pid, k), ids))
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][3]))  # similar lengths prefilled together
    rows: dict[int, dict] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=spec.file, unit="sample", disable=not progress, leave=False)
    compute = precision.for_model(cfg.compute_dtype, target.model)
    precision.announce(compute, "sampling")
    # one continuous batch over the whole shard: sc.batch_size rows, a finished row takes the next prompt
    with compute.autocast(engine.device):
        samples = generate_batch(engine, [jobs[i][3] for i in order], [jobs[i][2] for i in order], params,
                                 sc.max_new_tokens, eos_ids, topk=sc.topk_logprobs, pad_id=tok.pad_token_id or 0,
                                 rows=sc.batch_size, on_done=bar.update)
    new_tokens = 0
    for i, s in zip(order, samples):
        r, k, seed, ids = jobs[i]
        rows[i] = {
            "sample_id": S.sample_id(r.id, k, seed, h), "prompt_id": r.id, "source": "generated",
            "prompt_source": r.source,
            "category": r.category, "messages": json.dumps(list(r.messages), ensure_ascii=False),
            "response_text": tok.decode(s.response_ids, skip_special_tokens=True),
            "input_ids": ids + s.response_ids, "prompt_len": len(ids), "response_len": len(s.response_ids),
            "finish_reason": s.finish_reason, "temperature": sc.temperature, "top_p": sc.top_p, "seed": seed,
        }
        if sc.topk_logprobs:
            rows[i].update(topk_ids=s.topk_ids, topk_logprobs=s.topk_logprobs)
        new_tokens += len(s.response_ids)
    bar.close()
    meta = {**S.shard_metadata(target_facts(target), sc.model_dump()), "compute_dtype": compute.to_dict(),
            "draws": "counter_uniform"}  # per-sample draws (koala.engine.sampling); earlier shards: torch.Generator
    entry = S.write_shard(Path(out_dir), spec, [rows[i] for i in range(len(jobs))], meta, topk=sc.topk_logprobs > 0)
    wall = time.perf_counter() - t0
    return entry.model_copy(update={"wall_s": wall, "new_tokens": new_tokens, "tokens_per_s": new_tokens / wall,
                                    "compute_dtype": compute.name})


def build(cfg: KoalaConfig, session, out_dir: str | Path | None = None, progress: bool = True,
          source: str = "generated") -> Plan:
    """Plan and sample (or teacher-force) every missing shard in this process, without Prefect (GPU hosts, tests)."""
    p = plan(cfg, session.target, out_dir, source)
    for spec in p.todo:
        if source == "teacher_forced":
            teacher_force_shard(cfg, session.target, spec, p.records, p.out_dir, progress)
        else:
            sample_shard(cfg, session.target, session.engine, spec, p.records, p.out_dir, session.eos_ids, progress)
    return p
