"""The exception types of the layers: one per kind of bad input, each a ``ValueError``.

``MessageError`` is the one documented error of the codec layer: any malformed sensor message
(PointCloud2, Image, CompressedImage, CameraInfo, TF) raises it, never a bare ``IndexError`` or
``struct.error`` and never silently wrong arrays. The node catches exactly this type, counts it
by ``kind`` and goes on.

``BagError`` is the one error of the bag layer: a rosbag that cannot be read (missing, corrupt or
truncated storage, a message that cannot be read or decoded). It is not a ``ConfigError``: the
trainer's ``skip_bad`` leaves such bags or keyframes out, and everything else reports it.

``IntegrityError`` is raised for a stored artefact that is not what it claims to be: a model
bundle, a checkpoint, a teacher cache, a text bank or a TensorRT engine (and the ONNX graph it
is built from) with a wrong checksum, size, format, version or shape, cut short, or one TensorRT
cannot parse, build or deserialise. Its message says how to get a sound copy (export, copy or
compute it again).

``ConfigError`` is raised for configuration only: YAML configuration (node parameters,
calibration files, vocabularies, training configs, the spec inside a bundle) and arguments;
its message names the offending key.

:data:`USER_ERRORS` is every one of them: the command line prints one as one line on stderr
and exits 2, and the node's start-up logs one as one FATAL line and exits 2.
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


class _KeyedError(ValueError):
    """A ``key: reason (in source)`` error: what is wrong, why, and where it came from."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {reason}{where}")


class ConfigError(_KeyedError):
    """A configuration value that is missing, of the wrong type or out of range.

    Attributes:
        key: dotted path of the offending key, e.g. ``"cameras[1].topic"``.
        reason: what was wrong with it.
        source: the file (or other source) it came from, if known.
    """


class IntegrityError(_KeyedError):
    """A stored artefact (bundle, checkpoint, teacher cache, text bank, engine) that is damaged,
    cut short, of an unknown format or version, or does not match its recorded checksum.

    Attributes:
        key: the part that is wrong, e.g. ``"bundle_version"``, ``"sha256"``, ``"model.onnx"``.
        reason: what was wrong with it, and how to get a sound copy.
        source: the file it came from, if known.
    """


class BagError(ValueError):
    """A rosbag that cannot be read: a missing, corrupt or truncated storage file, or a message
    that cannot be read or decoded.

    Not a ``ConfigError``: commands report it as bad input of its own kind; the trainer's
    ``skip_bad`` leaves such bags or keyframes out instead.

    Attributes:
        bag: the bag directory (also ``source``).
        where: what was being read when it broke (storage file, topic, message position, log
            time, as far as known).
        cause: the underlying error, in words.
    """

    def __init__(self, bag: str, where: str, cause: str) -> None:
        self.bag = str(bag)
        self.where = where
        self.cause = cause
        self.source = str(bag)
        super().__init__(f"bags: cannot read bag {bag}: {where}: {cause}")


#: Every error that reports bad input (a fixable cause, not a bug): one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, BagError, IntegrityError, MessageError)
#: What stops the node's start-up with one FATAL line: bad input, or a file that is not there.
STARTUP_ERRORS: tuple[type[Exception], ...] = (*USER_ERRORS, FileNotFoundError)
