"""PointCLIP V1's inter-view adapter: a few-shot head over the frozen CLIP view features.

Architecture (reference §2.4, ``trainers/fewshot.py``), for M views of D-dim features:

* ``fusion_ratio``: one learnable scalar per view (init 0.5) multiplying its feature;
* global branch: BatchNorm over the B·M view features → Dropout(0.075) → flatten →
  Linear(M·D → D) → BatchNorm(D) → ReLU → Dropout(0.075);
* view branch: Linear(D → D) → ReLU → Linear(D → M·D) → ReLU: per-view adapted features;
* output: ``ratio · view branch + (1 − ratio) · concat(f_v)`` with ratio 0.6, L2-normalised over
  all M·D channels and scored against the M-times repeated text feature
  (:meth:`~.classifier.PointCLIPClassifier.adapter_logits`).

For D = 512, M = 10 that is ~5.5 M parameters, as in the paper. One change: the inputs are the
unit per-view features the zero-shot classifier uses, not the raw CLIP outputs, so the residual
branch is exactly the zero-shot features whatever the backbone's feature norm.

Training follows the reference recipe (frozen CLIP; SGD, momentum 0.9, weight decay 5e-4; one
warm-up epoch at 1e-5 then cosine; batch 32; label-smoothed cross-entropy with the smoothing
spread over the wrong classes, DGCNN's ``smooth_loss``), except that the default smoothing is 0.1
(the reference uses 0.2) and that CLIP features are computed once: optional augmented copies
(the reference's anisotropic scale U(2/3, 3/2) and shift U(−0.2, 0.2)) are drawn up front.
There is no validation-based checkpoint choice: the reference's "best_val" was the test set.

On disk, inside a bundle directory: ``pointclip_adapter.safetensors`` (the state dict, BatchNorm
statistics included) and ``pointclip_adapter.yaml`` (sizes, views, classes, provenance and the
tensor file's SHA-256). Nothing is pickled.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import load_config, to_dict
from ..errors import ConfigError, IntegrityError
from ..files import load_checked_tensors, save_checked_tensors

if TYPE_CHECKING:
    from .classifier import ObjectLike, PointCLIPClassifier

ADAPTER_WEIGHTS = "pointclip_adapter.safetensors"
ADAPTER_SPEC = "pointclip_adapter.yaml"
ADAPTER_FORMAT = "clip2scene_pointclip_adapter"
ADAPTER_VERSION = 1


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of an adapter and what its input features were made from."""

    num_views: int
    dim: int
    ratio: float = 0.6
    init: float = 0.5
    dropout: float = 0.075
    views: str = "v1_fewshot"
    projection: str = "v1"
    image_size: int = 224
    classes: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.num_views < 1 or self.dim < 1:
            raise ConfigError("num_views", f"views and dim must be >= 1, got {self.num_views}, "
                              f"{self.dim}")
        if not 0 <= self.ratio <= 1:
            raise ConfigError("ratio", f"must be in [0, 1], got {self.ratio}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")

    def __post_init__(self) -> None:
        self.validate()


class InterViewAdapter(nn.Module):
    """``[B, M, D]`` view features → ``[B, M·D]`` unit adapted features."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.provenance: dict[str, Any] = {}
        m, d = config.num_views, config.dim
        self.fusion_ratio = nn.Parameter(torch.full((m,), float(config.init)))
        self.view_norm = nn.BatchNorm1d(d)  # the reference's BatchNormPoint: stats over B·M
        self.global_f = nn.Sequential(
            nn.Dropout(config.dropout), nn.Flatten(), nn.Linear(m * d, d), nn.BatchNorm1d(d),
            nn.ReLU(), nn.Dropout(config.dropout))
        self.view_f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, m * d), nn.ReLU())

    def forward(self, features: Tensor) -> Tensor:
        b, m, d = features.shape
        if (m, d) != (self.config.num_views, self.config.dim):
            raise ConfigError("features", f"expected [B, {self.config.num_views}, "
                              f"{self.config.dim}], got {tuple(features.shape)}")
        x = features * self.fusion_ratio.view(1, m, 1)
        x = self.view_norm(x.reshape(b * m, d)).view(b, m, d)
        adapted = self.view_f(self.global_f(x))
        ratio = self.config.ratio
        out = ratio * adapted + (1 - ratio) * features.reshape(b, m * d)
        return F.normalize(out, dim=-1)


@dataclass
class AdapterTraining:
    """What :func:`train_adapter` returns: the adapter (eval mode) and per-epoch history."""

    adapter: InterViewAdapter
    losses: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    selected: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def select_shots(labels: Sequence[int] | np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of at most ``shots`` random examples per class (sorted, reproducible)."""
    if shots < 1:
        raise ConfigError("shots", f"must be >= 1, got {shots}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.nonzero(labels == c)[0])[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def augment_cloud(cloud: Tensor, generator: torch.Generator) -> Tensor:
    """The reference's training augmentation: per-axis scale U(2/3, 3/2), shift U(−0.2, 0.2)."""
    scale = 2 / 3 + torch.rand(3, generator=generator) * (3 / 2 - 2 / 3)
    shift = -0.2 + torch.rand(3, generator=generator) * 0.4
    return cloud * scale.to(cloud.device) + shift.to(cloud.device)


def smooth_cross_entropy(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy against ``1 − ε`` on the class and ``ε / (C − 1)`` on each other class."""
    classes = logits.shape[1]
    one_hot = F.one_hot(target, classes).to(logits.dtype)
    soft = one_hot * (1 - smoothing) + (1 - one_hot) * smoothing / max(classes - 1, 1)
    return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _lr_at(epoch: int, epochs: int, lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


def train_adapter(classifier: PointCLIPClassifier, objects: Sequence[ObjectLike],
                  labels: Sequence[int] | np.ndarray | Tensor, shots: int = 16,
                  epochs: int = 250, lr: float = 0.01, label_smoothing: float = 0.1,
                  seed: int = 2, *, batch_size: int = 32, momentum: float = 0.9,
                  weight_decay: float = 5e-4, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                  augment_copies: int = 0, ratio: float = 0.6, init: float = 0.5,
                  dropout: float = 0.075, attach: bool = True) -> AdapterTraining:
    """Train an inter-view adapter on ``shots`` labelled objects per class.

    Args:
        classifier: gives the projection, the frozen CLIP and the text bank.
        objects, labels: the labelled pool (labels are vocabulary class indices); ``shots``
            per class are drawn from it with ``seed``.
        augment_copies: extra augmented copies of every shot (CLIP runs once per copy).
        attach: attach the trained adapter to ``classifier``.
    Returns:
        the adapter (eval mode) with the mean loss and accuracy of every epoch.
    """
    label_arr = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels,
                           dtype=np.int64)
    num_classes = len(classifier.class_names)
    if label_arr.shape != (len(objects),):
        raise ConfigError("labels", f"need one label per object ({len(objects)}), got "
                          f"{label_arr.shape}")
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= num_classes):
        raise ConfigError("labels", f"must be class indices in [0, {num_classes})")
    if num_classes < 2:
        raise ConfigError("vocabulary", "few-shot training needs at least two classes")
    if epochs < 1 or not lr > 0 or not 0 <= label_smoothing < 1 or batch_size < 2:
        raise ConfigError("epochs", "need epochs >= 1, lr > 0, 0 <= label_smoothing < 1 and "
                          "batch_size >= 2")
    if augment_copies < 0:
        raise ConfigError("augment_copies", f"must be >= 0, got {augment_copies}")
    selected = select_shots(label_arr, shots, seed)
    if selected.size < 2:
        raise ConfigError("objects", "need at least two labelled objects (BatchNorm)")
    device = classifier.device
    generator = torch.Generator().manual_seed(seed)
    clouds = classifier.prepare([objects[i] for i in selected])
    copies = list(clouds)
    for _ in range(augment_copies):
        copies.extend(augment_cloud(c, generator) for c in clouds)
    features = classifier.encode_prepared(copies)
    target = torch.as_tensor(np.tile(label_arr[selected], 1 + augment_copies), device=device)

    config = AdapterConfig(num_views=classifier.num_views, dim=int(features.shape[2]),
                           ratio=ratio, init=init, dropout=dropout,
                           views=classifier.views.name, projection=classifier.projection,
                           image_size=classifier.image_size,
                           classes=tuple(classifier.class_names))
    fork = [device.index or 0] if device.type == "cuda" else []
    losses: list[float] = []
    accuracy: list[float] = []
    # seed the weights and dropout without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        adapter = InterViewAdapter(config).to(device).train()
        optim = torch.optim.SGD(adapter.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
        n = features.shape[0]
        for epoch in range(epochs):
            for group in optim.param_groups:
                group["lr"] = _lr_at(epoch, epochs, lr, warmup_epochs, warmup_lr)
            order = torch.randperm(n, generator=generator).to(device)
            starts = list(range(0, n, batch_size))
            if n - starts[-1] == 1 and len(starts) > 1:
                starts.pop()  # BatchNorm cannot train on a batch of one; drop that sample
            total, correct, seen = 0.0, 0, 0
            for start in starts:
                idx = order[start:start + batch_size]
                logits = classifier.adapter_logits(features[idx], adapter)
                loss = smooth_cross_entropy(logits, target[idx], label_smoothing)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += float(loss.detach()) * idx.numel()
                correct += int((logits.argmax(dim=1) == target[idx]).sum())
                seen += idx.numel()
            losses.append(total / seen)
            accuracy.append(correct / seen)
    adapter.eval()
    adapter.provenance = {
        "shots": int(shots), "examples": int(selected.size), "augment_copies": augment_copies,
        "epochs": epochs, "lr": lr, "label_smoothing": label_smoothing, "seed": seed,
        "batch_size": batch_size, "final_loss": losses[-1], "final_train_accuracy": accuracy[-1],
        "prompts": classifier.prompts, "normalize_images": classifier.normalize_images,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if attach:
        classifier.attach_adapter(adapter)
    return AdapterTraining(adapter, losses, accuracy, selected)


def adapter_paths(bundle_dir: str | Path) -> tuple[Path, Path]:
    bundle_dir = Path(bundle_dir)
    return bundle_dir / ADAPTER_WEIGHTS, bundle_dir / ADAPTER_SPEC


def save_adapter(bundle_dir: str | Path, adapter: InterViewAdapter,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write the adapter into ``bundle_dir``; returns the safetensors file's path.

    The tensors go first and the YAML, written second, records their checksum, so a crash
    between the two replaces is caught at load time instead of mixing weights and sizes.
    """
    tensor_path, yaml_path = adapter_paths(bundle_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    save_checked_tensors(tensor_path, yaml_path, tensors, {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "config": to_dict(adapter.config),
        "provenance": to_dict({**adapter.provenance, **(provenance or {})}),
    })
    return tensor_path


def load_adapter(bundle_dir: str | Path, device: torch.device | str = "cpu"
                 ) -> InterViewAdapter:
    """Read an adapter written by :func:`save_adapter` (eval mode, on ``device``)."""
    tensor_path, yaml_path = adapter_paths(bundle_dir)
    tensors, meta = load_checked_tensors(tensor_path, yaml_path, "PointCLIP adapter",
                                         ADAPTER_FORMAT, ADAPTER_VERSION)
    try:
        config = load_config(AdapterConfig, meta.get("config"))
    except ConfigError as exc:
        raise ConfigError(f"config.{exc.key}", exc.reason, str(yaml_path)) from None
    adapter = InterViewAdapter(config)
    try:
        adapter.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise IntegrityError("<file>", f"weights do not fit the adapter's sizes: "
                             f"{str(exc).splitlines()[0][:300]}", str(tensor_path)) from exc
    provenance = meta.get("provenance") or {}
    adapter.provenance = provenance if isinstance(provenance, dict) else {}
    return adapter.to(device).eval()
