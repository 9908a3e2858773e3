"""What the benches that time decoding variants in one process share (bench/threshold.py, bench/lookup_len.py): the
default target opened as `koala eval` opens it, the prompts, and the interleaved timing."""

from __future__ import annotations

import os


def session_and_prompts(bench: str):
    """The default target (eval.dtype auto, compiled steps, as `koala eval` opens it) and the chat-templated prompts
    of `bench` (BENCH:N,...)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala.cli import decoding_session
    from koala.config import TargetConfig
    from koala.evaluate import load_bench
    from koala.targets import encode_chat
    from koala.threads import configure_threads

    configure_threads()
    own = TargetConfig.model_fields["dtype"].default
    s = decoding_session("smollm2-135m-instruct", "auto", own, "cpu", compile=True)
    tok = s.target.tokenizer
    prompts = [encode_chat(tok, list(r.messages)) for spec in bench.split(",")
               for r in load_bench(spec.split(":")[0], int(spec.split(":")[1]))]
    return s, prompts


def interleaved(variants: dict, prompts: list[list[int]], run, reps: int) -> dict:
    """Each variant (`run(variant, prompt ids)` decodes with it) warmed once, then run on every prompt in turn, the
    order reversed every other prompt so the machine's drift weighs on all alike. Returns, per variant, decode time
    only (the prefill left out) summed over prompts and repetitions: ms per token, tokens per target forward and the
    speed-up over the variant named "target alone"."""
    tot = {name: {"decode_s": 0.0, "tokens": 0, "forwards": 0} for name in variants}
    for v in variants.values():  # every step shape loaded (or compiled) before anything is timed
        run(v, prompts[0])
    for r in range(reps):
        for i, ids in enumerate(prompts):
            for name in list(variants)[::1 if (i + r) % 2 == 0 else -1]:
                res = run(variants[name], ids)
                t = tot[name]
                t["decode_s"] += res.wall_s - res.prefill_s
                t["tokens"] += len(res.tokens) - 1  # the first token comes with the prefill
                t["forwards"] += res.target_forwards - 1
    ms = {name: 1e3 * t["decode_s"] / t["tokens"] for name, t in tot.items()}  # per token: in bf16 a near-tie may
    return {name: {"ms_per_token": round(ms[name], 3),                     # end a variant's answer earlier
                   "tokens_per_forward": round(t["tokens"] / t["forwards"], 3),
                   "speedup": round(ms["target alone"] / ms[name], 3)} for name, t in tot.items()}
