"""``clip2scene inspect``: what a recording holds and whether its calibration and sync are sane.

The first thing to run on a new bag. Per topic it lists types, counts and rates; per sweep, the
number of points, each camera's sync offset and how many LiDAR points land in each image
(point–pixel pairs at depth > 1 m). A camera with zero pairs means wrong extrinsics or
intrinsics; an offset beyond the slop means a camera that is late, dead or on another clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..geometry.correspondence import frame_pairs
from .reader import SKIP_REASONS, BagReader, ReaderConfig

_NS = 1e9

#: Depth below which points are not paired (the body of the car, the sensor itself).
MIN_DEPTH_M = 1.0


def inspect_bag(
    path: Path | str, config: ReaderConfig | None = None, *, max_frames: int | None = None
) -> dict[str, Any]:
    """A JSON-able report on the bag at ``path`` (all frames, or the first ``max_frames``)."""
    config = config or ReaderConfig()
    reader = BagReader(path, config)
    index = reader.index
    topics = index.topics
    names = [c.name for c in topics.cameras]
    first_last = reader.topic_spans()

    topic_rows: dict[str, dict[str, Any]] = {}
    for topic in sorted(index.topic_types):
        count = index.topic_counts.get(topic, 0)
        span = first_last.get(topic)
        rate = None
        if span is not None and count > 1 and span[1] > span[0]:
            rate = (count - 1) / ((span[1] - span[0]) / _NS)
        topic_rows[topic] = {"type": index.topic_types[topic], "count": count, "rate_hz": rate}

    plans = {p.index: p for p in index.plans}
    frames = []
    totals = dict.fromkeys(names, 0)
    distinct_total = 0
    stop = None
    if max_frames is not None and index.plans:
        stop = index.plans[min(max_frames, len(index.plans)) - 1].index + 1
    for frame in reader.frames(stop=stop):
        plan = plans[frame.index]
        pairs = frame_pairs(frame, min_depth=MIN_DEPTH_M)
        counts = pairs.count_per_camera(len(frame.cameras)).tolist()
        per_cam = dict(zip([v.name for v in frame.cameras], counts, strict=True))
        distinct = int(pairs.distinct_points().size)
        for name, n in per_cam.items():
            totals[name] += int(n)
        distinct_total += distinct
        frames.append({
            "index": frame.index,
            "stamp_ns": frame.stamp_ns,
            "num_points": frame.num_points,
            "offsets_ms": {
                n: (plan.offsets_ns[n] / 1e6 if n in plan.offsets_ns else None) for n in names
            },
            "cameras": [v.name for v in frame.cameras],
            "pairs": {n: int(per_cam.get(n, 0)) for n in names},
            "pairs_total": int(pairs.num_pairs),
            "distinct_points": distinct,
            "has_pose": frame.pose is not None,
            "has_labels": frame.labels is not None,
        })

    report: dict[str, Any] = {
        "bag": str(Path(path)),
        "storage": index.storage,
        "start_ns": index.start_ns,
        "duration_s": index.duration_ns / _NS,
        "message_count": int(sum(index.topic_counts.values())),
        "topics": topic_rows,
        "detected": topics.as_dict(),
        "lidar_frame": index.lidar_frame,
        "world_frame": index.world_frame,
        "slop_ms": config.slop_s * 1e3,
        "frames_planned": len(index.plans),
        "frames_read": len(frames),
        "frames": frames,
        "pairs": totals,
        "pairs_total": int(sum(totals.values())),
        "distinct_points": distinct_total,
        "skipped": dict(reader.skipped),
        "warnings": dict(reader.warnings),
    }
    report["problems"] = _problems(report)
    return report


def _problems(report: dict[str, Any]) -> list[str]:
    """Plain-language findings a user should look at before training on the bag."""
    out = []
    frames = report["frames"]
    slop = report["slop_ms"]
    cameras = list(report["detected"]["cameras"])
    if not frames:
        out.append("no frames could be read from the LiDAR topic")
    if not cameras:
        out.append("no camera topics: frames are LiDAR-only")
    for name in cameras:
        offsets = [f["offsets_ms"][name] for f in frames]
        known = [abs(o) for o in offsets if o is not None]
        late = [o for o in known if o > slop]
        if frames and not known:
            out.append(f"camera {name}: no images at all")
        elif late:
            out.append(
                f"camera {name}: nearest image beyond the {slop:g} ms slop in {len(late)} of "
                f"{len(frames)} frames (worst {max(late):.1f} ms): check its clock or the slop"
            )
        used = sum(name in f["cameras"] for f in frames)
        if used and report["pairs"][name] == 0:
            out.append(
                f"camera {name}: 0 point-pixel pairs in {used} frames: the extrinsics (TF or "
                "calibration) or intrinsics are wrong"
            )
    for reason, count in sorted(report["skipped"].items()):
        if reason == "camera_unmatched":
            continue  # reported per camera above
        out.append(f"skipped {count} x {reason}: {SKIP_REASONS.get(reason, reason)}")
    for what, count in sorted(report["warnings"].items()):
        out.append(f"{count} x {what}")
    if frames and not any(f["has_pose"] for f in frames):
        out.append("no ego poses (/tf map->base or odometry): multi-sweep merging is unavailable")
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_inspect(report: dict[str, Any], *, max_rows: int = 20) -> str:
    """A readable text report (tables of topics and frames, totals, then problems)."""
    lines = [
        f"bag       {report['bag']}  ({report['storage']}, {report['duration_s']:.3f} s, "
        f"{report['message_count']} messages)",
    ]
    det = report["detected"]
    lines.append(f"lidar     {det['lidar']}  (frame {report['lidar_frame'] or '?'})")
    if det["labels"]:
        lines.append(f"labels    {det['labels']}")
    for name, cam in det["cameras"].items():
        lines.append(f"camera    {name:<16} {cam['image']}  info {cam['info'] or '-'}")
    lines.append(f"poses     {report['world_frame'] or '-'}    slop {report['slop_ms']:g} ms")
    lines.append("")
    width = max([len(t) for t in report["topics"]] + [5])
    lines.append(f"{'topic':<{width}}  {'type':<34} {'count':>7} {'Hz':>8}")
    for topic, row in report["topics"].items():
        rate = _fmt(row["rate_hz"], ".2f")
        lines.append(f"{topic:<{width}}  {row['type']:<34} {row['count']:>7} {rate:>8}")
    lines.append("")
    names = list(det["cameras"])
    widths = [max(len(n), 15) for n in names]
    head = f"{'frame':>6} {'stamp (s)':>18} {'points':>8}"
    head += "".join(f" {n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines.append(head + f" {'pairs':>7} {'distinct':>8}")
    if names:
        lines.append(" " * 34 + "".join(f" {'offset ms/pairs':>{w}}" for w in widths))
    frames = report["frames"]
    shown = frames if len(frames) <= max_rows else frames[: max_rows // 2] + frames[-max_rows // 2:]
    for i, f in enumerate(shown):
        if len(frames) > max_rows and i == max_rows // 2:
            lines.append(f"{'...':>6}")
        row = f"{f['index']:>6} {f['stamp_ns'] / _NS:>18.6f} {f['num_points']:>8}"
        for n, w in zip(names, widths, strict=True):
            off = f["offsets_ms"][n]
            cell = f"{_fmt(off, '+.1f')}/{f['pairs'][n] if n in f['cameras'] else '-'}"
            row += f" {cell:>{w}}"
        lines.append(row + f" {f['pairs_total']:>7} {f['distinct_points']:>8}")
    lines.append("")
    per_cam = ", ".join(f"{n} {c}" for n, c in report["pairs"].items())
    lines.append(
        f"total     {report['frames_read']}/{report['frames_planned']} frames, "
        f"{report['pairs_total']} pairs, {report['distinct_points']} distinct points"
        + (f" ({per_cam})" if per_cam else "")
    )
    problems = report["problems"]
    lines.append("")
    lines.extend([f"WARNING   {p}" for p in problems] or ["no problems found"])
    return "\n".join(lines)
