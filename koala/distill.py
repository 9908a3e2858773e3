"""Drafter training recipes: pretrain on text, distill on the target's samples (Goel et al. 2024, stages 1 and 3).

These glue config, data, drafter and the loop together; `koala pretrain`, `koala distill` and the Prefect tasks
call them. Checkpoints and the final drafter land in out_dir (`out_dir/drafter` is the one to evaluate and serve).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from koala import __version__
from koala.config import KoalaConfig
from koala.data import prompts as P
from koala.data import shards
from koala.drafters.draft_model import build_drafter, save_drafter
from koala.errors import KoalaError
from koala.spec.drafters import load_draft_vocab
from koala.targets import Target, encode_chat
from koala.train import LogFn, SequenceData, train, training_fingerprint, weights_digest

FINAL = "drafter"


def split_heldout(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (by a hash of prompt_id), so no held-out prompt is trained on."""
    if fraction <= 0 or len(rows) < 4:
        return rows, []
    held = [r for r in rows if int(hashlib.sha256(r["prompt_id"].encode()).hexdigest()[:8], 16) / 16**8 < fraction]
    if not held:
        held = rows[-1:]
    ids = {r["prompt_id"] for r in held}
    return [r for r in rows if r["prompt_id"] not in ids], held


def load_distillation_rows(data_dir: str | Path, target: Target, features: bool = False) -> tuple[list[dict], dict]:
    """The shards' rows after checking they were made by this target and tokenizer.

    With `features` (draft heads), the target's stored features where the shards have them, instead of its top-k
    (heads read the teacher off the features).
    """
    cols = ["prompt_id", "input_ids", "prompt_len"] + (["features"] if features else ["topk_ids", "topk_logprobs"])
    table = shards.load(data_dir, columns=cols)
    meta = shards.read_manifest(Path(data_dir)) or {}
    t = meta.get("target", {})
    if t.get("tokenizer_hash") != target.info.tokenizer_hash or t.get("content_hash") != target.info.content_hash:
        raise KoalaError(
            f"{data_dir} was sampled from target {t.get('name')} ({str(t.get('content_hash'))[:12]}...), not from "
            f"{target.info.name} ({target.info.content_hash[:12]}...): sample the data with this target"
        )
    return table.to_pylist(), meta


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


def response_token_counts(rows: list[dict], vocab: int) -> "torch.Tensor":
    """How often each token appears in the responses: what a draft vocabulary keeps."""
    import torch

    counts = torch.zeros(vocab, dtype=torch.long)
    for r in rows:
        ids = torch.tensor(r["input_ids"][r["prompt_len"]:], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab)[:vocab]
    return counts


def draft_vocab_for(cfg: KoalaConfig, rows: list[dict], vocab: int) -> "torch.Tensor | None":
    """The drafter's vocabulary (drafter.draft_vocab most frequent response tokens), or None for the full one."""
    if not cfg.drafter.draft_vocab:
        return None
    from koala.spec.drafters import draft_vocab_ids

    return draft_vocab_ids(response_token_counts(rows, vocab), cfg.drafter.draft_vocab)


def distill(cfg: KoalaConfig, target: Target, data_dir: str | Path, out_dir: str | Path, loss: str | None = None,
            steps: int | None = None, resume: bool | str = False, init_from: str | Path | None = None,
            on_log: LogFn | None = None, online_teacher: bool = False, progress: bool = True) -> Path:
    """Distil a drafter on the target's samples; returns the saved drafter directory (out_dir/drafter).

    Raises:
        KoalaError: data from another target, an empty dataset, a drafter that cannot share the target's
            embeddings, or a non-finite loss.
    """
    out = Path(out_dir)
    rows, manifest = load_distillation_rows(data_dir, target)
    if online_teacher:
        for r in rows:
            r.pop("topk_ids", None), r.pop("topk_logprobs", None)
    train_rows, held = split_heldout(rows, cfg.training.heldout_fraction)
    pad = target.tokenizer.pad_token_id or 0
    data = SequenceData(train_rows, cfg.training.max_seq_len, pad)
    heldout = SequenceData(held, cfg.training.max_seq_len, pad) if held else None
    model = _drafter_for(cfg, target, init_from)
    loss = loss or cfg.training.loss
    # Train the head over the draft vocabulary it will draft from: K/V of the cost, and no capacity spent on
    # tokens it can never propose.
    # A second stage keeps the first stage's draft vocabulary (it was trained over it).
    vocab_ids = load_draft_vocab(init_from) if init_from is not None and cfg.drafter.draft_vocab else None
    if vocab_ids is None:
        vocab_ids = draft_vocab_for(cfg, train_rows, target.info.vocab_size)
    fp = training_fingerprint("distill", target.info.content_hash, loss, steps or cfg.training.steps,
                              cfg.training.model_dump(), cfg.drafter.model_dump(), manifest.get("done"),
                              weights_digest(init_from), online_teacher)
    metrics = train(model, data, cfg.training, out, "distill", steps=steps, loss=loss, target_model=target.model,
                    heldout=heldout, resume=resume, on_log=on_log, progress=progress, vocab_ids=vocab_ids,
                    fingerprint=fp)
    info = {"koala_version": __version__, "kind": "draft_model", "stage": "distill", "loss": loss,
            "target": {"name": target.info.name, "content_hash": target.info.content_hash,
                       "tokenizer_hash": target.info.tokenizer_hash},
            "data_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "data_dir": str(data_dir), "training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump(),
            "metrics": metrics, "train_rows": len(train_rows), "heldout_rows": len(held)}
    return save_drafter(model, target.tokenizer, out / FINAL, info, vocab_ids)


def pretraining_rows(cfg: KoalaConfig, target: Target, limit: int = 2000) -> list[dict]:
    """Text for next-token pretraining: whole ShareGPT conversations in the chat template, or a file's `text`."""
    src = cfg.training.pretrain_corpus
    tok = target.tokenizer
    rows = []
    if src == "sharegpt":
        for r in P.sharegpt(turns=1_000):
            rows.append({"prompt_id": r.id, "prompt_len": 1,
                         "input_ids": encode_chat(tok, list(r.messages), add_generation_prompt=False)})
            if len(rows) >= limit:
                break
    else:
        for r in P.load(src, limit=limit, prompt_col="text", category_col=None):
            rows.append({"prompt_id": r.id, "prompt_len": 1, "input_ids": tok(r.messages[0]["content"])["input_ids"]})
    return rows


def pretrain(cfg: KoalaConfig, target: Target, out_dir: str | Path, steps: int | None = None, resume: bool | str = False,
             on_log: LogFn | None = None, progress: bool = True) -> Path:
    """Pretrain a drafter with the next-token loss on text; returns out_dir/drafter."""
    out = Path(out_dir)
    rows = pretraining_rows(cfg, target)
    train_rows, held = split_heldout(rows, cfg.training.heldout_fraction)
    pad = target.tokenizer.pad_token_id or 0
    model = build_drafter(target, cfg.drafter, seed=cfg.training.seed)
    steps = steps or cfg.training.pretrain_steps
    if steps < 1:
        raise KoalaError("training.pretrain_steps is 0: set it (or --steps) to pretrain")
    fp = training_fingerprint("pretrain", target.info.content_hash, steps, cfg.training.model_dump(),
                              cfg.drafter.model_dump())
    metrics = train(model, SequenceData(train_rows, cfg.training.max_seq_len, pad), cfg.training, out, "pretrain",
                    steps=steps, resume=resume, on_log=on_log, progress=progress, fingerprint=fp)
    info = {"koala_version": __version__, "kind": "draft_model", "stage": "pretrain",
            "target": {"name": target.info.name, "content_hash": target.info.content_hash,
                       "tokenizer_hash": target.info.tokenizer_hash},
            "corpus": cfg.training.pretrain_corpus, "training": cfg.training.model_dump(),
            "drafter": cfg.drafter.model_dump(), "metrics": metrics}
    return save_drafter(model, target.tokenizer, out / FINAL, info)

