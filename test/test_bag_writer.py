"""BagWriter: connections on first use, one type per topic, latched /tf_static, no overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability, QosReliability

from clip2scene_ros.bag.writer import BagWriter
from clip2scene_ros.codecs.messages import make_header, rosbags_factory
from clip2scene_ros.errors import ConfigError


def _tf(stamp: int) -> object:
    f = rosbags_factory()
    ts = f("geometry_msgs/msg/TransformStamped")(
        header=make_header(f, stamp, "base_link"),
        child_frame_id="lidar",
        transform=f("geometry_msgs/msg/Transform")(
            translation=f("geometry_msgs/msg/Vector3")(x=1.0, y=2.0, z=3.0),
            rotation=f("geometry_msgs/msg/Quaternion")(x=0.0, y=0.0, z=0.0, w=1.0),
        ),
    )
    return f("tf2_msgs/msg/TFMessage")(transforms=[ts])


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_write_and_read_back(tmp_path: Path, storage: str) -> None:
    f = rosbags_factory()
    path = tmp_path / "bag"
    with BagWriter(path, storage=storage) as bag:
        bag.write("/tf_static", _tf(5), 5)
        for i in range(3):
            bag.write("/tf", _tf(10 + i), 10 + i)
        bag.write("/hello", f("std_msgs/msg/String")(data="hi"), 20)
        assert bag.counts == {"/tf_static": 1, "/tf": 3, "/hello": 1}
    with AnyReader([path]) as reader:
        conns = {c.topic: c for c in reader.connections}
        assert {t: c.msgcount for t, c in conns.items()} == {"/tf_static": 1, "/tf": 3, "/hello": 1}
        latched = conns["/tf_static"].ext.offered_qos_profiles
        assert len(latched) == 1
        assert latched[0].durability == QosDurability.TRANSIENT_LOCAL
        assert latched[0].reliability == QosReliability.RELIABLE and latched[0].depth == 1
        assert conns["/tf"].ext.offered_qos_profiles == []
        msgs = [(c.topic, t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages()]
    assert [(t, s) for t, s, _ in msgs] == [("/tf_static", 5), ("/tf", 10), ("/tf", 11),
                                            ("/tf", 12), ("/hello", 20)]
    assert msgs[-1][2].data == "hi"
    assert msgs[0][2].transforms[0].transform.translation.z == 3.0
    text = (path / "metadata.yaml").read_text()
    assert f"storage_identifier: {storage}" in text and "version: 8" in text


def test_refuses_bad_use(tmp_path: Path) -> None:
    f = rosbags_factory()
    path = tmp_path / "bag"
    with BagWriter(path) as bag:
        bag.write("/x", f("std_msgs/msg/String")(data="a"), 1)
        with pytest.raises(ValueError, match=r"'/x' carries std_msgs/msg/String; cannot also"):
            bag.write("/x", _tf(2), 2)
        with pytest.raises(TypeError, match="BagWriter takes rosbags messages"):
            bag.write("/y", {"data": "a"}, 3)
        with pytest.raises(ValueError, match=">= 0"):
            bag.write("/x", f("std_msgs/msg/String")(data="a"), -1)
    with pytest.raises(FileExistsError, match="never overwritten"):
        BagWriter(path).open()
    with pytest.raises(ConfigError, match="storage must be one of") as info:
        BagWriter(tmp_path / "b2", storage="bag")  # type: ignore[arg-type]
    assert info.value.key == "storage"
    with pytest.raises(RuntimeError, match="not open"):
        BagWriter(tmp_path / "b3").write("/x", f("std_msgs/msg/String")(data="a"), 1)
