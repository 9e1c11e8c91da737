"""PointCLIP (V1/V2) zero- and few-shot classification of clustered LiDAR objects.

* :mod:`.objects`: thing-class instances by voxel connected components, oriented boxes, and
  the z-up → y-up axis change PointCLIP's views expect;
* :mod:`.projection`: V1 perspective depth maps and V2 realistic projections, batched;
* :mod:`.classifier`: multi-view CLIP features scored against a prompt-ensembled text bank;
* :mod:`.adapter`: PointCLIP's inter-view adapter, its few-shot training and its files;
* :mod:`.ensemble`: PointCLIP + 3D-network logits per object, and agreement between them;
* :mod:`.things`: which classes of a segmentation vocabulary are objects;
* :mod:`.evaluate`, :mod:`.crops`: ``clip2scene pointclip eval`` on files or a bag's crops.
"""

from .adapter import (
    AdapterConfig,
    AdapterTraining,
    InterViewAdapter,
    load_adapter,
    save_adapter,
    train_adapter,
)
from .classifier import PointCLIPClassifier
from .ensemble import agreement, ensemble_logits, pool_point_logits
from .objects import (
    ObjectInstance,
    OrientedBox,
    cluster_objects,
    lidar_to_pointclip,
    oriented_box,
    voxel_components,
)
from .projection import VIEW_SETS, V2Config, ViewSet, project, render_v1, render_v2
from .things import thing_classes

__all__ = [
    "VIEW_SETS",
    "AdapterConfig",
    "AdapterTraining",
    "InterViewAdapter",
    "ObjectInstance",
    "OrientedBox",
    "PointCLIPClassifier",
    "V2Config",
    "ViewSet",
    "agreement",
    "cluster_objects",
    "ensemble_logits",
    "lidar_to_pointclip",
    "load_adapter",
    "oriented_box",
    "pool_point_logits",
    "project",
    "render_v1",
    "render_v2",
    "save_adapter",
    "thing_classes",
    "train_adapter",
    "voxel_components",
]
