"""Inference backends: prepared points in, text-space point features ``[N, clip_dim]`` out.

* ``torch``: the eager network on CPU or CUDA (gather-scatter / implicit-GEMM per layer).
* ``onnxruntime``: the bundle's ``model.onnx`` (the planned feature pass, see
  :mod:`clip2scene_ros.models.onnx_export`) with the plan built here per cloud; CUDA execution
  provider where onnxruntime has it, else CPU.
* ``tensorrt``: an engine built from the same ONNX, cached by :mod:`.engine_cache`.

The text bank is applied by the Predictor after any backend, so every backend serves every
vocabulary.

On a CUDA device the whole frame runs there: the cloud goes up once (:func:`.device_io.
upload_cloud`, one copy from pinned memory), and voxelisation, kernel maps, CSR tables and the
point <-> voxel plan are torch ops on the device, never a plan built on the CPU and copied input
by input.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, IntegrityError
from ..files import file_sha256
from ..models.bundle import WEIGHTS_FILE, Bundle
from ..models.fuse import fold_batchnorms, to_reduced_precision
from ..models.onnx_export import (
    FEATS_INPUT,
    OUTPUT,
    SCHEMA_KEY,
    WEIGHTS_KEY,
    cast_indices,
    graph_index_dtype,
    schema_from_json,
)
from ..models.spvcnn import SPVCNN
from ..precision import DTYPES, cpu_has_fast_bf16, resolve_precision
from ..preprocess import PreparedCloud
from ..sparse.plan import NetworkPlan, PlanSchema, build_plan
from ..sparse.tensor import PointTensor
from .device_io import PinnedBuffer, upload_cloud

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")

#: The precisions each backend runs, per device type. The torch engine runs bf16 weights on a
#: CPU (fp32 accumulation where sums are long) and fp16 autocast on CUDA; the exported ONNX graph
#: is fp32; TensorRT builds fp32 or fp16 engines. A CPU without bf16 matrix units runs bf16 by
#: emulation, slower than fp32: allowed when asked for (logged), never chosen by ``auto``.
SUPPORTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch", "cpu"): ("fp32", "bf16"),
    ("torch", "cuda"): ("fp32", "fp16"),
    ("onnxruntime", "cpu"): ("fp32",),
    ("onnxruntime", "cuda"): ("fp32",),
    ("tensorrt", "cuda"): ("fp32", "fp16"),
}


def supported_precisions(backend: str, device: torch.device) -> tuple[str, ...]:
    """What ``backend`` (``auto``: the device's best backend) runs on ``device``."""
    kind = device.type
    if backend == "auto":
        return tuple(dict.fromkeys(p for (b, d), ps in SUPPORTED.items() if d == kind
                                   for p in ps)) or ("fp32",)
    return SUPPORTED.get((backend, kind), ("fp32",))


def check_precision(precision: str, backend: str, device: torch.device) -> str:
    """The one place a precision is checked and resolved: ``fp32``, ``bf16`` or ``fp16``.

    ``auto`` (:mod:`clip2scene_ros.precision`) becomes the device's choice where ``backend``
    runs it, else fp32, logged once. A precision ``backend`` cannot run on ``device`` is a
    one-line ConfigError naming what it supports.
    """
    resolved = resolve_precision(precision, device)  # ConfigError for an unknown name
    supported = supported_precisions(backend, device)
    if precision == "auto":
        if resolved not in supported:
            resolved = "fp32"
        _log_once(f"precision auto -> {resolved} ({backend} on {device.type}"
                  + (f", CPU bf16 matrix units: {'yes' if cpu_has_fast_bf16() else 'no'})"
                     if device.type == "cpu" else ")"))
        return resolved
    if resolved not in supported:
        raise ConfigError("precision", f"{precision} is not supported by the {backend} backend "
                          f"on {device.type} (supported: {', '.join(supported)})")
    if resolved == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        _log_once("precision bf16 on a CPU without bf16 matrix units (AMX, AVX512-BF16): "
                  "emulated, slower than fp32", logging.WARNING)
    return resolved


_LOGGED: set[str] = set()


def _log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


class Backend(Protocol):
    name: str
    device: torch.device

    def features(self, prepared: PreparedCloud) -> torch.Tensor:
        """``[N, clip_dim]`` float32 features of the prepared points (on ``device``)."""
        ...

    def describe(self) -> str:
        ...


class TrunkBackend(Backend, Protocol):
    """A backend that also gives the trunk's features and the text-space ``head`` after them
    (the Predictor then labels through :class:`~.predictor.TextHead`)."""

    head: nn.Linear

    def trunk_features(self, prepared: PreparedCloud) -> list[torch.Tensor]:
        ...


def available(name: str) -> bool:
    """Whether ``name``'s library is importable here (not whether it can run the bundle)."""
    module = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}[name]
    return importlib.util.find_spec(module) is not None


class TorchBackend:
    name = "torch"

    def __init__(self, model: SPVCNN, device: torch.device, precision: str = "fp32") -> None:
        """``precision``: a resolved one (:func:`check_precision`). bf16 (CPU) converts the
        folded trunk's weights once, here; fp16 (CUDA) runs the fp32 weights under autocast."""
        self.model = fold_batchnorms(model).to(device)
        self.device = device
        self.precision = precision
        #: fp16 autocast on CUDA only (CPU fp16 kernels are slower than fp32 ones)
        self.autocast = precision == "fp16" and device.type == "cuda"
        if precision == "bf16":
            to_reduced_precision(self.model, DTYPES[precision])
        self.pinned = PinnedBuffer()  # the upload buffer, reused frame after frame
        #: The text-space projection after the trunk; the Predictor labels from the trunk's
        #: features through it (``TextHead``) and applies it to them only when asked.
        self.head: nn.Linear = self.model.point_mapping_global

    def trunk_features(self, prepared: PreparedCloud) -> list[torch.Tensor]:
        """The features before ``head`` as column blocks (SPVCNN's three point features, whose
        concatenation ``[N, feature_dim]`` is the head's input, float32)."""
        coords, feats = upload_cloud(prepared, self.device, self.pinned)
        # batch zeros made on coords' device; no finiteness check: prepare_frames dropped every
        # non-finite point, and the check would read a value back from the device
        points = PointTensor(feats, coords, check=False)
        if not self.autocast:
            return [b.float() for b in self.model.point_features(points)]
        with torch.autocast(self.device.type, dtype=torch.float16):
            blocks = self.model.point_features(points)
        return [b.float() for b in blocks]

    def features(self, prepared: PreparedCloud) -> torch.Tensor:
        return self.head(torch.cat(self.trunk_features(prepared), dim=1))

    def describe(self) -> str:
        mode = {"fp16": " (fp16 autocast)", "bf16": " (bf16 weights)"}.get(self.precision, "")
        return f"torch on {self.device}{mode}"


def plan_for(prepared: PreparedCloud, schema: PlanSchema, *,
             device: torch.device | None = None, coords: torch.Tensor | None = None,
             index_dtype: torch.dtype = torch.int32) -> NetworkPlan:
    """The geometry plan of ``prepared``, built on ``device`` (default CPU) from ``coords`` when
    given (already there), with its index tensors in ``index_dtype`` (the graph's,
    :func:`~clip2scene_ros.models.onnx_export.graph_index_dtype`)."""
    if coords is None:
        coords = torch.from_numpy(prepared.coords)
        if device is not None:
            coords = coords.to(device)
    plan = build_plan(schema, coords, torch.zeros(coords.shape[0], dtype=torch.int64,
                                                  device=coords.device))
    return _with_index_dtype(plan, index_dtype)


def _with_index_dtype(plan: NetworkPlan, dtype: torch.dtype) -> NetworkPlan:
    return NetworkPlan.from_tensors(plan.schema, cast_indices(plan.tensors(), dtype), plan.coords)


def exported_graph(bundle: Bundle) -> tuple[Path, PlanSchema]:
    """The bundle's ``model.onnx`` and its plan schema, refused when missing or stale."""
    path, schema, _ = exported_graph_meta(bundle)
    return path, schema


def exported_graph_meta(bundle: Bundle) -> tuple[Path, PlanSchema, dict[str, str]]:
    """:func:`exported_graph` plus the graph's metadata (index dtype and the rest)."""
    import onnx

    path = bundle.onnx_path
    if path is None or bundle.path is None:
        raise ConfigError("backend", "needs the bundle's model.onnx; write it with `clip2scene "
                          "export --model BUNDLE` (or use backend torch)", str(bundle.path))
    from google.protobuf.message import Error as ProtobufError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except ProtobufError as exc:  # truncated or not ONNX at all
        raise IntegrityError("model.onnx", f"cannot be read ({exc}): truncated or not an ONNX "
                             f"file; run `clip2scene export --model {bundle.path}` again",
                             str(path)) from None
    meta = {p.key: p.value for p in graph.metadata_props}
    if SCHEMA_KEY not in meta:
        raise IntegrityError("model.onnx", "has no plan schema: it was not written by "
                             "`clip2scene export`; export the bundle again", str(path))
    if meta.get(WEIGHTS_KEY) != file_sha256(bundle.path / WEIGHTS_FILE):
        raise IntegrityError("model.onnx", f"was exported from other weights than this bundle's "
                             f"{WEIGHTS_FILE}; run `clip2scene export --model {bundle.path}` again",
                             str(path))
    return path, schema_from_json(meta[SCHEMA_KEY]), meta


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: torch.device, threads: int = 0) -> None:
        import onnxruntime as ort

        path, self.schema, meta = exported_graph_meta(bundle)
        self.index_dtype = graph_index_dtype(meta)
        self.path = str(path)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(self.path, self.session_options(), providers=providers)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = [FEATS_INPUT, *self.schema.input_names()]
        if self.input_names != expected:
            raise IntegrityError("model.onnx", f"inputs {self.input_names[:3]}... do not match its "
                                 "plan schema; export the bundle again", str(path))
        self.device = device

    def session_options(self) -> Any:
        """The session's options: ``threads`` intra-op threads (default: torch's, so one setting
        governs both backends), every graph optimisation, and no memory pattern (it plans
        buffers for one set of input shapes, and every cloud has other shapes)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False
        return options

    def features(self, prepared: PreparedCloud) -> torch.Tensor:
        plan = plan_for(prepared, self.schema, index_dtype=self.index_dtype)
        feed = {FEATS_INPUT: prepared.feats}
        feed.update({n: t.numpy() for n, t in zip(self.input_names[1:], plan.tensors(),
                                                   strict=True)})
        (out,) = self.session.run([OUTPUT], feed)
        return torch.from_numpy(np.asarray(out)).to(self.device)

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(self.providers)})"
