"""SPVCNN: CLIP2Scene's exact key layout and parameter count, shapes, batching and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip2scene_ros.models.bundle import ArchitectureSpec
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.sparse.tensor import PointTensor

KEYS = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / \
    "spvcnn_state_dict_keys.txt"
#: In CLIP2Scene's state dict but not used for inference: the text bank travels separately in
#: our bundle, and point_mapping_global_random is never called.
NOT_OURS = {"text_embeddings", "point_mapping_global_random.weight",
            "point_mapping_global_random.bias"}


def reference_keys() -> dict[str, tuple[int, ...]]:
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} is absent (shared reference material)")
    out: dict[str, tuple[int, ...]] = {}
    for line in KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        if key in out:  # the file lists the pretrain model first, then other modes
            break
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_state_dict_matches_clip2scene_key_for_key() -> None:
    model = SPVCNN(ArchitectureSpec(cr=1.0), in_channels=1, num_classes=64)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k: v for k, v in reference_keys().items() if k not in NOT_OURS}
    assert ours == ref


def test_parameter_count_of_the_reference() -> None:
    model = SPVCNN(ArchitectureSpec(cr=1.0), in_channels=1, num_classes=64)
    unused_mapping = 480 * 512 + 512  # point_mapping_global_random
    assert sum(p.numel() for p in model.parameters()) + unused_mapping == 22_543_168
    stem = sum(p.numel() for p in model.stem.parameters())
    assert round(stem / 1e3, 1) == 28.6
    assert round(sum(p.numel() for p in model.stage4.parameters()) / 1e6, 2) == 6.36
    assert round(sum(p.numel() for p in model.up1.parameters()) / 1e6, 2) == 8.59


def cloud(n: int, seed: int) -> PointTensor:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, 3, generator=gen) * torch.tensor([60.0, 60.0, 8.0])
    return PointTensor(torch.rand(n, 2, generator=gen), coords)


def test_shapes_at_cr_half_and_text_features() -> None:
    model = SPVCNN(ArchitectureSpec(cr=0.5, clip_dim=16), in_channels=2).eval()
    z = cloud(1500, 0)
    with torch.no_grad():
        feats = model(z)
        text = model.text_features(z)
    assert model.feature_dim == 240 and feats.shape == (1500, 240)
    assert text.shape == (1500, 16) and torch.isfinite(text).all()


def test_batched_samples_do_not_see_each_other() -> None:
    model = SPVCNN(ArchitectureSpec(cr=0.25), in_channels=2).eval()
    a, b = cloud(800, 1), cloud(600, 2)
    both = PointTensor(torch.cat([a.feats, b.feats]), torch.cat([a.coords, b.coords]),
                       torch.cat([torch.zeros(800, dtype=torch.int64),
                                  torch.ones(600, dtype=torch.int64)]))
    with torch.no_grad():
        joint = model(both)
        alone = torch.cat([model(a), model(b)])
    assert torch.allclose(joint, alone, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    model = SPVCNN(ArchitectureSpec(cr=0.25, clip_dim=8), in_channels=2, num_classes=3)
    z = cloud(700, 3)
    feats = model(z)
    loss = model.point_mapping_global(feats).square().mean() + \
        model.point_mapping_local(feats).mean() + model.classifier(feats).mean()
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert frozen == []


def test_folded_batchnorms_give_the_same_features() -> None:
    from clip2scene_ros.models.fuse import fold_batchnorms
    from clip2scene_ros.models.spconv_twin import random_spvcnn

    net = random_spvcnn(0.25)
    fused = fold_batchnorms(net)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())  # original kept
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(2000, 3, generator=g) * 80
    feats = torch.randn(2000, 4, generator=g)
    with torch.no_grad():
        a = net.text_features(PointTensor(feats, coords))
        b = fused.text_features(PointTensor(feats, coords))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_bf16_trunk_after_folding_keeps_fp32_heads_and_sums() -> None:
    """``to_reduced_precision`` wants folded batch norms, converts the trunk to bf16 and keeps
    the heads float32; the bf16 network's voxel <-> point sums run in float32, and its point
    features are close to the fp32 network's."""
    from clip2scene_ros.models import spvcnn as spvcnn_module
    from clip2scene_ros.models.fuse import HEADS, fold_batchnorms, to_reduced_precision
    from clip2scene_ros.models.spconv_twin import random_spvcnn

    net = random_spvcnn(0.25)
    with pytest.raises(ValueError, match="fold_batchnorms first"):
        to_reduced_precision(net, torch.bfloat16)
    fused = fold_batchnorms(net)
    reduced = to_reduced_precision(fold_batchnorms(net), torch.bfloat16)
    assert fused.dtype == torch.float32 and reduced.dtype == torch.bfloat16
    heads = {n for n, _ in reduced.named_parameters() if n.split(".")[0] in HEADS}
    assert heads and all(p.dtype == torch.float32 for n, p in reduced.named_parameters()
                         if n in heads)
    assert all(p.dtype == torch.bfloat16 for n, p in reduced.named_parameters()
               if n not in heads)
    seen: list[torch.dtype] = []
    to_voxel, to_point = spvcnn_module.point_to_voxel, spvcnn_module.voxel_to_point

    def p2v(x, z):  # type: ignore[no-untyped-def]
        seen.append(z.feats.dtype)
        return to_voxel(x, z)

    def v2p(x, z, nearest=False):  # type: ignore[no-untyped-def]
        seen.append(x.feats.dtype)
        return to_point(x, z, nearest)

    g = torch.Generator().manual_seed(0)
    coords = torch.rand(2000, 3, generator=g) * 80
    feats = torch.randn(2000, 4, generator=g)
    with torch.no_grad():
        a = fused.point_features(PointTensor(feats, coords))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(spvcnn_module, "point_to_voxel", p2v)
            mp.setattr(spvcnn_module, "voxel_to_point", v2p)
            b = reduced.point_features(PointTensor(feats, coords))
    assert len(seen) == 7 and set(seen) == {torch.float32}  # 3 means, 4 interpolations
    for x, y in zip(a, b, strict=True):
        assert y.dtype == torch.bfloat16
        err = (y.float() - x).abs().max() / x.abs().max()
        assert 0 < float(err) <= 3e-2
