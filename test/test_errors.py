"""One exception type per layer, each reported by the command line as one line and exit 2."""

from __future__ import annotations

import pytest

from clip2scene_ros import errors
from clip2scene_ros.cli import main as cli
from clip2scene_ros.errors import BagError, ConfigError, IntegrityError, MessageError

LAYER_ERRORS = {
    "config": ConfigError("sweeps", "must be >= 1, got 0", "train.yaml"),
    "bag": BagError("/data/drive", "opening drive_0.mcap", "the footer is gone"),
    "integrity": IntegrityError("sha256", "model.safetensors does not match", "m/model.yaml"),
    "message": MessageError("PointCloud2", "point_step", "is 0"),
}


def test_the_layers_have_distinct_types() -> None:
    assert set(errors.USER_ERRORS) == {ConfigError, BagError, IntegrityError, MessageError}
    for error in LAYER_ERRORS.values():
        assert isinstance(error, ValueError)
        others = [t for t in errors.USER_ERRORS if t is not type(error)]
        assert not isinstance(error, tuple(others)), type(error)


def test_a_bag_error_is_not_a_config_error() -> None:
    error = LAYER_ERRORS["bag"]
    assert not isinstance(error, ConfigError)
    assert isinstance(error, BagError) and error.source == error.bag == "/data/drive"
    assert str(error) == ("bags: cannot read bag /data/drive: opening drive_0.mcap: the footer "
                          "is gone")


@pytest.mark.parametrize("layer", sorted(LAYER_ERRORS))
def test_the_cli_reports_each_layer_error_in_one_line_and_exits_2(
        layer: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import clip2scene_ros.sample.drive as drive

    def fail(*args: object, **kwargs: object) -> None:
        raise LAYER_ERRORS[layer]

    monkeypatch.setattr(drive, "write_sample_drive", fail)
    assert cli(["sample", "--out", "unused"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines == [f"clip2scene sample: error: {LAYER_ERRORS[layer]}"], captured.err
