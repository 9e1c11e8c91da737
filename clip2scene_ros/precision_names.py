"""The precision names and their one default, without torch (the node's parameter schema reads
them before anything heavy is imported); what they mean is :mod:`clip2scene_ros.precision`'s."""

from __future__ import annotations

from typing import Final, Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: The one default of the node, the Predictor and the CLI: the device's choice.
DEFAULT_PRECISION: Final = "auto"
