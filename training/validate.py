"""Validation during training: the student scored on the validation set's key frames.

Every ``validation.every_epochs`` epochs (and after the last one) the trainer calls
:func:`validate`. Each rank scores its share of the first ``max_samples`` items (all with 0):
item ``i`` goes to rank ``i mod W``, in batches of ``validation.batch_size``, drawn as epoch 0
of the validation dataset. Predictions are the argmax of the head the bundle deploys (the text
bank's cosines, or the classifier); targets are the samples' ``gt_labels`` where the dataset has
a vocabulary, else their ``labels``; only key-frame points (sweep 0) are scored, as the
evaluation protocol does. The ranks' confusion matrices are summed, so every rank returns the
metrics of the whole set. The student is left in the mode it was in, and the sparse engine's
thread workspace is released afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from clip2scene_ros.metrics import ConfusionMatrix
from clip2scene_ros.runtime.labels import text_logits
from clip2scene_ros.sparse.tensor import thread_workspace
from clip2scene_ros.training.config import ValidationConfig
from clip2scene_ros.training.dataset import BagSceneDataset
from clip2scene_ros.training.distributed import Dist, batch_to_device
from clip2scene_ros.training.sample import collate
from clip2scene_ros.training.student import Student

__all__ = ["validate"]


@torch.no_grad()
def validate(student: Student, dataset: BagSceneDataset, validation: ValidationConfig, *,
             dist_state: Dist, device: torch.device, classes: Sequence[str],
             outputs: frozenset[str], bank: torch.Tensor, num_workers: int,
             autocast: Callable[[], contextlib.AbstractContextManager[Any]],
             skipped: dict[str, str]) -> dict[str, Any]:
    """``{"miou", "accuracy", "points", "per_class_iou"}`` of ``student`` on ``dataset`` (NaN
    where undefined); the keyframes the batches replaced (``skip_bad``) are added to
    ``skipped``. A collective under DDP."""
    count = len(dataset)
    if validation.max_samples:
        count = min(count, validation.max_samples)
    size = validation.batch_size
    mine = list(range(count))[dist_state.rank::dist_state.world]
    batches = [mine[i:i + size] for i in range(0, len(mine), size)]
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    matrix = ConfusionMatrix(len(classes))
    was_training = student.net.training
    student.eval()
    try:
        for raw in loader:
            batch = batch_to_device(raw, device)
            skipped.update(batch.get("replaced", ()))
            with autocast():
                out = student(batch["feats"], batch["coords"], batch["batch"], outputs=outputs)
            if "class_logits" in out:
                logits = out["class_logits"].float()
            else:
                logits = text_logits(out["global_feats"].float(), bank)
            target = batch.get("gt_labels", batch["labels"])
            key = batch["sweep"] == 0  # the evaluation protocol scores the key frame
            matrix.update(logits.argmax(1)[key].cpu().numpy(), target[key].cpu().numpy())
    finally:
        student.train(was_training)
        # training passes run with autograd and never use it: free its high-water memory
        thread_workspace().release()
    if dist_state.active:
        counts = torch.from_numpy(matrix.counts).to(device)
        dist.all_reduce(counts)
        matrix.counts = counts.cpu().numpy()
    metrics = matrix.to_dict(list(classes))
    return {"miou": float("nan") if metrics["miou"] is None else metrics["miou"],
            "accuracy": float("nan") if metrics["accuracy"] is None
            else metrics["accuracy"], "points": metrics["points"],
            "per_class_iou": metrics["per_class_iou"]}
