"""``ros2 param dump`` lists every parameter: the parameter services answer for all of them.

``ros2 param dump`` lists the node's parameters, then asks for all of their values in one
``get_parameters`` request; a parameter without a value (declared by type alone) made that
request come back empty, so the dump showed nothing. Here a second node does the same over the
services, for both nodes (they declare the same parameters).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 wheels) is not installed")

from rcl_interfaces.msg import ParameterType  # noqa: E402
from rcl_interfaces.srv import (  # noqa: E402
    DescribeParameters,
    GetParameters,
    ListParameters,
)
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter, parameter_value_to_python  # noqa: E402

from clip2scene_ros.node.lifecycle_node import Clip2SceneLifecycleNode  # noqa: E402
from clip2scene_ros.node.node import Clip2SceneNode  # noqa: E402
from clip2scene_ros.node_params import NodeParams  # noqa: E402

#: Declared without a value before: their default is an empty list, whose type rclpy cannot tell.
STRING_ARRAYS = ("camera_topics", "camera_info_topics", "objects_classes")
NODES = {"node": Clip2SceneNode, "lifecycle": Clip2SceneLifecycleNode}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clip2scene_ros.models.spvcnn import save_random_bundle

    return save_random_bundle(tmp_path_factory.mktemp("b") / "m")


def expected_type(value: Any) -> int:
    """The ROS type of a ``NodeParams`` default (a list is a string array)."""
    if isinstance(value, list):
        return ParameterType.PARAMETER_STRING_ARRAY
    return Parameter.Type.from_parameter_value(value).value


def call(executor: SingleThreadedExecutor, client: Any, request: Any) -> Any:
    assert client.wait_for_service(timeout_sec=10), f"no {client.srv_name}"
    future = client.call_async(request)
    executor.spin_until_future_complete(future, timeout_sec=10)
    assert future.done(), f"{client.srv_name} did not answer"
    return future.result()


@pytest.mark.parametrize("kind", list(NODES))
def test_parameter_services_answer_for_every_parameter(kind: str, ros: Any,
                                                       bundle: Path) -> None:
    node = NODES[kind](context=ros, parameter_overrides=[
        Parameter("model_path", value=str(bundle)), Parameter("lidar_topic", value="/dump/in"),
        Parameter("objects_classes", value=["car", "pole"])])  # a given list is kept
    peer = rclpy.create_node("param_dump_peer", context=ros)
    executor = SingleThreadedExecutor(context=ros)
    executor.add_node(node)
    executor.add_node(peer)
    base = "/clip2scene_node"
    try:
        listed = call(executor, peer.create_client(ListParameters, f"{base}/list_parameters"),
                      ListParameters.Request(depth=ListParameters.Request.DEPTH_RECURSIVE))
        names = list(listed.result.names)
        defaults = NodeParams()
        declared = {f.name: getattr(defaults, f.name) for f in fields(NodeParams)}
        assert set(declared) <= set(names), set(declared) - set(names)

        # one request naming them all, as `ros2 param dump` sends it
        got = call(executor, peer.create_client(GetParameters, f"{base}/get_parameters"),
                   GetParameters.Request(names=names))
        assert len(got.values) == len(names), f"{len(got.values)} values for {len(names)} names"
        values = dict(zip(names, got.values, strict=True))
        unset = [name for name, value in values.items()
                 if value.type == ParameterType.PARAMETER_NOT_SET]
        assert not unset, f"no value for {unset}"
        wrong = {name: values[name].type for name, default in declared.items()
                 if values[name].type != expected_type(default)}
        assert not wrong, f"types differ from the declared ones: {wrong}"
        for name in STRING_ARRAYS:
            assert values[name].type == ParameterType.PARAMETER_STRING_ARRAY, name
        assert parameter_value_to_python(values["camera_topics"]) == []
        assert parameter_value_to_python(values["camera_info_topics"]) == []
        assert parameter_value_to_python(values["objects_classes"]) == ["car", "pole"]

        described = call(executor,
                         peer.create_client(DescribeParameters, f"{base}/describe_parameters"),
                         DescribeParameters.Request(names=names))
        descriptors = {d.name: d for d in described.descriptors}
        assert set(descriptors) == set(names)
        undescribed = [name for name in declared if not descriptors[name].description.strip()]
        assert not undescribed, f"no description for {undescribed}"
        for name, default in declared.items():
            assert descriptors[name].type == expected_type(default), name
            assert not descriptors[name].dynamic_typing, name
        # the plain node reads them once: read-only but for the vocabulary
        assert descriptors["camera_topics"].read_only == (kind == "node")
        assert not descriptors["vocabulary"].read_only
    finally:
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()


def test_empty_string_arrays_are_what_the_node_reads_as_none(ros: Any, bundle: Path) -> None:
    """The typed empty default keeps its meaning: no cameras, the default object classes."""
    node = Clip2SceneNode(context=ros, parameter_overrides=[
        Parameter("model_path", value=str(bundle)), Parameter("lidar_topic", value="/dump/in")])
    try:
        assert node.params.camera_topics == [] and node.params.camera_info_topics == []
        assert node.params.objects_classes == []
        assert node.pipeline is not None and node.pipeline.cameras == []
    finally:
        node.destroy_node()
