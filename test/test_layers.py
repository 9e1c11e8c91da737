"""The layers of DESIGN.md, checked on the package's real import graph.

The graph is read from every ``import`` statement of every module (``ast``), including imports
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency, and importing
the modules at run time would miss it. Relative imports are resolved as Python resolves them.

Layers, bottom up:

* the core: everything not named below (codecs, geometry, sparse, models, runtime, teacher, bag,
  pointclip, sample, figures, ...);
* ``node`` (rclpy) and ``training`` (the offline trainer), side by side: neither imports the
  other, and training never reaches rclpy or a ROS message package, directly or transitively;
* the tools (``tools``, ``bench``, ``fuzz``), which may drive both;
* ``cli``, the command line over everything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "clip2scene_ros"
SOURCE = ROOT / PACKAGE

NODE = {"node"}
TRAINING = {"training"}
TOOLS = {"tools", "bench", "fuzz"}
APP = {"cli"}
#: Top-level modules of rclpy and the ROS message packages: only the node and the tools use them.
ROS = {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "rosgraph_msgs", "geometry_msgs",
       "builtin_interfaces", "lifecycle_msgs", "tf2_msgs", "tf2_ros", "cv_bridge",
       "sensor_msgs_py", "message_filters", "launch", "launch_ros"}


def _modules() -> dict[str, Path]:
    files = [*SOURCE.rglob("*.py"), *(SOURCE / "training").rglob("*.py")]  # rglob skips links
    out = {}
    for path in files:
        parts = [PACKAGE, *path.relative_to(SOURCE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target
            # `from pkg import module` depends on the module, not only on the package
            yield from (f"{target}.{alias.name}" for alias in node.names
                        if f"{target}.{alias.name}" in MODULES)


def _resolve(target: str) -> str:
    """The package module a dotted import lands in, or the external top-level name."""
    if not target.startswith(PACKAGE):
        return target.split(".")[0]
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


GRAPH = {name: {_resolve(t) for t in _imports(name, path)} - {name}
         for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    for layer, names in (("node", NODE), ("training", TRAINING), ("tools", TOOLS),
                         ("app", APP)):
        if sub in names:
            return layer
    return "core"


ALLOWED = {
    "core": {"core"},
    "node": {"core", "node"},
    "training": {"core", "training"},
    "tools": {"core", "node", "training", "tools"},
    "app": {"core", "node", "training", "tools", "app"},
}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read() -> None:
    """The walk sees the package: the trainer, the node, and relative and lazy imports."""
    assert f"{PACKAGE}.training.trainer" in MODULES and f"{PACKAGE}.node.node" in MODULES
    assert f"{PACKAGE}.models.spvcnn" in GRAPH[f"{PACKAGE}.training.trainer"]
    assert "rclpy" in GRAPH[f"{PACKAGE}.node.pipeline"]
    # a function-level import (the CLI imports its commands lazily)
    assert f"{PACKAGE}.tools.demo" in GRAPH[f"{PACKAGE}.cli"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_arrows_point_down(layer: str) -> None:
    wrong = sorted(f"{src} -> {dst}" for src, targets in GRAPH.items() if _layer(src) == layer
                   for dst in targets if dst in MODULES and _layer(dst) not in ALLOWED[layer])
    assert wrong == []


@pytest.mark.parametrize("layer", ["core", "training"])
def test_no_rclpy_below_the_node(layer: str) -> None:
    """Training (and the core under it) never reaches rclpy or a ROS message package, through
    any chain of imports."""
    wrong = sorted(f"{src} reaches {sorted(_closure(src) & ROS)}"
                   for src in GRAPH if _layer(src) == layer and _closure(src) & ROS)
    assert wrong == []


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components of the module graph: every one is a single
    module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v] & MODULES.keys():
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []
