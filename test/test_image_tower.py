"""CLIP's image tower alone (``load_image_tower``): equal to the whole model's, or None.

A teacher with a cached text bank builds only this; if it ever differed from
``load_clip(...)[0].visual`` the cached labels would silently change, so every kind of weights is
compared here bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("open_clip")

from clip2scene_ros.teacher import clip_loader
from clip2scene_ros.teacher.clip_loader import (
    load_clip,
    load_image_tower,
    seeded_clip,
    seeded_image_tower,
    weights_identity,
)

pytestmark = pytest.mark.filterwarnings("ignore:CLIP .* has random weights")


def _assert_same_tower(tower: torch.nn.Module | None, visual: torch.nn.Module) -> None:
    assert tower is not None
    assert repr(tower) == repr(visual)  # the same layers, activations included
    ours, theirs = tower.state_dict(), visual.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert tower.preprocess_cfg == visual.preprocess_cfg
    assert not tower.training


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-rn", "ViT-B-16"])
def test_random_weights_equal_the_whole_models(model: str) -> None:
    state = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower = seeded_image_tower(model, "random")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    _assert_same_tower(tower, seeded_clip(model, None)[0].visual)


@pytest.fixture(scope="module")
def tiny_clip() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seeded_clip("tiny-vit", None)[0]


def test_weights_files_equal_the_whole_models(tmp_path: Path, tiny_clip: torch.nn.Module
                                              ) -> None:
    from safetensors.torch import save_file

    # a file with other weights than the seed's, and one stored in fp16 (loaded as fp32)
    state = {k: (v + 0.5).contiguous() for k, v in tiny_clip.state_dict().items()}
    safetensors = tmp_path / "tiny.safetensors"
    save_file(state, str(safetensors))
    half = tmp_path / "tiny_half.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in state.items()}}, half)
    for path in (safetensors, half):
        tower = load_image_tower("tiny-vit", str(path))
        _assert_same_tower(tower, load_clip("tiny-vit", str(path))[0].visual)
        assert tower is not None and not any(t.is_meta for t in tower.state_dict().values())


def test_a_file_whose_image_keys_do_not_fit_gives_none(tmp_path: Path,
                                                       tiny_clip: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    wrong = dict(state, **{"visual.proj": torch.zeros(3, 3)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert load_image_tower("tiny-vit", str(tmp_path / "wrong.safetensors")) is None
    renamed = {k.replace("visual.", "vision."): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    assert load_image_tower("tiny-vit", str(tmp_path / "renamed.safetensors")) is None


@pytest.fixture
def fake_tag(tmp_path: Path, tiny_clip: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
             ) -> Path:
    """A pretrained tag ``fake`` of tiny-vit: QuickGELU and its own normalisation, its weights
    left in the download cache (nothing is downloaded)."""
    from safetensors.torch import save_file

    path = tmp_path / "fake.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    cfg = {"hf_hub": "nobody/fake/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5),
           "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}
    monkeypatch.setattr("open_clip.pretrained.get_pretrained_cfg",
                        lambda model, tag: cfg if tag == "fake" else {})
    monkeypatch.setattr(clip_loader, "_cached_weights", lambda _cfg: str(path))
    return path


def test_a_tag_equals_the_whole_model(fake_tag: Path) -> None:
    tower = load_image_tower("tiny-vit", "fake")
    _assert_same_tower(tower, load_clip("tiny-vit", "fake")[0].visual)
    assert tower is not None and "QuickGELU" in repr(tower)
    assert tower.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("model", ["coca_ViT-B-32", "ViT-B-16-SigLIP"])
def test_models_that_are_not_a_plain_clip_give_none(model: str) -> None:
    # CoCa has a multimodal decoder, SigLIP a timm image tower and a custom text tower
    assert load_image_tower(model, "random") is None


def test_weights_identity(tmp_path: Path, fake_tag: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> None:
    import open_clip

    random = weights_identity("tiny-vit", "random")
    assert random == weights_identity("tiny-vit", None)
    assert random is not None and random["random_seed"] == clip_loader.RANDOM_WEIGHTS_SEED
    assert random["open_clip"] == open_clip.__version__ and random["torch"] == torch.__version__
    assert weights_identity("tiny-rn", None) != random

    tagged = weights_identity("tiny-vit", "fake")
    assert tagged is not None and tagged["tag"] == "fake"
    assert tagged["file"] == str(fake_tag.resolve())
    # a file counts by content: another file, or the same one rewritten, is another identity
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(fake_tag.read_bytes())
    first = weights_identity("tiny-vit", str(copy))
    assert first is not None and "tag" not in first and first != tagged
    copy.write_bytes(fake_tag.read_bytes() + b" ")
    assert weights_identity("tiny-vit", str(copy)) != first

    # a tag with no downloaded file has no identity: nothing is downloaded to find one
    monkeypatch.setattr(clip_loader, "_cached_weights", lambda _cfg: None)
    assert weights_identity("tiny-vit", "fake") is None
    assert weights_identity("tiny-vit", "no-such-tag") is None
    assert weights_identity("tiny-vit", str(tmp_path / "missing.safetensors")) is None


def test_maskclip_on_the_tower_alone(tiny_clip: Any) -> None:
    """MaskCLIP on the image tower alone gives the whole model's dense features."""
    from clip2scene_ros.teacher.maskclip import MaskCLIP

    tower = seeded_image_tower("tiny-vit", None)
    assert tower is not None
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(MaskCLIP(tower)(images), MaskCLIP(tiny_clip)(images))
