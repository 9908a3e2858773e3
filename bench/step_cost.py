"""What one compiled step of the target costs by width, at a given context in a given cache: the engine's floor.

    python bench/step_cost.py [--dtype bfloat16] [--slots 1024] [--context 300] [--widths 1,2,4,8,16] [--json OUT]
        [--baseline OTHER.json]
    python bench/step_cost.py --one-token-package [--rounds 6]

The second form compares the two ways to run a one-token step: the wide package at width 2 (the engine's) and a
one-token package of its own, in turns, each over `--reps` calls per round.

The default target's compiled steps (ahead of time on a CPU), after an eager prefill of `--context` random tokens
into caches sized for `--slots`; each width's step is timed over `--reps` calls after a warm-up, rewriting the same
slots. Run it at two commits in turn (a worktree and `PYTHONPATH`, each with its own `KOALA_AOT_DIR`) to compare
engines: this machine's timings drift by up to 15% between processes, so compare runs taken back to back.
`--baseline` carries such a run of another commit (its JSON, written just before on this machine) into this one's
as `baseline`, so the two are rendered side by side (bench/render.py, `step-cost`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_widths(engine, context: int, widths: list[int], reps: int, label: str = "") -> dict[int, float]:
    """Mean ms of the engine's compiled step at each width, after an eager prefill of `context` random tokens."""
    import torch

    torch.manual_seed(0)
    ms = {}
    with torch.no_grad():
        engine.step(torch.randint(0, 40000, (1, context)), torch.arange(context), context, eager=True)
        for w in widths:
            pos, x = torch.arange(context, context + w), torch.randint(0, 40000, (1, w))
            for _ in range(5):  # the first call loads (or compiles) the package
                engine.step(x, pos, context + w, hidden=True)
            t = time.perf_counter()
            for _ in range(reps):
                engine.step(x, pos, context + w, hidden=True)
            ms[w] = round(1e3 * (time.perf_counter() - t) / reps, 3)
            print(f"{label}width {w}: {ms[w]:.2f} ms", flush=True)
    return ms


def read_baseline(path: str) -> dict:
    """Another commit's run of this bench (its --json file), or a one-line exit naming the file."""
    import json

    try:
        b = json.loads(Path(path).read_text())
        b["ms_by_width"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--baseline {path}: not a JSON of this bench's widths ({e!r}): pass the --json file of "
                         "`python bench/step_cost.py --widths ...` run at the other commit")
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=1024, help="the cache the run sizes (a compiled one: a power of two)")
    ap.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    ap.add_argument("--widths", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--baseline", default=None, help="another commit's JSON of this bench, run just before on this "
                    "machine: kept in this one's as `baseline`")
    ap.add_argument("--one-token-package", action="store_true",
                    help="time a one-token step through the wide package and through a one-token package, in turns")
    ap.add_argument("--rounds", type=int, default=6, help="turns of each (--one-token-package)")
    a = ap.parse_args()
    b = read_baseline(a.baseline) if a.baseline else None  # before minutes of building and timing
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import benchinfo
    from koala.engine.session import Session

    s = Session.open("smollm2-135m-instruct", dtype=a.dtype, compile=True)
    e = s.engine
    e.setup_caches(a.slots)
    head = {**benchinfo.header(), "engine": s.describe(), "slots": e.max_seq_len, "context": a.context, "reps": a.reps}
    if a.one_token_package:
        runs = {"wide package at width 2": [], "one-token package": []}
        for r in range(a.rounds):
            for name in runs:
                e.compiled.one_as_two = name.startswith("wide")
                runs[name].append(time_widths(e, a.context, [1], a.reps, f"round {r + 1}, {name}: ")[1])
        med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        print("median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
        benchinfo.write({**head, "rounds": a.rounds, "one_token_ms": runs, "median_ms": med}, a.json)
        return
    ms = time_widths(e, a.context, [int(w) for w in a.widths.split(",")], a.reps)
    out = {**head, "ms_by_width": ms}
    if a.baseline:
        differ = [k for k in ("cpu", "cpu_flags", "threads", "torch", "slots", "context", "reps") if b.get(k) != out[k]]
        if differ:
            raise SystemExit(f"--baseline {a.baseline}: measured otherwise ({', '.join(differ)}): run both with the "
                             "same settings on this machine")
        out["baseline"] = {k: b[k] for k in ("command", "commit", "date", "engine", "ms_by_width")}
    benchinfo.write(out, a.json)


if __name__ == "__main__":
    main()
