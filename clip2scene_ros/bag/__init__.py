"""rosbag2 input/output through ``rosbags`` (no ROS install needed).

- ``BagWriter`` (``bag.writer``): write messages to a new mcap or sqlite3 bag.
- ``BagReader`` / ``read_frames`` / ``ReaderConfig`` (``bag.reader``): a bag as a lazy stream of
  ``Frame``.
- ``detect_topics`` (``bag.topics``): which topics are the LiDAR, the cameras, the labels.
- ``match_nearest`` / ``ApproximateTimeSync`` (``bag.sync``): stamp matching within a slop.
- ``inspect_bag`` / ``format_inspect`` (``bag.inspect``): the report to run first on a recording.
- ``bag.read_errors``: where in a bag's storage files a read fails; ``bag.scans``: raw KITTI /
  nuScenes scan files outside a bag.

Names are imported on first use so that writing a bag does not pay for the image codecs.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "BagWriter": "writer",
    "BagReader": "reader",
    "ReaderConfig": "reader",
    "read_frames": "reader",
    "CameraTopics": "topics",
    "DetectedTopics": "topics",
    "detect_topics": "topics",
    "ApproximateTimeSync": "sync",
    "match_nearest": "sync",
    "inspect_bag": "inspect",
    "format_inspect": "inspect",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
