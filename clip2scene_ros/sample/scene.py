"""The procedural street of the sample drive: primitives, their materials and the ego's path.

The street runs along +x, centred on y = 0 (right-hand traffic):

* ``|y| < 6``: road (two 3.5 m lanes either side of a dashed centre line, parking strips from
  3.5 m to 6 m behind a solid edge line, zebra crossings);
* ``6 < |y| < 10``: sidewalks, raised 15 cm, with trees, street lamps and signs on the
  curb side and pedestrians walking on the inner side;
* ``|y| > 10``: building blocks of varied width, depth and height, with gardens (hedges, trees,
  grass that is *unlabelled* ground) in the gaps.

Cars are parked in the strips and driven in the lanes; pedestrians walk along the sidewalks.
Everything is made of four primitive shapes (boxes, vertical cylinders, wheel cylinders along the
local y axis, ellipsoids), each rotated about z by a yaw and moving at a constant velocity, so
the position of a primitive at drive time ``t`` is ``center + velocity * t``. The terrain (road,
raised sidewalks with curbs, the ground beyond) is not made of primitives: the ray caster solves
it analytically.

Surface appearance (camera albedo, LiDAR reflectivity, glass that swallows LiDAR returns) is a
function of the hit point *on the object at rest*, so textures are stable across frames and
move with moving objects.

Label values are the ``ids`` of ``config/vocabularies/sample_drive.yaml``, read once at import
(:func:`label_ids`): the vocabulary is where they are written, the constants here follow it.

The scene is one generator (layout, objects, surfaces, labels): its parts share the seeded
layout, so it stays one module of ~600 lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..vocabulary import builtin_vocabulary, load_vocabulary


def label_ids() -> dict[str, int]:
    """The drive's label value of each class, read from ``config/vocabularies/sample_drive.yaml``
    (the one place they are written): class name -> its single ``ids`` entry, plus
    ``"unlabelled"`` -> the single ``ignore_ids`` entry."""
    path = builtin_vocabulary("sample_drive")
    vocabulary = load_vocabulary(path)
    if len(vocabulary.ignore_ids) != 1 or any(len(c.ids) != 1 for c in vocabulary.classes):
        raise ConfigError("classes", "the sample drive needs one ignore id and one id per class",
                          str(path))
    return {"unlabelled": vocabulary.ignore_ids[0],
            **{c.name: c.ids[0] for c in vocabulary.classes}}


# Label ids of the sample drive's classes (from its vocabulary, see label_ids).
_IDS = label_ids()
UNLABELLED = _IDS["unlabelled"]
ROAD = _IDS["road"]
SIDEWALK = _IDS["sidewalk"]
BUILDING = _IDS["building"]
VEGETATION = _IDS["vegetation"]
CAR = _IDS["car"]
PEDESTRIAN = _IDS["pedestrian"]
POLE = _IDS["pole"]
TRAFFIC_SIGN = _IDS["traffic sign"]
NUM_LABELS = max(_IDS.values()) + 1

# Street cross-section (metres).
LANE_WIDTH = 3.5
ROAD_HALF_WIDTH = 6.0
SIDEWALK_OUTER = 10.0
CURB_HEIGHT = 0.15
EGO_LANE_Y = -LANE_WIDTH / 2
ONCOMING_LANE_Y = LANE_WIDTH / 2



class Shape(IntEnum):
    BOX = 0
    CYLINDER = 1  # axis along local z
    WHEEL = 2  # cylinder with its axis along local y
    ELLIPSOID = 3


class Texture(IntEnum):
    PLAIN = 0
    FACADE = 1  # param: window spacing (m)
    FOLIAGE = 2
    GLASS = 3  # car cabins: glass sides, the roof in the car's colour
    SIGN = 4  # param: +1 if the sign faces local +x, -1 for -x


@dataclass(frozen=True)
class CullTable:
    """float32 bounding boxes of the primitives, as the ray caster's culling reads them."""

    center: np.ndarray  # (M, 3) at drive time 0
    velocity: np.ndarray  # (M, 3)
    speed: np.ndarray  # (M,)
    half: np.ndarray  # (M, 3) local half extents
    radius: np.ndarray  # (M,) norm of ``half``
    cos_yaw: np.ndarray  # (M,)
    sin_yaw: np.ndarray  # (M,)

    def take(self, index: np.ndarray) -> CullTable:
        return CullTable(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


@dataclass(frozen=True, eq=False)
class Scene:
    """Primitives as parallel arrays (M rows), plus the street's ground layout.

    ``half`` is the half-extent of each primitive's local bounding box: box half sizes,
    ``(r, r, h/2)`` for a cylinder, ``(r, w/2, r)`` for a wheel, the radii of an ellipsoid.
    """

    seed: int
    x_min: float
    x_max: float
    shape: np.ndarray  # (M,) int8 Shape
    center: np.ndarray  # (M, 3) float64, at drive time 0
    half: np.ndarray  # (M, 3) float64
    yaw: np.ndarray  # (M,) float64
    velocity: np.ndarray  # (M, 3) float64
    label: np.ndarray  # (M,) uint16
    color: np.ndarray  # (M, 3) float32 base albedo in 0..1
    reflectivity: np.ndarray  # (M,) float32 LiDAR reflectivity in 0..1
    texture: np.ndarray  # (M,) int8 Texture
    param: np.ndarray  # (M,) float32 texture parameter
    instance: np.ndarray  # (M,) int32 object id (a car's parts share one)
    crosswalks: np.ndarray  # (K,) x centres of zebra crossings

    def __post_init__(self) -> None:
        m = len(self.shape)
        shapes = {"center": (m, 3), "half": (m, 3), "velocity": (m, 3), "color": (m, 3),
                  "yaw": (m,), "label": (m,), "reflectivity": (m,), "texture": (m,),
                  "param": (m,), "instance": (m,)}  # fmt: skip
        for name, shape in shapes.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ValueError(f"Scene.{name} must be {shape}, got {got}")
        if m and not np.all(self.half > 0):
            raise ValueError("Scene.half must be positive (every primitive needs a size)")
        if not np.isin(self.shape, [int(s) for s in Shape]).all():
            raise ValueError(f"Scene.shape holds unknown shapes {sorted(set(self.shape.tolist()))}")

    @property
    def num_primitives(self) -> int:
        return int(self.shape.shape[0])

    @cached_property
    def tables(self) -> tuple[np.ndarray, ...]:
        """(center, velocity, half, cos yaw, sin yaw) as the ray caster gathers them."""
        return self.center, self.velocity, self.half, np.cos(self.yaw), np.sin(self.yaw)

    @cached_property
    def tables32(self) -> tuple[np.ndarray, ...]:
        return tuple(a.astype(np.float32) for a in self.tables)

    @cached_property
    def cull_table(self) -> CullTable:
        f32 = np.float32
        velocity = self.velocity.astype(f32)
        return CullTable(self.center.astype(f32), velocity, np.linalg.norm(velocity, axis=1),
                         self.half.astype(f32), np.linalg.norm(self.half, axis=1).astype(f32),
                         np.cos(self.yaw).astype(f32), np.sin(self.yaw).astype(f32))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Building the street


class _Builder:
    """Collects primitives row by row; objects (cars, trees...) are a few rows each."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.next_instance = 1

    def instance(self) -> int:
        self.next_instance += 1
        return self.next_instance - 1

    def add(self, shape: Shape, center: Any, half: Any, *, label: int, color: Any,
            reflectivity: float, instance: int, yaw: float = 0.0, velocity: Any = (0, 0, 0),
            texture: Texture = Texture.PLAIN, param: float = 0.0) -> None:  # fmt: skip
        self.rows.append((shape, center, half, yaw, velocity, label, color, reflectivity,
                          texture, param, instance))  # fmt: skip

    def part(self, shape: Shape, origin: Any, yaw: float, offset: Any, half: Any,
             **kw: Any) -> None:  # fmt: skip
        """A primitive placed at ``offset`` in an object frame at ``origin`` rotated by yaw."""
        c, s = np.cos(yaw), np.sin(yaw)
        dx, dy, dz = offset
        center = (origin[0] + c * dx - s * dy, origin[1] + s * dx + c * dy, origin[2] + dz)
        self.add(shape, center, half, yaw=yaw, **kw)

    def build(self, seed: int, x_min: float, x_max: float, crosswalks: list[float]) -> Scene:
        cols = list(zip(*self.rows, strict=True))
        return Scene(
            seed=seed,
            x_min=x_min,
            x_max=x_max,
            shape=np.array(cols[0], dtype=np.int8),
            center=np.array(cols[1], dtype=np.float64).reshape(-1, 3),
            half=np.array(cols[2], dtype=np.float64).reshape(-1, 3),
            yaw=np.array(cols[3], dtype=np.float64),
            velocity=np.array(cols[4], dtype=np.float64).reshape(-1, 3),
            label=np.array(cols[5], dtype=np.uint16),
            color=np.array(cols[6], dtype=np.float32).reshape(-1, 3),
            reflectivity=np.array(cols[7], dtype=np.float32),
            texture=np.array(cols[8], dtype=np.int8),
            param=np.array(cols[9], dtype=np.float32),
            instance=np.array(cols[10], dtype=np.int32),
            crosswalks=np.array(sorted(crosswalks), dtype=np.float64),
        )


FACADE_COLORS = np.array([
    [0.82, 0.74, 0.60], [0.62, 0.33, 0.25], [0.62, 0.62, 0.64], [0.90, 0.86, 0.76],
    [0.80, 0.60, 0.36], [0.50, 0.56, 0.62], [0.88, 0.88, 0.86], [0.70, 0.45, 0.35],
])  # fmt: skip
CAR_COLORS = np.array([
    [0.70, 0.08, 0.08], [0.10, 0.20, 0.55], [0.70, 0.72, 0.74], [0.08, 0.08, 0.09],
    [0.90, 0.90, 0.90], [0.30, 0.30, 0.32], [0.15, 0.35, 0.20], [0.85, 0.70, 0.10],
])  # fmt: skip
CLOTH_COLORS = np.array([
    [0.15, 0.15, 0.18], [0.20, 0.25, 0.45], [0.60, 0.10, 0.12], [0.85, 0.85, 0.80],
    [0.35, 0.30, 0.25], [0.20, 0.45, 0.30], [0.80, 0.55, 0.15], [0.45, 0.45, 0.50],
])  # fmt: skip
SKIN_COLORS = np.array([[0.85, 0.67, 0.53], [0.60, 0.42, 0.30], [0.40, 0.27, 0.18],
                        [0.95, 0.80, 0.70]])  # fmt: skip
SIGN_COLORS = np.array([[0.80, 0.10, 0.10], [0.10, 0.30, 0.75], [0.95, 0.80, 0.10],
                        [0.10, 0.50, 0.25]])  # fmt: skip
METAL = (0.35, 0.37, 0.38)
GLASS = (0.10, 0.12, 0.15)
TYRE = (0.06, 0.06, 0.06)
FOLIAGE = (0.20, 0.40, 0.12)
TRUNK = (0.35, 0.25, 0.16)
PAVING = np.array([0.62, 0.60, 0.57], dtype=np.float32)
SLAB = 0.8  # sidewalk paving slab size (m)


def _jitter(rng: np.random.Generator, color: Any, amount: float = 0.05) -> np.ndarray:
    return np.clip(np.asarray(color) * (1 + rng.uniform(-amount, amount, 3)), 0, 1)


def _car(b: _Builder, rng: np.random.Generator, x: float, y: float, yaw: float,
         velocity: tuple[float, float] = (0.0, 0.0)) -> None:  # fmt: skip
    """Body, cabin (glass with a painted roof) and four wheels, in the car frame (x forward)."""
    length, width = rng.uniform(4.0, 4.9), rng.uniform(1.72, 1.9)
    paint = _jitter(rng, CAR_COLORS[rng.integers(len(CAR_COLORS))])
    kw: dict[str, Any] = {"label": CAR, "instance": b.instance(), "velocity": (*velocity, 0.0)}
    origin = (x, y, 0.0)
    b.part(Shape.BOX, origin, yaw, (0, 0, 0.65), (length / 2, width / 2, 0.35), color=paint,
           reflectivity=0.25, **kw)
    b.part(Shape.BOX, origin, yaw, (-0.08 * length, 0, 1.26), (0.26 * length, width / 2 - 0.08,
           0.26), color=paint, reflectivity=0.25, texture=Texture.GLASS, **kw)  # fmt: skip
    for fx in (-0.32, 0.32):
        for side in (-1, 1):
            b.part(Shape.WHEEL, origin, yaw, (fx * length, side * (width / 2 - 0.13), 0.33),
                   (0.33, 0.12, 0.33), color=TYRE, reflectivity=0.06, **kw)


def _pedestrian(b: _Builder, rng: np.random.Generator, x: float, y: float, heading: float,
                speed: float) -> None:  # fmt: skip
    """Legs, torso, arms (cylinders) and head (ellipsoid), standing on the sidewalk."""
    base = CURB_HEIGHT
    scale = rng.uniform(0.9, 1.08)
    top = _jitter(rng, CLOTH_COLORS[rng.integers(len(CLOTH_COLORS))])
    pants = _jitter(rng, CLOTH_COLORS[rng.integers(len(CLOTH_COLORS))])
    skin = SKIN_COLORS[rng.integers(len(SKIN_COLORS))]
    velocity = (speed * np.cos(heading), speed * np.sin(heading), 0.0)
    kw: dict[str, Any] = {"label": PEDESTRIAN, "instance": b.instance(), "velocity": velocity,
          "reflectivity": 0.2}  # fmt: skip
    origin = (x, y, base)
    leg, torso_r = 0.85 * scale, rng.uniform(0.16, 0.21)
    for side in (-1, 1):
        b.part(Shape.CYLINDER, origin, heading, (0, side * 0.1, leg / 2), (0.075, 0.075, leg / 2),
               color=pants, **kw)
        b.part(Shape.CYLINDER, origin, heading, (0, side * (torso_r + 0.06), leg + 0.27 * scale),
               (0.05, 0.05, 0.28 * scale), color=top, **kw)
    b.part(Shape.CYLINDER, origin, heading, (0, 0, leg + 0.3 * scale),
           (torso_r, torso_r, 0.31 * scale), color=top, **kw)
    b.part(Shape.ELLIPSOID, origin, heading, (0, 0, leg + 0.74 * scale),
           (0.1, 0.1, 0.125) * np.array(scale), color=skin, **kw)


def _tree(b: _Builder, rng: np.random.Generator, x: float, y: float, base: float) -> None:
    kw: dict[str, Any] = {"label": VEGETATION, "instance": b.instance()}
    trunk_top = base + rng.uniform(2.6, 3.4)
    radius = rng.uniform(0.12, 0.2)
    b.add(Shape.CYLINDER, (x, y, (base + trunk_top) / 2), (radius, radius, (trunk_top - base) / 2),
          color=_jitter(rng, TRUNK), reflectivity=0.3, **kw)
    rh, rz = rng.uniform(1.5, 2.3), rng.uniform(1.6, 2.6)
    b.add(Shape.ELLIPSOID, (x, y, trunk_top + 0.8 * rz), (rh, rh * rng.uniform(0.85, 1.0), rz),
          yaw=rng.uniform(0, np.pi), color=_jitter(rng, FOLIAGE, 0.15), reflectivity=0.35,
          texture=Texture.FOLIAGE, **kw)


def _lamp(b: _Builder, x: float, side: int) -> None:
    """A street lamp: pole, arm over the road, lamp head. All of it is ``pole``."""
    kw: dict[str, Any] = {"label": POLE, "instance": b.instance(), "reflectivity": 0.35}
    y, height = side * 6.5, 7.5
    b.add(Shape.CYLINDER, (x, y, CURB_HEIGHT + height / 2), (0.09, 0.09, height / 2), color=METAL,
          **kw)
    b.add(Shape.BOX, (x, y - side * 0.9, CURB_HEIGHT + height - 0.1), (0.06, 0.9, 0.06),
          color=METAL, **kw)
    b.add(Shape.BOX, (x, y - side * 1.75, CURB_HEIGHT + height - 0.2), (0.25, 0.15, 0.08),
          color=(0.85, 0.85, 0.75), **kw)


def _sign(b: _Builder, rng: np.random.Generator, x: float, side: int) -> None:
    """A post (``pole``) with one or two plates (``traffic sign``) facing oncoming traffic."""
    y = side * 6.6
    b.add(Shape.CYLINDER, (x, y, CURB_HEIGHT + 1.45), (0.045, 0.045, 1.45), color=METAL,
          label=POLE, instance=b.instance(), reflectivity=0.35)
    # Traffic on the right side (y < 0) drives towards +x, so its signs face -x.
    facing = -1.0 if side < 0 else 1.0
    plate = b.instance()
    size = rng.uniform(0.3, 0.38)
    b.add(Shape.BOX, (x + facing * 0.07, y, CURB_HEIGHT + 2.55), (0.02, size, size),
          color=SIGN_COLORS[rng.integers(len(SIGN_COLORS))], label=TRAFFIC_SIGN, instance=plate,
          reflectivity=0.95, texture=Texture.SIGN, param=facing)
    if rng.random() < 0.5:
        b.add(Shape.BOX, (x + facing * 0.07, y, CURB_HEIGHT + 2.55 - size - 0.22),
              (0.02, size, 0.17), color=SIGN_COLORS[rng.integers(len(SIGN_COLORS))],
              label=TRAFFIC_SIGN, instance=plate, reflectivity=0.95, texture=Texture.SIGN,
              param=facing)


def _spaced(rng: np.random.Generator, start: float, stop: float, low: float, high: float,
            avoid: Sequence[float] = (), clearance: float = 0.0) -> list[float]:
    """Positions from ``start`` to ``stop`` with gaps in [low, high], away from ``avoid``."""
    out: list[float] = []
    x = start + rng.uniform(0, high)
    while x < stop:
        if all(abs(x - a) >= clearance for a in avoid):
            out.append(float(x))
        x += rng.uniform(low, high)
    return out


def build_scene(seed: int = 0, *, x_min: float = -80.0, x_max: float = 140.0) -> Scene:
    """A street from ``x_min`` to ``x_max`` (metres), fully determined by ``seed``.

    The ego starts at x = 0 in the right lane. A sign and pedestrians are always placed just
    ahead of it so that every class shows up in the first frames whatever the seed.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not x_max - x_min >= 40.0:
        raise ValueError(f"the street must be at least 40 m long, got x_min={x_min} x_max={x_max}")
    rng = np.random.default_rng([int(seed), 7])
    b = _Builder()

    crosswalks = [float(x) for x in np.arange(x_min + rng.uniform(40, 70), x_max - 10, 90.0)]

    for side in (-1, 1):
        # Buildings, with gardens in some gaps.
        x = x_min - rng.uniform(0, 10)
        while x < x_max:
            if rng.random() < 0.22:
                gap = rng.uniform(4.0, 9.0)
                hedge_y = side * (SIDEWALK_OUTER + 0.5)
                hedge_h = rng.uniform(0.9, 1.5)
                b.add(Shape.BOX, (x + gap / 2, hedge_y, hedge_h / 2),
                      ((gap - 0.6) / 2, 0.4, hedge_h / 2), label=VEGETATION,
                      color=_jitter(rng, FOLIAGE, 0.1), reflectivity=0.33,
                      texture=Texture.FOLIAGE, instance=b.instance())  # fmt: skip
                _tree(b, rng, x + gap / 2, side * (SIDEWALK_OUTER + 3.5), 0.0)
                x += gap
            width = rng.uniform(8.0, 22.0)
            depth = rng.uniform(10.0, 16.0)
            floors = int(rng.integers(2, 8))
            height = floors * 3.2 + rng.uniform(0.4, 1.4)
            setback = rng.uniform(0.0, 1.5) if rng.random() < 0.4 else 0.0
            b.add(Shape.BOX, (x + width / 2, side * (SIDEWALK_OUTER + setback + depth / 2),
                              height / 2), (width / 2, depth / 2, height / 2),
                  label=BUILDING, color=_jitter(rng, FACADE_COLORS[rng.integers(8)], 0.06),
                  reflectivity=0.3, texture=Texture.FACADE, param=rng.uniform(2.4, 3.6),
                  instance=b.instance())  # fmt: skip
            x += width + (rng.uniform(0.0, 0.6) if rng.random() < 0.3 else 0.0)

        lamps = _spaced(rng, x_min, x_max, 22.0, 30.0)
        for xl in lamps:
            _lamp(b, xl, side)
        first_sign = [15.0] if side < 0 else []  # always one sign ahead of the ego
        signs = first_sign + _spaced(rng, x_min, x_max, 28.0, 50.0, lamps + first_sign, 3.0)
        for xs in signs:
            _sign(b, rng, xs, side)
        for xt in _spaced(rng, x_min, x_max, 9.0, 16.0, lamps + signs, 2.5):
            _tree(b, rng, xt, side * 6.9, CURB_HEIGHT)

        # Parked cars in the parking strip, facing the traffic of their side.
        x = x_min + rng.uniform(0, 5)
        while x < x_max:
            if rng.random() < 0.72:
                yaw = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.03)
                _car(b, rng, x + 2.5, side * 4.75 + rng.normal(0, 0.1), yaw)
            x += rng.uniform(5.2, 10.0)

        # Pedestrians: some walking either way, some standing.
        walkers = [6.0, 11.0] if side < 0 else []
        walkers += _spaced(rng, x_min, x_max, 8.0, 20.0)
        for xp in walkers:
            heading = 0.0 if rng.random() < 0.5 else np.pi
            speed = 0.0 if rng.random() < 0.3 else rng.uniform(1.0, 1.6)
            _pedestrian(b, rng, xp, side * rng.uniform(7.6, 9.4), heading, speed)

    # Moving traffic: a lead car in the ego's lane, a follower, and oncoming cars.
    _car(b, rng, 22.0, EGO_LANE_Y, 0.0, (9.6, 0.0))
    _car(b, rng, -16.0, EGO_LANE_Y, 0.0, (9.0, 0.0))
    for x0 in np.arange(x_min + 70.0, x_max + 200.0, 55.0) + rng.uniform(-10, 10):
        speed = rng.uniform(8.0, 12.0)
        _car(b, rng, float(x0), ONCOMING_LANE_Y + rng.normal(0, 0.1), np.pi, (-speed, 0.0))

    return b.build(int(seed), float(x_min), float(x_max), crosswalks)


# ---------------------------------------------------------------------------------------------
# The ego's path


@dataclass(frozen=True)
class EgoPath:
    """Smooth drive of ``base_link`` along the right lane: speed swings and a gentle sway.

    ``x(t) = x0 + v t + a P / 2π (1 - cos 2πt/P)`` (speed ``v + a sin 2πt/P``) and
    ``y(t) = y0 + s sin²(π t / Q)`` (a lateral sway of ``s`` metres towards the centre line and
    back every ``Q`` seconds); the heading follows the velocity. Closed forms, so poses at any
    time (every LiDAR firing, every camera exposure, every /tf sample) agree exactly.
    """

    x0: float = 0.0
    y0: float = EGO_LANE_Y
    speed: float = 9.0
    speed_swing: float = 1.5
    speed_period: float = 8.0
    sway: float = 0.8
    sway_period: float = 6.0

    def state(self, t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, yaw) at drive times ``t`` (seconds, any shape)."""
        t = np.asarray(t, dtype=np.float64)
        w = 2 * np.pi / self.speed_period
        x = self.x0 + self.speed * t + self.speed_swing / w * (1 - np.cos(w * t))
        vx = self.speed + self.speed_swing * np.sin(w * t)
        q = np.pi / self.sway_period
        y = self.y0 + self.sway * np.sin(q * t) ** 2
        vy = self.sway * q * np.sin(2 * q * t)
        return x, y, np.arctan2(vy, vx)

    def __call__(self, t: Any) -> np.ndarray:
        """``map <- base_link`` transforms, shape ``t.shape + (4, 4)``."""
        x, y, yaw = self.state(t)
        out = np.zeros((*x.shape, 4, 4))
        c, s = np.cos(yaw), np.sin(yaw)
        out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1] = c, -s, s, c
        out[..., 2, 2] = out[..., 3, 3] = 1.0
        out[..., 0, 3], out[..., 1, 3] = x, y
        return out


# ---------------------------------------------------------------------------------------------
# Materials


@dataclass(frozen=True)
class Surface:
    """What a sensor sees at each hit: camera albedo, LiDAR reflectivity, label."""

    albedo: np.ndarray  # (N, 3) float32 in 0..1
    reflectivity: np.ndarray  # (N,) float32 in 0..1
    absorption: np.ndarray  # (N,) float32 probability that glass swallows a LiDAR return
    label: np.ndarray  # (N,) uint16


def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """Integer lattice -> uniform [0, 1): a murmur-style mix in wrapping uint32 arithmetic."""
    # int64 -> uint32 keeps the low 32 bits (two's complement), so negative cells hash fine.
    h = ix.astype(np.uint32) * np.uint32(73856093)
    h ^= iy.astype(np.uint32) * np.uint32(19349663)
    h ^= iz.astype(np.uint32) * np.uint32(83492791)
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0x5BD1E995)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def value_noise(p: np.ndarray, frequency: float, salt: int) -> np.ndarray:
    """Smooth 3D value noise in [0, 1) at world points ``p`` (N, 3); deterministic."""
    q = np.asarray(p, dtype=np.float64) * frequency
    i = np.floor(q)
    f = (q - i).astype(np.float32)
    f = f * f * (3 - 2 * f)
    i = i.astype(np.int64)
    out = np.zeros(len(q), dtype=np.float32)
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                out += wx * wy * wz * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, salt)
    return out


def _grain(p: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Per-cell random value in [0, 1) (unfiltered grain for asphalt and foliage)."""
    i = np.floor(np.asarray(p) / cell).astype(np.int64)
    return _hash(i[:, 0], i[:, 1], i[:, 2], salt)


ASPHALT = np.array([0.34, 0.34, 0.36], dtype=np.float32)
MARKING = np.array([0.88, 0.88, 0.84], dtype=np.float32)
GRASS = np.array([0.32, 0.45, 0.2], dtype=np.float32)
WINDOW = np.array([0.14, 0.18, 0.24], dtype=np.float32)
ROOF = np.array([0.36, 0.32, 0.31], dtype=np.float32)
FLOOR_HEIGHT = 3.2


def road_markings(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where the road surface is painted: centre dashes, edge lines, zebra crossings."""
    ay = np.abs(y)
    centre = (ay < 0.07) & (np.mod(x, 9.0) < 4.0)
    edge = np.abs(ay - LANE_WIDTH) < 0.06
    zebra = np.zeros_like(centre)
    for xc in scene.crosswalks:
        zebra |= (np.abs(x - xc) < 2.0) & (ay < ROAD_HALF_WIDTH - 0.4) & (np.mod(y, 1.0) < 0.5)
    return (centre | edge | zebra) & (ay < ROAD_HALF_WIDTH)


def surface(scene: Scene, prim: np.ndarray, rest: np.ndarray, local: np.ndarray,
            local_normal: np.ndarray) -> Surface:  # fmt: skip
    """Materials at hit points: ``prim`` is the primitive index (-1 ground, -2 no hit),
    ``rest`` the hit point on the object at rest (world frame at t = 0), ``local`` and
    ``local_normal`` the hit point and normal in the primitive's own frame."""
    n = len(prim)
    albedo = np.zeros((n, 3), dtype=np.float32)
    refl = np.zeros(n, dtype=np.float32)
    absorb = np.zeros(n, dtype=np.float32)
    label = np.zeros(n, dtype=np.uint16)

    ground = np.flatnonzero(prim == -1)
    if ground.size:
        p = rest[ground]
        ay = np.abs(p[:, 1])
        curb = np.abs(local_normal[ground, 1]) > 0.5
        walk = curb | (p[:, 2] > CURB_HEIGHT / 2)
        on_road = ~walk & (ay < ROAD_HALF_WIDTH)
        paint = on_road & road_markings(scene, p[:, 0], p[:, 1])
        tone = 0.8 + 0.25 * value_noise(p, 0.5, 11) + 0.15 * _grain(p, 0.05, 12)
        grass = GRASS * (0.8 + 0.4 * value_noise(p, 1.5, 13))[:, None]
        joint = (np.mod(p[:, 0] / SLAB, 1.0) < 0.05) | (np.mod(p[:, 1] / SLAB, 1.0) < 0.05)
        paving = PAVING * np.where(curb, 1.1, np.where(joint, 0.72, 1.0))[:, None]
        col = np.where(on_road[:, None], ASPHALT, np.where(walk[:, None], paving, grass))
        col = np.where(paint[:, None], MARKING * (0.93 + 0.07 * tone[:, None]), col * tone[:, None])
        albedo[ground] = col
        base = np.where(paint, 0.6, np.where(on_road, 0.1, np.where(walk, 0.28, 0.35)))
        refl[ground] = base * (0.75 + 0.25 * tone)
        label[ground] = np.where(on_road, ROAD, np.where(walk, SIDEWALK, UNLABELLED))

    obj = np.flatnonzero(prim >= 0)
    if obj.size == 0:
        return Surface(albedo, refl, absorb, label)
    m = prim[obj]
    p, lp, ln = rest[obj], local[obj], local_normal[obj]
    tex = scene.texture[m]
    col = scene.color[m].copy()
    r = scene.reflectivity[m].copy()
    a = np.zeros(len(obj), dtype=np.float32)
    col *= (0.92 + 0.16 * value_noise(p, 2.0, 21))[:, None]

    facade = np.flatnonzero(tex == Texture.FACADE)
    if facade.size:
        half = scene.half[m[facade]]
        q, nq = lp[facade], ln[facade]
        along_x = np.abs(nq[:, 1]) > 0.5  # facing +-y: the facade runs along local x
        u = np.where(along_x, q[:, 0] + half[:, 0], q[:, 1] + half[:, 1])
        extent = np.where(along_x, 2 * half[:, 0], 2 * half[:, 1])
        spacing = scene.param[m[facade]]
        z = q[:, 2] + half[:, 2]
        fu = np.mod(u / spacing, 1.0)
        fz = np.mod(z / FLOOR_HEIGHT, 1.0)
        inside = (u > 0.7) & (u < extent - 0.7)
        upper = inside & (fu > 0.25) & (fu < 0.75) & (fz > 0.3) & (fz < 0.8)
        upper &= (z > FLOOR_HEIGHT) & (z < 2 * half[:, 2] - 1.0)
        shop = inside & (fu > 0.08) & (fu < 0.92) & (z > 0.5) & (z < 2.6)
        roof = nq[:, 2] > 0.5
        window = (upper | shop) & ~roof
        shade = value_noise(p[facade], 0.7, 22)[:, None]
        base = col[facade]
        base = np.where(roof[:, None], ROOF * (0.85 + 0.3 * shade), base)
        # A darker band under each floor slab reads as storeys from a distance.
        band = (fz < 0.06) & (z > FLOOR_HEIGHT * 0.9) & ~roof
        base = np.where(band[:, None], base * 0.8, base)
        col[facade] = np.where(window[:, None], WINDOW * (0.8 + 0.5 * shade), base)
        r[facade] = np.where(window, 0.05, r[facade])
        a[facade] = np.where(window, 0.6, 0.0)

    foliage = np.flatnonzero(tex == Texture.FOLIAGE)
    if foliage.size:
        q = p[foliage]
        n1 = value_noise(q, 2.5, 31)
        n2 = _grain(q, 0.12, 32)
        tint = value_noise(q, 0.6, 33)[:, None]
        yellow = np.array([0.35, 0.45, 0.12], dtype=np.float32)
        base = col[foliage] * (1 - 0.5 * tint) + yellow * 0.5 * tint
        col[foliage] = base * (0.45 + 0.7 * n1 + 0.35 * n2)[:, None]
        r[foliage] *= 0.6 + 0.8 * n2

    glass = np.flatnonzero(tex == Texture.GLASS)
    if glass.size:
        roof = ln[glass, 2] > 0.5
        pane = np.asarray(GLASS, dtype=np.float32) * (0.8 + 0.4 * value_noise(p[glass], 0.8, 41)
                                                      )[:, None]  # fmt: skip
        col[glass] = np.where(roof[:, None], col[glass], pane)
        r[glass] = np.where(roof, r[glass], 0.05)
        a[glass] = np.where(roof, 0.0, 0.5)

    sign = np.flatnonzero(tex == Texture.SIGN)
    if sign.size:
        half = scene.half[m[sign]]
        q, nq = lp[sign], ln[sign]
        face = nq[:, 0] * scene.param[m[sign]] > 0.5
        rim = (np.abs(q[:, 1]) > 0.8 * half[:, 1]) | (np.abs(q[:, 2]) > 0.8 * half[:, 2])
        col[sign] = np.where(face[:, None], np.where(rim[:, None], MARKING, col[sign]),
                             np.asarray(METAL, dtype=np.float32))  # fmt: skip
        r[sign] = np.where(face, 0.95, 0.3)

    albedo[obj] = np.clip(col, 0, 1)
    refl[obj] = r
    absorb[obj] = a
    label[obj] = scene.label[m]
    return Surface(albedo, np.clip(refl, 0, 1), absorb, label)
