"""Text banks with the tiny random CLIP: the recipe, the file format, CLIP loading, the CLI.

Nothing here touches the network: tag resolution is stubbed so that a run on a machine with
internet does not download ViT-B-16 either.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("open_clip")

from clip2scene_ros import cli
from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.precision import resolve_precision
from clip2scene_ros.teacher import clip_loader
from clip2scene_ros.teacher.clip_loader import load_clip, tiny_model_config
from clip2scene_ros.teacher.prompts import load_prompts
from clip2scene_ros.teacher.text_bank import (
    bank_paths,
    encode_text_bank,
    load_text_bank,
    save_text_bank,
)
from clip2scene_ros.vocabulary import (
    Vocabulary,
    VocabularyClass,
    builtin_vocabulary,
    load_vocabulary,
)

TEMPLATES = ("a photo of a {}.", "there is a {} in the scene.", "a blurry photo of the {}.")
BOTH_OPTIONS = ("internet", "--pretrained /path/to/weights")


def _load(model: str, pretrained: str | None = None) -> tuple[torch.nn.Module, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is expected here
        return load_clip(model, pretrained)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    return _load("tiny-vit")


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(name="toy", prompts="single", classes=(
        VocabularyClass("traffic_cone", (255, 127, 0), synonyms=("pylon", "safety cone")),
        VocabularyClass("car", (0, 0, 142)),
        VocabularyClass("tree", (0, 175, 0), synonyms=("bush",)),
    ))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and an empty weights cache, whatever the machine running the tests has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(clip_loader, "_hub_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(clip_loader, "_cached_weights", lambda cfg: None)


def test_tiny_configs() -> None:
    vit, rn = tiny_model_config("vit"), tiny_model_config("resnet")
    assert vit["embed_dim"] == rn["embed_dim"] == 32
    assert vit["vision_cfg"]["patch_size"] == 16 and rn["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert vit["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 1}


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_bank_shape_and_unit_rows(name: str, vocab: Vocabulary) -> None:
    model, tokenizer = _load(name)
    bank = encode_text_bank(model, tokenizer, vocab, TEMPLATES)
    assert bank.shape == (3, 32) and bank.dtype == torch.float32
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(3))
    # a real bundle's text bank has the same layout
    assert model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 32)


def test_bank_equals_hand_computation(tiny: tuple[torch.nn.Module, Any],
                                      vocab: Vocabulary) -> None:
    model, tokenizer = tiny
    # batch size 2 cuts across sentences and classes; the result must not depend on it
    bank = encode_text_bank(model, tokenizer, vocab, TEMPLATES, batch_size=2)
    with torch.no_grad():
        rows = []
        for name in ("traffic_cone", "pylon", "safety cone"):  # name kept with its underscore
            for template in TEMPLATES:
                emb = model.encode_text(tokenizer([template.format(name)]))[0]
                rows.append(emb / emb.norm())
        expected = torch.stack(rows).mean(0)
        expected = expected / expected.norm()
    torch.testing.assert_close(bank[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bank, encode_text_bank(model, tokenizer, vocab, TEMPLATES),
                               atol=1e-5, rtol=1e-5)
    # synonyms change the embedding: they are averaged in, not ignored
    alone = Vocabulary("one", (VocabularyClass("traffic_cone", (0, 0, 0)),))
    alone_bank = encode_text_bank(model, tokenizer, alone, TEMPLATES)
    assert not torch.allclose(alone_bank[0], bank[0])


def test_bad_templates_refused(tiny: tuple[torch.nn.Module, Any], vocab: Vocabulary) -> None:
    with pytest.raises(ConfigError):
        encode_text_bank(*tiny, vocab, ["no placeholder"])


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".yaml"])
def test_save_load_round_trip(tmp_path: Path, tiny: tuple[torch.nn.Module, Any],
                              vocab: Vocabulary, suffix: str) -> None:
    bank = encode_text_bank(*tiny, vocab, TEMPLATES)
    base = save_text_bank(tmp_path / f"toy{suffix}", bank, vocab,
                          {"model": "tiny-vit", "pretrained": "random", "prompts": "test",
                           "templates": len(TEMPLATES)})
    assert base == tmp_path / "toy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.safetensors", "toy.yaml"]
    for path in (base, f"{base}.safetensors", f"{base}.yaml"):
        loaded, spec, provenance = load_text_bank(path)
        assert torch.equal(loaded, bank)
    assert spec.name == "toy" and spec.classes == ("traffic_cone", "car", "tree")
    assert spec.palette == ((255, 127, 0), (0, 0, 142), (0, 175, 0)) and spec.prompts == "test"
    assert provenance["model"] == "tiny-vit" and provenance["templates"] == 3
    assert provenance["open_clip"] and provenance["date"]


def _rewrite(yaml_path: Path, **changes: Any) -> None:
    meta = yaml.safe_load(yaml_path.read_text())
    meta.update(changes)
    yaml_path.write_text(yaml.safe_dump(meta, sort_keys=False))


def test_wrong_banks_are_refused(tmp_path: Path, vocab: Vocabulary) -> None:
    from safetensors.torch import save_file

    good = F.normalize(torch.randn(3, 8), dim=1)
    with pytest.raises(ConfigError, match="shape"):
        save_text_bank(tmp_path / "a", F.normalize(torch.randn(4, 8), dim=1), vocab, {})
    with pytest.raises(ConfigError, match="shape"):
        save_text_bank(tmp_path / "a", torch.ones(3, 2, 4), vocab, {})
    with pytest.raises(ConfigError, match="NaN"):
        save_text_bank(tmp_path / "a", good.clone().fill_(float("nan")), vocab, {})
    with pytest.raises(ConfigError, match="normalised"):
        save_text_bank(tmp_path / "a", good * 2, vocab, {})

    base = save_text_bank(tmp_path / "b", good, vocab, {})
    tensors, meta = bank_paths(base)
    # swap in a tensor of other dims (checksum refreshed, so the shape check must catch it)
    from clip2scene_ros.files import file_sha256

    for bad in (F.normalize(torch.randn(2, 8), dim=1), torch.ones(3, 8, 1)):
        save_file({"text_bank": bad}, str(tensors))
        _rewrite(meta, sha256=file_sha256(tensors))
        with pytest.raises(IntegrityError, match="shape"):
            load_text_bank(base)
    # a tensor file that does not belong to the YAML
    save_file({"text_bank": good}, str(tensors))
    _rewrite(meta, sha256="0" * 64)
    with pytest.raises(IntegrityError, match="sha256"):
        load_text_bank(base)
    # a pickle under the right name is never unpickled
    tensors.write_bytes(pickle.dumps({"text_bank": good}))
    _rewrite(meta, sha256=file_sha256(tensors))
    with pytest.raises(IntegrityError, match="safetensors"):
        load_text_bank(base)
    with pytest.raises(IntegrityError, match="missing"):
        load_text_bank(tmp_path / "nothing")


def test_local_weights_files(tmp_path: Path, tiny: tuple[torch.nn.Module, Any]) -> None:
    from safetensors.torch import save_file

    model, tokenizer = tiny
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    tokens = tokenizer(["a photo of a car."])
    with torch.no_grad():
        want = model.encode_text(tokens)
        for name in ("w.safetensors", "w.pt"):
            loaded, _ = load_clip("tiny-vit", str(tmp_path / name))
            torch.testing.assert_close(loaded.encode_text(tokens), want)
    # full pickles are refused before anything reads them
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"weights": object()}))
    with pytest.raises(ConfigError, match="weights_only"):
        load_clip("tiny-vit", str(tmp_path / "evil.pt"))
    # weights of another architecture
    with pytest.raises(ConfigError, match="cannot load"):
        load_clip("tiny-rn", str(tmp_path / "w.safetensors"))


def test_unknown_model_and_tag(offline: None) -> None:
    with pytest.raises(ConfigError, match="ViT-B-16") as err:
        load_clip("ViT-Q-99", None)
    assert "tiny-vit" in str(err.value)
    with pytest.raises(ConfigError, match="laion") as err:
        load_clip("ViT-B-32", "not_a_tag")
    assert all(option in str(err.value) for option in BOTH_OPTIONS)


def test_tag_that_cannot_download(monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    with pytest.raises(ConfigError, match="no network") as err:
        load_clip("ViT-B-16", "openai")
    assert all(option in str(err.value) for option in BOTH_OPTIONS)

    # reachable host but the download itself fails (HTTP error, disk full, ...)
    def fail(cfg: dict[str, Any], *args: Any, **kwargs: Any) -> str:
        raise OSError("503 Service Unavailable")

    monkeypatch.setattr(clip_loader, "_hub_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", fail)
    with pytest.raises(ConfigError, match="503") as err:
        load_clip("ViT-B-16", "openai")
    assert all(option in str(err.value) for option in BOTH_OPTIONS)


def test_cli_vocab_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "banks" / "drive"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["vocab", "build", "--vocab", "sample_drive", "--model", "tiny-vit",
                         "--pretrained", "random", "--out", str(out), "--prompts", "single"])
    assert code == 0
    assert "8 classes x 32 dims" in capsys.readouterr().out
    bank, spec, provenance = load_text_bank(out)
    drive = load_vocabulary(builtin_vocabulary("sample_drive"))
    assert bank.shape == (8, 32) and list(spec.classes) == drive.names
    assert spec.prompts == "single" and provenance["pretrained"] == "random"
    assert provenance["templates"] == 1 and provenance["model"] == "tiny-vit"
    # the text tower's precision is recorded: fp32 unless this CPU has bf16 matrix units
    assert provenance["precision"] == resolve_precision("auto", "cpu")
    # random weights come from the teacher's fixed seed: a rebuild is the same bank, whatever
    # the caller's RNG did meanwhile (`make demo` builds one each run)
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["vocab", "build", "--vocab", "sample_drive", "--model", "tiny-vit",
                         "--pretrained", "random", "--out", str(tmp_path / "again"),
                         "--prompts", "single"]) == 0
    assert torch.equal(load_text_bank(tmp_path / "again")[0], bank)


def test_cli_vocab_build_uses_the_vocabularys_prompts(tmp_path: Path) -> None:
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\nprompts: maskclip_85\nclasses:\n"
                      "  - {name: cone, color: [255, 127, 0], synonyms: [pylon]}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["vocab", "build", "--vocab", str(custom), "--model", "tiny-vit",
                         "--pretrained", "random", "--out", str(tmp_path / "b")]) == 0
    _, spec, provenance = load_text_bank(tmp_path / "b")
    assert spec.prompts == "maskclip_85" and provenance["templates"] == len(
        load_prompts("maskclip_85")) == 85


@pytest.mark.parametrize("pretrained", ["openai", "/nonexistent.safetensors"])
def test_cli_without_weights_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     offline: None, pretrained: str) -> None:
    code = cli.main(["vocab", "build", "--vocab", "nuscenes", "--model", "ViT-B-16",
                     "--pretrained", pretrained, "--out", str(tmp_path / "bank")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert all(option in err for option in BOTH_OPTIONS), err
    assert not list(tmp_path.iterdir())


def test_cli_unknown_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["vocab", "build", "--vocab", "no_such_vocab", "--model", "tiny-vit",
                     "--pretrained", "random", "--out", str(tmp_path / "bank")])
    assert code == 2 and "nuscenes" in capsys.readouterr().err
