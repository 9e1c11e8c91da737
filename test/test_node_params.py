"""The node's parameter schema: the shipped YAML, descriptions, and errors naming the parameter."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from clip2scene_ros.errors import ConfigError
from clip2scene_ros.node_params import NodeParams, description, load_node_params

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "clip2scene.yaml"


def test_shipped_yaml_declares_every_parameter_with_its_default() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    assert list(raw) == ["/**"]
    assert set(raw["/**"]["ros__parameters"]) == {f.name for f in fields(NodeParams)}
    assert load_node_params(SHIPPED) == NodeParams()


def test_every_parameter_is_described_in_its_field() -> None:
    for f in fields(NodeParams):
        assert f.metadata.get("description") == description(f.name), f.name
        assert len(description(f.name)) > 10, f.name


def test_node_name_key_and_plain_mapping() -> None:
    by_name = {"clip2scene_node": {"ros__parameters": {"lidar_topic": "/velodyne_points"}}}
    assert load_node_params(by_name).lidar_topic == "/velodyne_points"
    assert load_node_params({"sweeps": 3}).sweeps == 3


@pytest.mark.parametrize(("params", "key"), [
    ({"backend": "tflite"}, "backend"),
    ({"precision": "int4"}, "precision"),
    ({"sync_slop_s": -0.1}, "sync_slop_s"),
    ({"input_depth": 0}, "input_depth"),
    ({"fusion_weight": 1.5}, "fusion_weight"),
    ({"camera_topics": ["/a/image_raw"], "camera_info_topics": ["/a", "/b"]},
     "camera_info_topics"),
    ({"camera_topics": ["/a", "/a"]}, "camera_topics"),
    ({"device": "tpu"}, "device"),
    ({"build_only": True, "backend": "torch"}, "build_only"),
    ({"max_points": "many"}, "max_points"),
    ({"threads": -1}, "threads"),
    ({"lidar_topicc": "/x"}, "lidar_topicc"),
])
def test_invalid_values_name_the_parameter(params: dict, key: str, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    with pytest.raises(ConfigError) as info:
        load_node_params(path)
    assert info.value.key == key and info.value.source == str(path)


def test_camera_info_topics_default_to_the_image_namespace() -> None:
    params = NodeParams(camera_topics=["/cam_front/image_raw", "/cam_left/image/compressed"])
    assert params.info_topics() == ["/cam_front/camera_info", "/cam_left/camera_info"]
    given = NodeParams(camera_topics=["/a/img"], camera_info_topics=["/a/info"])
    assert given.info_topics() == ["/a/info"]


def test_threads_sets_the_networks_cpu_threads(tmp_path: Path) -> None:
    import torch

    from clip2scene_ros.models.spvcnn import save_random_bundle
    from clip2scene_ros.node.pipeline import predictor_from_params

    bundle = save_random_bundle(tmp_path / "m")
    before = torch.get_num_threads()
    try:
        predictor_from_params(NodeParams(model_path=str(bundle), backend="torch", threads=1))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        predictor_from_params(NodeParams(model_path=str(bundle), backend="torch"))  # 0: as is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_objects_vocabulary_is_resolved_when_it_names_a_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from clip2scene_ros.node_params import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("name: mine\n")
    for given, expected in [("modelnet40", "modelnet40"), ("", ""),
                            ("vocab/objects.yaml", str(tmp_path / "vocab/objects.yaml")),
                            ("things.yml", str(tmp_path / "things.yml")),
                            ("mine", str(tmp_path / "mine"))]:
        resolved = resolve_paths(NodeParams(objects_vocabulary=given))
        assert resolved.objects_vocabulary == expected, given


@pytest.mark.parametrize(("params", "key"), [
    ({"engine_min_points": -1}, "engine_min_points"),
    ({"engine_opt_points": 100, "engine_max_points": 50}, "engine_max_points"),
    ({"engine_min_points": 10, "engine_opt_points": 5}, "engine_opt_points"),
])
def test_engine_profile_parameters(params: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_params(params)
    assert info.value.key == key
    assert NodeParams().engine_profile() is None  # the bundle's
    assert NodeParams(engine_opt_points=5000).engine_profile() == (0, 5000, 0)


def test_precision_has_one_meaning_and_one_default(tmp_path: Path) -> None:
    """The node's precision is the Predictor's and the CLI's: the same names and the same
    default (``auto``), read from one place, and still importable without torch."""
    import inspect
    import subprocess
    import sys

    from clip2scene_ros.cli import build_parser
    from clip2scene_ros.precision_names import DEFAULT_PRECISION, PRECISIONS
    from clip2scene_ros.runtime.predictor import Predictor

    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16") and DEFAULT_PRECISION == "auto"
    assert NodeParams().precision == DEFAULT_PRECISION
    assert inspect.signature(Predictor).parameters["precision"].default == DEFAULT_PRECISION
    args = build_parser().parse_args(["eval", "--model", "m", "--bag", "b", "--json", "-"])
    assert args.precision == DEFAULT_PRECISION
    for name in PRECISIONS:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"clip2scene_node": {"ros__parameters": {
            "precision": name}}}))
        assert load_node_params(path).precision == name
    probe = subprocess.run([sys.executable, "-c", "import sys, clip2scene_ros.node_params; "
                            "print('torch' in sys.modules)"], capture_output=True, text=True,
                           check=True)
    assert probe.stdout.strip() == "False"
