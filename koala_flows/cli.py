"""The `koala` command: the library's commands (koala.cli) plus `run` and `sample`, which start Prefect flows.

The one place where the command line reaches the orchestration layer: koala/ itself never imports Prefect, the
flows or the tasks, and Prefect is imported only when `run` or `sample` runs, so every other command works on a
host without it.
"""

from __future__ import annotations

from typing import Optional

import typer

from koala.checks import (at_least_one, check_prompt_source, check_run_options, one_of, with_compute_dtype,
                          writable_dir)
from koala.cli import COMPUTE_DTYPE_HELP, app
from koala.config import DEFAULT_PROFILE, LOSS_NAMES
from koala.errors import KoalaError
from koala.report import RunSummary


def in_prefect(call):
    """Run a flow call under koala_flows.server.run_flow (its own temporary Prefect server, stopped on exit); an
    interrupt prints one line and exits 130 or 143."""
    from koala.interrupt import Interrupted
    from koala_flows.server import run_flow

    try:
        return run_flow(call)
    except Interrupted as e:
        typer.secho(str(e), fg="yellow", err=True)
        raise typer.Exit(e.code) from None


@app.command()
def sample(config: Optional[str] = typer.Option(None, help="YAML config (default: the smoke profile)"),
           profile: str = typer.Option(DEFAULT_PROFILE, help="profile in koala/profiles/ when --config is not given"),
           out: Optional[str] = typer.Option(None, help="dataset directory (default: sampling.out_dir)"),
           n_prompts: Optional[int] = typer.Option(None, help="use at most this many prompts"),
           max_new_tokens: Optional[int] = typer.Option(None, help="longest response in tokens"),
           source: str = typer.Option("generated", help="generated: sample the target; teacher_forced: run it over "
                                      "the logs' own answers (settings: the teacher_forced section)"),
           fan_out: int = typer.Option(0, help="N >= 1: split the shards into N ranges, each a run of the "
                                       "sample-shards deployment on its work pool (needs PREFECT_API_URL)"),
           deployment: str = typer.Option("sample-shards/sample-shards", help="the deployment --fan-out runs"),
           compute_dtype: Optional[str] = typer.Option(None, help=COMPUTE_DTYPE_HELP),
           set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Sample the target into Parquet distillation shards (a Prefect flow; resumable and incremental)."""
    from koala.config import load_config
    from koala.data.shards import SOURCES

    set_ = with_compute_dtype(set_, compute_dtype)
    at_least_one(n_prompts=n_prompts, max_new_tokens=max_new_tokens)
    if fan_out < 0:
        raise KoalaError(f"--fan-out {fan_out}: must be 0 (sample here) or the number of shard ranges")
    if fan_out:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise KoalaError("--fan-out needs a Prefect server whose work pool has workers: set PREFECT_API_URL "
                             "(docs/guides/scale-out.md), or leave --fan-out out to sample here")
    if source not in SOURCES:
        raise KoalaError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "teacher_forced" and n_prompts:  # how many conversations to teacher-force
        set_ = [*(set_ or []), f"teacher_forced.limit={n_prompts}"]
    cfg = load_config(None if config else profile, config, set_ or [])  # fail fast on a bad config
    if source == "teacher_forced" and cfg.teacher_forced.limit == 0:
        raise KoalaError("teacher_forced.limit is 0 in this profile: say how many conversations with "
                         "--n-prompts N (or --set teacher_forced.limit=N)")
    check_prompt_source(cfg.prompts.source)
    writable_dir(out or (cfg.sampling.out_dir if source == "generated" else cfg.teacher_forced.out_dir))
    from koala_flows.build_dataset import build_distillation_dataset  # Prefect: imported only when needed

    out_dir = in_prefect(lambda: build_distillation_dataset(
        profile=profile, config_path=config, out_dir=out, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
        overrides=set_ or [], source=source, fan_out=fan_out, deployment=deployment))
    typer.echo(f"dataset: {out_dir} (read it with koala.data.shards.load or pyarrow.parquet.read_table)")


@app.command()
def run(profile: str = typer.Option(DEFAULT_PROFILE, help="smoke (a CPU in minutes), default or gpu"),
        config: Optional[str] = typer.Option(None, help="YAML config instead of a profile"),
        prompt_source: Optional[str] = typer.Option(None, help="sharegpt, sharegpt-heldout, mtbench, a file or a "
                                                      "prompt-log directory"),
        n_prompts: Optional[int] = typer.Option(None, help="use at most this many prompts"),
        loss: Optional[str] = typer.Option(None, help=", ".join(LOSS_NAMES)),
        steps: Optional[int] = typer.Option(None, help="distillation steps"),
        compute_dtype: Optional[str] = typer.Option(None, help=COMPUTE_DTYPE_HELP),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Run the whole pipeline locally (Prefect's local server, MLflow's local store) and print a summary."""
    from koala.config import load_config
    from koala.tracking import resolve_uri, check_reachable

    set_ = with_compute_dtype(set_, compute_dtype)
    at_least_one(n_prompts=n_prompts, steps=steps)
    from koala.config import LOSS_NAMES

    one_of("--loss", loss, LOSS_NAMES)
    cfg = load_config(None if config else profile, config, set_ or [])  # a bad profile fails here, not in Prefect
    check_run_options(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    check_prompt_source(prompt_source or cfg.prompts.source)
    writable_dir(cfg.run_dir, "run_dir")
    check_reachable(resolve_uri(cfg.tracking.uri, cfg.run_dir))
    from koala_flows.pipeline import koala_pipeline  # Prefect: imported only when needed

    s = in_prefect(lambda: koala_pipeline(profile=profile if config is None else DEFAULT_PROFILE, config_path=config,
                                          prompt_source=prompt_source, n_prompts=n_prompts, loss=loss,
                                          steps=steps, overrides=set_ or []))
    _print_summary(s)


def _print_summary(s: RunSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="koala pipeline", show_header=False)
    tps = s.tokens_per_s
    rows = [("data", s.data), ("drafter", s.drafter), ("tau", f"{s.tau:.2f} tokens per target forward"),
            ("speed-up", f"{s.speedup:.2f}x ({tps.speculative:.1f} vs {tps.autoregressive:.1f} tokens/s)"),
            ("lossless", s.lossless), ("engine", s.engine)]
    for i, st in enumerate(s.stages, 1):  # what each training stage added, on the same held-out prompts
        acc = ", ".join(f"{a:.2f}" for a in st.agreement_by_draft()) or "n/a"
        dtype = f" in {st.compute_dtype}" if st.compute_dtype else ""
        rows.append((f"stage {i}", f"{st.steps} steps on {st.data}{dtype}: held-out agreement by draft {acc}"))
    for name, m in s.more.items():
        rows.append((name, f"{m.bench} x{m.prompts}{'' if m.lookup else ' (no prompt lookup)'}: tau "
                           f"{m.tau:.2f}, speed-up {m.speedup:.2f}x, lossless {m.lossless}"))
    rows += [("registered", f"{s.model} version {s.version}"),
             ("promoted", f"{'yes' if s.promoted else 'no'}: {s.reason}")]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)
    typer.echo(f"MLflow UI:  mlflow ui --backend-store-uri {s.mlflow_uri} --host 127.0.0.1 --port 5000   "
               f"(experiment {s.experiment}, run {s.mlflow_run_id})")
    typer.echo("Prefect UI: prefect server start --host 127.0.0.1   (then open http://127.0.0.1:4200)")




def main():
    from koala.interrupt import handle_signals

    handle_signals()  # from the start: SIGINT/SIGTERM during start-up also exit 130/143 without a traceback
    app()


if __name__ == "__main__":
    main()
