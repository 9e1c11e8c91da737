"""The same SPVCNN with every sparse convolution done by spconv (test and benchmark peer only).

It proves our weight layout (our ``[K, Cin, Cout]`` kernels in torchsparse's offset order,
converted to spconv's ``[Cout, kx, ky, kz, Cin]``, give the same network) and is the baseline
of ``clip2scene bench sparse``. spconv has no point↔voxel operations, so the point branch, the
batch norms and the linear layers are ours, shared with the model it mirrors; only the sparse
convolutions (and their kernel maps) are spconv's. spconv is never a runtime dependency.

The twin mirrors whatever the model holds: given a model whose batch norms are folded
(:func:`~clip2scene_ros.models.fuse.fold_batchnorms`, the BNs replaced by ``nn.Identity`` and
their affine maps moved into the convolutions' kernels and biases) its spconv layers carry
those biases and no batch norm runs, as in our inference path. Without autograd, activations
and residual sums are written in place, as ours are: a benchmark then compares engine with
engine, not folded and in-place against unfolded and allocating.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sparse.tensor import PointTensor, SparseTensor
from ..sparse.voxelize import initial_voxelize, point_to_voxel, voxel_to_point
from .bundle import ArchitectureSpec
from .spvcnn import SPVCNN


def _spconv() -> Any:
    try:
        import spconv.pytorch as spconv
    except ImportError as exc:  # pragma: no cover - exercised where spconv is absent
        raise ImportError("the spconv twin needs spconv (pip install spconv), a test-only "
                          "dependency listed in requirements-dev.txt") from exc
    return spconv


def random_spvcnn(cr: float, in_channels: int = 4, seed: int = 0) -> SPVCNN:
    """A seeded random SPVCNN in eval mode with non-trivial BN statistics (so every layer
    matters when two engines are compared)."""
    torch.manual_seed(seed)
    net = SPVCNN(ArchitectureSpec(cr=cr), in_channels=in_channels)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert m.running_mean is not None and m.running_var is not None  # tracked stats
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _in_place() -> bool:
    return not torch.is_grad_enabled()


def _relu(feats: torch.Tensor) -> torch.Tensor:
    """ReLU of a fresh layer output, in place without autograd (as our SparseReLU)."""
    return torch.relu_(feats) if _in_place() else torch.relu(feats)


def _add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other`` into ``fresh`` (a fresh output nothing else reads) without autograd,
    as our residual sums."""
    return fresh.add_(other) if _in_place() else fresh + other


def convert_kernel(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Our ``[K, Cin, Cout]`` (torchsparse order) to spconv's ``[Cout, kx, ky, kz, Cin]``."""
    if kernel.dim() == 2:
        # spconv's 1x1x1 fast path reads the parameter's memory as [Cin, Cout] (its
        # FILTER_HWIO=False branch), whatever the parameter's declared shape
        return kernel.contiguous().reshape(kernel.shape[1], 1, 1, 1, kernel.shape[0])
    k, cin, cout = kernel_size, kernel.shape[1], kernel.shape[2]
    grid = kernel.reshape(k, k, k, cin, cout)
    if k % 2:  # odd kernels: x fastest, i.e. index = (dz, dy, dx)
        return grid.permute(4, 2, 1, 0, 3).contiguous()
    return grid.permute(4, 0, 1, 2, 3).contiguous()  # 2x2x2: x slowest


class SpconvTwin(nn.Module):
    """Runs ``model``'s weights with spconv convolutions; inputs must have coords >= 0."""

    def __init__(self, model: SPVCNN) -> None:
        super().__init__()
        self.model = model
        self.sp = _spconv()
        self.convs: dict[str, nn.Module] = {}
        #: our ``Conv3d`` of ``model`` that each spconv layer of :attr:`convs` stands in for
        self.mirrors: dict[str, nn.Module] = {}

    # The model is walked by position (stage[0].net[1], ...), so the layers reached that way are
    # typed Any: our Conv3d, SparseBatchNorm, ResidualBlock and their containers.
    def _conv(self, name: str, ours: Any, kind: str, key: str) -> nn.Module:
        """The spconv layer for our Conv3d ``ours`` (built once, weights converted)."""
        if name not in self.convs:
            sp = self.sp
            ks = ours.kernel_size[0]
            cin, cout = ours.in_channels, ours.out_channels
            bias = ours.bias is not None  # a folded batch norm's shift
            if kind == "subm":
                layer = sp.SubMConv3d(cin, cout, ks, bias=bias, indice_key=key)
            elif kind == "down":
                layer = sp.SparseConv3d(cin, cout, ks, stride=2, bias=bias, indice_key=key)
            else:
                layer = sp.SparseInverseConv3d(cin, cout, ks, indice_key=key, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(convert_kernel(ours.kernel.detach(), ks))
                if bias:
                    layer.bias.copy_(ours.bias.detach())
            self.convs[name] = layer.to(ours.kernel.device)
            self.mirrors[name] = ours
        return self.convs[name]

    # -- the voxel part, on spconv tensors ---------------------------------------------------
    @staticmethod
    def _norm(bn: Any, feats: torch.Tensor) -> torch.Tensor:
        """Our SparseBatchNorm on a plain tensor, or nothing where it was folded away."""
        return feats if isinstance(bn, nn.Identity) else nn.BatchNorm1d.forward(bn, feats)

    @classmethod
    def _bn_relu(cls, x: Any, bn: Any, relu: bool = True) -> Any:
        feats = cls._norm(bn, x.features)
        return x.replace_feature(_relu(feats) if relu else feats)

    def _residual(self, name: str, block: Any, x: Any, level: int) -> Any:
        conv1, bn1, _, conv2, bn2 = block.net
        out = self._bn_relu(self._conv(f"{name}.net.0", conv1, "subm", f"subm{level}")(x), bn1)
        out = self._bn_relu(self._conv(f"{name}.net.3", conv2, "subm", f"subm{level}")(out), bn2,
                            relu=False)
        if isinstance(block.downsample, nn.Identity):
            skip = x.features
        else:
            conv, bn = block.downsample
            one = self._conv(f"{name}.downsample.0", conv, "subm", f"one{level}")(x)
            skip = self._norm(bn, one.features)
        return out.replace_feature(_relu(_add(out.features, skip)))

    def _stage(self, name: str, stage: Any, x: Any, level: int) -> Any:
        block = stage[0].net
        x = self._bn_relu(self._conv(f"{name}.0", block[0], "down", f"down{level}")(x), block[1])
        for i, res in enumerate(stage[1:], start=1):
            x = self._residual(f"{name}.{i}", res, x, level + 1)
        return x

    def _up(self, name: str, up: Any, x: Any, skip: Any, level: int) -> Any:
        block = up[0].net
        x = self._bn_relu(self._conv(f"{name}.0", block[0], "up", f"down{level}")(x), block[1])
        x = x.replace_feature(torch.cat([x.features, skip.features], dim=1))
        for i, res in enumerate(up[1], start=0):
            x = self._residual(f"{name}.1.{i}", res, x, level)
        return x

    # -- conversions at the point-branch fusions ----------------------------------------------
    @staticmethod
    def _ours(x: Any, stride: int) -> SparseTensor:
        coords = x.indices.long()
        coords = torch.cat([coords[:, :1], coords[:, 1:] * stride], dim=1)
        return SparseTensor(x.features, coords, stride)

    def forward(self, z: PointTensor) -> torch.Tensor:
        # spconv 2.3's CPU kernels race when torch runs more than one thread: the same input
        # gives wrong, run-to-run different outputs (measured); the twin runs single-threaded.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(z)
        finally:
            torch.set_num_threads(threads)

    def _forward(self, z: PointTensor) -> torch.Tensor:
        m, sp = self.model, self.sp
        v0, z = initial_voxelize(z)
        coords = v0.coords.int().contiguous()  # spconv reads raw memory: contiguous int32
        # spconv shrinks the grid by floor((n - 2) / 2) + 1 per level: a multiple of 16 keeps
        # every coarse voxel inside it down to stride 16
        shape = ((coords[:, 1:].max(0).values // 16 + 1) * 16).tolist()
        x = sp.SparseConvTensor(v0.feats, coords, shape, int(coords[:, 0].max()) + 1)
        stem = m.stem
        x = self._bn_relu(self._conv("stem.0", stem[0], "subm", "subm0")(x), stem[1])
        x0 = self._bn_relu(self._conv("stem.3", stem[3], "subm", "subm0")(x), stem[4])

        z0 = voxel_to_point(self._ours(x0, 1), z)
        x1 = self._stage("stage1", m.stage1, x0.replace_feature(
            point_to_voxel(self._ours(x0, 1), z0).feats), 0)
        x2 = self._stage("stage2", m.stage2, x1, 1)
        x3 = self._stage("stage3", m.stage3, x2, 2)
        x4 = self._stage("stage4", m.stage4, x3, 3)
        z1 = voxel_to_point(self._ours(x4, 16), z0)
        z1 = z1.replace_feats(_add(z1.feats, m.point_transforms[0](z0.feats)))

        y1 = x4.replace_feature(point_to_voxel(self._ours(x4, 16), z1).feats)
        y1 = self._up("up1", m.up1, y1, x3, 3)
        y2 = self._up("up2", m.up2, y1, x2, 2)
        z2 = voxel_to_point(self._ours(y2, 4), z1)
        z2 = z2.replace_feats(_add(z2.feats, m.point_transforms[1](z1.feats)))

        y3 = y2.replace_feature(point_to_voxel(self._ours(y2, 4), z2).feats)
        y3 = self._up("up3", m.up3, y3, x1, 1)
        y4 = self._up("up4", m.up4, y3, x0, 0)
        z3 = voxel_to_point(self._ours(y4, 1), z2)
        z3 = z3.replace_feats(_add(z3.feats, m.point_transforms[2](z2.feats)))
        return torch.cat([z1.feats, z2.feats, z3.feats], dim=1)
