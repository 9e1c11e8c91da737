"""CLIP2Scene training losses: SCR, SSR, S3 targets, baselines and supervised fine-tuning.

Every loss takes point features already mapped into CLIP's text space (``[N, D]``) and a text bank
(``[C, D]``); labels are class indices with ``-1`` = ignore. All terms are vectorised torch ops
(segment ops via ``index_add`` / ``scatter_reduce``), so they run on any device and backpropagate.
Where the paper and the released code disagree (reference ``clip2scene.md`` §1.2-1.4, §1.7) both
forms are offered and the docstrings say which is which.

Every loss term of the method lives here, next to :func:`build_loss` that names them: one
place to read SCR, SSR, S3 and the baselines side by side (hence ~500 lines).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_ros.runtime.labels import LOGIT_SCALE, text_logits

__all__ = [
    "CompositeLoss",
    "LossTerm",
    "SwitchableSelfTraining",
    "build_loss",
    "grid_cells",
    "inverse_sqrt_frequency",
    "kl_distillation",
    "lovasz_softmax",
    "ppkt_infonce",
    "scr_contrastive",
    "scr_cross_entropy",
    "ssr_loss",
    "supervised_loss",
]


def _zero(ref: torch.Tensor) -> torch.Tensor:
    """A 0 still attached to ``ref``'s graph, so an empty batch backpropagates zeros, not NaN."""
    return ref.float().sum() * 0.0


# --------------------------------------------------------------------------------------------- SCR


def scr_contrastive(point_feats: torch.Tensor, labels: torch.Tensor, text_bank: torch.Tensor,
                    tau: float = 0.5, reduction: Literal["mean", "sum"] = "mean",
                    positives_in_denominator: bool = True) -> torch.Tensor:
    """The paper's text-guided contrastive SCR, Eq. (1) of CLIP2Scene.

    For each class ``c`` present among the labelled points, the text embedding ``t_c`` is the
    anchor; the points labelled ``c`` are its positives and every other labelled point a negative::

        L_c = -log( Σ_{i: y_i=c} exp(s_ic) / Σ_{j ∈ denominator} exp(s_jc) ),
        s_jc = cos(p_j, t_c) / tau

    Normalisation: ``D`` is the cosine similarity (points and text rows L2-normalised), divided by
    ``tau`` (paper: 0.5). By default the denominator holds *all* labelled points (negatives plus
    the positives, the InfoNCE convention), so ``L_c >= 0`` and a batch of a single class gives 0;
    ``positives_in_denominator=False`` is Eq. (1) verbatim (negatives only; classes without any
    negative are skipped). Eq. (1) sums over classes (``reduction="sum"``); the default ``"mean"``
    divides by the number of classes present, so the scale does not drift with the batch content.
    """
    valid = labels >= 0
    feats = F.normalize(point_feats[valid].float(), dim=-1)
    y = labels[valid].long()
    if y.numel() == 0:
        return _zero(point_feats)
    present = torch.unique(y)  # only classes with positives: an absent class has no Eq. (1) term
    text = F.normalize(text_bank.to(feats), dim=-1)[present]
    sim = feats @ text.T / tau  # [P, K]
    pos = y[:, None] == present[None, :]
    neg_inf = torch.tensor(float("-inf"), device=sim.device, dtype=sim.dtype)
    pos_lse = torch.where(pos, sim, neg_inf).logsumexp(0)
    if positives_in_denominator:
        per_class = sim.logsumexp(0) - pos_lse
    else:
        has_neg = (~pos).any(0)
        if not bool(has_neg.any()):
            return _zero(point_feats)
        # drop negative-free columns before the logsumexp: an all -inf column has NaN gradients
        neg_lse = torch.where(pos[:, has_neg], neg_inf, sim[:, has_neg]).logsumexp(0)
        per_class = neg_lse - pos_lse[has_neg]
    return per_class.sum() if reduction == "sum" else per_class.mean()


def scr_cross_entropy(point_feats: torch.Tensor, labels: torch.Tensor, text_bank: torch.Tensor,
                      logit_scale: float | None = LOGIT_SCALE,
                      class_weighting: str = "none") -> torch.Tensor:
    """The released code's SCR: per-point softmax cross entropy over the text bank.

    ``logit_scale`` given: logits are scaled cosines, exactly the runtime head
    (:func:`~clip2scene_ros.runtime.labels.text_logits`), so training and inference agree.
    ``logit_scale=None`` is the code verbatim: raw dot products of the *unnormalised* point feature
    with the L2-normalised text rows (the feature norm acts as a learned scale). The code's zero
    "ignore" row is not needed: ``-1`` labels are ignored. ``class_weighting="inverse_sqrt"``
    weights each class by :func:`inverse_sqrt_frequency` of the batch's labels (not in the
    paper or the code: thin classes rarely win a teacher patch, so they are rare labels).
    """
    if class_weighting not in CLASS_WEIGHTING:
        raise ValueError(f"unknown class_weighting {class_weighting!r} "
                         f"({' | '.join(CLASS_WEIGHTING)})")
    if not bool((labels >= 0).any()):
        return _zero(point_feats)
    if logit_scale is None:
        logits = point_feats.float() @ F.normalize(text_bank.float(), dim=-1).T
    else:
        logits = text_logits(point_feats, text_bank, logit_scale)
    weight = (inverse_sqrt_frequency(labels, logits.shape[1])
              if class_weighting == "inverse_sqrt" else None)
    return F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=-1)


# --------------------------------------------------------------------------------------------- SSR


def grid_cells(xyz: torch.Tensor, batch: torch.Tensor, cell: float = 0.1) -> torch.Tensor:
    """SSR cell id per point: the ``cell``-metre voxel of (batch element, x, y, z).

    Call it on the merged sweeps *before* augmentation (the code's ``inverse_indexes_merged``):
    the per-sweep rotations/flips would otherwise scatter one physical cell. Ids are dense
    ``0..M-1`` in lexicographic (batch, x, y, z) order; non-finite points get ``-1``.
    """
    out = torch.full((xyz.shape[0],), -1, dtype=torch.long, device=xyz.device)
    finite = torch.isfinite(xyz).all(dim=1)
    if bool(finite.any()):
        # float64 so a coordinate on a boundary (0.3 / 0.1) floors as sparse_quantize's numpy does
        vox = torch.floor(xyz[finite].double() / cell).long()
        keys = torch.cat([batch[finite].long()[:, None], vox], dim=1)
        out[finite] = torch.unique(keys, dim=0, return_inverse=True)[1]
    return out


def _segment_max(values: torch.Tensor, seg: torch.Tensor, num: int) -> torch.Tensor:
    """Per-segment max (no gradient needed: softmax is invariant to the shift)."""
    out = torch.full((num,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, seg, values.detach(), reduce="amax", include_self=True)


def ssr_loss(point_feats: torch.Tensor, pixel_feats: torch.Tensor | None, cell_index: torch.Tensor,
             labels: torch.Tensor, text_bank: torch.Tensor, lam: float = 1.0,
             max_per_cell: int = 8, form: Literal["paper", "code"] = "paper",
             normalize: bool = False) -> torch.Tensor:
    """Spatial-temporal consistency: pull each point to its cell's text-guided "dynamic centre".

    Points take part when they have a cell (``cell_index >= 0``) and a label (``labels >= 0``,
    i.e. they are paired with a pixel). A cell's attention text is ``t`` of the label of its first
    participating point in input order (the code's "first packed entry"). ``D`` is the dot product
    (paper and code), text rows L2-normalised as in the code; ``normalize=True`` L2-normalises the
    point/pixel features too (cosine).

    ``form="paper"`` (Eqs. 2-4): all points of the cell; with ``pixel_feats`` the centre is
    ``f_n = Σ a_i x_i + b_i p_i`` with ``a, b`` one softmax over the cell's pixel *and* point
    scores ``D(·, t)/lam``; without, the point-only softmax. Loss = mean over the participating
    points of ``1 - sigmoid(<f_n, p_i>)`` (Eq. 2 divides the sum by the number of cells instead;
    the mean keeps the scale independent of the cell size).

    ``form="code"``: point-only (``pixel_feats`` ignored, as in the code where they are packed but
    unused), at most ``max_per_cell`` points per cell (the rest dropped), softmax over the kept
    points; the mean runs over all ``cells × max_per_cell`` slots, an empty (padded) slot
    contributing the constant ``1 - sigmoid(0) = 0.5``.
    """
    if form not in ("paper", "code"):
        raise ValueError(f"unknown SSR form {form!r} (paper | code)")
    if form == "code" and max_per_cell < 1:
        raise ValueError("max_per_cell must be >= 1")
    idx = ((cell_index >= 0) & (labels >= 0)).nonzero().squeeze(1)
    if idx.numel() == 0:
        return _zero(point_feats)
    cells, seg = torch.unique(cell_index[idx], return_inverse=True)
    num = cells.numel()
    # stable sort by cell: input order within a cell decides "first" and which points the cap keeps
    order = torch.sort(seg, stable=True).indices
    idx, seg = idx[order], seg[order]
    counts = torch.bincount(seg, minlength=num)
    starts = counts.cumsum(0) - counts
    cell_label = labels[idx[starts]].long()
    if form == "code":
        keep = torch.arange(idx.numel(), device=idx.device) - starts[seg] < max_per_cell
        idx, seg = idx[keep], seg[keep]

    p = point_feats[idx].float()
    if normalize:
        p = F.normalize(p, dim=-1)
    text = F.normalize(text_bank.to(p), dim=-1)[cell_label][seg]
    score_p = (p * text).sum(1) / lam
    x = None
    if form == "paper" and pixel_feats is not None:
        x = pixel_feats[idx].float()
        if normalize:
            x = F.normalize(x, dim=-1)
        score_x = (x * text).sum(1) / lam
        shift = _segment_max(torch.cat([score_p, score_x]), torch.cat([seg, seg]), num)[seg]
    else:
        shift = _segment_max(score_p, seg, num)[seg]
    exp_p = torch.exp(score_p - shift)
    denom = p.new_zeros(num).index_add(0, seg, exp_p)
    weighted = exp_p[:, None] * p
    if x is not None:
        exp_x = torch.exp(score_x - shift)
        denom = denom.index_add(0, seg, exp_x)
        weighted = weighted + exp_x[:, None] * x
    centre = p.new_zeros(num, p.shape[1]).index_add(0, seg, weighted)
    centre = centre / denom[:, None]
    per_point = 1.0 - torch.sigmoid((centre[seg] * p).sum(1))
    if form == "paper":
        return per_point.mean()
    slots = num * max_per_cell
    return (per_point.sum() + 0.5 * (slots - per_point.numel())) / slots


# ---------------------------------------------------------------------------------------------- S3


class SwitchableSelfTraining:
    """S3: from ``start_epoch`` on, paired points randomly take the student's own prediction.

    ``targets`` returns per-point labels: before ``start_epoch`` the teacher (MaskCLIP) label for
    points inside the cameras (``in_view_mask`` and a teacher label ``>= 0``), ``-1`` elsewhere.
    From ``start_epoch`` (0-based epoch index, so 10 = "after 10 epochs"; the nuScenes code's
    ``epoch > 10`` is ``start_epoch=11``) those labels switch to ``argmax(student_logits)`` with
    ``probability``: one coin for the whole batch (``per="batch"``, the released code) or one per
    point (``per="point"``, the paper's reading). With ``rest_threshold`` set, points outside the
    cameras whose student softmax confidence is ``>= rest_threshold`` also self-train (the code's
    dead "rest" branch); off by default. With ``min_confidence`` set, a paired point switches
    only where the student's softmax confidence is ``>= min_confidence`` (neither the paper nor
    the code does this: a short run's student is still unsure of the classes it learns last, and
    switching to those guesses trains its mistakes in).

    Randomness comes from a generator re-seeded per call from ``(seed, step)``, so the draws depend
    only on the seed and the step counter, which ``state_dict`` carries: a resumed run draws the
    same coins as an uninterrupted one.
    """

    def __init__(self, start_epoch: int = 10, probability: float = 0.5,
                 per: Literal["batch", "point"] = "batch", seed: int = 0,
                 rest_threshold: float | None = None,
                 min_confidence: float | None = None) -> None:
        if per not in ("batch", "point"):
            raise ValueError(f"unknown S3 granularity {per!r} (batch | point)")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} is outside [0, 1]")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.start_epoch = start_epoch
        self.probability = probability
        self.per = per
        self.seed = seed
        self.rest_threshold = rest_threshold
        self.min_confidence = min_confidence
        self.step = 0
        #: fraction of the paired points switched by the last call (for logging)
        self.last_switch_fraction = 0.0

    def _generator(self) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, self.step]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    def targets(self, epoch: int, teacher_labels: torch.Tensor, student_logits: torch.Tensor,
                in_view_mask: torch.Tensor) -> torch.Tensor:
        teacher = teacher_labels.long()
        paired = in_view_mask.bool() & (teacher >= 0)
        out = torch.where(paired, teacher, torch.full_like(teacher, -1))
        gen = self._generator()
        self.step += 1  # every call advances, so the coin sequence is fixed by the step count
        self.last_switch_fraction = 0.0
        if epoch < self.start_epoch:
            return out
        student_logits = student_logits.detach()
        student = student_logits.argmax(1)
        if self.per == "batch":
            switch = paired if bool(torch.rand(1, generator=gen) < self.probability) \
                else torch.zeros_like(paired)
        else:
            draw = torch.rand(teacher.shape[0], generator=gen).to(teacher.device)
            switch = paired & (draw < self.probability)
        confidence = torch.softmax(student_logits.float(), dim=1).amax(1)
        if self.min_confidence is not None:
            switch = switch & (confidence >= self.min_confidence)
        out = torch.where(switch, student, out)
        num_paired = int(paired.sum())
        self.last_switch_fraction = float(switch.sum()) / num_paired if num_paired else 0.0
        if self.rest_threshold is not None:
            rest = ~in_view_mask.bool() & (confidence >= self.rest_threshold)
            out = torch.where(rest, student, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "start_epoch": self.start_epoch,
                "probability": self.probability, "per": self.per,
                "rest_threshold": self.rest_threshold, "min_confidence": self.min_confidence}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.start_epoch = int(state["start_epoch"])
        self.probability = float(state["probability"])
        self.per = state["per"]
        self.rest_threshold = state["rest_threshold"]
        self.min_confidence = state.get("min_confidence")  # absent from older checkpoints


# ------------------------------------------------------------------------------------- baselines


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Hinton distillation: mean over points of KL(teacher ‖ student) at ``temperature``, × T².

    The T² keeps gradient magnitudes comparable across temperatures. The teacher is detached
    (a frozen model). Paper Table 3: this instead of SCR/SSR collapses to 0.0 mIoU.
    """
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1).mean()
    return kl * temperature**2


def ppkt_infonce(point_feats: torch.Tensor, pixel_feats: torch.Tensor, tau: float = 0.07,
                 num_pairs: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
    """PPKT: InfoNCE over ``num_pairs`` random point-pixel pairs, positives on the diagonal.

    Rows are points, columns pixels (SLidR's ``NCELoss``); features L2-normalised, logits
    ``cos / tau``. All pairs are used when there are no more than ``num_pairs``.
    """
    count = point_feats.shape[0]
    if count == 0:
        return _zero(point_feats)
    if count > num_pairs:
        if generator is not None:
            pick = torch.randperm(count, generator=generator, device=generator.device)
        else:
            pick = torch.randperm(count, device=point_feats.device)
        pick = pick[:num_pairs].to(point_feats.device)
        point_feats, pixel_feats = point_feats[pick], pixel_feats[pick]
    q = F.normalize(point_feats.float(), dim=-1)
    k = F.normalize(pixel_feats.float(), dim=-1)
    logits = q @ k.T / tau
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


# ----------------------------------------------------------------------------------- fine-tuning


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1,
                   classes: Literal["present", "all"] | list[int] = "present") -> torch.Tensor:
    """Lovász-softmax (Berman et al., CVPR 2018), all classes at once.

    Per class ``c``: errors ``|[y=c] - p_c|`` sorted descending, dotted with the gradient of the
    Lovász extension of the Jaccard loss (``lovasz_grad``); the mean over ``classes`` ("present":
    classes in ``labels``, "all", or a list of indices). ``probs`` are softmax outputs ``[N, C]``.
    """
    valid = labels != ignore_index
    probs = probs[valid].float()
    labels = labels[valid].long()
    num_classes = probs.shape[1]
    if labels.numel() == 0:
        return _zero(probs)
    fg = F.one_hot(labels, num_classes).to(probs)
    errors = (fg - probs).abs()
    errors_sorted, perm = errors.sort(dim=0, descending=True)
    fg_sorted = fg.gather(0, perm)
    gts = fg_sorted.sum(0)
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1.0 - fg_sorted).cumsum(0)  # >= 1 everywhere: no division by zero
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    per_class = (errors_sorted * grad).sum(0)
    if classes == "present":
        per_class = per_class[gts > 0]
    elif classes != "all":
        per_class = per_class[torch.as_tensor(classes, dtype=torch.long, device=probs.device)]
    return per_class.mean() if per_class.numel() else _zero(probs)


def inverse_sqrt_frequency(labels: torch.Tensor, num_classes: int, ignore_index: int = -1
                           ) -> torch.Tensor:
    """Class weights ``1/sqrt(frequency)`` of the labelled points, mean 1 over present classes.

    Rare thin classes (poles, signs, pedestrians) are a fraction of a percent of a scan; without
    weights CE barely sees them. The square root (as Cylinder3D's weights) keeps the weights of a
    class seen in a handful of points from swamping the rest; absent classes get weight 0.
    """
    valid = labels[labels != ignore_index].long()
    counts = torch.bincount(valid, minlength=num_classes)[:num_classes].to(torch.float32)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float32, device=labels.device)
    if bool(present.any()):
        weights[present] = counts[present].rsqrt()
        weights[present] /= weights[present].mean()
    return weights


CLASS_WEIGHTING = ("none", "inverse_sqrt")


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1,
                    lovasz_weight: float = 1.0, class_weighting: str = "none") -> torch.Tensor:
    """Fine-tuning loss of the code's ``downstream/criterion.py``: CE + ``lovasz_weight`` × Lovász.

    The released configs ignore label 0; pass ``ignore_index=0`` for their label ids.
    ``class_weighting="inverse_sqrt"`` weights the CE term by :func:`inverse_sqrt_frequency` of
    the batch's labels (the Lovász term already treats classes equally).
    """
    if class_weighting not in CLASS_WEIGHTING:
        raise ValueError(f"unknown class_weighting {class_weighting!r} "
                         f"({' | '.join(CLASS_WEIGHTING)})")
    if not bool((labels != ignore_index).any()):
        return _zero(logits)
    logits = logits.float()
    weight = (inverse_sqrt_frequency(labels, logits.shape[1], ignore_index)
              if class_weighting == "inverse_sqrt" else None)
    ce = F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=ignore_index)
    if lovasz_weight == 0:
        return ce
    lovasz = lovasz_softmax(torch.softmax(logits, dim=1), labels, ignore_index=ignore_index)
    return ce + lovasz_weight * lovasz


# --------------------------------------------------------------------------------------- combine


@dataclass(frozen=True)
class LossTerm:
    """One weighted term: ``weight * fn(**{arg: batch[key] for arg, key in inputs}, **kwargs)``."""

    name: str
    weight: float
    fn: Callable[..., torch.Tensor]
    inputs: dict[str, str]
    optional: frozenset[str] = frozenset()
    kwargs: dict[str, Any] = field(default_factory=dict)


class CompositeLoss:
    """The callable :func:`build_loss` returns: ``(total, {name: unweighted detached value})``."""

    def __init__(self, terms: list[LossTerm]) -> None:
        if not terms:
            raise ValueError("no loss terms with a non-zero weight")
        self.terms = terms

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            args = {}
            for arg, key in term.inputs.items():
                if key in batch:
                    args[arg] = batch[key]
                elif arg in term.optional:
                    args[arg] = None
                else:
                    raise KeyError(f"loss {term.name!r} needs batch[{key!r}]")
            value = term.fn(**args, **term.kwargs)
            parts[term.name] = value.detach()
            total = term.weight * value if total is None else total + term.weight * value
        assert total is not None
        return total, parts


#: batch keys each term reads by default (argument -> key); override per term with "inputs"
DEFAULT_INPUTS: dict[str, dict[str, str]] = {
    "scr": {"point_feats": "global_feats", "labels": "labels", "text_bank": "text_bank"},
    "ssr": {"point_feats": "local_feats", "pixel_feats": "pixel_feats",
            "cell_index": "cell_index", "labels": "labels", "text_bank": "text_bank"},
    "kl": {"student_logits": "logits", "teacher_logits": "teacher_logits"},
    "ppkt": {"point_feats": "pair_point_feats", "pixel_feats": "pair_pixel_feats"},
    "supervised": {"logits": "logits", "labels": "labels"},
}
_OPTIONAL = {"ssr": frozenset({"pixel_feats"})}


def _scr_fn(form: str) -> Callable[..., torch.Tensor]:
    forms: dict[str, Callable[..., torch.Tensor]] = {
        "contrastive": scr_contrastive, "cross_entropy": scr_cross_entropy}
    if form not in forms:
        raise ValueError(f"unknown SCR form {form!r} (contrastive | cross_entropy)")
    return forms[form]


def build_loss(config: Mapping[str, Mapping[str, Any]]) -> CompositeLoss:
    """Terms by name with weights, e.g. ``{"scr": {"form": "contrastive", "tau": 0.5,
    "weight": 1}, "ssr": {"form": "code", "weight": 1}}``.

    Names: ``scr`` (form contrastive | cross_entropy), ``ssr``, ``kl``, ``ppkt`` (``seed`` seeds
    its pair sampler), ``supervised``. Other keys are the function's keyword arguments (checked);
    ``inputs`` remaps batch keys (see :data:`DEFAULT_INPUTS`). ``weight`` defaults to 1; a
    zero-weight term is not computed.
    """
    terms = []
    for name, raw in config.items():
        if name not in DEFAULT_INPUTS:
            raise ValueError(f"unknown loss {name!r} ({', '.join(DEFAULT_INPUTS)})")
        options = dict(raw)
        weight = float(options.pop("weight", 1.0))
        inputs = {**DEFAULT_INPUTS[name], **options.pop("inputs", {})}
        fn: Callable[..., torch.Tensor]
        if name == "scr":
            fn = _scr_fn(options.pop("form", "contrastive"))
        elif name == "ppkt":
            fn = ppkt_infonce
            options["generator"] = torch.Generator().manual_seed(int(options.pop("seed", 0)))
        else:
            by_name: dict[str, Callable[..., torch.Tensor]] = {
                "ssr": ssr_loss, "kl": kl_distillation, "supervised": supervised_loss}
            fn = by_name[name]
        params = inspect.signature(fn).parameters
        unknown = [k for k in [*options, *inputs] if k not in params]
        if unknown:
            raise ValueError(f"loss {name!r} has no option(s) {unknown}")
        if weight != 0.0:
            terms.append(LossTerm(name, weight, fn, inputs, _OPTIONAL.get(name, frozenset()),
                                  options))
    return CompositeLoss(terms)
