"""MPER: copy-paste ops, multi-prototype classifier, momentum update, k-means init, method and trainer stages."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nnunet_proto.methods.mper import MPER, MixedBatch, MixGroup, MPERConfig, MPERStepInputs
from nnunet_proto.ops.copy_paste import (
    box_size,
    paste,
    random_box_mask,
    region_ce_dice,
    resize_labels,
)
from nnunet_proto.ops.kmeans import ClassReservoir, kmeans_bank
from nnunet_proto.ops.multi_prototype import (
    cluster_statistics,
    momentum_update,
    multi_prototype_logits,
    multi_prototype_similarity,
    nearest_prototype_infonce,
    update_bank,
)
from nnunet_proto.training.progress import partial_collapse_keys


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _method(dims=2, num_classes=3, embed_dim=4, **changes):
    m = MPER(MPERConfig(**changes))
    m.setup(num_classes, embed_dim, dims)
    return m


# ---------------------------------------------------------------------------------------------- copy-paste
def test_box_size_is_two_thirds_of_the_patch_like_bcp():
    assert box_size((112, 112, 80)) == (74, 74, 53)  # LA
    assert box_size((256, 256)) == (170, 170)  # ACDC
    assert box_size((4, 32, 32)) == (2, 21, 21)  # tiny nnU-Net 3d_fullres plan
    assert box_size((81,)) == (54,)  # exact multiple is not lost to float error
    with pytest.raises(ValueError, match="box fraction"):
        box_size((32, 32), 1.0)


@pytest.mark.parametrize("patch", [(9, 12), (5, 9, 12)])
def test_random_box_mask_is_one_box_replayed_from_a_seed(patch):
    size = box_size(patch)
    m1 = random_box_mask(patch, generator=_gen(3))
    m2 = random_box_mask(patch, generator=_gen(3))
    torch.testing.assert_close(m1, m2)
    assert m1.shape == (1, 1, *patch)
    zeros = (m1[0, 0] == 0).nonzero()
    assert zeros.shape[0] == math.prod(size)  # exactly one box of that size
    extent = tuple(int(e) for e in zeros.max(0).values - zeros.min(0).values + 1)
    assert extent == size
    corners = {tuple((random_box_mask(patch, generator=_gen(s))[0, 0] == 0).nonzero().min(0).values.tolist())
               for s in range(20)}
    assert len(corners) > 1


def test_box_positions_cover_the_whole_range():
    starts = set()
    for s in range(200):
        m = random_box_mask((4, 6), fraction=0.5, generator=_gen(s))  # box 2 x 3: starts 0..2 and 0..3
        starts.add(tuple((m[0, 0] == 0).nonzero().min(0).values.tolist()))
    assert starts == {(i, j) for i in range(3) for j in range(4)}


def _encoded(b, spatial, num_classes, offset, seed):
    """Labels and images whose value encodes (source image, label): image = 10·(i + offset) + label."""
    labels = torch.randint(0, num_classes, (b, 1, *spatial), generator=_gen(seed))
    source = torch.arange(b).view(b, *([1] * (len(spatial) + 1))) + offset
    images = (10.0 * source + labels).expand(b, 2, *spatial).clone()  # two input channels
    return images, labels


def _ds_targets(labels):
    return [labels, resize_labels(labels, [max(1, s // 2) for s in labels.shape[2:]])]


@pytest.mark.parametrize("spatial", [(8, 10), (4, 8, 10)])
def test_stage_one_copy_paste_moves_image_and_target_together(spatial):
    b, c = 3, 3  # odd batch: every patch is paired with its neighbour
    m = _method(len(spatial), c)
    data, labels = _encoded(b, spatial, c, 0, seed=1)
    targets = _ds_targets(labels)
    batch = m.make_batch(data, targets, generator=_gen(7))
    replay = m.make_batch(data, targets, generator=_gen(7))
    torch.testing.assert_close(batch.images, replay.images)
    assert all(torch.equal(a, r) for a, r in zip(batch.targets, replay.targets))

    mask = random_box_mask(spatial, generator=_gen(7))[0, 0].bool()
    src = torch.div(batch.images[:, 0], 10, rounding_mode="floor").long()
    lab = (batch.images[:, 0] - 10 * src).long()
    assert torch.equal(lab, batch.targets[0][:, 0].long())  # image and label moved together
    for i in range(b):
        assert (src[i][mask] == i).all() and (src[i][~mask] == (i + 1) % b).all()
    # lower deep-supervision scale: the loader's lower-scale labels mixed with the nearest-resized box
    assert torch.equal(batch.targets[1], resize_labels(batch.targets[0], targets[1].shape[2:]))
    assert batch.groups == (MixGroup(0, b, 1.0, 1.0),)
    assert not batch.from_pseudo.any() and (batch.confidence == 1).all()


@pytest.mark.parametrize("spatial", [(8, 10), (4, 8, 10)])
def test_stage_two_bidirectional_copy_paste_targets_and_weights(spatial):
    b, c = 3, 3
    m = _method(len(spatial), c, pseudo_label_threshold=0.0)  # BCP: ungated argmax
    m.stage = 2
    data_l, labels = _encoded(b, spatial, c, 0, seed=1)
    data_u, hidden = _encoded(b, spatial, c, 5, seed=2)  # hidden: what the teacher predicts
    conf_level = torch.rand((b, 1, *spatial), generator=_gen(4)) * 0.5 + 0.45
    probs = F.one_hot(hidden[:, 0], c).movedim(-1, 1) * conf_level + (1 - conf_level) / 2 * (
        1 - F.one_hot(hidden[:, 0], c).movedim(-1, 1))
    t_logits = probs.log()
    batch = m.make_batch(data_l, _ds_targets(labels), data_u, t_logits, generator=_gen(9))
    mask = random_box_mask(spatial, generator=_gen(9))[0, 0].bool()

    assert batch.images.shape[0] == 2 * b
    src = torch.div(batch.images[:, 0], 10, rounding_mode="floor").long()
    lab = (batch.images[:, 0] - 10 * src).long()
    assert torch.equal(lab, batch.targets[0][:, 0].long())  # GT and pseudo labels follow their pixels
    for i in range(b):
        # X_in: labeled context i, unlabeled box i; X_out: unlabeled context i, labeled box (i+1) mod B
        assert (src[i][mask] == i).all() and (src[i][~mask] == 5 + i).all()
        assert (src[b + i][mask] == 5 + i).all() and (src[b + i][~mask] == (i + 1) % b).all()
        assert torch.equal(batch.from_pseudo[i, 0], ~mask) and torch.equal(batch.from_pseudo[b + i, 0], mask)
        torch.testing.assert_close(batch.confidence[i, 0][~mask], conf_level[i, 0][~mask])
        torch.testing.assert_close(batch.confidence[b + i, 0][mask], conf_level[i, 0][mask])
        assert (batch.confidence[i, 0][mask] == 1).all()
    assert torch.equal(batch.targets[1], resize_labels(batch.targets[0], batch.targets[1].shape[2:]))
    assert batch.groups == (MixGroup(0, b, 1.0, 0.5), MixGroup(b, 2 * b, 0.5, 1.0))

    with pytest.raises(ValueError, match="one to one"):
        m.make_batch(data_l, [labels], data_u[:2], t_logits[:2])


def _manual_region_loss(logits, target, region, c, ignore, smooth=1e-5):
    """Independent BCP mix-loss reference: masked-mean CE + per-image per-class masked Dice."""
    t = target[:, 0]
    valid = (t != ignore).float() * region.expand_as(target)[:, 0].float()
    ce = F.cross_entropy(logits, t.clamp(max=c - 1), reduction="none")
    ce = (ce * valid).sum() / valid.sum().clamp_min(1)
    p = logits.softmax(1)
    y = F.one_hot(t.clamp(max=c - 1), c).movedim(-1, 1).float()
    dims = tuple(range(2, logits.dim()))
    inter = (p * y * valid[:, None]).sum(dims)
    union = ((p + y) * valid[:, None]).sum(dims)
    return ce + 1 - ((2 * inter + smooth) / (union + smooth)).mean()


def test_mixed_region_loss_weights_regions_and_drops_ignore_label():
    c, ignore, b = 3, 3, 2
    m = _method(2, c, dice_include_background=True, dice_present_only=False)  # BCP's mix loss
    logits = torch.randn(2 * b, c, 6, 7, generator=_gen(0), requires_grad=True)
    target = torch.randint(0, c, (2 * b, 1, 6, 7), generator=_gen(1))
    target[:, :, 0, :3] = ignore
    mask = random_box_mask((6, 7), generator=_gen(2))

    def loss(u):
        groups = (MixGroup(0, b, 1.0, u), MixGroup(b, 2 * b, u, 1.0))
        return m.mixed_region_loss(logits, target, mask, groups, ignore)

    expected = sum(w * _manual_region_loss(logits[s], target[s], r, c, ignore)
                   for s, pairs in ((slice(0, b), ((mask, 1.0), (1 - mask, 0.5))),
                                    (slice(b, 2 * b), ((mask, 0.5), (1 - mask, 1.0))))
                   for r, w in pairs)
    torch.testing.assert_close(loss(0.5), expected)
    # linear in the pseudo-label weight: the pseudo-labeled regions enter with exactly 0.5
    torch.testing.assert_close(loss(0.5) - loss(0.0), 0.5 * (loss(1.0) - loss(0.0)))
    (g,) = torch.autograd.grad(loss(0.5), logits)
    assert (g[:, :, 0, :3] == 0).all() and g.abs().sum() > 0  # ignore-label voxels: weight 0


def test_region_losses_are_zero_and_finite_for_empty_regions():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4))
    empty = torch.zeros(1, 1, 4, 4)
    out = region_ce_dice(logits, target, [(empty, 1.0)])
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(logits.grad).all()
    all_ignored = region_ce_dice(logits, torch.full_like(target, 9), [(torch.ones(1, 1, 4, 4), 1.0)], ignore_index=9)
    assert all_ignored.item() == 0.0
    # one region, compared with PyTorch's cross-entropy and a per-image, per-class Dice
    whole = region_ce_dice(logits, target, [(torch.ones(1, 1, 4, 4), 2.0)])
    torch.testing.assert_close(whole, 2.0 * _manual_region_loss(logits, target, torch.ones(1, 1, 4, 4), 3, 99))


def test_paste_copies_integer_labels():
    a = torch.zeros(2, 1, 3, 3, dtype=torch.int16)
    b = torch.full((2, 1, 3, 3), 7, dtype=torch.int16)
    m = torch.ones(1, 1, 3, 3)
    m[..., 1, 1] = 0
    out = paste(a, b, m)
    assert out.dtype == torch.int16 and out[0, 0, 1, 1] == 7 and out.sum() == 14


# ---------------------------------------------------------------------------------------------- prototypes
def _bank():
    e = torch.eye(3)
    class0 = torch.stack([e[0], e[1], 5 * (e[0] + e[1]) / math.sqrt(2)])
    class1 = torch.stack([e[2], -e[0], -e[1]])
    return torch.stack([class0, class1])  # (C=2, K=3, D=3)


@pytest.mark.parametrize("spatial", [(1, 2), (1, 1, 2)])
def test_multi_prototype_classifier_on_hand_built_embeddings(spatial):
    bank = _bank()
    z = torch.stack([torch.tensor([0.0, 1.0, 0.0]), 3 * torch.tensor([1.0, 1.0, 0.0])], dim=1)  # (D, 2 voxels)
    z = z.reshape(1, 3, *spatial)
    sim = multi_prototype_similarity(z, bank)
    assert sim.shape == (1, 2, 3, *spatial) and sim.dtype == torch.float32
    logits, k_star = multi_prototype_logits(sim, tau=0.1)
    logits, k_star = logits.reshape(2, 2), k_star.reshape(2, 2)  # (class, voxel)
    # voxel 0 = e1: class 0 best at k=1 (cos 1), class 1 best cos 0 -> logits (10, 0)
    # voxel 1 = e0 + e1: class 0 best at k=2 (cos 1), class 1 at k=0 (cos 0) -> (10, 0)
    torch.testing.assert_close(logits, torch.tensor([[10.0, 10.0], [0.0, 0.0]]))
    assert k_star[0].tolist() == [1, 2] and k_star[1].tolist() == [0, 0]
    # scale of the prototype does not matter (cosine), and the prediction is the class of the best prototype
    assert logits.argmax(0).tolist() == [0, 0]


def test_nearest_prototype_infonce_analytic_value_ignore_modes_and_gradient():
    bank = torch.cat([torch.eye(3)[None], -torch.eye(3)[None]])  # class 0: e0..e2, class 1: -e0..-e2
    z = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    sim = multi_prototype_similarity(z, bank)
    for tau in (0.1, 1.0):  # positive logit 1/τ, four at 0, one at -1/τ
        expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 4 + math.exp(-1 / tau)))
        assert nearest_prototype_infonce(sim, tau).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # z's nearest prototype is (class 0, k 0): the code's ignore_index=0 and "background" both drop it
    assert nearest_prototype_infonce(sim, 0.1, ignore="index0").item() == 0.0
    assert nearest_prototype_infonce(sim, 0.1, ignore="background").item() == 0.0
    z2 = torch.tensor([0.0, -1.0, 0.1]).view(1, 3, 1, 1)  # nearest: (class 1, k 1) -> kept by every mode
    sim2 = multi_prototype_similarity(z2, bank)
    assert nearest_prototype_infonce(sim2, 0.1, ignore="background") > 0
    assert nearest_prototype_infonce(sim2, 0.1, keep=torch.zeros(1, 1, 1, 1, dtype=torch.bool)).item() == 0.0
    zg = torch.randn(2, 3, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(nearest_prototype_infonce(multi_prototype_similarity(zg, bank), 0.1), zg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_class_restricted_infonce_positive_is_the_nearest_prototype_of_the_voxels_class():
    bank = torch.cat([torch.eye(3)[None], -torch.eye(3)[None]])  # class 0: e0..e2, class 1: -e0..-e2
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.8, 0.6]]).T.reshape(1, 3, 1, 2)
    sim = multi_prototype_similarity(z, bank)
    tau = 0.1
    # voxel 0 (= e0) labelled class 1: positive = nearest class-1 prototype; cos(e0, -e0) = -1 is the lowest,
    # -e1 and -e2 have cos 0 -> the positive is (1, 1) (first maximum), logit 0
    denom0 = math.exp(10) + 4 + math.exp(-10)
    expected0 = -math.log(1 / denom0)
    labels = torch.tensor([1, 1]).view(1, 1, 1, 2)
    keep0 = torch.tensor([True, False]).view(1, 1, 1, 2)
    got = nearest_prototype_infonce(sim, tau, keep0, labels=labels)
    assert got.item() == pytest.approx(expected0, rel=1e-5)
    # the paper's positive for the same voxel is (0, 0), whatever its label: a much smaller loss
    assert nearest_prototype_infonce(sim, tau, keep0).item() == pytest.approx(-math.log(math.exp(10) / denom0),
                                                                               rel=1e-4, abs=1e-6)
    # with its own class as label the two rules agree
    same = torch.tensor([0, 0]).view(1, 1, 1, 2)
    torch.testing.assert_close(nearest_prototype_infonce(sim, tau, labels=same), nearest_prototype_infonce(sim, tau))
    # labels outside [0, C) (ignore label, gated-out pseudo label) take no part
    assert nearest_prototype_infonce(sim, tau, labels=torch.full((1, 1, 1, 2), -1)).item() == 0.0
    # the gradient moves voxel 0 towards its class's prototype -e1 (descent lowers its e1 component); the
    # paper's positive e0 is already matched, so it gives that voxel (almost) no gradient
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nearest_prototype_infonce(multi_prototype_similarity(zg, bank), tau, keep0,
                                                         labels=labels), zg)
    (g_any,) = torch.autograd.grad(nearest_prototype_infonce(multi_prototype_similarity(zg, bank), tau, keep0), zg)
    assert g[0, 1, 0, 0] > 1.0 and g_any[:, :, 0, 0].abs().max() < 1e-3
    with pytest.raises(ValueError, match="labels"):
        nearest_prototype_infonce(sim, tau, labels=torch.zeros(1, 1, 2, 2, dtype=torch.long))


def test_region_dice_over_present_foreground_classes():
    """present_only: absent classes get no Dice term; BCP's form adds a near-constant 1 per absent class."""
    c = 3
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]).view(2, 1, 1, 4)  # class 2 absent everywhere
    logits = torch.randn(2, c, 1, 4, generator=_gen(3), requires_grad=True)
    region = torch.ones(1, 1, 1, 4)
    present = region_ce_dice(logits, target, [(region, 1.0)], include_background=False, present_only=True)
    p = logits.softmax(1)
    y1 = (target[:, 0] == 1).float()
    d1 = (2 * (p[:, 1] * y1).sum((1, 2)) + 1e-5) / ((p[:, 1] + y1).sum((1, 2)) + 1e-5)  # (B,)
    ce = F.cross_entropy(logits, target[:, 0])
    torch.testing.assert_close(present, ce + (1 - d1).mean())
    # BCP's form over the foreground: the absent class 2 has Dice ≈ 0 (smooth / (Σp + smooth)), so it adds
    # ~1 per image to the mean and halves the weight of class 1's Dice gradient (dilution)
    fg_all = region_ce_dice(logits, target, [(region, 1.0)], include_background=False)
    torch.testing.assert_close(fg_all, ce + (1 - torch.stack([d1, torch.zeros_like(d1)], 1)).mean(), atol=1e-4,
                               rtol=1e-4)
    dice_part = {name: torch.autograd.grad(loss - ce, logits, retain_graph=True)[0][:, 1]
                 for name, loss in (("present", present), ("all", fg_all))}
    torch.testing.assert_close(dice_part["all"], dice_part["present"] / 2, atol=1e-4, rtol=1e-3)
    # no foreground present in a region: only the CE remains
    bg = torch.zeros_like(target)
    torch.testing.assert_close(region_ce_dice(logits, bg, [(region, 1.0)], include_background=False,
                                              present_only=True), F.cross_entropy(logits, bg[:, 0]))


def test_gated_pseudo_labels_take_part_in_no_loss_and_no_update():
    b, c, spatial = 2, 3, (6, 8)
    m = _method(2, c, 4, pseudo_label_threshold=0.9)
    m.stage = 2
    data_l, labels = _encoded(b, spatial, c, 0, seed=1)
    t_logits = torch.zeros(b, c, *spatial)
    t_logits[:, 1, :, :4] = 8.0  # left half: confident class 1 (p ≈ 0.999); right half uniform (p = 1/3)
    batch = m.make_batch(data_l, _ds_targets(labels), torch.randn_like(data_l), t_logits, generator=_gen(2))
    mixed = batch.targets[0]
    unsure = batch.from_pseudo & (torch.arange(spatial[1]) >= 4).view(1, 1, 1, -1)
    assert (mixed[unsure] == -1).all() and unsure.any()
    assert (mixed[batch.from_pseudo & ~unsure] == 1).all()
    assert (mixed[~batch.from_pseudo] >= 0).all()  # ground truth untouched
    assert torch.equal(batch.targets[1], resize_labels(mixed, batch.targets[1].shape[2:]))  # gate at every scale
    # the gated voxels carry no gradient in the linear loss and no weight in the update
    logits = torch.randn(2 * b, c, *spatial, requires_grad=True)
    (g,) = torch.autograd.grad(m.mixed_region_loss(logits, mixed, batch.box_masks[0], batch.groups, None), logits)
    assert (g.movedim(1, -1)[unsure[:, 0]] == 0).all() and g.abs().sum() > 0
    # paper/BCP: ungated, every pseudo-labeled voxel keeps its argmax
    open_ = _method(2, c, 4, pseudo_label_threshold=0.0)
    open_.stage = 2
    ungated = open_.make_batch(data_l, _ds_targets(labels), torch.randn_like(data_l), t_logits, generator=_gen(2))
    assert (ungated.targets[0] >= 0).all()


def test_largest_component_switch_applies_to_mper_pseudo_labels():
    b, c, spatial = 2, 3, (10, 10)
    data_l, labels = _encoded(b, spatial, c, 0, seed=1)
    t_logits = torch.zeros(b, c, *spatial)
    t_logits[:, 0] = 8.0
    t_logits[:, 0, 1:5, 1:5], t_logits[:, 2, 1:5, 1:5] = 0.0, 8.0
    t_logits[:, 0, 8, 8], t_logits[:, 2, 8, 8] = 0.0, 8.0  # island of class 2
    data_u = torch.randn_like(data_l)
    out = []
    for on in (False, True):
        m = _method(2, c, 4, pseudo_label_largest_component=on)
        m.stage = 2
        out.append(m.make_batch(data_l, _ds_targets(labels), data_u, t_logits, generator=_gen(3)).targets[0])
    changed = out[0] != out[1]
    assert int(changed.sum()) == b and (out[0][changed] == 2).all() and (out[1][changed] == 0).all()


def test_switch_decision_waits_for_every_class_and_respects_floor_and_cap():
    m = _method(2, 3, stage_switch="ready", ready_dice=0.5, min_pretrain_fraction=0.2, max_pretrain_fraction=0.6)
    assert m.stage_one_bounds(10) == (2, 6) and m.config.ready_epochs == 2
    ready, unready = [0.7, 0.6], [0.7, 0.49]
    assert m.switch_decision(0, 10, None) is None  # no validation yet
    assert m.switch_decision(1, 10, [ready]) is None  # before the floor
    assert m.switch_decision(2, 10, [ready]) is None  # only one validation so far
    assert m.switch_decision(2, 10, [ready, ready]) is not None  # two ready validations, at the floor
    assert m.switch_decision(1, 10, [ready, ready]) is None  # ... but not before it
    assert m.switch_decision(3, 10, [ready, unready, ready]) is None  # one class below the threshold last time
    assert m.switch_decision(3, 10, [ready, ready, unready]) is None
    assert m.switch_decision(3, 10, [ready, [0.7, float("nan")]]) is None  # NaN = unknown = not ready
    assert m.switch_decision(3, 10, [[], []]) is None
    d = m.switch_decision(4, 10, [unready, ready, ready])
    assert d["reason"] == "ready" and d["reset_teacher"] and d["pseudo_dice"] == ready and d["epoch"] == 4
    cap = m.switch_decision(6, 10, [ready, [0.9, 0.1]])  # not ready at the cap: switch, but keep the EMA teacher
    assert cap["reason"] == "cap" and not cap["reset_teacher"] and (cap["floor_epoch"], cap["cap_epoch"]) == (2, 6)
    assert m.switch_decision(7, 10, [[0.0, 0.0]])["reason"] == "cap"
    one = _method(2, 3, stage_switch="ready", ready_epochs=1, min_pretrain_fraction=0.2)
    assert one.switch_decision(2, 10, [unready, ready])["reason"] == "ready"
    # short runs: the cap is at most the last epoch, so stage two always runs
    assert m.stage_one_bounds(2) == (1, 1) and m.switch_decision(1, 2, None)["reason"] == "cap"
    # the paper's fixed schedule ignores the pseudo-Dice
    fixed = _method(2, 3, stage_switch="fixed")
    assert fixed.switch_decision(9, 40, [[1.0, 1.0]] * 9) is None
    assert fixed.switch_decision(10, 40, None) == {"epoch": 10, "pseudo_dice": [], "ready_dice": 0.5,
                                                   "reason": "fixed", "reset_teacher": True}
    # once in stage two there is nothing to decide
    r = ClassReservoir(3, 100)
    r.add(torch.randn(2, 4, 6, 6), torch.randint(0, 3, (2, 1, 6, 6), generator=_gen(0)))
    m.begin_self_training(r, progress=0.4, decision=d)
    assert m.switch_decision(8, 10, [[0.0, 0.0]]) is None
    assert m.switch_report["reason"] == "ready" and m.switch_report["progress"] == 0.4
    with pytest.raises(ValueError, match="min_pretrain_fraction"):
        MPERConfig(min_pretrain_fraction=0.6, max_pretrain_fraction=0.5)
    with pytest.raises(ValueError, match="stage_switch"):
        MPERConfig(stage_switch="soon")
    with pytest.raises(ValueError, match="ready_epochs"):
        MPERConfig(ready_epochs=0)


def test_time_constants_are_run_relative_and_reduce_to_the_paper_at_its_run_length():
    def switched(dims, run_steps, start, **changes):
        m = _method(dims, 3, **changes)
        m.set_run_steps(run_steps)
        r = ClassReservoir(3, 100)
        r.add(torch.randn(2, 4, 6, 6), torch.randint(0, 3, (2, 1, 6, 6), generator=_gen(0)))
        m.begin_self_training(r, progress=start)
        return m

    # the paper's run (ACDC: 10k + 30k; LA: 2k + 15k): η and the EMA decay are the paper's values
    paper_2d = switched(2, 40_000, 0.25)
    assert paper_2d.prototype_momentum == pytest.approx(0.999)
    assert paper_2d.time_constants()["ema_decay"] == pytest.approx(0.99)
    paper_3d = switched(3, 17_000, 2 / 17)
    assert paper_3d.prototype_momentum == pytest.approx(0.999)
    # 1000 steps, stage two from 40 %: η's horizon 1000/30000 of the 600 stage-two steps = 20 steps
    short = switched(2, 1000, 0.4)
    assert short.stage_two_steps() == 600
    assert short.prototype_momentum == pytest.approx(1 - 0.001 * 30_000 / 600)
    assert short.time_constants()["ema_decay"] == pytest.approx(0.9)  # floor (10-step horizon)
    # nnU-Net's 250k steps: a longer horizon than the paper's, same fraction
    long = switched(2, 250_000, 0.25)
    assert 1 / (1 - long.prototype_momentum) == pytest.approx(1000 * 187_500 / 30_000, rel=1e-6)
    # literal constants
    assert switched(2, 1000, 0.4, time_constants="paper").prototype_momentum == 0.999
    # before the switch the stage-two length is unknown: the configured η, and it is said so
    before = _method(2, 3)
    before.set_run_steps(1000)
    assert before.prototype_momentum == 0.999
    assert before.time_constants()["prototype_momentum"] == "resolved at the stage switch"


def test_paper_preset_restores_the_literal_behaviour():
    cfg = MPERConfig.paper()
    assert (cfg.contrast_positive, cfg.update_background_from_pseudo, cfg.dice_include_background,
            cfg.dice_present_only, cfg.pseudo_label_threshold, cfg.stage_switch, cfg.w_max,
            cfg.time_constants) == ("any", True, True, False, 0.0, "fixed", 1.0, "paper")
    assert MPERConfig().w_max == 0.5 and MPERConfig().contrast_positive == "class"


def test_momentum_update_with_known_means():
    bank = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])  # (C=2, K=2, D=2)
    z = torch.tensor([[2.0, 0.1], [4.0, -0.1], [0.0, 5.0], [-1.0, -2.0], [100.0, 100.0]]).T.reshape(1, 2, 1, 5)
    labels = torch.tensor([0, 0, 0, 1, 0]).view(1, 1, 1, 5)
    select = torch.tensor([True, True, True, True, False]).view(1, 1, 1, 5)
    sums, counts = cluster_statistics(z, labels, select, bank)
    assert counts.tolist() == [[2.0, 1.0], [0.0, 1.0]]
    eta = 0.9
    new = momentum_update(bank, sums, counts, eta)
    expected = bank.clone()
    expected[0, 0] = eta * bank[0, 0] + (1 - eta) * torch.tensor([3.0, 0.0])  # mean of the two class-0 voxels
    expected[0, 1] = eta * bank[0, 1] + (1 - eta) * torch.tensor([0.0, 5.0])
    expected[1, 1] = eta * bank[1, 1] + (1 - eta) * torch.tensor([-1.0, -2.0])  # cos 2/sqrt5 beats 1/sqrt5
    torch.testing.assert_close(new, expected)  # (1, 0) has an empty cluster: unchanged
    frozen_bg = momentum_update(bank, sums, counts, eta, classes=torch.tensor([False, True]))
    torch.testing.assert_close(frozen_bg[0], bank[0])
    torch.testing.assert_close(frozen_bg[1], expected[1])
    # DDP: the sums and counts go through the reduction before the mean (2 identical ranks = same means)
    doubled, used = update_bank(bank, z, labels, select, eta, reduce_fn=lambda t: 2 * t)
    torch.testing.assert_close(doubled, expected)
    assert used == 4


def _stage_two_batch(c=3, b=2, spatial=(4, 6)):
    target = torch.randint(0, c, (2 * b, 1, *spatial), generator=_gen(0))
    mask = random_box_mask(spatial, generator=_gen(1))
    inside = (mask < 0.5).expand(b, 1, *spatial)
    from_pseudo = torch.cat([inside, ~inside])
    confidence = torch.where(from_pseudo, torch.rand(2 * b, 1, *spatial, generator=_gen(2)), torch.ones(()))
    return MixedBatch(torch.zeros(2 * b, 1, *spatial), [target], [mask],
                      (MixGroup(0, b, 1.0, 0.5), MixGroup(b, 2 * b, 0.5, 1.0)), from_pseudo, confidence)


def test_update_prototypes_uses_labeled_and_confident_pseudo_voxels_only():
    c, d = 3, 4
    batch = _stage_two_batch(c)
    ignore = 3
    batch.targets[0][0, 0, 0, 0] = ignore
    z = torch.randn(4, d, 4, 6, generator=_gen(5))
    m = _method(2, c, d, prototype_momentum=0.5, update_background_from_pseudo=True)  # paper: every class
    m.stage = 2
    bank0 = m.bank.clone()
    m.update_prototypes(MPERStepInputs(num_classes=c, ignore_index=ignore, target_l=batch.targets[0],
                                       logits_l=torch.zeros(4, c, 4, 6), feats_l=z, batch=batch))
    target = batch.targets[0]
    select = (target != ignore) & (~batch.from_pseudo | (batch.confidence > 0.9))
    sums, counts = cluster_statistics(z, target, select, bank0)
    torch.testing.assert_close(m.bank, momentum_update(bank0, sums, counts, 0.5))
    assert not torch.equal(m.bank, bank0)

    # code switches: no background update, agreement gate, per-region sequential steps
    m2 = _method(2, c, d, prototype_momentum=0.5, update_background=False, require_agreement=True,
                 update_mode="per_region")
    m2.stage = 2
    m2.update_prototypes(MPERStepInputs(num_classes=c, ignore_index=ignore, target_l=target,
                                        logits_l=torch.zeros(4, c, 4, 6), feats_l=z, batch=batch))
    torch.testing.assert_close(m2.bank[0], bank0[0])
    agree = multi_prototype_logits(multi_prototype_similarity(z, bank0), 0.1)[0].argmax(1, keepdim=True) == target
    bank = bank0.clone()
    for g in batch.groups:
        part = torch.zeros_like(select)
        part[g.start:g.stop] = True
        for sel in (select & batch.from_pseudo & part & agree, select & ~batch.from_pseudo & part & agree):
            s, n = cluster_statistics(z, target, sel, bank)
            bank = momentum_update(bank, s, n, 0.5, classes=torch.tensor([False, True, True]))
    torch.testing.assert_close(m2.bank, bank)

    # default: pseudo-labeled background voxels never move background prototypes
    batch.confidence = torch.where(batch.from_pseudo & (target == 0), torch.tensor(0.95), batch.confidence)
    select = (target != ignore) & (~batch.from_pseudo | (batch.confidence > 0.9))
    m4 = _method(2, c, d, prototype_momentum=0.5)
    m4.stage = 2
    m4.update_prototypes(MPERStepInputs(num_classes=c, ignore_index=ignore, target_l=target,
                                        logits_l=torch.zeros(4, c, 4, 6), feats_l=z, batch=batch))
    no_pseudo_bg = select & ~(batch.from_pseudo & (target == 0))
    assert (select & batch.from_pseudo & (target == 0)).any()  # the test batch has such voxels
    sums, counts = cluster_statistics(z, target, no_pseudo_bg, bank0)
    torch.testing.assert_close(m4.bank, momentum_update(bank0, sums, counts, 0.5))

    # stage one never moves the bank
    m3 = _method(2, c, d)
    before = m3.bank.clone()
    assert m3.update_prototypes(MPERStepInputs(num_classes=c, ignore_index=None, target_l=target,
                                               logits_l=torch.zeros(4, c, 4, 6), feats_l=z, batch=batch)) == 0
    assert torch.equal(m3.bank, before)


# ---------------------------------------------------------------------------------------------- k-means
def _blobs(seed, centres, n=40, noise=0.05):
    g = _gen(seed)
    return torch.cat([ctr + noise * torch.randn(n, ctr.numel(), generator=g) for ctr in centres])


def _stream(num_batches=6, b=2, d=4, spatial=(8, 8), seed=0):
    g = _gen(seed)
    for i in range(num_batches):
        labels = torch.randint(0, 2, (b, 1, *spatial), generator=g)
        feats = torch.randn(b, d, *spatial, generator=g) + 3.0 * labels  # class 1 shifted
        feats[:, 0] = float(i)  # channel 0 records the batch
        yield feats, labels


def test_reservoir_is_bounded_uniform_and_seeded():
    r1, r2, r3 = (ClassReservoir(2, capacity=60, seed=s) for s in (0, 0, 1))
    total = torch.zeros(2, dtype=torch.long)
    for feats, labels in _stream(num_batches=10):
        for r in (r1, r2, r3):
            r.add(feats, labels)
            assert all(v.shape[0] <= 60 for v in r.samples())
            assert r.nbytes <= 2 * 60 * (4 + 1) * 4  # C · capacity · (D + key) · 4 bytes
        total += torch.bincount(labels.flatten(), minlength=2)
    assert torch.equal(r1.seen, total)
    assert all(torch.equal(a, b) for a, b in zip(r1.samples(), r2.samples()))  # same seed, same sample
    assert not torch.equal(r1.samples()[0], r3.samples()[0])
    # uniform over the stream: every batch contributes (about 6 of 60 each)
    per_batch = torch.bincount(r1.samples()[0][:, 0].long(), minlength=10)
    assert (per_batch >= 1).all() and per_batch.max() <= 16
    # embeddings keep their class: class-1 embeddings are shifted by +3 on channels 1..3
    assert r1.samples()[1][:, 1:].mean() > 2.0 > r1.samples()[0][:, 1:].mean()


def test_reservoir_skips_ignore_label_and_checks_shapes():
    r = ClassReservoir(2, capacity=10, ignore_index=2)
    labels = torch.full((1, 1, 3, 3), 2)
    r.add(torch.randn(1, 4, 3, 3), labels)
    assert r.seen.tolist() == [0, 0]
    with pytest.raises(ValueError, match="full-resolution"):
        r.add(torch.randn(1, 4, 3, 3), torch.zeros(1, 1, 2, 2))


def test_kmeans_bank_recovers_clusters_deterministically_and_falls_back():
    d = 3
    centres0 = [torch.tensor([5.0, 0, 0]), torch.tensor([0, 5.0, 0]), torch.tensor([0, 0, 5.0])]
    centres1 = [-c for c in centres0]
    fallback = torch.full((3, 3, d), 7.0)
    one_point = torch.tensor([[1.0, 2.0, 3.0]]).repeat(10, 1)
    samples = [_blobs(0, centres0), _blobs(1, centres1), one_point]
    bank, report = kmeans_bank(samples, 3, fallback, seed=4)
    bank2, _ = kmeans_bank(samples, 3, fallback, seed=4)
    assert torch.equal(bank, bank2)  # deterministic under the seed
    for cls, centres in ((0, centres0), (1, centres1)):
        dist = torch.cdist(torch.stack(centres), bank[cls])  # (true, found)
        assert (dist.min(1).values < 0.1).all()
        assert sorted(dist.argmin(1).tolist()) == [0, 1, 2]  # one prototype per blob
    # fewer than K distinct embeddings: the class mean plus small distinct noise
    torch.testing.assert_close(bank[2], torch.tensor([1.0, 2.0, 3.0]).expand(3, d), atol=0.01, rtol=0)
    assert torch.unique(bank[2], dim=0).shape[0] == 3
    assert report == {"clustered": [0, 1], "duplicated": [2], "absent": []}
    absent, report = kmeans_bank([samples[0], torch.zeros(0, 0), samples[1]], 3, fallback, seed=4)
    assert torch.equal(absent[1], fallback[1]) and report["absent"] == [1]


# ---------------------------------------------------------------------------------------------- method
def test_config_validation_and_paper_resolution():
    with pytest.raises(ValueError, match="feature_layer must be 'decoder'"):
        MPERConfig(feature_layer="bottleneck")
    with pytest.raises(ValueError, match="num_prototypes"):
        MPERConfig(num_prototypes=0)
    with pytest.raises(ValueError, match="contrast_ignore"):
        MPERConfig(contrast_ignore="bg")
    with pytest.raises(ValueError, match="pretrain_fraction"):
        MPERConfig(pretrain_fraction=1.0)
    with pytest.raises(ValueError, match="use_teacher"):
        MPERConfig(use_teacher=False)
    m2, m3 = _method(2), _method(3)
    assert m2.gamma == 0.1 and m3.gamma == 0.02
    assert _method(3, gamma=0.001).gamma == 0.001
    assert m2.pretrain_fraction == 0.25 and m3.pretrain_fraction == pytest.approx(2 / 17)
    assert m2.stage_one_epochs(1000) == 250 and m3.stage_one_epochs(1000) == 118
    assert m2.stage_one_epochs(2) == 1 and m3.stage_one_epochs(2) == 1  # smoke run: one epoch each
    assert m2.stage_one_epochs(1) == 0
    assert _method(2, pretrain_fraction=0.0).stage_one_epochs(10) == 0
    with pytest.raises(RuntimeError, match="not set up"):
        _ = MPER(MPERConfig()).gamma


def test_weights_are_zero_in_stage_one_and_ramp_from_the_switch():
    m = _method(2, w_max=1.0)
    assert MPERConfig().w_max == 0.5  # the ACDC code's maximum (default)
    assert m.weights(0.9) == {"proto_cons": 0.0, "contrast": 0.0}
    r = ClassReservoir(3, 100)
    r.add(torch.randn(2, 4, 6, 6), torch.randint(0, 3, (2, 1, 6, 6), generator=_gen(0)))
    m.begin_self_training(r, progress=0.25)
    w0, w_mid, w1 = m.weights(0.25), m.weights(0.625), m.weights(1.0)
    assert w0["proto_cons"] == pytest.approx(math.exp(-5))
    assert w_mid["proto_cons"] == pytest.approx(math.exp(-5 * 0.25))
    assert w1["proto_cons"] == pytest.approx(1.0) and w1["contrast"] == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="once"):
        m.begin_self_training(r, progress=0.5)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("spatial", [(6, 8), (4, 6, 8)])
def test_losses_finite_with_gradient_and_empty_classes(stage, spatial):
    c, d, b, ignore = 4, 5, 2, 4
    m = _method(len(spatial), c, d)
    m.stage = stage
    data_l = torch.randn(b, 1, *spatial)
    labels = torch.zeros(b, 1, *spatial, dtype=torch.long)  # only background: classes 1-3 absent
    labels[..., 0] = ignore
    t_logits = torch.randn(b, c, *spatial)
    batch = m.make_batch(data_l, [labels], torch.randn(b, 1, *spatial), t_logits, generator=_gen(0))
    z = torch.randn(batch.images.shape[0], d, *spatial, requires_grad=True)
    inputs = MPERStepInputs(num_classes=c, ignore_index=ignore, target_l=batch.targets[0],
                            logits_l=torch.zeros(1), feats_l=z, batch=batch)
    terms = m.losses(inputs)
    for name, value in terms.items():
        assert torch.isfinite(value), name
        (g,) = torch.autograd.grad(value, z, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # every voxel ignored: still finite, zero
    batch.targets[0].fill_(ignore)
    terms = m.losses(inputs)
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in terms.values())


def test_state_dict_round_trip_and_shape_check():
    m = _method(2)
    m.stage, m.stage_two_start, m.kmeans_done = 2, 0.3, True
    m.bank = torch.randn_like(m.bank)
    m2 = _method(2)
    m2.load_state_dict(m.state_dict())
    assert (m2.stage, m2.stage_two_start, m2.kmeans_done) == (2, 0.3, True)
    assert torch.equal(m2.bank, m.bank)
    with pytest.raises(ValueError, match="does not match"):
        _method(2, num_classes=4).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        m2.load_state_dict({})


# ---------------------------------------------------------------------------------------------- trainer
def _mper_trainer(ds, configuration="2d", continue_training=False, **changes):
    """The real nnUNetTrainerMPER, with fewer k-means batches so the test stays fast.

    Default: the paper's fixed switch (stage one = ceil(0.25 · 3) = 1 epoch), which these tests need to
    reach stage two without validation epochs; the readiness switch has its own test.
    """
    from nnunet_proto.training.compat import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name("nnUNetTrainerMPER")
    config = cls.config.replace(kmeans_batches=3, **{"stage_switch": "fixed", **changes})
    fast = type("nnUNetTrainerMPER", (cls,), {"config": config})
    plans = ds.load_plans()
    plans["continue_training"] = continue_training
    trainer = fast(plans=plans, configuration=configuration, fold=ds.fold, dataset_json=ds.dataset_json(),
                   device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 3, 1  # stage one = ceil(0.25 * 3) = 1 epoch in 2D
    return trainer


def _count_switches(trainer):
    calls = []
    original = trainer.method.begin_self_training

    def spy(*args, **kwargs):
        calls.append(trainer.current_epoch)
        return original(*args, **kwargs)

    trainer.method.begin_self_training = spy
    return calls


def _resumed(ds, checkpoint, num_epochs=3, **changes):
    """A fresh trainer resumed from ``checkpoint`` (as ``nnUNetv2_train --c``), started, with a switch counter."""
    trainer = _mper_trainer(ds, continue_training=True, **changes)
    trainer.num_epochs = num_epochs
    switches = _count_switches(trainer)
    trainer.load_checkpoint(checkpoint)
    trainer.on_train_start()
    return trainer, switches


def _run_epoch(trainer):
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_switch_happens_once_and_is_restored_on_resume(synthetic_dataset, fresh_results, tmp_path):
    from nnunet_proto.training.compat import unwrap_network

    trainer = _mper_trainer(synthetic_dataset)
    switches = _count_switches(trainer)
    trainer.on_train_start()
    try:
        assert trainer.method.stage_one_epochs(trainer.num_epochs) == 1
        _run_epoch(trainer)  # epoch 0: stage one
        assert trainer.method.stage == 1 and switches == []
        stage_one_ckpt = str(tmp_path / "stage_one.pth")
        trainer.save_checkpoint(stage_one_ckpt)

        trainer.current_epoch = 1
        random_bank = trainer.method.bank.clone()
        trainer.on_train_epoch_start()  # switch: k-means + teacher reset
        assert switches == [1] and trainer.method.stage == 2 and trainer.method.kmeans_done
        assert not torch.equal(trainer.method.bank, random_bank)
        assert _equal_states(_state(trainer.teacher.module), _state(unwrap_network(trainer.network)))
        assert trainer.method.stage_two_start == pytest.approx(1 / 3)
        kmeans_bank_ = trainer.method.bank.clone()
        out = trainer.train_step(next(trainer.dataloader_train))
        partial = set(partial_collapse_keys(trainer.label_manager.num_segmentation_heads))
        assert all(math.isfinite(float(v)) for k, v in out.items() if k not in partial)  # NaN by design: no measure
        assert math.isnan(float(out["ssl_teacher_disagreement"]))  # its student never sees an un-mixed patch
        assert out["ssl_weight_proto_cons"] > 0 and out["ssl_weight_contrast"] > 0
        assert not torch.equal(trainer.method.bank, kmeans_bank_)  # momentum update ran
        trainer.on_train_epoch_start()  # a second call in the same stage does nothing
        assert switches == [1]
        stage_two_ckpt = str(tmp_path / "stage_two.pth")
        trainer.save_checkpoint(stage_two_ckpt)
        saved_teacher, saved_bank = _state(trainer.teacher.module), trainer.method.bank.clone()
    finally:
        trainer.on_train_end()

    # resume in stage two: no second switch, bank and teacher restored, not re-initialised
    resumed, resumed_switches = _resumed(synthetic_dataset, stage_two_ckpt)
    assert resumed.current_epoch == 2 and resumed.method.stage == 2
    try:
        resumed.on_train_epoch_start()
        assert resumed_switches == []
        assert torch.equal(resumed.method.bank, saved_bank)
        assert _equal_states(_state(resumed.teacher.module), saved_teacher)
        resumed.train_step(next(resumed.dataloader_train))
    finally:
        resumed.on_train_end()

    # resume from the stage-one checkpoint: the switch happens once, at epoch 1
    early, early_switches = _resumed(synthetic_dataset, stage_one_ckpt)
    assert early.current_epoch == 1 and early.method.stage == 1
    try:
        _run_epoch(early)
        early.current_epoch = 2
        _run_epoch(early)
        assert early_switches == [1] and early.method.stage == 2
    finally:
        early.on_train_end()


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_stage_two_terms_send_gradient_into_the_student(configuration, synthetic_dataset, fresh_results):
    trainer = _mper_trainer(synthetic_dataset, configuration)
    trainer.on_train_start()
    try:
        trainer.current_epoch = 1
        trainer.on_train_epoch_start()
        assert trainer.method.stage == 2
        batch = next(trainer.dataloader_train)
        target = batch["target"]
        weights = trainer.deep_supervision_weights(len(target) if isinstance(target, list) else 1)
        assert weights == tuple(float(w) for w in getattr(trainer.loss, "weight_factors", (1.0,)))
        captured = {}
        combine = trainer.combine

        def spy(sup, terms):
            captured.update(terms, sup=sup)
            return combine(sup, terms)

        trainer.combine = spy
        total, logs = trainer.compute_loss(batch["data"], target, next(trainer.dataloader_unlabeled)["data"])
        assert torch.isfinite(total) and logs["weight_contrast"] == pytest.approx(
            trainer.method.gamma * logs["weight_proto_cons"])
        params = [p for p in trainer.trainable_parameters() if p.requires_grad]
        for name in ("sup", "proto_cons", "contrast"):
            assert torch.isfinite(captured[name])
            grads = torch.autograd.grad(captured[name], params, retain_graph=True, allow_unused=True)
            assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, name
    finally:
        trainer.on_train_end()


READY = dict(stage_switch="ready", ready_dice=0.5, min_pretrain_fraction=0.2, max_pretrain_fraction=0.6)


def test_ready_switch_waits_for_validation_pseudo_dice_and_survives_resume(synthetic_dataset, fresh_results,
                                                                          tmp_path):
    """The real trainer reads nnU-Net's logged pseudo-Dice: floor, readiness, resume, cap without reset."""
    from nnunet_proto.training.compat import PSEUDO_DICE_KEY, unwrap_network

    def start_epoch(trainer, epoch, last_dice=None):
        if last_dice is not None:  # what nnU-Net's validation of epoch - 1 logged
            trainer.logger.log(PSEUDO_DICE_KEY, last_dice, epoch - 1)
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()

    trainer = _mper_trainer(synthetic_dataset, **READY)
    trainer.num_epochs = 10  # floor epoch 2, cap epoch 6
    switches = _count_switches(trainer)
    trainer.on_train_start()
    try:
        start_epoch(trainer, 0)
        start_epoch(trainer, 1, [0.9, 0.9])  # ready, but before the floor
        start_epoch(trainer, 2, [0.9, 0.2])  # one class not learned yet
        start_epoch(trainer, 3, [0.9, float("nan")])
        assert switches == [] and trainer.method.stage == 1
        checkpoint = str(tmp_path / "stage_one.pth")
        trainer.save_checkpoint(checkpoint)  # resumes at epoch 4 with the pseudo-Dice history of epochs 0-2
        start_epoch(trainer, 4, [0.6, 0.55])  # ready once: not yet (ready_epochs = 2)
        assert switches == []
        start_epoch(trainer, 5, [0.7, 0.5])  # ready twice in a row
        assert switches == [5] and trainer.method.switch_report["reason"] == "ready"
        assert _equal_states(_state(trainer.teacher.module), _state(unwrap_network(trainer.network)))
    finally:
        trainer.on_train_end()

    resumed, resumed_switches = _resumed(synthetic_dataset, checkpoint, num_epochs=10, **READY)
    try:
        assert resumed.current_epoch == 4 and resumed.method.stage == 1
        resumed.on_train_epoch_start()  # restored history ends with [0.9, nan]: not ready
        assert resumed_switches == []
        start_epoch(resumed, 5, [0.9, 0.6])  # ready once only
        assert resumed_switches == []
        resumed.train_step(next(resumed.dataloader_train))  # the EMA teacher now lags the student
        teacher_before = _state(resumed.teacher.module)
        start_epoch(resumed, 6, [0.9, 0.3])  # the cap: switch, but the unready student is not handed over
        assert resumed_switches == [6] and resumed.method.stage == 2
        report = resumed.method.switch_report
        assert report["reason"] == "cap" and not report["reset_teacher"] and report["pseudo_dice"] == [0.9, 0.3]
        assert _equal_states(_state(resumed.teacher.module), teacher_before)
        assert not _equal_states(teacher_before, _state(unwrap_network(resumed.network)))
        assert resumed.resolved_config()["resolved"]["switch"]["reason"] == "cap"
        with open(os.path.join(resumed.output_folder, "nnunet_proto_config.json")) as f:
            written = json.load(f)
        assert written["resolved"]["switch"]["reason"] == "cap"
        assert written["time_constants"]["prototype_momentum"] == pytest.approx(resumed.method.prototype_momentum)
        out = resumed.train_step(next(resumed.dataloader_train))
        assert math.isfinite(float(out["loss"])) and out["ssl_diag_stage"] == 2.0
    finally:
        resumed.on_train_end()


def test_mper_defaults_leave_the_global_rng_alone():
    """MPER seeds only its own generators (``prototype_seed``). The base ``seed`` (which makes the trainer
    reseed torch, NumPy and Python at initialisation) stays None, so the benchmark's --seeds decide the
    network initialisation; an MPER field named ``seed`` with default 0 once gave every seed the same start."""
    from nnunet_proto.methods.base import SemiSupervisedConfig

    for cfg in (MPERConfig(), MPERConfig.paper()):
        assert cfg.seed is None and cfg.prototype_seed == 0
        assert cfg.seed == SemiSupervisedConfig().seed
    banks = []
    for prototype_seed in (0, 0, 1):  # ...and prototype_seed still makes MPER's own draws reproducible
        m = MPER(MPERConfig(prototype_seed=prototype_seed))
        m.setup(num_classes=3, embed_dim=4, spatial_dims=2)
        banks.append(m.bank)
    assert torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], banks[2])
