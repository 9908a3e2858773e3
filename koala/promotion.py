"""The promotion rule, as plain logic: which candidate deserves the alias `champion`.

A candidate is promoted only if its evaluation was lossless on every prompt (identical to the target's own output
in the same engine mode; a compiled engine may differ only at a near-tie of its rounding, reported with the logit
margin, see koala.evaluate.first_difference) and it is faster beyond the measurement's noise:

* the first candidate on an empty registry needs the lower bound of its speed-up's 95% confidence interval above 1.0
  (clearly faster than the target alone);
* a challenger needs the lower bound of the interval of (its speed-up / the champion's), with the champion
  re-measured in the same run on the same prompts, machine and settings, above 1.0.

The intervals are paired percentile bootstraps over prompts (`speedup_interval`, `relative_interval`). Prompts are the
unit that varies (length, content, how well the drafter fits them), and a prompt's autoregressive and speculative
timings (and the champion's) share its length and the machine's state when it ran, so resampling whole prompts keeps
that pairing; a percentile bootstrap assumes no normality of a ratio of means over a few dozen prompts. Seeded, so
the same report always gets the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
SAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _rows(report: dict) -> dict[str, tuple[float, float]]:
    """{prompt id: (speculative tokens/s, autoregressive tokens/s)} from a report's per-prompt rows."""
    return {str(r["id"]): (float(r["tokens_per_s"]), float(r["ar_tokens_per_s"])) for r in report.get("per_prompt", [])}


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def speedup_interval(report: dict, samples: int = SAMPLES, seed: int = SEED) -> tuple[float, float] | None:
    """The 95% interval of mean speculative / mean autoregressive tokens/s (the report's speed-up), prompts
    resampled in pairs; None without per-prompt timings (or with a single prompt)."""
    rows = list(_rows(report).values())
    if len(rows) < 2:
        return None
    x = np.array(rows)  # (n, 2)
    idx = np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))
    return _bounds(x[idx, 0].mean(1) / x[idx, 1].mean(1))


def relative_interval(candidate: dict, champion: dict, samples: int = SAMPLES,
                      seed: int = SEED) -> tuple[float, float] | None:
    """The 95% interval of (candidate's speed-up / champion's), over the prompts both measured, each resample taking
    the same prompts for both; None when they share fewer than two prompts."""
    a, b = _rows(candidate), _rows(champion)
    ids = [i for i in a if i in b]
    if len(ids) < 2:
        return None
    x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    idx = np.random.default_rng(seed).integers(0, len(ids), (samples, len(ids)))
    ratio = (x[idx, 0].mean(1) / x[idx, 1].mean(1)) / (y[idx, 0].mean(1) / y[idx, 1].mean(1))
    return _bounds(ratio)


def _ci(iv: tuple[float, float]) -> str:
    return f"95% CI {iv[0]:.3f}-{iv[1]:.3f}x"


def decide(candidate: dict, champion: dict | None, champion_version: str | None = None) -> Decision:
    """Compare two evaluation reports (see koala.evaluate) measured in the same run."""
    ll = candidate["lossless"]
    if not ll.get("checked"):
        return Decision(False, "not evaluated greedily: losslessness was not checked token by token")
    ties = len(ll.get("near_ties", []))
    if ll["identical"] + ties != ll["total"]:
        return Decision(False, f"not lossless: {ll['identical']}/{ll['total']} prompts identical to the target")
    s = candidate["speedup"]
    if champion is None:
        iv = speedup_interval(candidate)
        if iv is None:
            return Decision(False, f"speed-up {s:.3f}x measured on fewer than two prompts: no interval to tell it "
                                   "from noise (evaluate more prompts)")
        if iv[0] > 1.0:
            return Decision(True, f"first champion: speed-up {s:.3f}x ({_ci(iv)}) over the target alone, lossless "
                                  f"{ll['total']}/{ll['total']}")
        return Decision(False, f"speed-up {s:.3f}x ({_ci(iv)}) is not clearly faster than the target alone: the "
                               "interval's lower bound must exceed 1.0")
    c = champion["speedup"]
    iv = relative_interval(candidate, champion)
    if iv is None:
        return Decision(False, f"speed-up {s:.3f}x against champion v{champion_version}'s {c:.3f}x: fewer than two "
                               "prompts measured for both, no interval to tell them apart")
    if iv[0] > 1.0:
        return Decision(True, f"speed-up {s:.3f}x beats champion v{champion_version}'s {c:.3f}x (re-measured in this "
                              f"run): {s / c:.3f} times it, {_ci(iv)}")
    return Decision(False, f"speed-up {s:.3f}x does not clearly beat champion v{champion_version}'s {c:.3f}x "
                           f"(re-measured in this run): {s / c:.3f} times it, {_ci(iv)}, whose lower bound must "
                           "exceed 1.0")
