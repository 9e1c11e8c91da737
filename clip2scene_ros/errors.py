"""The two exception types every layer raises for bad input.

``MessageError`` is the one documented error of the codec layer: any malformed sensor message
(PointCloud2, Image, CompressedImage, CameraInfo, TF) raises it, never a bare ``IndexError`` or
``struct.error`` and never silently wrong arrays. The node catches exactly this type, counts it
by ``kind`` and goes on.

``ConfigError`` is raised while loading YAML configuration (node parameters, calibration files,
vocabularies, training configs); its message names the offending key.
"""

from __future__ import annotations


class MessageError(ValueError):
    """A sensor message that cannot be decoded or encoded.

    Attributes:
        kind: the message type, e.g. ``"PointCloud2"``.
        field: the message field that is wrong, e.g. ``"point_step"`` or ``"fields[2].offset"``.
        reason: what was wrong with it, in words.
    """

    def __init__(self, kind: str, field: str, reason: str) -> None:
        self.kind = kind
        self.field = field
        self.reason = reason
        super().__init__(f"{kind}.{field}: {reason}")


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range.

    Attributes:
        key: dotted path of the offending key, e.g. ``"cameras[1].topic"``.
        reason: what was wrong with it.
        source: the file (or other source) it came from, if known.
    """

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {reason}{where}")


class BagError(ConfigError):
    """A rosbag that cannot be read: a missing, corrupt or truncated storage file, or a message
    that cannot be read or decoded.

    A ``ConfigError`` (key ``bags``, source the bag), so every command that reports bad input
    reports it; the trainer's ``skip_bad`` leaves such bags or keyframes out instead.

    Attributes:
        bag: the bag directory.
        where: what was being read when it broke (storage file, topic, message position, log
            time, as far as known).
        cause: the underlying error, in words.
    """

    def __init__(self, bag: str, where: str, cause: str) -> None:
        self.bag = str(bag)
        self.where = where
        self.cause = cause
        super().__init__("bags", f"cannot read bag {bag}: {where}: {cause}")
        self.source = str(bag)
