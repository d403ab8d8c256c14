"""Shared test settings: a non-interactive plotting backend, the shared CIFAR-10 subset's location, one thread."""
from pathlib import Path

import matplotlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

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


@pytest.fixture(scope="module")
def tiny():
    """16 train / 16 test digits at 32x32 (the paper's CIFAR size; ViTs need it): two batches of 8."""
    from kdutils.data import load_dataset
    ds = load_dataset("digits")

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:16].float(), size=(32, 32), mode="bilinear").round().to(torch.uint8)

    return dataclasses.replace(ds, x_train=up(ds.x_train), y_train=ds.y_train[:16], x_test=up(ds.x_test),
                               y_test=ds.y_test[:16])
