"""Shared test settings: a non-interactive plotting backend and the shared CIFAR-10 subset's location."""
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_NPZ = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"


@pytest.fixture
def shared_npz() -> Path:
    """Path of the shared CIFAR-10 subset; skips the test when it is not beside the project."""
    if not SHARED_NPZ.exists():
        pytest.skip(f"{SHARED_NPZ} not found")
    return SHARED_NPZ
