"""Shared fixtures. Real sensor data lives in ../shared/data and is never copied here."""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session", autouse=True)
def _text_bank_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Text banks cache into a folder of this run (child processes inherit it), never into the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIP2SCENE_CACHE", str(tmp_path_factory.mktemp("clip2scene_cache")))
        yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for modules of tiny clouds: threads only add spin-waiting there, and
    on a busy 2-core machine they made runs 3-50x slower. Results are the same either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ros(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An rclpy context on a ROS domain of the test module's own (60-99), so modules run at the
    same time (by hand, or by two people on one host) never see each other's nodes."""
    if importlib.util.find_spec("rclpy") is None:
        pytest.skip("rclpy (ROS 2 wheels) is not installed")
    import rclpy

    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=60 + zlib.crc32(request.module.__name__.encode()) % 40)
    yield context
    rclpy.shutdown(context=context)


def copy_bag_without(source: Path, target: Path, topic: str) -> Path:
    """A copy of a rosbag2 folder (as mcap) without one topic, e.g. a drive without its ground
    truth, the way most real recordings come."""
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    with Reader(source) as reader, \
            Writer(target, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        kept = [c for c in reader.connections if c.topic != topic]
        assert len(kept) == len(reader.connections) - 1, f"{source} has no topic {topic}"
        out = {c.id: writer.add_connection(
            c.topic, c.msgtype, msgdef=c.msgdef.data, rihs01=c.digest,
            serialization_format=c.ext.serialization_format,
            offered_qos_profiles=c.ext.offered_qos_profiles) for c in kept}
        for conn, stamp, raw in reader.messages(connections=kept):
            writer.write(out[conn.id], stamp, raw)
    return target


@pytest.fixture(scope="session")
def bag_without() -> Any:
    """``bag_without(source, target, topic)``: :func:`copy_bag_without` as a fixture."""
    return copy_bag_without
