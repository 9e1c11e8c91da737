"""The one codec layer: sensor messages ↔ numpy, for rclpy and rosbags messages alike.

Every malformed message raises :class:`~clip2scene_ros.errors.MessageError`.
"""

from .camera_info import camera_info_to_model, model_to_camera_info
from .image import (
    ENCODINGS,
    decode_compressed_image,
    decode_image,
    encode_compressed_image,
    encode_image,
    image_to_rgb8,
)
from .pointcloud2 import (
    LABELLED_DTYPE,
    POINTFIELD_DTYPES,
    UNKNOWN_LABEL,
    LidarPoints,
    decode_pointcloud2,
    decode_xyz,
    encode_labelled_cloud,
    encode_pointcloud2,
    lidar_points,
    pack_rgb,
    pointcloud2_dtype,
    unpack_rgb,
)

__all__ = [
    "ENCODINGS",
    "LABELLED_DTYPE",
    "POINTFIELD_DTYPES",
    "UNKNOWN_LABEL",
    "LidarPoints",
    "camera_info_to_model",
    "decode_compressed_image",
    "decode_image",
    "decode_pointcloud2",
    "decode_xyz",
    "encode_compressed_image",
    "encode_image",
    "encode_labelled_cloud",
    "encode_pointcloud2",
    "image_to_rgb8",
    "lidar_points",
    "model_to_camera_info",
    "pack_rgb",
    "pointcloud2_dtype",
    "unpack_rgb",
]
