"""Bad inputs, each with the one-line error it must give: run by tests/test_bad_inputs.py and bench/faults.py.

A case is (name, argv, pattern): `koala ARGV` must exit non-zero, print one line `error: ...` matching the pattern
(which names the input), print no traceback, and leave every file under the working directory as it was.
`{d}` in an argument is a directory `prepare()` filled with broken things to point at.
"""

from __future__ import annotations

import json
from pathlib import Path

CASES: list[tuple[str, list[str], str]] = [
    # koala eval: every numeric option out of range, and the drafter, device, bench and output checked up front
    ("eval --limit 0", ["eval", "--drafter", "ngram", "--limit", "0"], r"--limit 0"),
    ("eval --temperature -1", ["eval", "--drafter", "ngram", "--temperature", "-1"], r"--temperature -1"),
    ("eval --temperature nan", ["eval", "--drafter", "ngram", "--temperature", "nan"], r"--temperature nan"),
    ("eval --top-p 1.5", ["eval", "--drafter", "ngram", "--top-p", "1.5"], r"--top-p 1.5"),
    ("eval --top-p 0", ["eval", "--drafter", "ngram", "--top-p", "0"], r"--top-p 0"),
    ("eval --max-new-tokens 0", ["eval", "--drafter", "ngram", "--max-new-tokens", "0"], r"--max-new-tokens 0"),
    ("eval --threshold 2", ["eval", "--drafter", "ngram", "--threshold", "2"], r"--threshold 2"),
    ("eval --gamma 0", ["eval", "--drafter", "ngram", "--gamma", "0"], r"--gamma"),
    ("eval --gamma x", ["eval", "--drafter", "ngram", "--gamma", "x"], r"--gamma"),
    ("eval --drafter ngram:x", ["eval", "--drafter", "ngram:x"], r"drafter 'ngram:x'.*ngram:N"),
    ("eval --drafter ngram:0", ["eval", "--drafter", "ngram:0"], r"drafter 'ngram:0'.*N >= 1"),
    ("eval --drafter truncate:two", ["eval", "--drafter", "truncate:two"], r"truncate:N"),
    ("eval --drafter unknown name", ["eval", "--drafter", "no-such-drafter"], r"unknown drafter 'no-such-drafter'"),
    ("eval --drafter dir without weights", ["eval", "--drafter", "{d}/empty_drafter"],
     r"drafter directory .*empty_drafter holds no weights.*--drafter"),
    ("eval --drafter truncated model.safetensors", ["eval", "--drafter", "{d}/truncated_drafter"],
     r"model.safetensors is truncated"),
    ("eval --drafter missing draft_vocab", ["eval", "--drafter", "{d}/no_vocab_drafter"],
     r"lacks draft_vocab.safetensors"),
    ("eval --drafter heads:missing", ["eval", "--drafter", "heads:{d}/nowhere"], r"holds no draft heads"),
    ("eval --drafter truncated .gguf", ["eval", "--drafter", "{d}/model.gguf"], r"does not match model.gguf.sha256"),
    ("eval --device cuda (no GPU)", ["eval", "--drafter", "ngram", "--device", "cuda"], r"--device cuda"),
    ("eval --device tpu", ["eval", "--drafter", "ngram", "--device", "tpu"], r"--device 'tpu'"),
    ("eval --dtype float8", ["eval", "--drafter", "ngram", "--dtype", "float8"], r"--dtype 'float8': Input should be 'target', 'auto'"),
    ("eval --weights int4", ["eval", "--drafter", "ngram", "--weights", "int4"], r"--weights 'int4': Input should be 'full', 'bf16' or 'int8'"),
    ("eval --out unwritable", ["eval", "--drafter", "ngram", "--out", "{d}/a_file/report.json"],
     r"--out .*a_file.*cannot write"),
    ("eval --bench missing file", ["eval", "--drafter", "ngram", "--bench", "{d}/none.jsonl"], r"none.jsonl does not "
     r"exist"),
    ("eval --bench bad JSONL line", ["eval", "--drafter", "ngram", "--bench", "{d}/bad.jsonl"], r"bad.jsonl line 3 is "
     r"not JSON"),
    ("eval --bench without a prompt column", ["eval", "--drafter", "ngram", "--bench", "{d}/nocol.jsonl"],
     r"no column 'prompt'.*prompts.prompt_col"),
    ("eval --bench a row without a prompt", ["eval", "--drafter", "ngram", "--bench", "{d}/noprompt.jsonl"],
     r"noprompt.jsonl row 2 has no 'prompt'"),
    ("eval --bench a numeric prompt", ["eval", "--drafter", "ngram", "--bench", "{d}/number.jsonl"],
     r"number.jsonl row 1: 'prompt' is an int \(12345\), not text"),
    ("eval --bench an invisible prompt", ["eval", "--drafter", "ngram", "--bench", "{d}/invisible.jsonl"],
     r"invisible.jsonl row 1: 'prompt' has no visible character"),
    ("eval --temperature 1e-300", ["eval", "--drafter", "ngram", "--temperature", "1e-300"],
     r"--temperature 1e-300.*use 0 for greedy"),
    ("eval --drafter heads:, heads.json cut short", ["eval", "--drafter", "heads:{d}/cut_heads"],
     r"heads.json is unreadable or not valid JSON"),
    # koala generate
    ("generate ''", ["generate", ""], r"prompt is empty"),
    ("generate an invisible prompt", ["generate", "\u200b \t\n\u00a0"], r"no visible character"),
    ("generate --temperature 1e-40", ["generate", "hi", "--temperature", "1e-40"], r"--temperature 1e-40.*use 0 for "
     r"greedy"),
    ("generate --drafter heads:, heads.json cut short", ["generate", "hi", "--drafter", "heads:{d}/cut_heads"],
     r"heads.json is unreadable or not valid JSON"),
    ("generate --temperature nan", ["generate", "hi", "--temperature", "nan"], r"--temperature nan"),
    ("generate --max-new-tokens 0", ["generate", "hi", "--max-new-tokens", "0"], r"--max-new-tokens 0"),
    ("generate --drafter ngram:x", ["generate", "hi", "--drafter", "ngram:x"], r"ngram:N"),
    # koala sample
    ("sample --n-prompts 0", ["sample", "--n-prompts", "0"], r"--n-prompts 0: must be at least 1"),
    ("sample --max-new-tokens 0", ["sample", "--max-new-tokens", "0"], r"--max-new-tokens 0"),
    ("sample --source x", ["sample", "--source", "x"], r"--source must be one of"),
    ("sample --compute-dtype fp16", ["sample", "--compute-dtype", "fp16"], r"--compute-dtype 'fp16': use auto, "
     r"float32, bfloat16"),
    ("heads --compute-dtype int8", ["heads", "--kind", "eagle", "--out", "o", "--compute-dtype", "int8"],
     r"--compute-dtype 'int8'"),
    ("sample --set compute_dtype=fp8", ["sample", "--set", "compute_dtype=fp8"], r"--set compute_dtype=fp8"),
    ("sample --set unknown key", ["sample", "--set", "sampling.nosuch=1"], r"--set sampling.nosuch=1"),
    ("sample --set wrong type", ["sample", "--set", "sampling.temperature=hot"], r"--set sampling.temperature=hot"),
    ("sample --set no '='", ["sample", "--set", "sampling.temperature"], r"is not KEY=VALUE"),
    ("sample --config missing", ["sample", "--config", "{d}/none.yaml"], r"none.yaml does not exist"),
    ("sample --config bad YAML", ["sample", "--config", "{d}/bad.yaml"], r"bad.yaml is not valid YAML"),
    ("sample --profile unknown", ["sample", "--profile", "nosuch"], r"unknown profile 'nosuch'"),
    ("sample, a missing prompt file", ["sample", "--set", "prompts.source={d}/none.jsonl"],
     r"prompts.source .*none.jsonl: no such file"),
    ("run --prompt-source missing", ["run", "--prompt-source", "{d}/none.jsonl"], r"prompts.source .*none.jsonl"),
    ("sample --out unwritable", ["sample", "--out", "{d}/a_file/data"], r"--out .*a_file.*cannot write"),
    # training
    ("distill --init missing", ["distill", "--init", "{d}/nowhere", "--out", "{d}/o"], r"--init .*nowhere: no drafter"),
    ("distill --resume, nothing to resume", ["distill", "--resume", "--out", "{d}/fresh"],
     r"--resume: .*fresh holds no checkpoint"),
    ("distill --loss x", ["distill", "--loss", "x"], r"--loss must be one of"),
    ("distill --steps 0", ["distill", "--steps", "0"], r"--steps 0"),
    ("distill --data missing", ["distill", "--data", "{d}/nodata", "--out", "{d}/o"], r"--data .*nodata: no "
     r"distillation set"),
    ("heads --kind x", ["heads", "--kind", "x", "--out", "{d}/h"], r"--kind must be one of medusa, eagle"),
    ("heads --resume, nothing to resume", ["heads", "--kind", "eagle", "--out", "{d}/fresh", "--resume", "--data",
                                           "{d}/dataset"], r"--resume: .*fresh holds no checkpoint"),
    ("heads --init missing", ["heads", "--kind", "eagle", "--out", "{d}/h", "--init", "{d}/nowhere", "--data",
                              "{d}/dataset"], r"--init .*nowhere: no draft heads"),
    ("pretrain --steps 0", ["pretrain", "--steps", "0"], r"--steps 0"),
    # pipeline and registry
    ("run --profile unknown", ["run", "--profile", "nosuch"], r"unknown profile 'nosuch'"),
    ("run --loss x", ["run", "--loss", "x"], r"--loss must be one of"),
    ("run --n-prompts 0", ["run", "--n-prompts", "0"], r"--n-prompts 0"),
    ("promote without a store here", ["promote", "--model", "m", "--version", "1"], r"no MLflow store at"),
    ("promote --tracking-uri of no store", ["promote", "--model", "m", "--version", "1", "--tracking-uri",
                                            "sqlite:///{d}/new/dir/mlflow.db"], r"no MLflow store at .*new/dir/mlflow.db"),
    ("prompts --source missing", ["prompts", "--source", "{d}/none.jsonl"], r"none.jsonl does not exist"),
    # koala export: the format, the drafter and --out checked before anything is read or written
    ("export --format onnx", ["export", "{d}/no_vocab_drafter", "--format", "onnx", "--out", "{d}/x"],
     r"--format must be one of hf, gguf"),
    ("export missing drafter", ["export", "{d}/nowhere", "--format", "hf", "--out", "{d}/x"],
     r"drafter .*nowhere: no such directory"),
    ("export not a drafter", ["export", "{d}/empty_drafter", "--format", "hf", "--out", "{d}/x"],
     r"empty_drafter holds neither koala.json"),
    ("export wrong kind for the format", ["export", "{d}/no_vocab_drafter", "--format", "medusa", "--out", "{d}/x"],
     r"--format medusa takes medusa drafters.*use --format hf or gguf"),
    ("export --out over another folder", ["export", "{d}/no_vocab_drafter", "--format", "hf", "--out", "{d}/dataset"],
     r"--out .*dataset exists and is not an earlier koala export"),
    ("export --out onto the drafter", ["export", "{d}/no_vocab_drafter", "--format", "hf", "--out",
                                       "{d}/no_vocab_drafter"], r"--out .*holds the drafter being exported"),
    ("export models:/ without a store", ["export", "models:/koala-drafter-x@champion", "--format", "hf", "--out",
                                         "{d}/x"], r"no MLflow store"),
]


def prepare(d: Path) -> None:
    """Fill `d` with the broken things the cases point at."""
    from safetensors.torch import save_file
    import torch

    d.mkdir(parents=True, exist_ok=True)
    (d / "a_file").write_text("a file where a directory is expected\n")
    (d / "empty_drafter").mkdir()
    (d / "empty_drafter" / "config.json").write_text("{}\n")
    t = d / "truncated_drafter"
    t.mkdir()
    (t / "config.json").write_text("{}\n")
    save_file({"w": torch.zeros(64, 64)}, str(t / "model.safetensors"))
    data = (t / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[: len(data) // 2])
    nv = d / "no_vocab_drafter"
    nv.mkdir()
    (nv / "config.json").write_text("{}\n")
    save_file({"w": torch.zeros(2, 2)}, str(nv / "model.safetensors"))
    (nv / "koala.json").write_text(json.dumps({"draft_vocab_size": 8192}) + "\n")
    (d / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (d / "model.gguf.sha256").write_text("0" * 64 + "\n")
    (d / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    (d / "nocol.jsonl").write_text('{"text": "a"}\n')
    (d / "noprompt.jsonl").write_text('{"prompt": "a", "category": "b"}\n{"category": "b", "text": "x"}\n')
    (d / "number.jsonl").write_text('{"prompt": 12345}\n')
    (d / "invisible.jsonl").write_text(json.dumps({"prompt": "\u200b \t\n\u00a0"}) + "\n")
    h = d / "cut_heads"
    h.mkdir()
    text = json.dumps({"kind": "eagle", "layers": 1, "hidden_size": 576, "vocab_size": 49152})
    (h / "heads.json").write_text(text[: len(text) // 2])
    save_file({"w": torch.zeros(2, 2)}, str(h / "heads.safetensors"))
    (d / "bad.yaml").write_text("sampling: [unclosed\n")
    (d / "dataset").mkdir()
    (d / "dataset" / "manifest.json").write_text(json.dumps({"plan": [], "done": {}}) + "\n")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}
