"""Experiment tracking with MLflow: the resolved config as params, per-step metrics, artifacts.

Rank 0 talks to MLflow through an explicit `MlflowClient` (no global `mlflow.start_run`
state); on every other rank each method does nothing. Tracking never stops training: a
failure (server down, MLflow not installed, a rejected request) emits one `TrackingWarning`
through `warnings.warn` and turns the tracker into a no-op for the rest of the run.

    tracker = Tracker(cfg.tracking, run_dir, rank=rank, run_id=state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id  # save it in the checkpoint to resume the same run
    tracker.log_params(flatten_config(cfg))
    for step in range(num_steps):
        tracker.log_metrics({"train/loss": loss, "train/lr": lr}, step)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.close()

The store is `tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else the project's local store: a
SQLite database `mlflow.db` with artifacts under `mlartifacts/` in the folder the job runs from, so
every run of a project lands in one store (MLflow 3.17 refuses the old `./mlruns` file store unless
`MLFLOW_ALLOW_FILE_STORE=true`, so SQLite is the local default). The experiment is
`tracking.experiment`, else `$MLFLOW_EXPERIMENT_NAME`, else "selfflow". Runs are tagged with the
command line, the entry point and the git commit of the selfflow checkout (and whether it had
uncommitted changes). Browse the local store with `mlflow ui --backend-store-uri sqlite:///mlflow.db`.

For an http(s) server, a dead server must cost seconds, not minutes: unless already set, this
process gets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT=10 (seconds).
`import mlflow` turns on MLflow's usage telemetry unless MLFLOW_DISABLE_TELEMETRY=true (or
DO_NOT_TRACK=true) is in the environment; this module leaves that choice to the user.
"""

import dataclasses
import os
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow/utils/validation.py): longest param value, params per log_batch call.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
TRUNCATION_NOTE = "...[truncated]"

# MLflow's HTTP defaults are 7 retries with exponential backoff and a 120 s timeout, so a dead
# server would stall the first call for minutes. A user's own settings are left alone.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingWarning(UserWarning):
    """Tracking failed and was switched off; training goes on."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else the project's local store: sqlite:///<cwd>/mlflow.db with
    # artifacts in <cwd>/mlartifacts, one store for every run started from that folder (`make demo` and
    # `make compare` from the repository root), so runs can be compared in one `mlflow ui`
    tracking_uri: str | None = None
    experiment: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME if set, else "selfflow"
    run_name: str | None = None  # None: the run folder's name

    def __post_init__(self):
        if self.experiment is not None and not self.experiment:
            raise ValueError("experiment must be a non-empty name (or null for the default)")


def resolved(cfg: TrackingConfig, recorded_uri: str | None = None) -> tuple[str, str, Path | None]:
    """(tracking URI, experiment, the local store's folder or None for a server) as MLflow's own clients
    would pick them: the config, then MLflow's environment variables, then (a resumed run) the store
    the run folder recorded, then the project's local store in the current folder."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded_uri
    experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "selfflow"
    if uri and uri.startswith("sqlite:///"):  # artifacts beside the database (MLflow's default: ./mlruns)
        return uri, experiment, Path(uri.removeprefix("sqlite:///")).parent
    if uri:
        return uri, experiment, None
    store = Path.cwd().resolve()
    return f"sqlite:///{store / 'mlflow.db'}", experiment, store


def source_tags(run_dir: Path) -> dict[str, str]:
    """MLflow's source tags: the command line, the entry point, and the git commit of the selfflow checkout."""
    tags = {
        "selfflow.run_dir": str(run_dir),
        "selfflow.command": shlex.join(sys.argv),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "selfflow " + (sys.argv[1] if len(sys.argv) > 1 else ""),
    }
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "pyproject.toml").is_file() or not (checkout / ".git").exists():
        return tags  # an installed wheel: site-packages may sit inside some other repository
    git = {"cwd": checkout, "capture_output": True, "text": True, "timeout": 10}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain"], **git)
    except (OSError, subprocess.SubprocessError):
        return tags  # not a git checkout (an installed wheel) or no git: no commit to name
    if head.returncode == 0:
        tags["mlflow.source.git.commit"] = head.stdout.strip()
        tags["selfflow.git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    return tags


def flatten_config(obj: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) dataclass or mapping as `{"model.depth": "12", ...}` with every value a string."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a dataclass instance or a mapping, got {type(obj).__name__}")
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """Rank 0 talks to MLflow; on other ranks every method is a no-op. Failures are warnings, never crashes."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        rank: int = 0,
        run_id: str | None = None,
        recorded_uri: str | None = None,
    ):
        """`run_id`: the MLflow run to continue (a resumed run), found in `recorded_uri` (the store the run
        folder recorded) unless the config or the environment names another store: then a new run starts."""
        self.run_id: str | None = None
        self.uri: str | None = None
        self._client = None
        self._logged_params: dict[str, str] = {}  # what the run already holds, so a resume does not re-log
        if rank != 0 or not cfg.enabled:
            return
        run_dir = Path(run_dir).resolve()
        uri, experiment, store = resolved(cfg, recorded_uri)
        self.uri = uri
        if run_id is not None and recorded_uri is not None and uri != recorded_uri:
            message = f"this run's MLflow run {run_id} is in {recorded_uri}; a new run starts in {uri}"
            warnings.warn(message, TrackingWarning, stacklevel=2)
            run_id = None
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.tracking import MlflowClient

            run_dir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=uri)
            if run_id is not None:
                self._resume(run_id)
            else:
                self._start(cfg, experiment, run_dir, store)
        except Exception as err:
            self._disable(f"could not start tracking at {uri}", err)

    def _start(self, cfg: TrackingConfig, name: str, run_dir: Path, store: Path | None) -> None:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A server picks its own artifact root; a local store keeps artifacts beside the database.
            location = (store / "mlartifacts").as_uri() if store is not None else None
            experiment_id = self._client.create_experiment(name, artifact_location=location)
        run = self._client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name, tags=source_tags(run_dir))
        self.run_id = run.info.run_id

    def _resume(self, run_id: str) -> None:
        run = self._client.get_run(run_id)
        self._client.update_run(run_id, status="RUNNING")
        self._logged_params = dict(run.data.params)
        self.run_id = run_id

    def _disable(self, what: str, err: BaseException) -> None:
        self._client = None
        message = f"{type(err).__name__}: {err}"
        if len(message) > 500:
            message = message[:500] + " ..."
        message = f"MLflow tracking off for the rest of this run: {what} ({message})"
        warnings.warn(message, TrackingWarning, stacklevel=3)

    def log_params(self, params: Any) -> None:
        """Log a (nested) config once; on a resume, keys the run already holds are skipped."""
        if self._client is None:
            return
        try:
            flat = {key: _fit_param(value) for key, value in flatten_config(params).items()}
            changed = sorted(key for key, old in self._logged_params.items() if flat.get(key, old) != old)
            if changed:  # MLflow params are immutable; a resumed run keeps its first values
                message = f"params changed since the run started, kept the old values: {changed}"
                warnings.warn(message, TrackingWarning, stacklevel=2)
            new = [(key, value) for key, value in flat.items() if key not in self._logged_params]
            from mlflow.entities import Param

            for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
                batch = [Param(key, value) for key, value in new[i : i + MAX_PARAMS_PER_BATCH]]
                self._client.log_batch(self.run_id, params=batch)
            self._logged_params.update(new)
        except Exception as err:
            self._disable("log_params failed", err)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """All metrics of one step in one request."""
        if self._client is None:
            return
        try:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as err:
            self._disable(f"log_metrics at step {step} failed", err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is None:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:
            self._disable(f"log_artifact({path}) failed", err)

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run ended ("FINISHED", "FAILED" or "KILLED"); later calls do nothing."""
        if self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as err:
            self._disable("close failed", err)
        self._client = None


def _fit_param(value: str) -> str:
    """MLflow rejects longer param values; keep the head and say so."""
    if len(value) <= MAX_PARAM_VALUE_LENGTH:
        return value
    return value[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATION_NOTE)] + TRUNCATION_NOTE
