"""SPVCNN as CLIP2Scene uses it, on our sparse engine, with torchsparse's module and key names.

Structure (mit-han-lab/spvnas ``core/models/semantic_kitti/spvcnn.py``, CLIP2Scene
``model/spvcnn.py``): a stem of two 3×3×3 convolutions, four stages that halve the resolution
(k2 s2 convolution + residual blocks), four stages that double it (k2 s2 transposed convolution,
concatenation with the skip, residual blocks), and a point branch whose features are fused with
the voxels after the stem, after stage 4, after up 2 and after up 4. CLIP2Scene concatenates
the three point features (256 + 128 + 96 = 480 at cr 1) and maps them to CLIP's 512-d text space
with ``point_mapping_global`` (SCR and inference) and ``point_mapping_local`` (SSR).
Module names follow the reference so torchsparse checkpoints load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import IntegrityError
from ..sparse.conv import Conv3d, autocast_dtype
from ..sparse.plan import ConvKey, PlanSchema, levels_for
from ..sparse.tensor import PointTensor, SparseTensor, cat
from ..sparse.voxelize import initial_voxelize, point_to_voxel, voxel_to_point
from .bundle import ArchitectureSpec, Bundle, BundleSpec, InputSpec, VocabularySpec, save_bundle

#: Strides of SPVCNN's five resolutions (stem, then four k2 s2 downsamplings).
STRIDES = (1, 2, 4, 8, 16)


def plan_schema(max_points: int) -> PlanSchema:
    """The maps :meth:`SPVCNN.forward` reads, for a planned (exported) pass.

    3x3x3 submanifold maps at every stride, the k2 s2 maps between strides in both directions,
    point -> voxel means at strides 1 (input voxelisation and before stage 1), 16 and 4, and
    trilinear devoxelisation at 1, 16 and 4. A test checks that a planned pass reads exactly
    these, so this list cannot drift from the forward below.
    """
    def t(s: int) -> tuple[int, int, int]:
        return (s, s, s)

    one, k2, k3 = t(1), t(2), t(3)
    convs: list[ConvKey] = [(t(s), k3, one, one, False) for s in STRIDES]
    for s in STRIDES[:-1]:
        convs += [(t(s), k2, k2, one, False), (t(s), k2, k2, one, True)]
    return PlanSchema(convs=tuple(convs), pools=(t(1), t(4), t(16)),
                      interps=(t(1), t(4), t(16)), levels=levels_for(max_points))


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the voxel features; keys equal torchsparse's (and SyncBatchNorm's)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace_feats(super().forward(x.feats))


class SparseReLU(nn.ReLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        # inplace (as nn.ReLU(inplace=True)): the input is always a fresh conv/BN output here
        return x.replace_feats(torch.relu_(x.feats) if self.inplace else torch.relu(x.feats))


def _conv_bn_relu(inc: int, outc: int, ks: int, stride: int, transposed: bool = False
                  ) -> nn.Sequential:
    return nn.Sequential(Conv3d(inc, outc, ks, stride, transposed=transposed),
                         SparseBatchNorm(outc), SparseReLU(True))


class BasicConvolutionBlock(nn.Module):
    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = _conv_bn_relu(inc, outc, ks, stride)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = _conv_bn_relu(inc, outc, ks, stride, transposed=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Conv3d(inc, outc, ks, stride), SparseBatchNorm(outc), SparseReLU(True),
            Conv3d(outc, outc, ks, 1), SparseBatchNorm(outc))
        if inc == outc and stride == 1:
            self.downsample: nn.Module = nn.Identity()
        else:
            self.downsample = nn.Sequential(Conv3d(inc, outc, 1, stride), SparseBatchNorm(outc))

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.net(x)
        skip = self.downsample(x)
        return out.replace_feats(torch.relu_(_add(out.feats, skip.feats)))


def _add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` (a layer output nothing else holds) when no
    gradient is being recorded: inference then allocates no new tensor for residual sums."""
    if torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad):
        return fresh + other
    return fresh.add_(other)


T = TypeVar("T", SparseTensor, PointTensor)


def _as(x: T, dtype: torch.dtype) -> T:
    """``x`` with its features in ``dtype`` (``x`` itself when they already are)."""
    return x if x.feats.dtype == dtype else x.replace_feats(x.feats.to(dtype))


def _to_voxels(x: SparseTensor, z: PointTensor, dtype: torch.dtype) -> SparseTensor:
    """Point -> voxel means of ``z`` on ``x``'s voxels, summed in float32, in ``dtype``."""
    return _as(point_to_voxel(x, _as(z, torch.float32)), dtype)


def _to_points(x: SparseTensor, z: PointTensor, dtype: torch.dtype) -> PointTensor:
    """Trilinear voxel -> point interpolation of ``x`` at ``z``, summed in float32, in
    ``dtype``."""
    return _as(voxel_to_point(_as(x, torch.float32), z), dtype)


def _point_transform(inc: int, outc: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inc, outc), nn.BatchNorm1d(outc), nn.ReLU(True))


def widths(spec: ArchitectureSpec) -> list[int]:
    """Stage widths scaled by cr as spvnas does (``int(cr * w)``)."""
    return [int(spec.cr * w) for w in spec.widths]


class SPVCNN(nn.Module):
    """Point features in CLIP's text space from a :class:`PointTensor` (coords in voxel units).

    Args:
        spec: widths, cr, residual blocks per stage and the CLIP dimension.
        in_channels: input features per point.
        num_classes: size of the optional ``classifier`` head (0: none), used by supervised
            fine-tuning; annotation-free inference labels through the text bank instead.
        dropout: applied to the voxel features before up 1 and up 3 (spvnas: 0.3, CLIP2Scene 0).
    """

    def __init__(self, spec: ArchitectureSpec, in_channels: int, num_classes: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        cs = widths(spec)
        n = spec.blocks
        self.spec = spec
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            Conv3d(in_channels, cs[0], 3), SparseBatchNorm(cs[0]), SparseReLU(True),
            Conv3d(cs[0], cs[0], 3), SparseBatchNorm(cs[0]), SparseReLU(True))

        def down(inc: int, outc: int) -> nn.Sequential:
            return nn.Sequential(BasicConvolutionBlock(inc, inc, ks=2, stride=2),
                                 ResidualBlock(inc, outc),
                                 *(ResidualBlock(outc, outc) for _ in range(n - 1)))

        def up(inc: int, skip: int, outc: int) -> nn.ModuleList:
            return nn.ModuleList([
                BasicDeconvolutionBlock(inc, outc, ks=2, stride=2),
                nn.Sequential(ResidualBlock(outc + skip, outc),
                              *(ResidualBlock(outc, outc) for _ in range(n - 1)))])

        self.stage1 = down(cs[0], cs[1])
        self.stage2 = down(cs[1], cs[2])
        self.stage3 = down(cs[2], cs[3])
        self.stage4 = down(cs[3], cs[4])
        self.up1 = up(cs[4], cs[3], cs[5])
        self.up2 = up(cs[5], cs[2], cs[6])
        self.up3 = up(cs[6], cs[1], cs[7])
        self.up4 = up(cs[7], cs[0], cs[8])
        self.point_transforms = nn.ModuleList([
            _point_transform(cs[0], cs[4]), _point_transform(cs[4], cs[6]),
            _point_transform(cs[6], cs[8])])
        self.feature_dim = cs[4] + cs[6] + cs[8]
        self.classifier = (nn.Sequential(nn.Linear(self.feature_dim, num_classes))
                           if num_classes else None)
        self.point_mapping_global = nn.Linear(self.feature_dim, spec.clip_dim)
        self.point_mapping_local = nn.Linear(self.feature_dim, spec.clip_dim)
        self.dropout = nn.Dropout(dropout)
        self._init_norms()

    def _init_norms(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _dropout(self, x: SparseTensor) -> SparseTensor:
        return x.replace_feats(self.dropout(x.feats)) if self.dropout.p else x

    def forward(self, z: PointTensor) -> torch.Tensor:
        """``[N, feature_dim]`` point features (480 at cr 1) for the points of ``z``."""
        return torch.cat(self.point_features(z), dim=1)

    @property
    def dtype(self) -> torch.dtype:
        """The trunk's dtype (float32, or bfloat16 after
        :func:`~clip2scene_ros.runtime.backends.to_reduced_precision`)."""
        return next(self.stem.parameters()).dtype

    def point_features(self, z: PointTensor) -> list[torch.Tensor]:
        """The three point features that :meth:`forward` concatenates (``[N, cs[4]]``, ``[N,
        cs[6]]``, ``[N, cs[8]]``): consumers that only multiply them by a matrix can do so
        block by block and never build the ``[N, feature_dim]`` concatenation.

        A reduced-precision trunk (bf16 weights, or float32 weights under ``torch.autocast``,
        which runs the trunk in autocast's dtype) takes float32 points: their voxel means, the
        point <-> voxel means and the trilinear interpolation are summed in float32 and
        converted to the trunk's dtype after; the returned features are in that dtype.
        """
        dtype = autocast_dtype(z.feats.device.type) or self.dtype
        x0, z = initial_voxelize(z)
        x0 = _as(self.stem(_as(x0, dtype)), torch.float32)
        z0 = _as(voxel_to_point(x0, z, nearest=False), dtype)
        x1 = self.stage1(_to_voxels(x0, z0, dtype))
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        z1 = _to_points(x4, z0, dtype)
        z1 = z1.replace_feats(_add(z1.feats, self.point_transforms[0](z0.feats)))

        y1 = self._dropout(_to_voxels(x4, z1, dtype))
        y1 = self.up1[1](cat([self.up1[0](y1), x3]))
        y2 = self.up2[1](cat([self.up2[0](y1), x2]))
        z2 = _to_points(y2, z1, dtype)
        z2 = z2.replace_feats(_add(z2.feats, self.point_transforms[1](z1.feats)))

        y3 = self._dropout(_to_voxels(y2, z2, dtype))
        y3 = self.up3[1](cat([self.up3[0](y3), x1]))
        y4 = self.up4[1](cat([self.up4[0](y3), _as(x0, dtype)]))
        z3 = _to_points(y4, z2, dtype)
        z3 = z3.replace_feats(_add(z3.feats, self.point_transforms[2](z2.feats)))
        return [z1.feats, z2.feats, z3.feats]

    def text_features(self, z: PointTensor) -> torch.Tensor:
        """``[N, clip_dim]`` features in CLIP's text space (``point_mapping_global``)."""
        return self.point_mapping_global(self.forward(z))


def build_model(bundle: Bundle) -> SPVCNN:
    """The bundle's network with its weights; a key or shape mismatch names the keys."""
    spec = bundle.spec
    model = SPVCNN(spec.architecture, in_channels=len(spec.input.features))
    ours = model.state_dict()
    missing = sorted(set(ours) - set(bundle.state_dict))
    unexpected = sorted(set(bundle.state_dict) - set(ours))
    shapes = sorted(k for k in set(ours) & set(bundle.state_dict)
                    if ours[k].shape != bundle.state_dict[k].shape)
    if missing or unexpected or shapes:
        raise IntegrityError("model.safetensors", f"does not fit the architecture in model.yaml: "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}, "
                             f"shape mismatch {shapes[:4]}", str(bundle.path))
    model.load_state_dict(bundle.state_dict)
    return model.eval()


def save_random_bundle(path: str | Path, *, classes: Sequence[str] = ("road", "car"),
                       palette: Sequence[tuple[int, int, int]] | None = None,
                       name: str = "two", cr: float = 0.25, clip_dim: int = 8, blocks: int = 2,
                       voxel_size: float = 0.2, features: Sequence[str] = ("intensity",),
                       sweeps: int = 1, seed: int = 0, provenance: dict[str, Any] | None = None,
                       overwrite: bool = False) -> Path:
    """A bundle with random SPVCNN weights and a random unit text bank (seeded).

    For tests, the soak and the fuzz harness, which exercise the mechanics: its labels mean
    nothing, and ``provenance`` should say so where the bundle leaves the process.
    """
    torch.manual_seed(seed)
    arch = ArchitectureSpec(cr=cr, clip_dim=clip_dim, blocks=blocks)
    colours = tuple(palette) if palette is not None else tuple(
        ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256) for i in range(len(classes)))
    spec = BundleSpec(arch, InputSpec(voxel_size=voxel_size, features=tuple(features),
                                      sweeps=sweeps),
                      VocabularySpec(name, tuple(classes), colours),
                      provenance={"weights": "random", **(provenance or {})})
    bank = nn.functional.normalize(torch.randn(len(classes), clip_dim), dim=1)
    return save_bundle(path, spec, SPVCNN(arch, in_channels=len(features)).state_dict(), bank,
                       overwrite=overwrite)
