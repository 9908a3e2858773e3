"""Render the committed benchmark results (bench/results/*.json) as the Markdown tables and plots the docs quote.

A table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in the README or a page under docs/. The
documentation site fills the pages' blocks when it is built (docs/hooks/koala_docs.py) and draws the plots; `--write`
rewrites the README's blocks. So a figure in the docs is always one a results file holds, and a results file that no
page renders fails the build.

    python bench/render.py            # print every table
    python bench/render.py --write    # and rewrite the README's blocks
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROVENANCE = ("command", "commit", "date")  # and the machine: `cpu` or `gpu`
READ: set[str] = set()  # the results files rendered so far: what the orphan check compares against
BLOCK = re.compile(r"(<!-- bench:([\w-]+) -->\n).*?(<!-- /bench:\2 -->)", re.S)


def _load(name: str) -> dict | None:
    """A results file, checked to say how it was measured (command, commit, date, machine); None if absent."""
    f = RESULTS / name
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    missing = [k for k in PROVENANCE if not r.get(k)] + ([] if r.get("cpu") or r.get("gpu") else ["cpu or gpu"])
    if missing:
        raise ValueError(f"{f}: lacks {', '.join(missing)}: every results file says how and where it was measured "
                         "(write it with koala.benchinfo.write)")
    READ.add(name)
    return r


def _lossless(e: dict) -> str:
    """Identical prompts of the total, and how many more differ only at a near-tie of rounding."""
    ties = e.get("near_ties") or 0
    return e["lossless"] + (f" (+{ties} near-ties)" if ties else "")


def _shape(e: dict) -> str:
    """The draft shape an evaluation ran: its tree, or its chain's length; and a lookup match's own length."""
    shape = f"tree {e['tree']}" if e.get("tree") else f"gamma {e['gamma']}"
    return shape + (f", lookup {e['lookup_len']}" if e.get("lookup_len") else "")


def _machine(r: dict) -> str:
    commit = str(r["commit"])
    commit = commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")
    where = f"GPU {r['gpu']}" if r.get("gpu") else \
        f"{r['cpu']} ({', '.join(r['cpu_flags']) or 'no matrix-unit flags'}), {r['threads']} threads"
    return f"{where}, torch {r['torch']}, commit {commit}, {r['date'][:10]}"


def _cpu(r: dict) -> str:
    """The machine in a few words: its CPU and whether it has AMX."""
    return f"GPU {r['gpu']}" if r.get("gpu") else \
        f"{r['cpu']}, {'AMX' if 'amx_bf16' in r['cpu_flags'] else 'no AMX'}"


def _ci(e: dict) -> str:
    ci = e.get("speedup_ci95")
    return f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""


def _missing(name: str, command: str) -> str:
    return f"Not measured yet: no `bench/results/{name}` is committed. `{command}` writes it."


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
    return "\n".join(rows) + f"\n\n`{c['command']}` on {_machine(c)}."


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
    """`koala run --profile default` from an empty run directory: one table per machine (default_profile.json,
    default_profile-*.json)."""
    names = sorted(f.name for f in RESULTS.glob("default_profile*.json"))
    if not names:
        return "(no results)"
    return "\n\n".join(_default(_load(name)) for name in names)


def _default(r: dict) -> str:
    rows = ["| what | result |", "|---|---|",
            f"| wall time, empty run directory | {r['wall_s'] / 60:.1f} min |"]
    for name, st in sorted(r["stages"].items(), key=lambda kv: kv[0] == "heads"):  # the final stage last
        agree = " / ".join(f"{x:.2f}" for x in st["heldout_greedy_agreement_by_draft"])
        of = f" of {st['steps_asked']}" if st.get("steps_asked", st["steps"]) != st["steps"] else ""
        rows.append(f"| {name}: {st['steps']}{of} steps on `{st['data']}` | held-out agreement by draft {agree} |")
    for name, e in r["evaluations"].items():
        tps = e["tokens_per_s"]
        rows.append(f"| {e['bench']} {e['prompts']}, `{e['drafter']}` ({e['mode']}, {e['dtype']}, {_shape(e)}) | "
                    f"tau {e['tau']:.2f}, speed-up {e['speedup']:.2f}x ({tps['speculative']:.1f} vs "
                    f"{tps['autoregressive']:.1f} tokens/s), lossless {_lossless(e)}, first-draft acceptance "
                    f"{e['acceptance_by_position'][0]:.2f} |")
    return "\n".join(rows) + f"\n\n`{r['command']}` on {_machine(r)}."


def grid_table(name: str, command: str) -> str:
    """A `bench/ablation.py --json` grid: mean ± std over seeds per configuration."""
    r = _load(name)
    if not r:
        return _missing(name, command)

    def cell(m, key):
        v = m.get(key)
        return "–" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    def by_draft(m, key):  # drafts 1 / 2 / 3 where the grid measured them, else the overall value
        per = [f"{key}_pos{p}" for p in (1, 2, 3) if f"{key}_pos{p}" in m]
        return " / ".join(cell(m, k) for k in per) if per else cell(m, key)

    benches = [b.split(":")[0] for b in r["bench"].split(",")]
    head = ["configuration", "seeds", "steps", "train min", "held-out acceptance (by draft)",
            "greedy agreement (by draft)", *[f"{b}: τ, speed-up" for b in benches]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for conf, m in r["summary"].items():
        per = [f"{cell(m, f'tau_{b}')}, {cell(m, f'speedup_{b}')}" for b in benches]
        mins = f"{m['train_s']['mean'] / 60:.1f}" if "train_s" in m else "–"
        rows.append(f"| {conf} | {len(m['seeds'])} | {m['steps']} | {mins} | "
                    f"{by_draft(m, 'heldout_expected_acceptance')} | {by_draft(m, 'heldout_greedy_agreement')} | "
                    + " | ".join(per) + " |")
    return "\n".join(rows) + (f"\n\n`{r['command']}` on {_machine(r)}; gamma {r['gamma']}, greedy, compiled engine, "
                              f"{r['max_new_tokens']} new tokens, every output checked identical to the target's.")


def eagle3_table() -> str:
    return grid_table("eagle3.json", "python bench/ablation.py --grid eagle3 --json bench/results/eagle3.json")


def losses_table() -> str:
    return grid_table("ablation_losses.json", "python bench/ablation.py --grid losses --seeds 0,1,2 "
                      "--json bench/results/ablation_losses.json")


def heads_table() -> str:
    return grid_table("ablation_heads.json", "python bench/ablation.py --grid heads --seeds 0,1,2 "
                      "--json bench/results/ablation_heads.json")


def headline_table() -> str:
    """The figures the README leads with: what the default profile's drafter measured (every benchmark on the first
    machine's run, MT-bench on each other machine's), `make demo` on each machine, koala beside llama.cpp."""
    rows = ["| what | τ | speed-up | lossless | measured with |", "|---|---|---|---|---|"]
    notes = []
    d = _load("default_profile.json")
    if d:
        for e in d["evaluations"].values():
            rows.append(f"| {e['bench']} {e['prompts']}, drafter `{e['drafter']}` ({e['mode']}, {e['dtype']}, "
                        f"{_shape(e)}) on {_cpu(d)} | {e['tau']:.2f} | {e['speedup']:.2f}x{_ci(e)} | {_lossless(e)} | "
                        "`default_profile.json` |")
        notes.append(f"* `default_profile.json`: `{d['command']}` on {_machine(d)}")
    for name in sorted(f.name for f in RESULTS.glob("default_profile-*.json")):  # the other machines' runs
        d = _load(name)
        e = d["evaluations"]["candidate"]
        rows.append(f"| {e['bench']} {e['prompts']}, drafter `{e['drafter']}` ({e['mode']}, {e['dtype']}, "
                    f"{_shape(e)}) on {_cpu(d)} | {e['tau']:.2f} | {e['speedup']:.2f}x{_ci(e)} | {_lossless(e)} | "
                    f"`{name}` |")
        notes.append(f"* `{name}`: `{d['command']}` on {_machine(d)}")
    for name in sorted(f.name for f in RESULTS.glob("demo*.json")):
        m = _load(name)
        f, e = m["run"], m.get("evaluations", {}).get("candidate", {})
        prompts = f" {e['prompts']}" if e.get("prompts") else ""
        rows.append(f"| `make demo` (smoke profile, mtbench{prompts}; {f['engine'].split(', compile ')[0]}) on "
                    f"{_cpu(m)} | {f['tau']:.2f} | {f['speedup']:.2f}x{_ci(f)} | {f['lossless']} | `{name}` |")
        notes.append(f"* `{name}`: `{m['command']}` on {_machine(m)}")
    for name in sorted(f.name for f in RESULTS.glob("llamacpp*.json")):
        lc = _load(name)
        for variant, k in lc["koala"].items():
            weights = LLAMACPP_PAIRS[variant]
            how = f" ({LLAMACPP_LABELS[variant]})" if variant in LLAMACPP_LABELS else ""
            r = lc["ratios"][variant]
            rows.append(f"| koala's engine{how} vs llama.cpp {weights} on {_cpu(lc)}: autoregressive "
                        f"{k['autoregressive_tokens_per_s']:.0f}, speculative {k['speculative_tokens_per_s']:.0f} "
                        f"vs {lc['llama_cpp'][weights]['tokens_per_s']:.0f} tokens/s | {k['tau']:.2f} | "
                        f"{r['koala_ar_over_llamacpp_ar']:.2f}x AR, {r['koala_speculative_over_llamacpp_ar']:.2f}x "
                        f"speculative | {k['lossless']}{_near(k)} | `{name}` |")
        notes.append(f"* `{name}`: `{lc['command']}` on {_machine(lc)}")
    if len(rows) == 2:
        return "(no results)"
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


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


def head_init_table() -> str:
    r = _load("head_init.json")
    if not r:
        return _missing("head_init.json", "python bench/head_init.py --json bench/results/head_init.json")
    rows = ["| EAGLE head's start | held-out greedy agreement, drafts 1 / 2 / 3 (mean ± std) |", "|---|---|"]
    keys = [f"heldout_greedy_agreement_pos{p}" for p in (1, 2, 3)]
    for start, m in r["summary"].items():
        drafts = " / ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in keys if k in m)
        rows.append(f"| {start} | {drafts} |")
    return "\n".join(rows) + (f"\n\n`{r['command']}` on {_machine(r)}: the {r['profile']} profile's recipe, "
                              f"{r['steps']} steps on `{r['data']}`, seeds {', '.join(map(str, r['seeds']))}.")


def unroll_table() -> str:
    return minutes_table("unroll.json", "python bench/unroll.py --json bench/results/unroll.json", "unroll")


def eagle_loss_table() -> str:
    """Every eagle_loss*.json: the settings of an EAGLE head's loss, one table per file."""
    names = sorted(f.name for f in RESULTS.glob("eagle_loss*.json")) or ["eagle_loss.json"]
    return "\n\n".join(minutes_table(name, "python bench/unroll.py --arm NAME=OVERRIDES ... --json "
                                     f"bench/results/{name}", "setting") for name in names)


def minutes_table(name: str, command: str, label: str) -> str:
    """A `bench/unroll.py` comparison: heads trained for the same minutes under each setting (arm)."""
    r = _load(name)
    if not r:
        return _missing(name, command)
    sets = [("heldout", "teacher-forced held-out rows")]
    if r.get("own_data"):
        sets.append(("own", "the target's own answers"))
    rows = [f"| {label} | steps in the budget (mean) | " + " | ".join(
        f"{where}: agreement by draft 1{' (± std)' if len(r['seeds']) > 1 else ''} / 2 / 3, tokens per 3-draft round"
        for _, where in sets) + " |",
        "|---|---|" + "---|" * len(sets)]
    for arm, m in r["summary"].items():
        spread = (lambda k: f" ± {m[k]['std']['pos1']:.3f}") if len(r["seeds"]) > 1 else (lambda k: "")
        cells = [f"{m[k]['pos1']:.3f}{spread(k)} / {m[k]['pos2']:.3f} / {m[k]['pos3']:.3f}, "
                 f"{m[k]['chain3_tokens']:.2f}" for k, _ in sets]
        what = f"{arm}: `{', '.join(m['overrides'])}`" if m.get("overrides") and not arm.isdigit() else arm
        rows.append(f"| {what} | {m['steps']:g} | " + " | ".join(cells) + " |")
    run = r["runs"][0]
    own = f" and on the held-out rows of `{r['own_data']}`" if r.get("own_data") else ""
    return "\n".join(rows) + (f"\n\n`{r['command']}` on {_machine(r)}: the {r['profile']} profile's recipe, "
                              f"{r['minutes']:g} minutes each on `{r['data']}` ({run['train_rows']} training rows), "
                              f"measured three drafts deep on its {run['heldout_rows']} held-out rows{own}; means "
                              f"over seeds {', '.join(map(str, r['seeds']))}.")


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


def demo_table() -> str:
    """`make demo` twice on one fresh clone: the first on an empty cache, the second with everything compiled; one
    table per machine (demo.json, demo-*.json)."""
    names = sorted(f.name for f in RESULTS.glob("demo*.json"))
    if not names:
        return _missing("demo.json", "bench/run_summary.py runs/smoke --log SECOND.log --before FIRST.log")
    return "\n\n".join(_demo(_load(name)) for name in names)


def _demo(r: dict) -> str:
    rows = ["| run | wall time | compile | τ | speed-up (95% CI) | tokens/s spec / AR | lossless | promoted |",
            "|---|---|---|---|---|---|---|---|"]
    for name, f in (("first, empty cache", r.get("first_run")), ("again, same clone", r["run"])):
        if not f:
            continue
        lo, hi = f["speedup_ci95"] or (float("nan"), float("nan"))
        tps = f["tokens_per_s"]
        rows.append(f"| {name} | {f['wall_s'] / 60:.1f} min | {f['compile_s']} s | {f['tau']:.2f} | {f['speedup']:.2f}x "
                    f"({lo:.2f}-{hi:.2f}) | {tps['speculative']:.1f} / {tps['autoregressive']:.1f} | {f['lossless']} | "
                    f"{'yes' if f['promoted'] else 'no'} |")
    return "\n".join(rows) + f"\n\nDraft shape and engine: {r['run']['engine']}. `{r['command']}` on {_machine(r)}."


def _near(k: dict) -> str:
    return f" (+{k['near_ties']} near-ties)" if k.get("near_ties") else ""


# koala's precisions beside the llama.cpp weights they match (bench/llamacpp.py KOALA), and how each is labelled
LLAMACPP_PAIRS = {"float32": "F32", "bf16-weights": "BF16", "bfloat16": "BF16", "int8": "Q8_0"}
LLAMACPP_LABELS = {"bf16-weights": "bf16 weights, float32 compute", "bfloat16": "bfloat16 compute",
                   "int8": "int8 weights"}


def llamacpp_table() -> str:
    """koala's engine beside llama.cpp on the same prompts, threads and weights (bench/llamacpp.py); llama.cpp with
    a koala drafter as its draft model where the run had one. One table per machine (llamacpp.json,
    llamacpp-*.json)."""
    names = sorted(f.name for f in RESULTS.glob("llamacpp*.json"))
    if not names:
        return _missing("llamacpp.json", "python bench/llamacpp.py --json bench/results/llamacpp.json")
    return "\n\n".join(_llamacpp(_load(name)) for name in names)


def _llamacpp(r: dict) -> str:
    rows = ["| weights | llama.cpp tokens/s (decode only) | koala autoregressive (decode only) | koala speculative "
            "(decode only), τ | koala AR / llama.cpp | koala speculative / llama.cpp |", "|---|---|---|---|---|---|"]
    pairs = {w: [v for v, lw in LLAMACPP_PAIRS.items() if lw == w] for w in set(LLAMACPP_PAIRS.values())}
    labels = {v: f"koala: {label}" for v, label in LLAMACPP_LABELS.items()}

    def both(d, key):
        dec = d.get(key.replace("_tokens_per_s", "_decode_tokens_per_s"))
        return f"{d[key]:.1f}" + (f" ({dec:.1f})" if dec is not None else "")

    for name, lc in r["llama_cpp"].items():
        for variant in [v for v in pairs.get(name, []) if v in r["koala"]] or [None]:
            cells = "— | — | — | — |"
            if variant:
                k, ratio = r["koala"][variant], r["ratios"][variant]
                cells = (f"{both(k, 'autoregressive_tokens_per_s')} | {both(k, 'speculative_tokens_per_s')}, "
                         f"{k['tau']:.2f} | {ratio['koala_ar_over_llamacpp_ar']:.2f}x | "
                         f"{ratio['koala_speculative_over_llamacpp_ar']:.2f}x |")
            label = f"{name} ({labels[variant]})" if variant in labels else name
            rows.append(f"| {label} | {lc['tokens_per_s']:.1f} ({lc['decode_tokens_per_s']:.1f}) | {cells}")
    text = "\n".join(rows) + (f"\n\nllama-cpp-python {r['llama_cpp_python']}; koala's drafter `lookup+"
                              f"{r['drafter']}`, draft shape auto; the first {r['prompts']} MT-bench prompts, "
                              f"{r['max_new_tokens']} new tokens, greedy, {r['reps']} repetitions, every one "
                              f"prefilling its prompt. `{r['command']}` on {_machine(r)}.")
    spec = r.get("llama_cpp_speculative") or {}
    if spec:
        text += ("\n\nllama.cpp with koala's independent drafter `" + str(r["gguf_drafter"]) + "` (exported to GGUF) as "
                 "its draft model (`koala.export.llamacpp_draft.GGUFDraftModel`, k tokens drafted per round):\n\n"
                 "| weights, k | tokens/s (decode only) | over llama.cpp alone | greedy tokens identical to its own |\n"
                 "|---|---|---|---|\n" + "\n".join(
                     f"| {name} | {s['tokens_per_s']:.1f} ({s['decode_tokens_per_s']:.1f}) | {s['over_plain']:.2f}x | "
                     f"{s['identical_to_plain']} |" for name, s in spec.items()))
    return text


def wide_builds_table() -> str:
    """The target's wide step by width: autotuned, untuned, and as the engine runs it (bench/wide_builds.py). One
    table per machine and dtype (wide_builds.json, wide_builds-*.json)."""
    names = sorted(f.name for f in RESULTS.glob("wide_builds*.json"))
    if not names:
        return _missing("wide_builds.json", "python bench/wide_builds.py --json bench/results/wide_builds.json")
    return "\n\n".join(_wide_builds(_load(name)) for name in names)


def _wide_builds(r: dict) -> str:
    last = r["passes"][-1]
    widths = list(last["engine"])
    rows = ["| ms by width | " + " | ".join(widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for name in ("autotuned", "untuned", "engine"):
        rows.append(f"| {name} | " + " | ".join(f"{last[name][w]:.1f}" if w in last[name] else "" for w in widths)
                    + " |")
    chosen = r["engine_builds"]
    if isinstance(chosen, dict):
        untuned = [w for w, b in chosen.items() if b == "untuned"]
        chosen = f"the untuned build at widths {', '.join(untuned)}" if untuned else "the autotuned build throughout"
    built = r.get("build_s") or {}
    built = (" Built in " + " and ".join(f"{s:.0f} s {name}" for name, s in built.items()) + ".") if built else ""
    return ("\n".join(rows) + f"\n\nThe engine runs {chosen}.{built} {r['dtype']}, the last of {len(r['passes'])} "
            f"passes; `{r['command']}` on {_machine(r)}.")


def lookup_depth_table() -> str:
    """Prompt lookup's accepted length by the n-gram it matched, from a run's greedy samples (bench/lookup_depth.py)."""
    r = _load("lookup_depth.json")
    if not r:
        return _missing("lookup_depth.json", "python bench/lookup_depth.py runs/smoke/data --json "
                                             "bench/results/lookup_depth.json")
    depths = [d for d in (1, 2, 4, 8, 12) if str(d) in next(iter(r["by_ngram"].values()))["accepted_at_least"]]
    rows = ["| n-gram matched | share of positions | mean accepted of " + str(r["depth"]) + " | "
            + " | ".join(f"P(accepted >= {d})" for d in depths) + " |", "|---" * (3 + len(depths)) + "|"]
    for size, e in r["by_ngram"].items():
        rows.append(f"| {size if size != '0' else 'none'} | {e['share_of_positions']:.1%} | {e['mean_accepted']:.2f} | "
                    + " | ".join(f"{e['accepted_at_least'][str(d)]:.2f}" for d in depths) + " |")
    return ("\n".join(rows) + f"\n\n{r['answers']} greedy answers of the target ({r['positions']} positions) in "
            f"`{r['data']}`; `{r['command']}` on {_machine(r)}.")


def round_cost_table() -> str:
    """A speculative round's time against a plain step, by draft shape (bench/round_cost.py)."""
    r = _load("round_cost.json")
    if not r:
        return _missing("round_cost.json", "python bench/round_cost.py --json bench/results/round_cost.json")
    rows = ["| shape | tau | tokens/s | ms per round: draft / verify / rest / total | round in plain steps | "
            "speed-up |", "|---|---|---|---|---|---|"]
    for name, e in r["shapes"].items():
        ms = e["ms_per_round"]
        shape = f"chain of {name}" if name.isdigit() else f"tree {name}" if "x" in name else name
        split = (f"{ms['draft']:.2f} / {ms['verify']:.2f} / {ms['rest']:.2f} / " if e["tau"] > 1 or ms["draft"]
                 else "- / - / - / ")  # the target alone: a plain step, all of it
        rows.append(f"| {shape} | {e['tau']:.2f} | {e['tokens_per_s']:.1f} | {split}{ms['total']:.2f} | "
                    f"{e['round_over_step']:.2f} | {e['speedup']:.2f}x |")
    return ("\n".join(rows) + f"\n\n`{r['drafter']}` on {r['prompts']} {r['bench']} prompts, {r['max_new_tokens']} new "
            f"tokens, decoding only (the prefill left out), {r['engine']}; `{r['command']}` on {_machine(r)}.")


def one_token_table() -> str:
    """A one-token step through the wide package at width 2 against a one-token package (bench/step_cost.py), in
    each dtype measured."""
    runs = [r for r in (_load("one_token_step.json"), _load("one_token_step_float32.json")) if r]
    if not runs:
        return _missing("one_token_step.json", "python bench/step_cost.py --one-token-package --json "
                                               "bench/results/one_token_step.json")
    rounds = max(r["rounds"] for r in runs)
    rows = ["| engine | one-token step runs | median ms | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |",
            "|---" * (3 + rounds) + "|"]
    for r in runs:
        for name, ms in r["one_token_ms"].items():
            rows.append(f"| {r['engine']} | {name} | {r['median_ms'][name]:.2f} | " + " | ".join(f"{m:.2f}" for m in ms)
                        + " |")
    notes = "; ".join(f"`{r['command']}`: {r['context']} tokens of context in {r['slots']} slots, {r['reps']} steps a "
                      f"round, on {_machine(r)}" for r in runs)
    return "\n".join(rows) + f"\n\nThe default target, the two ways in turns in one process. {notes}."


def step_cost_table() -> str:
    """The compiled step's cost by width (bench/step_cost.py), beside the baseline commit's run on the same machine."""
    runs = [r for f in sorted(RESULTS.glob("step_cost-*.json")) if (r := _load(f.name))]
    if not runs:
        return _missing("step_cost-<machine>.json", "python bench/step_cost.py --dtype float32 --widths "
                        "1,2,4,8,12,16,20,24,32 --baseline OTHER.json --json bench/results/step_cost-<machine>.json")
    widths = sorted({int(w) for r in runs for w in r["ms_by_width"]})
    rows = ["| machine | commit | engine | " + " | ".join(f"width {w}" for w in widths) + " |",
            "|---" * (3 + len(widths)) + "|"]
    for r in runs:
        for run in ([r["baseline"]] if r.get("baseline") else []) + [r]:
            ms = {int(w): v for w, v in run["ms_by_width"].items()}
            cpu = f"{r['cpu']} ({', '.join(r['cpu_flags']) or 'no matrix-unit flags'}), {r['threads']} threads"
            rows.append(f"| {cpu} | {run['commit'][:7]} | {run['engine']} | "
                        + " | ".join(f"{ms[w]:.1f}" if w in ms else "-" for w in widths) + " |")
    notes = "; ".join(f"`{r['command']}`, {r['context']} tokens of context in {r['slots']} slots, {r['reps']} steps "
                      f"per width" + (f", after `{r['baseline']['command']}` at {r['baseline']['commit'][:7]}"
                                      if r.get("baseline") else "") for r in runs)
    return "\n".join(rows) + f"\n\nms per step of the default target. {notes}."


def _variants(r: dict) -> str:
    """A table of decoding variants timed in one process (bench/interleave.py)."""
    rows = ["| decoding | ms per token | tokens per target forward | speed-up |", "|---|---|---|---|"]
    for name, e in r["variants"].items():
        rows.append(f"| {name} | {e['ms_per_token']:.2f} | {e['tokens_per_forward']:.3f} | {e['speedup']:.3f}x |")
    return "\n".join(rows)


def threshold_table() -> str:
    """Chains at each confidence threshold, the first draft always proposed or thresholded like the others
    (bench/threshold.py)."""
    r = _load("threshold.json")
    if not r:
        return _missing("threshold.json", "python bench/threshold.py --drafter heads:runs/smoke/drafter/heads/heads "
                                          "--json bench/results/threshold.json")
    return (_variants(r) + f"\n\n`{r['drafter']}`, {r['prompts']} prompts ({r['bench']}) x {r['reps']}, "
            f"{r['max_new_tokens']} new tokens, greedy, {r['dtype']}, {r['mode']} engine; decoding only (the prefill "
            f"left out), every variant in turn on each prompt; `{r['command']}` on {_machine(r)}.")


def lookup_len_table() -> str:
    """Prompt lookup in front of a drafter: matches of any size or of two tokens or more, each filling the drafter's
    shape or drafting a length of its own (bench/lookup_len.py)."""
    r = _load("lookup_len.json")
    if not r:
        return _missing("lookup_len.json", "python bench/lookup_len.py --drafter heads:runs/default/drafter/heads/heads "
                                           "--json bench/results/lookup_len.json")
    return (_variants(r) + f"\n\n`lookup+{r['drafter']}`, the drafter's shape `{r['shape']}`, {r['prompts']} prompts "
            f"({r['bench']}) x {r['reps']}, {r['max_new_tokens']} new tokens, greedy, {r['dtype']}, {r['mode']} engine; "
            f"decoding only (the prefill left out), every variant in turn on each prompt; `{r['command']}` on "
            f"{_machine(r)}.")


TABLES = {"headline": headline_table, "demo": demo_table, "llamacpp": llamacpp_table, "trees": trees_table,
          "default": default_table, "dtype": dtype_table,
          "fidelity": fidelity_table, "curve": curve_table, "load": load_table, "eagle3": eagle3_table,
          "eagle3-data": eagle3_data_table, "head-init": head_init_table, "unroll": unroll_table,
          "eagle-loss": eagle_loss_table,
          "ablation-losses": losses_table, "ablation-heads": heads_table,
          "wide-builds": wide_builds_table, "lookup-depth": lookup_depth_table,
          "round-cost": round_cost_table, "one-token": one_token_table, "step-cost": step_cost_table,
          "threshold": threshold_table,
          "lookup-len": lookup_len_table}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 3.6))


def _png(plt, fig, ax, title: str) -> bytes:
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def draw_dtype_curve(ax, curves: dict) -> None:
    """Held-out agreement of each draft against training minutes, one line style per compute dtype."""
    for (dtype, pts), style in zip(curves.items(), ("--", "-")):
        for p in range(len(pts[0]["agreement"]) if pts else 0):
            ax.plot([x["train_s"] / 60 for x in pts], [x["agreement"][p] for x in pts], style, marker="o",
                    markersize=3, label=f"{dtype}, draft {p + 1}")
    ax.set_xlabel("training wall time (minutes)")
    ax.set_ylabel("held-out greedy agreement")
    ax.legend(fontsize=7)


def plot_dtype_curve() -> bytes | None:
    """Held-out agreement by draft against training wall time, float32 and bf16 (dtype_curve.json)."""
    r = _load("dtype_curve.json")
    if not r:
        return None
    plt, fig, ax = _figure()
    draw_dtype_curve(ax, r["curves"])
    return _png(plt, fig, ax, f"{r['kind']} head, {_machine(r)}")


def plot_acceptance() -> bytes | None:
    """Acceptance by draft position of each of the default profile's evaluations (default_profile.json)."""
    r = _load("default_profile.json")
    if not r:
        return None
    plt, fig, ax = _figure()
    for name, e in r["evaluations"].items():
        acc = e["acceptance_by_position"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{e['bench']} {e['prompts']}, {e['drafter']}")
    ax.set_xlabel("draft position")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("acceptance (given the earlier drafts accepted)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _png(plt, fig, ax, f"{r['command']}, {_machine(r)}")


def plot_trees() -> bytes | None:
    """Tokens/s of autoregressive decoding, the best chain and the best tree, per dtype and mode (decode.json)."""
    r = _load("decode.json")
    if not r:
        return None
    plt, fig, ax = _figure()
    labels, groups = [], {"autoregressive": [], "best chain": [], "best tree": []}
    for dtype, by in r["by_dtype"].items():
        for mode, m in by.items():
            if isinstance(m, dict) and "tree" in m:
                labels.append(f"{dtype}, {mode}")
                groups["autoregressive"].append(m["tokens_per_s"]["autoregressive"])
                groups["best chain"].append(m["chain"]["tokens_per_s"])
                groups["best tree"].append(m["tree"]["tokens_per_s"])
    width = 0.8 / len(groups)
    for i, (name, ys) in enumerate(groups.items()):
        ax.bar([x + i * width for x in range(len(labels))], ys, width, label=name)
    ax.set_xticks([x + width for x in range(len(labels))], labels)
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)
    return _png(plt, fig, ax, f"drafter {r['drafter']}, {r['prompts']} MT-bench prompts, {_machine(r)}")


PLOTS = {"dtype_curve.png": plot_dtype_curve, "acceptance.png": plot_acceptance, "trees.png": plot_trees}


def fill(text: str, where: str = "text") -> str:
    """`text` with every `<!-- bench:NAME -->` block holding NAME's table as the results now give it."""
    def one(m):
        if m.group(2) not in TABLES:
            raise ValueError(f"{where}: unknown results block bench:{m.group(2)}: use one of {', '.join(TABLES)}")
        return m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(3)
    return BLOCK.sub(one, text)


def orphans() -> list[str]:
    """Results files that nothing rendered since READ was last cleared."""
    return sorted(f.name for f in RESULTS.glob("*.json") if f.name not in READ)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="rewrite the README's marked blocks")
    a = ap.parse_args()
    for name, fn in TABLES.items():
        print(f"<!-- bench:{name} -->\n{fn()}\n<!-- /bench:{name} -->\n")
    if a.write:
        readme = ROOT / "README.md"
        readme.write_text(fill(readme.read_text(), "README.md"))


if __name__ == "__main__":
    main()
