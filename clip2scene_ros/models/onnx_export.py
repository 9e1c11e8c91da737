"""ONNX export of SPVCNN's feature pass, with the geometry plan's tensors as graph inputs.

The graph maps ``feats [N, F]`` plus the plan of :func:`~clip2scene_ros.models.spvcnn.
plan_schema` (kernel maps, segment-sum tables, trilinear corners) to the text-space point
features ``[N, clip_dim]``. It holds Gather, MatMul, ReduceSum, Concat and elementwise ops only,
every count (points, voxels per stride, table rows) is a dynamic axis, and the text bank stays
outside so a vocabulary swap never needs a new graph. The runtime builds the plan with
:func:`~clip2scene_ros.sparse.plan.build_plan` and feeds it by input name.

What TensorRT builds quickly: batch norms are folded into the layers before them
(:func:`~.fuse.fold_batchnorms`, as the torch backend runs them), and the plan's index inputs
are int32 where every index fits (:func:`index_dtype`; the ONNX parser puts a cast before every
int64 Gather). The graph records the index dtype in its metadata (:data:`INDEX_DTYPE_KEY`), so a
runtime feeds what it was exported with. :func:`fp16_graph` writes the fp16 twin a strongly
typed TensorRT network (11.x) builds from: float weights in fp16, fp32 inputs and output.

We use torch's TorchScript-based exporter (``dynamo=False``): the graph is plain tensor code
without control flow, and it avoids a dependency on onnxscript, which the torch.export-based
exporter needs.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..files import file_sha256
from ..sparse.plan import ConvKey, NetworkPlan, PlanSchema, build_plan, planned_point_tensor
from ..sparse.tensor import Triple
from .fuse import fold_batchnorms
from .spvcnn import SPVCNN, plan_schema

OPSET = 17
FEATS_INPUT = "feats"
OUTPUT = "features"
#: ONNX metadata keys: the plan schema (JSON) the graph was exported for, and the SHA-256 of the
#: bundle's model.safetensors it was exported from (a stale graph is refused at load).
SCHEMA_KEY = "clip2scene.plan_schema"
WEIGHTS_KEY = "clip2scene.weights_sha256"
#: ONNX metadata key: the dtype of the plan's index inputs ("int32"; absent: int64).
INDEX_DTYPE_KEY = "clip2scene.index_dtype"


def index_dtype(max_points: int) -> torch.dtype:
    """int32 when every plan index fits: an index is at most the row count of what it reads
    plus one (the padding row), and no count exceeds the points of a cloud."""
    return torch.int32 if max_points + 1 < 2**31 else torch.int64


def cast_indices(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The plan's tensors with the integer ones in ``dtype`` (floats untouched)."""
    return [t.to(dtype) if not t.is_floating_point() and t.dtype != dtype else t
            for t in tensors]


def graph_index_dtype(meta: dict[str, str]) -> torch.dtype:
    """The index dtype a graph's metadata records (graphs exported before it: int64)."""
    return torch.int32 if meta.get(INDEX_DTYPE_KEY) == "int32" else torch.int64


class PlannedNetwork(nn.Module):
    """``text_features`` of ``model`` as a function of features and plan tensors."""

    def __init__(self, model: SPVCNN, schema: PlanSchema, coords: dict[Triple, torch.Tensor]
                 ) -> None:
        super().__init__()
        self.model = model
        self.schema = schema
        self.coords = coords  # bookkeeping only; the traced ops never read coordinates

    def forward(self, feats: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        plan = NetworkPlan.from_tensors(self.schema, tensors, self.coords)
        return self.model.text_features(planned_point_tensor(feats, plan))


def schema_to_json(schema: PlanSchema) -> str:
    return json.dumps({"convs": [[*map(list, k[:4]), k[4]] for k in schema.convs],
                       "pools": [list(s) for s in schema.pools],
                       "interps": [list(s) for s in schema.interps], "levels": schema.levels})


def schema_from_json(text: str) -> PlanSchema:
    data = json.loads(text)
    # (stride, kernel size, conv stride, dilation, transposed), as schema_to_json writes them
    convs = cast(tuple[ConvKey, ...],
                 tuple((*(tuple(v) for v in c[:4]), bool(c[4])) for c in data["convs"]))
    return PlanSchema(convs=convs, pools=tuple(tuple(s) for s in data["pools"]),
                      interps=tuple(tuple(s) for s in data["interps"]), levels=int(data["levels"]))


def dynamic_axes(schema: PlanSchema) -> dict[str, dict[int, str]]:
    """Named dynamic axes; inputs sharing a count share a name (TensorRT profiles rely on it)."""
    axes: dict[str, dict[int, str]] = {FEATS_INPUT: {0: "points"}, OUTPUT: {0: "points"}}
    names = iter(schema.input_names())
    for stride, _, st, _, transposed in schema.convs:
        out = stride[0] if transposed or st == (1, 1, 1) else stride[0] * st[0]
        axes[next(names)] = {0: f"voxels_s{out}"}
    for s in schema.pools:
        for level in range(schema.levels):
            axes[next(names)] = {0: f"pool_s{s[0]}_l{level}_pass"}
            axes[next(names)] = {0: f"pool_s{s[0]}_l{level}_chunks"}
        axes[next(names)] = {0: f"voxels_s{s[0]}"}
        axes[next(names)] = {0: f"voxels_s{s[0]}"}
    for _ in schema.interps:
        axes[next(names)] = {0: "points"}
        axes[next(names)] = {0: "points"}
    return axes


def example_cloud(points: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A cloud whose voxels hold from one to many points, so every plan table is non-empty."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(points // 2, 3, generator=g) * torch.tensor([400.0, 400.0, 60.0])
    dense = torch.rand(points - points // 2, 3, generator=g) * 3.0 + 100.0
    return torch.cat([spread, dense]), torch.zeros(points, dtype=torch.int64)


def export_onnx(model: SPVCNN, path: str | Path, *, max_points: int,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s planned feature pass to ``path`` (atomically); returns the path.

    ``max_points`` fixes how many points one voxel may hold (the segment-sum depth); clouds are
    capped at the bundle's ``max_points`` before they get here, so that value is always safe.
    """
    path = Path(path)
    schema = plan_schema(max_points)
    coords, batch = example_cloud()
    plan = build_plan(schema, coords, batch)
    dtype = index_dtype(max_points)
    inputs = cast_indices(plan.tensors(), dtype)
    feats = torch.randn(coords.shape[0], model.in_channels, generator=torch.Generator()
                        .manual_seed(1))
    # A folded copy: the caller's model keeps its batch norms and its training flag.
    wrapper = PlannedNetwork(fold_batchnorms(model), schema, plan.coords).eval()
    fd, name = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=path.parent)
    os.close(fd)  # the exporter writes by name
    tmp = Path(name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and trace notes
            torch.onnx.export(
                wrapper, (feats, *inputs), str(tmp), dynamo=False,
                opset_version=OPSET, input_names=[FEATS_INPUT, *schema.input_names()],
                output_names=[OUTPUT], dynamic_axes=dynamic_axes(schema),
                do_constant_folding=True)
        import onnx

        graph = onnx.load(str(tmp))
        for key, value in {SCHEMA_KEY: schema_to_json(schema),
                           INDEX_DTYPE_KEY: str(dtype).removeprefix("torch."),
                           **(metadata or {})}.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_max_rel_err(model: SPVCNN, path: str | Path,
                     cloud: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 2
                     ) -> float:
    """Max |onnxruntime - torch| / max |torch| on ``cloud`` (coords in voxel units, feats), by
    default a 5,000-point cloud unlike the export's example."""
    import onnxruntime as ort

    from ..sparse.tensor import PointTensor

    if cloud is None:
        coords, _ = example_cloud(5000, seed)
        feats = torch.randn(5000, model.in_channels, generator=torch.Generator().manual_seed(seed))
    else:
        coords, feats = cloud
    batch = torch.zeros(coords.shape[0], dtype=torch.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    schema = schema_from_json(meta[SCHEMA_KEY])
    plan = build_plan(schema, coords, batch)
    feed = {FEATS_INPUT: feats.numpy()}
    feed.update({n: t.numpy() for n, t in zip(
        schema.input_names(), cast_indices(plan.tensors(), graph_index_dtype(meta)),
        strict=True)})
    (out,) = session.run([OUTPUT], feed)
    with torch.no_grad():
        ref = model.eval().text_features(PointTensor(feats, coords, batch))
    return float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max())


def export_bundle(bundle_dir: str | Path) -> dict[str, object]:
    """Write ``model.onnx`` into a bundle and check it against torch; returns a report."""
    from .bundle import ONNX_FILE, WEIGHTS_FILE, load_bundle
    from .spvcnn import build_model

    bundle = load_bundle(bundle_dir)
    model = build_model(bundle)
    root = Path(bundle_dir)
    path = export_onnx(model, root / ONNX_FILE, max_points=bundle.spec.input.max_points,
                       metadata={WEIGHTS_KEY: file_sha256(root / WEIGHTS_FILE)})
    return {"onnx": str(path), "bytes": path.stat().st_size, "opset": OPSET,
            "onnx_max_rel_err": onnx_max_rel_err(model, path)}


def fp16_graph(source: str | Path, target: str | Path) -> Path:
    """Write ``source``'s graph with fp16 arithmetic to ``target`` (atomically): float
    initializers and constants in fp16, a Cast to fp16 after each float input and one back to
    fp32 before each output, so callers feed and read fp32 as before. What a strongly typed
    TensorRT network (11.x, no ``BuilderFlag.FP16``) needs to run in fp16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph

    def half(tensor: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float16"),
                                       tensor.name)

    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(half(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(half(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    casts = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{inp.name}__fp16"
        for node in graph.node:
            node.input[:] = [inner if n == inp.name else n for n in node.input]
        casts.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT16,
                                      name=f"{inner}_cast"))
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{out.name}__fp16"
        for node in graph.node:
            node.output[:] = [inner if n == out.name else n for n in node.output]
        graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                           name=f"{out.name}_cast"))
    for node in reversed(casts):
        graph.node.insert(0, node)
    del graph.value_info[:]  # fp32 annotations of inner tensors no longer hold
    onnx.checker.check_model(model)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        onnx.save(model, name)
        Path(name).replace(target)
    finally:
        Path(name).unlink(missing_ok=True)
    return target
