"""Camera rendering of the sample street: one ray per pixel through the shared ray caster.

Each pixel's ray goes through its centre, ``(u + 0.5, v + 0.5)`` under the projection module's
convention (pixel ``i`` spans ``[i, i + 1)``), undistorted with the camera's own plumb_bob
coefficients, so ``geometry.projection.project_points`` maps a surface point back into the very
pixel that rendered it. Shading: Lambert from a sun direction with cast shadows (shadow rays),
sky ambient, per-material albedo and world-anchored texture noise (stable across frames), a sky
gradient where nothing is hit, distance haze, and a little sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..geometry.camera_model import CameraModel
from ..geometry.projection import distort_normalized, image_size
from .raycast import MISS, nearest_hits, occluded
from .scene import Scene, surface

#: Unit vector towards the sun (world frame): 50° up, behind-right of a vehicle driving along +x,
#: so the road is mostly lit, the right-hand buildings shade their sidewalk, and the left-hand
#: facades (which the left camera looks at) are lit.
SUN = np.array([np.cos(np.deg2rad(50)) * np.cos(np.deg2rad(-150)),
                np.cos(np.deg2rad(50)) * np.sin(np.deg2rad(-150)),
                np.sin(np.deg2rad(50))])  # fmt: skip
SUN_COLOR = np.array([1.0, 0.96, 0.88], dtype=np.float32) * 0.78
SKY_AMBIENT = np.array([0.78, 0.84, 0.95], dtype=np.float32) * 0.5
SKY_HORIZON = np.array([0.86, 0.9, 0.95], dtype=np.float32)
SKY_ZENITH = np.array([0.33, 0.52, 0.84], dtype=np.float32)
HAZE_DISTANCE = 350.0
MAX_DISTANCE = 250.0
# Culling hierarchy: bundles of BLOCK x BLOCK pixels, in tiles, in regions.
BLOCK, TILE, REGION = 4, 16, 64

#: Optical frame (x right, y down, z forward) axes expressed in a body frame (x fwd, z up).
OPTICAL_IN_BODY = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def undistort_normalized(u: np.ndarray, v: np.ndarray, camera: CameraModel,
                         iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Inverse of ``distort_normalized`` for pixel coordinates (full resolution, no binning).

    Fixed-point iteration ``x <- x + (x_d - distort(x))`` (what OpenCV's undistortPoints does for
    small distortion); raises if it has not converged to 1e-6 px.
    """
    K = camera.K
    yd = (v - K[1, 2]) / K[1, 1]
    xd = (u - K[0, 2] - K[0, 1] * yd) / K[0, 0]
    x, y = xd.copy(), yd.copy()
    with np.errstate(all="ignore"):  # a lens too strong to invert diverges: reported below
        for _ in range(iterations):
            dx, dy = distort_normalized(x, y, camera)
            x, y = x + (xd - dx), y + (yd - dy)
        dx, dy = distort_normalized(x, y, camera)
        residual = np.max(np.hypot(dx - xd, dy - yd), initial=0.0) * K[0, 0]
    if not residual <= 1e-6:
        raise ValueError(f"distortion of camera too strong to invert ({residual:.2g} px left)")
    return x, y


def _rotation_body(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation of a body frame yawed then pitched (positive pitch looks down)."""
    y, p = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    return rz @ ry


@dataclass(frozen=True, eq=False)
class SampleCamera:
    """A camera of the rig: intrinsics, mounting (``base_link <- optical``) and topics.

    ``time_offset_s`` is the exposure time relative to the LiDAR stamp: a camera is triggered
    when the spinning LiDAR faces the middle of its field of view.
    """

    name: str
    model: CameraModel
    extrinsic: np.ndarray
    compressed: bool = False
    time_offset_s: float = 0.0
    _rays: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ext = np.asarray(self.extrinsic, dtype=np.float64)
        if ext.shape != (4, 4):
            raise ValueError(f"SampleCamera.extrinsic must be (4, 4), got {ext.shape}")
        object.__setattr__(self, "extrinsic", ext)
        width, height = image_size(self.model)
        if (width, height) != (self.model.width, self.model.height):
            raise ValueError("SampleCamera renders full-resolution images (no ROI or binning)")
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        x, y = undistort_normalized(u.ravel(), v.ravel(), self.model)
        rays = np.stack([x, y, np.ones_like(x)], axis=1)
        object.__setattr__(self, "_rays", rays / np.linalg.norm(rays, axis=1, keepdims=True))

    @property
    def frame_id(self) -> str:
        return f"{self.name}_optical"

    @property
    def size(self) -> tuple[int, int]:
        return self.model.width, self.model.height

    @property
    def pixel_rays(self) -> np.ndarray:
        """(H*W, 3) unit ray directions in the optical frame, row-major pixel order."""
        return self._rays


def make_camera(name: str, *, width: int, height: int, hfov_deg: float, position: tuple,
                yaw_deg: float, pitch_deg: float = 0.0, distortion: tuple = (),
                compressed: bool = False, time_offset_s: float = 0.0) -> SampleCamera:  # fmt: skip
    """A pinhole (+ plumb_bob) camera mounted on ``base_link``."""
    f = (width / 2) / np.tan(np.deg2rad(hfov_deg) / 2)
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    model = CameraModel(width=width, height=height, K=K, D=np.asarray(distortion, float),
                        distortion_model="plumb_bob" if distortion else "none")  # fmt: skip
    ext = np.eye(4)
    ext[:3, :3] = _rotation_body(yaw_deg, pitch_deg) @ OPTICAL_IN_BODY
    ext[:3, 3] = position
    return SampleCamera(name, model, ext, compressed, time_offset_s)


#: Small barrel distortion (k1 k2 t1 t2 k3) so the distortion code path is exercised.
FRONT_DISTORTION = (-0.06, 0.012, 4e-4, -3e-4, 0.0)
LEFT_DISTORTION = (-0.05, 0.009, -2e-4, 3e-4, 0.0)


def front_camera(width: int = 640, height: int = 360) -> SampleCamera:
    return make_camera("camera_front", width=width, height=height, hfov_deg=80.0,
                       position=(1.7, 0.0, 1.45), yaw_deg=0.0, pitch_deg=2.0,
                       distortion=FRONT_DISTORTION)  # fmt: skip


def left_camera(width: int = 480, height: int = 270, period: float = 0.1) -> SampleCamera:
    """Looks left; exposed when the clockwise LiDAR faces left, a quarter turn before front."""
    return make_camera("camera_left", width=width, height=height, hfov_deg=80.0,
                       position=(1.2, 0.8, 1.5), yaw_deg=90.0, pitch_deg=2.0,
                       distortion=LEFT_DISTORTION, compressed=True,
                       time_offset_s=-period / 4)  # fmt: skip


#: Shadow-ray bundles: cells of this size (m) across the sun direction, grouped 4x4, 16x16.
SUN_CELL = 0.25
_SUN_U = np.cross(SUN, [0.0, 0.0, 1.0]) / np.linalg.norm(np.cross(SUN, [0.0, 0.0, 1.0]))
_SUN_V = np.cross(SUN, _SUN_U)


def _sun_cells(points: np.ndarray) -> list[np.ndarray]:
    """Nested cell keys of points projected on a plane facing the sun (finest first)."""
    u = np.floor(points @ _SUN_U / SUN_CELL).astype(np.int64)
    v = np.floor(points @ _SUN_V / SUN_CELL).astype(np.int64)
    keys = []
    for level in range(3):
        cu, cv = u >> (2 * level), v >> (2 * level)  # floor division by 4 per level
        keys.append((cu << 32) + (cv & 0xFFFFFFFF))
    return keys


@dataclass(frozen=True)
class Rendering:
    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint16 ground-truth label of each pixel (0 for sky)
    depth: np.ndarray  # (H, W) float32 optical-frame z of the hit, inf for sky


def render(scene: Scene, pose: np.ndarray, camera: SampleCamera, *, time_s: float = 0.0,
           rng: np.random.Generator | None = None, shadows: bool = True) -> Rendering:  # fmt: skip
    """Render ``camera`` on a vehicle at ``pose`` (``map <- base_link``) at drive ``time_s``.

    ``rng`` adds sensor noise (without it the image is a pure function of the scene and pose).
    """
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be (4, 4), got {pose.shape}")
    width, height = camera.size
    cam = pose @ camera.extrinsic
    rays = camera.pixel_rays
    directions = rays @ cam[:3, :3].T
    origins = np.broadcast_to(cam[:3, 3], directions.shape)
    times = np.full(len(rays), float(time_s))
    v, u = np.divmod(np.arange(len(rays)), width)
    tile = (v // TILE) * (width // TILE + 1) + u // TILE
    block = (v // BLOCK) * (width // BLOCK + 1) + u // BLOCK
    region = (v // REGION) * (width // REGION + 1) + u // REGION
    hits = nearest_hits(scene, origins, directions, times, block, (tile, region),
                        max_distance=MAX_DISTANCE)  # fmt: skip
    surf = surface(scene, hits.prim, hits.rest, hits.local, hits.local_normal)

    normal = hits.normal
    facing = normal @ SUN
    lit = np.flatnonzero((hits.prim != MISS) & (facing > 0))
    light = np.zeros(len(rays), dtype=np.float32)
    light[lit] = facing[lit]
    if shadows and lit.size:
        start = hits.point[lit] + 0.02 * normal[lit]
        # Past the top of the tallest primitive a shadow ray is free.
        ceiling = float(np.max(scene.center[:, 2] + scene.half[:, 2], initial=0.0))
        reach = (ceiling - start[:, 2]) / SUN[2]
        # Bundle shadow rays by where they cross a plane facing the sun: parallel rays that
        # are close there stay close, whatever the depth of the pixels they start from.
        keys = _sun_cells(start)
        blocked = occluded(scene, start, SUN, times[lit], keys[0], keys[1:],
                           max_distance=max(float(reach.max()), 0.0))  # fmt: skip
        light[lit[blocked]] = 0.0
    ambient = SKY_AMBIENT * (0.75 + 0.25 * np.clip(normal[:, 2:3], -1, 1)).astype(np.float32)
    color = surf.albedo * (ambient + SUN_COLOR * light[:, None])

    up = np.clip(directions[:, 2], 0, 1).astype(np.float32)[:, None]
    sky = SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * np.sqrt(up)
    miss = hits.prim == MISS
    dist = np.where(miss, 0.0, hits.distance)
    haze = np.where(miss, 1.0, 1.0 - np.exp(-dist / HAZE_DISTANCE)).astype(np.float32)[:, None]
    color = np.where(miss[:, None], sky, color * (1 - haze) + SKY_HORIZON * haze)
    if rng is not None:
        color = color + np.float32(0.012) * rng.standard_normal(color.shape, dtype=np.float32)
    rgb = np.clip(np.round(color * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)

    depth = np.where(miss, np.inf, hits.distance * rays[:, 2]).astype(np.float32)
    return Rendering(rgb=rgb, labels=surf.label.reshape(height, width),
                     depth=depth.reshape(height, width))  # fmt: skip
