"""MaskCLIP teacher on tiny random-init open_clip models (no downloads), checked against
by-hand computations from the raw weights."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from clip2scene_ros.teacher import maskclip  # noqa: E402
from clip2scene_ros.teacher.clip_loader import register_tiny_models  # noqa: E402
from clip2scene_ros.teacher.maskclip import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    DROPPED_LOGIT,
    MaskCLIP,
    interpolate_positional_embedding,
    is_plain_block,
    mlp_forward,
    plain_block_forward,
)

EMBED = 32
TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Random-init CLIP has unit LayerNorms and zero biases; perturb so every weight matters.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_vit(ls_init_value: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    vision = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32,
              "ls_init_value": ls_init_value}
    return _perturb(open_clip.CLIP(EMBED, vision, TEXT), 1)


def tiny_rn() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 256}
    return _perturb(open_clip.CLIP(EMBED, vision, TEXT), 2)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def rn() -> torch.nn.Module:
    return tiny_rn()


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _ln(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def vit_by_hand(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    vis = model.visual
    p = vis.patch_size[0]
    n, _, height, width = images.shape
    h, w = height // p, width // p
    e = vis.conv1.out_channels
    patches = F.unfold(_normalise(images), kernel_size=p, stride=p)  # [N, 3*p*p, h*w]
    x = (vis.conv1.weight.reshape(e, -1) @ patches).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(n, 1, e), x], dim=1)
    pos = vis.positional_embedding
    gh, gw = vis.grid_size
    grid = pos[1:].reshape(1, gh, gw, e).permute(0, 3, 1, 2)
    if (h, w) != (gh, gw):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, e)])
    x = _ln(x, vis.ln_pre)
    blocks = list(vis.transformer.resblocks)
    for block in blocks[:-1]:  # ordinary blocks: the model's own forward
        x = block(x)
    b = blocks[-1]
    g1 = getattr(b.ls_1, "gamma", torch.ones(e))
    g2 = getattr(b.ls_2, "gamma", torch.ones(e))
    v = _ln(x, b.ln_1) @ b.attn.in_proj_weight[2 * e:].T + b.attn.in_proj_bias[2 * e:]
    x = x + g1 * (v @ b.attn.out_proj.weight.T + b.attn.out_proj.bias)
    hidden = F.gelu(_ln(x, b.ln_2) @ b.mlp.c_fc.weight.T + b.mlp.c_fc.bias)
    x = x + g2 * (hidden @ b.mlp.c_proj.weight.T + b.mlp.c_proj.bias)
    x = _ln(x, vis.ln_post) @ vis.proj
    return x[:, 1:].reshape(n, h, w, -1).permute(0, 3, 1, 2)


def rn_by_hand(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    vis = model.visual
    x = vis.stem(_normalise(images))
    x = vis.layer4(vis.layer3(vis.layer2(vis.layer1(x))))
    pool = vis.attnpool
    v = torch.einsum("nchw,oc->nohw", x, pool.v_proj.weight) + pool.v_proj.bias.view(1, -1, 1, 1)
    out = torch.einsum("nchw,oc->nohw", v, pool.c_proj.weight)
    return out + pool.c_proj.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("ls_init_value", [None, 0.5])
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (48, 80)])
def test_vit_value_path_matches_hand_computation(size: tuple[int, int], ls_init_value) -> None:
    model = tiny_vit(ls_init_value)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = MaskCLIP(model)(images)
        want = vit_by_hand(model, images)
    assert got.shape == (2, EMBED, size[0] // 16, size[1] // 16)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5


def test_vit_positional_embedding_identity_at_native_size(vit) -> None:
    vis = vit.visual
    pos = vis.positional_embedding.detach()
    assert vis.grid_size == (4, 4)
    assert torch.equal(interpolate_positional_embedding(pos, (4, 4), (4, 4)), pos)
    # Bicubic resampling onto the same grid is itself the identity.
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(same, grid, atol=1e-6)
    # Non-square: class row kept, grid resized (224x416 → 14x26 is the same code path).
    wide = interpolate_positional_embedding(pos, (4, 4), (4, 6))
    assert wide.shape == (1 + 24, pos.shape[1])
    assert torch.equal(wide[0], pos[0])


@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
def test_resnet_value_path_matches_hand_computation(rn, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = MaskCLIP(rn)(images)
        want = rn_by_hand(rn, images)
    assert got.shape == (2, EMBED, size[0] // 32, size[1] // 32)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_batch_equals_single_runs(vit, rn, kind: str) -> None:
    teacher = MaskCLIP(vit if kind == "vit" else rn)
    images = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batch = teacher(images)
        singles = torch.cat([teacher(images[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, singles, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_forward_equals_features_of_forward_with_keys(vit, rn, kind: str) -> None:
    # forward skips the keys; the features must not change.
    teacher = MaskCLIP(vit if kind == "vit" else rn)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        features, keys = teacher.forward_with_keys(images)
        assert torch.equal(teacher(images), features)
    assert keys.shape[0] == 2 and keys.shape[-2:] == features.shape[-2:]


def test_teacher_is_frozen(vit) -> None:
    teacher = MaskCLIP(vit).train()
    assert not teacher.visual.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_logits_label_the_matching_text_row(vit) -> None:
    teacher = MaskCLIP(vit)
    gen = torch.Generator().manual_seed(6)
    features = torch.randn(1, EMBED, 2, 3, generator=gen)
    bank = torch.randn(4, EMBED, generator=gen)
    bank[2] = 5.0 * features[0, :, 1, 2]  # scale must not matter: both sides are normalised
    logits = teacher.logits(features, bank, (32, 48))
    assert logits.shape == (1, 4, 32, 48)
    labels, conf = teacher.labels_and_confidence(logits)
    assert labels.shape == conf.shape == (1, 32, 48)
    # Centre of the patch (1, 2) in the upsampled image.
    assert labels[0, 16 + 8, 32 + 8].item() == 2
    assert conf[0, 16 + 8, 32 + 8].item() > 0.99
    same = teacher.logits(features, bank, (2, 3))
    assert same[0, 2, 1, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_end_to_end_labels(vit) -> None:
    teacher = MaskCLIP(vit, key_smoothing=True, prompt_denoising=True)
    bank = torch.randn(5, EMBED, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = teacher.dense_logits(torch.rand(2, 3, 32, 48), bank)
    labels, conf = teacher.labels_and_confidence(logits)
    assert logits.shape == (2, 5, 32, 48)
    assert labels.dtype == torch.int64
    assert ((conf > 0) & (conf <= 1 + 1e-6)).all()


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_bad_sizes_raise_naming_the_size(vit, rn, kind: str) -> None:
    teacher = MaskCLIP(vit if kind == "vit" else rn)
    small = (8, 8) if kind == "vit" else (16, 16)
    odd = (64, 70) if kind == "vit" else (64, 80)
    with pytest.raises(ValueError, match=f"{small[0]}x{small[1]}.*smaller than one"):
        teacher(torch.rand(1, 3, *small))
    with pytest.raises(ValueError, match=f"{odd[0]}x{odd[1]} is not a multiple"):
        teacher(torch.rand(1, 3, *odd))


def _features(*columns: tuple[float, float, float]) -> torch.Tensor:
    """A 1×len(columns) feature map whose cosines with the identity bank are ∝ the columns."""
    return torch.tensor(columns, dtype=torch.float32).T.reshape(1, 3, 1, len(columns))


def test_key_smoothing_follows_similar_keys(vit) -> None:
    bank = torch.eye(3)
    # Two confident class-0 positions and one position mildly preferring class 1.
    feats = _features((1, 0, 0), (1, 0, 0), (0.5, 0.52, 0))
    plain = MaskCLIP(vit)
    smooth = MaskCLIP(vit, key_smoothing=True)
    labels, _ = plain.labels_and_confidence(plain.logits(feats, bank, (1, 3)))
    assert labels[0, 0].tolist() == [0, 0, 1]

    with pytest.raises(ValueError, match="keys"):
        smooth.logits(feats, bank, (1, 3))

    alike = torch.tensor([[1.0, 0], [1, 0], [1, 0]]).T.reshape(1, 2, 1, 3)
    labels, conf = smooth.labels_and_confidence(smooth.logits(feats, bank, (1, 3), keys=alike))
    assert labels[0, 0].tolist() == [0, 0, 0]  # the unsure position follows its look-alikes
    probs = torch.softmax(plain.logits(feats, bank, (1, 3)) / 0.01, dim=1)[0, :, 0]
    assert conf[0, 0, 2].item() == pytest.approx(probs[0].mean().item(), abs=1e-5)

    apart = torch.tensor([[1.0, 0], [1, 0], [0, 1]]).T.reshape(1, 2, 1, 3)
    labels, _ = smooth.labels_and_confidence(smooth.logits(feats, bank, (1, 3), keys=apart))
    assert labels[0, 0].tolist() == [0, 0, 1]  # orthogonal keys: nothing to borrow from


def test_prompt_denoising_drops_unconfident_classes(vit) -> None:
    bank = torch.eye(3)
    # Class 2 wins position 1, but only with probability ≈ 0.47 < 0.5; class 1 never wins.
    feats = _features((1, 0, 0), (0.5, 0.5, 0.505))
    plain = MaskCLIP(vit)
    denoise = MaskCLIP(vit, prompt_denoising=True, denoise_threshold=0.5)
    labels, conf = plain.labels_and_confidence(plain.logits(feats, bank, (1, 2)))
    assert labels[0, 0].tolist() == [0, 2]
    assert conf[0, 0, 1].item() < 0.5

    logits = denoise.logits(feats, bank, (1, 2))
    labels, _ = denoise.labels_and_confidence(logits)
    assert labels[0, 0].tolist() == [0, 0]
    assert torch.all(logits[0, 1:] == DROPPED_LOGIT)
    assert torch.allclose(logits[0, 0], plain.logits(feats, bank, (1, 2))[0, 0])

    # An image where no class is confident keeps its best one rather than dropping all.
    labels, _ = denoise.labels_and_confidence(denoise.logits(feats[..., 1:], bank, (1, 1)))
    assert labels.item() == 2


# ---------------------------------------------------------------- fused attention blocks


def vit_with(*, layers: int = 3, quick_gelu: bool = False, **vision) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"image_size": 64, "patch_size": 16, "width": 64, "layers": layers, "head_width": 32,
           **vision}
    return _perturb(open_clip.CLIP(EMBED, cfg, TEXT, quick_gelu=quick_gelu), 8)


def _tiny_vit_model() -> torch.nn.Module:
    register_tiny_models()
    torch.manual_seed(0)
    return _perturb(open_clip.create_model("tiny-vit"), 9)


def _call_counter(modules: list[torch.nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)

    def hook(i: int):
        def count(*_args) -> None:
            counts[i] += 1
        return count

    return counts, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


@pytest.mark.parametrize("build", [
    lambda: vit_with(),
    lambda: vit_with(ls_init_value=0.5),
    lambda: vit_with(quick_gelu=True),
    lambda: vit_with(layers=4, mlp_ratio=2.0, head_width=16),
    _tiny_vit_model,
], ids=["plain", "layer_scale", "quick_gelu", "16_wide_heads", "tiny-vit"])
@pytest.mark.parametrize("size", [(64, 96), (48, 80)])
def test_plain_blocks_run_fused_attention_and_match_their_forward(
    build, size: tuple[int, int], monkeypatch
) -> None:
    model = build()
    blocks = list(model.visual.transformer.resblocks)
    assert all(is_plain_block(b) for b in blocks)
    teacher = MaskCLIP(model)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(10))
    watched = blocks[:-1] + [b.attn for b in blocks]
    counts, handles = _call_counter(watched)
    with torch.no_grad():
        features, keys = teacher.forward_with_keys(images)
    # Neither the blocks' own forward nor nn.MultiheadAttention ran.
    assert counts == [0] * len(watched)

    monkeypatch.setattr(maskclip, "is_plain_block", lambda block: False)
    with torch.no_grad():
        want_features, want_keys = teacher.forward_with_keys(images)
    for handle in handles:
        handle.remove()
    assert counts == [1] * (len(blocks) - 1) + [1] * (len(blocks) - 1) + [0]
    # float32 defaults of assert_close: rtol 1.3e-6, atol 1e-5.
    torch.testing.assert_close(features, want_features)
    torch.testing.assert_close(keys, want_keys)


@pytest.mark.parametrize("option", ["scale_attn", "scale_heads", "scale_fc", "qk_norm"])
def test_custom_blocks_keep_their_own_forward(option: str) -> None:
    model = vit_with(**{option: True})
    blocks = list(model.visual.transformer.resblocks)
    assert not any(is_plain_block(b) for b in blocks)
    counts, handles = _call_counter(blocks[:-1])
    with torch.no_grad():
        features = MaskCLIP(model)(torch.rand(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert counts == [1] * (len(blocks) - 1)
    assert torch.isfinite(features).all()


def test_plain_block_check_rejects_other_blocks() -> None:
    from open_clip.transformer import ResidualAttentionBlock

    assert is_plain_block(ResidualAttentionBlock(64, 2))

    class Subclass(ResidualAttentionBlock):
        pass

    assert not is_plain_block(Subclass(64, 2))
    cross = ResidualAttentionBlock(64, 2, is_cross_attention=True)
    assert not is_plain_block(cross)
    kv_bias = ResidualAttentionBlock(64, 2)
    kv_bias.attn = torch.nn.MultiheadAttention(64, 2, add_bias_kv=True, batch_first=True)
    assert not is_plain_block(kv_bias)
    split = ResidualAttentionBlock(64, 2)
    split.attn = torch.nn.MultiheadAttention(64, 2, kdim=32, vdim=32, batch_first=True)
    assert not is_plain_block(split)


def test_plain_block_forward_matches_a_sequence_first_block() -> None:
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = _perturb(ResidualAttentionBlock(64, 4, ls_init_value=0.3, batch_first=False), 11)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(12))  # [N, L, C]
    with torch.no_grad():
        got = plain_block_forward(block, x)
        want = block(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, want)


def _mlp(act: torch.nn.Module) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [("c_fc", torch.nn.Linear(8, 32)), ("gelu", act), ("c_proj", torch.nn.Linear(32, 8))]
    return torch.nn.Sequential(OrderedDict(layers))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_forward_runs_gelu_in_place_bit_identically(approximate: str) -> None:
    mlp = _mlp(torch.nn.GELU(approximate=approximate))
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(13))
    counts, handles = _call_counter([mlp.gelu])
    with torch.no_grad():
        got = mlp_forward(mlp, x)
    assert counts == [0]  # the module's out-of-place GELU did not run
    with torch.no_grad():
        want = mlp(x)
    assert torch.equal(got, want)

    # Under autograd GELU's input must survive: the module runs and gradients match.
    xg = x.clone().requires_grad_()
    mlp_forward(mlp, xg).square().sum().backward()
    for handle in handles:
        handle.remove()
    assert counts == [2]  # the reference call above, then this one
    xr = x.clone().requires_grad_()
    mlp(xr).square().sum().backward()
    assert xg.grad is not None and xr.grad is not None
    assert torch.equal(xg.grad, xr.grad)


def test_mlp_forward_keeps_other_activations() -> None:
    from open_clip.transformer import QuickGELU

    mlp = _mlp(QuickGELU())
    counts, handles = _call_counter([mlp.gelu])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        got = mlp_forward(mlp, x)
        want = mlp(x)
    handles[0].remove()
    assert counts == [2]
    assert torch.equal(got, want)
