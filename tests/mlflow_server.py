"""A real `mlflow server` on 127.0.0.1 for tests, as a pytest fixture.

Import it into a test module (pytest puts `tests/`, which has no `__init__.py`, on sys.path):

    from mlflow_server import mlflow_server_fixture  # noqa: F401

    def test_something(mlflow_server):  # the tracking URI, e.g. "http://127.0.0.1:40123"
        client = MlflowClient(tracking_uri=mlflow_server)

The server uses a SQLite backend and proxied artifacts, both in a temporary folder, one worker,
no job runner and no telemetry; it is started once per test module and stopped (its whole process group)
afterwards.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A port the OS just reported free; another process could take it before the server does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (uvicorn runs worker children), SIGKILL after 10 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# Requested as `mlflow_server`; the function has another name so that ruff's F811 does not flag
# every test that takes the fixture as redefining the imported name.
@pytest.fixture(scope="module", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory):
    """Start `mlflow server`, wait for GET /health, yield its URI, stop it."""
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.is_file():
        pytest.skip(f"no mlflow executable beside {sys.executable}")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(mlflow), "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
    ]  # fmt: skip
    # No job runner: tracking tests need none, it costs a huey process and leaves a folder in /dev/shm.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("w+")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    try:
        while not _healthy(uri):
            if server.poll() is not None or time.monotonic() - start > STARTUP_TIMEOUT_S:
                state = f"exited with code {server.returncode}" if server.poll() is not None else "timed out"
                log.seek(0)
                raise RuntimeError(f"mlflow server at {uri} never became healthy ({state}); its output:\n{log.read()}")
            time.sleep(0.2)
        print(f"mlflow server at {uri} healthy after {time.monotonic() - start:.1f} s")
        yield uri
    finally:
        _stop(server)
        log.close()
