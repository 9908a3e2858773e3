"""The typed results that cross from one stage to the next: an evaluation's report and a trained drafter.

`koala.evaluate.evaluate` returns an `EvalReport`; `report.json` holds its JSON form, and a report.json written by an
earlier koala loads into it (`EvalReport.load`: keys it no longer has are ignored, ones it lacks take their defaults).
The training tasks return a `TrainedDrafter`. Tasks, flows, the CLI, the registry and the docs read both by attribute.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a report.json of another version loads: unknown keys are dropped


class Difference(_Record):
    """Where a speculative greedy output first differs from the target's own (koala.evaluate.first_difference)."""

    id: str = Field("", description="the prompt (in a report's lists of differences)")
    index: int = Field(description="the first new token that differs")
    ar_token: int | None = None
    spec_token: int | None = None
    margin: float | None = Field(None, description="the target's logit margin between the two tokens there")
    tolerance: float | None = Field(None, description="the largest margin that rounding may flip in this mode")
    near_tie: bool = Field(False, description="rounding, not a bug: margin within tolerance, or the target's own "
                           "kernels disagree there")
    kernel_margins: list[float] = Field([], description="the margin under the target's steps of 1, 2, 4, 8 tokens")
    reason: str | None = None


class Lossless(_Record):
    """Greedy outputs identical to the target's own, prompt by prompt (sampling: exact by construction)."""

    identical: int
    total: int
    checked: bool = Field(True, description="False when sampling: not comparable token by token")
    near_ties: list[Difference] = []
    differences: list[Difference] = []

    @property
    def text(self) -> str:
        return f"{self.identical}/{self.total}"

    @property
    def summary(self) -> str:
        """`text`, and how many more prompts differ only at a near-tie of rounding."""
        return self.text + (f" (+{len(self.near_ties)} at near-ties of rounding)" if self.near_ties else "")

    @property
    def holds(self) -> bool:
        """Checked, and every prompt identical or differing only at a near-tie of rounding."""
        return self.checked and self.identical + len(self.near_ties) == self.total


class TokensPerS(_Record):
    speculative: float = 0.0
    autoregressive: float = 0.0
    hf_generate: float | None = None
    hf_assisted: float | None = None


class CategoryStats(_Record):
    prompts: int
    tau: float
    speedup: float
    tokens_per_s: float = 0.0


class PromptRow(_Record):
    """One prompt, speculative and autoregressive; the promotion rule pairs `tokens_per_s` with `ar_tokens_per_s`."""

    id: str
    tokens_per_s: float
    ar_tokens_per_s: float
    category: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    target_forwards: int = 0
    tau: float = 0.0
    ar_new_tokens: int = 0
    ar_wall_s: float = 0.0
    prefill_s: float = 0.0  # of wall_s, the prompt's forward up to the first new token
    ar_prefill_s: float = 0.0
    identical: bool | None = None
    first_difference: Difference | None = None
    accept_counts: list[int] = []
    hf_generate: float | None = None
    hf_assisted: float | None = None


class EvalReport(_Record):
    """What `koala eval` and the pipeline's evaluation measure (docs/guides/evaluate.md explains each figure)."""

    drafter: str
    tau: float = Field(description="new tokens per target forward")
    speedup: float = Field(description="Spec-Bench: mean speculative tokens/s over mean autoregressive tokens/s")
    lossless: Lossless
    target: str = ""
    target_hash: str = ""
    device: str = ""
    dtype: str = ""
    weights: str = Field("full", description="the target's linear layers: full, bf16 (rounded) or int8 weight-only")
    gemm: str = Field("torch", description="the GEMM the compiled steps of the target run: koala (koala's decode GEMM "
                      "on a CPU with AVX-512) or torch")
    mode: str = Field("eager", description="eager or compile")
    bench: str = ""
    prompts: int = 0
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    gamma: int = Field(1, description="drafts per round (a tree's depth)")
    tree: str | None = Field(None, description="the draft tree, depth x top-k x nodes; None: a chain")
    threshold: float | None = None
    tokens_per_s: TokensPerS = TokensPerS()
    speedup_ci95: tuple[float, float] | None = Field(None, description="paired bootstrap over prompts")
    memory_bound_speedup: float = 0.0
    drafter_parameter_ratio: float = 0.0
    latency_model_speedup: float = 0.0
    drafter_cost_ratio: float = 0.0
    target_step_ms: float = 0.0
    drafter_step_ms: float = 0.0
    mean_draft_length: float = 0.0
    acceptance_by_position: list[float] = []
    accept_counts: list[int] = []
    accepted_path_histogram: list[int] = []
    per_category: dict[str, CategoryStats] = {}
    per_prompt: list[PromptRow] = []
    # How the draft shape was chosen: koala.engine.calibrate's record (cost by width, expected rates of each shape),
    # rendered as it is; its keys are that module's, documented there.
    gamma_choice: dict = {}
    compile_s: float = Field(0.0, description="compilation during this evaluation (never timed)")
    setup_s: float = Field(0.0, description="warm-up, compilation and calibration (never timed)")
    run_id: str | None = Field(None, description="the MLflow run that logged it")

    @property
    def draft_shape(self) -> str:
        """The drafter's shape, and a prompt-lookup match's own length where `auto` chose one."""
        shape = f"tree {self.tree}" if self.tree else f"gamma {self.gamma}"
        n = self.gamma_choice.get("lookup_len")
        return f"{shape}, lookup {n}" if n else shape

    @property
    def auto(self) -> bool:
        """Whether the draft shape was chosen by measurement (gamma: auto)."""
        return bool(self.gamma_choice.get("auto"))

    def save(self, path: str | Path) -> None:
        """Write the JSON form, whole or not at all."""
        from koala.io import write_json_atomic

        write_json_atomic(Path(path), self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        return cls.model_validate(json.loads(Path(path).read_text()))


class TrainedDrafter(_Record):
    """What a training stage hands on: the drafter as `koala eval --drafter` takes it, its directory, its metrics."""

    spec: str = Field(description="drafter spec: a directory, or heads:DIR for draft heads")
    dir: str = Field(description="the drafter's directory (weights, koala.json or heads.json)")
    run_id: str | None = Field(None, description="the MLflow run that logged its training")
    metrics: dict[str, float] = Field({}, description="the last logged metrics (held-out agreement by draft, ...)")

    def heldout(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith("heldout")}


class StageSummary(_Record):
    """One training stage of a pipeline run, with what its drafter scored on the held-out prompts."""

    data: str
    steps: int
    drafter: str
    compute_dtype: str | None = None
    heldout: dict[str, float] = {}

    def agreement_by_draft(self) -> list[float]:
        """Held-out greedy agreement with the target at draft positions 1, 2, ... (or the overall figure)."""
        by = [self.heldout[k] for k in sorted(self.heldout) if k.startswith("heldout_greedy_agreement_pos")]
        return by or [v for k, v in self.heldout.items() if k == "heldout_greedy_agreement"]


class Headline(_Record):
    """An evaluation in one line of a summary: where, how fast, how lossless."""

    bench: str
    prompts: int
    lookup: bool
    tau: float
    speedup: float
    lossless: str


class RunSummary(_Record):
    """What `koala run` (the pipeline flow) returns and prints: the data, the drafter, its evaluation, its fate."""

    data: str
    drafter: str
    tau: float
    speedup: float
    speedup_ci95: tuple[float, float] | None = None
    tokens_per_s: TokensPerS
    lossless: str
    engine: str = Field(description="engine mode, draft shape, compile time, device")
    stages: list[StageSummary] = []
    more: dict[str, Headline] = Field({}, description="eval.alone and eval.also, by name")
    model: str
    version: str
    promoted: bool
    reason: str
    mlflow_uri: str
    mlflow_run_id: str
    experiment: str

    @classmethod
    def of(cls, report: EvalReport, prebuilt_s: float = 0.0, **fields) -> "RunSummary":
        """The candidate's report as the summary shows it, with the run's other fields; `prebuilt_s`: seconds spent
        compiling the evaluation's target before the training (counted in the compile time shown)."""
        before = f", {prebuilt_s:.0f} s of it before the training" if prebuilt_s >= 0.5 else ""
        engine = (f"{report.mode}, {report.draft_shape}{' (auto)' if report.auto else ''}, "
                  f"compile {report.compile_s + prebuilt_s:.0f} s (not timed{before}), {report.device}")
        return cls(tau=report.tau, speedup=report.speedup, speedup_ci95=report.speedup_ci95,
                   tokens_per_s=report.tokens_per_s, lossless=report.lossless.summary, engine=engine, **fields)
