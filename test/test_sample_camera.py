"""The sample drive's cameras: lens model, rendering, and agreement with the LiDAR labels."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.geometry.camera_model import CameraModel, RegionOfInterest
from clip2scene_ros.geometry.projection import project_points
from clip2scene_ros.geometry.transforms import invert_transform
from clip2scene_ros.sample.camera import (
    SampleCamera,
    front_camera,
    left_camera,
    make_camera,
    render,
    undistort_normalized,
)
from clip2scene_ros.sample.lidar import LidarModel, scan
from clip2scene_ros.sample.scene import ROAD, UNLABELLED, EgoPath, build_scene

MOUNT = np.eye(4)
MOUNT[:3, 3] = (1.2, 0.0, 1.9)


@pytest.fixture(scope="module")
def scene():
    return build_scene(0)


def test_pixel_rays_project_back_to_their_pixel_centres() -> None:
    """Rendering undistorts with the same plumb_bob model the projection code distorts with."""
    for cam in (front_camera(160, 90), left_camera(120, 68)):
        assert cam.model.distortion_model == "plumb_bob" and np.all(cam.model.D[:4] != 0)
        uv, depth = project_points(cam.pixel_rays * 7.0, cam.model)
        w, h = cam.size
        v, u = np.divmod(np.arange(w * h), w)
        np.testing.assert_allclose(uv, np.c_[u + 0.5, v + 0.5], atol=1e-6)
        assert np.all(depth > 0)


def test_undistortion_rejects_a_lens_it_cannot_invert() -> None:
    model = CameraModel(width=64, height=48, K=[[20, 0, 32], [0, 20, 24], [0, 0, 1]],
                        D=[-2.5, 0, 0, 0, 0], distortion_model="plumb_bob")  # fmt: skip
    with pytest.raises(ValueError, match="too strong"):
        undistort_normalized(np.array([0.0]), np.array([0.0]), model)


def test_only_full_resolution_cameras() -> None:
    model = CameraModel(width=64, height=48, K=[[40, 0, 32], [0, 40, 24], [0, 0, 1]],
                        roi=RegionOfInterest(0, 0, 32, 24))  # fmt: skip
    with pytest.raises(ValueError, match="full-resolution"):
        SampleCamera("c", model, np.eye(4))
    with pytest.raises(ValueError, match="extrinsic"):
        SampleCamera("c", CameraModel(width=8, height=8, K=np.eye(3)), np.eye(3))


def test_render_looks_like_a_street(scene) -> None:
    cam = front_camera(160, 90)
    shot = render(scene, EgoPath()(0.05), cam, time_s=0.05)
    assert shot.rgb.shape == (90, 160, 3) and shot.rgb.dtype == np.uint8
    assert shot.labels.shape == (90, 160) and shot.depth.shape == (90, 160)
    # Sky above the street, road below the car's bonnet, buildings either side.
    assert shot.labels[0, 80] == UNLABELLED and np.isinf(shot.depth[0, 80])
    assert shot.labels[85, 80] == ROAD and 2 < shot.depth[85, 80] < 10
    sky, road = shot.rgb[0, 80].astype(int), shot.rgb[85, 80].astype(int)
    assert sky[2] > sky[0] and road.max() - road.min() < 25  # blue sky, grey asphalt
    assert len(np.unique(shot.labels)) >= 7
    # Texture noise: the road is not one flat colour.
    assert shot.rgb[60:, 40:120].std() > 3
    # Cast shadows darken the picture; without them it is brighter.
    flat = render(scene, EgoPath()(0.05), cam, time_s=0.05, shadows=False)
    assert flat.rgb.mean() > shot.rgb.mean() + 1
    np.testing.assert_array_equal(flat.labels, shot.labels)


def test_render_is_deterministic_and_noise_is_seeded(scene) -> None:
    cam = left_camera(120, 68)
    pose = EgoPath()(1.0)
    a = render(scene, pose, cam, time_s=1.0, rng=np.random.default_rng(1))
    b = render(scene, pose, cam, time_s=1.0, rng=np.random.default_rng(1))
    c = render(scene, pose, cam, time_s=1.0, rng=np.random.default_rng(2))
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert a.rgb.tobytes() != c.rgb.tobytes()
    np.testing.assert_array_equal(a.labels, c.labels)
    with pytest.raises(ValueError, match="pose"):
        render(scene, np.eye(3), cam)


def test_distortion_is_applied_when_rendering(scene) -> None:
    """A lens without distortion renders a different picture of the same scene."""
    kw = {"width": 160, "height": 90, "hfov_deg": 80.0, "position": (1.7, 0.0, 1.45),
          "yaw_deg": 0.0}  # fmt: skip
    straight = render(scene, EgoPath()(0.05), make_camera("c", **kw), time_s=0.05)
    curved = render(scene, EgoPath()(0.05), make_camera("c", distortion=(-0.2, 0.05, 0, 0, 0),
                                                        **kw), time_s=0.05)  # fmt: skip
    assert np.mean(straight.labels != curved.labels) > 0.02


@pytest.mark.parametrize("camera", [front_camera(320, 180), left_camera(240, 135)],
                         ids=["front", "left"])  # fmt: skip
def test_lidar_points_land_on_pixels_of_their_label(scene, camera) -> None:
    """>= 90 % of the in-view LiDAR points project onto a pixel of the same ground-truth label,
    using the shared camera projection, the static mounting and the ego poses."""
    path = EgoPath()
    lidar = LidarModel(azimuth_steps=900)
    stamp = 1.55
    sweep = scan(scene, path, stamp_s=stamp, model=lidar, extrinsic=MOUNT,
                 rng=np.random.default_rng(0))  # fmt: skip
    xyz = np.stack([sweep.cloud[k] for k in "xyz"], axis=1).astype(np.float64)
    poses = path(stamp + sweep.cloud["time"].astype(np.float64)) @ MOUNT
    world = np.einsum("nij,nj->ni", poses[:, :3, :3], xyz) + poses[:, :3, 3]
    t_cam = stamp + camera.time_offset_s
    shot = render(scene, path(t_cam), camera, time_s=t_cam)
    to_cam = invert_transform(path(t_cam) @ camera.extrinsic)
    uv, depth = project_points(world @ to_cam[:3, :3].T + to_cam[:3, 3], camera.model)
    w, h = camera.size
    seen = (depth > 1.0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    assert seen.sum() > 1000
    u, v = np.floor(uv[seen]).astype(int).T
    agree = shot.labels[v, u] == sweep.labels[seen]
    assert agree.mean() >= 0.9
    # Where they agree, the rendered depth matches the LiDAR's to centimetres (median).
    assert np.median(np.abs(shot.depth[v, u] - depth[seen])[agree]) < 0.05
