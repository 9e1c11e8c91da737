"""The sample drive's ray caster: exact shapes, moving primitives, terrain, and culling that
never changes a result (checked against testing every ray against every primitive)."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene_ros.sample.camera import SUN, make_camera
from clip2scene_ros.sample.lidar import LidarModel
from clip2scene_ros.sample.raycast import GROUND, MISS, nearest_hits, occluded, terrain_hits
from clip2scene_ros.sample.scene import (
    CAR,
    CURB_HEIGHT,
    ROAD,
    ROAD_HALF_WIDTH,
    SIDEWALK,
    SIDEWALK_OUTER,
    UNLABELLED,
    EgoPath,
    Scene,
    Shape,
    build_scene,
    surface,
)


def tiny_scene(*rows: tuple) -> Scene:
    """Scene from (shape, center, half, yaw, velocity) rows; every primitive labelled CAR."""
    n = len(rows)
    return Scene(
        seed=0, x_min=-50.0, x_max=50.0,
        shape=np.array([r[0] for r in rows], dtype=np.int8),
        center=np.array([r[1] for r in rows], dtype=np.float64).reshape(n, 3),
        half=np.array([r[2] for r in rows], dtype=np.float64).reshape(n, 3),
        yaw=np.array([r[3] for r in rows], dtype=np.float64),
        velocity=np.array([r[4] for r in rows], dtype=np.float64).reshape(n, 3),
        label=np.full(n, CAR, dtype=np.uint16),
        color=np.full((n, 3), 0.5, dtype=np.float32),
        reflectivity=np.full(n, 0.3, dtype=np.float32),
        texture=np.zeros(n, dtype=np.int8),
        param=np.zeros(n, dtype=np.float32),
        instance=np.arange(n, dtype=np.int32),
        crosswalks=np.zeros(0),
    )  # fmt: skip


def cast(scene: Scene, origin, direction, t: float = 0.0):
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    return nearest_hits(scene, np.array([origin], float), d[None], np.array([t]),
                        max_distance=200.0)  # fmt: skip


STILL = (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("row", "origin", "direction", "distance", "normal"),
    [
        ((Shape.BOX, (10, 0, 3), (1, 1, 1), 0.0, STILL), (0, 0, 3), (1, 0, 0), 9.0, (-1, 0, 0)),
        ((Shape.BOX, (10, 0, 3), (1, 1, 1), np.pi / 4, STILL), (0, 0, 3), (1, 0, 0),
         10 - np.sqrt(2), None),
        ((Shape.CYLINDER, (5, 0, 3), (0.5, 0.5, 1), 0.0, STILL), (0, 0, 3), (1, 0, 0), 4.5,
         (-1, 0, 0)),
        ((Shape.CYLINDER, (5, 0, 3), (0.5, 0.5, 1), 0.0, STILL), (5, 0, 9), (0, 0, -1), 5.0,
         (0, 0, 1)),
        ((Shape.WHEEL, (5, 0, 3), (0.3, 0.1, 0.3), 0.0, STILL), (0, 0, 3), (1, 0, 0), 4.7,
         (-1, 0, 0)),
        ((Shape.WHEEL, (5, 0, 3), (0.3, 0.1, 0.3), 0.0, STILL), (5, 3, 3), (0, -1, 0), 2.9,
         (0, 1, 0)),
        ((Shape.ELLIPSOID, (5, 0, 3), (1, 2, 0.5), 0.0, STILL), (0, 0, 3), (1, 0, 0), 4.0,
         (-1, 0, 0)),
        ((Shape.ELLIPSOID, (5, 0, 3), (1, 2, 0.5), 0.0, STILL), (5, 0, 10), (0, 0, -1), 6.5,
         (0, 0, 1)),
    ],
)  # fmt: skip
def test_exact_intersections(row, origin, direction, distance, normal) -> None:
    hits = cast(tiny_scene(row), origin, direction)
    assert hits.prim[0] == 0
    assert hits.distance[0] == pytest.approx(distance, abs=1e-4)
    if normal is not None:
        np.testing.assert_allclose(hits.normal[0], normal, atol=1e-6)


def test_moving_primitive_is_hit_where_it_is_at_the_ray_time() -> None:
    scene = tiny_scene((Shape.BOX, (10, 0, 3), (1, 1, 1), 0.0, (2.0, 0.0, 0.0)))
    assert cast(scene, (0, 0, 3), (1, 0, 0), t=0.0).distance[0] == pytest.approx(9.0, abs=1e-4)
    moved = cast(scene, (0, 0, 3), (1, 0, 0), t=1.5)
    assert moved.distance[0] == pytest.approx(12.0, abs=1e-4)
    # Texture coordinates stay on the object: the rest point is where it was at t = 0.
    np.testing.assert_allclose(moved.rest[0], (9.0, 0.0, 3.0), atol=1e-4)


def test_terrain_road_sidewalk_curb_and_sky() -> None:
    scene = tiny_scene((Shape.BOX, (100, 100, 1), (1, 1, 1), 0.0, STILL))
    down = cast(scene, (0, -2, 2), (0, 0, -1))
    assert down.prim[0] == GROUND and down.distance[0] == pytest.approx(2.0)
    walk = cast(scene, (0, -8, 2), (0, 0, -1))
    assert walk.distance[0] == pytest.approx(2.0 - CURB_HEIGHT)
    curb = cast(scene, (0, -2, 0.1), (0, -1, 0))
    assert curb.distance[0] == pytest.approx(ROAD_HALF_WIDTH - 2)
    np.testing.assert_allclose(curb.normal[0], (0, 1, 0))
    sky = cast(scene, (0, 0, 2), (0.3, 0, 1))
    assert sky.prim[0] == MISS and np.isinf(sky.distance[0]) and np.isnan(sky.point[0]).all()

    hits = nearest_hits(scene, np.array([[0, -2, 2], [0, -8, 2], [0, -2, 0.1], [0, -15, 2]], float),
                        np.array([[0, 0, -1], [0, 0, -1], [0, -1, 0], [0, 0, -1]], float),
                        np.zeros(4), max_distance=50.0)  # fmt: skip
    surf = surface(scene, hits.prim, hits.rest, hits.local, hits.local_normal)
    assert surf.label.tolist() == [ROAD, SIDEWALK, SIDEWALK, UNLABELLED]


def test_terrain_is_the_street_cross_section() -> None:
    rng = np.random.default_rng(3)
    origins = np.c_[rng.uniform(-20, 20, 500), rng.uniform(-14, 14, 500), rng.uniform(0.3, 3, 500)]
    d = rng.normal(size=(500, 3))
    d[:, 2] = -np.abs(d[:, 2])
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    dist, face = terrain_hits(origins, d, 1e6)
    p = origins + dist[:, None] * d
    ay = np.abs(p[:, 1])
    raised = (ay > ROAD_HALF_WIDTH + 1e-6) & (ay < SIDEWALK_OUTER - 1e-6)
    top = ~face
    np.testing.assert_allclose(p[top & raised, 2], CURB_HEIGHT, atol=1e-9)
    np.testing.assert_allclose(p[top & ~raised & (np.abs(ay - 8) > 2.1), 2], 0.0, atol=1e-9)
    # Curb faces sit at the sidewalk edges, between the two levels.
    edges = np.minimum(np.abs(ay[face] - ROAD_HALF_WIDTH), np.abs(ay[face] - SIDEWALK_OUTER))
    np.testing.assert_allclose(edges, 0.0, atol=1e-9)
    assert np.all((p[face, 2] >= 0) & (p[face, 2] <= CURB_HEIGHT))


def _street_rays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Camera, LiDAR and random rays through a street (a mix of bundle shapes)."""
    path = EgoPath()
    t = 0.7
    cam = make_camera("c", width=96, height=54, hfov_deg=80, position=(1.7, 0, 1.5), yaw_deg=20,
                      distortion=(-0.05, 0.01, 0, 0, 0))  # fmt: skip
    pose = path(t) @ cam.extrinsic
    d_cam = cam.pixel_rays @ pose[:3, :3].T
    o_cam = np.broadcast_to(pose[:3, 3], d_cam.shape)
    d_lidar, _, _ = LidarModel(azimuth_steps=96).firing()
    o_lidar = np.broadcast_to(path(t)[:3, 3] + (0, 0, 1.9), d_lidar.shape)
    rng = np.random.default_rng(seed)
    o_rand = np.c_[rng.uniform(-20, 60, 400), rng.uniform(-12, 12, 400), rng.uniform(0.2, 8, 400)]
    d_rand = rng.normal(size=(400, 3))
    d_rand /= np.linalg.norm(d_rand, axis=1, keepdims=True)
    origins = np.concatenate([o_cam, o_lidar, o_rand])
    directions = np.concatenate([d_cam, d_lidar, d_rand])
    times = np.concatenate([np.full(len(d_cam), t), np.linspace(t - 0.05, t + 0.05, len(d_lidar)),
                            rng.uniform(0, 3, 400)])  # fmt: skip
    bundle = np.arange(len(origins)) // 8
    return origins, directions, times, bundle


def test_culling_never_changes_the_nearest_hit() -> None:
    scene = build_scene(4, x_min=-40, x_max=80)
    origins, directions, times, bundle = _street_rays(0)
    groups = (bundle // 4, bundle // 32)
    culled = nearest_hits(scene, origins, directions, times, bundle, groups, max_distance=80.0)
    every = nearest_hits(scene, origins, directions, times, bundle, max_distance=80.0,
                         cull=False)  # fmt: skip
    assert (culled.prim >= 0).sum() > 1000  # the rays do hit objects, not just the terrain
    np.testing.assert_array_equal(culled.prim, every.prim)
    np.testing.assert_array_equal(culled.distance, every.distance)


def test_culling_never_changes_shadows() -> None:
    scene = build_scene(5, x_min=-40, x_max=80)
    origins, directions, times, bundle = _street_rays(1)
    hits = nearest_hits(scene, origins, directions, times, bundle, max_distance=80.0)
    lit = np.flatnonzero((hits.prim != MISS) & (hits.normal @ SUN > 0))
    start = hits.point[lit] + 0.02 * hits.normal[lit]
    # Bundles deliberately mixing far-apart points: culling must still be exact.
    blocked = occluded(scene, start, SUN, times[lit], np.arange(len(lit)) // 16,
                       max_distance=40.0)  # fmt: skip
    reference = occluded(scene, start, SUN, times[lit], max_distance=40.0, cull=False)
    assert 0 < reference.sum() < len(lit)
    np.testing.assert_array_equal(blocked, reference)


def test_bad_rays_are_refused() -> None:
    scene = tiny_scene((Shape.BOX, (10, 0, 3), (1, 1, 1), 0.0, STILL))
    with pytest.raises(ValueError, match="unit vectors"):
        nearest_hits(scene, np.zeros((1, 3)), np.array([[2.0, 0, 0]]), np.zeros(1),
                     max_distance=10.0)  # fmt: skip
    with pytest.raises(ValueError, match="must be"):
        nearest_hits(scene, np.zeros((2, 3)), np.array([[1.0, 0, 0]]), np.zeros(2),
                     max_distance=10.0)  # fmt: skip
    with pytest.raises(ValueError, match="groups"):
        nearest_hits(scene, np.zeros((1, 3)), np.array([[1.0, 0, 0]]), np.zeros(1),
                     groups=(np.zeros(3),), max_distance=10.0)  # fmt: skip
    with pytest.raises(ValueError, match="direction"):
        occluded(scene, np.zeros((1, 3)), np.ones((1, 3)), np.zeros(1), max_distance=10.0)
