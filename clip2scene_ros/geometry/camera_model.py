"""The camera model shared by the codecs (CameraInfo ↔ model) and by projection."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Distortion models of ``sensor_msgs/CameraInfo`` that we project with, and their D lengths.
DISTORTION_MODELS: dict[str, tuple[int, ...]] = {
    "none": (0,),
    "plumb_bob": (5,),  # k1 k2 t1 t2 k3
    "rational_polynomial": (8, 12, 14),  # k1 k2 t1 t2 k3 k4 k5 k6 [s1..s4 [tx ty]]
    "equidistant": (4,),  # k1 k2 k3 k4 (Kannala–Brandt fisheye)
}


@dataclass(frozen=True)
class RegionOfInterest:
    """``CameraInfo.roi`` in full-resolution (unbinned) pixels; all zeros means the full image."""

    x_offset: int = 0
    y_offset: int = 0
    width: int = 0
    height: int = 0
    do_rectify: bool = False


@dataclass(frozen=True)
class CameraModel:
    """Intrinsics of one camera as ``sensor_msgs/CameraInfo`` defines them.

    ``width``/``height``/``K``/``D``/``R``/``P`` describe the full-resolution sensor; ``binning``
    and ``roi`` describe how the published image was sub-sampled and cropped from it.
    Arrays are float64 and read-only.
    """

    width: int
    height: int
    K: np.ndarray  # (3, 3)
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,)
    distortion_model: str = "none"
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # (3, 3)
    P: np.ndarray | None = None  # (3, 4); None means [K | 0]
    binning_x: int = 0
    binning_y: int = 0
    roi: RegionOfInterest = field(default_factory=RegionOfInterest)

    def __post_init__(self) -> None:
        def frozen(name: str, value: np.ndarray, shape: tuple[int, ...] | None) -> None:
            arr = np.array(value, dtype=np.float64)
            if shape is not None and arr.shape != shape:
                raise ValueError(f"CameraModel.{name} must have shape {shape}, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"CameraModel.{name} has non-finite values")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

        frozen("K", self.K, (3, 3))
        frozen("D", np.ravel(self.D), None)
        frozen("R", self.R, (3, 3))
        frozen("P", np.hstack([self.K, np.zeros((3, 1))]) if self.P is None else self.P, (3, 4))
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"CameraModel size must be positive, got {self.width}x{self.height}")
        if self.distortion_model not in DISTORTION_MODELS:
            raise ValueError(
                f"CameraModel.distortion_model {self.distortion_model!r} is not one of "
                f"{sorted(DISTORTION_MODELS)}"
            )
        lengths = DISTORTION_MODELS[self.distortion_model]
        if self.distortion_model != "none" and self.D.size not in lengths:
            raise ValueError(
                f"CameraModel.D has {self.D.size} coefficients; {self.distortion_model} takes "
                f"{' or '.join(map(str, lengths))}"
            )
        if self.binning_x < 0 or self.binning_y < 0:
            raise ValueError("CameraModel.binning must be >= 0")
