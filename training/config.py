"""The trainer's configuration: one dataclass tree, loaded from YAML with ``load_config``.

A run is fully described by a :class:`TrainConfig` (the files under ``config/train/`` are
examples); ``clip2scene train --set key=value`` edits the YAML mapping before it is loaded, so a
command-line override goes through exactly the same type and range checks as the file.

Hyper-parameter defaults are CLIP2Scene's (reference ``clip2scene.md`` §1.7): SGD lr 0.1,
momentum 0.9, dampening 0.1, weight decay 1e-4, cosine annealing over 20 epochs stepped once per
epoch, S3 from epoch 10.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from clip2scene_ros.config import load_config, read_yaml
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.bundle import ArchitectureSpec, InputSpec
from clip2scene_ros.training.dataset_config import DatasetConfig
from clip2scene_ros.training.losses import DEFAULT_INPUTS, build_loss

__all__ = [
    "ModelConfig",
    "OptimizerConfig",
    "S3Config",
    "SchedulerConfig",
    "TextBankConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_train_config",
]


@dataclass(frozen=True)
class TextBankConfig:
    """Where the text bank (one CLIP text embedding per class) comes from.

    Either ``file``, a bank written by ``clip2scene vocab build`` (``FILE`` for
    ``FILE.safetensors`` + ``FILE.yaml``), or ``vocabulary`` (a vocabulary YAML or built-in name)
    to be encoded at the start of the run with the CLIP ``model`` / ``pretrained`` weights and
    ``prompts`` (written to ``run_dir/text_bank``, so a resumed run reuses the same rows).
    """

    file: Path | None = None
    vocabulary: str | None = None
    model: str = "ViT-B-16"
    pretrained: str | None = None
    prompts: str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        if (self.file is None) == (self.vocabulary is None):
            raise ConfigError("file", "give either file (a built text bank) or vocabulary (to "
                              "build one), not both and not neither")


@dataclass(frozen=True)
class ModelConfig:
    """The student network and its output head.

    Attributes:
        architecture: SPVCNN widths / cr / blocks / CLIP dimension (default ``ArchitectureSpec()``,
            or the ``init_from`` bundle's, which it must then equal).
        input: the preprocessing (voxel size, features, scaling); goes into the dataset's
            ``input_spec`` unless the dataset names its own (default: the ``init_from`` bundle's,
            else ``InputSpec()``).
        init_from: a model bundle to start from (label-efficient fine-tuning of a distilled
            network); its weights load key for key, a new ``classifier`` starts at random.
        head: what ``logits`` are: ``text`` = scaled cosines against the text bank (the
            open-vocabulary head, annotation-free training and text-space fine-tuning);
            ``classifier`` = a linear ``classifier`` over the 480·cr point features (the code's
            downstream fine-tuning), folded into the bundle at the end (see the trainer).
    """

    architecture: ArchitectureSpec | None = None
    input: InputSpec | None = None
    init_from: Path | None = None
    head: Literal["text", "classifier"] = "text"


@dataclass(frozen=True)
class S3Config:
    """Switchable self-training (``losses.SwitchableSelfTraining``); off unless ``enabled``.

    ``start_epoch`` is 0-based ("after 10 epochs" = 10; the nuScenes code's ``epoch > 10`` = 11),
    ``per`` is ``batch`` (the code's one coin per batch) or ``point`` (the paper's reading);
    ``min_confidence`` switches only points the student is that sure of (off: the paper's S3).
    """

    enabled: bool = False
    start_epoch: int = 10
    probability: float = 0.5
    per: Literal["batch", "point"] = "batch"
    rest_threshold: float | None = None
    min_confidence: float | None = None

    def validate(self) -> None:
        if self.start_epoch < 0:
            raise ConfigError("start_epoch", f"must be >= 0, got {self.start_epoch}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError("probability", f"must lie in [0, 1], got {self.probability}")
        if self.rest_threshold is not None and not 0.0 <= self.rest_threshold <= 1.0:
            raise ConfigError("rest_threshold", f"must lie in [0, 1], got {self.rest_threshold}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError("min_confidence", f"must lie in [0, 1], got {self.min_confidence}")


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD. ``lr_head`` (if set) is the learning rate of the ``classifier`` head (fine-tuning:
    the code's 0.02 backbone / 2.0 head); ``clip_grad_norm`` clips the global gradient norm."""

    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.1
    weight_decay: float = 1e-4
    nesterov: bool = False
    lr_head: float | None = None
    clip_grad_norm: float | None = None

    def validate(self) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.lr_head is not None and not self.lr_head > 0:
            raise ConfigError("lr_head", f"must be > 0, got {self.lr_head}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov", "needs momentum > 0 and dampening 0 (torch.optim.SGD)")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError("clip_grad_norm", f"must be > 0, got {self.clip_grad_norm}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule: ``cosine`` annealing to ``eta_min`` (``CosineAnnealingLR``) or
    ``constant``. ``interval: epoch`` steps once per epoch with ``T_max = epochs`` (the code);
    ``step`` once per optimizer step with ``T_max`` = all steps of the run (smoother on short
    runs)."""

    name: Literal["cosine", "constant"] = "cosine"
    interval: Literal["epoch", "step"] = "epoch"
    eta_min: float = 0.0

    def validate(self) -> None:
        if self.eta_min < 0:
            raise ConfigError("eta_min", f"must be >= 0, got {self.eta_min}")


@dataclass(frozen=True)
class ValidationConfig:
    """Validation after every ``every_epochs`` epochs on ``dataset`` (usually ``augment: false``
    and ground truth), scored by ``metric`` with the evaluation confusion matrix; the best value
    (``mode: max``) is kept as ``checkpoints/best.safetensors``.

    Targets are the samples' ``gt_labels`` where the dataset has a vocabulary (its classes must
    be the text bank's, in order), else their ``labels``; only keyframe points are scored (the
    evaluation protocol). ``max_samples`` caps the validation set (0: all).
    """

    dataset: DatasetConfig
    every_epochs: int = 1
    metric: Literal["miou", "accuracy"] = "miou"
    batch_size: int = 1
    max_samples: int = 0

    def validate(self) -> None:
        if self.every_epochs < 1:
            raise ConfigError("every_epochs", f"must be >= 1, got {self.every_epochs}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_samples < 0:
            raise ConfigError("max_samples", f"must be >= 0, got {self.max_samples}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module doc and ``config/train/*.yaml``).

    Attributes:
        run_dir: checkpoints, TensorBoard logs, the built text bank and the final ``bundle/``.
        dataset: the training samples (``training.dataset_config.DatasetConfig``).
        text_bank: the class text embeddings (also the bundle's vocabulary).
        loss: ``build_loss`` terms by name (``scr``, ``ssr``, ``kl``, ``ppkt``, ``supervised``).
        model / s3 / optimizer / scheduler: see their classes.
        epochs: passes over the dataset.
        batch_size: samples per micro-batch *per process*; an optimizer step consumes
            ``batch_size × grad_accumulation × world_size`` samples (the global batch).
        grad_accumulation: micro-batches whose gradients add up to one optimizer step.
        amp / amp_dtype: mixed precision (``torch.autocast``, + ``GradScaler`` for float16;
            off by default). ``amp_dtype: auto`` is float16 on CUDA, and on a CPU bfloat16
            where it has bf16 matrix units (AMX, AVX512-BF16), else fp32 (said once: bf16 is
            emulated there, slower than fp32). ``bfloat16`` runs on any CPU (with a warning
            where emulated); ``float16`` is CUDA's. The whole network runs in that dtype, the
            sparse trunk's convolutions included; their scatter sums, the point <-> voxel means,
            the trilinear interpolation and the losses stay float32, and the weights (and so
            checkpoints and bundles) stay float32.
        checkpoint_every: also write ``checkpoints/last`` every N optimizer steps (0: at epoch
            ends only).
        validation: optional validation and best-checkpoint tracking.
        seed: seeds the network initialisation, the epoch orders, the dataset (unless the
            dataset config sets its own non-zero seed) and S3.
        shuffle: draw a new sample order per epoch (False: dataset order).
        num_workers: DataLoader workers per process (samples depend only on (seed, epoch,
            index), so any count gives the same batches).
        device: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        export_onnx: also write ``bundle/model.onnx`` (``export_bundle``) at the end.
        tensorboard: write TensorBoard scalars under ``run_dir/tensorboard`` (if installed).
        progress: tqdm progress bar (rank 0).
        log_every: TensorBoard/progress-bar loss refresh interval in optimizer steps.
        skip_bad: leave out unreadable bags and keyframes of the training and validation sets
            and report them (``DatasetConfig.skip_bad``; ``clip2scene train --skip-bad``)
            instead of stopping at the first with a ``BagError``.
        distributed_timeout_s: under ``torchrun``, how long a collective (gradient all-reduce,
            barrier) waits for a rank that hangs before it fails the run (default: torch's 30
            minutes). It must exceed what rank 0 does alone while the others wait at a
            barrier: building the text bank (with a CLIP download on first use), writing a
            checkpoint, the bundle and its ONNX export.
    """

    run_dir: Path
    dataset: DatasetConfig
    text_bank: TextBankConfig
    loss: dict[str, dict[str, Any]]
    model: ModelConfig = field(default_factory=ModelConfig)
    s3: S3Config = field(default_factory=S3Config)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    epochs: int = 20
    batch_size: int = 2
    grad_accumulation: int = 1
    amp: bool = False
    amp_dtype: Literal["auto", "float16", "bfloat16"] = "auto"
    checkpoint_every: int = 0
    validation: ValidationConfig | None = None
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    device: str = "auto"
    export_onnx: bool = False
    tensorboard: bool = True
    progress: bool = True
    log_every: int = 10
    skip_bad: bool = False
    distributed_timeout_s: float = 1800.0

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accumulation", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        # the trainer passes a timedelta, which nan, inf or over 2.7 million years cannot be
        if not 0 < self.distributed_timeout_s < datetime.timedelta.max.total_seconds():
            raise ConfigError("distributed_timeout_s", "must be a finite number of seconds > 0, "
                              f"got {self.distributed_timeout_s}")
        if not self.loss:
            raise ConfigError("loss", "needs at least one term")
        try:
            build_loss(self.loss)
        except ValueError as exc:  # unknown term or option: a config problem, named as such
            raise ConfigError("loss", str(exc)) from None
        if self.model.head == "classifier":
            if set(self.loss) != {"supervised"}:
                raise ConfigError("model.head", "classifier is the supervised fine-tuning head; "
                                  f"the loss must be supervised only, got {sorted(self.loss)}")
            if self.s3.enabled:
                raise ConfigError("s3.enabled", "self-training needs text-space logits; it "
                                  "cannot run with head: classifier")
        if self.optimizer.lr_head is not None and self.model.head != "classifier":
            raise ConfigError("optimizer.lr_head", "applies to the classifier head only "
                              "(model.head: classifier)")
        if self.model.input is not None and (self.dataset.input_spec is not None
                                             or self.dataset.bundle is not None):
            raise ConfigError("model.input", "the dataset already sets input_spec / bundle; "
                              "give the preprocessing in one place")
        if self.dataset.label_source == "none" and ("scr" in self.loss or "supervised" in
                                                    self.loss or "ssr" in self.loss):
            raise ConfigError("dataset.label_source", "none gives no labels, but the loss "
                              f"{sorted(self.loss)} needs them")
        for name in ("kl", "ppkt"):
            if name in self.loss and not self.dataset.teacher_caches:
                raise ConfigError(f"loss.{name}", "needs the teacher's pixel features: give "
                                  "dataset.teacher_caches (built with `clip2scene teacher "
                                  "--features`)")
        if "kl" in self.loss:
            inputs = {**DEFAULT_INPUTS["kl"], **self.loss["kl"].get("inputs", {})}
            if inputs["student_logits"] != "paired_logits":
                # the teacher's logits exist only for points paired with a pixel
                raise ConfigError("loss.kl.inputs", "set student_logits: paired_logits (the "
                                  "rows teacher_logits has: labelled points with a teacher "
                                  "feature)")

    # ------------------------------------------------------------------ derived settings

    def dataset_config(self, bundle_input: InputSpec | None = None) -> DatasetConfig:
        """The training dataset with the model's preprocessing and the run's seed applied."""
        dataset = _with_input(self.dataset, self.model.input, bundle_input,
                              self.model.init_from, self.seed)
        return replace(dataset, skip_bad=True) if self.skip_bad else dataset

    def validation_dataset_config(self, train: DatasetConfig) -> DatasetConfig | None:
        """The validation dataset with the training set's effective preprocessing."""
        if self.validation is None:
            return None
        val = self.validation.dataset
        if val.input_spec is None and val.bundle is None:
            val = replace(val, input_spec=train.input_spec, bundle=train.bundle)
        return replace(val, skip_bad=True) if self.skip_bad else val


def _with_input(dataset: DatasetConfig, model_input: InputSpec | None,
                bundle_input: InputSpec | None, init_from: Path | None,
                seed: int) -> DatasetConfig:
    if dataset.input_spec is None and dataset.bundle is None:
        if model_input is not None:
            dataset = replace(dataset, input_spec=model_input)
        elif bundle_input is not None:
            dataset = replace(dataset, input_spec=bundle_input)
        elif init_from is not None:
            dataset = replace(dataset, bundle=init_from)
    if dataset.seed == 0 and seed != 0:
        # One seed for the run unless the dataset asks for its own.
        dataset = replace(dataset, seed=seed)
    return dataset


# ---------------------------------------------------------------------------------- loading


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[:i + 1]), f"is not a mapping; cannot set {key}")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key.sub=value`` strings applied to a parsed YAML mapping (values parsed as YAML, so
    ``epochs=2``, ``optimizer.lr=0.02``, ``dataset.bags=[a, b]`` and ``model.init_from=null``
    have their natural types)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"invalid value {text!r}: {exc}") from None
        _set_dotted(data, key, value)
    return data


def load_train_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None,
                      *, run_dir: str | Path | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file or mapping, with ``--set`` style overrides and an
    optional run directory; every value is type- and range-checked."""
    origin = None
    if isinstance(source, str | Path):
        origin = str(source)
        data = read_yaml(source)
        if not isinstance(data, dict):
            raise ConfigError("<root>", "must be a mapping", origin)
    else:
        data = dict(source)
    data = apply_overrides(data, overrides or [])
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
    try:
        return load_config(TrainConfig, data)
    except ConfigError as exc:
        if origin and exc.source is None:
            raise ConfigError(exc.key, exc.reason, origin) from None
        raise
