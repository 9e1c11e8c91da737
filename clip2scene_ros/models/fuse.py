"""Inference-only preparation of weights: batch norms folded into the layers before them, and
the trunk converted to a reduced precision once (after folding).

In eval mode a BatchNorm is an affine map per channel, so ``BN(x @ W) = x @ (W * s) + (b - m * s)``
with ``s = gamma / sqrt(var + eps)``: folding removes a full pass over every voxel's features per
layer (52 of them in SPVCNN) at no cost in accuracy beyond float rounding. The folded copy keeps
the module tree (BNs become ``nn.Identity``), so it is for inference only; bundles store the
unfolded weights.
"""

from __future__ import annotations

import copy
import itertools
from typing import TypeVar

import torch
from torch import nn

from ..sparse.conv import Conv3d

M = TypeVar("M", bound=nn.Module)

#: Submodules of a network that stay float32 under :func:`to_reduced_precision`: the heads
#: after the trunk (text-space projections, classifier).
HEADS = ("point_mapping_global", "point_mapping_local", "classifier")


def _fold(layer: Conv3d | nn.Linear, bn: nn.BatchNorm1d) -> None:
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        if isinstance(layer, Conv3d):
            layer.kernel.mul_(scale)  # [..., Cout] scales along the last axis
        else:
            layer.weight.mul_(scale[:, None])  # Linear weight is [out, in]
        old = layer.bias if layer.bias is not None else torch.zeros_like(shift)
        bias = old * scale + shift
        if layer.bias is None:
            layer.bias = nn.Parameter(bias)
        else:
            layer.bias.copy_(bias)


def fold_batchnorms(model: M) -> M:
    """An eval-mode copy of ``model`` with every (Conv3d | Linear, BatchNorm1d) pair of an
    ``nn.Sequential`` folded; ``model`` itself is untouched."""
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            layer, bn = seq._modules[first], seq._modules[second]
            if isinstance(bn, nn.BatchNorm1d) and isinstance(layer, Conv3d | nn.Linear):
                _fold(layer, bn)
                seq._modules[second] = nn.Identity()
    return fused


def to_reduced_precision(model: M, dtype: torch.dtype) -> M:
    """``model``'s trunk (convolutions, point transforms) in ``dtype``, in place; the
    heads (:data:`HEADS`) stay float32, so logits, softmax and labels are computed in fp32. Fold
    batch norms first (:func:`~clip2scene_ros.models.fuse.fold_batchnorms`): a BN's scale
    would otherwise be applied to bf16-rounded outputs."""
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise ValueError("to_reduced_precision wants a model whose batch norms are folded "
                         "(fold_batchnorms first)")
    heads = {id(m) for name in HEADS if isinstance(head := getattr(model, name, None), nn.Module)
             for m in head.modules()}
    for module in model.modules():
        if id(module) in heads:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model
