"""The training recipes `koala pretrain`, `koala distill` and `koala heads` (and the Prefect tasks) run: each builds
its data (koala.training.data.training_data), its model and its objective, runs the one loop, and saves the result.

* `pretrain`: an independent drafter on text with the next-token loss (Goel et al. 2024, stage 1).
* `distill`: the drafter on the target's samples with a distillation loss (stage 3), optionally adversarial.
* `train_heads`: KOALA's K-layer Medusa or EAGLE heads on the frozen target's features, optionally adversarial.
Checkpoints and the result land in out_dir: `out_dir/drafter` or `out_dir/heads` is the one to evaluate and serve.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from koala import __version__, precision
from koala.config import BUDGET_FIELDS, HEAD_KINDS, KoalaConfig
from koala.data import shards
from koala.errors import KoalaError
from koala.models.draft_model import build_drafter, save_drafter
from koala.models.heads import build_heads, load_heads, save_heads
from koala.models.vocab import load_draft_vocab
from koala.targets import Target
from koala.training.checkpoints import training_fingerprint, weights_digest
from koala.training.data import draft_vocab_for, training_data
from koala.training.loop import LogFn, LogLine, train, world
from koala.training.features import FeatureSource
from koala.training.heads_objectives import HeadsObjective, heads_objective
from koala.training.objectives import Distill, NextToken, adversarial_if

FINAL = "drafter"


def pretrain(cfg: KoalaConfig, target: Target, out_dir: str | Path, steps: int | None = None, resume: bool | str = False,
             on_log: LogFn | None = None, progress: bool | LogLine = True) -> Path:
    """Pretrain a drafter with the next-token loss on text; returns out_dir/drafter."""
    steps = steps or cfg.training.pretrain_steps
    if steps < 1:
        raise KoalaError("training.pretrain_steps is 0: set it (or --steps) to pretrain")
    data = training_data(cfg, target)
    model = build_drafter(target, cfg.drafter, seed=cfg.training.seed)
    compute = _compute(cfg, target, "pretraining")
    fp = training_fingerprint("pretrain", target.info.content_hash, steps, _fingerprinted(cfg.training),
                              _drafter_fields(cfg), *_dtype_part(compute, target))
    unbudgeted = cfg.training.model_copy(update={"max_minutes": None})  # max_minutes bounds distillation, not this
    metrics = train(NextToken(model), data.train, unbudgeted, out_dir, steps, heldout=data.heldout, resume=resume,
                    fingerprint=fp, on_log=on_log, progress=progress, desc="pretrain", compute=compute)
    info = _info(cfg, target, "pretrain", metrics, corpus=cfg.training.pretrain_corpus, drafter=cfg.drafter.model_dump(),
                 compute_dtype=compute.name)
    final = Path(out_dir) / FINAL
    return _on_rank0(lambda: save_drafter(model, target.tokenizer, final, info), final)


def distill(cfg: KoalaConfig, target: Target, data_dir: str | Path, out_dir: str | Path, loss: str | None = None,
            steps: int | None = None, resume: bool | str = False, init_from: str | Path | None = None,
            on_log: LogFn | None = None, online_teacher: bool = False, progress: bool | LogLine = True) -> Path:
    """Distil a drafter on the target's samples; returns the saved drafter directory (out_dir/drafter).

    Raises:
        KoalaError: data from another target, an empty dataset, a drafter that cannot share the target's
            embeddings, or a non-finite loss.
    """
    data = training_data(cfg, target, data_dir, online_teacher=online_teacher)
    model = _drafter_for(cfg, target, init_from)
    loss, steps = loss or cfg.training.loss, steps or cfg.training.steps
    # The head is trained over the draft vocabulary it will draft from: K/V of the cost, and no capacity spent on
    # tokens it can never propose. A second stage keeps the first stage's (it was trained over it).
    vocab_ids = load_draft_vocab(init_from) if init_from is not None and cfg.drafter.draft_vocab else None
    if vocab_ids is None:
        vocab_ids = draft_vocab_for(cfg, data.train.rows, target.info.vocab_size)
    compute = _compute(cfg, target, "distillation")
    fp = training_fingerprint("distill", target.info.content_hash, loss, steps, _fingerprinted(cfg.training),
                              _drafter_fields(cfg), data.manifest.done_json(), weights_digest(init_from),
                              online_teacher, *_dtype_part(compute, target))
    objective = adversarial_if(Distill(model, loss, target.model, vocab_ids, cfg.training), cfg.training,
                               target.model.device)
    metrics = train(objective, data.train, cfg.training, out_dir, steps, heldout=data.heldout, resume=resume,
                    fingerprint=fp, on_log=on_log, progress=progress, desc="distill", compute=compute)
    info = _info(cfg, target, "distill", metrics, data, data_dir, loss=loss, drafter=cfg.drafter.model_dump(),
                 compute_dtype=compute.name)
    return _on_rank0(lambda: save_drafter(model, target.tokenizer, Path(out_dir) / FINAL, info, vocab_ids),
                     Path(out_dir) / FINAL)


def train_heads(cfg: KoalaConfig, target: Target, data_dir: str | Path, out_dir: str | Path, kind: str | None = None,
                layers: int | None = None, adversarial: bool | None = None, steps: int | None = None,
                on_log: LogFn | None = None, progress: bool | LogLine = True, init_from: str | Path | None = None,
                heldout_dir: str | Path | None = None, resume: bool | str = False) -> Path:
    """Train Medusa or EAGLE heads on a distillation set; returns out_dir/heads (load with `heads:PATH`).

    Args:
        data_dir: shards to train on: teacher-forced (features may be stored) or sampled.
        init_from: heads to continue from (a second stage), keeping their kind, depth and draft vocabulary.
        heldout_dir: measure held-out acceptance on this set's held-out prompts instead (so stages trained on
            different data are measured on the same prompts).
        resume: continue from the last checkpoint in out_dir.
    """
    kind = kind or cfg.drafter.kind
    if kind not in HEAD_KINDS:
        raise KoalaError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    tcfg = cfg.training if adversarial is None else cfg.training.model_copy(update={"adversarial": adversarial})
    data = training_data(cfg, target, data_dir, features=True, heldout_dir=heldout_dir)
    for p in target.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(tcfg.seed)
    init_from = str(init_from).removeprefix("heads:") if init_from is not None else None  # as `koala heads` prints
    heads, kind, layers, vocab_ids = _start_heads(cfg, target, kind, layers, init_from, data.train.rows)
    compute = _compute(cfg, target, f"{kind} heads training")
    with compute.autocast(target.model.device):  # the target's features, where they are not stored, in that dtype
        objective = adversarial_if(_heads_objective(tcfg, target, kind, heads, data, data_dir, heldout_dir,
                                                    vocab_ids), tcfg, target.model.device)
    steps = steps or tcfg.steps
    held = shards.read_manifest(Path(heldout_dir)) if heldout_dir else None
    embed_norm = getattr(heads, "embed_norm", None) is not None
    drafter_fields = {**_drafter_fields(cfg), **({"embed_norm": True} if embed_norm else {})}
    fp = training_fingerprint(kind, target.info.content_hash, layers, steps, _fingerprinted(tcfg), drafter_fields,
                              data.manifest.done_json(), None if held is None else held.done_json(),
                              weights_digest(init_from),
                              *_dtype_part(compute, target))
    metrics = train(objective, data.train, tcfg, out_dir, steps, heldout=data.heldout, resume=resume, fingerprint=fp,
                    on_log=on_log, progress=progress, desc=f"heads-{kind}", compute=compute)
    info = _info(cfg.model_copy(update={"training": tcfg}), target, "heads", metrics, data, data_dir, kind=kind,
                 layers=layers, n_heads=len(heads.heads) if kind == "medusa" else cfg.drafter.medusa_heads,
                 adversarial=tcfg.adversarial, hidden_size=target.model.config.hidden_size,
                 vocab_size=target.model.config.vocab_size, init_from=init_from, compute_dtype=compute.name,
                 train_tokens=sum(max(len(r["input_ids"]) - r.get("prompt_len", 1), 0) for r in data.train.rows))
    final = Path(out_dir) / "heads"
    return _on_rank0(lambda: save_heads(heads.eval(), final, info, vocab_ids), final)


def _fingerprinted(tcfg) -> dict:
    """The training settings that make a training what it is: all but its time budget (a resumed training keeps the
    steps it planned, whatever the budget says now)."""
    d = tcfg.model_dump(exclude=set(BUDGET_FIELDS))
    if d["teacher_temperature"] == 1.0:  # the target's own distribution: absent from the fingerprints written before
        d.pop("teacher_temperature")
    return d


def _compute(cfg: KoalaConfig, target: Target, what: str) -> precision.ComputeDtype:
    """The training's compute dtype (cfg.compute_dtype, measured when auto), printed once."""
    rank, world_size = world()
    box = [precision.for_model(cfg.compute_dtype, target.model) if rank == 0 else None]
    if world_size > 1:  # rank 0 measures (ranks measuring at once on shared cores would disagree): all train alike
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    if rank == 0:
        precision.announce(box[0], what)
    return box[0]


def _dtype_part(compute: precision.ComputeDtype, target: Target) -> tuple:
    """The compute dtype as a fingerprint part, left out where it is the loop's long-standing default (float32 on a
    CPU, bf16 on CUDA), so checkpoints written before the choice existed still resume."""
    default = "bfloat16" if target.model.device.type == "cuda" else "float32"
    if not compute.autocast_on or compute.name == default:  # weights stored in their dtype: nothing changed
        return ()
    return (f"compute_dtype={compute.name}",)


def _on_rank0(save, path: Path) -> Path:
    """The result written once, by rank 0 (DDP keeps every rank's weights equal); the other ranks wait for it, so
    every rank returns a directory that is there (out_dir must be shared by the nodes of a multi-node run)."""
    rank, world_size = world()
    if rank == 0:
        path = save()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return path


def _drafter_fields(cfg: KoalaConfig) -> dict:
    """The drafter section as fingerprints have always read it (medusa_heads was n_heads): a checkpoint written
    before the rename still resumes."""
    d = cfg.drafter.model_dump()
    d["n_heads"] = d.pop("medusa_heads")
    if d["aux_layers"] is None:  # added with EAGLE-3: absent from the fingerprints written before
        d.pop("aux_layers")
    return d


def _heads_objective(tcfg, target: Target, kind: str, heads, data, data_dir, heldout_dir, vocab_ids) -> HeadsObjective:
    """Heads' objective over the target's features, cached beside the data (a later training skips the target)."""
    h, m = target.info.content_hash, target.model
    aux = getattr(heads, "aux_layers", None)  # EAGLE-3 reads the target's states at these layers
    stored = data.manifest.sampling.get("aux_layers")  # teacher-forced shards may hold them
    feats = FeatureSource(m, data.train, tcfg.cache_features, "train", data_dir, h, aux_layers=aux,
                          stored_layers=stored, log=print)
    held = (FeatureSource(m, data.heldout, tcfg.cache_features, "heldout", heldout_dir or data_dir, h, aux_layers=aux,
                          stored_layers=stored, log=print) if data.heldout else None)
    for split in (data.train, data.heldout):  # the rows' stored features now live in the sources: free them
        if split is not None:
            split.drop("features")
    objective = heads_objective(kind, heads, m, feats, held, tcfg.unroll, tcfg.feature_noise, vocab_ids, tcfg)
    if tcfg.compile:  # shapes vary with each batch's length: compiled for dynamic shapes, once
        objective.module = compiled_for_training(heads)
    return objective


def compiled_for_training(module: torch.nn.Module) -> torch.nn.Module:
    """`module` compiled for dynamic shapes, its weights read at every call: never frozen into constants, as inductor
    does with a graph compiled under no_grad (the held-out evaluations) while freezing is on, which the decode
    engine turns on for its own steps in the same process (koala.engine.compile.configure_inductor)."""
    return torch.compile(module, dynamic=True, options={"freezing": False})


def _info(cfg: KoalaConfig, target: Target, stage: str, metrics: dict, data=None, data_dir=None, **more) -> dict:
    """What a saved drafter or heads directory records about how it was made (koala.json / heads.json)."""
    info = {"koala_version": __version__, "kind": "draft_model", "stage": stage,
            "target": {"name": target.info.name, "content_hash": target.info.content_hash,
                       "tokenizer_hash": target.info.tokenizer_hash},
            "training": cfg.training.model_dump(), "metrics": metrics, **more}
    if data is not None:
        manifest = json.dumps(data.manifest.as_json(), sort_keys=True)
        info.update(data_manifest_sha256=hashlib.sha256(manifest.encode()).hexdigest(),
                    data_dir=str(data_dir), data_source=data.manifest.source,
                    train_rows=len(data.train), heldout_rows=len(data.heldout) if data.heldout else 0)
    return info


def _drafter_for(cfg: KoalaConfig, target: Target, init_from: str | Path | None):
    if init_from is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(init_from), dtype=target.model.dtype).to(target.model.device)
        if model.config.vocab_size != target.info.vocab_size:
            raise KoalaError(f"drafter {init_from} has a vocabulary of {model.config.vocab_size} tokens, the target's "
                             f"has {target.info.vocab_size}: start from a drafter built for this target")
        if cfg.drafter.embeddings == "frozen":
            model.model.embed_tokens.weight.requires_grad_(False)
            model.lm_head.weight.requires_grad_(False)
        return model
    return build_drafter(target, cfg.drafter, seed=cfg.training.seed)


def _start_heads(cfg: KoalaConfig, target: Target, kind: str, layers: int | None, init_from: str | None,
                 train_rows: list[dict]):
    """(heads, kind, layers, draft vocabulary): continued from `init_from` (its kind, depth and vocabulary), or new."""
    if init_from is not None:
        heads, prior = load_heads(init_from, target.model)
        return heads.train(), prior["kind"], prior["layers"], load_draft_vocab(init_from)
    layers = layers or (cfg.drafter.layers if cfg.drafter.kind in HEAD_KINDS else 1)  # drafter.layers: a head's K
    return (build_heads(kind, target.model, layers, cfg.drafter.medusa_heads, aux_layers=cfg.drafter.aux_layers),
            kind, layers,
            draft_vocab_for(cfg, train_rows, target.info.vocab_size))
