"""Shared fixtures. Real sensor data lives in ../shared/data and is never copied here."""

from __future__ import annotations

from pathlib import Path

import pytest

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
