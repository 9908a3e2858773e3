"""What every benchmark JSON starts with: the command, the commit, the date and the machine (CPU model and its
matrix-unit flags, threads, torch, GPU), so a figure can be traced to what produced it."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import torch


def commit() -> str | None:
    """The checkout's commit (with `+dirty` when it has uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def header() -> dict:
    from koala.precision import cpu_flags
    from koala.threads import cpu_model

    return {"command": " ".join(["python", *sys.argv]), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write(result: dict, out: str | None) -> None:
    """Print the JSON; with `out`, also write it there (atomically)."""
    import json

    text = json.dumps(result, indent=2)
    print(text)
    if out:
        from koala.io import atomic_path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out)) as tmp:
            Path(tmp).write_text(text + "\n")


class RunLog:
    """A resumable bench's finished runs, one JSON line each in OUT/runs.jsonl, kept by the bench's settings: the same
    command goes on where it stopped, and runs of other settings (another profile, another data set) are not reused.
    A line cut short by a kill is skipped."""

    def __init__(self, out: str | Path, setting: dict, key):
        """`key(run)`: what identifies a run within its settings (e.g. its seed and variant)."""
        import json

        self.path, self.setting, self.key = Path(out) / "runs.jsonl", setting, key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict = {}
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if all(r.get(k) == v for k, v in setting.items()):
                self.done[key(r)] = r

    def add(self, run: dict) -> dict:
        """Record a finished run (with the settings it ran under), print it and return it."""
        import json

        r = {**self.setting, **run}
        self.done[self.key(r)] = r
        print(json.dumps(r), flush=True)
        with self.path.open("a+b") as f:  # after a line cut short by a kill, on a line of its own
            cut = f.tell() > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"
            f.write((("\n" if cut else "") + json.dumps(r) + "\n").encode())
        return r
