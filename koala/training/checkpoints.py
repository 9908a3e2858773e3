"""Resumable checkpoints: everything stateful of a training in one directory per step, written atomically, and the
fingerprint that keeps one training from resuming another's.

checkpoints/step-N/ holds model.safetensors (the trained weights), optimizer.pt, trainer.pt (schedule, step, data
position, RNG states) and NAME.pt for each of the objective's other stateful parts (adversary.pt: KOALA's
discriminator), so a resumed training continues bitwise as if never stopped.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError
from koala.interrupt import fault
from koala.io import digest, sha256_file, write_text_atomic

def save_checkpoint(out_dir: Path, step: int, model, opt, sched, data_pos: dict, stateful: dict | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (a directory renamed into place) and keep the last `keep`.

    `stateful` maps a name to anything else with state_dict()/load_state_dict() a resume needs (the objective's
    `stateful()`: KOALA's discriminator with its optimizer and collapse counter); each goes in NAME.pt.
    """
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        state = {k: v.detach().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        for name, obj in (stateful or {}).items():
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
        fault("checkpoint.write")
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():  # CUDA draws (feature noise on a GPU) resume bitwise too
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"scheduler": sched.state_dict(), "step": step, "data": data_pos, **rng}, tmp / "trainer.pt")
    except Exception as e:  # noqa: BLE001 - a full disk is OSError, torch's RuntimeError or safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out_dir)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KoalaError(f"could not write checkpoint step {step} under {root} ({why}): free disk space and resume "
                         f"with --resume; the last checkpoint is kept ({last or 'none yet'})") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [d for d in sorted((out_dir / "checkpoints").glob("step-*")) if (d / "trainer.pt").exists()]
    return done[-1] if done else None


FINGERPRINT = "fingerprint.txt"


def claim_checkpoints(out_dir: Path, fingerprint: str | None, resume: bool | str = "auto") -> None:
    """Make out_dir's checkpoints this training's, as `resume` says.

    A fingerprint names what a training is (target, config, data, starting weights): resuming another training's
    checkpoint would hand back the wrong drafter under this one's name.

    resume:
        True: continue this training (`--resume`). Refused, with out_dir untouched, when there is no checkpoint or
            when they belong to another training (or carry no fingerprint).
        "auto": continue this training's checkpoints if there are some (a retried task); set others' aside.
        False: start over; any checkpoints there are set aside (checkpoints.stale-*), never mixed with the new ones.

    Raises:
        KoalaError: resume=True and nothing of this training's to continue.
    """
    root = out_dir / "checkpoints"
    f = root / FINGERPRINT
    stored = f.read_text().strip() if f.exists() else None
    have = latest_checkpoint(out_dir) is not None
    ours = have and (fingerprint is None or stored == fingerprint)
    if resume is True and not have:
        raise KoalaError(f"--resume: {out_dir} holds no checkpoint to continue: drop --resume to start a new training "
                         "there")
    if resume is True and not ours:
        whose = "carry no fingerprint (written by an older koala)" if stored is None else \
            "belong to another training (target, data, config or starting weights differ)"
        raise KoalaError(f"--resume: the checkpoints in {out_dir} {whose}: drop --resume to start over there (they "
                         "are set aside), or choose another --out")
    if have and (resume is False or not ours):
        base = out_dir / f"checkpoints.stale-{(stored or 'unknown')[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
        stale, n = base, 1
        while stale.exists():  # never overwrite a set-aside training: it may be the long one
            stale, n = base.with_name(f"{base.name}.{n}"), n + 1
        root.rename(stale)
        why = "an earlier run of this training" if ours else "another training's (target, config, data or starting " \
              "weights differ)"
        print(f"{root} held {why} checkpoints: moved to {stale.name}, starting over")
    if fingerprint is not None:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(f, fingerprint + "\n")


def load_checkpoint(ckpt: Path, model, opt, sched, stateful: dict | None = None) -> tuple[int, dict]:
    """Restore a checkpoint exactly (every weight must fit: strict); returns (step, data position).

    Raises:
        KoalaError: the checkpoint is damaged or was written for another architecture.
    """
    try:
        unwrap(model).load_state_dict(load_file(ckpt / "model.safetensors",
                                                device=str(next(model.parameters()).device)), strict=True)
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        for name, obj in (stateful or {}).items():
            obj.load_state_dict(torch.load(ckpt / f"{name}.pt", weights_only=True))
        t = torch.load(ckpt / "trainer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and pickle each raise their own types
        if isinstance(e, KoalaError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KoalaError(f"checkpoint {ckpt} does not fit this training ({first}): drop --resume to start over, or "
                         "choose another --out") from None
    sched.load_state_dict(t["scheduler"])
    torch.set_rng_state(t["rng"])
    if "cuda_rng" in t and torch.cuda.is_available() and len(t["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(t["cuda_rng"])
    return t["step"], t["data"]


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def training_fingerprint(*parts) -> str:
    """A short digest of what a training is: pass its config sections, data manifest and starting weights' digest."""
    return digest(list(parts))


def weights_digest(directory: str | Path | None) -> str | None:
    """sha256 over the safetensors files of a drafter or heads directory (None: no directory)."""
    if directory is None:
        return None
    d = Path(str(directory).removeprefix("heads:"))
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
