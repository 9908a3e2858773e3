"""koala's decoding alone and beside a competing CPU job, under each OpenMP thread setting; prints JSON.

Each setting runs in a fresh process (OpenMP reads its environment once, at start): koala's eager engine decodes
`--tokens` greedy tokens autoregressively, first alone, then while a competitor (another process keeping
`--competitor-threads` threads busy with matrix products) runs. The fair share is the loaded speed over the idle one;
`threads` is torch's thread count when decoding ended (koala's default shares the cores: koala.threads.CoreShare).

    python bench/load.py [--tokens 64] [--out bench/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from koala import benchinfo
from koala.threads import available_cores

CORES = str(available_cores())
SETTINGS = {  # name -> environment of the decoding process
    f"all cores, spinning (KOALA_THREADS={CORES}, OMP_WAIT_POLICY=ACTIVE)": {"KOALA_THREADS": CORES,
                                                                           "OMP_WAIT_POLICY": "ACTIVE"},
    f"all cores, passive (KOALA_THREADS={CORES}, OMP_WAIT_POLICY=PASSIVE)": {"KOALA_THREADS": CORES,
                                                                           "OMP_WAIT_POLICY": "PASSIVE"},
    f"all cores, OpenMP's default wait (KOALA_THREADS={CORES})": {"KOALA_THREADS": CORES},
    "one thread (KOALA_THREADS=1)": {"KOALA_THREADS": "1"},
    "koala's default (shares the cores)": {},
}
DEFAULT = "koala's default (shares the cores)"

DECODE = r"""
import json, sys, time, torch
from koala.engine.decode import generate
from koala.engine.session import Session
s = Session.open("smollm2-135m-instruct")
ids = s.target.tokenizer("Tell me about the history of the printing press.")["input_ids"]
generate(s.engine, ids, 8)  # warm-up
rates = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    n = len(generate(s.engine, ids, int(sys.argv[1])).tokens)
    rates.append(n / (time.perf_counter() - t))
print(json.dumps({"tokens_per_s": sorted(rates)[len(rates) // 2], "threads": torch.get_num_threads()}))
"""

COMPETE = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    a @ a
"""


def decode(env: dict, tokens: int, reps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", DECODE, str(tokens), str(reps)], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--competitor-threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = {}
    for name, env in SETTINGS.items():
        alone = decode(env, a.tokens, a.reps)
        rival = subprocess.Popen([sys.executable, "-c", COMPETE, str(a.competitor_threads), "3600"])
        try:
            time.sleep(2)  # the competitor is up and computing
            loaded = decode(env, a.tokens, a.reps)
        finally:
            rival.kill()
            rival.wait()
        rows[name] = {"env": env, "threads_alone": alone["threads"], "threads_loaded": loaded["threads"],
                      "alone_tokens_per_s": round(alone["tokens_per_s"], 2),
                      "loaded_tokens_per_s": round(loaded["tokens_per_s"], 2),
                      "fair_share": round(loaded["tokens_per_s"] / alone["tokens_per_s"], 3)}
        print(json.dumps({name: rows[name]}), flush=True)
    base = rows[f"all cores, OpenMP's default wait (KOALA_THREADS={CORES})"]["alone_tokens_per_s"]
    for r in rows.values():
        r["alone_vs_all_cores"] = round(r["alone_tokens_per_s"] / base, 3)
    benchinfo.write({**benchinfo.header(), "tokens": a.tokens, "reps": a.reps,
                     "competitor": f"{a.competitor_threads}-thread fp32 matmul loop", "settings": rows}, a.out)


if __name__ == "__main__":
    main()
