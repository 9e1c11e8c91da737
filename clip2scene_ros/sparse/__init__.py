"""Torch-native sparse 3D convolution engine with torchsparse's weight layout.

Runs on CPU and GPU with stock torch ops, trains with autograd, and keeps kernel maps outside the
feature computation so the feature pass exports to ONNX. See :mod:`.kmap` for the kernel-offset
order and :mod:`.conv` for the two dataflows.
"""

from .conv import (
    DATAFLOWS,
    Conv3d,
    apply_kernel_map,
    choose_dataflow,
    conv3d,
    gather_scatter_conv,
    implicit_gemm_conv,
)
from .keys import (
    BATCH_MAX,
    COORD_MAX,
    COORD_MIN,
    KeyTable,
    check_coords,
    offset_delta,
    pack_keys,
    unpack_keys,
)
from .kmap import (
    KernelMap,
    build_kernel_map,
    downsample_coords,
    get_kernel_map,
    get_transposed_map,
    kernel_offset_rows,
    kernel_offsets,
)
from .tensor import PointCache, PointTensor, SparseCache, SparseTensor, cat
from .voxelize import (
    devoxelize,
    initial_voxelize,
    point_to_voxel,
    point_voxel_index,
    scatter_mean,
    trilinear_index,
    trilinear_weights,
    voxel_to_point,
    voxelize,
)

__all__ = [
    "BATCH_MAX",
    "COORD_MAX",
    "COORD_MIN",
    "DATAFLOWS",
    "Conv3d",
    "KernelMap",
    "KeyTable",
    "PointCache",
    "PointTensor",
    "SparseCache",
    "SparseTensor",
    "apply_kernel_map",
    "build_kernel_map",
    "cat",
    "check_coords",
    "choose_dataflow",
    "conv3d",
    "devoxelize",
    "downsample_coords",
    "gather_scatter_conv",
    "get_kernel_map",
    "get_transposed_map",
    "implicit_gemm_conv",
    "initial_voxelize",
    "kernel_offset_rows",
    "kernel_offsets",
    "offset_delta",
    "pack_keys",
    "point_to_voxel",
    "point_voxel_index",
    "scatter_mean",
    "trilinear_index",
    "trilinear_weights",
    "unpack_keys",
    "voxel_to_point",
    "voxelize",
]
