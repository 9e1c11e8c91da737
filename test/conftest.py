"""Shared fixtures. Real sensor data lives in ../shared/data and is never copied here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it is not shipped; see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def nuscenes_dir() -> Path:
    return _shared("nuscenes_keyframe")


@pytest.fixture(scope="session")
def semantickitti_dir() -> Path:
    return _shared("semantickitti")


@pytest.fixture(scope="session")
def modelnet_dir() -> Path:
    return _shared("modelnet")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for modules of tiny clouds: threads only add spin-waiting there, and
    on a busy 2-core machine they made runs 3-50x slower. Results are the same either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
