"""The student of a training run: the network, its heads and text bank, optimizer and schedule.

:class:`Student` is SPVCNN plus the heads the loss reads, as one module for DDP. Its point
features are mapped by ``point_mapping_global`` (SCR, inference, S3) and, when a loss reads
them, ``point_mapping_local`` (SSR); ``logits`` are scaled cosines against the text bank
(``text_logits``, the runtime head) or, with ``model.head: classifier``, the linear
``classifier``. The text bank's rows are the classes, in order: the training set's vocabulary
and every teacher cache must list the same classes (:func:`check_classes`). The network starts
from ``model.init_from`` (a bundle) or from weights seeded by ``seed`` (the same on every rank).
The optimizer is SGD (the classifier head may have its own learning rate); the learning rate
follows the cosine schedule once per epoch (``interval: epoch``, the code's
``CosineAnnealingLR(T_max=epochs)``) or once per optimizer step, or stays constant.
:func:`loss_inputs` hands the loss what it reads of a micro-batch: the student's outputs, the
head's logits, the targets (S3 may replace the teacher's labels) and the teacher's pixel
features; per-micro-batch draws are seeded from the micro-batch's index, so resumes and world
sizes draw alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from clip2scene_ros.config import to_dict
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.models.bundle import ArchitectureSpec, InputSpec, VocabularySpec, load_bundle
from clip2scene_ros.models.spvcnn import SPVCNN
from clip2scene_ros.runtime.labels import text_logits
from clip2scene_ros.sparse.tensor import PointTensor
from clip2scene_ros.training.config import TrainConfig
from clip2scene_ros.training.dataset import BagSceneDataset
from clip2scene_ros.training.distributed import Dist
from clip2scene_ros.training.losses import CompositeLoss, SwitchableSelfTraining
from clip2scene_ros.training.order import derived_seed

__all__ = [
    "Student",
    "build_network",
    "build_optimizer",
    "build_scheduler",
    "check_classes",
    "loss_inputs",
    "needs_pixel_features",
    "required_outputs",
    "run_text_bank",
]

#: Domain tag of PPKT's per-micro-batch pair seed.
_PPKT_TAG = 0x70706B74


class Student(nn.Module):
    """SPVCNN plus the heads the loss reads, as one module for DDP.

    Only the requested outputs are computed, so a head the loss does not read has no gradient
    (DDP then needs ``find_unused_parameters``).
    """

    def __init__(self, net: SPVCNN, outputs: frozenset[str]) -> None:
        super().__init__()
        self.net = net
        self.outputs = outputs

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, batch: torch.Tensor,
                outputs: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        outputs = self.outputs if outputs is None else outputs
        # Under autocast the trunk runs in autocast's dtype, its sums in float32 (SPVCNN).
        features = self.net(PointTensor(feats.float(), coords, batch))
        out: dict[str, torch.Tensor] = {}
        if "global_feats" in outputs:
            out["global_feats"] = self.net.point_mapping_global(features)
        if "local_feats" in outputs:
            out["local_feats"] = self.net.point_mapping_local(features)
        if "class_logits" in outputs:
            assert self.net.classifier is not None
            out["class_logits"] = self.net.classifier(features)
        return out


def required_outputs(config: TrainConfig, loss: CompositeLoss) -> frozenset[str]:
    """The :class:`Student` outputs the loss (and S3, and the classifier head) read."""
    keys = {key for term in loss.terms for key in term.inputs.values()}
    outputs = set()
    if keys & {"global_feats", "pair_point_feats"}:
        outputs.add("global_feats")
    if "local_feats" in keys:
        outputs.add("local_feats")
    if config.model.head == "classifier":
        outputs.add("class_logits")
    elif keys & {"logits", "paired_logits"} or config.s3.enabled:
        outputs.add("global_feats")
    return frozenset(outputs)


# ------------------------------------------------------------------------------------ text bank


def run_text_bank(config: TrainConfig, dist_state: Dist
                  ) -> tuple[torch.Tensor, VocabularySpec, dict[str, Any]]:
    """The run's text bank ``(rows, vocabulary, provenance)``: ``text_bank.file``, or built once
    into ``run_dir/text_bank`` by rank 0 (the others wait) and read back from there."""
    from clip2scene_ros.teacher.text_bank import bank_paths, build_text_bank, load_text_bank

    cfg = config.text_bank
    if cfg.file is not None:
        return load_text_bank(cfg.file)
    assert cfg.vocabulary is not None
    target = config.run_dir / "text_bank"
    if dist_state.main and not bank_paths(target)[1].is_file():
        # Built once into the run directory, so a resumed run reads the very same rows.
        build_text_bank(cfg.vocabulary, model=cfg.model, pretrained=cfg.pretrained, out=target,
                        prompts=cfg.prompts, device=cfg.device)
    dist_state.barrier()
    bank, spec, provenance = load_text_bank(target)
    wanted = {"model": cfg.model, "pretrained": cfg.pretrained or "random"}
    found = {k: provenance.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError("text_bank", f"{target} was built with {found}, the config asks for "
                          f"{wanted}; delete it or use another run_dir")
    return bank, spec, provenance


def check_classes(config: TrainConfig, dataset: BagSceneDataset, vocab: VocabularySpec) -> None:
    """Labels index the text bank's rows: the class lists must agree, in order."""
    from clip2scene_ros.teacher.cache import TeacherCache

    classes = list(vocab.classes)
    if dataset.vocabulary is not None and dataset.vocabulary.names != classes:
        raise ConfigError("dataset.vocabulary", f"classes {dataset.vocabulary.names} differ from "
                          f"the text bank's {classes}")
    needs = needs_pixel_features(config.loss)
    if config.dataset.label_source == "teacher":
        for path in config.dataset.teacher_caches:
            cache = TeacherCache(path)
            names = list(cache.class_names)
            if names != classes:
                raise ConfigError("dataset.teacher_caches", f"{path} labels classes {names}, "
                                  f"the text bank has {classes}")
            if needs and not cache.teacher.get("store_features"):
                raise ConfigError("dataset.teacher_caches", f"{path} stores no pixel features, "
                                  f"but {needs} needs them: rebuild it with `clip2scene teacher "
                                  "--features` into a new --out")


def needs_pixel_features(loss: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The loss term that reads the teacher's pixel features, if any (checked at start-up, as a
    paper-form SSR would otherwise quietly run point-only)."""
    ssr = loss.get("ssr")
    if ssr is not None and ssr.get("weight", 1.0) != 0 and ssr.get("form", "paper") == "paper":
        return "loss.ssr (form paper, Eq. 3's pixel term)"
    for name in ("kl", "ppkt"):
        if name in loss and loss[name].get("weight", 1.0) != 0:
            return f"loss.{name}"
    return None


# -------------------------------------------------------------------------------- the network


def build_network(config: TrainConfig, input_spec: InputSpec, num_classes: int
                  ) -> tuple[SPVCNN, ArchitectureSpec]:
    """The student network: from ``model.init_from`` (whose architecture it keeps), else seeded
    by ``seed``; the classifier head only with ``model.head: classifier``."""
    init = load_bundle(config.model.init_from) if config.model.init_from is not None else None
    arch = config.model.architecture
    if init is not None:
        if arch is not None and arch != init.spec.architecture:
            raise ConfigError("model.architecture", f"differs from the init_from bundle's "
                              f"{to_dict(init.spec.architecture)}; leave it out")
        arch = init.spec.architecture
        if len(init.spec.input.features) != len(input_spec.features):
            raise ConfigError("model.input", f"{len(input_spec.features)} input features, the "
                              f"init_from bundle was trained on {len(init.spec.input.features)}")
    arch = arch or ArchitectureSpec()
    arch.validate()
    torch.manual_seed(config.seed)  # the same initial weights in every run and on every rank
    net = SPVCNN(arch, in_channels=len(input_spec.features),
                 num_classes=num_classes if config.model.head == "classifier" else 0)
    if init is not None:
        result = net.load_state_dict(init.state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("classifier.")]
        if missing or result.unexpected_keys:
            raise ConfigError("model.init_from", f"does not fit: missing {missing[:4]}, "
                              f"unexpected {result.unexpected_keys[:4]}")
    return net, arch


def build_optimizer(config: TrainConfig, net: SPVCNN) -> torch.optim.SGD:
    opt = config.optimizer
    head = [p for n, p in net.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in net.named_parameters() if not n.startswith("classifier.")]
    groups: list[dict[str, Any]] = [{"params": body}]
    if head:
        groups.append({"params": head, "lr": opt.lr_head if opt.lr_head is not None else opt.lr})
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, dampening=opt.dampening,
                           weight_decay=opt.weight_decay, nesterov=opt.nesterov)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    sched = config.scheduler
    if sched.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    t_max = config.epochs if sched.interval == "epoch" else config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max),
                                                      eta_min=sched.eta_min)


# -------------------------------------------------------------------------------- loss inputs


def loss_inputs(config: TrainConfig, loss: CompositeLoss, batch: Mapping[str, Any],
                out: Mapping[str, torch.Tensor], *, bank: torch.Tensor,
                s3: SwitchableSelfTraining | None, epoch: int, micro_index: int
                ) -> dict[str, Any]:
    """What ``loss`` reads for micro-batch ``micro_index`` (see ``training.order``): the
    student's outputs ``out``, the logits of its head against the text ``bank``, the targets
    (the batch's labels, replaced per S3's schedule of ``epoch``) and the teacher's pixel
    features; PPKT's pair generator is reseeded per micro-batch.
    """
    keys = {key for term in loss.terms for key in term.inputs.values()}
    data: dict[str, Any] = {"text_bank": bank, "cell_index": batch["cell_index"], **out}
    for key in ("pixel_feats", "pair_pixel_feats"):
        if key in batch:
            data[key] = batch[key]
    teacher = batch["labels"]
    if config.model.head == "classifier":
        logits = out["class_logits"]
    elif "global_feats" in out:
        logits = text_logits(out["global_feats"], bank)
    else:
        logits = None
    if logits is not None:
        data["logits"] = logits
    labels = teacher
    if s3 is not None:
        assert logits is not None
        # the coin of micro-batch k is the same for any world size / accumulation split
        s3.step = micro_index
        labels = s3.targets(epoch, teacher, logits, teacher >= 0)
    data["labels"] = labels
    if keys & {"paired_logits", "teacher_logits"}:
        if "pixel_feats" not in batch:
            raise ConfigError("loss.kl", "the teacher cache stores no pixel features "
                              "(run `clip2scene teacher --features`)")
        pixel = batch["pixel_feats"]
        rows = (teacher >= 0) & (pixel.abs().sum(1) > 0)
        assert logits is not None
        data["paired_logits"] = logits[rows]
        data["teacher_logits"] = text_logits(pixel[rows], bank)
    if "pair_point_feats" in keys:
        data["pair_point_feats"] = out["global_feats"][batch["pair_point"]]
    for term in loss.terms:
        generator = term.kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            # per micro-batch, so resumes and world sizes draw the same pairs
            generator.manual_seed(derived_seed(config.seed, _PPKT_TAG, micro_index))
    return data
