"""Prompt sources: ShareGPT, MT-bench, HumanEval, JSONL/Parquet/CSV files, Hugging Face datasets.

Every source yields `PromptRecord`s with a content-hash id, so the same prompt has the same id whichever file it
came from; `dedupe` and `filter_by_length` work on any source.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from koala import assets
from koala.errors import KoalaError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "system": "system", "bing": "assistant", "bard": "assistant"}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    source: str
    category: str
    messages: tuple[dict, ...]  # the chat up to and including the last user message
    followups: tuple[str, ...] = ()  # later user turns, asked after the model answers (MT-bench turn 2)
    response: str | None = None  # the log's own answer to the last user message, if it has one (teacher forcing)

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "category": self.category, "messages": list(self.messages),
                "followups": list(self.followups), "response": self.response}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptRecord":
        """The record `to_dict` gave (a task's parameters are plain data)."""
        return cls(d["id"], d["source"], d["category"], tuple(d["messages"]), tuple(d.get("followups", ())),
                   d.get("response"))


def prompt_id(messages: Iterable[dict]) -> str:
    """Content hash of a chat: 16 hex characters of sha256 over roles and texts."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def make_record(source: str, category: str, messages: list[dict], followups=(), response: str | None = None
                ) -> PromptRecord:
    return PromptRecord(prompt_id(messages), source, category, tuple(messages), tuple(followups),
                        response if response and response.strip() else None)


@dataclass
class ShareGPTStats:
    recovered: int = 0  # complete conversations read
    truncated: bool = False  # the file ended inside a record
    skipped: int = 0  # complete but unusable (no human turn first, empty text)


def read_json_array_prefix(text: str) -> tuple[list, bool]:
    """Every complete element of a JSON array that may be cut off; returns (elements, was_truncated)."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise KoalaError("ShareGPT file does not start with a JSON array: re-fetch it with `koala assets fetch sharegpt`")
    i += 1
    items, n = [], len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return items, True
        if text[i] == "]":
            return items, False
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, True
        items.append(obj)


HELDOUT_EVERY = 64  # one ShareGPT conversation in 64 is held out of every training set, for evaluation


def is_heldout(first_user_turn: str) -> bool:
    """Whether a ShareGPT conversation belongs to the held-out split: a hash of its first user turn, so the split
    is the same at every `turns`, every `limit` and in every copy of the file, and duplicates fall on one side."""
    digest = hashlib.sha256(first_user_turn.strip().encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % HELDOUT_EVERY == 0


def sharegpt(path: str | Path | None = None, turns: int = 1, stats: ShareGPTStats | None = None,
             split: Literal["train", "heldout", "all"] = "train") -> Iterator[PromptRecord]:
    """ShareGPT conversations: the first human turn (turns=1) or the chat up to the `turns`-th human turn.

    `split="train"` (what training reads) leaves out the held-out split that `sharegpt-heldout` evaluates on
    (`is_heldout`); `"heldout"` gives only that split, `"all"` both.
    """
    if split not in ("train", "heldout", "all"):
        raise KoalaError(f"ShareGPT split {split!r} is unknown: use train, heldout or all")
    file = Path(path) if path else assets.path("sharegpt")
    text = _read_text(file)
    convs, truncated = read_json_array_prefix(text)
    stats = stats if stats is not None else ShareGPTStats()
    stats.recovered, stats.truncated = len(convs), truncated
    for conv in convs:
        msgs = [{"role": ROLES.get(t.get("from", ""), "user"), "content": t.get("value", "")}
                for t in conv.get("conversations", [])]
        human_idx = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not human_idx or not msgs[human_idx[0]]["content"].strip():
            stats.skipped += 1
            continue
        if split != "all" and is_heldout(msgs[human_idx[0]]["content"]) != (split == "heldout"):
            continue
        cut = human_idx[min(turns, len(human_idx)) - 1]
        answer = msgs[cut + 1]["content"] if cut + 1 < len(msgs) and msgs[cut + 1]["role"] == "assistant" else None
        yield make_record("sharegpt", "sharegpt", msgs[:cut + 1], response=answer)


def mtbench(path: str | Path | None = None, both_turns: bool = False) -> Iterator[PromptRecord]:
    """MT-bench's 80 questions: the first turn, with the second as a follow-up on request."""
    file = Path(path) if path else assets.path("mtbench")
    for line in _read_text(file).splitlines():
        if line.strip():
            q = json.loads(line)
            follow = tuple(q["turns"][1:]) if both_turns else ()
            yield make_record("mtbench", q["category"], [{"role": "user", "content": q["turns"][0]}], follow)


def humaneval(path: str | Path | None = None) -> Iterator[PromptRecord]:
    """HumanEval's 164 problems, each asking the model to complete a function."""
    file = Path(path) if path else assets.path("humaneval")
    with gzip.open(file, "rt") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                content = f"Complete the following Python function.\n\n```python\n{p['prompt']}```"
                yield make_record("humaneval", "coding", [{"role": "user", "content": content}])


def from_file(path: str | Path, prompt_col: str = "prompt", category_col: str | None = "category",
              messages_col: str | None = None, response_col: str = "response") -> Iterator[PromptRecord]:
    """Prompts from a JSONL, Parquet or CSV file, with a column mapping.

    A row gives either a chat (`messages_col`, a list of {role, content} or its JSON) or a single user prompt
    (`prompt_col`); `category_col` is optional. A logged answer (for teacher forcing) comes from `response_col`, or
    is the chat's last message when that is the assistant's.
    """
    file = Path(path)
    rows = _read_rows(file)
    if not rows:
        raise KoalaError(f"prompt file {file} has no rows: give a file with at least one prompt")
    cols = set().union(*(r.keys() for r in rows[:100]))
    need = messages_col or prompt_col
    if need not in cols:
        raise KoalaError(f"prompt file {file} has no column {need!r} (columns: {', '.join(sorted(cols))}): "
                         f"rename the column to {need!r}, or map it with --set prompts.prompt_col=NAME (koala sample, "
                         "koala run) or --prompt-col (koala prompts)")
    for i, r in enumerate(rows, 1):
        if messages_col:
            msgs = r[messages_col]
            msgs = json.loads(msgs) if isinstance(msgs, str) else list(msgs)
            msgs = [{"role": ROLES.get(m["role"], m["role"]), "content": m["content"]} for m in msgs]
        else:
            msgs = [{"role": "user", "content": prompt_text(r.get(prompt_col), f"prompt file {file} row {i}",
                                                            prompt_col)}]
        answer = r.get(response_col)
        if messages_col and len(msgs) > 1 and msgs[-1]["role"] == "assistant":
            answer, msgs = msgs[-1]["content"], msgs[:-1]
        cat = str(r.get(category_col) or "general") if category_col else "general"
        yield make_record(file.stem, cat, msgs, response=str(answer) if answer is not None else None)


def has_visible(text: str) -> bool:
    """Whether text has a character that is not whitespace, a zero-width or format character or a control."""
    import unicodedata

    return any(unicodedata.category(c)[0] not in "ZC" for c in text)


def prompt_text(value, where: str, column: str = "prompt") -> str:
    """A row's prompt as text, or a one-line error naming the row: missing, not a string (a number is refused rather
    than evaluated as its digits), or without a visible character (whitespace, zero-width and format characters)."""
    if value is None:
        raise KoalaError(f"{where} has no {column!r}: give every row a prompt, or delete the row")
    if not isinstance(value, str):
        kind = type(value).__name__
        raise KoalaError(f"{where}: {column!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({str(value)[:40]}), "
                         "not text: write it as a JSON string")
    if not has_visible(value):
        raise KoalaError(f"{where}: {column!r} has no visible character ({value[:20]!r}): give the prompt's text, or "
                         "delete the row")
    return value


def from_hf(name: str, split: str = "train", prompt_col: str = "prompt", category_col: str | None = None):
    """A Hugging Face dataset by name (needs the hub or a local copy)."""
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not reachable here"
        raise KoalaError(f"could not load dataset {name!r} ({type(e).__name__}): check the name, or export it "
                         "to JSONL/Parquet and pass the file path") from e
    if prompt_col not in ds.column_names:
        raise KoalaError(f"dataset {name} has no column {prompt_col!r} (columns: {', '.join(ds.column_names)})")
    for i, r in enumerate(ds, 1):
        cat = str(r.get(category_col) or "general") if category_col else "general"
        yield make_record(name, cat, [{"role": "user", "content": prompt_text(r.get(prompt_col),
                                                                             f"dataset {name} row {i}", prompt_col)}])


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KoalaError(f"prompt file {file} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KoalaError(f"prompt file {file} is unreadable ({type(e).__name__}): give a UTF-8 text file") from e


def _jsonl_rows(file: Path, text: str) -> list[dict]:
    """One JSON object per line; a bad line is named by its line number in the file."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KoalaError(f"prompt file {file} line {i} is not JSON ({e.msg} at column {e.colno}): fix that "
                             "line") from None
        if not isinstance(row, dict):
            raise KoalaError(f"prompt file {file} line {i} is a JSON {type(row).__name__}, not an object: write one "
                             '{"prompt": ...} object per line')
        rows.append(row)
    return rows


def _read_rows(file: Path) -> list[dict]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(file).to_pylist()
        if suffix == ".csv":
            import csv
            with open(file, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix in (".jsonl", ".json"):
            text = _read_text(file)
            if suffix == ".json" and text.lstrip().startswith("["):
                return json.loads(text)
            return _jsonl_rows(file, text)
    except KoalaError:
        raise
    except FileNotFoundError:
        raise KoalaError(f"prompt file {file} does not exist: check the path") from None
    except Exception as e:  # noqa: BLE001 - pyarrow, csv and json each raise their own types for a broken file
        raise KoalaError(f"prompt file {file} is unreadable ({type(e).__name__}: {str(e)[:120]}): "
                         "fix or re-export it") from e
    raise KoalaError(f"prompt file {file} has an unknown format: use .jsonl, .json, .parquet or .csv")


def dedupe(records: Iterable[PromptRecord]) -> Iterator[PromptRecord]:
    seen: set[str] = set()
    for r in records:
        if r.id not in seen:
            seen.add(r.id)
            yield r


def filter_by_length(records: Iterable[PromptRecord], tokenizer, min_tokens: int = 1, max_tokens: int | None = None,
                     counts: dict | None = None) -> Iterator[PromptRecord]:
    """Keep prompts whose templated length lies in [min_tokens, max_tokens]; count the rest in `counts`."""
    from koala.targets import encode_chat

    for r in records:
        n = len(encode_chat(tokenizer, list(r.messages)))
        if n < min_tokens or (max_tokens is not None and n > max_tokens):
            if counts is not None:
                counts["too_long" if max_tokens is not None and n > max_tokens else "too_short"] = (
                    counts.get("too_long" if max_tokens is not None and n > max_tokens else "too_short", 0) + 1)
            continue
        yield r


SHAREGPT = ("sharegpt", "sharegpt-heldout")  # ShareGPT's two splits, as prompt sources
NAMED = (*SHAREGPT, "mtbench", "humaneval")  # the built-in sources, fetched as assets
BENCHES = ("mtbench", "humaneval", "sharegpt-heldout")  # the built-in evaluation sets


def iter_source(source: str, sharegpt_turns: int = 1, both_turns: bool = False, prompt_col: str = "prompt",
                category_col: str | None = "category", messages_col: str | None = None,
                stats: ShareGPTStats | None = None, response_col: str = "response") -> Iterator[PromptRecord]:
    """Records from a named source (`NAMED`, hf:NAME), a file, or a directory of prompt logs."""
    if source == "sharegpt":
        it = sharegpt(turns=sharegpt_turns, stats=stats)
    elif source == "sharegpt-heldout":
        it = sharegpt(turns=sharegpt_turns, stats=stats, split="heldout")
    elif source == "mtbench":
        it = mtbench(both_turns=both_turns)
    elif source == "humaneval":
        it = humaneval()
    elif source.startswith("hf:"):
        it = from_hf(source[3:], prompt_col=prompt_col, category_col=category_col)
    elif Path(source).suffix or Path(source).exists():
        p = Path(source)
        if p.is_dir():
            files = sorted(f for ext in ("*.jsonl", "*.parquet", "*.csv") for f in p.glob(ext))
            it = (r for f in files for r in from_file(f, prompt_col, category_col, messages_col, response_col))
        else:
            it = from_file(p, prompt_col, category_col, messages_col, response_col)
    else:
        raise KoalaError(f"unknown prompt source {source!r}: use {', '.join(NAMED)}, hf:NAME or a file path")
    return it


def load(source: str, limit: int | None = None, sharegpt_turns: int = 1, both_turns: bool = False,
         prompt_col: str = "prompt", category_col: str | None = "category", messages_col: str | None = None,
         stats: ShareGPTStats | None = None) -> list[PromptRecord]:
    """Prompts from a named source (`NAMED`, hf:NAME) or a file path, de-duplicated.

    Raises:
        KoalaError: unknown source, unreadable file, missing column, or no prompts at all.
    """
    it = iter_source(source, sharegpt_turns, both_turns, prompt_col, category_col, messages_col, stats)
    out = []
    for r in dedupe(it):
        out.append(r)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise KoalaError(f"prompt source {source!r} gave no prompts: check the file and the column mapping")
    return out
