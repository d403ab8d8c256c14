"""Shared test settings: a non-interactive plotting backend, the shared CIFAR-10 subset's location, one thread."""
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_NPZ = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"


@pytest.fixture
def shared_npz() -> Path:
    """Path of the shared CIFAR-10 subset; skips the test when it is not beside the project."""
    if not SHARED_NPZ.exists():
        pytest.skip(f"{SHARED_NPZ} not found")
    return SHARED_NPZ


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("single_thread")`): on a busy
    2-core machine two OpenMP threads wait on each other's time slices and tiny models run 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
