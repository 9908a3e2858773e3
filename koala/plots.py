"""Plots people would rather see than read: training curves (evaluation plots live in evaluate.py)."""

from __future__ import annotations

from pathlib import Path

from koala.io import atomic_path


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
