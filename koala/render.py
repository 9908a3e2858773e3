"""An evaluation report rendered for people: report.md, the one-line summary, and the files `write_report` writes."""

from __future__ import annotations

from pathlib import Path

from koala.report import Difference, EvalReport


def write_report(report: EvalReport, out: Path) -> None:
    """report.json, report.md and the PNG plots; each file written whole or not at all."""
    from koala.io import atomic_path
    from koala.plots import evaluation_plots

    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "report.json")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    evaluation_plots(report, out)


def markdown(r: EvalReport) -> str:
    tps, ll = r.tokens_per_s, r.lossless
    lines = [
        f"# koala eval: {r.drafter} on {r.target}",
        "",
        f"{r.bench}, {r.prompts} prompts, {r.draft_shape}{' (auto)' if r.auto else ''}, temperature {r.temperature}, "
        f"{r.dtype}{f', {r.weights} weights' if r.weights != 'full' else ''} on {r.device}, {r.mode} engine "
        f"(compile {r.compile_s:.0f} s, not part of any timing)",
        "",
        "| metric | value |", "|---|---|",
        f"| τ (tokens per target forward) | {r.tau:.2f} |",
        f"| speed-up (Spec-Bench) | {r.speedup:.2f}x{_ci(r)} |",
        f"| memory-bound speed-up τ/(γ̄c+1) | {r.memory_bound_speedup:.2f}x (c = {r.drafter_parameter_ratio:.3f}, "
        f"parameters; γ̄ = {r.mean_draft_length:.2f}, the mean draft length used) |",
        f"| latency-model speed-up | {r.latency_model_speedup:.2f}x (c = {r.drafter_cost_ratio:.3f}, measured "
        "time of a draft over a target step) |",
        f"| tokens/s speculative | {tps.speculative:.1f} |",
        f"| tokens/s autoregressive | {tps.autoregressive:.1f} |",
    ]
    if tps.hf_generate:
        lines.append(f"| tokens/s HF generate | {tps.hf_generate:.1f} |")
    if tps.hf_assisted:
        lines.append(f"| tokens/s HF assisted generate | {tps.hf_assisted:.1f} |")
    lines.append(f"| lossless (identical to target) | {ll.text} |" if ll.checked
                 else "| lossless | sampling: exact by construction, not checked token by token |")
    for d in ll.near_ties + ll.differences:
        lines.append(f"| differs: {d.id} | at token {d.index}, logit margin {d.margin} ({_tie(d)}) |")
    lines += ["", "| draft position | " + " | ".join(str(i + 1) for i in range(r.gamma)) + " |",
              "|---|" + "---|" * r.gamma,
              "| acceptance | " + " | ".join(f"{a:.2f}" for a in r.acceptance_by_position) + " |",
              "", "| category | prompts | τ | speed-up |", "|---|---|---|---|"]
    for cat, c in r.per_category.items():
        lines.append(f"| {cat} | {c.prompts} | {c.tau:.2f} | {c.speedup:.2f}x |")
    lines += _choice_lines(r)
    hist = r.accepted_path_histogram
    if hist:
        lines += ["", "| drafts accepted in a round | " + " | ".join(str(i) for i in range(len(hist))) + " |",
                  "|---|" + "---|" * len(hist), "| rounds | " + " | ".join(str(h) for h in hist) + " |"]
    return "\n".join(lines) + "\n"


def _choice_lines(r: EvalReport) -> list[str]:
    """How auto chose the draft shape: the target's cost by width and each shape's expected rate."""
    ch = r.gamma_choice
    if not r.auto:
        return []
    widths = sorted(ch["cost_by_width_ms"], key=int)
    lines = ["", f"auto chose {r.draft_shape}: expected {ch['expected_speedup']:.2f}x, measured {r.speedup:.2f}x", "",
             "| forward width (tokens) | " + " | ".join(str(w) for w in widths) + " |",
             "|---|" + "---|" * len(widths),
             "| target forward (ms) | " + " | ".join(f"{ch['cost_by_width_ms'][w]:.1f}" for w in widths) + " |"]
    if "shapes" in ch:
        lines += ["", "| draft shape (depth x top-k) | expected tokens per round | ms per round "
                      "| expected tokens/s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['tokens']:.2f} | {v['ms']:.1f} | {v['rate']:.1f} |" for k, v in ch["shapes"].items()]
        expected = ch.get("expected_tokens_per_round", ch["shapes"][ch["shape"]]["tokens"])
        lines += ["", f"measured tokens per round {ch.get('measured_tokens_per_round', 0):.2f} against "
                      f"{expected:.2f} expected"]
    lk = ch.get("lookup")
    if lk:
        lines += ["", f"prompt-lookup matches draft {lk['chosen']} tokens: " + (
            "no match in the probes, the probe's depth" if lk.get("fallback") else
            f"from the probes' {lk['rounds']} lookup rounds (tokens/s of those rounds by length: " + ", ".join(
                f"{n} {v['rate']:.1f}" for n, v in lk["lengths"].items()) + ")")]
    return lines


def _ci(r: EvalReport) -> str:
    iv = r.speedup_ci95
    return "" if not iv else f" (95% CI {iv[0]:.2f}-{iv[1]:.2f}x, paired bootstrap over prompts)"


def _tie(d: Difference) -> str:
    if not d.near_tie:
        return "a bug"
    if d.margin is not None and d.tolerance is not None and d.margin > d.tolerance:
        return ("near-tie of rounding: the target's own steps of 1, 2, 4, 8 tokens disagree there (margins "
                + ", ".join(f"{m:+.3f}" for m in d.kernel_margins) + ")")
    return f"near-tie of rounding, within {d.tolerance or 0:.3g}"


def summary_line(r: EvalReport) -> str:
    ll = r.lossless
    loss = f"lossless {ll.text}" if ll.checked else "sampling (exact by construction)"
    if ll.near_ties:
        loss += f" (+{len(ll.near_ties)} differing only at a near-tie of {r.mode} {r.dtype} rounding)"
    return (f"{r.drafter}: tau {r.tau:.2f}, speed-up {r.speedup:.2f}x{_ci(r)} "
            f"({r.tokens_per_s.speculative:.1f} vs {r.tokens_per_s.autoregressive:.1f} tokens/s, "
            f"{r.mode}{f', {r.weights} weights' if r.weights != 'full' else ''}, {r.draft_shape}), {loss}")
