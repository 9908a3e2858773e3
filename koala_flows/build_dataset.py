"""Flows: sample the target into Parquet distillation shards (resumable, incremental), on one worker or fanned out
over a work pool (`fan_out`: one `sample-shards` child flow run per range of shards, each on whichever worker takes
it; shards are claimed, so two workers never write one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from koala.data import claims, shards
from koala.errors import KoalaError
from koala_tasks.common import resolve_config
from koala_tasks.sampling import DatasetPlan, plan_shards, sample_shard


@flow(name="build-distillation-dataset", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def build_distillation_dataset(
    profile: str = "smoke",
    config_path: str | None = None,
    out_dir: str | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int | None = None,
    overrides: list[str] | None = None,
    source: Literal["generated", "teacher_forced"] = "generated",
    fan_out: int = 0,
    deployment: str = "sample-shards/sample-shards",
) -> str:
    """Sample the target on the configured prompts into shards under out_dir; returns out_dir.

    Args:
        profile: koala/profiles/NAME.yaml (smoke, default, gpu), unless config_path is given.
        config_path: a YAML config file.
        out_dir: where the shards go (default: sampling.out_dir of the config).
        n_prompts: use at most this many prompts (teacher_forced: conversations).
        max_new_tokens: longest response.
        overrides: more `section.field=value` settings.
        source: generated (sample the target) or teacher_forced (run it over the logs' own answers:
            the teacher_forced section of the config).
        fan_out: 0 samples here; N >= 1 splits the shards to sample into N ranges and starts one run of
            `deployment` per range on its work pool, then waits for them all (the workers share out_dir).
        deployment: the `sample-shards` deployment the ranges run as (deployments/prefect.yaml).
    """
    extra = list(overrides or [])
    extra += [f"{'prompts' if source == 'generated' else 'teacher_forced'}.limit={n_prompts}"] if n_prompts else []
    extra += [f"sampling.max_new_tokens={max_new_tokens}"] if max_new_tokens else []
    cfg = resolve_config(profile, config_path, extra)
    if source not in shards.SOURCES:
        raise ValueError(f"source must be one of {', '.join(shards.SOURCES)}, got {source!r}")
    out = out_dir or (cfg.sampling.out_dir if source == "generated" else cfg.teacher_forced.out_dir)

    # Step 1: plan the shards (keeps the shards already there, adds shards for new prompts).
    plan = plan_shards(cfg, out, source)
    if plan.skipped:
        print(f"skipped prompts: {plan.skipped}")
    if plan.recovered is not None:
        print(f"ShareGPT: recovered {plan.recovered} complete conversations")

    # Step 2: sample every shard (here, or fanned out over the pool); finished ones are cached or skipped.
    if fan_out:
        _fan_out(plan, fan_out, deployment, dict(  # absolute: workers start in $KOALA_HOME
            profile=profile, config_path=config_path and str(Path(config_path).resolve()),
            out_dir=str(Path(out).resolve()), overrides=extra, source=source))
        held = {}
    else:
        held = _sample_here(cfg, out, plan, source)

    # Step 3: check the whole dataset against its manifest (every planned shard whole, no sample twice).
    done = _entries(Path(out))
    busy = {f: w for f, w in held.items() if f not in done}
    if busy:  # another process started on the same directory and still writes these
        first, worker = next(iter(busy.items()))
        raise KoalaError(f"{out}: another process ({worker}) is writing {first}"
                         f"{f' and {len(busy) - 1} more shards' if len(busy) > 1 else ''}: let it finish (a killed "
                         "one's claim lapses by itself), then run again to check the dataset")
    table = shards.load(out, columns=["sample_id"])
    print(f"{out}: {table.num_rows} samples in {len(plan.shards)} shards")
    return out


def _sample_here(cfg, out: str, plan: DatasetPlan, source: str) -> dict[str, str]:
    """Every shard of the plan in this flow run, with a progress bar (rate and ETA); returns the shards another live
    process held (file -> its worker) and were left to it."""
    todo = set(plan.todo)
    futures = [sample_shard.with_options(refresh_cache=shard.index in todo).submit(
                   cfg, out, _spec(shard), plan.records_of(shard), source)
               for shard in plan.shards]
    if len(todo) < len(futures):
        print(f"{len(futures) - len(todo)} of {len(futures)} shards already done: kept")
    t0, samples, tokens, held = time.perf_counter(), 0, 0, {}
    with tqdm(total=len(todo), desc="shards", unit="shard") as bar:  # the shards sampled now, not the kept ones
        for shard, f in zip(plan.shards, futures):
            entry = f.result()
            if entry.claimed_by:
                held[entry.file] = entry.claimed_by
            if shard.index not in todo:
                continue
            if not entry.skipped and entry.new_tokens is not None:
                samples, tokens = samples + entry.rows, tokens + entry.new_tokens
                dt = time.perf_counter() - t0
                bar.set_postfix(samples_s=f"{samples / dt:.1f}", tokens_s=f"{tokens / dt:.0f}")
            bar.update(1)
    return held


def _spec(shard) -> dict:
    """A shard as the sampling task takes it (its cache key's part): index and prompt ids."""
    return {"index": shard.index, "prompt_ids": list(shard.prompt_ids)}


def ranges(todo: list[int], n: int) -> list[list[int]]:
    """`todo` split into at most n contiguous ranges of sizes differing by at most one."""
    n = max(1, min(n, len(todo)))
    k, r = divmod(len(todo), n)
    out, i = [], 0
    for j in range(n):
        out.append(todo[i:i + k + (j < r)])
        i += k + (j < r)
    return [x for x in out if x]


def _fan_out(plan: DatasetPlan, n: int, deployment: str, params: dict) -> None:
    """One child flow run of `deployment` per range of the shards to sample; wait until the dataset is complete or
    every child has ended (a child whose worker died stays Running on the server: the others take its shards over)."""
    from koala_flows.fanout import start_runs, wait_runs

    parts = ranges(sorted(plan.todo), n)
    runs = start_runs(deployment, [{**params, "shards": part} for part in parts],
                      [f"shards-{part[0]}-{part[-1]}" for part in parts])
    print(f"{len(plan.todo)} shards in {len(runs)} runs of {deployment}: "
          + ", ".join(f"{r.name} ({len(p)})" for r, p in zip(runs, parts)))
    out = Path(params["out_dir"])
    before = _entries(out)  # a to-do shard already has an entry only if it is damaged: done once it changes
    ended = wait_runs(runs, lambda: (_done(out, plan, before), len(plan.shards)), desc="shards",
                      stall_s=2 * claims.CLAIM_LEASE_S)
    failed = {n: s for n, s in ended.items() if s != "Completed"}
    if failed:
        print(f"runs that did not complete: {failed} (their shards are checked below; a rerun finishes them)")


def _entries(out: Path) -> dict[str, shards.ShardEntry]:
    return (shards.read_manifest(out) or shards.DatasetManifest()).done


def _done(out: Path, plan: DatasetPlan, before: dict) -> int:
    """Planned shards done: those not to do, and the to-do ones whose manifest entry appeared or changed."""
    now, todo = _entries(out), set(plan.todo)
    n = 0
    for shard in plan.shards:
        n += shard.index not in todo or (shard.file in now and now[shard.file] != before.get(shard.file))
    return n


@flow(name="sample-shards", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def sample_shards(
    shards: list[int],
    profile: str = "smoke",
    config_path: str | None = None,
    out_dir: str | None = None,
    overrides: list[str] | None = None,
    source: Literal["generated", "teacher_forced"] = "generated",
    take_over: bool = True,
) -> dict:
    """Sample the planned shards numbered `shards` into out_dir, each under its claim: one fanned-out range of
    build-distillation-dataset, run by whichever worker of the pool takes it. Then, with take_over, every other
    unfinished shard of the plan that no live worker holds (a dead worker's range, a slower worker's tail).
    Returns what this run wrote.
    """
    from koala.data.claims import worker_id

    cfg = resolve_config(profile, config_path, overrides)
    out = out_dir or (cfg.sampling.out_dir if source == "generated" else cfg.teacher_forced.out_dir)
    plan = plan_shards(cfg, out, source)  # the parent's plan, read back (idempotent); records for the shards to do
    todo = set(plan.todo)
    mine = [i for i in shards if i in todo]
    rest = todo - set(shards)
    order = mine + (sorted(rest, reverse=True) if take_over else [])  # others' tails first: their heads are busy
    by_index = {shard.index: shard for shard in plan.shards}
    entries = []
    for i in order:
        spec = by_index[i]
        entries.append(sample_shard.with_options(refresh_cache=True).submit(
            cfg, out, _spec(spec), plan.records_of(spec), source).result())
    wrote = [e.file for e in entries if not e.skipped]
    left = {e.file: e.claimed_by for e in entries if e.claimed_by}
    print(f"{worker_id()}: wrote {len(wrote)} shards ({len(mine)} in its range)"
          + (f"; held by others: {left}" if left else ""))
    return {"worker": worker_id(), "wrote": wrote, "held_by_others": left}
