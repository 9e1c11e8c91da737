"""TensorRT backend: the bundle's ONNX (planned feature pass) as a cached engine on a GPU.

The graph's inputs all have dynamic first axes (points, voxels per stride, segment-sum table
rows); one optimisation profile covers ``min/opt/max`` points for every one of them, since none
can exceed the point count. Engines are cached by :class:`.engine_cache.EngineCache`, in the
folder :func:`.engine_cache.engine_cache_dir` picks (``<bundle>/engines`` unless one is given).
Needs the ``tensorrt`` wheel and a CUDA GPU; otherwise construction fails with ConfigError. A
graph TensorRT cannot parse or build, or an engine it cannot deserialise, raises IntegrityError.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..errors import ConfigError, IntegrityError
from ..files import file_sha256
from ..models.bundle import Bundle
from ..models.onnx_export import FEATS_INPUT, OUTPUT, SCHEMA_KEY, dynamic_axes, schema_from_json
from ..preprocess import PreparedCloud
from .backends import exported_graph, plan_for
from .engine_cache import EngineCache, EngineKey, engine_cache_dir

log = logging.getLogger(__name__)


def _trt():  # imported lazily: the module is importable without TensorRT
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ConfigError("backend", "tensorrt is not installed (pip install tensorrt on a "
                          "machine with an NVIDIA GPU)") from exc
    return trt


def profile_shapes(onnx_path: Path, profile: tuple[int, int, int]
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max shape of every graph input for a (min, opt, max) points profile."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    axes = dynamic_axes(schema_from_json(meta[SCHEMA_KEY]))
    shapes = {}
    for inp in graph.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        dynamic = axes.get(inp.name, {})
        per = []
        for i, bound in enumerate(profile):
            low = 0 if i == 0 and inp.name.startswith("pool_") else bound
            per.append(tuple(low if a in dynamic else d for a, d in enumerate(dims)))
        shapes[inp.name] = (per[0], per[1], per[2])
    return shapes


def build_engine(onnx_path: Path, key: EngineKey) -> bytes:
    """Serialized engine for ``key`` (parser errors and build failures raise IntegrityError)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IntegrityError("model.onnx", f"TensorRT cannot parse it: {errors}", str(onnx_path))
    config = builder.create_builder_config()
    if key.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(onnx_path, key.profile).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.monotonic()
    log.warning("TensorRT: building the %s engine for %s ...", key.precision, onnx_path.name)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise IntegrityError("engine", "TensorRT failed to build the engine (see its log above)",
                             str(onnx_path))
    log.warning("TensorRT: engine built in %.0f s", time.monotonic() - start)
    return bytes(data)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: torch.device, *, precision: str = "fp16",
                 cache_dir: str | Path | None = None, min_points: int = 1,
                 opt_points: int = 0) -> None:
        trt = _trt()
        if device.type != "cuda":
            raise ConfigError("backend", "tensorrt needs a CUDA device")
        onnx_path, self.schema = exported_graph(bundle)
        cache = EngineCache(engine_cache_dir(onnx_path.parent, cache_dir))
        max_points = bundle.spec.input.max_points
        profile = (min_points, opt_points or min(max_points, 100_000), max_points)
        self.key = EngineKey(file_sha256(onnx_path), trt.__version__,
                             torch.cuda.get_device_name(device), precision, profile)
        data, self.engine_path = cache.get(onnx_path, self.key, build_engine)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise IntegrityError("engine", "TensorRT could not deserialize the cached engine",
                                 str(self.engine_path))
        self.context = self.engine.create_execution_context()
        self.device = device
        self.input_names = [FEATS_INPUT, *self.schema.input_names()]

    def features(self, prepared: PreparedCloud) -> torch.Tensor:
        plan = plan_for(prepared, self.schema)
        inputs = [torch.from_numpy(prepared.feats), *plan.tensors()]
        live = []  # keeps the device copies alive until the stream is done
        for name, tensor in zip(self.input_names, inputs, strict=True):
            t = tensor.to(self.device, non_blocking=True).contiguous()
            live.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=torch.float32,
                          device=self.device)
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out

    def describe(self) -> str:
        return f"tensorrt {self.key.precision} on {self.key.gpu} ({self.engine_path.name})"
