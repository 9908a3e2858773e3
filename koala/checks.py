"""Checks of what a user gave, run before any expensive work: each failure is one KoalaError naming the input, the
rule and the fix. The command line (koala.cli, koala_flows.cli) calls them; so can any other front end.
"""

from __future__ import annotations

from koala.errors import KoalaError


def one_of(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    """A choice given on the command line (None: not given) is one of `choices`."""
    if value is not None and value not in choices:
        raise KoalaError(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def at_least_one(**options) -> None:
    """Counts given on the command line (None: not given) must be >= 1."""
    for name, v in options.items():
        if v is not None and v < 1:
            raise KoalaError(f"--{name.replace('_', '-')} {v}: must be at least 1 (leave it out for the profile's value)")


def validated(model, origin: str, **values):
    """A config section from command-line values; a bad value is a one-line KoalaError naming the option."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]).replace("_", "-")
        raise KoalaError(f"{origin}: --{field} {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None


def with_compute_dtype(set_: list[str] | None, compute_dtype: str | None) -> list[str]:
    """--compute-dtype as the override it stands for."""
    from koala.precision import COMPUTE_DTYPES

    import os

    from koala.precision import ENV

    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise KoalaError(f"--compute-dtype {compute_dtype!r}: use {', '.join(COMPUTE_DTYPES)}")
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in COMPUTE_DTYPES:
        raise KoalaError(f"{ENV}={forced!r} is not one of {', '.join(COMPUTE_DTYPES)}: set it to one, or unset it")
    return [*(set_ or []), *([f"compute_dtype={compute_dtype}"] if compute_dtype is not None else [])]


def check_run_options(target: str, dtype: str, device: str, drafter: str | None = None) -> None:
    """What can be checked before the target loads: dtype, device, and the drafter spec and its files."""
    from koala.engine.drafter_spec import check_drafter_spec
    from koala.targets import check_device, parse_dtype

    parse_dtype(dtype)
    check_device(device)
    if drafter is not None:
        check_drafter_spec(drafter)


def check_prompt_source(source: str) -> None:
    """A prompt file or log directory named in the config exists (the built-in sources and hf: are checked when
    read)."""
    from pathlib import Path

    from koala.data.prompts import NAMED

    if source in NAMED or source.startswith("hf:"):
        return
    if not Path(source).exists():
        raise KoalaError(f"prompts.source {source}: no such file or directory: check the path (or use "
                         f"{', '.join(NAMED)}, hf:NAME)")


def writable_dir(directory, option: str = "--out") -> None:
    """The directory a command will write its results to can be written, checked before hours of work."""
    import tempfile
    from pathlib import Path

    d = Path(directory)
    probe = d
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise KoalaError(f"{option} {d}: cannot write there ({e.strerror or e}): choose a writable directory") from None


def check_training_paths(out_dir, resume: bool, init: str | None = None, data: str | None = None,
                          heads: bool = False) -> None:
    """Before the target loads: --out writable, --resume has a checkpoint to continue, --init and --data exist."""
    from pathlib import Path

    from koala.data.shards import MANIFEST
    from koala.training.checkpoints import latest_checkpoint

    writable_dir(out_dir)
    if resume and latest_checkpoint(Path(out_dir)) is None:
        raise KoalaError(f"--resume: {out_dir} holds no checkpoint to continue: drop --resume to start a new "
                         "training there")
    if init is not None:
        p = Path(init.removeprefix("heads:"))
        need = "heads.json" if heads else "config.json"
        if not (p / need).exists():
            raise KoalaError(f"--init {init}: no {'draft heads' if heads else 'drafter'} there (no {need}): pass the "
                             f"{'OUT/heads directory of `koala heads`' if heads else 'OUT/drafter directory of a '}"
                             f"{'' if heads else 'training (koala pretrain or koala distill)'}")
    if data is not None and not (Path(data) / MANIFEST).exists():
        raise KoalaError(f"--data {data}: no distillation set there (no {MANIFEST}): build it with "
                         f"`koala sample --out {data}`")
