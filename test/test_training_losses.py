"""CLIP2Scene training losses against explicit loop/reference computations on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip2scene_ros.runtime.labels import LOGIT_SCALE
from clip2scene_ros.training.losses import (
    SwitchableSelfTraining,
    build_loss,
    grid_cells,
    inverse_sqrt_frequency,
    kl_distillation,
    lovasz_softmax,
    ppkt_infonce,
    scr_contrastive,
    scr_cross_entropy,
    ssr_loss,
    supervised_loss,
)

D, C = 6, 4


def _data(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, D, generator=g, dtype=torch.float64).float()
    labels = torch.randint(-1, C - 1, (n,), generator=g)  # class C-1 never present
    bank = torch.randn(C, D, generator=g)
    return feats, labels, bank


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# --------------------------------------------------------------------------------------------- SCR


def _scr_loop(feats, labels, bank, tau, with_pos=True, reduction="mean") -> float:
    terms = []
    for c in sorted({int(y) for y in labels if y >= 0}):
        pos = sum(math.exp(_cos(f, bank[c]) / tau) for f, y in zip(feats, labels, strict=True)
                  if y == c)
        neg = sum(math.exp(_cos(f, bank[c]) / tau) for f, y in zip(feats, labels, strict=True)
                  if y >= 0 and y != c)
        if not with_pos and neg == 0:
            continue
        terms.append(-math.log(pos / (pos + neg if with_pos else neg)))
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scr_contrastive_matches_per_class_loop(with_pos: bool, reduction: str) -> None:
    feats, labels, bank = _data()
    got = scr_contrastive(feats, labels, bank, tau=0.5, reduction=reduction,
                          positives_in_denominator=with_pos)
    assert got.item() == pytest.approx(_scr_loop(feats, labels, bank, 0.5, with_pos, reduction),
                                       rel=1e-5)


def test_scr_contrastive_ignores_and_handles_degenerate_batches() -> None:
    feats, labels, bank = _data()
    base = scr_contrastive(feats, labels, bank)
    extra = torch.cat([feats, 100 * torch.randn(5, D)])
    assert scr_contrastive(extra, torch.cat([labels, torch.full((5,), -1)]), bank).item() == \
        pytest.approx(base.item(), rel=1e-6)
    # one class only: no negatives, loss 0 (and the literal Eq. 1 skips it)
    one = torch.zeros(4, dtype=torch.long)
    assert scr_contrastive(feats[:4], one, bank).item() == pytest.approx(0.0, abs=1e-6)
    f = feats[:4].clone().requires_grad_()
    scr_contrastive(f, one, bank, positives_in_denominator=False).backward()
    assert torch.isfinite(f.grad).all()
    f = feats[:4].clone().requires_grad_()
    scr_contrastive(f, torch.full((4,), -1), bank).backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_scr_cross_entropy_matches_per_point_loop() -> None:
    feats, labels, bank = _data()
    for scale in (LOGIT_SCALE, None):
        expected = []
        for f, y in zip(feats, labels, strict=True):
            if y < 0:
                continue
            if scale is None:
                logits = torch.stack([f @ t / t.norm() for t in bank])
            else:
                logits = torch.tensor([scale * _cos(f, t) for t in bank])
            expected.append(-torch.log_softmax(logits, 0)[y].item())
        got = scr_cross_entropy(feats, labels, bank, logit_scale=scale)
        assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


# --------------------------------------------------------------------------------------------- SSR


def _ssr_loop(p, x, cells, labels, bank, lam, cap, form) -> float:
    by_cell: dict[int, list[int]] = {}
    for i, (c, y) in enumerate(zip(cells.tolist(), labels.tolist(), strict=True)):
        if c >= 0 and y >= 0:
            by_cell.setdefault(c, []).append(i)
    losses = []
    for members in by_cell.values():
        t = bank[labels[members[0]]] / bank[labels[members[0]]].norm()
        if form == "code":
            members = members[:cap]
        vecs = [p[i] for i in members]
        if form == "paper" and x is not None:
            vecs += [x[i] for i in members]
        weights = [math.exp(float(v @ t) / lam) for v in vecs]
        centre = sum(w * v for w, v in zip(weights, vecs, strict=True)) / sum(weights)
        cell_losses = [1 - 1 / (1 + math.exp(-float(centre @ p[i]))) for i in members]
        if form == "code":
            cell_losses += [0.5] * (cap - len(members))
        losses += cell_losses
    return sum(losses) / len(losses)


@pytest.mark.parametrize("form,with_pixels", [("paper", True), ("paper", False), ("code", False),
                                              ("code", True)])
def test_ssr_matches_per_cell_loop(form: str, with_pixels: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n = 60
    p = 0.5 * torch.randn(n, D, generator=g)
    x = 0.5 * torch.randn(n, D, generator=g) if with_pixels else None
    cells = torch.randint(-1, 5, (n,), generator=g) * 7  # sparse, non-dense ids; -7 = none
    cells[cells < 0] = -1
    cells[:12] = 14  # one cell with 12 points: the code form keeps the first 3 valid
    labels = torch.randint(-1, C, (n,), generator=g)
    bank = torch.randn(C, D, generator=g)
    for lam in (1.0, 0.5):
        got = ssr_loss(p, x, cells, labels, bank, lam=lam, max_per_cell=3, form=form)
        assert got.item() == pytest.approx(_ssr_loop(p, x, cells, labels, bank, lam, 3, form),
                                           rel=1e-5)


def test_ssr_default_cap_pads_with_half_and_gradients_flow() -> None:
    p = torch.zeros(3, D, requires_grad=True)  # <f, p> = 0 → every slot 0.5
    cells = torch.tensor([0, 0, 1])
    labels = torch.tensor([1, 2, 0])
    bank = torch.eye(C, D)
    assert ssr_loss(p, None, cells, labels, bank, form="code").item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(20, D, generator=g, requires_grad=True)
    pix = torch.randn(20, D, generator=g, requires_grad=True)
    cells = torch.randint(0, 3, (20,), generator=g)
    labels = torch.randint(0, C, (20,), generator=g)
    loss = ssr_loss(feats, pix, cells, labels, bank, form="paper")
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert torch.isfinite(pix.grad).all() and pix.grad.abs().sum() > 0
    # nothing valid: zero loss, zero gradient
    f = torch.randn(4, D, requires_grad=True)
    ssr_loss(f, None, torch.full((4,), -1), torch.zeros(4, dtype=torch.long), bank).backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    with pytest.raises(ValueError, match="form"):
        ssr_loss(feats, None, cells, labels, bank, form="other")  # type: ignore[arg-type]


def test_grid_cells() -> None:
    xyz = torch.tensor([[0.01, 0.02, 0.03], [0.09, 0.05, 0.0], [0.11, 0.0, 0.0],
                        [0.01, 0.02, 0.03], [float("nan"), 0.0, 0.0], [-0.01, 0.0, 0.0]])
    batch = torch.tensor([0, 0, 0, 1, 0, 0])
    cells = grid_cells(xyz, batch, cell=0.1)
    assert cells[0] == cells[1]
    assert len({int(cells[i]) for i in (0, 2, 3, 5)}) == 4
    assert cells[4] == -1
    assert sorted(int(c) for c in cells if c >= 0) == [0, 1, 1, 2, 3]  # dense ids 0..M-1


# ---------------------------------------------------------------------------------------------- S3


def _s3_inputs(n: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher = torch.zeros(n, dtype=torch.long)
    teacher[-3:] = -1  # in view but no teacher label
    logits = torch.zeros(n, C)
    logits[:, 2] = 5.0  # the student always says 2, confidently
    logits[:5, 2] = 0.0  # ... except for the first 5 (uniform)
    in_view = torch.ones(n, dtype=torch.bool)
    in_view[:10] = False
    return teacher, logits, in_view


def test_s3_never_switches_before_start_epoch() -> None:
    teacher, logits, in_view = _s3_inputs()
    s3 = SwitchableSelfTraining(start_epoch=3, probability=1.0, per="point", seed=1,
                                rest_threshold=0.0)
    expected = torch.where(in_view & (teacher >= 0), teacher, -1)
    for epoch in range(3):
        for _ in range(20):
            assert torch.equal(s3.targets(epoch, teacher, logits, in_view), expected)
    out = s3.targets(3, teacher, logits, in_view)
    assert (out[10:-3] == 2).all() and (out[-3:] == -1).all()  # switched, unlabelled untouched


@pytest.mark.parametrize("per", ["batch", "point"])
@pytest.mark.parametrize("prob", [0.5, 0.2])
def test_s3_switch_probability(per: str, prob: float) -> None:
    teacher, logits, in_view = _s3_inputs()
    s3 = SwitchableSelfTraining(start_epoch=0, probability=prob, per=per, seed=7)
    paired = in_view & (teacher >= 0)
    fractions = []
    for _ in range(2000):
        out = s3.targets(5, teacher, logits, in_view)
        switched = (out[paired] == 2).float()
        if per == "batch":
            assert switched.min() == switched.max()  # all or nothing
        fractions.append(switched.mean().item())
        assert fractions[-1] == pytest.approx(s3.last_switch_fraction)
        assert (out[~in_view] == -1).all()  # rest self-training is off by default
    assert sum(fractions) / len(fractions) == pytest.approx(prob, abs=0.035)


def test_s3_is_deterministic_and_resumes_exactly() -> None:
    teacher, logits, in_view = _s3_inputs()

    def run(s3: SwitchableSelfTraining, steps: int) -> list[torch.Tensor]:
        return [s3.targets(1, teacher, logits, in_view) for _ in range(steps)]

    a = SwitchableSelfTraining(start_epoch=0, per="point", seed=11)
    b = SwitchableSelfTraining(start_epoch=0, per="point", seed=11)
    first = run(a, 30)
    assert all(torch.equal(u, v) for u, v in zip(first, run(b, 30), strict=True))
    assert not all(torch.equal(u, first[0]) for u in first)
    state = a.state_dict()
    cont = run(a, 20)
    resumed = SwitchableSelfTraining(seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(cont, run(resumed, 20), strict=True))
    other = run(SwitchableSelfTraining(start_epoch=0, per="point", seed=12), 30)
    assert not all(torch.equal(u, v) for u, v in zip(first, other, strict=True))


def test_s3_confident_rest_points() -> None:
    teacher, logits, in_view = _s3_inputs()
    s3 = SwitchableSelfTraining(start_epoch=0, probability=0.0, rest_threshold=0.9)
    out = s3.targets(0, teacher, logits, in_view)
    assert (out[:5] == -1).all() and (out[5:10] == 2).all()  # only the confident ones
    assert torch.equal(out[10:], torch.where(teacher[10:] >= 0, teacher[10:], -1))


def test_s3_min_confidence_switches_only_sure_points() -> None:
    teacher, logits, in_view = _s3_inputs()
    logits[10:20, 2] = 0.5  # paired, leaning to 2 but unsure
    s3 = SwitchableSelfTraining(start_epoch=0, probability=1.0, per="point",
                                min_confidence=0.9)
    out = s3.targets(0, teacher, logits, in_view)
    assert torch.equal(out[10:20], teacher[10:20])  # unsure: the teacher's label stays
    assert (out[20:-3] == 2).all() and (out[-3:] == -1).all()
    assert s3.last_switch_fraction == pytest.approx(27 / 37)
    resumed = SwitchableSelfTraining()
    resumed.load_state_dict(s3.state_dict())
    assert resumed.min_confidence == 0.9
    plain = SwitchableSelfTraining(start_epoch=0, probability=1.0, per="point")
    assert (plain.targets(0, teacher, logits, in_view)[10:-3] == 2).all()


# ------------------------------------------------------------------------------------- baselines


def test_kl_distillation() -> None:
    s, _, _ = _data()
    s = s[:, :C].clone().requires_grad_()
    assert kl_distillation(s, s.detach().clone(), temperature=2.0).item() == \
        pytest.approx(0.0, abs=1e-6)
    t = torch.randn_like(s)
    for temp in (1.0, 3.0):
        pt = torch.softmax(t / temp, 1)
        ps = torch.softmax(s.detach() / temp, 1)
        expected = (pt * (pt / ps).log()).sum(1).mean().item() * temp**2
        assert kl_distillation(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    kl_distillation(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_ppkt_infonce() -> None:
    g = torch.Generator().manual_seed(5)
    p = torch.randn(40, D, generator=g, requires_grad=True)
    same = ppkt_infonce(p, p.detach().clone(), tau=0.07)
    noisy = ppkt_infonce(p, p.detach() + 0.5 * torch.randn(40, D, generator=g), tau=0.07)
    shuffled = ppkt_infonce(p, p.detach()[torch.randperm(40, generator=g)], tau=0.07)
    assert same.item() < noisy.item() < shuffled.item()
    # subset: exactly the pairs of the seeded permutation, positives on the diagonal
    x = torch.randn(40, D, generator=g)
    got = ppkt_infonce(p, x, tau=0.1, num_pairs=8, generator=torch.Generator().manual_seed(2))
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:8]
    q, k = F.normalize(p[pick], dim=1), F.normalize(x[pick], dim=1)
    expected = sum(-torch.log_softmax(q[i] @ k.T / 0.1, 0)[i] for i in range(8)) / 8
    assert got.item() == pytest.approx(float(expected.detach()), rel=1e-5)
    got.backward()
    assert torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------------- fine-tuning


def _lovasz_naive(probs: torch.Tensor, labels: torch.Tensor, classes=None) -> float:
    """Berman et al. from the definition: Lovász extension of Δ_J(M) = |M| / |F ∪ M|."""
    losses = []
    for c in sorted(set(labels.tolist())) if classes is None else classes:
        fg = {i for i, y in enumerate(labels.tolist()) if y == c}
        errors = [abs((1.0 if i in fg else 0.0) - float(probs[i, c])) for i in range(len(labels))]
        order = sorted(range(len(errors)), key=lambda i: -errors[i])

        def jaccard(m: set[int], fg: set[int] = fg) -> float:
            return len(m) / len(fg | m) if m else 0.0

        total, prefix = 0.0, set()
        for i in order:
            before = jaccard(prefix)
            prefix.add(i)
            total += errors[i] * (jaccard(prefix) - before)
        losses.append(total)
    return sum(losses) / len(losses)


def test_lovasz_matches_definition_and_is_zero_when_perfect() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(25, C, generator=g)
    labels = torch.randint(-1, C - 1, (25,), generator=g)
    probs = torch.softmax(logits, 1)
    valid = labels >= 0
    got = lovasz_softmax(probs, labels)
    assert got.item() == pytest.approx(_lovasz_naive(probs[valid], labels[valid]), rel=1e-5)
    perfect = F.one_hot(labels.clamp(min=0), C).float()
    assert lovasz_softmax(perfect, labels).item() == pytest.approx(0.0, abs=1e-7)
    # "all" also averages the absent class C-1; a list picks classes
    every = _lovasz_naive(probs[valid], labels[valid], range(C))
    assert lovasz_softmax(probs, labels, classes="all").item() == pytest.approx(every, rel=1e-5)
    assert lovasz_softmax(probs, labels, classes=[0]).item() == pytest.approx(
        _lovasz_naive(probs[valid], labels[valid], [0]), rel=1e-5)
    # ignored points change nothing
    noisy = probs.clone()
    noisy[~valid] = torch.softmax(torch.randn(int((~valid).sum()), C), 1)
    assert lovasz_softmax(noisy, labels).item() == pytest.approx(got.item(), rel=1e-6)


def test_supervised_loss_is_ce_plus_lovasz_and_honours_ignore() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(30, C, generator=g, requires_grad=True)
    labels = torch.randint(0, C, (30,), generator=g)
    labels[:6] = 0
    got = supervised_loss(logits, labels, ignore_index=0, lovasz_weight=0.5)
    keep = labels != 0
    ce = F.cross_entropy(logits[keep], labels[keep])
    lov = _lovasz_naive(torch.softmax(logits[keep], 1).detach(), labels[keep])
    assert got.item() == pytest.approx(ce.item() + 0.5 * lov, rel=1e-5)
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[~keep].abs().sum() == 0
    assert supervised_loss(logits, torch.zeros(30, dtype=torch.long), ignore_index=0).item() == 0



def test_inverse_sqrt_class_weights_lift_rare_classes() -> None:
    labels = torch.tensor([1] * 64 + [2] * 4 + [0] * 5)
    w = inverse_sqrt_frequency(labels, 4, ignore_index=0)
    # 1/sqrt(64) and 1/sqrt(4), scaled to mean 1 over the present classes; absent classes 0
    raw = torch.tensor([0.0, 1 / 8, 1 / 2, 0.0])
    assert torch.allclose(w, raw / raw[1:3].mean())
    assert inverse_sqrt_frequency(torch.zeros(3, dtype=torch.long), 4, 0).sum() == 0

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(labels), 4, generator=g)
    got = supervised_loss(logits, labels, ignore_index=0, lovasz_weight=0,
                          class_weighting="inverse_sqrt")
    assert got.item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=w, ignore_index=0).item(), rel=1e-6)
    assert got.item() != pytest.approx(
        supervised_loss(logits, labels, ignore_index=0, lovasz_weight=0).item(), rel=1e-3)
    with pytest.raises(ValueError, match="class_weighting"):
        supervised_loss(logits, labels, class_weighting="inverse")

# --------------------------------------------------------------------------------------- combine


def test_build_loss_combines_weights() -> None:
    feats, labels, bank = _data()
    g = torch.Generator().manual_seed(1)
    local = torch.randn(30, D, generator=g, requires_grad=True)
    cells = torch.randint(0, 4, (30,), generator=g)
    batch = {"global_feats": feats, "local_feats": local, "labels": labels, "text_bank": bank,
             "cell_index": cells}
    loss = build_loss({"scr": {"form": "contrastive", "tau": 0.5, "weight": 2.0},
                       "ssr": {"form": "code", "lam": 1.0, "weight": 0.5},
                       "kl": {"weight": 0.0}})
    total, parts = loss(batch)
    scr = scr_contrastive(feats, labels, bank, tau=0.5)
    ssr = ssr_loss(local, None, cells, labels, bank, form="code")
    assert set(parts) == {"scr", "ssr"}  # zero weight: not computed
    assert parts["scr"].item() == pytest.approx(scr.item())
    assert parts["ssr"].item() == pytest.approx(ssr.item())
    assert total.item() == pytest.approx(2 * scr.item() + 0.5 * ssr.item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(local.grad).all()

    ce = build_loss({"scr": {"form": "cross_entropy", "logit_scale": None},
                     "ppkt": {"seed": 3, "num_pairs": 8, "weight": 0.1,
                              "inputs": {"point_feats": "global_feats",
                                         "pixel_feats": "local_feats"}}})
    total, parts = ce(batch)
    assert parts["scr"].item() == pytest.approx(
        scr_cross_entropy(feats, labels, bank, logit_scale=None).item())
    assert total.item() == pytest.approx(parts["scr"].item() + 0.1 * parts["ppkt"].item())
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss({"nope": {}})
    with pytest.raises(ValueError, match="no option"):
        build_loss({"scr": {"form": "contrastive", "lam": 1.0}})
    with pytest.raises(ValueError, match="form"):
        build_loss({"scr": {"form": "dice"}})
    with pytest.raises(KeyError, match="teacher_logits"):
        build_loss({"kl": {}})({"logits": feats})


def test_scr_cross_entropy_class_weighting_by_hand() -> None:
    """inverse_sqrt: class c weighs 1/sqrt(n_c), normalised to mean 1 over present classes."""
    torch.manual_seed(0)
    feats = torch.randn(7, 6)
    bank = F.normalize(torch.randn(4, 6), dim=-1)
    labels = torch.tensor([0, 0, 0, 0, 2, -1, 2])  # n_0 = 4, n_2 = 2, classes 1 and 3 absent
    raw = 1 / torch.tensor([2.0, math.sqrt(2.0)])
    w = torch.zeros(4)
    w[[0, 2]] = raw / raw.mean()
    logits = feats @ bank.T
    keep = labels >= 0
    per_point = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    want = (per_point * w[labels[keep]]).sum() / w[labels[keep]].sum()
    got = scr_cross_entropy(feats, labels, bank, logit_scale=None, class_weighting="inverse_sqrt")
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    plain = scr_cross_entropy(feats, labels, bank, logit_scale=None)
    assert plain.item() == pytest.approx(per_point.mean().item(), rel=1e-6)
    assert abs(got.item() - plain.item()) > 1e-3
    with pytest.raises(ValueError, match="class_weighting"):
        scr_cross_entropy(feats, labels, bank, class_weighting="inverse")
