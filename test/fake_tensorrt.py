"""A small stand-in for the ``tensorrt`` module that records every call (tests only).

It follows the Python API of TensorRT 10.x (``BuilderFlag.FP16`` exists, weak typing) or 11.x
(strongly typed networks, no ``BuilderFlag.FP16``) by the version it is made with, parses ONNX
files with ``onnx`` to learn the graph's inputs and outputs, and serialises an "engine" as JSON
tagged with its major: the runtime of another major (or any other bytes) deserialises to None,
as the real one does. Execution contexts check shapes against the profile and addresses against
the engine's tensors, answering False like the real bindings, and "run" by zeroing the output.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path
from typing import Any

MAGIC = b"fake-trt-engine-"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 8
    BOOL = 4


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}


def make_tensorrt(version: str = "10.8.0", calls: list[tuple[Any, ...]] | None = None,
                  *, fail_parse: bool = False, fail_deserialize: int = 0,
                  engine_io: dict[str, Any] | None = None,
                  refuse_address: frozenset[str] = frozenset()) -> types.ModuleType:
    """A fake ``tensorrt`` of ``version``; ``calls`` receives ``(what, ...)`` tuples.

    ``fail_deserialize``: how many deserialisations return None before they succeed.
    ``engine_io``: overrides of the built engine's I/O (``{name: [is_input, dtype, rank]}``;
    ``None`` as a value removes the tensor) to emulate a foreign engine. ``refuse_address``:
    tensors whose ``set_tensor_address`` answers False (as for a misaligned pointer).
    """
    major = int(version.split(".")[0])
    log: list[tuple[Any, ...]] = calls if calls is not None else []
    state = {"deserialize_failures": fail_deserialize}
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version  # type: ignore[attr-defined]
    flags = {"TF32": 7} if major >= 11 else {"FP16": 0, "TF32": 7}
    mod.BuilderFlag = enum.Enum("BuilderFlag", flags)  # type: ignore[attr-defined]
    mod.NetworkDefinitionCreationFlag = enum.Enum(  # type: ignore[attr-defined]
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    mod.DataType = DataType  # type: ignore[attr-defined]
    mod.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    mod.MemoryPoolType = MemoryPoolType  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.io: dict[str, list[Any]] = {}
            self.dims: dict[str, list[int]] = {}

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            import onnx

            log.append(("parse", Path(path).name))
            if fail_parse:
                self.errors.append("fake parse failure")
                return False
            graph = onnx.load(path).graph
            for is_input, values in ((True, graph.input), (False, graph.output)):
                for v in values:
                    t = v.type.tensor_type
                    self.network.io[v.name] = [is_input, ONNX_TYPES[t.elem_type],
                                               len(t.shape.dim)]
                    self.network.dims[v.name] = [d.dim_value if d.dim_value else -1
                                                 for d in t.shape.dim]
            return True

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+build"

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[Profile] = []
            self.timing: TimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            log.append(("set_flag", flag.name))
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            log.append(("set_memory_pool_limit", pool.name, size))

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            log.append(("create_timing_cache", bytes(data)))
            if data and not data.startswith(b"timing"):
                return None  # a cache TensorRT does not accept
            return TimingCache(bytes(data) or b"timing")

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            log.append(("set_timing_cache", ignore_mismatch))
            self.timing = cache
            return True

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            log.append(("Builder",))

        def create_network(self, flags: int = 0) -> Network:
            log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            log.append(("build", sorted(config.flags)))
            io = dict(network.io)
            for name, value in (engine_io or {}).items():
                if value is None:
                    io.pop(name, None)
                else:
                    io[name] = value
            body = {"io": io, "dims": network.dims, "profile": config.profiles[0].shapes,
                    "flags": sorted(config.flags)}
            return MAGIC + str(major).encode() + b":" + json.dumps(body).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            log.append(("set_input_shape", name, tuple(shape)))
            if name not in self.engine.profile:
                return False
            low, _, high = self.engine.profile[name]
            if len(shape) != len(low) or any(s < lo or s > hi
                                             for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            log.append(("set_tensor_address", name))
            if name not in self.engine.io or not address or name in refuse_address:
                return False
            self.addresses[name] = address
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            dims = list(self.engine.dims[name])
            if "feats" in self.shapes:
                dims[0] = self.shapes["feats"][0]
            return tuple(dims)

        def execute_async_v3(self, stream: int) -> bool:
            log.append(("execute", stream))
            inputs = [n for n, v in self.engine.io.items() if v[0]]
            if any(n not in self.shapes or n not in self.addresses for n in inputs):
                return False
            out = next(n for n, v in self.engine.io.items() if not v[0])
            shape = self.get_tensor_shape(out)
            ctypes.memset(self.addresses[out], 0, 4 * shape[0] * shape[1])
            return True

    class Engine:
        def __init__(self, body: dict[str, Any]) -> None:
            self.io = body["io"]
            self.dims = body["dims"]
            self.profile = body["profile"]
            self.names = list(self.io)

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if self.io[name][0] else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType[self.io[name][1]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1,) * self.io[name][2]

        def get_tensor_profile_shape(self, name: str, index: int) -> list[list[int]]:
            return self.profile[name]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            log.append(("deserialize", bytes(data[:len(MAGIC) + 3])))
            if state["deserialize_failures"] > 0:
                state["deserialize_failures"] -= 1
                return None
            prefix = MAGIC + str(major).encode() + b":"
            if not bytes(data).startswith(prefix):
                return None  # another major's engine, or not an engine
            return Engine(json.loads(bytes(data)[len(prefix):]))

    for cls in (Logger, Builder, OnnxParser, Runtime):
        setattr(mod, cls.__name__, cls)
    return mod
