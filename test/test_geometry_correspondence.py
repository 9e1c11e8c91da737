"""Point–pixel pairs: the nuScenes figures, bounds, occlusion, frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_ros.frame import CameraView, Frame
from clip2scene_ros.geometry.camera_model import CameraModel, RegionOfInterest
from clip2scene_ros.geometry.correspondence import (
    PointPixelPairs,
    frame_pairs,
    point_pixel_pairs,
)

NUSCENES_COUNTS = {
    "CAM_FRONT": 3067,
    "CAM_FRONT_RIGHT": 3079,
    "CAM_FRONT_LEFT": 3704,
    "CAM_BACK": 4826,
    "CAM_BACK_LEFT": 4097,
    "CAM_BACK_RIGHT": 3379,
}


def load_nuscenes(directory: Path) -> tuple[np.ndarray, list[str], list]:
    calib = json.loads((directory / "calib_and_boxes.json").read_text())
    (scan,) = directory.glob("*LIDAR_TOP*.pcd.bin")
    xyz = np.fromfile(scan, dtype=np.float32).reshape(-1, 5)[:, :3]
    names = list(calib["cameras"])
    cameras = [
        (
            CameraModel(1600, 900, np.array(calib["cameras"][n]["cam2img"])),
            np.array(calib["cameras"][n]["lidar2cam"], dtype=np.float64),
        )
        for n in names
    ]
    return xyz, names, cameras


def test_nuscenes_keyframe_figures(nuscenes_dir: Path) -> None:
    xyz, names, cameras = load_nuscenes(nuscenes_dir)
    assert xyz.shape == (34688, 3)
    pairs = point_pixel_pairs(xyz, cameras, min_depth=1.0)
    assert pairs.num_pairs == 22152
    assert pairs.distinct_points().size == 20206
    counts = dict(zip(names, pairs.count_per_camera(len(cameras)).tolist(), strict=True))
    assert counts == NUSCENES_COUNTS
    # Invariants of every pair.
    np.testing.assert_array_equal(pairs.pixel, np.floor(pairs.uv).astype(np.int32))
    assert (pairs.pixel >= 0).all() and (pairs.pixel[:, 0] < 1600).all()
    assert (pairs.pixel[:, 1] < 900).all() and (pairs.depth > 1.0).all()
    # Float64 input gives the same pairs (the work is float64 either way).
    again = point_pixel_pairs(xyz.astype(np.float64), cameras)
    np.testing.assert_array_equal(again.point_index, pairs.point_index)
    np.testing.assert_array_equal(again.pixel, pairs.pixel)
    # Occlusion can only remove pairs.
    occluded = point_pixel_pairs(xyz, cameras, occlusion=True, occlusion_radius=2)
    assert 0 < occluded.num_pairs < pairs.num_pairs
    assert np.isin(occluded.point_index, pairs.point_index).all()


def small_camera(**kwargs) -> CameraModel:
    K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]])
    return CameraModel(100, 100, K, **kwargs)


def test_bounds_are_half_open_and_depth_strict() -> None:
    # (X, Y, Z) chosen so u, v land exactly on 0, 99.5 and 100 (fx = 100, cx = 50).
    xyz = np.array(
        [
            [-1.0, -1.0, 2.0],  # u = v = 0: kept (pixel 0, 0)
            [0.995, 0.995, 2.0],  # u = v = 99.75: kept (pixel 99, 99)
            [1.0, 0.0, 2.0],  # u = 100: outside
            [0.0, 0.0, 1.0],  # depth == min_depth: excluded
            [0.0, 0.0, -2.0],  # behind
            [0.0, 1.0, 2.0],  # v = 100: outside
        ]
    )
    pairs = point_pixel_pairs(xyz, [(small_camera(), np.eye(4))], min_depth=1.0)
    np.testing.assert_array_equal(pairs.point_index, [0, 1])
    np.testing.assert_array_equal(pairs.pixel, [[0, 0], [99, 99]])
    np.testing.assert_allclose(pairs.uv, [[0.0, 0.0], [99.75, 99.75]])
    np.testing.assert_allclose(pairs.depth, [2.0, 2.0])
    assert pairs.uv.dtype == np.float32 and pairs.pixel.dtype == np.int32
    assert pairs.point_index.dtype == np.int64 and pairs.camera_index.dtype == np.int32


def test_bounds_use_the_published_image() -> None:
    # ROI 40x30 at (10, 20), binning 2 -> published 20x15. Full-res u = 20 + 2 k.
    camera = small_camera(roi=RegionOfInterest(10, 20, 40, 30), binning_x=2, binning_y=2)
    u_full = np.array([9.0, 10.0, 49.0, 50.0])  # published u = -0.5, 0, 19.5, 20
    x = (u_full - 50.0) / 100.0 * 5.0
    xyz = np.stack([x, np.full(4, (30.0 - 50) / 100 * 5), np.full(4, 5.0)], 1)
    pairs = point_pixel_pairs(xyz, [(camera, np.eye(4))])
    np.testing.assert_array_equal(pairs.point_index, [1, 2])
    np.testing.assert_array_equal(pairs.pixel, [[0, 5], [19, 5]])


def test_uv_float32_never_rounds_onto_the_next_pixel() -> None:
    # u = 99.999999 is inside pixel 99; float32 would round it to 100.0.
    xyz = np.array([[0.99999999 * 2.0 / 2.0, 0.0, 2.0]])
    pairs = point_pixel_pairs(xyz, [(small_camera(), np.eye(4))])
    assert pairs.pixel[0, 0] == 99
    assert pairs.uv[0, 0] < 100.0
    assert np.floor(pairs.uv[0, 0]) == 99


def test_multiple_cameras_and_extrinsics() -> None:
    # The second camera looks backwards (180 deg about y): lidar z -> -z, x -> -x.
    back = np.diag([-1.0, 1.0, -1.0, 1.0])
    xyz = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, -5.0], [0.2, 0.0, 4.0], [0.0, 0.0, 0.0]])
    pairs = point_pixel_pairs(xyz, [(small_camera(), np.eye(4)), (small_camera(), back)])
    np.testing.assert_array_equal(pairs.point_index, [0, 2, 1])
    np.testing.assert_array_equal(pairs.camera_index, [0, 0, 1])
    np.testing.assert_array_equal(pairs.count_per_camera(2), [2, 1])
    np.testing.assert_array_equal(pairs.count_per_camera(3), [2, 1, 0])
    np.testing.assert_array_equal(pairs.distinct_points(), [0, 1, 2])
    np.testing.assert_allclose(pairs.uv[1], [55.0, 50.0])
    with pytest.raises(ValueError, match="num_cameras"):
        pairs.count_per_camera(1)


def wall(depth: float, first: int, stop: int, step: int = 1) -> np.ndarray:
    """A fronto-parallel wall with one point through the centre of every ``step``-th pixel
    (col, row) in ``range(first, stop, step)``² of ``small_camera``."""
    centres = (np.arange(first, stop, step) + 0.5 - 50.0) / 100.0  # normalised x = (u - cx)/fx
    x, y = np.meshgrid(centres, centres)
    return np.stack([x.ravel() * depth, y.ravel() * depth, np.full(x.size, depth)], 1)


def test_occlusion_near_wall_hides_far_wall() -> None:
    near = wall(5.0, 30, 70)  # pixels 30..69
    far = wall(20.0, 20, 80)  # pixels 20..79: its rim is seen around the near wall
    xyz = np.concatenate([near, far])
    cams = [(small_camera(), np.eye(4))]
    assert point_pixel_pairs(xyz, cams).num_pairs == len(xyz)
    visible = point_pixel_pairs(xyz, cams, occlusion=True)
    is_far = visible.point_index >= len(near)
    assert (~is_far).sum() == len(near)  # every near point survives
    far_pixels = visible.pixel[is_far]
    behind_near = ((far_pixels >= 30) & (far_pixels < 70)).all(axis=1)
    assert not behind_near.any()
    assert is_far.sum() == 60 * 60 - 40 * 40  # the whole rim, nothing else


def test_occlusion_radius_closes_the_gaps_of_a_sparse_near_wall() -> None:
    # LiDAR is sparse in the image: the near wall occupies every other pixel only.
    near = wall(5.0, 30, 70, step=2)
    far = wall(20.0, 30, 70)
    xyz = np.concatenate([near, far])
    cams = [(small_camera(), np.eye(4))]
    per_pixel = point_pixel_pairs(xyz, cams, occlusion=True)
    # Radius 0: far points in the gaps (3 of every 4 pixels) shine through.
    assert (per_pixel.point_index >= len(near)).sum() == 40 * 40 - 20 * 20
    dilated = point_pixel_pairs(xyz, cams, occlusion=True, occlusion_radius=1)
    np.testing.assert_array_equal(dilated.point_index, np.arange(len(near)))


def test_occlusion_tolerance_keeps_the_same_surface() -> None:
    # Two points in the same pixel 0.3 m apart: the same surface under a 0.5 m tolerance.
    xyz = np.array([[0.0, 0.0, 10.0], [0.0, 0.0, 10.3], [0.0, 0.0, 12.0]])
    cams = [(small_camera(), np.eye(4))]
    kept = point_pixel_pairs(xyz, cams, occlusion=True, occlusion_tolerance=0.5)
    np.testing.assert_array_equal(kept.point_index, [0, 1])
    strict = point_pixel_pairs(xyz, cams, occlusion=True, occlusion_tolerance=0.1)
    np.testing.assert_array_equal(strict.point_index, [0])


def test_occlusion_radius_reaches_neighbouring_pixels() -> None:
    # A near point at pixel (50, 50) and a far point one pixel to the right, (51, 50).
    xyz = np.array([[0.005 * 5, 0.005 * 5, 5.0], [0.015 * 30, 0.005 * 30, 30.0]])
    cams = [(small_camera(), np.eye(4))]
    same_pixel_only = point_pixel_pairs(xyz, cams, occlusion=True)
    np.testing.assert_array_equal(same_pixel_only.pixel, [[50, 50], [51, 50]])
    with_radius = point_pixel_pairs(xyz, cams, occlusion=True, occlusion_radius=1)
    np.testing.assert_array_equal(with_radius.point_index, [0])


def test_occlusion_radius_does_not_wrap_across_rows() -> None:
    # Near point at the right edge (99, 10); far point at the left edge of the next row (0, 11).
    # Their linear keys are adjacent, but they are 99 pixels apart.
    xyz = np.array([[0.495 * 5, -0.395 * 5, 5.0], [-0.495 * 30, -0.385 * 30, 30.0]])
    cams = [(small_camera(), np.eye(4))]
    pairs = point_pixel_pairs(xyz, cams, occlusion=True, occlusion_radius=1)
    np.testing.assert_array_equal(pairs.pixel, [[99, 10], [0, 11]])


def test_empty_inputs() -> None:
    pairs = point_pixel_pairs(np.zeros((0, 3), np.float32), [(small_camera(), np.eye(4))])
    assert pairs.num_pairs == 0
    np.testing.assert_array_equal(pairs.count_per_camera(1), [0])
    none = point_pixel_pairs(np.ones((3, 3)), [])
    assert none.num_pairs == 0 and none.uv.shape == (0, 2)
    assert none.distinct_points().dtype == np.int64


def test_bad_inputs_raise_clear_errors() -> None:
    cams = [(small_camera(), np.eye(4))]
    with pytest.raises(ValueError, match=r"xyz must have shape"):
        point_pixel_pairs(np.zeros((3, 4)), cams)
    with pytest.raises(ValueError, match=r"cameras\[0\]"):
        point_pixel_pairs(np.zeros((3, 3)), [(small_camera(), np.eye(3))])
    with pytest.raises(ValueError, match=r"cameras\[1\]"):
        point_pixel_pairs(np.zeros((3, 3)), [cams[0], (np.eye(3), np.eye(4))])
    with pytest.raises(ValueError, match="occlusion_radius"):
        point_pixel_pairs(np.zeros((3, 3)), cams, occlusion=True, occlusion_radius=-1)
    with pytest.raises(ValueError, match=r"PointPixelPairs\.uv"):
        PointPixelPairs(
            np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros((1, 2)),
            np.zeros((1, 2), np.int32), np.zeros(1, np.float32),
        )  # fmt: skip


def make_view(name: str, camera: CameraModel, extrinsic: np.ndarray, shape=(100, 100, 3)):
    return CameraView(name, np.zeros(shape, np.uint8), camera, extrinsic, stamp_ns=0)


def test_frame_pairs_uses_the_frame_cameras() -> None:
    xyz = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, -5.0]], dtype=np.float32)
    back = np.diag([-1.0, 1.0, -1.0, 1.0])
    frame = Frame(
        stamp_ns=1,
        frame_id="lidar",
        xyz=xyz,
        cameras=(
            make_view("FRONT", small_camera(), np.eye(4)),
            make_view("BACK", small_camera(), back),
        ),
    )
    pairs = frame_pairs(frame, min_depth=2.0)
    np.testing.assert_array_equal(pairs.point_index, [0, 1])
    np.testing.assert_array_equal(pairs.camera_index, [0, 1])
    assert frame_pairs(frame, min_depth=6.0).num_pairs == 0
    assert frame_pairs(Frame(stamp_ns=1, frame_id="lidar", xyz=xyz)).num_pairs == 0


def test_frame_pairs_rejects_image_of_the_wrong_size() -> None:
    frame = Frame(
        stamp_ns=1,
        frame_id="lidar",
        xyz=np.zeros((1, 3), np.float32),
        cameras=(make_view("FRONT", small_camera(), np.eye(4), shape=(50, 100, 3)),),
    )
    with pytest.raises(ValueError, match="'FRONT'"):
        frame_pairs(frame)
