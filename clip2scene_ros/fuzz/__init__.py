"""Fuzzing the codecs and the node with malformed and adversarial sensor messages.

``clip2scene fuzz`` (and ``make fuzz``) runs :func:`run_fuzz`: hypothesis strategies
(:mod:`.clouds`, :mod:`.images`, :mod:`.camera_info`) build PointCloud2, Image,
CompressedImage and CameraInfo messages, the harness (:mod:`.harness`) runs each through the
codec calls the node makes (:mod:`.targets`) and a share of them through the node's Pipeline
(:mod:`.node`), under a per-case time limit and memory measurement (:mod:`.watchdog`).

Atheris is not used. It installs here (3.0.0 for CPython 3.11) but is no project requirement,
and its coverage guidance sees Python bytecode only unless native code is built with libFuzzer
instrumentation, which the PyPI builds of Pillow (libjpeg, zlib) and numpy are not. What it
could guide, our codecs and Pillow's Python header parsers, the structured corruptions here
reach directly: patched headers with valid CRCs, truncation, inserted and flipped bytes, and
every rejection of the codecs (see the report's ``rejected_fields``).
"""

from .harness import TYPES, run_fuzz

__all__ = ["TYPES", "run_fuzz"]
