"""Render the committed benchmark results (bench/results/*.json) as the Markdown tables the README quotes.

Each table sits in the README between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; `--write` replaces what is
between the markers, so a figure in the README is always one a results file holds.

    python bench/render.py            # print every table
    python bench/render.py --write    # and rewrite the README's blocks
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict | None:
    f = RESULTS / name
    return json.loads(f.read_text()) if f.exists() else None


def _machine(r: dict) -> str:
    commit = str(r["commit"])
    commit = commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")
    return (f"{r['cpu']} ({', '.join(r['cpu_flags']) or 'no matrix-unit flags'}), {r['threads']} threads, torch "
            f"{r['torch']}, commit {commit}, {r['date'][:10]}")


def dtype_table() -> str:
    """Teacher forcing, training and decoding, float32 against bf16, from their three results files."""
    rows = ["| what | float32 | bfloat16 | ratio | source |", "|---|---|---|---|---|"]
    machines = {}
    tf = _load("teacher_forcing.json")
    if tf:
        by = tf["by_compute_dtype"]
        a, b = (by[d]["teacher_forced"]["best_answer_tokens_per_s"] for d in ("float32", "bfloat16"))
        rows.append(f"| teacher forcing, answer tokens/s (top-32 and features kept) | {a:,.0f} | {b:,.0f} | "
                    f"{b / a:.2f}x | `teacher_forcing.json` |")
        if "sampling" in by["float32"]:
            a, b = (by[d]["sampling"]["best_tokens_per_s"] for d in ("float32", "bfloat16"))
            rows.append(f"| sampling (batched decoding), new tokens/s | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | "
                        "`teacher_forcing.json` |")
        machines["teacher_forcing.json"] = tf
    for name in ("train.json", "train_compiled.json"):
        tr = _load(name)
        if tr:
            r = {x["compute_dtype"]: x for x in tr["runs"]}
            a, b = r["float32"]["tokens_per_s"], r["bfloat16"]["tokens_per_s"]
            how = "compiled: `training.compile`" if "compiled" in name else "eager"
            rows.append(f"| {tr['kind']} heads training ({how}, unroll {tr['unroll']}, batch {tr['batch_size']}), "
                        f"trained tokens/s | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | `{name}` |")
            machines[name] = tr
    dec = _load("decode_dtypes.json")
    if dec:
        by = dec["by_dtype"]
        for mode in ("eager", "compile"):
            if mode not in by.get("float32", {}) or mode not in by.get("bfloat16", {}):
                continue
            f32, b16 = by["float32"][mode], by["bfloat16"][mode]
            for what in ("autoregressive", "speculative"):
                a, b = f32["tokens_per_s"][what], b16["tokens_per_s"][what]
                rows.append(f"| decoding, {mode}, {what} tokens/s | {a:.1f} | {b:.1f} | {b / a:.2f}x | "
                            "`decode_dtypes.json` |")
            w = max(int(k) for k in f32["verify_over_step"])
            rows.append(f"| decoding, {mode}: a forward of {w} tokens over one of 1 | "
                        f"{f32['verify_over_step'][str(w)]:.2f}x | {b16['verify_over_step'][str(w)]:.2f}x | | "
                        "`decode_dtypes.json` |")
        machines["decode_dtypes.json"] = dec
    notes = "\n".join(f"* `{n}`: `{r['command']}` on {_machine(r)}" for n, r in machines.items())
    return "\n".join(rows) + "\n\n" + notes


def fidelity_table() -> str:
    tf = _load("teacher_forcing.json")
    if not tf or "bf16_vs_fp32" not in tf:
        return "(no results)"
    f = tf["bf16_vs_fp32"]
    return (f"Over {f['answer_positions']:,} answer positions of {f['conversations']} ShareGPT conversations the "
            f"profiles never teacher-force (`teacher_forcing.json`, `bf16_vs_fp32`): the bf16 target's top-1 token is "
            f"the fp32 target's at {100 * f['top1_agreement']:.1f}% of positions, its stored top-32 log-probs differ "
            f"by {f['mean_abs_top32_logprob_diff']:.3f} on average (largest logit difference "
            f"{f['max_abs_logit_diff']:.2f}), and its features by {100 * f['feature_relative_error']:.1f}% (relative "
            "norm).")


def curve_table() -> str:
    c = _load("dtype_curve.json")
    if not c:
        return "(no results)"
    rows = ["| compute dtype | steps in the budget | held-out agreement of drafts 1 / 2 / 3 at the end |", "|---|---|---|"]
    for d, last in c["final"].items():
        if last:
            rows.append(f"| {d} | {last['step']} in {last['train_s'] / 60:.1f} min | "
                        f"{' / '.join(f'{x:.3f}' for x in last['agreement'])} |")
    return "\n".join(rows) + f"\n\n`{c['command']}` on {_machine(c)}; plot: `docs/dtype_curve.png`."


def load_table() -> str:
    r = _load("load.json")
    if not r:
        return "(no results)"
    rows = ["| thread setting | alone, tokens/s | beside a 2-thread job, tokens/s (threads) | share kept "
            "| alone vs all cores |", "|---|---|---|---|---|"]
    for name, s in r["settings"].items():
        rows.append(f"| {name} | {s['alone_tokens_per_s']:.1f} | {s['loaded_tokens_per_s']:.1f} "
                    f"({s['threads_loaded']}) | {s['fair_share']:.2f} | {s['alone_vs_all_cores']:.2f} |")
    return "\n".join(rows) + f"\n\n`{r['command']}` on {_machine(r)}."


def default_table() -> str:
    r = _load("default_profile.json")
    if not r:
        return "(no results)"
    rows = ["| what | result |", "|---|---|",
            f"| wall time, empty run directory | {r['wall_s'] / 60:.1f} min |"]
    for name, st in sorted(r["stages"].items(), key=lambda kv: kv[0] == "heads"):  # the final stage last
        agree = " / ".join(f"{x:.2f}" for x in st["heldout_greedy_agreement_by_draft"])
        rows.append(f"| {name}: {st['steps']} steps on `{st['data']}` | held-out agreement by draft {agree} |")
    for name, e in r["evaluations"].items():
        tps = e["tokens_per_s"]
        rows.append(f"| {e['bench']} {e['prompts']}, `{e['drafter']}` ({e['mode']}, {e['dtype']}, gamma {e['gamma']}) | "
                    f"tau {e['tau']:.2f}, speed-up {e['speedup']:.2f}x ({tps['speculative']:.1f} vs "
                    f"{tps['autoregressive']:.1f} tokens/s), lossless {e['lossless']}, first-draft acceptance "
                    f"{e['acceptance_by_position'][0]:.2f} |")
    return "\n".join(rows) + f"\n\n`{r['command']}` on {_machine(r)}."


def eagle3_table() -> str:
    r = _load("eagle3.json")
    if not r:
        return "(no results)"

    def cell(m, key):
        v = m.get(key)
        return "–" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    benches = [b.split(":")[0] for b in r["bench"].split(",")]
    head = ["kind", "seeds", "steps", "train min", "held-out acceptance, drafts 1 / 2 / 3",
            "greedy agreement, drafts 1 / 2 / 3", *[f"{b}: τ, speed-up" for b in benches]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in r["summary"].items():
        acc = " / ".join(cell(m, f"heldout_expected_acceptance_pos{p}") for p in (1, 2, 3))
        agr = " / ".join(cell(m, f"heldout_greedy_agreement_pos{p}") for p in (1, 2, 3))
        per = [f"{cell(m, f'tau_{b}')}, {cell(m, f'speedup_{b}')}" for b in benches]
        mins = m["train_s"]["mean"] / 60 if "train_s" in m else float("nan")
        rows.append(f"| {name} | {len(m['seeds'])} | {m['steps']} | {mins:.1f} | {acc} | {agr} | " + " | ".join(per) + " |")
    return "\n".join(rows) + f"\n\n`{r['command']}` on {_machine(r)}; gamma {r['gamma']}, greedy, compiled engine."


def eagle3_data_table() -> str:
    r = _load("eagle3_data.json")
    if not r:
        return "(no results)"
    f, st, on = r["teacher_forcing_features_only"], r["stored"], r["online"]
    return "\n".join([
        "| EAGLE-3 data | tokens/s | bytes kept per 1,000 tokens |", "|---|---|---|",
        f"| teacher forcing, features only (EAGLE-1) | {f['answer_tokens_per_s']:,.0f} answer tokens/s | "
        f"{f['feature_bytes_per_1k_tokens'] / 1e6:.2f} MB |",
        f"| stored: teacher forcing with the states of layers {r['aux_layers']} | {st['answer_tokens_per_s']:,.0f} "
        f"answer tokens/s | {st['feature_bytes_per_1k_tokens'] / 1e6:.2f} MB |",
        f"| online: the target run again over the training set (cached) | {on['tokens_per_s']:,.0f} tokens/s | "
        f"{on['cache_bytes_per_1k_tokens'] / 1e6:.2f} MB |",
        "", f"`{r['command']}` on {_machine(r)}, {r['compute_dtype']}, {r['conversations']} ShareGPT conversations."])


def trees_table() -> str:
    """Chain against tree in one run per dtype and mode (bench/decode.py)."""
    r = _load("decode.json")
    if not r:
        return "(no results)"
    rows = ["| dtype, engine | autoregressive tokens/s | best chain: shape, τ, tokens/s, speed-up | best tree: shape, τ, "
            "tokens/s, speed-up | tree τ / chain τ | auto chose | lossless chain, tree |", "|---|---|---|---|---|---|---|"]
    for dtype, by in r["by_dtype"].items():
        for mode in ("eager", "compile"):
            m = by.get(mode)
            if not m:
                continue
            c, t = m["chain"], m["tree"]
            rows.append(f"| {dtype}, {mode} | {m['tokens_per_s']['autoregressive']:.1f} | {c['shape']}, {c['tau']:.2f}, "
                        f"{c['tokens_per_s']:.1f}, {c['speedup']:.2f}x | {t['shape']}, {t['tau']:.2f}, "
                        f"{t['tokens_per_s']:.1f}, {t['speedup']:.2f}x | {m['tree_over_chain_tau']:.2f} | "
                        f"{m['auto']['chosen']} (expected {m['auto']['expected_speedup']:.2f}x) | {c['lossless']}, "
                        f"{t['lossless']} |")
            for name, f in m.get("fixed", {}).items():
                rows.append(f"| ↳ fixed tree {f['shape']} | | | {f['tau']:.2f} τ, {f['tokens_per_s']:.1f} tokens/s, "
                            f"{f['speedup']:.2f}x | {f['tau_over_chain']:.2f} | | {f['lossless']} |")
            widths = m["target_forward_ms_by_width"]
            rows_w = " / ".join(f"{widths[w]:.0f}" for w in ("1", "2", "4", "8", "16", "21") if w in widths)
            rows.append(f"| ↳ target forward of 1 / 2 / 4 / 8 / 16 / 21 tokens (ms) | {rows_w} | | | | | |")
    return "\n".join(rows) + (f"\n\n`{r['command']}` on {_machine(r)}; drafter `{r['drafter']}`, {r['prompts']} MT-bench "
                              f"prompts, {r['max_new_tokens']} new tokens, greedy.")


TABLES = {"trees": trees_table, "default": default_table, "dtype": dtype_table, "fidelity": fidelity_table, "curve": curve_table, "load": load_table,
          "eagle3": eagle3_table, "eagle3-data": eagle3_data_table}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="rewrite the README's marked blocks")
    a = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, fn in TABLES.items():
        body = fn()
        print(f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->\n")
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    if a.write:
        readme.write_text(text)


if __name__ == "__main__":
    main()
