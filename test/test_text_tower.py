"""Text banks without the padding: the truncated text tower against open_clip's own
``encode_text`` at full length, the towers that must not be truncated, and the text tower in bf16.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from clip2scene_ros import precision as precision_module  # noqa: E402
from clip2scene_ros.errors import ConfigError  # noqa: E402
from clip2scene_ros.teacher.clip_loader import load_clip, tiny_model_config  # noqa: E402
from clip2scene_ros.teacher.prompts import load_prompts  # noqa: E402
from clip2scene_ros.teacher.text_bank import encode_text_bank  # noqa: E402
from clip2scene_ros.teacher.text_tower import causal_tower, encode_tokens  # noqa: E402
from clip2scene_ros.vocabulary import Vocabulary, VocabularyClass  # noqa: E402

TEMPLATES = ("a photo of a {}.", "there is a {} in the scene.",
             "a black and white photo of the large {} next to the road.")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Tiny towers: threads only add spin-waiting."""


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(name="toy", prompts="single", classes=(
        VocabularyClass("traffic_cone", (255, 127, 0), synonyms=("pylon", "safety cone")),
        VocabularyClass("car", (0, 0, 142)),
        VocabularyClass("tree", (0, 175, 0), synonyms=("bush",)),
        VocabularyClass("other vehicle", (0, 0, 255), synonyms=("bus", "tram", "trailer")),
    ))


def _tiny(custom_text: bool = False, layers: int = 2, **text: Any) -> torch.nn.Module:
    """A tiny open_clip model (two text layers so that attention mixes positions twice)."""
    cfg = tiny_model_config("vit")
    text_cfg = {**cfg["text_cfg"], "layers": layers, **text}
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    torch.manual_seed(0)
    return cls(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=text_cfg).eval()


def _tokens(sentences: list[str]) -> torch.Tensor:
    return open_clip.get_tokenizer("ViT-B-16")(sentences)


SENTENCES = ["a car.", "a photo of a traffic_cone in the rain at night on a wet road.",
             "tree", "", "a black and white photo of the large bus next to the road."]


def _lengths_seen(model: torch.nn.Module) -> tuple[list[int], Any]:
    """Sequence lengths the text transformer is called with (a forward pre-hook)."""
    transformer = model.transformer if hasattr(model, "transformer") else model.text.transformer
    seen: list[int] = []
    handle = transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("text", [
    {},                                                       # CLIP: causal, argmax pooling
    {"pool_type": "eos", "eos_id": 49407},                    # pooled at the tokenizer's EOT
    {"proj_type": "linear", "proj_bias": True},               # nn.Linear projection
    {"ls_init_value": 0.1},                                   # layer scale
])
@pytest.mark.parametrize("custom_text", [False, True])
def test_truncated_tower_equals_full_length(text: dict[str, Any], custom_text: bool) -> None:
    model = _tiny(custom_text, **text)
    tower = causal_tower(model)
    assert tower is not None
    tokens = _tokens(SENTENCES)
    seen, handle = _lengths_seen(model)
    with torch.no_grad():
        full = model.encode_text(tokens)
        cut = encode_tokens(model, tokens, tower)
    handle.remove()
    assert seen[0] == 77
    # the longest sentence ends at its EOT token, well before the context length
    assert seen[1] == int(tokens.argmax(-1).max()) + 1 < 30
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


GROUPED = ["a photo of a car.", "a photo of a traffic_cone in the rain.", "a photo of a",
           "a photo of a car park.", "there is a tree in the scene.", "there is a bus",
           "tree", "a photo of the car."]


@pytest.mark.parametrize("text", [{}, {"pool_type": "eos", "eos_id": 49407}])
@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("row_tokens", [1, 24, 256])
def test_shared_prefixes_equal_full_length(text: dict[str, Any], custom_text: bool,
                                           row_tokens: int) -> None:
    """Groups with a shared prefix, a prompt that is another's prefix, a group of one, a group
    with nothing in common; one group per packed row, several, or all in one."""
    model = _tiny(custom_text, **text)
    tower = causal_tower(model)
    assert tower is not None
    tokens = _tokens(GROUPED)
    groups = [[0, 1, 2, 3], [4, 5], [6], [7, 0]]  # 0 twice: the last group's result stands
    with torch.no_grad():
        full = model.encode_text(tokens)
        seen, handle = _lengths_seen(model)
        grouped = tower.encode_grouped(tokens, groups, row_tokens=row_tokens)
        handle.remove()
    torch.testing.assert_close(grouped, full, atol=1e-5, rtol=1e-5)
    ends = tokens.argmax(-1) + 1
    alone = int(ends.sum() + ends[0])  # every prompt of every group on its own
    if row_tokens == 1:  # every prompt in a sequence of its own, with its prefix
        assert len(seen) == 9 and sum(seen) == alone
    else:  # "<start> a photo of a" once for group 0, "<start> there is a" once for group 1
        assert sum(seen) < alone
        # groups cut and packed, no sequence longer than asked; or all in one
        assert (1 < len(seen) < 9 and max(seen) <= 24) if row_tokens == 24 else len(seen) == 1
    # a prompt in no group is not encoded
    with torch.no_grad():
        partial = tower.encode_grouped(tokens, [[4, 5]])
    torch.testing.assert_close(partial[4:6], full[4:6], atol=1e-5, rtol=1e-5)
    assert not partial[[0, 1, 2, 3, 6, 7]].any()


def test_bank_with_shared_prefixes_equals_full_length_bank(vocab: Vocabulary) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, tokenizer = load_clip("tiny-vit", None)
    assert causal_tower(model) is not None
    seen, handle = _lengths_seen(model)
    grouped = encode_text_bank(model, tokenizer, vocab, TEMPLATES, batch_size=4)
    handle.remove()
    prompts = sum(1 + len(c.synonyms) for c in vocab.classes) * len(TEMPLATES)
    assert sum(seen) < prompts * 12  # the padded bank would run prompts * 77 token rows

    class FullLength(torch.nn.Module):  # hides the CLIP class: no truncation possible
        def __init__(self, clip: torch.nn.Module) -> None:
            super().__init__()
            self.clip = clip

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(tokens)

    wrapped = FullLength(model)
    assert causal_tower(wrapped) is None
    seen, handle = _lengths_seen(model)
    full = encode_text_bank(wrapped, tokenizer, vocab, TEMPLATES, batch_size=4)
    handle.remove()
    assert set(seen) == {77} and len(seen) == -(-prompts // 4)
    torch.testing.assert_close(grouped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("custom_text", "text"), [
    (False, {"no_causal_mask": True}),    # bidirectional: padding reaches the pooled token
    (True, {"no_causal_mask": True}),
    (False, {"pool_type": "last"}),       # pools position 76, whatever the prompt's length
    (False, {"pool_type": "first"}),
    (True, {"pool_type": "none"}),
    (True, {"embed_cls": True}),          # CoCa-style class token appended after the padding
])
def test_other_towers_run_at_full_length(custom_text: bool, text: dict[str, Any],
                                         vocab: Vocabulary) -> None:
    model = _tiny(custom_text, **text)
    assert causal_tower(model) is None
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    seen, handle = _lengths_seen(model)
    if text.get("pool_type") == "none":  # token outputs: no sentence embedding to average
        with torch.no_grad():
            assert encode_tokens(model, _tokens(SENTENCES)).dim() == 3
    else:
        bank = encode_text_bank(model, tokenizer, vocab, TEMPLATES)
        assert bank.shape == (4, 32)
    handle.remove()
    assert seen and set(seen) == {78 if text.get("embed_cls") else 77}


def test_a_subclass_that_overrides_encode_text_is_not_truncated() -> None:
    class Tweaked(open_clip.CLIP):  # type: ignore[misc]
        def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return super().encode_text(text, normalize) * 2

    cfg = tiny_model_config("vit")
    model = Tweaked(embed_dim=32, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    assert causal_tower(model) is None
    assert causal_tower(_tiny()) is not None


def test_a_mask_that_is_not_causal_is_not_truncated() -> None:
    model = _tiny()
    model.attn_mask = torch.zeros(77, 77)  # what a bidirectional tower has
    assert causal_tower(model) is None


# ------------------------------------------------------------------------------- precision


def test_fast_bf16_probe_and_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert precision_module._cpuinfo_flags(cpuinfo) >= {"amx_bf16", "avx2"}
    assert precision_module._cpuinfo_flags(tmp_path / "missing") == set()
    # without torch's probes the flags decide
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", None, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", None, raising=False)
    assert precision_module._probe_fast_bf16()[0] is True
    monkeypatch.setattr(precision_module, "_cpuinfo_flags", lambda: {"avx2"})
    assert precision_module._probe_fast_bf16()[0] is False
    # torch's probes win when they exist
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision_module._probe_fast_bf16() == (True, "torch.cpu: amx_tile")

    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: True)
    assert precision_module.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_fast_bf16", lambda: False)
    assert precision_module.resolve_precision("auto", "cpu") == "fp32"
    assert precision_module.resolve_precision("auto", "cuda:0") == "fp16"
    assert precision_module.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        precision_module.resolve_precision("int8", "cpu")


def test_this_machine_is_probed_once_and_consistently(caplog: pytest.LogCaptureFixture) -> None:
    """The answer agrees with the CPU's own flags; the probe is cached (one log line)."""
    precision_module.cpu_has_fast_bf16.cache_clear()
    with caplog.at_level("INFO", logger="clip2scene_ros.precision"):
        first = precision_module.cpu_has_fast_bf16()
        assert precision_module.cpu_has_fast_bf16() is first
    assert len([r for r in caplog.records if "bf16 matrix units" in r.message]) == 1
    flags = precision_module._cpuinfo_flags()
    if flags:  # Linux: the kernel's flags and torch's probes must agree
        assert first == bool(flags & set(precision_module.FAST_BF16_FLAGS))


def test_bf16_bank_agrees_with_fp32(vocab: Vocabulary) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, tokenizer = load_clip("tiny-vit", None)
    templates = load_prompts("maskclip_85")[:20]
    fp32 = encode_text_bank(model, tokenizer, vocab, templates, precision="fp32")
    bf16 = encode_text_bank(model, tokenizer, vocab, templates, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it did run in bf16
    cosine = (fp32 * bf16).sum(1)
    assert bool((cosine >= 0.99).all()), cosine
    # probes near each class (and between classes) get the same class from both banks
    generator = torch.Generator().manual_seed(1)
    probes = torch.cat([fp32.repeat(8, 1) + 0.05 * torch.randn(32, 32, generator=generator),
                        torch.randn(64, 32, generator=generator)])
    probes = F.normalize(probes, dim=1)
    assert torch.equal((probes @ fp32.T).argmax(1), (probes @ bf16.T).argmax(1))
    # the model itself is left in fp32 (autocast, not a cast)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bench_compares_against_full_length() -> None:
    from clip2scene_ros.bench.text_bank import bench_text_bank
    from clip2scene_ros.teacher.text_bank import resolve_vocabulary

    drive = resolve_vocabulary("sample_drive")
    result = bench_text_bank("tiny-vit", "sample_drive", "single", full_length=True)
    assert result["truncated"]
    assert result["prompts"] == sum(1 + len(c.synonyms) for c in drive.classes)
    assert result["max_abs_difference"] < 1e-5
    assert set(result["cache_hit"]) == {"wall_s", "cpu_s"}
