"""Nearest-stamp matching within a slop: the vectorised form and the incremental synchroniser."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.bag.sync import ApproximateTimeSync, match_nearest
from clip2scene_ros.errors import ConfigError


def test_match_nearest_unsorted_with_slop_and_ties() -> None:
    ref = [100, 200, 300, 400]
    cand = [305, 95, 190, 250, 650]  # unsorted; 250 is equidistant from 200 and 300
    m = match_nearest(ref, cand, slop_ns=20)
    np.testing.assert_array_equal(m.nearest, [1, 2, 0, 0])
    np.testing.assert_array_equal(m.offset_ns, [-5, -10, 5, -95])
    np.testing.assert_array_equal(m.index, [1, 2, 0, -1])  # 400: nearest is 95 ns away
    np.testing.assert_array_equal(m.matched, [True, True, True, False])
    tie = match_nearest([200], [250, 150], slop_ns=100)
    assert tie.index[0] == 1  # a tie goes to the earlier stamp


def test_match_nearest_no_candidates_and_bad_slop() -> None:
    m = match_nearest([1, 2], [], slop_ns=5)
    np.testing.assert_array_equal(m.index, [-1, -1])
    assert np.isnan(m.offset_ns).all()
    with pytest.raises(ConfigError, match="slop") as info:
        match_nearest([1], [1], slop_ns=-1)
    assert info.value.key == "slop_ns"


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"slop_ns": -1}, "slop_ns"), ({"queue_size": 0}, "queue_size"),
    ({"keys": ("front", "front")}, "keys")])
def test_synchroniser_settings_are_config_errors_naming_the_setting(kwargs: dict[str, object],
                                                                    key: str) -> None:
    settings: dict[str, object] = {"keys": ("front",), "slop_ns": 10, **kwargs}
    with pytest.raises(ConfigError) as info:
        ApproximateTimeSync(**settings)  # type: ignore[arg-type]
    assert info.value.key == key


def test_incremental_sync_waits_for_the_nearest() -> None:
    sync: ApproximateTimeSync[str] = ApproximateTimeSync(["front", "back"], slop_ns=30)
    assert sync.add("front", 90, "f90") == []
    assert sync.add_reference(100, "L100") == []  # back has not reached 100 yet
    assert sync.add("back", 95, "b95") == []  # still not decided: 96..105 may come
    out = sync.add("back", 104, "b104")
    assert len(out) == 0  # front has nothing at or after 100 yet
    out = sync.add("front", 108, "f108")
    assert len(out) == 1
    s = out[0]
    assert s.stamp_ns == 100 and s.reference == "L100"
    assert s.matches == {"front": (108, "f108"), "back": (104, "b104")}
    assert s.missing == ()


def test_incremental_sync_missing_camera_timeout_and_flush() -> None:
    sync: ApproximateTimeSync[str] = ApproximateTimeSync(
        ["front", "dead"], slop_ns=10, timeout_ns=50, queue_size=2
    )
    sync.add("front", 200, "f200")
    assert sync.add_reference(200, "L200", now_ns=1000) == []
    assert sync.poll(1049) == []
    out = sync.poll(1050)  # the dead camera never came: LiDAR + front only
    assert [(s.reference, s.matches, s.missing) for s in out] == [
        ("L200", {"front": (200, "f200")}, ("dead",))
    ]
    # Far camera message: outside the slop, so missing rather than matched.
    sync.add("front", 400, "f400")
    sync.add_reference(300, "L300")
    sync.add_reference(310, "L310")
    sync.add_reference(320, "L320")  # queue_size 2: L300 dropped
    assert sync.dropped == 1
    flushed = sync.flush()
    assert [s.reference for s in flushed] == ["L310", "L320"]
    assert all(s.matches == {} and s.missing == ("front", "dead") for s in flushed)
    with pytest.raises(KeyError, match="unknown sync key 'side'"):
        sync.add("side", 1, "x")


def test_incremental_sync_camera_serves_two_sweeps() -> None:
    sync: ApproximateTimeSync[str] = ApproximateTimeSync(["cam"], slop_ns=40)
    sync.add_reference(100, "L100")
    sync.add_reference(150, "L150")
    out = sync.add("cam", 130, "c130")  # nearest to both sweeps; decides L100 only
    assert [(s.reference, s.matches["cam"][1]) for s in out] == [("L100", "c130")]
    out = sync.add("cam", 210, "c210")
    assert [(s.reference, s.matches["cam"][1]) for s in out] == [("L150", "c130")]
