"""Tracker against a real `mlflow server` (see mlflow_server.py), a local SQLite store and a dead port.

Run with `.venv/bin/pytest tests/test_tracking.py -s` (-s also prints the server's start-up time).
"""

import os
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never phone home; read at `import mlflow`

from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow_server import free_port, mlflow_server_fixture  # noqa: E402, F401

from selfflow.training.steplog import LogWindow  # noqa: E402
from selfflow.training.tracking import (  # noqa: E402
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATION_NOTE,
    Tracker,
    TrackingConfig,
    TrackingWarning,
    flatten_config,
)

# SQLAlchemy 2.1 deprecates the `noload` loader that MLflow 3.17's own SQL models use; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

KEYS = ("train/loss", "train/lr", "train/grad_norm")


@dataclass
class Model:
    depth: int = 4
    widths: list[int] = field(default_factory=lambda: [64, 128])


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    seed: int = 0
    note: str = "x" * (MAX_PARAM_VALUE_LENGTH + 10)


def value(key: str, step: int) -> float:
    return KEYS.index(key) + 1.0 / (step + 1)


def log_steps(tracker: Tracker, steps: range) -> None:
    for step in steps:
        tracker.log_metrics({key: value(key, step) for key in KEYS}, step)


def assert_history(client: MlflowClient, run_id: str, steps: range) -> None:
    for key in KEYS:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(steps)
        assert [m.value for m in history] == [value(key, step) for step in steps]


@pytest.fixture(autouse=True)
def restore_environ():
    """The tracker sets MLflow's HTTP knobs in os.environ for the process; keep tests independent."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_flatten_config():
    flat = flatten_config({"run": Run(), "extra": {"a": None}})
    assert flat["run.model.depth"] == "4"
    assert flat["run.model.widths"] == "[64, 128]"
    assert flat["extra.a"] == "None"
    with pytest.raises(TypeError):
        flatten_config(3)


def test_server_params_metrics_artifact(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment="server", run_name="first")
    tracker = Tracker(cfg, tmp_path)
    assert tracker.run_id is not None
    params = {"model": {f"p{i}": i for i in range(150)}, "cfg": Run()}  # > 100: two log_batch calls
    tracker.log_params(params)
    log_steps(tracker, range(5))
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    tracker.log_artifact(tmp_path / "config.yaml", "configs")
    tracker.close()

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == tracker.run_id
    assert run.info.run_name == "first"
    assert run.info.status == "FINISHED"
    logged = run.data.params
    assert len(logged) == 150 + 4
    assert logged["model.p149"] == "149"
    assert logged["cfg.model.depth"] == "4"
    assert logged["cfg.model.widths"] == "[64, 128]"
    assert len(logged["cfg.note"]) == MAX_PARAM_VALUE_LENGTH and logged["cfg.note"].endswith(TRUNCATION_NOTE)
    assert_history(client, run.info.run_id, range(5))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "configs")] == ["configs/config.yaml"]
    local = client.download_artifacts(run.info.run_id, "configs/config.yaml", str(tmp_path / "download"))
    assert Path(local).read_text() == "seed: 0\n"


def test_server_resume_appends(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment="resume")
    first = Tracker(cfg, tmp_path)
    first.log_params({"lr": 1e-4, "steps": 3})
    log_steps(first, range(3))
    first.close("KILLED")  # the job was preempted

    client = MlflowClient(tracking_uri=mlflow_server)
    second = Tracker(cfg, tmp_path, run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with pytest.warns(TrackingWarning, match="steps"):  # the resumed job asks for more steps
        second.log_params({"lr": 1e-4, "steps": 6, "resumed": True})
    log_steps(second, range(3, 6))
    second.close()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.0001", "steps": "3", "resumed": "True"}
    assert_history(client, first.run_id, range(6))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_project_store_in_the_current_folder_with_source_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # neither config nor environment names a store
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "first"
    tracker = Tracker(TrackingConfig(), run_dir)
    tracker.log_params({"model": {"depth": 2}})
    log_steps(tracker, range(3))
    (tmp_path / "samples.txt").write_text("ok")
    tracker.log_artifact(tmp_path / "samples.txt")
    tracker.close()
    second = Tracker(TrackingConfig(), tmp_path / "runs" / "second")  # another run of the project: same store
    second.close()

    assert (tmp_path / "mlflow.db").is_file() and not (run_dir / "mlflow.db").exists()
    assert (tmp_path / "mlartifacts" / tracker.run_id / "artifacts" / "samples.txt").read_text() == "ok"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("selfflow")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == ["first", "second"]
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"model.depth": "2"}
    assert_history(client, tracker.run_id, range(3))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert run.data.tags["selfflow.git.dirty"] in ("true", "false")
    assert run.data.tags["selfflow.command"] == shlex.join(sys.argv)
    assert run.data.tags["selfflow.run_dir"] == str(run_dir.resolve())

    resumed = Tracker(TrackingConfig(), run_dir, run_id=tracker.run_id)
    log_steps(resumed, range(3, 4))
    resumed.close()
    assert_history(client, tracker.run_id, range(4))


def test_mlflow_environment_variables_are_honoured_and_config_wins(tmp_path, monkeypatch):
    env_store, config_store = f"sqlite:///{tmp_path / 'env.db'}", f"sqlite:///{tmp_path / 'config.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    Tracker(TrackingConfig(), tmp_path / "a").close()
    Tracker(TrackingConfig(tracking_uri=config_store, experiment="from-config"), tmp_path / "b").close()
    env_client, config_client = MlflowClient(tracking_uri=env_store), MlflowClient(tracking_uri=config_store)
    assert [r.info.run_name for r in env_client.search_runs([exp_id(env_client, "from-env")])] == ["a"]
    assert [r.info.run_name for r in config_client.search_runs([exp_id(config_client, "from-config")])] == ["b"]
    assert config_client.get_experiment_by_name("from-env") is None


def test_a_resumed_run_continues_in_the_store_it_recorded_unless_told_otherwise(tmp_path, monkeypatch):
    recorded = f"sqlite:///{tmp_path / 'recorded.db'}"
    first = Tracker(TrackingConfig(tracking_uri=recorded), tmp_path / "run")
    first.close()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # resumed from elsewhere: the recorded store, not ./mlflow.db
    again = Tracker(TrackingConfig(), tmp_path / "run", run_id=first.run_id, recorded_uri=recorded)
    assert (again.uri, again.run_id) == (recorded, first.run_id)
    again.close()
    assert not (tmp_path / "mlflow.db").exists()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.warns(TrackingWarning, match="a new run starts in"):
        cfg = TrackingConfig(tracking_uri=other)
        moved = Tracker(cfg, tmp_path / "run", run_id=first.run_id, recorded_uri=recorded)
    assert moved.uri == other and moved.run_id not in (None, first.run_id)
    moved.close()


def exp_id(client: MlflowClient, name: str) -> str:
    return client.get_experiment_by_name(name).experiment_id


def test_log_window_averages_each_metric_over_the_steps_that_had_it():
    window = LogWindow()
    window.add({"loss": 1.0, "loss/image": 1.0, "lr": 1e-4, "skipped": 0})
    window.add({"loss": 3.0, "loss/audio": 3.0, "lr": 2e-4, "skipped": 0})
    window.add({"loss": float("nan"), "loss/image": float("nan"), "lr": 3e-4, "skipped": 1})  # a skipped step
    window.add({"loss": 5.0, "loss/image": 2.0, "lr": 4e-4, "skipped": 1})
    assert window.flush() == {"loss": 3.0, "loss/image": 1.5, "loss/audio": 3.0, "lr": 4e-4, "skipped": 1}
    window.add({"loss": 7.0})
    assert window.flush() == {"loss": 7.0}  # a new window


def test_unreachable_server_warns_once_and_is_noop(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own setting is kept
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.warns(TrackingWarning, match="could not start tracking") as record:
        tracker = Tracker(cfg, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any further warning (or exception) fails the test
        tracker.log_params({"a": 1})
        log_steps(tracker, range(3))
        tracker.log_artifact(tmp_path / "missing.txt")
        tracker.close()
    # A guard against MLflow's default retries (minutes), not a speed target.
    assert time.monotonic() - start < 30
    [warning] = [w for w in record if issubclass(w.category, TrackingWarning)]
    assert warning.filename == __file__  # stacklevel points at the caller, not at tracking.py
    assert tracker.run_id is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_other_ranks_do_nothing(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment="rank1")
    tracker = Tracker(cfg, tmp_path, rank=1)
    assert tracker.run_id is None
    tracker.log_params({"a": 1})
    log_steps(tracker, range(2))
    tracker.close()
    assert MlflowClient(tracking_uri=mlflow_server).get_experiment_by_name("rank1") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_disabled_and_later_failure(mlflow_server, tmp_path):
    assert Tracker(TrackingConfig(enabled=False), tmp_path).run_id is None
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment="later"), tmp_path)
    with pytest.warns(TrackingWarning, match="log_artifact"):
        tracker.log_artifact(tmp_path / "missing.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_steps(tracker, range(2))  # off after the first failure: no second warning
        tracker.close()
