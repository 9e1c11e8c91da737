"""YAML configuration: every error names the key, the file and what was wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from clip2scene_ros.config import load_config, read_yaml, to_dict
from clip2scene_ros.errors import ConfigError


@dataclass(frozen=True)
class Camera:
    name: str
    topic: str = "/image"
    slop_s: float = 0.05

    def validate(self) -> None:
        if self.slop_s <= 0:
            raise ConfigError("slop_s", f"must be > 0, got {self.slop_s}")


@dataclass(frozen=True)
class Settings:
    cameras: tuple[Camera, ...]
    mode: Literal["fusion", "lidar_only"] = "fusion"
    bundle: Path | None = None
    max_points: int = 100_000
    size: tuple[int, int] = (640, 480)
    weights: dict[str, float] = field(default_factory=dict)


def test_loads_nested_types() -> None:
    cfg = load_config(
        Settings,
        {
            "cameras": [{"name": "front"}, {"name": "left", "slop_s": 1}],
            "bundle": "models/a",
            "size": [1, 2],
            "weights": {"car": 2},
        },
    )
    assert cfg.cameras[1] == Camera("left", "/image", 1.0)
    assert isinstance(cfg.cameras[1].slop_s, float)
    assert cfg.bundle == Path("models/a")
    assert cfg.size == (1, 2)
    assert cfg.weights == {"car": 2.0}
    assert to_dict(cfg)["bundle"] == "models/a"
    assert load_config(Settings, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({}, "cameras", "required"),
        ({"cameras": [{"name": "a", "topc": "/x"}]}, "cameras[0].topc", "unknown key"),
        ({"cameras": [{"name": 3}]}, "cameras[0].name", "string"),
        ({"cameras": [], "max_points": 1.5}, "max_points", "integer"),
        ({"cameras": [], "max_points": True}, "max_points", "integer"),
        ({"cameras": [], "mode": "fast"}, "mode", "one of"),
        ({"cameras": [], "size": [1]}, "size", "2 items"),
        ({"cameras": [{"name": "a", "slop_s": -1}]}, "cameras[0].slop_s", "> 0"),
        ({"cameras": "front"}, "cameras", "list"),
        ({"cameras": [], "weights": {"car": "x"}}, "weights.car", "number"),
    ],
)
def test_errors_name_the_key(data: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Settings, data)
    assert info.value.key == key
    assert words in str(info.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cameras:\n  - name: a\n    slop_s: zero\n")
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.slop_s: must be a number.*bad\.yaml"):
        load_config(Settings, path)
    path.write_text("cameras: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(tmp_path / "missing.yaml")
