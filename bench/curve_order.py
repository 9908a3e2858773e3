"""The target's cost by width timed two ways in one process, back to back: widths in turn, and each width in a run of
consecutive calls (what `gamma: auto` measures, `koala.engine.calibrate._measure`).

    python bench/curve_order.py [--dtype bfloat16] [--position 256] [--reps 15] [--passes 2] [--json OUT]

Plain decoding repeats the one-token step and speculative rounds repeat the verify, so a curve that times widths in
turn, each right after another package's step, prices the steps differently from decoding. Prints both curves (ms
by width) with the CPU model; compare the one-token figure with plain decoding's ms per token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def in_turn(engine, max_width: int, position: int, reps: int) -> dict[int, float]:
    import torch

    steps = {w: (torch.zeros(1, w, dtype=torch.long), torch.arange(position, position + w))
             for w in range(1, max_width + 1)}
    times: dict[int, list[float]] = {w: [] for w in steps}
    with torch.no_grad():
        for w, (ids, pos) in steps.items():
            engine.step(ids, pos, position + w)
            engine.step(ids, pos, position + w)
        for _ in range(reps):
            for w, (ids, pos) in steps.items():
                t = time.perf_counter()
                engine.step(ids, pos, position + w)
                times[w].append((time.perf_counter() - t) * 1e3)
    return {w: round(sorted(ts)[len(ts) // 2], 2) for w, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--position", type=int, default=256)
    ap.add_argument("--max-width", type=int, default=21)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import benchinfo
    from koala.engine.calibrate import _measure
    from koala.engine.session import Session
    from koala.threads import configure_threads

    configure_threads()
    s = Session.open("smollm2-135m-instruct", dtype=a.dtype, compile=True)
    e = s.engine
    e.setup_caches(a.position + a.max_width + 1)
    passes = []
    for _ in range(a.passes):
        passes.append({"in_turn_ms": in_turn(e, a.max_width, a.position, a.reps),
                       "by_width_ms": {w: round(v, 2) for w, v in _measure(e, a.max_width, a.position,
                                                                           a.reps).items()}})
    benchinfo.write({**benchinfo.header(), "dtype": a.dtype, "position": a.position, "passes": passes}, a.json)


if __name__ == "__main__":
    main()
