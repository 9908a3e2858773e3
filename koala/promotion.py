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
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from koala.io import file_lock

if TYPE_CHECKING:
    from koala.report import EvalReport
    from koala.tracking import Registry

LEVEL = 0.95
SAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class Promotion:
    """What happened to a registered candidate: promoted or not, why, and the champion it was measured against."""

    promoted: bool
    reason: str
    champion_speedup: float | None = None
    previous_champion: str | None = None


def _rows(report: "EvalReport") -> dict[str, tuple[float, float]]:
    """{prompt id: (speculative tokens/s, autoregressive tokens/s)} from a report's per-prompt rows."""
    return {r.id: (r.tokens_per_s, r.ar_tokens_per_s) for r in report.per_prompt}


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def speedup_interval(report: "EvalReport", samples: int = SAMPLES, seed: int = SEED) -> tuple[float, float] | None:
    """The 95% interval of mean speculative / mean autoregressive tokens/s (the report's speed-up), prompts
    resampled in pairs; None without per-prompt timings (or with a single prompt)."""
    rows = list(_rows(report).values())
    if len(rows) < 2:
        return None
    x = np.array(rows)  # (n, 2)
    idx = np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))
    return _bounds(x[idx, 0].mean(1) / x[idx, 1].mean(1))


def relative_interval(candidate: "EvalReport", champion: "EvalReport", samples: int = SAMPLES,
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


def decide(candidate: "EvalReport", champion: "EvalReport | None", champion_version: str | None = None) -> Decision:
    """Compare two evaluation reports (see koala.evaluate) measured in the same run."""
    ll = candidate.lossless
    if not ll.checked:
        return Decision(False, "not evaluated greedily: losslessness was not checked token by token")
    if not ll.holds:
        return Decision(False, f"not lossless: {ll.text} prompts identical to the target")
    s = candidate.speedup
    if champion is None:
        iv = speedup_interval(candidate)
        if iv is None:
            return Decision(False, f"speed-up {s:.3f}x measured on fewer than two prompts: no interval to tell it "
                                   "from noise (evaluate more prompts)")
        if iv[0] > 1.0:
            ties = f", {len(ll.near_ties)} at a near-tie of rounding" if ll.near_ties else ""
            return Decision(True, f"first champion: speed-up {s:.3f}x ({_ci(iv)}) over the target alone, lossless "
                                  f"{ll.total}/{ll.total}{ties}")
        return Decision(False, f"speed-up {s:.3f}x ({_ci(iv)}) is not clearly faster than the target alone: the "
                               "interval's lower bound must exceed 1.0")
    c = champion.speedup
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


def promote(registry: "Registry", name: str, version: str, report: "EvalReport", lock_path: str | Path,
            remeasure: Callable[[str, str], "EvalReport"], fault: Callable[[str], None] = lambda _: None) -> Promotion:
    """Read the champion, re-measure it (`remeasure(drafter_dir, champion_version)`), decide, and move the alias,
    all under an exclusive lock on `lock_path`: two runs promoting at once leave one champion, the better one.

    The decision is tagged on the candidate before the alias moves, so a registry error in between leaves the
    champion as it was and the reason recorded.
    """
    from koala.tracking import drafter_path

    with file_lock(lock_path):
        champ = registry.champion(name)
        if champ is not None and str(champ.version) == str(version):  # a rerun handed back the champion itself
            return Promotion(True, "already champion (the same weights were registered and promoted before)",
                             previous_champion=str(version))
        champ_report = None
        if champ is not None:
            path = champ.tags.get("drafter_dir")
            if not path or not Path(path).exists():
                path = str(drafter_path(f"models:/{name}@champion", registry.uri))
            champ_report = remeasure(path, str(champ.version))
        d = decide(report, champ_report, None if champ is None else str(champ.version))
        registry.record_decision(name, version, None, d.reason)
        fault("registry.promote")
        if d.promote:  # a registry error before this leaves the champion as it was
            registry.make_champion(name, version)
        registry.tag(name, version, {"promoted": str(d.promote).lower()})
    return Promotion(d.promote, d.reason, None if champ_report is None else champ_report.speedup,
                     None if champ is None else str(champ.version))
