"""BagSceneDataset on a 5-frame sample drive with a tiny random MaskCLIP teacher cache."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from clip2scene_ros.bag.reader import BagReader
from clip2scene_ros.config import load_config
from clip2scene_ros.errors import ConfigError
from clip2scene_ros.frame import Frame
from clip2scene_ros.geometry.ego_motion import merge_sweeps
from clip2scene_ros.geometry.projection import project_points
from clip2scene_ros.geometry.transforms import transform_points
from clip2scene_ros.models.bundle import InputSpec
from clip2scene_ros.sample.drive import small_rig, write_sample_drive
from clip2scene_ros.sparse.tensor import PointTensor
from clip2scene_ros.teacher.cache import TeacherCache
from clip2scene_ros.teacher.run import run_teacher
from clip2scene_ros.training.augmentation import CropFlip, random_resized_crop_params
from clip2scene_ros.training.dataset import BagSceneDataset
from clip2scene_ros.training.dataset_config import DatasetConfig, fraction_step
from clip2scene_ros.training.sample import Sample, collate
from clip2scene_ros.vocabulary import builtin_vocabulary, load_vocabulary

pytestmark = pytest.mark.filterwarnings("ignore:CLIP tiny-vit has random weights")

CROP = (56, 104)
FRAMES = 5


@pytest.fixture(scope="session")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rig = small_rig()
    path = tmp_path_factory.mktemp("dataset") / "drive"
    write_sample_drive(path, frames=FRAMES, seed=0, rig=rig)
    return path


@pytest.fixture(scope="session")
def cache(drive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "cache"
    report = run_teacher(drive, "sample_drive", out, model="tiny-vit", image_size=(64, 128),
                         prompts="single", store_features=True, progress=False)
    assert report.complete and report.frames == FRAMES
    return out


@pytest.fixture(scope="session")
def frames(drive: Path) -> dict[int, Frame]:
    return {f.index: f for f in BagReader(drive)}


def _config(drive: Path, cache: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(bags=(drive,), teacher_caches=(cache,), crop_size=CROP, **kw)


@pytest.fixture(scope="module")
def dataset(drive: Path, cache: Path) -> BagSceneDataset:
    return BagSceneDataset(_config(drive, cache))


def _assert_same(a: Sample, b: Sample) -> None:
    for f in dataclasses.fields(Sample):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def test_sample_shapes_and_sweeps(dataset: BagSceneDataset, frames: dict[int, Frame]) -> None:
    # 3 sweeps: frames 0 and 1 lack two past sweeps and are not keyframes
    assert dataset.keyframes == [(0, 2), (0, 3), (0, 4)]
    assert dataset.skipped["too_few_sweeps"] == 2 and dataset.input_spec.sweeps == 3
    s = dataset[0]
    key = frames[2]
    assert s.frame_index == 2 and s.sweep_frames == (2, 1, 0) and s.stamp_ns == key.stamp_ns
    n = s.num_points
    assert n == sum(frames[i].num_points for i in s.sweep_frames)  # nothing dropped here
    assert s.coords.shape == (n, 3) and s.coords.dtype == np.float32
    assert s.feats.shape == (n, 1) and s.source.shape == (n,) and s.sweep.dtype == np.uint8
    for sid, fi in enumerate(s.sweep_frames):
        assert int((s.sweep == sid).sum()) == frames[fi].num_points
    assert s.key_points == key.num_points
    np.testing.assert_array_equal(s.source < s.key_points, s.sweep == 0)
    # raw coordinates are the ego-motion merged sweeps, before augmentation
    merged, _, _ = merge_sweeps([frames[i] for i in s.sweep_frames])
    np.testing.assert_array_equal(s.xyz_raw, merged[s.source])
    # augmentation: one rotation + flips + scale for the sample, applied to every sweep
    A = s.point_transforms
    assert A.shape == (3, 3, 3) and np.allclose(A[0], A[1]) and np.allclose(A[0], A[2])
    scale = abs(np.linalg.det(A[0])) ** (1 / 3)
    assert 0.95 <= scale <= 1.05 and np.isclose(A[0][2, 2], scale)
    voxel = dataset.input_spec.voxel_size
    expected = np.einsum("nij,nj->ni", A[s.sweep], s.xyz_raw.astype(np.float64)) / voxel
    np.testing.assert_allclose(s.coords, expected, atol=1e-3)
    np.testing.assert_array_equal(s.feats[:, 0], np.concatenate(
        [frames[i].intensity for i in s.sweep_frames])[s.source])
    # labels on paired key points only, cells dense from the raw cloud
    assert s.labels.shape == (n,) and (s.labels[s.sweep != 0] == -1).all()
    assert (s.labels >= 0).sum() > 500 and s.labels.max() < 8
    assert s.cell_index.min() == 0 and len(np.unique(s.cell_index)) == s.cell_index.max() + 1
    assert s.pixel_feats is not None and s.pixel_feats.shape == (n, 32)
    assert s.images is not None and s.images.shape == (2, 3, *CROP)
    assert s.images.dtype == torch.float32 and s.images.min() >= 0 and s.images.max() <= 1
    assert s.camera_names == ("camera_front", "camera_left")
    assert s.gt_labels is None  # no vocabulary given


def test_pairs_follow_augmentation(dataset: BagSceneDataset, frames: dict[int, Frame]) -> None:
    for index in (0, 2):
        s = dataset[index]
        key = frames[s.frame_index]
        assert s.num_pairs > 0
        # pair rows are key-frame points of the prepared cloud
        assert (s.sweep[s.pair_point] == 0).all() and (s.source[s.pair_point] < s.key_points).all()
        h_out, w_out = CROP
        assert ((s.pair_pixel >= 0) & (s.pair_pixel < [w_out, h_out])).all()
        flips = set()
        for c, view in enumerate(key.cameras):
            mine = s.pair_camera == c
            top, left, h, w, flip = (int(v) for v in s.crops[c])
            flips.add(flip)
            # re-project the un-augmented point through the camera, then crop/resize/flip
            xyz = key.xyz[s.source[s.pair_point[mine]]]
            uv0, depth = project_points(transform_points(view.lidar_to_camera, xyz), view.camera)
            assert (depth > 1.0).all()
            u = (uv0[:, 0] - left) * w_out / w
            v = (uv0[:, 1] - top) * h_out / h
            assert ((u >= 0) & (u < w_out) & (v >= 0) & (v < h_out)).all()
            col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
            if flip:
                u, col = w_out - u, w_out - 1 - col
            np.testing.assert_allclose(s.pair_uv[mine], np.stack([u, v], 1), atol=2e-3)
            np.testing.assert_array_equal(s.pair_pixel[mine], np.stack([col, row], 1))
            # the image is the same crop, resized and flipped alike
            crop = torch.from_numpy(view.image[top:top + h, left:left + w].astype(np.float32))
            img = F.interpolate(crop.permute(2, 0, 1)[None] / 255, size=CROP, mode="bilinear",
                                align_corners=False, antialias=True)[0].clamp(0, 1)
            assert s.images is not None
            torch.testing.assert_close(s.images[c], img.flip(-1) if flip else img)
            # the crop is one of the configured shapes, or the best of the attempts
            assert top >= 0 and top + h <= view.image.shape[0]
            assert left >= 0 and left + w <= view.image.shape[1]


def test_cropflip_remaps_pixels_exactly() -> None:
    # an image whose pixel values are their own (col, row): crop+flip must read back the source
    h0, w0 = 12, 20
    rows, cols = np.mgrid[0:h0, 0:w0]
    image = np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8)
    uv = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1).astype(np.float32)
    for flip in (False, True):
        crop = CropFlip(3, 5, 6, 10, (6, 10), flip)
        uv_out, px, keep = crop.apply(uv)
        assert keep.sum() == 60
        out = (crop.image(image) * 255).round().numpy().astype(np.int64)
        np.testing.assert_array_equal(out[0, px[:, 1], px[:, 0]], cols.ravel()[keep])
        np.testing.assert_array_equal(out[1, px[:, 1], px[:, 0]], rows.ravel()[keep])
        np.testing.assert_array_equal(np.floor(uv_out).astype(np.int64), px)
    # torchvision's sampling rules: area and aspect within range
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_params(900, 1600, (0.3, 1.0), (14 / 9, 17 / 9), rng)
        assert 0 <= top <= 900 - h and 0 <= left <= 1600 - w
        assert 0.3 - 1e-2 <= h * w / (900 * 1600) <= 1.0
        assert 14 / 9 - 0.05 <= w / h <= 17 / 9 + 0.05


def test_source_mapping_and_teacher_join(drive: Path, cache: Path) -> None:
    # max_points forces prepare_frames to subsample: pair rows must follow PreparedCloud.source
    ds = BagSceneDataset(_config(drive, cache, input_spec=InputSpec(max_points=5000),
                                 crop_labels=False))
    s = ds[1]
    assert s.num_points == 5000 and s.dropped["over_max_points"] > 0
    teacher = TeacherCache(cache).frame(s.frame_index)
    by_pair = {(teacher.camera_names[c], int(p)): (int(lab), float(conf))
               for c, p, lab, conf in zip(teacher.camera, teacher.points, teacher.label,
                                          teacher.confidence, strict=True)}
    key_point = s.source[s.pair_point]
    assert (key_point < s.key_points).all()
    for j in range(s.num_pairs):
        lab, conf = by_pair[(s.camera_names[s.pair_camera[j]], int(key_point[j]))]
        assert s.pair_label[j] == lab and np.isclose(s.pair_confidence[j], conf)
    # every labelled point has its own pair's label: the most confident one of the full image
    best: dict[int, tuple[float, int]] = {}
    for (_, p), (lab, conf) in sorted(by_pair.items()):
        if p not in best or conf > best[p][0]:
            best[p] = (conf, lab)
    for row in np.flatnonzero(s.labels >= 0):
        assert s.labels[row] == best[int(s.source[row])][1]
    kept_key = set(s.source[s.sweep == 0].tolist())
    assert (s.labels >= 0).sum() == len(kept_key & set(best))


def test_reproducible_per_epoch_and_index(dataset: BagSceneDataset, drive: Path,
                                          cache: Path) -> None:
    dataset.set_epoch(0)
    a = dataset[1]
    _assert_same(a, dataset[1])
    _assert_same(a, BagSceneDataset(_config(drive, cache))[1])  # a fresh instance, no state
    dataset.set_epoch(1)
    b = dataset[1]
    assert b.epoch == 1 and not np.allclose(a.point_transforms, b.point_transforms)
    assert not np.array_equal(a.crops, b.crops)
    dataset.set_epoch(0)
    _assert_same(a, dataset[1])
    other_seed = BagSceneDataset(_config(drive, cache, seed=7))[1]
    assert not np.allclose(a.point_transforms, other_seed.point_transforms)


def test_evaluation_mode_is_identity(drive: Path, cache: Path) -> None:
    ds = BagSceneDataset(_config(drive, cache, augment=False, random_sweeps=False))
    s = ds[0]
    assert s.sweep_frames == (2, 1, 0)
    assert np.array_equal(s.point_transforms, np.tile(np.eye(3), (3, 1, 1)))
    np.testing.assert_allclose(s.coords * ds.input_spec.voxel_size, s.xyz_raw, atol=1e-5)
    np.testing.assert_array_equal(s.crops, [[0, 0, 54, 96, 0], [0, 0, 45, 80, 0]])
    # the whole image is kept, so every cached pair survives
    assert s.num_pairs == TeacherCache(cache).frame(2).points.size


def test_per_sweep_augmentation_and_collate(drive: Path, cache: Path) -> None:
    ds = BagSceneDataset(_config(drive, cache, per_sweep_augmentation=True))
    s = ds[0]
    assert s.sweeps_independent and not np.allclose(s.point_transforms[0], s.point_transforms[1])
    samples = [ds[0], ds[2]]
    batch = collate(samples)
    sizes = [x.num_points for x in samples]
    assert batch["offsets"].tolist() == [0, sizes[0], sizes[0] + sizes[1]]
    assert batch["num_clouds"] == 6
    sweep = batch["sweep"]
    expected = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)]) + 2 * sweep
    assert torch.equal(batch["batch"], expected)
    merged = collate(samples, sweeps_as_batches=False)
    assert merged["num_clouds"] == 2
    assert merged["batch"].tolist() == [0] * sizes[0] + [1] * sizes[1]


def test_collate_batches_points_pairs_cells_images(dataset: BagSceneDataset) -> None:
    samples = [dataset[0], dataset[2]]
    batch = collate(samples)
    n0, n1 = (s.num_points for s in samples)
    assert batch["offsets"].tolist() == [0, n0, n0 + n1] and batch["num_clouds"] == 2
    assert batch["coords"].shape == (n0 + n1, 3) and batch["feats"].shape == (n0 + n1, 1)
    assert torch.equal(batch["batch"], torch.cat([torch.zeros(n0), torch.ones(n1)]).long())
    pt = PointTensor(batch["feats"], batch["coords"], batch["batch"])
    assert pt.coords.shape[0] == n0 + n1
    m0, m1 = (s.num_pairs for s in samples)
    assert batch["pair_offsets"].tolist() == [0, m0, m0 + m1]
    pp, pi = batch["pair_point"], batch["pair_image"]
    assert torch.equal(pp[:m0], torch.from_numpy(samples[0].pair_point))
    assert torch.equal(pp[m0:], torch.from_numpy(samples[1].pair_point) + n0)
    assert pi[:m0].max() <= 1 and pi[m0:].min() >= 2 and pi.max() == 3
    assert batch["images"].shape == (4, 3, *CROP) and batch["image_offsets"].tolist() == [0, 2, 4]
    # a pair's global row carries that sample's label: labels[pair_point] is its point's target
    assert torch.equal(batch["labels"][pp[m0:]], torch.from_numpy(
        samples[1].labels[samples[1].pair_point]))
    c0, c1 = batch["cell_index"][:n0], batch["cell_index"][n0:]
    assert c0.min() == 0 and c1.min() == c0.max() + 1
    assert len(torch.unique(batch["cell_index"])) == int(batch["cell_index"].max()) + 1
    assert batch["pixel_feats"].shape == (n0 + n1, 32)
    assert batch["pair_pixel_feats"].shape == (m0 + m1, 32)
    for key in ("labels", "cell_index", "confidence"):
        assert batch[key].shape == (n0 + n1,)


def test_label_fraction_selects_keyframes(drive: Path, cache: Path) -> None:
    def keyframes(fraction: float) -> list[int]:
        ds = BagSceneDataset(_config(drive, cache, sweeps=1, label_fraction=fraction))
        return [i for _, i in ds.keyframes]

    assert keyframes(1.0) == [0, 1, 2, 3, 4]
    assert keyframes(0.5) == [0, 2, 4]
    assert keyframes(0.25) == [0, 4]
    assert keyframes(0.3) == [0, 3]  # round(1 / 0.3) = 3
    assert keyframes(0.01) == [0]
    assert [fraction_step(f) for f in (0.01, 0.05, 0.1, 0.25, 1.0)] == [100, 20, 10, 4, 1]
    with pytest.raises(ConfigError, match="label_fraction"):
        fraction_step(0.0)


def test_ground_truth_labels_map_through_vocabulary(drive: Path,
                                                    frames: dict[int, Frame]) -> None:
    ds = BagSceneDataset(DatasetConfig(bags=(drive,), label_source="ground_truth",
                                       vocabulary="sample_drive", crop_size=CROP,
                                       return_images=False))
    s = ds[0]
    assert s.images is None and s.gt_labels is not None
    ids = np.concatenate([frames[i].labels for i in s.sweep_frames]).astype(np.int64)[s.source]
    vocab = load_vocabulary(builtin_vocabulary("sample_drive"))
    np.testing.assert_array_equal(s.gt_labels, vocab.map_labels(ids))
    # sample_drive.yaml: class i has dataset id i + 1, 0 is unlabelled
    np.testing.assert_array_equal(s.labels, np.where((ids >= 1) & (ids <= 8), ids - 1, -1))
    assert (s.labels >= 0).mean() > 0.5 and (s.confidence == (s.labels >= 0)).all()
    # without a teacher cache the pairs exist but carry no teacher labels
    assert s.num_pairs > 0 and (s.pair_label == -1).all() and s.pair_feats is None


def test_config_checks(drive: Path, cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher_caches"):
        BagSceneDataset(DatasetConfig(bags=(drive,)))
    with pytest.raises(ConfigError, match="sweep_window"):
        BagSceneDataset(_config(drive, cache, sweeps=3, sweep_window=1))
    with pytest.raises(ConfigError, match="vocabulary"):
        BagSceneDataset(DatasetConfig(bags=(drive,), label_source="ground_truth"))
    cfg = load_config(DatasetConfig, {"bags": [str(drive)], "teacher_caches": [str(cache)],
                                      "crop_size": [56, 104], "label_fraction": 0.25,
                                      "input_spec": {"voxel_size": 0.2}})
    assert cfg.bags == (drive,) and cfg.crop_size == CROP and math.isclose(cfg.crop_ratio[0],
                                                                            14 / 9)
    assert BagSceneDataset(cfg).input_spec.voxel_size == 0.2
    other = tmp_path / "other"
    write_sample_drive(other, frames=2, seed=1, rig=small_rig(60, (48, 27), None))
    with pytest.raises(ConfigError, match="another bag"):
        BagSceneDataset(DatasetConfig(bags=(other,), teacher_caches=(cache,)))


def test_dataloader_with_two_workers(dataset: BagSceneDataset) -> None:
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=collate)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    # workers draw exactly what the main process draws for (epoch, index)
    direct = collate([dataset[0], dataset[1]])
    for key in ("coords", "feats", "labels", "pair_point", "pair_pixel", "cell_index"):
        assert torch.equal(batches[0][key], direct[key]), key
    assert torch.equal(batches[0]["images"], direct["images"])
