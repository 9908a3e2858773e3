"""The target's wide step by width, in each of its two ahead-of-time builds (autotuned, and without autotuning) and
as the engine runs it (each width on the build `AotStep._by_width` chose), back to back in one process.

    python bench/wide_builds.py [--dtype bfloat16] [--position 256] [--reps 9] [--passes 2] [--json OUT]

Autotuning picks each GEMM's kernel at one width and the symbolic width runs it at every width; this shows where
that costs (ms by width) on this CPU, and what the engine's choice buys, and how long each build took where this run
built it (`build_s`; KOALA_AOT_DIR=an empty folder to time both). Prints JSON with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--position", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from koala import benchinfo
    from koala.engine.compile import UNTUNED, AotStep, builds as built_packages
    from koala.engine.session import Session
    from koala.threads import configure_threads

    configure_threads()
    s = Session.open("smollm2-135m-instruct", dtype=a.dtype, compile=True)
    e = s.engine
    if not isinstance(e.compiled, AotStep):
        raise SystemExit("bench/wide_builds.py measures ahead-of-time steps: unset KOALA_AOT=0")
    e.setup_caches(1024)
    P = a.position

    def args(w):
        return torch.zeros(1, w, dtype=torch.long), torch.arange(P, P + w)

    with torch.no_grad():
        e.step(*args(2), P + 2)  # the wide step as the engine runs it: built (or loaded) and its builds chosen
    sig = next(k for k in e.compiled.steps if k[0])
    x, pos = args(2)
    caches = [t for c in e.caches for t in (c.k, c.v)]
    tree = [pos, torch.arange(16 * -(-(P + 2) // 16)) <= pos[:, None]]
    builds = {"autotuned": e.compiled._load_or_build(sig, [x, pos, *tree], caches, e.compiled.mode),
              "untuned": e.compiled._load_or_build(sig, [x, pos, *tree], caches, UNTUNED)}

    def timed(fn, w):
        ts = []
        for i in range(a.reps + 2):
            t = time.perf_counter()
            fn(w)
            if i >= 2:
                ts.append((time.perf_counter() - t) * 1e3)
        return round(sorted(ts)[len(ts) // 2], 2)

    def by_build(step):
        def run(w):
            ids, p = args(w)
            S = 16 * -(-(P + w) // 16)
            step(ids, p, p, torch.arange(S) <= p[:, None], *caches)
        return run

    passes = []
    with torch.no_grad():
        for _ in range(a.passes):
            row = {name: {w: timed(by_build(step), w) for w in WIDTHS if w > 1} for name, step in builds.items()}
            row["engine"] = {w: timed(lambda w: e.step(*args(w), P + w), w) for w in WIDTHS}
            passes.append(row)
    step = e.compiled.steps[sig]
    chosen = {w: ("untuned" if step.build[w] else "autotuned") for w in WIDTHS if w > 1} if hasattr(step, "build") \
        else "autotuned at every width"
    built = {("untuned" if b["mode"] == UNTUNED else "autotuned"): b["seconds"] for b in built_packages()
             if b["wide"] and b["layers"] == len(e.layers)}
    benchinfo.write({**benchinfo.header(), "dtype": a.dtype, "position": a.position, "engine_builds": chosen,
                     "build_s": built, "passes": passes}, a.json)


if __name__ == "__main__":
    main()
