"""MkDocs hooks: the pages generated from the code and the committed results, so nothing is written twice.

* `reference/cli.md`: every command and option of the `koala` typer app (click introspection);
* `reference/config.md`: every config field with its type, default, bounds and description (the pydantic models),
  and the shipped profiles;
* `reliability/bad-inputs.md`: the bad-input table of `tests/bad_inputs.py`;
* `<!-- bench:NAME -->` blocks in any page: the tables of `bench/render.py` over `bench/results/*.json`, and the
  plots under `benchmarks/plots/`. A results file that no page renders fails the build.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("reference/cli.md", "reference/config.md", "reliability/bad-inputs.md")


def _module(name: str, path: Path):
    """A module of the repository that is not installed (bench/render.py, tests/bad_inputs.py), by its path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def render():
    return _module("koala_bench_render", ROOT / "bench" / "render.py")


def _cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---- the command line -------------------------------------------------------------------------------------------


def cli_commands():
    """(name path, click command) for every command of the `koala` app, groups' subcommands included."""
    import typer

    from koala_flows.cli import app  # the library's commands plus `run` and `sample`

    def walk(cmd, path):  # duck-typed: typer builds on its own copy of click
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(None):
                yield from walk(cmd.get_command(None, name), [*path, name])
        else:
            yield " ".join(path), cmd

    return list(walk(typer.main.get_command(app), ["koala"]))


def _is_argument(p) -> bool:
    return p.param_type_name == "argument"


def _param_type(p) -> str:
    """The value's type as the command's signature declares it (Optional and list unwrapped)."""
    import typing

    t = getattr(getattr(p, "type_descriptor", None), "annotation", None) or getattr(p, "type", None)
    while typing.get_args(t):  # Optional[X] -> X, list[X] -> X
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return _cell(getattr(t, "__name__", None) or getattr(t, "name", None) or t)


def _param_row(p) -> str:
    if _is_argument(p):
        name = f"`{p.name.upper()}` (argument)"
    else:
        name = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    kind = "flag" if getattr(p, "is_flag", False) else _param_type(p)
    if getattr(p, "multiple", False) or p.nargs == -1:
        kind += ", repeatable"
    default = "required" if p.required else ("–" if p.default is None else f"`{p.default}`")
    return f"| {name} | {kind} | {default} | {_cell(getattr(p, 'help', None) or '')} |"


def cli_page() -> str:
    out = ["# Command line", "",
           "Generated from the `koala` typer app (`koala/cli.py`, `koala_flows/cli.py`) when the site is built: every "
           "command and option, with the help `koala COMMAND --help` prints. Options that a profile also sets take "
           "their default from the config ([configuration](config.md)); `--set section.field=value` overrides any "
           "config field.", ""]
    for path, cmd in cli_commands():
        help_text = inspect.cleandoc(cmd.help or "")
        usage = " ".join([path, "[OPTIONS]", *(a.name.upper() for a in cmd.params if _is_argument(a))])
        out += [f"## `{path}`", "", help_text, "", "```text", usage, "```", "", "| option | type | default | help |", "|---|---|---|---|"]
        out += [_param_row(p) for p in cmd.params if p.name != "help"] + [""]
    return "\n".join(out)


# ---- the configuration ------------------------------------------------------------------------------------------


def _type(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return _cell(text or str(annotation).replace("typing.", "")).replace("NoneType", "None")


def _bounds(field) -> str:
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{op} {getattr(m, k)}" for m in field.metadata for k, op in names.items()
                     if getattr(m, k, None) is not None)


def config_fields():
    """(dotted name, pydantic field) of every leaf field of KoalaConfig, in declaration order."""
    from pydantic import BaseModel

    from koala.config import KoalaConfig

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            t = f.annotation
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from walk(t, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f
    return list(walk(KoalaConfig, ""))


def config_page() -> str:
    from pydantic import BaseModel

    from koala.config import CONFIG_DIR, PROFILES, KoalaConfig

    out = ["# Configuration", "",
           "Generated from the pydantic models in `koala/config.py` when the site is built. A run's configuration is "
           "one of the profiles below (`--profile NAME`) or your own YAML (`--config PATH`), plus "
           "`--set section.field=value` overrides. An unknown key, a wrong type, a value out of bounds, or settings "
           "of two sections that contradict each other is an error naming the field.", ""]
    sections = {"": [], **{n: [] for n, f in KoalaConfig.model_fields.items()
                           if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}}
    for name, f in config_fields():
        sections[name.split(".")[0] if "." in name else ""].append((name, f))
    for section, fields in sections.items():
        model = KoalaConfig.model_fields[section].annotation if section else KoalaConfig
        doc = inspect.cleandoc(model.__doc__ or "") if section and model.__doc__ else ""
        out += [f"## `{section}`" if section else "## Top level", ""] + ([doc, ""] if doc else [])
        out += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, f in fields:
            default = "–" if f.default is None else f"`{f.default}`"
            out.append(f"| `{name}` | {_type(f.annotation)} | {default} | {_bounds(f)} | {_cell(f.description or '')} |")
        out.append("")
    out += ["## Profiles", "", "Shipped inside the package (`koala/profiles/`); each starts with the command that runs "
            "it.", ""]
    for name in PROFILES:
        out += [f"### `{name}`", "", "```yaml", (CONFIG_DIR / f"{name}.yaml").read_text().rstrip(), "```", ""]
    return "\n".join(out)


# ---- bad inputs -------------------------------------------------------------------------------------------------


def bad_inputs_page() -> str:
    cases = _module("koala_bad_inputs", ROOT / "tests" / "bad_inputs.py").CASES
    out = ["# Bad inputs", "",
           "Generated from `tests/bad_inputs.py` when the site is built. `tests/test_bad_inputs.py` runs every case: "
           "`koala ARGS` must exit non-zero with one line `error: ...` that matches the pattern (a regular expression "
           "naming the input), print no traceback, and leave every file under the working directory as it was. "
           "`{d}` is a directory of broken files (an empty drafter, a truncated `model.safetensors`, a cut "
           "`heads.json`, a file where a directory should be, ...).", "",
           f"{len(cases)} cases.", "", "| case | command | the error matches |", "|---|---|---|"]
    for name, argv, pattern in cases:
        args = " ".join(a if a and " " not in a else repr(a) for a in argv)
        out.append(f"| {_cell(name)} | `koala {_cell(args)}` | `{_cell(pattern)}` |")
    return "\n".join(out) + "\n"


# ---- hooks ------------------------------------------------------------------------------------------------------


def on_files(files, config):
    pages = {"reference/cli.md": cli_page, "reference/config.md": config_page,
             "reliability/bad-inputs.md": bad_inputs_page}
    for uri, make in pages.items():
        if files.get_file_from_path(uri):
            raise PluginError(f"docs/{uri} is generated at build time: delete the committed copy")
        files.append(File.generated(config, uri, content=make()))
    r = render()
    r.READ.clear()
    for name, plot in r.PLOTS.items():
        png = plot()
        if png is not None:
            files.append(File.generated(config, f"benchmarks/plots/{name}", content=png))
    return files


def on_page_markdown(markdown, page, config, files):
    try:
        return render().fill(markdown, f"docs/{page.file.src_uri}")
    except (ValueError, KeyError) as e:
        raise PluginError(str(e)) from e


def on_post_build(config):
    orphans = render().orphans()
    if orphans:
        raise PluginError(f"bench/results/{', '.join(orphans)}: no page renders it; add a `<!-- bench:NAME -->` block "
                          "for it (bench/render.py) or delete the file")
