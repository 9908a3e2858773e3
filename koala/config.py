"""One pydantic model for the whole pipeline, loaded from a YAML profile (package data in koala/profiles/) plus
`a.b=value` overrides.

Unknown keys and wrong types are errors that name the field (`extra="forbid"` everywhere); settings that contradict
each other across sections (gamma against the Medusa heads) are errors too. The command line takes its options'
defaults and help from these models (koala.cli.option), so each is written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from koala.errors import KoalaError

LOSS_NAMES = ("fkl", "rkl", "tvd", "tvdpp", "tvdpp_exact", "jsd")  # koala.training.losses.LOSSES implements each
HEAD_KINDS = ("medusa", "eagle", "eagle3")  # draft heads on the target's features (koala.models.heads)
# What the pipeline can train: an independent draft model or draft heads. The untrained baselines (truncate:N,
# ngram) are drafter specs for `koala eval --drafter`, not trainable kinds.
DRAFTER_KINDS = ("draft_model", *HEAD_KINDS)
LossName = Literal[LOSS_NAMES]

CONFIG_DIR = Path(__file__).resolve().parent / "profiles"  # package data: installed with koala
PROFILES = ("smoke", "default", "gpu")
DEFAULT_PROFILE = "smoke"  # a CPU in minutes: what `koala run` and every command with --profile start from


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetConfig(_Strict):
    spec: str = Field("smollm2-135m-instruct", description="target: koala name, HF id, model directory or .gguf")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute dtype")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    trust_remote_code: bool = Field(False, description="run model code shipped with a checkpoint (off unless asked)")


class PromptsConfig(_Strict):
    source: str = Field("sharegpt", description="sharegpt (its training split), sharegpt-heldout, mtbench, humaneval, "
                        "hf:NAME, a file or a directory of logs")
    limit: int | None = Field(None, ge=1, description="use at most this many prompts (after de-duplication)")
    sharegpt_turns: int = Field(1, ge=1, description="ShareGPT: keep the chat up to this human turn")
    min_prompt_tokens: int = Field(4, ge=1, description="drop prompts shorter than this (templated, in tokens)")
    max_prompt_tokens: int = Field(512, ge=1, description="drop prompts longer than this (templated, in tokens)")
    prompt_col: str = Field("prompt", description="file sources: column with the user prompt")
    category_col: str | None = Field("category", description="file sources: column with the category, if any")
    messages_col: str | None = Field(None, description="file sources: column with a whole chat instead of a prompt")
    response_col: str = Field("response", description="file sources: column with the logged answer (teacher forcing)")


class SamplingConfig(_Strict):
    out_dir: str = Field("runs/data", description="directory of the Parquet shards and manifest.json")
    shard_size: int = Field(64, ge=1, description="prompts per shard (the unit of work and of retry)")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled per prompt")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    max_new_tokens: int = Field(256, ge=1, description="longest response, in tokens")
    batch_size: int = Field(8, ge=1, description="rows decoded together (continuous batching: a finished row "
                            "takes the next prompt of the shard)")
    seed: int = Field(0, description="base seed; each sample's seed derives from it and the sample's id")
    topk_logprobs: int = Field(0, ge=0, description="store the teacher's top-k log-probs per position (0 = off)")
    compile: bool | None = Field(None, description="compiled decode step for the batch (CUDA graphs on a GPU); "
                                 "None: on CUDA, off on a CPU (there a compiled batch step costs minutes of autotuning)")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return _checked_temperature(v)


def _checked_temperature(v: float) -> float:
    from koala.engine.sampling import check_temperature

    try:
        check_temperature(v)
    except KoalaError as e:
        raise ValueError(str(e)) from None
    return v


class TeacherForcedConfig(_Strict):
    """The target run once over conversations that already have answers: its top-k (and features) at every answer
    position. No generation, so many times the tokens per CPU-hour of sampling; the alignment data stays sampled."""

    limit: int = Field(0, ge=0, description="conversations to teacher-force (from prompts.source); 0 = off")
    out_dir: str = Field("runs/teacher", description="directory of the teacher-forced shards and manifest.json")
    shard_size: int = Field(256, ge=1, description="conversations per shard (the unit of work and of retry)")
    batch_size: int = Field(8, ge=1, description="conversations per target forward (right-padded)")
    max_seq_len: int = Field(768, ge=8, description="prompt + logged answer, truncated to this many tokens")
    topk_logprobs: int = Field(32, ge=1, description="the target's top-k log-probs stored at each answer position")
    features: bool = Field(False, description="also store the target's features (what its LM head reads): heads "
                           "train on them without running the target again")
    aux_layers: list[int] | None = Field(None, description="with features: store the target's states at these "
                                         "layers' inputs before the features, for EAGLE-3 heads whose "
                                         "drafter.aux_layers are the same (4x the bytes for 3 layers)")


class DrafterConfig(_Strict):
    kind: Literal[DRAFTER_KINDS] = Field(
        "draft_model", description="what to train: an independent draft model, or Medusa, EAGLE or EAGLE-3 draft heads")
    layers: int = Field(2, ge=1, description="decoder layers (draft_model) or K (heads)")
    hidden_size: int | None = Field(None, ge=8, description="None: the target's (needed to share its embeddings)")
    intermediate_size: int | None = Field(None, ge=8, description="None: the target's")
    num_heads: int | None = Field(None, ge=1, description="attention heads; None: the target's")
    num_kv_heads: int | None = Field(None, ge=1, description="key/value heads; None: the target's")
    init: Literal["random", "target"] = Field("target", description="random, or copy the target's embeddings/layers")
    copy_layers: list[int] | None = Field(None, description="target layers to copy (init=target); None: spread evenly")
    embeddings: Literal["frozen", "trainable"] = Field("frozen", description="shared embeddings/head: frozen or trained")
    medusa_heads: int = Field(4, ge=1, validation_alias=AliasChoices("medusa_heads", "n_heads"),
                              description="Medusa: number of heads, the most tokens it drafts per round (was n_heads)")
    draft_vocab: int | None = Field(None, ge=16, description="draft over the K most frequent response tokens only "
                                    "(a cheaper drafter head; None: the full vocabulary)")
    aux_layers: list[int] | None = Field(None, description="EAGLE-3: the target layers whose input states are fused "
                                         "(None: 2, L//2 and L-3, as vLLM's speculators and SpecForge read them)")


class TrainingConfig(_Strict):
    out_dir: str = Field("runs/drafter", description="checkpoints and the final drafter")
    loss: LossName = Field("tvdpp", description="distillation loss")
    tvdpp_samples: int = Field(4, ge=1, description="TVD++: tokens drawn from the drafter per position")
    tvdpp_tokens: Literal["drafter", "data"] = Field("drafter", description="TVD++: score tokens drawn from the "
                                                     "drafter (the paper's estimator) or the dataset's own tokens, "
                                                     "importance-weighted")
    steps: int = Field(200, ge=1, description="optimizer steps of distillation (on teacher-forced data when "
                       "teacher_forced.limit > 0, else on the sampled data)")
    finetune_steps: int = Field(0, ge=0, description="then this many steps on the target's sampled answers "
                                "(Direct Alignment's stage 2); 0 = one stage")
    max_minutes: float | None = Field(None, gt=0, description="about how many wall-clock minutes the drafter's "
                                      "training may take (steps and finetune_steps together, shared in proportion; "
                                      "not pretrain_steps): each training times its first steps and runs no more "
                                      "steps than fit, its schedule planned over those; a resumed training keeps its "
                                      "plan. None (null): the step counts exactly")
    run_minutes: float | None = Field(None, gt=0, description="koala run: about how many wall-clock minutes the whole "
                                      "run may take (data, training, evaluation): the training gets what the data "
                                      "stages left of them, less eval_minutes, and at most max_minutes, so a slower "
                                      "machine trains fewer steps rather than finish late. None (null): max_minutes "
                                      "alone")
    eval_minutes: float | None = Field(None, ge=0, description="with run_minutes: the minutes kept for the "
                                       "evaluation after the training. None (null): estimated when the training "
                                       "starts, from the tokens the evaluation decodes at the rate the target's "
                                       "compiled step, built before the training, measures on this machine, plus "
                                       "eval_setup_minutes")
    eval_setup_minutes: float = Field(1.0, ge=0, description="with run_minutes and eval_minutes null: the minutes "
                                      "kept beside the estimated decoding for each evaluation's set-up (the "
                                      "drafter's build, the draft-shape probes' own costs)")
    pretrain_steps: int = Field(0, ge=0, description="next-token pretraining steps before distillation (0 = skip)")
    pretrain_corpus: str = Field("sharegpt", description="pretraining text: sharegpt, hf:NAME or a .jsonl/.parquet file")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up before cosine decay")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_seq_len: int = Field(512, ge=8, description="truncate training sequences to this many tokens")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm")
    checkpoint_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    eval_every: int = Field(50, ge=1, description="held-out expected acceptance every N steps")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="share of samples held out")
    seed: int = Field(0, description="seed of init, data order and dropout")
    compile: bool = Field(False, description="draft heads: compile their training forward and backward with "
                          "inductor (a minute or two once per process; then faster steps: worth it for long trainings)")
    cache_features: bool = Field(True, description="draft heads: compute the target's features once, keep them")
    unroll: int = Field(1, ge=1, le=8, description="EAGLE: train drafts 1..unroll, draft i+1 from the head's own "
                        "predicted features of draft i (EAGLE-3's training-time test); 1 = teacher-forced only")
    feature_noise: float = Field(0.0, ge=0, description="EAGLE: uniform noise on the input features, as a fraction "
                                 "of their RMS (EAGLE's robustness to its own feature errors)")
    medusa_decay: float = Field(0.8, gt=0, le=1, description="Medusa: head i's loss weighted decay^i (Cai et al. "
                                "2024: 0.8)")
    eagle_ce_weight: float = Field(0.1, ge=0, description="EAGLE-1: weight of the cross-entropy beside the feature "
                                   "regression, shared by the unrolled drafts (Li et al. 2024: 0.1)")
    eagle3_decay: float = Field(0.8, gt=0, le=1, description="EAGLE-3: draft p's loss weighted decay^(p-1) (the "
                                "reference training's 0.8)")
    teacher_temperature: float = Field(1.0, ge=0, description="Medusa and EAGLE heads: the target's distribution "
                                       "they are trained on, softmax(logits / T); below 1 it sharpens toward the "
                                       "target's top token, which greedy decoding accepts; 0: that token alone")
    adversarial: bool = Field(False, description="add the KOALA adversarial loss from a discriminator")
    adv_lambda: float = Field(0.1, ge=0, description="weight of the adversarial term")
    adv_warmup_steps: int = Field(20, ge=0, description="steps before the adversarial term is switched on")


class EvalConfig(_Strict):
    """How a drafter is measured; `koala eval` and the pipeline's evaluation share these defaults."""

    bench: str = Field("mtbench", description="mtbench, humaneval, sharegpt-heldout (ShareGPT's held-out split, never "
                       "trained on) or a JSONL of {prompt, category}")
    limit: int | None = Field(8, ge=1, description="evaluate at most this many prompts")
    gamma: int | str = Field("auto", description="draft shape: N tokens proposed per target forward (a chain), "
                             "DEPTHxTOPKxNODES a draft tree (e.g. 4x3x12), or auto: the chain or tree chosen from the "
                             "measured cost by width and acceptance")
    compile: bool = Field(True, description="compiled decode steps (on a CPU compiled ahead of time once per machine "
                          "and cached under $KOALA_CACHE/aot; CUDA graphs on a GPU)")
    dtype: Literal["target", "auto", "float32", "bfloat16", "float16"] = Field(
        "target", description="the precision the target and drafter decode in, the autoregressive baseline included: "
        "target (the target's own dtype), auto (bfloat16 where this machine's matrix units measure it faster, as "
        "compute_dtype decides), or a dtype; losslessness is checked against the target run at this precision")
    weights: Literal["full", "bf16", "int8"] = Field(
        "full", description="the target's linear layers as loaded (full), rounded to bf16 and computed in the dtype "
        "(bf16: half the bytes per step where koala's decode GEMM runs, on any CPU with AVX-512; llama.cpp's BF16), "
        "or int8 weight-only (per output channel, torch's CPU kernel, on bfloat16 activations: a CPU's option; with "
        "float32 activations the kernel is slower than full weights); a bf16 or int8 target is another model, so "
        "losslessness and the autoregressive baseline are its own")
    autotune: bool = Field(True, description="compiled ahead of time (a CPU): autotuned GEMMs (the fastest narrow steps "
                           "where the CPU has a bf16 matrix unit); false: oneDNN's GEMMs at every width, a shorter "
                           "build that decodes nearly as fast in float32 on a CPU without one (bench/results/"
                           "wide_builds*.json: ms by width and build_s); the autoregressive baseline runs the same "
                           "build")
    second_build: bool = Field(True, description="compiled ahead of time (a CPU): where the autotuned wide step's cost "
                               "grows with its width (CPUs without AMX), build it a second time without autotuning "
                               "and run each width on the faster build (minutes, once per machine); false: one "
                               "build runs every width, so wide draft shapes cost (and are priced at) what the "
                               "autotuned build makes of them")
    threshold: float | None = Field(None, ge=0, le=1, description="from the second draft on, stop a chain at the first "
                                    "draft the drafter gives less probability than this (adaptive draft length; the "
                                    "first draft is always proposed, so with gamma 1 this changes nothing); None: "
                                    "always gamma")
    lookup: bool = Field(False, description="prompt lookup first: copy the continuation of an earlier match of the "
                         "last n-gram, and ask the drafter only where the context has none")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (exact match); > 0 = speculative sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass, applied identically to target and drafter")
    max_new_tokens: int = Field(128, ge=1, description="new tokens per prompt")
    warmup: int = Field(1, ge=0, description="untimed warm-up generations before measuring")
    hf_baselines: bool = Field(False, description="also time Hugging Face generate, plain and with assistant_model")
    alone: bool = Field(False, description="pipeline: also measure the drafter without prompt lookup (beside lookup+)")
    also: list[str] = Field([], description="pipeline: more benchmarks to measure the drafter on, as BENCH or "
                            "BENCH:LIMIT (e.g. humaneval:40)")


    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return _checked_temperature(v)

    @field_validator("also")
    @classmethod
    def _also(cls, v: list[str]) -> list[str]:
        from koala.data.prompts import BENCHES

        for spec in v:
            bench, limit = parse_bench(spec)
            named = bench in BENCHES or bench.startswith("hf:") or "/" in bench or "." in bench
            if not named or limit == 0:
                raise ValueError(f"{spec!r} is not BENCH or BENCH:LIMIT (e.g. humaneval:40)")
        return v

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, v):
        from koala.engine.calibrate import parse_draft  # the one parser, shared with `koala generate --gamma`

        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError("gamma must be a positive integer, DEPTHxTOPKxNODES or auto")
        try:
            g = parse_draft(v)
        except KoalaError:
            raise ValueError("gamma must be a positive integer, DEPTHxTOPKxNODES (e.g. 4x3x12) or auto") from None
        return "auto" if g is None else g if isinstance(g, int) else str(g)


def parse_bench(spec: str) -> tuple[str, int | None]:
    """`humaneval:40` -> ("humaneval", 40); `hf:org/name` or a path keep their own colons."""
    bench, sep, limit = spec.rpartition(":")
    return (bench, int(limit)) if sep and limit.isdigit() else (spec, None)


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI or sqlite in run_dir")
    experiment: str = Field("koala", description="MLflow experiment name")


class DistributedConfig(_Strict):
    """The pipeline's training stage as one torchrun job over several workers of the pool (docs/guides/scale-out.md)."""

    nodes: int = Field(1, ge=1, description="workers (hosts) the training stage runs on; 1 = in the pipeline's run")
    procs_per_node: int = Field(1, ge=1, description="torchrun processes per node (GPUs per host)")
    rdzv_host: str | None = Field(None, description="address the workers reach the pipeline's host by (it hosts the "
                                  "rendezvous); None: $KOALA_RDZV_HOST, else this host's name")
    rdzv_port: int = Field(0, ge=0, le=65535, description="rendezvous port on that host; 0: a free one")
    deployment: str = Field("train-node/train-node", description="the deployment each node runs as")


BUDGET_FIELDS = ("max_minutes", "run_minutes", "eval_minutes", "eval_setup_minutes")  # how long, not what it is


class KoalaConfig(_Strict):
    run_dir: str = Field("runs", description="root of everything a run writes")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="teacher forcing, sampling and training: bfloat16 autocast (float32 weights and optimizer "
        "state) or float32; auto: bf16 where this machine measures its GEMMs faster (koala.precision)")
    target: TargetConfig = TargetConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    teacher_forced: TeacherForcedConfig = TeacherForcedConfig()
    drafter: DrafterConfig = DrafterConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "KoalaConfig":
        """Settings of different sections that contradict each other."""
        g, d = self.eval.gamma, self.drafter
        if d.kind == "medusa" and g != "auto" and g > d.medusa_heads:
            raise ValueError(f"eval.gamma {g} exceeds drafter.medusa_heads {d.medusa_heads} (a Medusa drafter proposes "
                             "one token per head): lower eval.gamma, raise drafter.medusa_heads, or use gamma auto")
        if self.distributed.nodes > 1 and d.kind != "draft_model":
            raise ValueError(f"distributed.nodes {self.distributed.nodes} trains the independent drafter (draft_model) "
                             f"only; {d.kind} heads train on one node: set distributed.nodes to 1")
        return self


def _format_error(e: ValidationError, origin: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    value = err.get("input")
    return f"{origin}: field {loc}: {err['msg'].removeprefix('Value error, ')} (got {value!r}); fix the value (each field is described in koala/config.py)"


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 0.5, true, [1, 2] keep their types)."""
    if "=" not in override:
        raise KoalaError(f"override {override!r} is not KEY=VALUE: write it like training.steps=100")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    d = data
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise KoalaError(f"override {override!r}: {p} is not a section")
    d[parts[-1]] = yaml.safe_load(raw)


def load_config(profile: str | None = None, path: str | Path | None = None, overrides: list[str] = ()) -> KoalaConfig:
    """A validated config from a profile name (koala/profiles/NAME.yaml) or a YAML path, then overrides.

    Raises:
        KoalaError: unknown profile, unreadable YAML, unknown key or wrong type (naming the field).
    """
    if path is None and profile is not None:
        path = CONFIG_DIR / f"{profile}.yaml"
        if not path.exists():
            raise KoalaError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)} or pass --config PATH")
    data: dict = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise KoalaError(f"config file {path} does not exist: check the path") from None
        except yaml.YAMLError as e:
            raise KoalaError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax") from e
        if not isinstance(data, dict):
            raise KoalaError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    try:
        return KoalaConfig.model_validate(data)
    except ValidationError as e:
        loc = ".".join(str(x) for x in e.errors()[0]["loc"])
        keys = [(o, o.split("=", 1)[0].strip()) for o in overrides]
        blamed = [o for o, k in keys if k == loc or loc.startswith(k + ".") or k.startswith(loc + ".")]
        raise KoalaError(_format_error(e, f"--set {blamed[-1]}" if blamed else origin)) from None


def unbudgeted(cfg: KoalaConfig) -> KoalaConfig:
    """`cfg` with the training's time budget at its defaults: what identifies a training (its cache key), not how
    long it may run."""
    defaults = {f: TrainingConfig.model_fields[f].default for f in BUDGET_FIELDS}
    return cfg.model_copy(update={"training": cfg.training.model_copy(update=defaults)})
