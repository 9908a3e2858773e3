"""Prefect tasks of the distillation-set build."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel
from prefect.cache_policies import TASK_SOURCE, CachePolicy

from koala.config import KoalaConfig
from koala.data import build, claims, shards
from koala.data.prompts import PromptRecord
from koala.data.shards import ShardEntry
from koala.io import digest
from koala_tasks.common import retry_unless_koala_error, session_for


def sampling_compiled(cfg: KoalaConfig) -> bool:
    """sampling.compile, or by default compiled on CUDA (the batch step replayed as a CUDA graph)."""
    from koala.engine.compile import compiled_by_default

    c = cfg.sampling.compile
    return compiled_by_default(cfg.target.device) if c is None else c


class DatasetPlan(BaseModel):
    """The shards of a dataset as `plan_shards` hands them to the flow: every shard, which to sample, their prompts."""

    out_dir: str
    shards: list[shards.PlannedShard]  # every shard of the dataset, old and new
    todo: list[int]  # the indexes of those not yet present and valid
    records: dict[str, dict]  # prompt id -> PromptRecord.to_dict(), for the shards to sample (task parameters: data)
    skipped: dict = {}  # prompts left out, by reason
    recovered: int | None = None  # ShareGPT: complete conversations read

    def records_of(self, shard: shards.PlannedShard) -> dict[str, dict]:
        return {pid: self.records[pid] for pid in shard.prompt_ids if pid in self.records}


@task(name="plan-shards", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_koala_error)
def plan_shards(cfg: KoalaConfig, out_dir: str, source: str = "generated") -> DatasetPlan:
    """Plan (or extend) the shards; returns the plan (paths and ids, never tensors)."""
    s = session_for(cfg.target)
    p = build.plan(cfg, s.target, out_dir, source)
    log = get_run_logger()
    log.info("%d shards planned, %d to sample", len(p.shards), len(p.todo))
    if p.recovered is not None:
        log.info("ShareGPT: recovered %d complete conversations", p.recovered)
    if p.skipped:
        log.warning("prompts skipped: %s", p.skipped)
    return DatasetPlan(out_dir=str(p.out_dir), shards=[shards.PlannedShard(file=s.file, index=s.index,
                                                                          prompt_ids=list(s.prompt_ids))
                                                       for s in p.shards],
                       todo=[s.index for s in p.todo], records={pid: r.to_dict() for pid, r in p.records.items()},
                       skipped=p.skipped, recovered=p.recovered)


def shard_cache_key(context, parameters) -> str:
    """The shard's spec, the sampling settings and the target: the same inputs give the same shard (the rest of the
    config, training or evaluation, does not change a sample, so it is not hashed as Prefect's INPUTS would).

    A shard whose file was since damaged is run with refresh_cache=True by the flow (the plan knows which).
    """
    cfg, out_dir, spec = parameters["cfg"], parameters["out_dir"], parameters["spec"]
    source = parameters.get("source", "generated")
    settings = cfg.sampling if source == "generated" else cfg.teacher_forced
    return "sample-shard-" + digest([str(Path(out_dir).resolve()), spec, cfg.target.model_dump(),
                                     settings.model_dump(), source, cfg.compute_dtype])


@task(name="sample-shard", tags=["gpu"], retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_koala_error,
      cache_policy=TASK_SOURCE + CachePolicy.from_cache_key_fn(shard_cache_key),
      persist_result=True)
def sample_shard(cfg: KoalaConfig, out_dir: str, spec: dict, records: dict, source: str = "generated") -> ShardEntry:
    """Sample (or teacher-force) one shard under its claim, skipped when the manifest already vouches for it or
    another live worker holds it; returns its entry."""
    spec_ = shards.ShardSpec(spec["index"], tuple(spec["prompt_ids"]))
    with claims.claim(Path(out_dir), spec_.file) as holder:
        if holder is not None:
            get_run_logger().info("%s is being sampled by %s: left to it", spec_.file, holder.get("worker"))
            return ShardEntry(file=spec_.file, index=spec_.index, skipped=True,
                              claimed_by=holder.get("worker") or "another worker")
        done = (shards.read_manifest(Path(out_dir)) or shards.DatasetManifest()).done.get(spec_.file)
        if done and shards.shard_valid(Path(out_dir), done):
            return done.model_copy(update={"skipped": True})
        s = session_for(cfg.target, compile=sampling_compiled(cfg) and source == "generated")
        recs = {pid: PromptRecord.from_dict(r) for pid, r in records.items() if pid in set(spec_.prompt_ids)}
        if source == "teacher_forced":
            from koala.data.teacher import teacher_force_shard

            entry = teacher_force_shard(cfg, s.target, spec_, recs, out_dir, progress=False)
        else:
            entry = build.sample_shard(cfg, s.target, s.engine, spec_, recs, out_dir, s.eos_ids)
    get_run_logger().info("%s: %d rows, %.1f tokens/s", entry.file, entry.rows, entry.tokens_per_s)
    return entry
