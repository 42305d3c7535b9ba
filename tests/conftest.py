"""Shared test helpers: the reference fixture recorded from the public Self-Flow release."""

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
    return torch.load(path, map_location="cpu", weights_only=False)
