"""PointCLIP object labels in the node: the object pass's results as markers, for subscribers.

The pass itself (clustering, PointCLIP within ``objects_budget_ms``, the ensemble) is ROS-free:
:class:`~clip2scene_ros.pointclip.object_pass.ObjectPass`, run by the frame processor. Here:

* **when**: per frame (``objects_mode: every_frame``) or once per call of the
  ``~/classify_objects`` service (``on_demand``), and only while someone subscribes to
  ``objects_topic`` (:meth:`ObjectsOutput.wanted`);
* **markers**: a ``MarkerArray`` with the cloud's header: DELETEALL first (stale boxes vanish),
  then per object a LINE_LIST box and a TEXT_VIEW_FACING label ``"car p=0.87"``; objects the
  budget left to the segmentation are drawn half transparent with a "(3D)" label. Every-frame
  markers live 1 s, so they vanish soon after the node stops; on-demand ones stay until the
  next answer. Publishing runs inside the pass, so the budget reserves for it.

**On demand.** A ``std_srvs/Trigger`` call answers at once ("scheduled") and the next frame
processed publishes the objects. Waiting for that frame inside the call would block the node's
(single-threaded) executor, which has to deliver the very cloud the answer waits for. Calls
before that frame collapse into one pass; a failed pass is retried on the next frame.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from geometry_msgs.msg import Point
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from ..node_params import NodeParams
from ..pointclip.object_pass import ObjectPass, ObjectResult, ObjectsPass
from ..runtime.frame_processor import FrameProcessor, LabelledFrame

#: Lifetime of every-frame markers: a stopped node's boxes fade instead of staying forever.
EVERY_FRAME_LIFETIME_S = 1
BOX_NS = "clip2scene_objects"
TEXT_NS = "clip2scene_object_labels"
LINE_WIDTH_M = 0.05
TEXT_HEIGHT_M = 0.5
SERVICE = "~/classify_objects"
#: The 12 edges of :meth:`OrientedBox.corners` (bottom face, top face, uprights).
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
          (0, 4), (1, 5), (2, 6), (3, 7))


def object_markers(header: Any, results: list[ObjectResult], lifetime_s: int) -> MarkerArray:
    """DELETEALL, then a box and a text per object, in ``header``'s frame (see the module doc)."""
    out = MarkerArray()
    clear = Marker(action=Marker.DELETEALL)
    clear.header = header
    out.markers.append(clear)
    for i, result in enumerate(results):
        obj = result.instance
        rgba = (*(c / 255.0 for c in result.color), 1.0 if result.classified else 0.5)
        corners = obj.box.corners()
        box = Marker(ns=BOX_NS, id=i, type=Marker.LINE_LIST, action=Marker.ADD)
        box.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))
                      for a, b in _EDGES for p in (corners[a], corners[b])]
        box.scale.x = LINE_WIDTH_M
        label = Marker(ns=TEXT_NS, id=i, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                       text=result.text)
        cx, cy, cz = obj.box.center
        label.pose.position.x, label.pose.position.y = float(cx), float(cy)
        label.pose.position.z = float(cz + obj.box.size[2] / 2 + 0.6 * TEXT_HEIGHT_M)
        label.scale.z = TEXT_HEIGHT_M
        for m in (box, label):
            m.header = header
            m.pose.orientation.w = 1.0
            m.color.r, m.color.g, m.color.b, m.color.a = rgba
            m.lifetime.sec = lifetime_s
            out.markers.append(m)
    return out


class ObjectsOutput:
    """The objects output of one pipeline: publisher, service and on-demand requests over the
    processor's object pass. :meth:`open` / :meth:`close` attach the publisher and service."""

    def __init__(self, params: NodeParams, processor: FrameProcessor) -> None:
        if processor.objects is None:
            raise ValueError("the processor runs no object pass (publish_objects is false)")
        self.params = params
        self.processor = processor
        self.objects: ObjectPass = processor.objects
        self.publisher: Any = None
        self.service: Any = None
        self._lock = threading.Lock()
        self._requested = self._served = 0  # on-demand calls, and the last one answered

    @property
    def counts(self) -> Counter[str]:
        """The pass's counters (passes, found, classified, skipped, compared, agreed)."""
        return self.objects.counts

    # --- ROS entities -------------------------------------------------------------------------
    def open(self, node: Any, publisher: Any) -> None:
        self.publisher = publisher
        if self.params.objects_mode == "on_demand":
            self.service = node.create_service(Trigger, SERVICE, self._on_trigger)

    def close(self, node: Any) -> None:
        if self.service is not None:
            node.destroy_service(self.service)
        self.service = self.publisher = None

    def _on_trigger(self, request: Any, response: Any) -> Any:
        with self._lock:
            self._requested += 1
        pub = self.publisher
        topic = pub.topic_name if pub is not None else self.params.objects_topic
        response.success = True
        response.message = f"scheduled: the objects of the next frame go to {topic}"
        if pub is None or pub.get_subscription_count() == 0:
            response.message += "; nobody subscribes to it yet: they are labelled once one does"
        return response

    def wanted(self) -> bool:
        """Whether the coming frame needs an object pass (a subscriber, and a request if
        on demand)."""
        pub = self.publisher
        if pub is None or pub.get_subscription_count() == 0:
            return False
        if self.params.objects_mode == "every_frame":
            return True
        with self._lock:
            return self._requested > self._served

    # --- the pass -----------------------------------------------------------------------------
    def publish(self, header: Any, labelled: LabelledFrame) -> ObjectsPass | None:
        """Run the pass on ``labelled`` and publish its markers (inside the pass's budget)."""
        with self._lock:
            request = self._requested
        lifetime = EVERY_FRAME_LIFETIME_S if self.params.objects_mode == "every_frame" else 0

        def deliver(results: list[ObjectResult]) -> None:
            publisher = self.publisher
            if publisher is not None:
                publisher.publish(object_markers(header, results, lifetime))
            with self._lock:
                self._served = max(self._served, request)

        return self.processor.objects_pass(labelled, deliver)

    def diagnostics(self) -> dict[str, str]:
        return self.objects.diagnostics()
