"""Plots people would rather see than read: training curves, and an evaluation's acceptance, draft shape and speed-up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from koala.io import atomic_path

if TYPE_CHECKING:
    from koala.report import EvalReport


def training_curves(history: list[tuple[int, dict]], out: str | Path, title: str = "") -> Path:
    """Loss per step, and held-out expected acceptance where measured, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([s for s, _ in history], [m["loss"] for _, m in history], color="#3a6ea5")
    a.set(xlabel="step", ylabel="loss", title=title or "training loss")
    ev = [(s, m) for s, m in history if "heldout_expected_acceptance" in m]
    if ev:
        b.plot([s for s, _ in ev], [m["heldout_expected_acceptance"] for _, m in ev], "o-", label="expected acceptance")
        b.plot([s for s, _ in ev], [m["heldout_greedy_agreement"] for _, m in ev], "s--", label="greedy agreement")
        b.legend()
    b.set(xlabel="step", ylabel="held-out", ylim=(0, 1), title="drafter vs target (held out)")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def evaluation_plots(r: "EvalReport", out: Path) -> None:
    """acceptance_by_position.png, accepted_path.png, gamma_choice.png (auto only), speedup_by_category.png."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pos = list(range(1, r.gamma + 1))
    ax.bar(pos, r.acceptance_by_position, color="#4c8c4a")
    ax.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1), xticks=pos,
           title=f"{r.drafter}: τ = {r.tau:.2f}")
    fig.tight_layout()
    _save(fig, out / "acceptance_by_position.png")
    _accepted_paths(r, out)
    if r.auto:
        _draft_shape_choice(r, out)
    cats = list(r.per_category)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(cats, [r.per_category[c].speedup for c in cats], color="#3a6ea5")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set(ylabel="speed-up vs autoregressive", title=f"{r.drafter}: {r.speedup:.2f}x overall")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, out / "speedup_by_category.png")


def _draft_shape_choice(r: "EvalReport", out: Path) -> None:
    """gamma_choice.png: the target's forward cost by width, and the expected rate of each draft shape."""
    ch = r.gamma_choice
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(8, 3.2))
    widths = sorted(ch["cost_by_width_ms"], key=int)
    a1.plot([int(w) for w in widths], [ch["cost_by_width_ms"][w] for w in widths], "o-", color="#3a6ea5")
    a1.set(xlabel="tokens in one target forward", ylabel="ms", ylim=(0, None), title="target forward cost")
    if "shapes" in ch:  # chains and trees: the best few shapes by expected rate, plain decoding first
        top = sorted((k for k in ch["shapes"] if k != "0x0"), key=lambda k: -ch["shapes"][k]["rate"])[:8]
        names = ["0x0"] + top
        a2.bar(names, [ch["shapes"][k]["rate"] for k in names],
               color=["grey"] + ["#4c8c4a" if k == ch["shape"] else "#9cc59a" for k in top])
        a2.tick_params(axis="x", rotation=45)
        a2.set(xlabel="depth x top-k (0x0 = no drafting)", ylabel="expected tokens/s", title=f"auto: {r.draft_shape}")
    else:
        rates = {int(g): v for g, v in ch["expected_tokens_per_s"].items()}
        a2.bar(list(rates), list(rates.values()), color=["grey"] + ["#4c8c4a"] * (len(rates) - 1))
        a2.set(xlabel="gamma (0 = no drafting)", ylabel="expected tokens/s", title=f"gamma auto: {ch['chosen']}")
    fig.tight_layout()
    _save(fig, out / "gamma_choice.png")


def _accepted_paths(r: "EvalReport", out: Path) -> None:
    """accepted_path.png: how many drafts each round accepted (a chain's or a tree's path length)."""
    hist = r.accepted_path_histogram
    if not hist:
        return
    fig, ax = _pyplot().subplots(figsize=(5, 3.2))
    ax.bar(range(len(hist)), hist, color="#4c8c4a")
    ax.set(xlabel="drafts accepted in a round", ylabel="rounds", xticks=list(range(len(hist))),
           title=f"{r.draft_shape}: {r.tau:.2f} tokens per target forward")
    fig.tight_layout()
    _save(fig, out / "accepted_path.png")
