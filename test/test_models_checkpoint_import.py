"""Importing torchsparse-layout checkpoints: CLIP2Scene's nesting and extras, reports, safety."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.models.bundle import ArchitectureSpec
from clip2scene_ros.models.checkpoint import import_state_dict, read_state_dict
from clip2scene_ros.models.spvcnn import SPVCNN

ARCH = ArchitectureSpec(cr=0.25, clip_dim=8)


def clip2scene_checkpoint() -> tuple[dict, SPVCNN]:
    torch.manual_seed(1)
    source = SPVCNN(ARCH, in_channels=1, num_classes=5)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = dict(source.state_dict())
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    state["text_embeddings"] = torch.cat([torch.zeros(1, 8), text])
    state["point_mapping_global_random.weight"] = torch.zeros(8, source.feature_dim)
    return {"model_points": state, "epoch": 10, "config": {"voxel_size": 0.1}}, source


def test_clip2scene_checkpoint_imports_exactly(tmp_path: Path) -> None:
    checkpoint, source = clip2scene_checkpoint()
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    target = SPVCNN(ARCH, in_channels=1, num_classes=5)
    report = import_state_dict(target, read_state_dict(path), strict=True)
    assert report.complete and report.ignored == ["text_embeddings",
                                                  "point_mapping_global_random.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(report.text_bank, checkpoint["model_points"]["text_embeddings"][1:])


def test_prefixes_safetensors_and_the_report(tmp_path: Path) -> None:
    checkpoint, _ = clip2scene_checkpoint()
    state = {f"module.{k}": v for k, v in checkpoint["model_points"].items()}
    state.pop("module.stem.0.kernel")
    state["module.head.weight"] = torch.zeros(2)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    target = SPVCNN(ARCH, in_channels=1, num_classes=3)  # classifier of another size
    report = import_state_dict(target, read_state_dict(path))
    assert report.missing == ["stem.0.kernel"] and report.unexpected == ["head.weight"]
    assert [k for k, *_ in report.shape_mismatch] == ["classifier.0.bias", "classifier.0.weight"]
    text = report.summary()
    assert "missing (1): stem.0.kernel" in text and "shape mismatch classifier.0.weight" in text
    with pytest.raises(ConfigError, match="does not match the model"):
        import_state_dict(target, read_state_dict(path), strict=True)


class Payload:
    """Any class instance makes a checkpoint that needs full unpickling."""


def test_unsafe_or_empty_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(IntegrityError, match="never do"):
        read_state_dict(path)
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(IntegrityError, match="no state dict"):
        read_state_dict(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pt")
