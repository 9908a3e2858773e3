"""MLflow tracking: the only module of koala that imports mlflow.

A `Tracker` wraps one MLflow run (optionally nested under a parent): params, per-step metrics, artifacts, and the
drafter logged as a pyfunc model whose artifacts are the drafter's safetensors directory, so
`mlflow.pyfunc.load_model(uri)` loads it back in one call and `drafter_path(uri)` gives the directory to serve.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from koala.errors import KoalaError


def resolve_uri(uri: str | None, run_dir: str | Path, create: bool = True) -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else a SQLite store in the run directory.

    Raises:
        KoalaError: create=False (reading an existing registry) and the local store does not exist.
    """
    given = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        local = _local_store(given)
        if not create and local is not None and not local.exists():  # opening it would create an empty store
            raise KoalaError(f"no MLflow store at {local} ({given}): pass the tracking URI of an existing store "
                             "(--tracking-uri or MLFLOW_TRACKING_URI)")
        return given
    db = Path(run_dir).resolve() / "mlflow.db"
    if not create and not db.exists():
        raise KoalaError(f"no MLflow store at {db}: run from the directory where `koala run` ran, or pass "
                         "--tracking-uri (or set MLFLOW_TRACKING_URI)")
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _local_store(uri: str) -> Path | None:
    """The file or directory of a local store URI (sqlite:///PATH, file:PATH, a plain path), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].removeprefix("//"))
    return None if "://" in uri else Path(uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any expensive stage, when an HTTP tracking server does not answer.

    Raises:
        KoalaError: naming the URI and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status < 500:
                return
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise KoalaError(f"MLflow tracking server {uri} is unreachable ({reason}): start it (`mlflow server --host "
                     "127.0.0.1 --port 5000`) or set tracking.uri / MLFLOW_TRACKING_URI to a reachable store")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run; create it with `Tracker.start(...)` as a context manager."""

    def __init__(self, run):
        self.run = run
        self.run_id = run.info.run_id

    @classmethod
    @contextmanager
    def start(cls, uri: str, experiment: str, run_name: str, nested: bool = False, parent_run_id: str | None = None,
              tags: dict | None = None) -> Iterator["Tracker"]:
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name, nested=nested or parent_run_id is not None,
                              parent_run_id=parent_run_id, tags=tags or {}) as run:
            yield cls(run)

    def log_params(self, params: dict) -> None:
        flat = {k: ("" if v is None else str(v)[:6000]) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]), run_id=self.run_id)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path, run_id=self.run_id)
        elif p.exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path, run_id=self.run_id)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            mlflow.set_tag(k, str(v))

    def log_drafter(self, drafter_dir: str | Path, registered_name: str | None = None,
                    version_tags: dict | None = None) -> dict:
        """Log the drafter as a pyfunc model (artifacts: its safetensors directory); register it if named.

        The version is created with `version_tags` in the same call, so no version ever exists without them.

        Returns:
            {"model_uri": ..., "version": ... or None}
        """
        info = mlflow.pyfunc.log_model(
            name="drafter", python_model=DrafterModel(), artifacts={"drafter": str(drafter_dir)},
            pip_requirements=["torch", "transformers", "safetensors"],
        )
        version = None
        if registered_name:
            version = mlflow.register_model(info.model_uri, registered_name, tags=version_tags or {}).version
        return {"model_uri": info.model_uri, "version": None if version is None else str(version)}


WEIGHTS_TAG = "koala.weights_sha256"  # on every registered version: registering the same weights twice is a no-op
CHAMPION = "champion"


def _not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", None)
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(e))


class Registry:
    """The MLflow model registry of one store: versions by weights, the `champion` alias, the promotion record."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client = mlflow.MlflowClient(uri)

    def version_with_weights(self, name: str, digest: str) -> dict | None:
        """The version already registered for these weights ({version, model_uri}), if any."""
        try:
            found = self.client.search_model_versions(f"name='{name}' and tags.`{WEIGHTS_TAG}` = '{digest}'")
        except MlflowException as e:
            if _not_found(e):
                return None
            raise
        if not found:
            return None
        v = min(found, key=lambda v: int(v.version))
        return {"version": str(v.version), "model_uri": f"models:/{name}/{v.version}"}

    def champion(self, name: str):
        """The version holding `champion`, or None when there is none. Any other registry error propagates: a
        registry that cannot be read must not be mistaken for one without a champion."""
        try:
            return self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as e:
            if _not_found(e):
                return None
            raise

    def tag(self, name: str, version: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, str(v))

    def make_champion(self, name: str, version: str) -> None:
        self.client.set_registered_model_alias(name, CHAMPION, version)

    def record_decision(self, name: str, version: str, promoted: bool | None, reason: str, **extra) -> None:
        """The promotion record on a version: why (and when) it was or was not made champion. `promoted` None
        writes the reason only (before the alias moves; `promoted` follows once it has)."""
        tags = {"promotion_reason": reason, "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        if promoted is not None:
            tags["promoted"] = str(promoted).lower()
        self.tag(name, version, tags)

    def version(self, model_uri: str):
        """The registered version a `models:/NAME/VERSION` or `models:/NAME@ALIAS` reference names.

        Raises:
            KoalaError: a malformed reference, or one the registry does not hold.
        """
        ref = model_uri.removeprefix("models:/")
        name, sep, alias = ref.partition("@")
        if not sep:
            name, _, number = ref.rpartition("/")
        if not model_uri.startswith("models:/") or not name or not (alias if sep else number):
            raise KoalaError(f"{model_uri}: a registry reference is models:/NAME/VERSION or models:/NAME@ALIAS")
        try:
            return (self.client.get_model_version_by_alias(name, alias) if sep else
                    self.client.get_model_version(name, number))
        except MlflowException as e:
            raise KoalaError(f"{model_uri}: not in the registry at {self.uri} ({str(e).splitlines()[0][:160]}): check "
                             "the name, version or alias in `mlflow ui`") from None

    def log_export(self, name: str, version: str, directory: str | Path, fmt: str) -> str:
        """An export of a registered version, logged as artifacts of the run that registered it and named by the
        version's tag `export.FORMAT`. Returns the artifacts' URI."""
        run_id = self.client.get_model_version(name, version).run_id
        path = f"exports/v{version}/{fmt}"
        self.client.log_artifacts(run_id, str(directory), artifact_path=path)
        art = f"runs:/{run_id}/{path}"
        self.tag(name, version, {f"export.{fmt}": art})
        return art

    def set_champion(self, name: str, version: str, reason: str, **extra) -> None:
        """Give `version` the alias `champion` by hand (`koala promote`) and record it as a manual promotion.

        Raises:
            KoalaError: the model has no such version.
        """
        try:
            self.client.get_model_version(name, version)
        except MlflowException as e:
            raise KoalaError(f"model {name} has no version {version} in {self.uri}: check `mlflow ui` for the "
                             "versions") from e
        self.make_champion(name, version)
        self.record_decision(name, version, True, reason, promotion="manual", **extra)


def drafter_path(model_uri: str, uri: str | None = None) -> Path:
    """Download a logged drafter's directory (model URI, `models:/NAME@champion`, or `runs:/...`) from the store at
    `uri` (default: the current one). Only the files are fetched: heads, which the pyfunc wrapper cannot load as a
    causal LM, come back as well as independent drafters.

    Raises:
        KoalaError: the reference names no model in the store, or a model without a drafter directory.
    """
    import tempfile

    import mlflow.artifacts

    if uri is not None:
        mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=tempfile.mkdtemp(prefix="koala-registry-")))
    except MlflowException as e:
        raise KoalaError(f"{model_uri}: not in the registry at {uri or mlflow.get_tracking_uri()} "
                         f"({str(e).splitlines()[0][:160]}): check the name, version or alias in `mlflow ui`") from None
    found = [d for d in (local / "artifacts").glob("*") if d.is_dir()] if (local / "artifacts").is_dir() else []
    if len(found) != 1:
        raise KoalaError(f"{model_uri} holds no drafter directory: it was not logged by koala")
    return found[0]


class DrafterModel(mlflow.pyfunc.PythonModel):
    """Loads the drafter (a Hugging Face causal LM, safetensors) and proposes a greedy continuation per prompt."""

    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = context.artifacts["drafter"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        """A greedy continuation of each prompt by the drafter alone (a smoke check that it loaded)."""
        import torch

        out = []
        for p in model_input:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": str(p)}], add_generation_prompt=True,
                                                     return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            with torch.no_grad():
                gen = self.model.generate(ids, max_new_tokens=(params or {}).get("max_new_tokens", 16), do_sample=False)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out
