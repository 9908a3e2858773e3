"""A spinner with the elapsed time while koala builds something once per machine (a compiled step, a kernel)."""

from __future__ import annotations

import sys
import time


def spinner(what: str):
    """A spinner with the elapsed time on stderr while something builds (a compiled step: minutes on a small CPU);
    in a log file, a line when it starts and one when it ends."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return _Announced(Progress(SpinnerColumn(), TextColumn("[koala] {task.description}"), TimeElapsedColumn(),
                               console=Console(stderr=True), transient=False), what)


class _Announced:
    def __init__(self, progress, what: str):
        self.progress, self.what = progress, what

    def __enter__(self):
        self.t = time.perf_counter()
        self.live = self.progress.console.is_terminal  # a log file gets a line when it starts and one when it ends
        if self.live:
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=None)
        else:
            print(f"[koala] {self.what} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        outcome = "done" if exc[0] is None else "failed"
        if self.live:
            self.progress.update(self.task, description=f"{self.what}: {outcome}")
            self.progress.stop()
        else:
            print(f"[koala] {self.what}: {outcome} in {time.perf_counter() - self.t:.0f} s", file=sys.stderr, flush=True)
        return False
