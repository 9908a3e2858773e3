"""The default target's step with int8 weight-only linears (`eval.weights: int8`, koala.engine.quantize) against its
full-weight step, in one precision per run: what int8 weights buy koala's engine on this machine.

    python bench/weight_only_step.py --precision int8|bfloat16 [--context 300] [--widths 1,4,8] [--reps 60]
                                     [--prefill 80] [--json OUT]

int8: every projection of every layer and the output head quantised per output channel and run by torch's CPU kernel
`aten._weight_int8pack_mm`, on bfloat16 activations; bfloat16: the target's full weights. The compiled step is timed
at each of `--widths` after a prefill of `--context` tokens; `--prefill N` also times an eager prefill of N tokens
(the path a prompt takes: wider than any compiled step, int8 layers run the dense GEMM on the dequantised weight).
`--widths ""` times the prefill alone, compiling nothing. Run the two precisions back to back: this machine's timings
drift between processes. The int8 packages compile once per machine (minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def time_prefill(engine, n: int, reps: int = 5) -> float:
    """Mean ms of an eager prefill of n random tokens into an empty cache."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, engine.args.vocab_size, (1, n))
    with torch.no_grad():
        for i in range(2 + reps):  # two untimed
            if i == 2:
                t = time.perf_counter()
            engine.step(ids, torch.arange(n), n, eager=True)
    return round(1e3 * (time.perf_counter() - t) / reps, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=["int8", "bfloat16"], required=True)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--widths", default="1,4,8")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--prefill", type=int, default=0, help="also time an eager prefill of this many tokens")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import benchinfo
    from koala.engine.session import Session

    widths = [int(x) for x in a.widths.split(",") if x]
    s = Session.open("smollm2-135m-instruct", dtype="bfloat16", compile=bool(widths),
                     weights="int8" if a.precision == "int8" else "full")
    s.engine.setup_caches(1024)
    out = {**benchinfo.header(), "precision": a.precision, "engine": s.describe(), "context": a.context,
           "reps": a.reps}
    if a.prefill:
        out["prefill_tokens"], out["prefill_ms"] = a.prefill, time_prefill(s.engine, a.prefill)
        print(f"{a.precision} prefill of {a.prefill} tokens: {out['prefill_ms']:.1f} ms", flush=True)
    if widths:
        from step_cost import time_widths

        out["ms_by_width"] = time_widths(s.engine, a.context, widths, a.reps, f"{a.precision} ")
    benchinfo.write(out, a.json)


if __name__ == "__main__":
    main()
