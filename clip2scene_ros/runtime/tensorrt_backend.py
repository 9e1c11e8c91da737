"""TensorRT backend: the bundle's ONNX (planned feature pass) as a cached engine on a GPU.

Supported TensorRT: :data:`TENSORRT_REQUIREMENT` (10.x and 11.x), chosen by the installed
``tensorrt.__version__`` major:

* 10.x: fp16 through ``BuilderFlag.FP16`` on the fp32 graph (weak typing);
* 11.x: networks are strongly typed and the flag is gone, so fp16 builds from the graph's fp16
  twin (:func:`~clip2scene_ros.models.onnx_export.fp16_graph`, written beside the engines), whose
  inputs and output stay fp32.

Any other major stops with ConfigError naming the supported range.

The optimisation profile bounds every dynamic axis (:func:`profile_shapes`): points by the
bundle's min/opt/max (:class:`~clip2scene_ros.models.bundle.EngineSpec`), the voxels of each
stride by its measured voxel-to-point ratio (:mod:`~clip2scene_ros.models.profile`). A cloud
over the profile is thinned to fit (:meth:`TensorRTBackend.fit`), the drop counted as
``over_profile`` and warned about once by the Predictor.

The builder sets a workspace pool limit and keeps a timing cache beside the engines; the
settings are part of the engine's cache key (:class:`.engine_cache.EngineKey`). The requested
``cuda:N`` is made current before anything is deserialised. A cached engine TensorRT cannot
deserialise (another TensorRT build, another GPU, damage), or whose inputs and outputs do not
match the ONNX graph's names, dtypes and ranks, is rebuilt with a log line saying why; only a
freshly built engine that still fails raises IntegrityError. Needs the ``tensorrt`` wheel and a
CUDA GPU; otherwise construction fails with ConfigError.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, IntegrityError
from ..files import atomic_write_bytes, file_sha256
from ..models.bundle import Bundle
from ..models.onnx_export import (
    FEATS_INPUT,
    OUTPUT,
    SCHEMA_KEY,
    dynamic_axes,
    fp16_graph,
    graph_index_dtype,
    schema_from_json,
)
from ..models.profile import DEFAULT_VOXEL_RATIOS, axis_bound
from ..preprocess import PreparedCloud
from ..sparse.plan import NetworkPlan
from . import backends
from .backends import exported_graph_meta
from .device_io import PinnedBuffer, upload_cloud
from .engine_cache import EngineCache, EngineKey, builder_settings, engine_cache_dir

log = logging.getLogger(__name__)

#: TensorRT majors this backend drives, and the pip requirement naming them (setup.py's
#: ``tensorrt`` extra).
SUPPORTED_MAJORS = (10, 11)
TENSORRT_REQUIREMENT = "tensorrt>=10.0,<12"
#: Builder workspace pool limit (MiB) unless one is given.
WORKSPACE_MIB = 4096
#: ONNX element types -> TensorRT DataType names (what engine I/O is checked against).
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def load_tensorrt() -> Any:
    """The ``tensorrt`` module, refused (ConfigError) when missing or of an unsupported major."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ConfigError("backend", f"tensorrt is not installed (pip install "
                          f"'{TENSORRT_REQUIREMENT}' on a machine with an NVIDIA GPU)") from exc
    major = tensorrt_major(trt)
    if major not in SUPPORTED_MAJORS:
        raise ConfigError("backend", f"tensorrt {trt.__version__} is not supported; install "
                          f"'{TENSORRT_REQUIREMENT}'")
    return trt


def tensorrt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return -1


def fp16_route(trt: Any) -> str:
    """How fp16 is reached: ``flag`` (10.x, BuilderFlag.FP16) or ``graph`` (11.x: strongly
    typed networks, an fp16 ONNX)."""
    return "flag" if tensorrt_major(trt) == 10 else "graph"


def _graph_meta(onnx_path: Path) -> tuple[Any, dict[str, str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    return graph, {p.key: p.value for p in graph.metadata_props}


def profile_shapes(onnx_path: Path, profile: tuple[int, int, int],
                   ratios: tuple[float, ...] = DEFAULT_VOXEL_RATIOS) -> Shapes:
    """min/opt/max shape of every graph input for a (min, opt, max) points profile: each
    dynamic axis bounded by :func:`~clip2scene_ros.models.profile.axis_bound` (segment-sum
    tables may be empty, so their min is 0)."""
    graph, meta = _graph_meta(onnx_path)
    axes = dynamic_axes(schema_from_json(meta[SCHEMA_KEY]))
    shapes: Shapes = {}
    for inp in graph.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        dynamic = axes.get(inp.name, {})
        per = []
        for i, points in enumerate(profile):
            shape = []
            for a, d in enumerate(dims):
                if a not in dynamic:
                    shape.append(d)
                elif i == 0 and inp.name.startswith("pool_"):
                    shape.append(0)
                else:
                    shape.append(axis_bound(dynamic[a], points, ratios))
            per.append(tuple(shape))
        shapes[inp.name] = (per[0], per[1], per[2])
    return shapes


def graph_io(onnx_path: Path) -> dict[str, tuple[bool, str, int]]:
    """``{name: (is_input, TensorRT dtype name, rank)}`` of the ONNX graph's inputs and outputs."""
    graph, _ = _graph_meta(onnx_path)
    io = {}
    for is_input, values in ((True, graph.graph.input), (False, graph.graph.output)):
        for v in values:
            t = v.type.tensor_type
            io[v.name] = (is_input, ONNX_TO_TRT.get(t.elem_type, str(t.elem_type)),
                          len(t.shape.dim))
    return io


def engine_io_mismatch(trt: Any, engine: Any, expected: dict[str, tuple[bool, str, int]]
                       ) -> str | None:
    """Why the engine's inputs and outputs differ from the graph's, or None when they match."""
    have = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        have[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                      engine.get_tensor_dtype(name).name, len(engine.get_tensor_shape(name)))
    if set(have) != set(expected):
        missing = sorted(set(expected) - set(have))[:3]
        extra = sorted(set(have) - set(expected))[:3]
        return f"its tensors differ from the graph's (missing {missing}, extra {extra})"
    for name, want in expected.items():
        if have[name] != want:
            kind = ("input", "output")
            return (f"tensor {name!r} is an {kind[not have[name][0]]} of {have[name][1]} rank "
                    f"{have[name][2]}; the graph has an {kind[not want[0]]} of {want[1]} rank "
                    f"{want[2]}")
    return None


def build_engine(onnx_path: Path, key: EngineKey, *, shapes: Shapes, workspace_bytes: int,
                 timing_cache: Path | None = None, fp16_flag: bool = False,
                 graph: Path | None = None) -> bytes:
    """Serialized engine for ``key`` (parser errors and build failures raise IntegrityError).

    ``graph`` is the file parsed when it is not ``onnx_path`` itself (the fp16 twin);
    ``fp16_flag`` sets BuilderFlag.FP16 (TensorRT 10.x only). The timing cache is read from and
    written back to ``timing_cache``.
    """
    trt = load_tensorrt()
    source = graph or onnx_path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (10.x), strongly typed (11.x)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IntegrityError("model.onnx", f"TensorRT cannot parse it: {errors}", str(source))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    timings = _timing_cache(config, timing_cache)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.monotonic()
    log.warning("TensorRT: building the %s engine for %s ...", key.precision, source.name)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise IntegrityError("engine", "TensorRT failed to build the engine (see its log above)",
                             str(source))
    log.warning("TensorRT: engine built in %.0f s", time.monotonic() - start)
    if timings is not None and timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(timings.serialize()))
    return bytes(data)


def _timing_cache(config: Any, path: Path | None) -> Any:
    """The builder's timing cache, seeded from ``path`` when it holds one TensorRT accepts."""
    if path is None:
        return None
    seed = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(seed)
    if cache is None and seed:
        log.warning("TensorRT: timing cache %s is unusable; starting a new one", path)
        cache = config.create_timing_cache(b"")
    if cache is not None:
        config.set_timing_cache(cache, False)  # a mismatching cache is refused, not used
    return cache


class EngineRunner:
    """Runs one deserialised engine: sets shapes and addresses by input name, checking what
    TensorRT answers, and returns the ``[N, D]`` output (on the inputs' stream)."""

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise IntegrityError("engine", "TensorRT could not create an execution context "
                                 "(out of GPU memory?)")
        self.device = device
        self._empty: torch.Tensor | None = None

    def _address(self, tensor: torch.Tensor) -> int:
        """``tensor``'s address; an empty tensor (a segment table with no rows) has none, so it
        gets a small scratch buffer's: TensorRT wants a valid pointer for every input."""
        if tensor.numel():
            return int(tensor.data_ptr())
        if self._empty is None:
            self._empty = torch.zeros(256, dtype=torch.uint8, device=self.device)
        return int(self._empty.data_ptr())

    def _bound(self, name: str, shape: tuple[int, ...]) -> str:
        """Which profile bound ``shape`` breaks (for the error)."""
        try:
            low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        except Exception:
            return "outside the engine's optimisation profile"
        for axis, size in enumerate(shape):
            if axis < len(high) and size > high[axis]:
                return f"axis {axis} = {size} is above the profile's max {high[axis]}"
            if axis < len(low) and size < low[axis]:
                return f"axis {axis} = {size} is below the profile's min {low[axis]}"
        return f"outside the engine's optimisation profile (min {low}, max {high})"

    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in feed.items():
            shape = tuple(int(d) for d in tensor.shape)
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"TensorRT input {name!r} has shape {list(shape)}: "
                                 f"{self._bound(name, shape)}")
            if not self.context.set_tensor_address(name, self._address(tensor)):
                raise RuntimeError(f"TensorRT refused the address of input {name!r} "
                                   f"({tensor.dtype} on {tensor.device})")
        shape = tuple(int(d) for d in self.context.get_tensor_shape(OUTPUT))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT cannot infer the output shape {list(shape)} (an "
                               "input shape is missing)")
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        if not self.context.set_tensor_address(OUTPUT, out.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of output {OUTPUT!r}")
        stream = (torch.cuda.current_stream(self.device).cuda_stream
                  if self.device.type == "cuda" else 0)
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execution failed (see its log above)")
        return out  # the Predictor synchronises once per frame


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: torch.device, *, precision: str = "fp16",
                 cache_dir: str | Path | None = None,
                 profile: tuple[int, int, int] | None = None,
                 workspace_mib: int = WORKSPACE_MIB) -> None:
        trt = load_tensorrt()
        if device.type != "cuda":
            raise ConfigError("backend", f"tensorrt needs a CUDA device, got {device}")
        onnx_path, self.schema, meta = exported_graph_meta(bundle)
        self.index_dtype = graph_index_dtype(meta)
        spec = bundle.spec
        self.profile = profile or spec.engine.profile(spec.input.max_points)
        self.ratios = tuple(spec.engine.voxel_ratios)
        route = fp16_route(trt) if precision == "fp16" else "none"
        cache = EngineCache(engine_cache_dir(onnx_path.parent, cache_dir))
        # TensorRT builds and deserialises on the current GPU: make it the one asked for
        # (plain "cuda" is the current one; set_device needs an index)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device.index)
        sha = file_sha256(onnx_path)
        self.key = EngineKey(sha, trt.__version__, torch.cuda.get_device_name(device), precision,
                             self.profile, builder_settings(
                                 workspace_mib=workspace_mib, fp16=route,
                                 voxel_ratios=list(self.ratios),
                                 index_dtype=str(self.index_dtype).removeprefix("torch.")))
        self.shapes = profile_shapes(onnx_path, self.profile, self.ratios)
        graph = None
        if route == "graph":  # the fp16 twin, once per graph, beside the engines
            graph = cache.directory / f"{onnx_path.stem}-{sha[:16]}.fp16.onnx"
            if not graph.is_file():
                fp16_graph(onnx_path, graph)
        builder = functools.partial(
            build_engine, shapes=self.shapes, workspace_bytes=workspace_mib << 20,
            timing_cache=cache.timing_cache_path(self.key), fp16_flag=route == "flag",
            graph=graph)
        expected = graph_io(onnx_path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        data, self.engine_path = cache.get(onnx_path, self.key, builder)
        engine, problem = self._load(trt, runtime, data, expected)
        if problem is not None:
            log.warning("TensorRT engine: rebuilding %s because %s", self.engine_path.name,
                        problem)
            data, self.engine_path = cache.get(onnx_path, self.key, builder, rebuild=problem)
            engine, problem = self._load(trt, runtime, data, expected)
            if problem is not None:
                raise IntegrityError("engine", f"the freshly built engine is unusable: {problem}",
                                     str(self.engine_path))
        self.engine = engine
        self.runner = EngineRunner(engine, device)
        self.device = device
        self.input_names = [FEATS_INPUT, *self.schema.input_names()]
        self.pinned = PinnedBuffer()
        self._fitted: tuple[PreparedCloud, NetworkPlan, torch.Tensor] | None = None

    @staticmethod
    def _load(trt: Any, runtime: Any, data: bytes, expected: dict[str, tuple[bool, str, int]]
              ) -> tuple[Any, str | None]:
        try:
            engine = runtime.deserialize_cuda_engine(data)
        except Exception as exc:
            return None, f"TensorRT could not deserialise it ({exc})"
        if engine is None:
            return None, ("TensorRT could not deserialise it (built by another TensorRT, for "
                          "another GPU, or damaged)")
        return engine, engine_io_mismatch(trt, engine, expected)

    def _plan(self, prepared: PreparedCloud) -> tuple[NetworkPlan, torch.Tensor]:
        if self._fitted is not None and self._fitted[0] is prepared:
            return self._fitted[1], self._fitted[2]
        coords, feats = upload_cloud(prepared, self.device, self.pinned)
        # through the module: a benchmark's clock on backends.plan_for sees this call
        plan = backends.plan_for(prepared, self.schema, coords=coords,
                                 index_dtype=self.index_dtype)
        self._fitted = (prepared, plan, feats)
        return plan, feats

    def over_profile(self, plan: NetworkPlan, points: int) -> float:
        """The largest ratio of an input's rows to its profile max (<= 1: it fits)."""
        sizes = [points, *(int(t.shape[0]) for t in plan.tensors())]
        return max(size / max(1, self.shapes[name][2][0])
                   for name, size in zip(self.input_names, sizes, strict=True))

    def fit(self, prepared: PreparedCloud) -> PreparedCloud:
        """``prepared``, or an evenly thinned copy whose every plan input fits the profile (the
        points left out counted in ``dropped["over_profile"]``)."""
        cloud = prepared
        for _ in range(16):
            plan, _ = self._plan(cloud)
            excess = self.over_profile(plan, cloud.num_points)
            if excess <= 1.0:
                break
            keep = max(1, int(cloud.num_points / excess * 0.97))
            index = np.linspace(0, cloud.num_points - 1, keep).round().astype(np.int64)
            dropped = dict(cloud.dropped)
            dropped["over_profile"] = (dropped.get("over_profile", 0) + cloud.num_points - keep)
            cloud = PreparedCloud(coords=cloud.coords[index], feats=cloud.feats[index],
                                  source=cloud.source[index], sweep=cloud.sweep[index],
                                  key_points=cloud.key_points, dropped=dropped)
        else:
            raise RuntimeError("could not thin the cloud into the engine's profile")
        if "over_profile" not in cloud.dropped:
            cloud.dropped["over_profile"] = 0
        return cloud

    def features(self, prepared: PreparedCloud) -> torch.Tensor:
        plan, feats = self._plan(prepared)
        feed = dict(zip(self.input_names, [feats, *plan.tensors()], strict=True))
        return self.runner.run({n: t.contiguous() for n, t in feed.items()})

    def describe(self) -> str:
        return f"tensorrt {self.key.precision} on {self.key.gpu} ({self.engine_path.name})"
