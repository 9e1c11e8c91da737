"""The model bundle: exact round trip, atomic replace, version and consistency refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.files import file_sha256
from clip2scene_ros.models.bundle import (
    FILES_KEY,
    SPEC_FILE,
    WEIGHTS_FILE,
    ArchitectureSpec,
    BundleSpec,
    EngineSpec,
    InputSpec,
    VocabularySpec,
    load_bundle,
    load_spec,
    save_bundle,
)

VOCAB = VocabularySpec("tiny", ("road", "car", "tree"), ((1, 2, 3), (4, 5, 6), (7, 8, 9)))


def spec(**arch: object) -> BundleSpec:
    return BundleSpec(
        architecture=ArchitectureSpec(cr=0.5, clip_dim=8, **arch),  # type: ignore[arg-type]
        input=InputSpec(voxel_size=0.05, features=("x", "y", "z", "intensity"),
                        scale=(1.0, 1.0, 1.0, 1 / 255), sweeps=3),
        vocabulary=VOCAB,
        text_bank={"model": "ViT-B-16", "pretrained": "openai", "templates": "maskclip85"},
        provenance={"trainer": "test", "epochs": 2},
    )


def bank(rows: int = 3, dim: int = 8) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim), dim=1)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    weights = {"stem.0.kernel": torch.randn(27, 4, 16), "stem.1.running_mean": torch.randn(16),
               "stem.1.num_batches_tracked": torch.tensor(7)}
    text = bank()
    path = save_bundle(tmp_path / "model", spec(), weights, text, onnx=b"onnx-bytes")
    loaded = load_bundle(path)
    assert loaded.spec == spec()
    assert loaded.state_dict.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(loaded.state_dict[key], value) and loaded.state_dict[key].dtype == \
            value.dtype
    assert torch.equal(loaded.text_bank, text)
    assert loaded.onnx_path == path / "model.onnx"
    assert sorted(p.name for p in path.iterdir()) == sorted(["model.onnx", SPEC_FILE, WEIGHTS_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_replace_needs_overwrite_and_is_whole(tmp_path: Path) -> None:
    path = save_bundle(tmp_path / "m", spec(), {"a": torch.zeros(2)}, bank())
    with pytest.raises(FileExistsError, match="overwrite"):
        save_bundle(path, spec(), {"a": torch.ones(2)}, bank())
    save_bundle(path, spec(), {"b": torch.ones(2)}, bank(), overwrite=True)
    loaded = load_bundle(path)
    assert list(loaded.state_dict) == ["b"] and loaded.onnx_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_swapping_the_vocabulary(tmp_path: Path) -> None:
    loaded = load_bundle(save_bundle(tmp_path / "m", spec(), {}, bank()))
    five = VocabularySpec("five", tuple("abcde"), tuple((i, i, i) for i in range(5)))
    swapped = loaded.with_text_bank(bank(5), five)
    assert swapped.spec.vocabulary.name == "five" and swapped.text_bank.shape == (5, 8)
    with pytest.raises(ConfigError, match="5 classes"):
        loaded.with_text_bank(bank(4), five)


def test_unknown_or_newer_version_is_refused_with_advice(tmp_path: Path) -> None:
    path = save_bundle(tmp_path / "m", spec(), {}, bank())
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    raw["bundle_version"] = 7
    raw["new_section"] = {"from": "the future"}
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(IntegrityError, match="newer clip2scene_ros: upgrade") as info:
        load_bundle(path)
    assert info.value.key == "bundle_version"
    raw["bundle_version"] = "one"
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(IntegrityError, match="re-export"):
        load_spec(path)


def _record_weights(path: Path) -> None:
    """Re-record model.safetensors' size and checksum in model.yaml, as a bundle writer with a
    bug would: the content checks behind the checksum must still catch what it wrote."""
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    weights = path / WEIGHTS_FILE
    raw[FILES_KEY][WEIGHTS_FILE] = {"bytes": weights.stat().st_size,
                                    "sha256": file_sha256(weights)}
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))


def test_bad_bundles_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        load_bundle(tmp_path)
    path = save_bundle(tmp_path / "m", spec(), {"a": torch.zeros(1)}, bank())
    save_file({"model.a": torch.zeros(1)}, str(path / WEIGHTS_FILE))
    _record_weights(path)
    with pytest.raises(IntegrityError, match="text_bank: missing"):
        load_bundle(path)
    save_file({"text_bank": bank(2)}, str(path / WEIGHTS_FILE))
    _record_weights(path)
    with pytest.raises(IntegrityError, match=r"shape \(2, 8\); the vocabulary has 3"):
        load_bundle(path)
    save_file({"text_bank": bank(), "optimizer.m": torch.zeros(1)}, str(path / WEIGHTS_FILE))
    _record_weights(path)
    with pytest.raises(IntegrityError, match="unexpected tensors"):
        load_bundle(path)
    (path / WEIGHTS_FILE).write_bytes(b"\x80\x04 a pickle is never loaded")
    _record_weights(path)
    with pytest.raises(IntegrityError, match="cannot be read"):
        load_bundle(path)
    with pytest.raises(ConfigError, match="non-finite"):  # a bank handed to save: the caller's
        save_bundle(tmp_path / "n", spec(), {}, torch.full((3, 8), float("nan")))


@pytest.mark.parametrize(("section", "value", "key"), [
    ("input", {"features": ["colour"]}, "input.features"),
    ("input", {"features": ["x"], "scale": [1.0, 2.0]}, "input.scale"),
    ("input", {"voxel_size": 0}, "input.voxel_size"),
    ("architecture", {"widths": [1, 2]}, "architecture.widths"),
    ("architecture", {"name": "minkunet"}, "architecture.name"),
    ("engine", {"opt_points": 0}, "engine.opt_points"),
    ("engine", {"min_points": 0}, "engine.min_points"),
    ("engine", {"voxel_ratios": [1.0, 1.5]}, "engine.voxel_ratios"),
    ("engine", {"min_points": 10, "max_points": 5}, "engine.max_points"),
])
def test_spec_values_are_validated(tmp_path: Path, section: str, value: dict, key: str) -> None:
    path = save_bundle(tmp_path / "m", spec(), {}, bank())
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    raw[section] = value
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.key == key


def test_engine_profile_defaults_to_the_input_max_and_older_bundles_load(tmp_path: Path) -> None:
    assert EngineSpec().profile(400_000) == (1, 100_000, 400_000)
    assert EngineSpec().profile(20_000) == (1, 20_000, 20_000)  # opt capped at the max
    assert EngineSpec(min_points=8, opt_points=50, max_points=90_000).profile(20_000) == (
        8, 50, 20_000)  # never above what the input can send
    path = save_bundle(tmp_path / "m", spec(), {}, bank())
    raw = yaml.safe_load((path / SPEC_FILE).read_text())
    assert raw["engine"]["voxel_ratios"] == [1.0, 0.78, 0.55, 0.35, 0.2]
    del raw["engine"]  # a bundle written before the section existed
    (path / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_spec(path).engine == EngineSpec()
