"""Projection: pinhole with K, the four distortion models, binning and ROI, points behind."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip2scene_ros.geometry.camera_model import CameraModel, RegionOfInterest
from clip2scene_ros.geometry.projection import distort_normalized, image_size, project_points

K = np.array([[500.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])
# Normalised coordinates spanning the centre, the axes and a wide off-axis corner.
XS = [0.0, 0.1, -0.3, 0.45, -0.6, 0.8]
YS = [0.0, -0.2, 0.25, 0.05, -0.5, 0.7]


def camera(model: str = "none", D: list[float] | None = None, **kwargs) -> CameraModel:
    return CameraModel(640, 480, K, np.zeros(0) if D is None else np.array(D), model, **kwargs)


def test_pinhole_projection_of_known_points() -> None:
    pts = np.array([[1.0, 2.0, 10.0], [0.0, 0.0, 5.0], [-3.2, -2.4, 1.0]])
    uv, depth = project_points(pts, camera())
    # u = fx X/Z + cx, v = fy Y/Z + cy, by hand.
    np.testing.assert_allclose(uv, [[370.0, 320.0], [320.0, 240.0], [-1280.0, -720.0]])
    np.testing.assert_array_equal(depth, [10.0, 5.0, 1.0])
    assert uv.dtype == np.float64 and depth.dtype == np.float64


def test_skew_is_applied() -> None:
    skewed = K.copy()
    skewed[0, 1] = 10.0
    uv, _ = project_points(np.array([[1.0, 2.0, 10.0]]), CameraModel(640, 480, skewed))
    np.testing.assert_allclose(uv, [[370.0 + 10.0 * 0.2, 320.0]])


def test_points_behind_or_invalid_get_nan() -> None:
    pts = np.array(
        [[0.0, 0.0, 0.0], [1.0, 1.0, -5.0], [0.1, 0.1, -1e-9], [np.nan, 0.0, 1.0], [0, 0, 2.0]]
    )
    uv, depth = project_points(pts, camera())
    assert np.isnan(uv[:4]).all()
    np.testing.assert_allclose(uv[4], [320.0, 240.0])
    np.testing.assert_array_equal(depth[:3], [0.0, -5.0, -1e-9])
    # NaN uv can never pass a bounds check.
    with np.errstate(invalid="ignore"):
        assert not ((uv[:4] >= 0) & (uv[:4] < 640)).any()


def test_project_points_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        project_points(np.zeros((4, 2)), camera())


# --- distortion, each against its formula written out independently, point by point ---------


def plumb_bob_reference(x: float, y: float, k1, k2, p1, p2, k3) -> tuple[float, float]:
    r = math.hypot(x, y)
    radial = 1 + k1 * r**2 + k2 * r**4 + k3 * r**6
    xd = x * radial + 2 * p1 * x * y + p2 * (r**2 + 2 * x**2)
    yd = y * radial + p1 * (r**2 + 2 * y**2) + 2 * p2 * x * y
    return xd, yd


def rational_reference(x: float, y: float, d: list[float]) -> tuple[float, float]:
    d = [*d, *[0.0] * (14 - len(d))]
    k1, k2, p1, p2, k3, k4, k5, k6, s1, s2, s3, s4 = d[:12]
    r = math.hypot(x, y)
    radial = (1 + k1 * r**2 + k2 * r**4 + k3 * r**6) / (1 + k4 * r**2 + k5 * r**4 + k6 * r**6)
    xd = x * radial + 2 * p1 * x * y + p2 * (r**2 + 2 * x**2) + s1 * r**2 + s2 * r**4
    yd = y * radial + p1 * (r**2 + 2 * y**2) + 2 * p2 * x * y + s3 * r**2 + s4 * r**4
    return xd, yd


def equidistant_reference(x: float, y: float, k1, k2, k3, k4) -> tuple[float, float]:
    r = math.hypot(x, y)
    if r == 0.0:
        return x, y
    theta = math.atan(r)
    theta_d = theta + k1 * theta**3 + k2 * theta**5 + k3 * theta**7 + k4 * theta**9
    return x * theta_d / r, y * theta_d / r


def check(model: str, D: list[float], reference) -> None:
    xd, yd = distort_normalized(np.array(XS), np.array(YS), camera(model, D))
    expected = np.array([reference(x, y) for x, y in zip(XS, YS, strict=True)])
    np.testing.assert_allclose(np.stack([xd, yd], axis=1), expected, rtol=1e-12, atol=1e-15)


def test_plumb_bob_matches_formula() -> None:
    D = [-0.28, 0.07, 1.2e-3, -8e-4, 0.02]
    check("plumb_bob", D, lambda x, y: plumb_bob_reference(x, y, *D))


def test_plumb_bob_by_hand() -> None:
    # k1 = 0.1 at x = 0.5, y = 0: r² = 0.25, xd = 0.5 (1 + 0.025) = 0.5125.
    xd, yd = distort_normalized(0.5, 0.0, camera("plumb_bob", [0.1, 0, 0, 0, 0]))
    assert (float(xd), float(yd)) == pytest.approx((0.5125, 0.0))
    # Tangential p2 = 0.01 at x = 0.5, y = 0: xd = 0.5 + 0.01 (0.25 + 0.5) = 0.5075.
    xd, yd = distort_normalized(0.5, 0.0, camera("plumb_bob", [0, 0, 0, 0.01, 0]))
    assert (float(xd), float(yd)) == pytest.approx((0.5075, 0.0))
    # Tangential p1 = 0.01 at x = 0.5, y = 0: yd = 0.01 (0.25 + 0) = 0.0025.
    xd, yd = distort_normalized(0.5, 0.0, camera("plumb_bob", [0, 0, 0.01, 0, 0]))
    assert (float(xd), float(yd)) == pytest.approx((0.5, 0.0025))


@pytest.mark.parametrize(
    "D",
    [
        [0.5, -0.1, 1e-3, 2e-3, 0.01, 0.6, -0.05, 0.02],
        [0.5, -0.1, 1e-3, 2e-3, 0.01, 0.6, -0.05, 0.02, 1e-3, -2e-3, 3e-3, -4e-4],
        [0.5, -0.1, 1e-3, 2e-3, 0.01, 0.6, -0.05, 0.02, 1e-3, -2e-3, 3e-3, -4e-4, 0.0, 0.0],
    ],
)
def test_rational_polynomial_matches_formula(D: list[float]) -> None:
    check("rational_polynomial", D, lambda x, y: rational_reference(x, y, D))


def test_rational_polynomial_by_hand() -> None:
    # k1 = 0.1, k4 = 0.2, s1 = 0.01, s3 = 0.02 at x = 0.5, y = 0 (r² = 0.25):
    # xd = 0.5 * 1.025 / 1.05 + 0.01 * 0.25, yd = 0.02 * 0.25.
    D = [0.1, 0, 0, 0, 0, 0.2, 0, 0, 0.01, 0, 0.02, 0]
    xd, yd = distort_normalized(0.5, 0.0, camera("rational_polynomial", D))
    assert (float(xd), float(yd)) == pytest.approx((0.5 * 1.025 / 1.05 + 0.0025, 0.005))


def test_rational_polynomial_rejects_tilt() -> None:
    D = [0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.01, 0.0]
    with pytest.raises(ValueError, match="tilt"):
        distort_normalized(0.1, 0.1, camera("rational_polynomial", D))


def test_equidistant_matches_formula() -> None:
    D = [-0.01, 0.003, -0.0005, 0.0001]
    check("equidistant", D, lambda x, y: equidistant_reference(x, y, *D))


def test_equidistant_by_hand_and_zero_coefficients() -> None:
    # x = 1 (45 degrees off axis): theta = pi/4, k1 = 0.1 -> theta_d = pi/4 (1 + 0.1 (pi/4)²).
    xd, yd = distort_normalized(1.0, 0.0, camera("equidistant", [0.1, 0, 0, 0]))
    assert float(xd) == pytest.approx(math.pi / 4 * (1 + 0.1 * (math.pi / 4) ** 2))
    assert float(yd) == 0.0
    # With all-zero D the fisheye model is still equidistant (r -> atan r), not the identity.
    fisheye = camera("equidistant", [0, 0, 0, 0])
    xd, yd = distort_normalized(np.array([0.0, 1.0]), np.array([0.0, 0.0]), fisheye)
    np.testing.assert_allclose(xd, [0.0, math.pi / 4])


def test_none_and_zero_plumb_bob_are_identity() -> None:
    for cam in (camera(), camera("plumb_bob", [0, 0, 0, 0, 0])):
        xd, yd = distort_normalized(np.array(XS), np.array(YS), cam)
        np.testing.assert_array_equal(xd, XS)
        np.testing.assert_array_equal(yd, YS)


def test_projection_applies_distortion_then_K() -> None:
    D = [-0.28, 0.07, 1.2e-3, -8e-4, 0.02]
    pts = np.array([[0.3, -0.1, 2.0], [-1.0, 0.5, 4.0]])
    uv, _ = project_points(pts, camera("plumb_bob", D))
    for (X, Y, Z), (u, v) in zip(pts, uv, strict=True):
        xd, yd = plumb_bob_reference(X / Z, Y / Z, *D)
        assert (u, v) == pytest.approx((500 * xd + 320, 400 * yd + 240), rel=1e-12)


# --- binning and ROI ---------------------------------------------------------------------


def test_image_size_with_roi_and_binning() -> None:
    assert image_size(camera()) == (640, 480)
    assert image_size(camera(binning_x=2, binning_y=4)) == (320, 120)
    assert image_size(camera(binning_x=1, binning_y=1)) == (640, 480)
    roi = RegionOfInterest(x_offset=100, y_offset=50, width=320, height=240)
    assert image_size(camera(roi=roi)) == (320, 240)
    assert image_size(camera(roi=roi, binning_x=2, binning_y=2)) == (160, 120)
    # Zero ROI size with an offset: to the edge of the sensor.
    assert image_size(camera(roi=RegionOfInterest(x_offset=40, y_offset=80))) == (600, 400)
    with pytest.raises(ValueError, match="roi"):
        image_size(camera(roi=RegionOfInterest(x_offset=400, width=300, height=10)))


def test_projection_with_roi_and_binning() -> None:
    # Full-resolution (300, 170): ROI offset (100, 50) then binning 2 -> (100, 60).
    pts = np.array([[(300 - 320) / 500 * 10, (170 - 240) / 400 * 10, 10.0]])
    roi = RegionOfInterest(x_offset=100, y_offset=50, width=320, height=240)
    uv, _ = project_points(pts, camera(roi=roi, binning_x=2, binning_y=2))
    np.testing.assert_allclose(uv, [[100.0, 60.0]])
    uv_roi, _ = project_points(pts, camera(roi=roi))
    np.testing.assert_allclose(uv_roi, [[200.0, 120.0]])
    uv_bin, _ = project_points(pts, camera(binning_x=4, binning_y=2))
    np.testing.assert_allclose(uv_bin, [[75.0, 85.0]])


def test_projection_matches_image_geometry_adjusted_K() -> None:
    # image_geometry folds ROI and binning into K: fx' = fx/bx, cx' = (cx - x_offset)/bx.
    roi = RegionOfInterest(x_offset=64, y_offset=32, width=512, height=384)
    bx, by = 2, 4
    adjusted = np.array(
        [[K[0, 0] / bx, 0, (K[0, 2] - 64) / bx], [0, K[1, 1] / by, (K[1, 2] - 32) / by], [0, 0, 1]]
    )
    rng = np.random.default_rng(1)
    pts = rng.uniform([-3, -2, 2], [3, 2, 20], size=(50, 3))
    uv, _ = project_points(pts, camera(roi=roi, binning_x=bx, binning_y=by))
    h = pts @ adjusted.T
    np.testing.assert_allclose(uv, h[:, :2] / h[:, 2:], rtol=1e-12)
