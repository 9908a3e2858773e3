"""Distillation shards: Parquet files of target samples, planned up front, written atomically, checksummed.

Layout of a dataset directory:
    manifest.json          the plan (each shard's prompt ids), what is done (rows, sha256), target and settings
    shard-00000.parquet    one row per sample (SCHEMA), zstd-compressed, metadata as below

A shard is written under a temporary name and renamed when complete; the manifest is updated under a file lock
and replaced atomically, so a run killed at any point leaves only complete shards that the manifest vouches for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from koala import __version__
from koala.data.claims import worker_id
from koala.errors import KoalaError
from koala.interrupt import fault
from koala.io import atomic_path, sha256_file, write_json_atomic

MANIFEST = "manifest.json"

SOURCES = ("generated", "teacher_forced")  # the target's own answers, or the target run over a log's answers

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("prompt_id", pa.string()),
    ("source", pa.string()),  # one of SOURCES
    ("prompt_source", pa.string()),  # where the prompt came from: sharegpt, a file's name ...
    ("category", pa.string()),
    ("messages", pa.string()),  # JSON list of {role, content}
    ("response_text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),  # prompt then response, as the target saw them
    ("prompt_len", pa.int32()),
    ("response_len", pa.int32()),
    ("finish_reason", pa.string()),
    ("temperature", pa.float32()),
    ("top_p", pa.float32()),
    ("seed", pa.int64()),
])
TOPK_FIELDS = [
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),  # (response_len, k)
    ("topk_logprobs", pa.list_(pa.list_(pa.float16()))),  # (response_len, k), temperature-1 teacher
]
FEATURES_FIELD = ("features", pa.binary())  # float16 (len(input_ids), hidden) row-major: what the LM head reads


def schema(topk: bool, features: bool = False) -> pa.Schema:
    fields = list(SCHEMA) + ([pa.field(n, t) for n, t in TOPK_FIELDS] if topk else [])
    return pa.schema(fields + ([pa.field(*FEATURES_FIELD)] if features else []))


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: which prompts go into which file. Its key names it for caching and validation."""

    index: int
    prompt_ids: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.parquet"

    def key(self, settings_hash: str) -> str:
        blob = json.dumps([self.index, list(self.prompt_ids), settings_hash])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def sample_id(prompt_id: str, sample_index: int, seed: int, settings_hash: str) -> str:
    """Stable id of a sample: the same prompt, index, seed and settings always give the same id."""
    return hashlib.sha256(f"{prompt_id}|{sample_index}|{seed}|{settings_hash}".encode()).hexdigest()[:20]


def sample_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    return int(hashlib.sha256(f"{base_seed}|{prompt_id}|{sample_index}".encode()).hexdigest()[:8], 16)


SETTINGS = {"generated": ("samples_per_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                           "topk_logprobs"),
            "teacher_forced": ("max_seq_len", "topk_logprobs", "features", "aux_layers")}
OPTIONAL_SETTINGS = ("aux_layers",)  # hashed only when set: shards written before they existed keep their hash


def settings_hash(settings: dict, source: str = "generated") -> str:
    """Hash of the settings that change what a sample is (not batch size or shard size)."""
    keep = {k: settings.get(k) for k in SETTINGS[source]
            if not (k in OPTIONAL_SETTINGS and settings.get(k) is None)}
    if source != "generated":
        keep["source"] = source
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# --- manifest ---------------------------------------------------------------------------------------------------

class _Json(BaseModel):
    model_config = ConfigDict(extra="allow")  # keys written by other versions are kept on the next write


class PlannedShard(_Json):
    file: str
    index: int
    prompt_ids: list[str]


class ShardEntry(_Json):
    """A finished shard as the manifest vouches for it; a task's entry adds how it went (rate, skipped, held)."""

    file: str
    index: int = -1
    rows: int = 0
    sha256: str = ""
    worker: str | None = None
    new_tokens: int | None = None  # the task's report: tokens written and their rate (not stored in the manifest)
    tokens_per_s: float | None = None
    skipped: bool = False  # the task's report: done before, or left to the live worker that holds its claim
    claimed_by: str | None = None


class DatasetManifest(_Json):
    """manifest.json: what the dataset was made from (target, settings), its plan, and the shards done."""

    koala_version: str = ""
    source: str = "generated"
    target: dict = {}  # koala.targets.target_facts of the target that made it
    sampling: dict = {}  # the settings (sampling or teacher_forced section) and the directory written
    settings_hash: str = ""
    plan: list[PlannedShard] = []
    done: dict[str, ShardEntry] = {}
    skipped: dict = {}  # prompts left out, by reason

    def as_json(self) -> dict:
        """The manifest as the file holds it: the keys it was read with or given, no defaults added."""
        return self.model_dump(mode="json", exclude_unset=True)

    def done_json(self) -> dict:
        """`done` as the file holds it (what training fingerprints and cache keys hash)."""
        return {f: e.model_dump(mode="json", exclude_unset=True) for f, e in self.done.items()}


@contextmanager
def locked_manifest(out_dir: Path) -> Iterator[DatasetManifest]:
    """Read-modify-write the manifest under an exclusive lock (workers may share the directory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        m = read_manifest(out_dir) or DatasetManifest()
        yield m
        fault("manifest.update")  # the lock held, the manifest not yet replaced
        write_json_atomic(out_dir / MANIFEST, m.as_json())


def read_manifest(out_dir: Path) -> DatasetManifest | None:
    f = Path(out_dir) / MANIFEST
    if not f.exists():
        return None
    try:
        return DatasetManifest.model_validate_json(f.read_text())
    except ValidationError as e:  # not JSON, or not a manifest's shape
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise KoalaError(f"{f} is corrupt ({where + ': ' if where else ''}{err['msg']}): restore it or start a new "
                         "--out directory") from None


def check_compatible(m: DatasetManifest, target: dict, sampling_hash: str, out_dir: Path) -> None:
    """Refuse to mix another target's, tokenizer's or settings' samples into one dataset."""
    if not m.model_fields_set:  # no manifest yet: a new dataset
        return
    t = m.target
    if t.get("content_hash") != target["content_hash"] or t.get("tokenizer_hash") != target["tokenizer_hash"]:
        raise KoalaError(
            f"{out_dir} holds data made with target {t.get('name')} ({str(t.get('content_hash'))[:12]}...), not "
            f"{target['name']} ({target['content_hash'][:12]}...): choose another --out directory"
        )
    if m.settings_hash != sampling_hash:
        raise KoalaError(f"{out_dir} was sampled with other settings (temperature, top-p, max_new_tokens, seed ...): "
                         "use the same sampling settings or another --out directory")


def check_plan(m: DatasetManifest, out_dir: Path) -> None:
    """Refuse a manifest whose plan cannot have been written by koala: a prompt planned twice, a shard planned twice,
    or a finished shard the plan does not list (its samples would be sampled again: duplicates).

    Raises:
        KoalaError: naming the first inconsistency and the fix.
    """
    seen: dict[str, str] = {}
    files = set()
    fix = f"the manifest was edited or damaged: restore {Path(out_dir) / MANIFEST} or start a new --out directory"
    for s in m.plan:
        if s.file in files:
            raise KoalaError(f"{out_dir}: {MANIFEST} plans {s.file} twice; {fix}")
        files.add(s.file)
        for pid in s.prompt_ids:
            if pid in seen:
                raise KoalaError(f"{out_dir}: {MANIFEST} plans prompt {pid} in {seen[pid]} and {s.file}; {fix}")
            seen[pid] = s.file
    orphans = sorted(set(m.done) - files)
    if orphans:
        raise KoalaError(f"{out_dir}: {MANIFEST} records {orphans[0]} as done but its plan has no such shard; {fix}")


def shard_valid(out_dir: Path, entry: ShardEntry) -> bool:
    """A shard counts as done when the manifest records it and the file's sha256 matches."""
    f = Path(out_dir) / entry.file
    return bool(entry.sha256) and f.exists() and sha256_file(f) == entry.sha256


# --- writing and reading -----------------------------------------------------------------------------------------

def write_shard(out_dir: Path, spec: ShardSpec, rows: list[dict], metadata: dict, topk: bool,
                features: bool = False) -> ShardEntry:
    """Write one shard atomically and record it in the manifest; returns its manifest entry.

    Raises:
        KoalaError: the disk is full or unwritable (the partial file is removed, the manifest untouched).
    """
    table = pa.Table.from_pylist(rows, schema=schema(topk, features)).replace_schema_metadata(
        {k: json.dumps(v) for k, v in metadata.items()})
    final = out_dir / spec.file
    try:
        with atomic_path(final) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            digest = sha256_file(tmp)
            fault("shard.write")  # the fault campaign's kill points: written, not yet renamed
    except OSError as e:
        raise KoalaError(f"could not write {final} ({e.strerror or e}): free disk space under {out_dir} and run "
                         "again; finished shards are kept") from e
    fault("shard.rename")  # renamed, not yet in the manifest
    entry = ShardEntry(file=spec.file, index=spec.index, rows=table.num_rows, sha256=digest, worker=worker_id())
    with locked_manifest(out_dir) as m:
        m.done = {**m.done, spec.file: entry}  # assigned, not mutated: a field set is a field written
    return entry


def _current(t: pa.Table) -> pa.Table:
    """A shard written before `source` meant generated | teacher_forced (it then named the prompt's origin)."""
    if "prompt_source" in t.column_names or "source" not in t.column_names:
        return t
    i = t.column_names.index("source")
    t = t.rename_columns([*t.column_names[:i], "prompt_source", *t.column_names[i + 1:]])
    return t.add_column(i, "source", pa.array(["generated"] * t.num_rows, pa.string()))


def _read(file: Path, columns: list[str] | None) -> pa.Table:
    if columns is None:
        return _current(pq.read_table(file))
    have = set(pq.read_schema(file).names)
    t = _current(pq.read_table(file, columns=[c for c in {*columns, "source", "prompt_source"} if c in have]))
    return t.select([c for c in columns if c in t.column_names])


def load(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The dataset's rows as a pyarrow Table, after checking every shard's checksum (wrap it in
    `datasets.Dataset(table)` for Hugging Face datasets).

    `columns` reads only those (features are large: leave them out unless a trainer needs them).

    Raises:
        KoalaError: no manifest, a shard missing or corrupt, or no rows.
    """
    out_dir = Path(path)
    m = read_manifest(out_dir)
    if not m:
        raise KoalaError(f"{out_dir} has no {MANIFEST}: build it with `koala sample --out {out_dir}`")
    check_plan(m, out_dir)
    planned = [s.file for s in m.plan]
    done = m.done
    bad = [f for f in planned if f not in done or not shard_valid(out_dir, done[f])]
    if bad:
        raise KoalaError(f"{out_dir}: {len(bad)} of {len(planned)} shards are missing or corrupt (first: {bad[0]}): "
                         f"run `koala sample` again with the same config to finish them")
    _check_rows(out_dir, m)
    tables = [_read(out_dir / f, columns) for f in planned]
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise KoalaError(f"{out_dir} holds no samples: build it with `koala sample`")
    return pa.concat_tables(tables, promote_options="default")


def _check_rows(out_dir: Path, m: DatasetManifest) -> None:
    """Every shard holds the rows its manifest entry counts, of the prompts its plan lists, and no sample twice."""
    owner: dict[str, str] = {}
    fix = "rebuild it: delete the directory (or the shard and its manifest entry) and run `koala sample` again"
    for s in m.plan:
        t = pq.read_table(Path(out_dir) / s.file, columns=["sample_id", "prompt_id"])
        entry = m.done[s.file]
        if "rows" in entry.model_fields_set and t.num_rows != entry.rows:
            raise KoalaError(f"{out_dir}/{s.file} holds {t.num_rows} rows, its manifest entry says {entry.rows}: {fix}")
        stray = set(t.column("prompt_id").to_pylist()) - set(s.prompt_ids)
        if stray:
            raise KoalaError(f"{out_dir}/{s.file} holds prompt {sorted(stray)[0]}, which its plan does not "
                             f"list: {fix}")
        for sid in t.column("sample_id").to_pylist():
            if sid in owner:
                raise KoalaError(f"{out_dir}: sample {sid} is in both {owner[sid]} and {s.file}: {fix}")
            owner[sid] = s.file


def metadata(path: str | Path) -> dict:
    """The schema metadata of the first shard (koala version, target, tokenizer, sampling)."""
    m = read_manifest(Path(path)) or DatasetManifest()
    first = next(iter(m.done.values()), None)
    if first is None:
        return {}
    raw = pq.read_schema(Path(path) / first.file).metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def shard_metadata(target: dict, sampling: dict) -> dict:
    return {"koala_version": __version__, "target": target, "tokenizer_hash": target["tokenizer_hash"],
            "chat_template_hash": target["chat_template_hash"], "sampling": sampling}
