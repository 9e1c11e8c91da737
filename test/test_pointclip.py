"""PointCLIP: exact projections of constructed shapes, clustering, classifier, adapter, ensemble.

CLIP is the tiny random ``tiny-vit`` (64 px input), so images are resized to 64 here; the
geometry tests check the native render sizes of the reference (128 / 224 / 112 → 110 px).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clip2scene_ros.errors import ConfigError, IntegrityError
from clip2scene_ros.pointclip import (
    VIEW_SETS,
    AdapterConfig,
    InterViewAdapter,
    PointCLIPClassifier,
    agreement,
    cluster_objects,
    ensemble_logits,
    lidar_to_pointclip,
    load_adapter,
    project,
    render_v1,
    render_v2,
    save_adapter,
    train_adapter,
    voxel_components,
)
from clip2scene_ros.pointclip.adapter import ADAPTER_SPEC, ADAPTER_WEIGHTS
from clip2scene_ros.pointclip.objects import instance_ids, oriented_box
from clip2scene_ros.pointclip.projection import normalize_unit_sphere
from clip2scene_ros.teacher.prompts import load_prompts
from clip2scene_ros.vocabulary import Vocabulary, VocabularyClass

pytest.importorskip("open_clip")

# -- shapes -----------------------------------------------------------------------------------


def grid_square(x: tuple[float, float], y: tuple[float, float], z: float,
                step: float = 0.002) -> torch.Tensor:
    """Dense grid on the rectangle x × y in the plane at height z (edges included)."""
    xs = torch.linspace(x[0], x[1], round((x[1] - x[0]) / step) + 1)
    ys = torch.linspace(y[0], y[1], round((y[1] - y[0]) / step) + 1)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten(), torch.full((gx.numel(),), z)], dim=1)


def cube_surface(half: float, n: int = 201) -> torch.Tensor:
    """Points on all six faces of the cube [-half, half]³, n × n per face."""
    t = torch.linspace(-half, half, n)
    a, b = (g.flatten() for g in torch.meshgrid(t, t, indexing="ij"))
    faces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            cols = [a, b]
            cols.insert(axis, torch.full_like(a, sign * half))
            faces.append(torch.stack(cols, dim=1))
    return torch.cat(faces)


def box_blob(center: tuple[float, float, float], size: tuple[float, float, float],
             yaw: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform in an oriented box standing at ``center`` (z = bottom + h/2)."""
    local = (rng.random((n, 3)) - 0.5) * np.array(size)
    c, s = math.cos(yaw), math.sin(yaw)
    xy = local[:, :2] @ np.array([[c, s], [-s, c]])
    return np.column_stack([xy, local[:, 2]]) + np.array(center)


def pixel_range(half: float, depth: float, res: int) -> tuple[int, int]:
    """Pixels a V1 view covers for camera coordinates in [-half, half] at ``depth``."""
    s = half / depth
    return math.ceil((1 - s) * res / 2 - 0.5), math.ceil((1 + s) * res / 2 - 0.5)


# -- V1 ---------------------------------------------------------------------------------------


def test_view_sets_match_reference() -> None:
    assert [VIEW_SETS[k].num_views for k in ("v1_zeroshot", "v1_fewshot", "v2")] == [6, 10, 10]
    assert (VIEW_SETS["v1_zeroshot"].distance, VIEW_SETS["v1_zeroshot"].resolution) == (1.6, 128)
    assert (VIEW_SETS["v1_fewshot"].distance, VIEW_SETS["v1_fewshot"].resolution) == (1.4, 224)
    for vs in VIEW_SETS.values():
        rot = vs.rotations()
        eye = torch.eye(3).expand_as(rot)
        assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-6)
        assert torch.allclose(torch.linalg.det(rot), torch.ones(vs.num_views), atol=1e-6)
    # y-up: view 0 maps p to (-y, x, z) (rows from -y: up is at the top); view 4 looks down
    up = torch.tensor([[0.0, 1.0, 0.0]])
    rot = VIEW_SETS["v1_zeroshot"].rotations()
    assert torch.equal(up @ rot[0], torch.tensor([[-1.0, 0.0, 0.0]]))
    assert torch.equal(up @ rot[4], torch.tensor([[0.0, 0.0, -1.0]]))  # top camera: y nearer


def test_v1_plane_facing_camera_has_constant_depth_over_expected_pixels() -> None:
    # upper half (y >= 0) of a rectangle in the plane z = 0 and one at z = 0.2, view 0 from 1.6
    for z, depth in ((0.0, 1.6), (0.2, 1.8)):
        plane = grid_square((-0.3, 0.3), (0.0, 0.15), z)
        for reduce in ("harmonic", "min"):
            img = render_v1([plane], "v1_zeroshot", reduce=reduce, normalize=False)
            assert img.shape == (1, 6, 128, 128)
            front = img[0, 0]
            rows = (pixel_range(0.15, depth, 128)[0], 64)  # y in [0, .15]: from -0.15/d to 0
            cols = pixel_range(0.3, depth, 128)
            expected = torch.zeros(128, 128, dtype=torch.bool)
            expected[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
            assert torch.equal(front > 0, expected), (z, reduce)
            assert torch.allclose(front[expected], torch.full((int(expected.sum()),), depth))
    # the numbers the formula gives for z = 0, spelled out
    assert pixel_range(0.15, 1.6, 128)[0] == 58 and pixel_range(0.3, 1.6, 128) == (52, 76)


def test_v1_pixel_value_is_harmonic_mean_or_min() -> None:
    ray = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.4]])  # depths 1.6 and 2.0, same pixel
    harmonic = render_v1([ray], normalize=False)[0, 0]
    assert torch.nonzero(harmonic).tolist() == [[64, 64]]
    assert harmonic[64, 64].item() == pytest.approx(2 / (1 / 1.6 + 1 / 2.0), rel=1e-6)
    assert render_v1([ray], reduce="min", normalize=False)[0, 0, 64, 64].item() == \
        pytest.approx(1.6)


def test_v1_cube_silhouette_in_every_axis_view() -> None:
    cube = cube_surface(0.5)
    img = render_v1([cube], "v1_zeroshot", reduce="min", normalize=False)[0]
    lo, hi = pixel_range(0.5, 1.6 - 0.5, 128)  # the near face, at depth 1.1, bounds it
    assert (lo, hi) == (35, 93)
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[lo:hi + 1, lo:hi + 1] = True
    for v in range(6):
        assert torch.equal(img[v] > 0, expected), v
        assert torch.allclose(img[v][expected], torch.full((int(expected.sum()),), 1.1))
    fewshot = render_v1([cube], "v1_fewshot", normalize=False)[0]
    assert fewshot.shape == (10, 224, 224)
    for v in (0, 1, 2, 3, 8, 9):  # the axis views, now 224 px from 1.4
        lo, hi = pixel_range(0.5, 0.9, 224)
        assert torch.equal(torch.nonzero(fewshot[v].sum(1)).flatten(), torch.arange(lo, hi + 1))
    for v in range(4, 8):  # diagonal views see several faces at different depths
        assert (fewshot[v] > 0).sum() > 5000
        assert fewshot[v][fewshot[v] > 0].std() > 0.05


# -- V2 ---------------------------------------------------------------------------------------


def test_v2_single_point_gives_the_expected_dark_square() -> None:
    # one point -> grid cell (x, y) = (56, 56), depth value 3.5; 7x7 max-pool with padding 2
    # spreads it over output pixels 52..58, the 3x3 Gaussian keeps 53..57 at the peak (-> 0
    # after inversion) and leaves everything outside 51..59 at background 1
    img = render_v2([torch.tensor([[0.3, -0.2, 0.5]])])[0]
    assert img.shape == (10, 110, 110)
    assert torch.isfinite(img).all()
    for v in range(10):
        assert torch.equal(img[v, 53:58, 53:58], torch.zeros(5, 5))
        outside = torch.ones(110, 110, dtype=torch.bool)
        outside[51:60, 51:60] = False
        assert torch.equal(img[v][outside], torch.ones(int(outside.sum())))
        ring = img[v, 51:60, 51:60].clone()
        ring[2:7, 2:7] = 0.5
        assert ((ring > 0) & (ring < 1)).all()


def test_v2_images_are_grey_on_white_and_scale_invariant() -> None:
    cube = cube_surface(0.5, 41)
    img = render_v2([cube, cube * 7.0 + 3.0])
    assert img.shape == (2, 10, 110, 110)
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img[0], img[1], atol=1e-5)
    assert torch.equal(img[0, :, 0, 0], torch.ones(10))  # white background
    assert (img[0] < 0.9).flatten(1).sum(1).min() > 1000  # a large grey object in every view


def test_image_shapes_for_every_view_set() -> None:
    objects = [cube_surface(0.5, 11), torch.randn(300, 3)]
    for views, projection, m in (("v1_zeroshot", "v1", 6), ("v1_fewshot", "v1", 10),
                                 ("v2", "v2", 10)):
        for size in (64, 224):
            images = project(objects, views, projection, image_size=size)
            assert images.shape == (2, m, 3, size, size)
            assert torch.equal(images[:, :, 0], images[:, :, 2])  # grey: channels repeated
    with pytest.raises(ConfigError):
        project(objects, "v1_zeroshot", "v3")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 100_000])
def test_projections_survive_any_point_count(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    pts = torch.randn(n, 3, generator=gen) * 5 + 100
    for projection in ("v1", "v2"):
        images = project([pts, pts[:1]], "v1_fewshot" if projection == "v1" else "v2",
                         projection, image_size=64)
        assert torch.isfinite(images).all(), projection
        # every view of every object shows something; downsampling is antialiased, so even a
        # single splatted V1 pixel survives 224 -> 64
        background = 1.0 if projection == "v2" else 0.0
        assert (images[:, :, 0] != background).flatten(2).any(-1).all(), projection
    same = torch.ones(2, 3)  # two coincident points: scale 1, no NaN
    assert torch.equal(normalize_unit_sphere(same, torch.zeros(2, dtype=torch.long), 1),
                       torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        project([torch.zeros(0, 3)])


# -- axes and clustering ----------------------------------------------------------------------


def test_lidar_z_up_becomes_y_up_and_a_pole_stands_upright() -> None:
    assert torch.equal(lidar_to_pointclip(np.array([[1.0, 2.0, 3.0]])),
                       torch.tensor([[1.0, 3.0, -2.0]]))
    assert torch.equal(lidar_to_pointclip(np.array([[1.0, 3.0, -2.0]]), up="y"),
                       torch.tensor([[1.0, 3.0, -2.0]]))
    heading = lidar_to_pointclip(np.array([[math.cos(0.5), math.sin(0.5), 0.0]]), yaw=0.5)
    assert torch.allclose(heading, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
    t = torch.linspace(0, 2, 400)
    pole = torch.stack([0.05 * torch.cos(40 * t), 0.05 * torch.sin(40 * t), t], dim=1)
    front = render_v1([lidar_to_pointclip(pole)])[0, 0] > 0
    rows, cols = torch.nonzero(front).T
    assert (rows.max() - rows.min()) > 8 * (cols.max() - cols.min())
    assert rows.max() - rows.min() > 60
    top = render_v1([lidar_to_pointclip(pole)])[0, 4] > 0  # looking down the pole: a small ring
    rows, cols = torch.nonzero(top).T
    assert rows.max() - rows.min() < 12 and cols.max() - cols.min() < 12


def test_voxel_components_use_26_connectivity_and_groups() -> None:
    pts = np.array([[0.5, 0.5, 0.5], [1.5, 1.5, 1.5],  # corner-touching voxels: one component
                    [3.5, 0.5, 0.5],  # one empty voxel away: a new component
                    [4.5, 0.5, 0.5]])  # face neighbour of the previous one, other group
    assert voxel_components(pts, 1.0).tolist() == [0, 0, 1, 1]
    assert voxel_components(pts, 1.0, groups=[5, 5, 5, 7]).tolist() == [0, 0, 1, 2]
    # a long chain (worst case for label propagation) is one component
    chain = np.column_stack([np.arange(3000) * 0.9, np.zeros(3000), np.zeros(3000)])
    assert set(voxel_components(chain[::-1], 1.0).tolist()) == {0}
    assert voxel_components(np.zeros((0, 3)), 1.0).shape == (0,)


def test_clustering_finds_three_blobs_with_boxes_and_ignores_stuff() -> None:
    rng = np.random.default_rng(0)
    blobs = [((0.0, 0.0, 0.75), (4.0, 1.8, 1.5), math.radians(30), 1),   # car
             ((8.0, 3.0, 0.8), (2.0, 0.8, 1.6), math.radians(-60), 1),   # car
             ((3.0, 6.0, 0.85), (0.7, 0.5, 1.7), math.radians(80), 5)]   # person
    parts, labels = [], []
    for center, size, yaw, cls in blobs:
        parts.append(box_blob(center, size, yaw, 4000, rng))
        labels.append(np.full(4000, cls))
    ground = np.column_stack([rng.uniform(-5, 12, 20000), rng.uniform(-5, 10, 20000),
                              rng.uniform(-0.1, 0.0, 20000)])  # stuff touching every blob
    parts += [ground, np.array([[20.0, 20.0, 0.5]] * 3)]  # + 3 car points: below min_points
    labels += [np.full(20000, 8), np.full(3, 1)]
    points = np.concatenate(parts).astype(np.float32)
    label = np.concatenate(labels)
    objects = cluster_objects(points, label, thing_classes=[1, 5], voxel_size=0.3, min_points=10)
    assert [o.class_index for o in objects] == [1, 1, 5]
    for obj, (center, size, yaw, _), start in zip(objects, blobs, (0, 4000, 8000), strict=True):
        assert np.array_equal(obj.indices, np.arange(start, start + 4000))
        assert np.allclose(obj.box.center, center, atol=0.05)
        assert np.allclose(obj.box.size, size, rtol=0.03, atol=0.02)
        diff = (obj.box.yaw - yaw + math.pi / 2) % math.pi - math.pi / 2
        assert abs(diff) < math.radians(3)
        assert np.allclose(obj.points, points[start:start + 4000])
    ids = instance_ids(len(points), objects)
    assert (ids[12000:] == -1).all() and set(ids[:12000].tolist()) == {0, 1, 2}
    assert oriented_box(np.ones((1, 3))).size == (0.0, 0.0, 0.0)
    assert cluster_objects(points, label, thing_classes=[3]) == []


# -- classifier -------------------------------------------------------------------------------


VOCAB = Vocabulary(name="toy", classes=(VocabularyClass("cube", (255, 0, 0)),
                                         VocabularyClass("sphere", (0, 255, 0)),
                                         VocabularyClass("pole", (0, 0, 255))))


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[torch.nn.Module, object]:
    from clip2scene_ros.teacher.clip_loader import load_clip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights" is the point here
        return load_clip("tiny-vit", None)


def toy_objects(per_class: int, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    objects, labels = [], []
    for _ in range(per_class):
        scale = 1 + 0.2 * torch.rand(3, generator=gen)
        cube = cube_surface(0.5, 15) * scale
        sphere = torch.nn.functional.normalize(torch.randn(1200, 3, generator=gen), dim=1)
        t = torch.rand(600, generator=gen) * 2
        pole = torch.stack([0.05 * torch.cos(40 * t), 0.05 * torch.sin(40 * t), t], 1)
        objects += [cube, sphere * scale, pole]
        labels += [0, 1, 2]
    return objects, labels


def test_classifier_logits_are_weighted_view_means(tiny_clip) -> None:
    model, tokenizer = tiny_clip
    assert "point cloud depth map of a {}." in load_prompts("pointclip")
    objects, _ = toy_objects(1, 0)
    weights = [1.0, 0.5, 0.5, 1.0, 0.25, 0.25]
    clf = PointCLIPClassifier(model, tokenizer, VOCAB, views="v1_zeroshot", view_weights=weights)
    assert clf.image_size == 64 and clf.text_bank.shape == (3, 32)
    assert len(clf.templates) == len(load_prompts("pointclip"))
    feats = clf.encode_views(objects)
    assert feats.shape == (3, 6, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 6), atol=1e-5)
    cos = torch.einsum("omd,cd->omc", feats, clf.text_bank)
    w = torch.tensor(weights)
    expected = clf.logit_scale * (cos * w[None, :, None]).sum(1) / w.sum()
    logits = clf.logits(objects)
    assert torch.allclose(logits, expected, atol=1e-5)
    result = clf.classify(objects)
    probs = expected.softmax(-1)
    assert [r[0] for r in result] == probs.argmax(-1).tolist()
    assert [r[1] for r in result] == pytest.approx(probs.max(-1).values.tolist(), rel=1e-5)
    v2 = PointCLIPClassifier(model, tokenizer, VOCAB, views="v2", projection="v2")
    assert v2.logits(objects).shape == (3, 3) and torch.isfinite(v2.logits(objects)).all()
    with pytest.raises(ConfigError):
        PointCLIPClassifier(model, tokenizer, VOCAB, view_weights=[1.0, 1.0])


# -- adapter ----------------------------------------------------------------------------------


def test_adapter_has_reference_size() -> None:
    adapter = InterViewAdapter(AdapterConfig(num_views=10, dim=512))
    assert 5.4e6 < sum(p.numel() for p in adapter.parameters()) < 5.6e6
    out = adapter.eval()(torch.randn(4, 10, 512))
    assert out.shape == (4, 5120)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_adapter_loss_falls_and_round_trips(tiny_clip, tmp_path: Path) -> None:
    model, tokenizer = tiny_clip
    clf = PointCLIPClassifier(model, tokenizer, VOCAB, views="v1_fewshot", resolution=64)
    objects, labels = toy_objects(6, 1)
    run = train_adapter(clf, objects, labels, shots=4, epochs=40, lr=0.05, seed=3)
    assert len(run.selected) == 12 and len(run.losses) == 40
    assert run.losses[-1] < 0.7 * run.losses[0], run.losses
    assert clf.adapter is run.adapter
    assert clf.logits(objects).shape == (18, 3)

    bundle = tmp_path / "bundle"
    save_adapter(bundle, run.adapter, {"note": "toy"})
    assert (bundle / ADAPTER_WEIGHTS).is_file()
    meta = yaml.safe_load((bundle / ADAPTER_SPEC).read_text())
    assert meta["config"]["num_views"] == 10 and meta["config"]["classes"] == VOCAB.names
    assert meta["provenance"]["note"] == "toy" and meta["provenance"]["shots"] == 4
    loaded = load_adapter(bundle)
    original = run.adapter.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    feats = torch.nn.functional.normalize(torch.randn(5, 10, 32), dim=-1)
    assert torch.equal(loaded(feats), run.adapter(feats))
    clf.attach_adapter(loaded)  # compatible: same views, sizes, classes
    zs = PointCLIPClassifier(model, tokenizer, VOCAB, views="v1_zeroshot")
    with pytest.raises(ConfigError):
        zs.attach_adapter(loaded)
    (bundle / ADAPTER_WEIGHTS).write_bytes((bundle / ADAPTER_WEIGHTS).read_bytes()[:-4] + b"abcd")
    with pytest.raises(IntegrityError, match="sha256"):
        load_adapter(bundle)


# -- ensemble ---------------------------------------------------------------------------------


def test_ensemble_against_hand_computation() -> None:
    clip_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    point_logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0],
                                 [0.0, 0.0, math.log(2)], [5.0, 5.0, 5.0]])
    # object 0 = points 0, 1; object 1 = point 2; point 3 belongs to none
    p0 = (np.array([1, 1, 1]) / 3 + np.array([3, 1, 1]) / 5) / 2
    p1 = np.array([1, 1, 2]) / 4
    expected = np.log(np.stack([p0, p1])) + 0.5 * clip_logits.numpy()
    for index in ([np.array([0, 1]), [2]], np.array([0, 0, 1, -1])):
        out = ensemble_logits(clip_logits, point_logits, index, weight=0.5)
        assert np.allclose(out.numpy(), expected, atol=1e-6)
    mean_logits = ensemble_logits(clip_logits, point_logits, [[0, 1], [2]], 2.0, pool="logits")
    hand = torch.tensor([[math.log(3) / 2 + 2, 0, 0], [0, 4, math.log(2)]])
    assert torch.allclose(mean_logits, hand, atol=1e-6)
    empty = ensemble_logits(clip_logits, point_logits, [[], [2]], weight=1.0)
    assert torch.allclose(empty[0], torch.log(torch.full((3,), 1 / 3)) + clip_logits[0])
    with pytest.raises(ConfigError):
        ensemble_logits(clip_logits, point_logits, np.array([0, 0, 2, -1]))


def test_agreement() -> None:
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    assert agreement(a, torch.tensor([0, 1, 1, 1])) == 0.75
    assert agreement(a, a) == 1.0
    assert math.isnan(agreement(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


# -- real ModelNet mesh (skipped without ../shared/data) --------------------------------------


def read_off_vertices(path: Path) -> np.ndarray:
    tokens = path.read_text().split()
    if tokens[0] == "OFF":
        tokens = tokens[1:]
    else:  # some ModelNet files glue the counts to the magic: "OFF490 518 0"
        tokens[0] = tokens[0][3:]
    n = int(tokens[0])
    return np.array(tokens[3:3 + 3 * n], dtype=np.float64).reshape(n, 3)


def test_modelnet_chair_renders_upright(modelnet_dir: Path) -> None:
    chair = read_off_vertices(modelnet_dir / "chair_0001.off")  # raw ModelNet: z up, 1.0 tall
    img = render_v1([lidar_to_pointclip(chair)], "v1_zeroshot")[0]
    for v in range(4):  # side views: taller than wide
        rows, cols = torch.nonzero(img[v]).T
        assert (rows.max() - rows.min()) > 1.3 * (cols.max() - cols.min()), v
    assert torch.isfinite(render_v2([lidar_to_pointclip(chair)])).all()
