"""The synthetic sample drive: the embedded default data of the demo and the tests.

- ``build_scene`` / ``EgoPath`` (``sample.scene``): the procedural street and the vehicle's path.
- ``nearest_hits`` / ``occluded`` (``sample.raycast``): vectorised ray casting against it.
- ``scan`` / ``LidarModel`` / ``HDL32E`` (``sample.lidar``): a rotating 32-beam LiDAR.
- ``render`` / ``front_camera`` / ``left_camera`` (``sample.camera``): camera images.
- ``write_sample_drive`` / ``SampleDriveInfo`` / ``SampleRig`` (``sample.drive``): the rosbag2.

Names are imported on first use, so importing one module does not pay for the others.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Scene": "scene",
    "EgoPath": "scene",
    "build_scene": "scene",
    "nearest_hits": "raycast",
    "occluded": "raycast",
    "LidarModel": "lidar",
    "HDL32E": "lidar",
    "Scan": "lidar",
    "scan": "lidar",
    "SampleCamera": "camera",
    "Rendering": "camera",
    "front_camera": "camera",
    "left_camera": "camera",
    "render": "camera",
    "SampleRig": "drive",
    "SampleDriveInfo": "drive",
    "write_sample_drive": "drive",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
