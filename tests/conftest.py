"""Shared test helpers: the reference fixture recorded from the public Self-Flow release."""

import argparse
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SELFFLOW_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def reference() -> dict:
    """`selfflow_reference.pt` (DESIGN.md section 9), read in place from ../shared/fixtures."""
    path = FIXTURES / "selfflow_reference.pt"
    if not path.is_file():
        raise FileNotFoundError(f"reference fixture missing: {path} (set SELFFLOW_FIXTURES to its folder)")
    with torch.serialization.safe_globals([argparse.Namespace]):  # the release's run config, beside tensors
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session", autouse=True)
def session_mlflow_store(tmp_path_factory):
    """Module- and session-scoped fixtures that train log here (the per-test store below is not set up yet)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch) -> str:
    """Every test's runs go to a store of its own (`$MLFLOW_TRACKING_URI`, which `selfflow train` honours
    and child processes inherit), never into the repository's project store `./mlflow.db`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return uri


# fp32 round-off, not a loose fit: the release's fp32 outputs (the fixture) and ours both lie within
# 4e-6 x max|value| of the float64 result (measured on an Intel Xeon with AVX-512: fixture 2.4e-6 to
# 3.8e-6, ours 2.1e-6 to 5.0e-6; 5.5e-6 apart at most), and are equal bit for bit only where the CPU's
# matmul kernels sum in the release machine's order (the AMD EPYC VMs of earlier sessions). A wrong
# modulation, norm or bias moves outputs by percents of their scale.
REL = 2e-5


def assert_release(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Our output equals the release's fixture output to fp32 round-off at the values' scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=REL * expected.abs().max().item())
