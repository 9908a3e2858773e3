"""The default target's compiled step with int8 weight-only linears, against its bfloat16 step: what an int8 target
precision would buy koala's engine (not a koala feature yet: the quantised target is built here).

    python bench/weight_only_step.py --precision int8|bfloat16 [--context 300] [--widths 1,4,8] [--reps 60] [--json OUT]

int8: every projection of every layer and the output head quantised per output channel (symmetric, the scale the
row's largest weight / 127) and run by torch's CPU kernel `aten._weight_int8pack_mm` inside the ahead-of-time
compiled step; activations, norms, attention and the KV cache stay bfloat16. Run the two precisions back to back,
each with its own `KOALA_AOT_DIR` (the int8 packages compile once, minutes): this machine's timings drift between
processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def int8_linear(lin):
    import torch
    import torch.nn as nn

    class Int8Linear(nn.Module):
        def __init__(self):
            super().__init__()
            w = lin.weight.detach().float()
            s = w.abs().amax(1).clamp(min=1e-8) / 127
            self.register_buffer("w", torch.round(w / s[:, None]).to(torch.int8))
            self.register_buffer("s", s.to(lin.weight.dtype))
            self.out_features = w.shape[0]

        def forward(self, x):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.w, self.s)
            return y.view(*x.shape[:-1], self.out_features)

    return Int8Linear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=["int8", "bfloat16"], required=True)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--widths", default="1,4,8")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import benchinfo
    from koala.engine.session import Session
    from koala.threads import configure_threads

    configure_threads()
    s = Session.open("smollm2-135m-instruct", dtype="bfloat16", compile=True)
    if a.precision == "int8":
        for layer in s.target.model.model.layers:
            for mod, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                               (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    setattr(mod, n, int8_linear(getattr(mod, n)))
        s.engine.lm_head = int8_linear(s.target.model.lm_head)  # the embedding table stays bf16 (a row lookup)
    from step_cost import time_widths

    s.engine.setup_caches(1024)
    ms = time_widths(s.engine, a.context, [int(x) for x in a.widths.split(",")], a.reps, f"{a.precision} ")
    benchinfo.write({**benchinfo.header(), "precision": a.precision, "context": a.context, "reps": a.reps,
                     "ms_by_width": ms}, a.json)


if __name__ == "__main__":
    main()
