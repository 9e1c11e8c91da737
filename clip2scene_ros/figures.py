"""PNG figures of an evaluation (``clip2scene eval --report DIR``, ``replay-eval``) and the
figure/save pair the soak plot draws with.

* ``per_class_iou.png``: one bar per class, in the class's palette colour, with the mIoU line;
* ``confusion.png``: the confusion matrix normalised per ground-truth row (recall), with the
  ``<unlabelled>`` column of points the network gave no label;
* ``bev.png``: one frame from above, prediction and ground truth side by side, points in the
  vocabulary palette (the prediction alone when there is no ground truth);
* ``camera_overlay.png``: the same frame's points projected into its first camera image,
  coloured by predicted label (only when the frame has a camera).

Without ground truth (a recording with no label topic) there is nothing to score:
:func:`write_prediction_report` draws the last two figures from the predictions alone.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
``pyplot``: no GUI backend is ever selected, no global figure state leaks between calls, and
this works on a headless robot or CI machine. matplotlib is an optional dependency (extra
``report``) imported only here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .frame import Frame
from .geometry.correspondence import point_pixel_pairs
from .vocabulary import Vocabulary

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "label_colors",
    "plot_bev",
    "plot_camera_overlay",
    "plot_confusion",
    "plot_iou",
    "write_prediction_report",
    "write_report",
]

#: Colour of points without a class: unlabelled predictions and ignored ground truth.
NO_CLASS_RGB = (0.55, 0.55, 0.55)
#: Bird's-eye figures draw at most this many points (a 120k-point KITTI scan is subsampled
#: evenly); the picture does not change, the PNG is written in a fraction of the time.
MAX_BEV_POINTS = 60_000


@dataclass
class EvalSample:
    """One evaluated frame kept for the report's bird's-eye and camera figures."""

    frame: Frame
    pred: np.ndarray  # (N,) vocabulary index, -1 where unlabelled or not in the vocabulary
    target: np.ndarray  # (N,) vocabulary index, ignore_index where ignored
    index: int = 0


def figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("report", "the evaluation report needs matplotlib: "
                          "pip install 'clip2scene_ros[report]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas that savefig renders with
    return fig


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def label_colors(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(N, 3)`` float RGB in 0..1 of class indices; indices outside the palette are grey."""
    labels = np.asarray(labels).astype(np.int64)
    table = np.vstack([np.asarray(palette, np.float64).reshape(-1, 3) / 255.0, NO_CLASS_RGB])
    inside = (labels >= 0) & (labels < len(table) - 1)
    return table[np.where(inside, labels, len(table) - 1)]


def plot_iou(per_class_iou: Mapping[str, float | None], path: Path,
             palette: np.ndarray | None = None, miou: float | None = None,
             title: str = "per-class IoU") -> Path:
    """Horizontal bars of each class's IoU; a class absent from data and prediction reads n/a."""
    names = list(per_class_iou)
    values = np.array([np.nan if v is None else v for v in per_class_iou.values()], float)
    fig = figure(7.0, 1.2 + 0.32 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    colors = (label_colors(np.arange(len(names)), palette) if palette is not None
              else "tab:blue")
    ax.barh(y, np.nan_to_num(values), color=colors, edgecolor="black", linewidth=0.5)
    for yi, v in zip(y, values, strict=True):
        ax.text(min(np.nan_to_num(v), 0.85) + 0.01, float(yi), "n/a" if np.isnan(v) else f"{v:.2f}",
                va="center", fontsize=8)
    if miou is not None:
        ax.axvline(miou, color="black", linestyle="--", linewidth=1, label=f"mIoU {miou:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # first class on top, as in the vocabulary file
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(title)
    return save(fig, path)


def plot_confusion(counts: np.ndarray, class_names: Sequence[str], path: Path,
                   column_names: Sequence[str] | None = None) -> Path:
    """Confusion matrix normalised per ground-truth row (each row: where that class went)."""
    counts = np.asarray(counts, dtype=np.float64)
    columns = list(column_names) if column_names is not None else list(class_names)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 2.5 + 0.45 * max(len(class_names), len(columns))
    fig = figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if max(norm.shape) <= 25:  # numbers stay legible up to about SemanticKITTI's 19 classes
        for (r, c), v in np.ndenumerate(norm):
            if v >= 0.005:
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "black")
    ax.set_xticks(np.arange(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (row-normalised)")
    return save(fig, path)


def _subsample(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def plot_bev(xyz: np.ndarray, pred: np.ndarray, target: np.ndarray | None, palette: np.ndarray,
             class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Prediction and ground truth of one frame seen from above, side by side (or one above
    the other for a long, narrow cloud); the prediction alone when ``target`` is None."""
    keep = _subsample(len(xyz), MAX_BEV_POINTS)
    xy = np.asarray(xyz, np.float64)[keep, :2]
    finite = np.isfinite(xy).all(axis=1)
    xy, keep = xy[finite], keep[finite]
    # Frame the bulk of the cloud: a few far returns would otherwise shrink the street to a dot.
    if len(xy):
        lo, hi = np.percentile(xy, 1, axis=0), np.percentile(xy, 99, axis=0)
        pad = 0.05 * float(np.max(hi - lo)) + 1.0
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    # Fit the figure to the cloud's footprint: a street is long and narrow, so its two panels
    # go one above the other; a round scan sits side by side.
    width_m, height_m = (hi - lo).tolist()
    aspect = min(max(height_m / max(width_m, 1e-6), 0.2), 2.0)
    panels = [(pred, "prediction")] + ([] if target is None else [(target, "ground truth")])
    if len(panels) == 1:
        width = 11.0 if aspect < 0.6 else 7.0
        fig = figure(width, width * aspect + 2.0)
        axes = [fig.add_subplot()]
    elif aspect < 0.6:
        fig = figure(11.0, 2 * 10.0 * aspect + 2.0)
        axes = fig.subplots(2, 1, sharex=True, sharey=True)
    else:
        fig = figure(12.0, 5.6 * aspect + 2.0)
        axes = fig.subplots(1, 2, sharex=True, sharey=True)
    size = 2.0 if len(xy) < 20_000 else 0.8
    for ax, (labels, name) in zip(axes, panels, strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], c=label_colors(np.asarray(labels)[keep], palette),
                   s=size, marker="o", linewidths=0, rasterized=True)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.label_outer()  # axis labels only on the outer edge of the shared axes
    _legend(fig, np.concatenate([np.asarray(labels)[keep] for labels, _ in panels]), palette,
            class_names)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _legend(fig: Figure, labels: np.ndarray, palette: np.ndarray,
            class_names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    present = np.unique(labels[(labels >= 0) & (labels < len(class_names))])
    handles = [Patch(color=label_colors(np.array([i]), palette)[0], label=class_names[i])
               for i in present]
    handles.append(Patch(color=NO_CLASS_RGB, label="unlabelled / ignored"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
               fontsize=8)


def plot_camera_overlay(image: np.ndarray, uv: np.ndarray, depth: np.ndarray,
                        colors: np.ndarray, path: Path, title: str = "") -> Path:
    """Projected points over a camera image; far points are drawn first so near ones win."""
    height, width = image.shape[:2]
    fig = figure(10.0, 10.0 * height / width + 0.6)
    ax = fig.add_subplot()
    ax.imshow(image)
    order = np.argsort(-np.asarray(depth))
    # Marker area in points² on the fixed 10-inch figure: big dots for a sparse projection,
    # smaller for a dense one (a 64-beam scan on a 1600 px image) so labels do not merge.
    size = float(np.clip(1.5e5 / max(len(uv), 1), 3.0, 24.0))
    ax.scatter(uv[order, 0], uv[order, 1], c=colors[order], s=size, marker="o",
               linewidths=0)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return save(fig, path)


def write_report(out: Path, result: dict[str, Any], vocabulary: Vocabulary,
                 sample: EvalSample | None) -> list[Path]:
    """Write every figure the evaluation allows into ``out``; returns the PNG paths."""
    out = Path(out)
    palette = vocabulary.palette
    names = list(result["class_names"])
    files = [
        plot_iou(result["per_class_iou"], out / "per_class_iou.png", palette, result["miou"],
                 title=f"per-class IoU ({result['frames']} frames, {result['points']} points)"),
        plot_confusion(np.asarray(result["confusion"]), names, out / "confusion.png",
                       result.get("confusion_columns")),
    ]
    if sample is None:
        return files
    return files + _frame_figures(out, sample.frame, sample.pred, sample.target, palette, names,
                                  sample.index)


def write_prediction_report(out: Path, frame: Frame, pred: np.ndarray, palette: np.ndarray,
                            class_names: Sequence[str], index: int = 0) -> list[Path]:
    """The figures a frame without ground truth allows: ``bev.png`` of the prediction and, when
    the frame has a camera, ``camera_overlay.png``; ``pred`` holds class indices into
    ``class_names`` (anything else is drawn grey). Returns the PNG paths."""
    return _frame_figures(Path(out), frame, np.asarray(pred), None, np.asarray(palette),
                          list(class_names), index)


def _frame_figures(out: Path, frame: Frame, pred: np.ndarray, target: np.ndarray | None,
                   palette: np.ndarray, names: Sequence[str], index: int) -> list[Path]:
    files = [plot_bev(frame.xyz, pred, target, palette, names, out / "bev.png",
                      title=f"frame {index} (stamp {frame.stamp_ns})")]
    if frame.cameras:
        view = frame.cameras[0]
        pairs = point_pixel_pairs(frame.xyz, [(view.camera, view.lidar_to_camera)])
        colors = label_colors(pred[pairs.point_index], palette)
        files.append(plot_camera_overlay(view.image, pairs.uv, pairs.depth, colors,
                                         out / "camera_overlay.png",
                                         title=f"{view.name}: predicted labels"))
    return files
