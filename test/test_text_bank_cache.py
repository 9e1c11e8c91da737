"""The text bank cache: its folder, its key, reuse across bags, and damaged or mismatched banks.

Every test here caches into its own tmp folder (``CLIP2SCENE_CACHE``), never the real home cache.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("open_clip")

from clip2scene_ros import cli
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.teacher import bank_cache, labeller
from clip2scene_ros.teacher import text_bank as text_bank_module
from clip2scene_ros.teacher.cache import TeacherCache
from clip2scene_ros.teacher.clip_loader import load_clip, weights_identity
from clip2scene_ros.teacher.run import run_teacher
from clip2scene_ros.teacher.text_bank import (
    cached_bank_without_text_tower,
    cached_text_bank,
    encode_text_bank,
    load_text_bank,
)
from clip2scene_ros.vocabulary import Vocabulary, VocabularyClass

pytestmark = pytest.mark.filterwarnings("ignore:CLIP tiny-vit has random weights")

TEMPLATES = ("a photo of a {}.", "there is a {} in the scene.")
LOGGER = "clip2scene_ros.teacher.text_bank"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CLIP2SCENE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return load_clip("tiny-vit", None)


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(name="toy set", prompts="single", classes=(
        VocabularyClass("car", (0, 0, 142), synonyms=("van",)),
        VocabularyClass("tree", (0, 175, 0)),
    ))


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the encodings (cache misses) that go through ``encode_text_bank``."""
    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return encode_text_bank(*args, **kwargs)

    monkeypatch.setattr(text_bank_module, "encode_text_bank", counting)
    return calls


def _bank(tiny: tuple[torch.nn.Module, Any], vocab: Vocabulary,
          templates: tuple[str, ...] = TEMPLATES, **kw: Any) -> torch.Tensor:
    return cached_text_bank(*tiny, vocab, templates, model_name="tiny-vit", pretrained=None,
                            **kw)


def _cached_files(cache: Path) -> list[Path]:
    folder = cache / bank_cache.BANKS_DIR
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIP2SCENE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bank_cache.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("CLIP2SCENE_CACHE")
    assert bank_cache.cache_root() == tmp_path / "xdg" / "clip2scene"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert bank_cache.cache_root() == tmp_path / "home" / ".cache" / "clip2scene"


def test_second_call_reads_the_cache(tiny: tuple[torch.nn.Module, Any], vocab: Vocabulary,
                                     cache: Path, encodes: list[int],
                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = _bank(tiny, vocab)
    assert encodes == [1] and "stored in the cache" in caplog.text
    files = _cached_files(cache)
    # vocab build's format, named for the vocabulary; atomic writes leave no temporary files
    assert [p.suffix for p in files] == [".safetensors", ".yaml"]
    assert files[0].name.startswith("toy_set-")
    stored, spec, provenance = load_text_bank(files[0])
    assert torch.equal(stored, first) and list(spec.classes) == ["car", "tree"]
    assert provenance["cache_key"]["templates"] == list(TEMPLATES)
    assert provenance["precision"] == "fp32"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = _bank(tiny, vocab)
    assert encodes == [1] and torch.equal(again, first)
    assert "using the cached bank" in caplog.text
    assert torch.allclose(first, encode_text_bank(*tiny, vocab, TEMPLATES), atol=1e-6)


def test_the_key_covers_what_changes_the_bank(tiny: tuple[torch.nn.Module, Any],
                                              vocab: Vocabulary, cache: Path,
                                              encodes: list[int]) -> None:
    model = tiny[0]
    _bank(tiny, vocab)
    # another template set, another synonym, another precision: each is a new bank
    _bank(tiny, vocab, TEMPLATES[:1])
    synonym = Vocabulary(vocab.name, (VocabularyClass("car", (0, 0, 142), synonyms=("auto",)),
                                      vocab.classes[1]))
    _bank(tiny, synonym)
    _bank(tiny, vocab, precision="bf16")
    assert len(encodes) == 4 and len(_cached_files(cache)) == 8
    # the palette and the vocabulary's name do not change the numbers: same bank
    recoloured = Vocabulary("toy set", (VocabularyClass("car", (1, 2, 3), synonyms=("van",)),
                                        vocab.classes[1]))
    _bank(tiny, recoloured)
    assert len(encodes) == 4
    # other text weights are another bank; other image weights are not
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.visual.conv1.weight.add_(1.0)
            _bank(tiny, vocab)
            assert len(encodes) == 4
            model.ln_final.weight.add_(0.5)
            _bank(tiny, vocab)
            assert len(encodes) == 5
    finally:
        model.load_state_dict(saved)
    # a tag is another key than random weights, even with the same numbers
    assert bank_cache.weights_origin("openai") == "tag:openai"
    assert bank_cache.weights_origin(None) == bank_cache.weights_origin("random") == "random"


def _rewrite_yaml(path: Path, edit: Any) -> None:
    meta = yaml.safe_load(path.read_text())
    edit(meta)
    path.write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.mark.parametrize("damage", ["truncated", "garbage yaml", "other key", "other classes",
                                    "tensors only"])
def test_damaged_or_mismatched_banks_are_rebuilt(tiny: tuple[torch.nn.Module, Any],
                                                 vocab: Vocabulary, cache: Path,
                                                 encodes: list[int], damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    good = _bank(tiny, vocab)
    tensors, meta = _cached_files(cache)
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-40])
    elif damage == "garbage yaml":
        meta.write_text("format: [unclosed\n")
    elif damage == "other key":
        _rewrite_yaml(meta, lambda m: m["provenance"]["cache_key"].update(precision="bf16"))
    elif damage == "other classes":
        _rewrite_yaml(meta, lambda m: m["vocabulary"].update(classes=["bus", "tree"]))
    else:
        meta.unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = _bank(tiny, vocab)
    assert encodes == [1, 1]
    assert "ignoring" in caplog.text and str(tensors.with_suffix("")) in caplog.text
    torch.testing.assert_close(rebuilt, good, atol=1e-6, rtol=1e-6)
    # the rebuilt bank replaced the bad one: the next call reads it without a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _bank(tiny, vocab)
    assert encodes == [1, 1] and "using the cached bank" in caplog.text
    assert "ignoring" not in caplog.text


def test_an_unwritable_cache_only_warns(tiny: tuple[torch.nn.Module, Any], vocab: Vocabulary,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CLIP2SCENE_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        bank = _bank(tiny, vocab)
    assert bank.shape == (2, 32) and "cannot store" in caplog.text


# ----------------------------------------------------------- the bank without the text tower


def _without(vocab: Vocabulary, weights: dict[str, Any] | None,
             templates: tuple[str, ...] = TEMPLATES, **kw: Any) -> torch.Tensor | None:
    return cached_bank_without_text_tower(weights, vocab, templates, model_name="tiny-vit",
                                          pretrained=None, **kw)


def test_a_remembered_text_tower_finds_the_bank_without_it(
        tiny: tuple[torch.nn.Module, Any], vocab: Vocabulary, cache: Path,
        encodes: list[int]) -> None:
    weights = weights_identity("tiny-vit", None)
    _bank(tiny, vocab)  # who does not say how the model was loaded has nothing remembered
    assert _without(vocab, weights) is None
    assert not (cache / bank_cache.TOWERS_DIR).exists()
    bank = _bank(tiny, vocab, weights=weights)
    found = _without(vocab, weights)
    assert found is not None and torch.equal(found, bank) and encodes == [1]
    # a bank the cache does not hold is None, never another bank
    assert _without(vocab, weights, TEMPLATES[:1]) is None
    assert _without(vocab, weights, precision="bf16") is None
    # other weights have no remembered text tower
    assert weights is not None
    assert _without(vocab, {**weights, "random_seed": 1}) is None
    assert _without(vocab, None) is None


@pytest.mark.parametrize("damage", ["garbage", "other weights", "no sha256", "other tower"])
def test_a_damaged_record_only_costs_the_text_tower(tiny: tuple[torch.nn.Module, Any],
                                                    vocab: Vocabulary, cache: Path, damage: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    weights = weights_identity("tiny-vit", None)
    _bank(tiny, vocab, weights=weights)
    [record] = (cache / bank_cache.TOWERS_DIR).iterdir()
    data = json.loads(record.read_text())
    if damage == "garbage":
        record.write_text("{not json")
    elif damage == "other weights":
        data["weights"]["random_seed"] = 7
    elif damage == "no sha256":
        data["text_tower"] = "abc"
    else:  # a well-formed checksum under which no bank is cached
        data["text_tower"] = "0" * 64
    if damage != "garbage":
        record.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="clip2scene_ros.teacher.bank_cache"):
        assert _without(vocab, weights) is None
    assert ("ignoring" in caplog.text) == (damage != "other tower")
    _bank(tiny, vocab, weights=weights)  # the next run with the whole model remembers again
    assert _without(vocab, weights) is not None


# ------------------------------------------------------------------------------- the teacher


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bank_cache") / "drive"
    write_sample_drive(path, frames=1, seed=0, rig=small_rig())
    return path


KW = {"model": "tiny-vit", "image_size": (64, 128), "prompts": "single", "progress": False}


def _no_whole_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole CLIP was loaded")

    monkeypatch.setattr(labeller, "seeded_clip", refuse)


def test_a_second_bag_reuses_the_bank(drive: Path, tmp_path: Path, cache: Path,
                                      encodes: list[int], monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    first = run_teacher(drive, "sample_drive", tmp_path / "one", **KW)
    assert encodes == [1] and first.complete and len(_cached_files(cache)) == 2
    # another cache directory (what another bag gets): the bank comes from the bank cache,
    # and only CLIP's image tower is built
    _no_whole_clip(monkeypatch)
    second = run_teacher(drive, "sample_drive", tmp_path / "two", **KW)
    assert encodes == [1] and second.complete and second.cache_key == first.cache_key
    a, b = TeacherCache(tmp_path / "one"), TeacherCache(tmp_path / "two")
    assert (a.frame(0).label == b.frame(0).label).all()
    assert (a.frame(0).confidence == b.frame(0).confidence).all()
    # a prebuilt bank file is used as given: no encoding, no new cache entry, no text tower
    bank = _cached_files(cache)[0].with_suffix("")
    run_teacher(drive, str(bank), tmp_path / "three", **{**KW, "prompts": None})
    assert encodes == [1] and len(_cached_files(cache)) == 2
    assert (TeacherCache(tmp_path / "three").frame(0).label == a.frame(0).label).all()


def test_vocab_build_fills_the_cache_for_the_teacher(drive: Path, tmp_path: Path, cache: Path,
                                                     tiny: tuple[torch.nn.Module, Any],
                                                     encodes: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny[0].state_dict().items()}, str(weights))
    assert cli.main(["vocab", "build", "--vocab", "sample_drive", "--model", "tiny-vit",
                     "--pretrained", str(weights), "--prompts", "single",
                     "--out", str(tmp_path / "bank")]) == 0
    assert encodes == [1] and len(_cached_files(cache)) == 2
    built = load_text_bank(tmp_path / "bank")[0]
    with monkeypatch.context() as patch:
        _no_whole_clip(patch)  # vocab build remembered the weights' text tower
        report = run_teacher(drive, "sample_drive", tmp_path / "out",
                             **{**KW, "pretrained": str(weights)})
    assert report.complete and encodes == [1]
    assert torch.equal(load_text_bank(_cached_files(cache)[0])[0], built)
    # random weights in vocab build are not seeded: never cached
    assert cli.main(["vocab", "build", "--vocab", "sample_drive", "--model", "tiny-vit",
                     "--pretrained", "random", "--prompts", "single",
                     "--out", str(tmp_path / "random_bank")]) == 0
    assert encodes == [1, 1] and len(_cached_files(cache)) == 2


def test_the_teacher_command_says_when_it_reuses_a_cached_bank(
        drive: Path, tmp_path: Path, cache: Path, tiny: tuple[torch.nn.Module, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny[0].state_dict().items()}, str(weights))
    for out in ("one", "two"):
        assert cli.main(["teacher", "--bag", str(drive), "--vocab", "sample_drive",
                         "--model", "tiny-vit", "--pretrained", str(weights),
                         "--image-size", "64", "128", "--quiet",
                         "--out", str(tmp_path / out)]) == 0
    err = capsys.readouterr().err
    assert err.count("text bank: stored in the cache") == 1
    assert err.count("text bank: using the cached bank") == 1
