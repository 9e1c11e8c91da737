"""What a training run leaves: the model bundle and, on request, its ONNX export.

At the end of :func:`~clip2scene_ros.training.trainer.train`, rank 0 writes the trained network
as a model bundle in ``run_dir/bundle`` (the one format the node loads, replaced if there), with
the input spec the dataset used, the text bank and its vocabulary, and a provenance record (the
config, the source commit, the run's counters, losses, validation, best metric and skipped
data); with ``export_onnx`` the bundle is then exported to ONNX beside it. A model trained with
``model.head: classifier`` leaves as the open-vocabulary head the node runs, the classifier folded
into ``point_mapping_global`` and a one-hot text bank (:func:`fold_classifier`).
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip2scene_ros.config import to_dict
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.bundle import (
    ArchitectureSpec,
    BundleSpec,
    InputSpec,
    VocabularySpec,
    save_bundle,
)
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.training.checkpoint import json_safe
from clip2scene_ros.training.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["export_run", "fold_classifier", "write_bundle"]


def export_run(run_dir: Path, config: TrainConfig, net: SPVCNN, *, arch: ArchitectureSpec,
               input_spec: InputSpec, vocab: VocabularySpec, bank: torch.Tensor,
               bank_provenance: Mapping[str, Any], started: dt.datetime,
               record: Mapping[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """``(bundle path, ONNX export report or None)``: :func:`write_bundle`, then the ONNX export
    when ``config.export_onnx``."""
    path = write_bundle(run_dir, config, net, arch=arch, input_spec=input_spec, vocab=vocab,
                        bank=bank, bank_provenance=bank_provenance, started=started,
                        record=record)
    onnx = None
    if config.export_onnx:
        from clip2scene_ros.models.onnx_export import export_bundle

        onnx = export_bundle(path)
    return path, onnx


def write_bundle(run_dir: Path, config: TrainConfig, net: SPVCNN, *, arch: ArchitectureSpec,
                 input_spec: InputSpec, vocab: VocabularySpec, bank: torch.Tensor,
                 bank_provenance: Mapping[str, Any], started: dt.datetime,
                 record: Mapping[str, Any]) -> Path:
    """Write ``net`` as the bundle ``run_dir/bundle`` (replacing one there) and return its path.

    ``record`` is the run's part of the provenance (epochs, steps, world size, samples, skipped,
    final losses, validation, best), written after the config, source commit and times.
    """
    state = {k: v for k, v in net.state_dict().items()
             if not k.startswith("classifier.")}
    bank_info = dict(bank_provenance)
    if config.model.head == "classifier":
        assert net.classifier is not None
        linear = net.classifier[0]
        assert isinstance(linear, torch.nn.Linear)
        state, bank = fold_classifier(state, linear, arch.clip_dim)
        bank_info = {**bank_info, "kind": "classifier",
                     "note": "closed vocabulary: the fine-tuned classifier folded into "
                             "point_mapping_global with one-hot text rows"}
    provenance = {
        "trainer": "clip2scene_ros.training",
        "config": to_dict(config),
        "git": _git_commit(),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    spec = BundleSpec(architecture=arch, input=input_spec, vocabulary=vocab,
                      text_bank=json_safe(bank_info), provenance=json_safe(provenance))
    path = save_bundle(run_dir / "bundle", spec, state, bank, overwrite=True)
    log.info("train: bundle written to %s", path)
    return path


def fold_classifier(state: Mapping[str, torch.Tensor], classifier: nn.Linear, clip_dim: int
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``classifier`` head as ``point_mapping_global`` + a one-hot text bank.

    The bundle (and the node) label by ``argmax_c cos(g, t_c)``. With ``g = [W f + b; 0]`` and
    ``t_c = e_c`` that is ``argmax_c (W f + b)_c / |g|`` = the classifier's argmax (|g| > 0 is a
    per-point factor), so the fine-tuned closed-set model deploys unchanged; its softmax scores
    are the classifier's at a per-point temperature. Needs ``clip_dim >= classes``.
    """
    weight = classifier.weight.detach().cpu()
    bias = classifier.bias.detach().cpu()
    classes, features = weight.shape
    if classes > clip_dim:
        raise ConfigError("model.head", f"{classes} classes do not fold into {clip_dim} "
                          "text dimensions")
    out = dict(state)
    w = torch.zeros(clip_dim, features, dtype=weight.dtype)
    b = torch.zeros(clip_dim, dtype=bias.dtype)
    w[:classes] = weight
    b[:classes] = bias
    out["point_mapping_global.weight"] = w
    out["point_mapping_global.bias"] = b
    bank = torch.zeros(classes, clip_dim, dtype=torch.float32)
    bank[torch.arange(classes), torch.arange(classes)] = 1.0
    return out, bank



def _git_commit() -> dict[str, Any] | None:
    """The source checkout's commit (and whether it had local changes), when there is one."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}

