"""The sample drive's procedural street, ego path and materials."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clip2scene_ros.sample.scene import (
    BUILDING,
    CAR,
    EGO_LANE_Y,
    SIDEWALK_OUTER,
    EgoPath,
    Texture,
    build_scene,
    surface,
    value_noise,
)


def test_same_seed_same_street_other_seed_other_street() -> None:
    a, b, c = build_scene(3), build_scene(3), build_scene(4)
    for f in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
    assert a.num_primitives != c.num_primitives or not np.array_equal(a.center, c.center)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        build_scene(-1)
    with pytest.raises(ValueError, match="seed"):
        build_scene(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="40 m"):
        build_scene(0, x_min=0, x_max=10)
    scene = build_scene(0)
    with pytest.raises(ValueError, match="half"):
        dataclasses.replace(scene, half=scene.half[:-1])
    with pytest.raises(ValueError, match="positive"):
        dataclasses.replace(scene, half=scene.half * 0)


def test_street_layout_leaves_the_ego_a_clear_lane() -> None:
    scene = build_scene(0)
    static = np.all(scene.velocity == 0, axis=1)
    low = scene.center[:, 2] - scene.half[:, 2] < 3.0
    # Half extent across the street of each (yawed) bounding box.
    c, s = np.abs(np.cos(scene.yaw)), np.abs(np.sin(scene.yaw))
    reach = s * scene.half[:, 0] + c * scene.half[:, 1]
    # Static things below head height stay out of the lanes the ego sways across.
    assert np.all(np.abs(scene.center[static & low, 1]) - reach[static & low] > 3.0)
    # Buildings stand behind the sidewalks.
    b = scene.label == BUILDING
    assert np.all(np.abs(scene.center[b, 1]) - scene.half[b, 1] >= SIDEWALK_OUTER - 1e-9)
    # Cars in the ego's lane keep their distance over a long drive.
    path = EgoPath()
    t = np.linspace(0, 30, 301)
    ego_x = path.state(t)[0]
    lane = ~static & (scene.label == CAR) & (np.abs(scene.center[:, 1] - EGO_LANE_Y) < 0.5)
    assert lane.sum() >= 2
    for m in np.flatnonzero(lane):
        x = scene.center[m, 0] + scene.velocity[m, 0] * t
        assert np.all(np.abs(x - ego_x) > 5.0 + scene.half[m, 0])


def test_ego_path_is_smooth_and_heads_where_it_goes() -> None:
    path = EgoPath()
    t = np.linspace(0, 12, 1201)
    x, y, yaw = path.state(t)
    vx, vy = np.gradient(x, t), np.gradient(y, t)
    speed = np.hypot(vx, vy)
    assert speed.min() > 7.4 and speed.max() < 10.6  # speed swings
    np.testing.assert_allclose(yaw[1:-1], np.arctan2(vy, vx)[1:-1], atol=1e-4)
    assert np.ptp(y) == pytest.approx(path.sway, abs=1e-3) and np.abs(yaw).max() > 0.02
    T = path(t)
    assert T.shape == (1201, 4, 4)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", T[:, :3, :3], T[:, :3, :3]),
                               np.broadcast_to(np.eye(3), (1201, 3, 3)), atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(T[:, :2, 3], np.c_[x, y])


def test_value_noise_is_smooth_stable_and_seeded() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(-100, 100, (2000, 3))
    n = value_noise(p, 2.0, 5)
    assert n.min() >= 0 and n.max() < 1 and n.std() > 0.1
    np.testing.assert_array_equal(n, value_noise(p, 2.0, 5))
    assert not np.array_equal(n, value_noise(p, 2.0, 6))
    near = value_noise(p + 1e-3, 2.0, 5)
    assert np.abs(near - n).max() < 0.02


def test_facade_windows_are_dark_glass() -> None:
    scene = build_scene(0)
    m = int(np.flatnonzero(scene.texture == Texture.FACADE)[0])
    half = scene.half[m]
    spacing = float(scene.param[m])
    # Sample the facade facing +y on a grid of local points.
    u = np.linspace(-half[0] + 0.05, half[0] - 0.05, 200)
    z = np.linspace(-half[2] + 0.05, half[2] - 0.05, 100)
    uu, zz = np.meshgrid(u, z)
    local = np.c_[uu.ravel(), np.full(uu.size, half[1]), zz.ravel()]
    normal = np.tile([0.0, 1.0, 0.0], (len(local), 1))
    rest = local + scene.center[m]
    surf = surface(scene, np.full(len(local), m), rest, local, normal)
    window = surf.absorption > 0
    assert 0.1 < window.mean() < 0.6
    assert surf.reflectivity[window].max() < surf.reflectivity[~window].min()
    assert surf.albedo[window].mean() < surf.albedo[~window].mean()
    assert np.all(surf.label == BUILDING)
    # Windows repeat with the building's spacing along the facade.
    row = window.reshape(100, 200)[60]
    if row.any():
        shifted = np.interp(u + spacing, u, row.astype(float), left=np.nan, right=np.nan)
        ok = ~np.isnan(shifted) & (u + spacing < half[0] - 0.7)
        assert np.mean(shifted[ok] == row[ok]) > 0.9
