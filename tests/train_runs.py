"""Helpers for tests that run `selfflow train` as users do (a subprocess, torchrun for several ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
TRACE_KEYS = ("loss", "fm", "rep", "grad_norm", "lr")


def torchrun_command(nproc: int) -> list[str]:
    """`torchrun --nproc-per-node nproc` with this interpreter and a free port on loopback."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
    ]


def torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun_command(nproc) ARGS` run in the repository, output captured."""
    return subprocess.run(
        [*torchrun_command(nproc), *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
    )


def launch(
    nproc: int, run_dir: Path, *overrides: str, check: bool = True, config: Path = TINY
) -> subprocess.CompletedProcess:
    """`selfflow train` on a preset (the tiny one by default), with torchrun for several processes."""
    cli = ["-m", "selfflow.cli", "train", "--config", str(config), f"run_dir={run_dir}", *overrides]
    if nproc > 1:
        cmd = [*torchrun_command(nproc), *cli]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def launch_two_nodes(run_dir: Path, *overrides: str, config: Path = TINY) -> list[subprocess.CompletedProcess]:
    """`selfflow train` as two torchrun "nodes" of one process each on this machine: `--nnodes 2
    --node-rank 0/1` with a static rendezvous on 127.0.0.1 (gloo), as a two-node SLURM job launches it
    with real hostnames. Both are started together and waited for."""
    port = free_port()
    cli = ["-m", "selfflow.cli", "train", "--config", str(config), f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    procs = []
    for node in (0, 1):
        node_args = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
        node_args += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd = [sys.executable, "-m", "torch.distributed.run", *node_args, *cli]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(cmd, **pipes, text=True, env=env, cwd=REPO))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for node, proc in enumerate(done):
        if proc.returncode != 0:
            raise AssertionError(f"node {node} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trace(rows: list[dict]) -> list[tuple]:
    return [
        (r["step"], *(r[k] for k in TRACE_KEYS), *sorted((k, v) for k, v in r.items() if k.startswith("loss/")))
        for r in rows
    ]
