"""What torch's CPU weight-only kernels would save the target's step: the GEMMs of one decode step, by precision and width.

    python bench/weight_only.py [--widths 1,4,16] [--reps 30] [--json OUT]

Times the linear layers one step of the default target runs (every layer's q/k/v, o, gate/up and down projections,
and the tied output head) at each width, with float32 and bfloat16 weights (`F.linear`) and with torch's weight-only
kernels: int8 per output channel (`aten._weight_int8pack_mm`) and int4 in groups of 32
(`aten._weight_int4pack_mm_for_cpu`, as torchao's CPU layout calls it), on bfloat16 activations. Random weights of
the target's shapes; one layer's matrices timed and multiplied by the layer count. Prints the CPU model and its
matrix-unit flags with the result. A weight-only kernel pays in koala's engine only where it is cheaper at the widths
speculative decoding verifies (4-21 tokens), not just at one token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(f, reps: int) -> float:
    f()
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1,4,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the result here too (not under bench/results: no page "
                    "renders it)")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from koala import benchinfo
    from koala.threads import configure_threads

    configure_threads()
    torch.manual_seed(0)
    # SmolLM2-135M: hidden 576, 9 query and 3 key/value heads of 64, MLP 1536, 30 layers, vocabulary 49152
    dim, kv, mlp, layers, vocab = 576, 192, 1536, 30, 49152
    shapes = {"qkv": (dim + 2 * kv, dim), "o": (dim, dim), "gate_up": (2 * mlp, dim), "down": (dim, mlp),
              "head": (vocab, dim)}
    count = {"qkv": layers, "o": layers, "gate_up": layers, "down": layers, "head": 1}
    mats = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        s8 = w.abs().amax(1) / 127
        q8 = torch.round(w / s8[:, None]).to(torch.int8)
        g = 32
        wg = w.view(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s4 = (hi - lo).clamp(min=1e-8) / 15
        q4 = torch.clamp(torch.round((wg - lo[..., None]) / s4[..., None]), 0, 15).to(torch.int32).view(n, k)
        mats[name] = {"f32": w, "bf16": w.bfloat16(), "q8": q8, "s8": s8.bfloat16(),
                      "q4": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                      "sz4": torch.stack([s4, lo + 8 * s4], -1).transpose(0, 1).contiguous().bfloat16()}
    kernels = {
        "float32": lambda m, x: F.linear(x.float(), m["f32"]),
        "bfloat16": lambda m, x: F.linear(x, m["bf16"]),
        "int8": lambda m, x: torch.ops.aten._weight_int8pack_mm(x, m["q8"], m["s8"]),
        "int4": lambda m, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m["q4"], 32, m["sz4"]),
    }
    ms: dict[str, dict[int, float]] = {k: {} for k in kernels}
    with torch.no_grad():
        for width in (int(w) for w in a.widths.split(",")):
            for name, f in kernels.items():  # precisions in turn at each width, so drift hits them alike
                total = 0.0
                for mat, (n, k) in shapes.items():
                    x = torch.randn(width, k, dtype=torch.bfloat16)
                    total += count[mat] * _time(lambda: f(mats[mat], x), a.reps)
                ms[name][width] = round(total, 2)
    benchinfo.write({**benchinfo.header(), "what": "ms of the GEMMs of one decode step of the default target, by "
                     "weight precision and width", "ms": ms}, a.json)


if __name__ == "__main__":
    main()
