"""Flow: sample the target into Parquet distillation shards (resumable, incremental)."""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from koala.data import shards
from koala_tasks.common import resolve_config
from koala_tasks.sampling import plan_shards, sample_shard


@flow(name="build-distillation-dataset", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def build_distillation_dataset(
    profile: str = "smoke",
    config_path: str | None = None,
    out_dir: str | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int | None = None,
    overrides: list[str] | None = None,
    source: Literal["generated", "teacher_forced"] = "generated",
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
    if plan["skipped"]:
        print(f"skipped prompts: {plan['skipped']}")
    if plan["recovered"] is not None:
        print(f"ShareGPT: recovered {plan['recovered']} complete conversations")

    # Step 2: sample every shard; finished ones are cached or skipped.
    todo = set(plan["todo"])
    futures = [sample_shard.with_options(refresh_cache=spec["index"] in todo).submit(
                   cfg, out, spec, {pid: plan["records"][pid] for pid in spec["prompt_ids"] if pid in plan["records"]},
                   source)
               for spec in plan["shards"]]
    if len(todo) < len(futures):
        print(f"{len(futures) - len(todo)} of {len(futures)} shards already done: kept")
    t0, samples, tokens = time.perf_counter(), 0, 0
    with tqdm(total=len(todo), desc="shards", unit="shard") as bar:  # the shards sampled now, not the kept ones
        for spec, f in zip(plan["shards"], futures):
            entry = f.result()
            if spec["index"] not in todo:
                continue
            if not entry.get("skipped") and "new_tokens" in entry:
                samples, tokens = samples + entry["rows"], tokens + entry["new_tokens"]
                dt = time.perf_counter() - t0
                bar.set_postfix(samples_s=f"{samples / dt:.1f}", tokens_s=f"{tokens / dt:.0f}")
            bar.update(1)

    # Step 3: check the whole dataset against its manifest.
    table = shards.load(out, columns=["sample_id"])
    print(f"{out}: {table.num_rows} samples in {len(plan['shards'])} shards")
    return out
