"""What EAGLE-3's training data costs, two ways, on the default target; prints JSON.

* stored: teacher forcing keeps the target's states at the fused layers with its features
  (`teacher_forced.aux_layers`): one forward gives the top-k, the features and the states;
* online: training runs the frozen target once more over each training sequence (koala.training.objectives.
  FeatureSource, whose cache keeps the result in memory and beside the data).

Both in the measured compute dtype (bf16 autocast where the matrix units pay), over the same ShareGPT conversations:
answer tokens/s of teacher forcing without and with the states, tokens/s of the online pass, and the bytes each
keeps per 1,000 tokens.

    python bench/eagle3_data.py [--conversations 64] [--out bench/results/eagle3_data.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from koala import benchinfo, precision
from koala.data import prompts as P
from koala.data.teacher import force_batch, tokenize
from koala.models.heads import aux_states, reference_aux_layers
from koala.targets import load_target
from koala.threads import configure_threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    configure_threads()
    t = load_target(a.target, dtype="float32")
    m = t.model
    c = m.config
    compute = precision.resolve("auto", m.device, c.hidden_size, c.intermediate_size, c.vocab_size)
    layers = reference_aux_layers(c.num_hidden_layers)
    seqs = []
    for r in P.sharegpt():
        s = tokenize(t.tokenizer, r, a.max_seq_len) if r.response else None
        if s is not None:
            seqs.append(s)
        if len(seqs) == a.conversations:
            break
    answer = sum(len(ids) - p for ids, p in seqs)
    total = sum(len(ids) for ids, _ in seqs)
    out = {**benchinfo.header(), "target": a.target, "compute_dtype": compute.name, "aux_layers": layers,
           "conversations": len(seqs), "answer_tokens": answer, "tokens": total}

    def teacher(aux):
        force_batch(m, seqs[:2], 32, True, 0, compute, aux)  # warm-up
        t0, kept = time.perf_counter(), 0
        for i in range(0, len(seqs), a.batch_size):
            for f in force_batch(m, seqs[i:i + a.batch_size], 32, True, 0, compute, aux):
                kept += f.features.nbytes
        wall = time.perf_counter() - t0
        return {"answer_tokens_per_s": round(answer / wall, 1), "feature_bytes_per_1k_tokens": round(kept / total * 1e3)}

    out["teacher_forcing_features_only"] = teacher(None)
    out["stored"] = teacher(layers)
    with torch.no_grad(), compute.autocast(m.device):
        aux_states(m, torch.tensor([seqs[0][0]]), None, layers)  # warm-up
        t0, kept = time.perf_counter(), 0
        for ids, _ in seqs:  # as FeatureSource caches them: one sequence at a time
            kept += aux_states(m, torch.tensor([ids]), None, layers)[0].half().nbytes
        wall = time.perf_counter() - t0
    out["online"] = {"tokens_per_s": round(total / wall, 1), "cache_bytes_per_1k_tokens": round(kept / total * 1e3)}
    benchinfo.write(out, a.out)


if __name__ == "__main__":
    main()
