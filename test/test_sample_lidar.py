"""The sample drive's rotating 32-beam LiDAR: layout, geometry, motion, noise, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.sample import scene as scene_module
from clip2scene_ros.sample.lidar import (
    HDL32E,
    HDL32E_ELEVATIONS_DEG,
    LABEL_DTYPE,
    VELODYNE_DTYPE,
    LidarModel,
    scan,
)
from clip2scene_ros.sample.scene import (
    BUILDING,
    NUM_LABELS,
    ROAD,
    TRAFFIC_SIGN,
    EgoPath,
    Shape,
    build_scene,
)
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

MOUNT = np.eye(4)
MOUNT[:3, 3] = (1.2, 0.0, 1.9)
FAST = LidarModel(azimuth_steps=600)


@pytest.fixture(scope="module")
def scene():
    return build_scene(0)


def xyz(cloud: np.ndarray) -> np.ndarray:
    return np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)


def test_velodyne_point_layout() -> None:
    """x, y, z, intensity float32, ring uint16, time float32, packed into 22 bytes."""
    fields = {name: (VELODYNE_DTYPE.fields[name][0].str, VELODYNE_DTYPE.fields[name][1])
              for name in VELODYNE_DTYPE.names}  # fmt: skip
    assert list(VELODYNE_DTYPE.names) == ["x", "y", "z", "intensity", "ring", "time"]
    assert fields == {"x": ("<f4", 0), "y": ("<f4", 4), "z": ("<f4", 8),
                      "intensity": ("<f4", 12), "ring": ("<u2", 16), "time": ("<f4", 18)}
    assert VELODYNE_DTYPE.itemsize == 22
    assert LABEL_DTYPE.names == ("label",) and LABEL_DTYPE.itemsize == 2


def test_hdl32e_lasers() -> None:
    elevations = np.asarray(HDL32E_ELEVATIONS_DEG)
    assert len(elevations) == 32
    assert elevations.min() == pytest.approx(-30.67) and elevations.max() == pytest.approx(10.67)
    np.testing.assert_allclose(np.diff(np.sort(elevations)), 4 / 3, atol=0.01)
    # ring = rank by elevation, as the velodyne driver numbers them
    np.testing.assert_array_equal(np.sort(elevations)[HDL32E.rings], elevations)


def test_scan_geometry_is_exact_without_noise(scene) -> None:
    sweep = scan(scene, EgoPath(), stamp_s=0.55, model=FAST, extrinsic=MOUNT)
    cloud = sweep.cloud
    assert cloud.dtype == VELODYNE_DTYPE and sweep.labels.dtype == np.uint16
    assert len(cloud) == len(sweep.labels) > 0.7 * 32 * FAST.azimuth_steps * 0.5
    p = xyz(cloud)
    rng = np.linalg.norm(p, axis=1)
    assert rng.min() >= FAST.min_range and rng.max() <= FAST.max_range
    # Each point lies on its laser's cone...
    elevation = np.rad2deg(np.arcsin(p[:, 2] / rng))
    ring_elevation = np.sort(HDL32E_ELEVATIONS_DEG)[cloud["ring"]]
    np.testing.assert_allclose(elevation, ring_elevation, atol=1e-3)
    # ...at the azimuth of its firing time: clockwise from the back, forward at the stamp.
    t = cloud["time"].astype(np.float64)
    assert t.min() >= -0.05 - 1e-7 and t.max() < 0.05  # float32 times
    assert np.all(np.diff(t) >= -4e-5)  # firing by firing (lasers 1.152 µs apart)
    column = np.round((t + 0.05) * FAST.rate_hz * FAST.azimuth_steps)
    yaw = np.pi - 2 * np.pi * column / FAST.azimuth_steps
    error = np.angle(np.exp(1j * (np.arctan2(p[:, 1], p[:, 0]) - yaw)))
    assert np.abs(error).max() < 1e-4


def test_points_are_in_the_sensor_frame_at_their_own_time(scene) -> None:
    """Undoing the motion with the pose at each point's time puts every building point back
    on a building's surface; using the stamp's pose for all of them does not."""
    path = EgoPath()
    stamp = 1.25
    sweep = scan(scene, path, stamp_s=stamp, model=FAST, extrinsic=MOUNT)
    keep = sweep.labels == BUILDING
    p = xyz(sweep.cloud[keep])
    t = stamp + sweep.cloud["time"][keep].astype(np.float64)
    boxes = np.flatnonzero((scene.label == BUILDING) & (scene.shape == Shape.BOX))
    lo = scene.center[boxes] - scene.half[boxes]
    hi = scene.center[boxes] + scene.half[boxes]

    def off_surface(world: np.ndarray) -> np.ndarray:
        inside = np.clip(world[:, None], lo[None], hi[None])
        gap = np.linalg.norm(world[:, None] - inside, axis=2)  # 0 inside a box
        depth = np.minimum(world[:, None] - lo[None], hi[None] - world[:, None]).min(axis=2)
        return np.min(np.where(gap > 0, gap, np.maximum(depth, 0)), axis=1)

    poses = path(t) @ MOUNT
    world = np.einsum("nij,nj->ni", poses[:, :3, :3], p) + poses[:, :3, 3]
    assert np.quantile(off_surface(world), 0.999) < 2e-3
    still = path(stamp) @ MOUNT
    wrong = p @ still[:3, :3].T + still[:3, 3]
    assert np.mean(off_surface(wrong) > 0.05) > 0.05


def test_noise_dropouts_and_determinism(scene) -> None:
    path = EgoPath()
    clean = scan(scene, path, stamp_s=0.35, model=FAST, extrinsic=MOUNT)
    a = scan(scene, path, stamp_s=0.35, model=FAST, extrinsic=MOUNT,
             rng=np.random.default_rng(7))  # fmt: skip
    b = scan(scene, path, stamp_s=0.35, model=FAST, extrinsic=MOUNT,
             rng=np.random.default_rng(7))  # fmt: skip
    c = scan(scene, path, stamp_s=0.35, model=FAST, extrinsic=MOUNT,
             rng=np.random.default_rng(8))  # fmt: skip
    assert a.cloud.tobytes() == b.cloud.tobytes() and np.array_equal(a.labels, b.labels)
    assert a.cloud.tobytes() != c.cloud.tobytes()
    # Join noisy and clean returns of the same ray (ring, time) to measure the range noise.
    key = lambda s: s.cloud["ring"].astype(np.int64) * 10**9 + np.round(  # noqa: E731
        (s.cloud["time"] + 0.05) * 1e8).astype(np.int64)
    common, ia, ic = np.intersect1d(key(a), key(clean), return_indices=True)
    assert len(common) > 0.8 * len(clean.cloud)
    diff = np.linalg.norm(xyz(a.cloud[ia]), axis=1) - np.linalg.norm(xyz(clean.cloud[ic]), axis=1)
    assert 0.01 < np.std(diff) < 0.02 and abs(np.mean(diff)) < 0.002
    np.testing.assert_array_equal(a.labels[ia], clean.labels[ic])
    # Random dropouts thin the cloud by their rate.
    lossy = LidarModel(azimuth_steps=600, random_dropout=0.3)
    d = scan(scene, path, stamp_s=0.35, model=lossy, extrinsic=MOUNT, rng=np.random.default_rng(7))
    assert len(d.cloud) / len(a.cloud) == pytest.approx(0.7 / 0.99, abs=0.02)


def test_intensity_follows_reflectivity(scene) -> None:
    sweep = scan(scene, EgoPath(), stamp_s=0.05, model=FAST, extrinsic=MOUNT,
                 rng=np.random.default_rng(0))  # fmt: skip
    intensity = sweep.cloud["intensity"]
    assert intensity.min() >= 0 and intensity.max() <= 255
    np.testing.assert_array_equal(intensity, np.round(intensity))
    # Retro-reflective signs are far brighter than asphalt.
    assert intensity[sweep.labels == TRAFFIC_SIGN].mean() > 3 * np.median(
        intensity[sweep.labels == ROAD])


def test_every_class_of_the_vocabulary_appears(scene) -> None:
    vocabulary = load_vocabulary(builtin_vocabulary("sample_drive"))
    ids = sorted(i for c in vocabulary.classes for i in c.ids)
    assert ids == list(range(1, NUM_LABELS))
    sweep = scan(scene, EgoPath(), stamp_s=0.05, extrinsic=MOUNT, rng=np.random.default_rng(0))
    present = set(np.unique(sweep.labels).tolist())
    assert set(ids) <= present, f"missing {set(ids) - present}"
    assert present <= {0, *ids}


def test_the_label_constants_are_the_vocabulary_ids() -> None:
    """Each label constant of the scene is the ``ids`` entry of its class in the vocabulary."""
    vocabulary = load_vocabulary(builtin_vocabulary("sample_drive"))
    assert scene_module.UNLABELLED == 0 and vocabulary.ignore_ids == (0,)
    for cls in vocabulary.classes:
        assert cls.ids == (getattr(scene_module, cls.name.upper().replace(" ", "_")),), cls.name
    assert max(i for c in vocabulary.classes for i in c.ids) + 1 == scene_module.NUM_LABELS


def test_a_parked_vehicle_sees_the_same_from_a_fixed_pose(scene) -> None:
    pose = EgoPath()(0.0)
    moving = scan(scene, lambda t: np.broadcast_to(pose, (*np.shape(t), 4, 4)), model=FAST)
    fixed = scan(scene, pose, model=FAST)
    assert moving.cloud.tobytes() == fixed.cloud.tobytes()


def test_bad_arguments_are_refused(scene) -> None:
    with pytest.raises(ValueError, match="azimuth_steps"):
        LidarModel(azimuth_steps=3)
    with pytest.raises(ValueError, match="min_range"):
        LidarModel(min_range=5, max_range=2)
    with pytest.raises(ValueError, match="pose"):
        scan(scene, np.eye(3), model=FAST)
    with pytest.raises(ValueError, match="extrinsic"):
        scan(scene, np.eye(4), model=FAST, extrinsic=np.eye(3))
