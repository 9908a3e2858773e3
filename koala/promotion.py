"""The promotion rule, as plain logic: which candidate deserves the alias `champion`.

A candidate is promoted only if its evaluation was lossless on every prompt (identical to the target's own output
in the same engine mode; a compiled engine may differ only at a near-tie of its rounding, reported with the logit
margin, see koala.evaluate.first_difference) and its speed-up beats the current
champion's, with the champion re-measured in the same run on the same machine and settings; the first candidate on
an empty registry must beat the target alone (speed-up > 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


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
        if s > 1.0:
            return Decision(True, f"first champion: speed-up {s:.3f}x over the target alone, lossless {ll['total']}/"
                                  f"{ll['total']}")
        return Decision(False, f"speed-up {s:.3f}x is not faster than the target alone")
    c = champion["speedup"]
    if s > c:
        return Decision(True, f"speed-up {s:.3f}x beats champion v{champion_version}'s {c:.3f}x (re-measured in this "
                              "run)")
    return Decision(False, f"speed-up {s:.3f}x does not beat champion v{champion_version}'s {c:.3f}x (re-measured in "
                           "this run)")
