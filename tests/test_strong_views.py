"""Weak/strong views (issue 23, items 1-2): the pure ops, the base trainer's opt-in ``strong_view`` path and UniMatch.

* ops: the strong view keeps the geometry (a labeled patch's label map maps voxel for voxel through the weak and the
  strong view; only the intensities differ), the CutMix boxes carry every per-voxel tensor (mixing commutes with any
  per-voxel function, so mixed teacher targets equal the targets of the mixed images), 2D and 3D, replayed by a
  seeded generator, finite under bf16/fp16 autocast; the Dice + CE op is nnU-Net's DC_and_CE_loss;
* trainer: with ``strong_view`` off the step is the pre-issue step bit for bit (same loss, same RNG draws); on,
  the teacher sees the weak view without ``teacher_input``, the student the strong views, and the method the
  teacher's tensors mixed with the same boxes (full resolution and coarser feature maps), while the collapse
  diagnostics read the un-mixed weak logits; trainers that cannot apply it refuse it;
* UniMatch: its pseudo labels come from the teacher's weak view, its student terms from the strong views and the
  feature-perturbed weak pass.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import started_trainer

from nnunet_proto.methods.base import StepInputs
from nnunet_proto.methods.mean_teacher import MeanTeacherConfig
from nnunet_proto.methods.mspa import MSPAConfig
from nnunet_proto.methods.unimatch import UniMatch, UniMatchConfig
from nnunet_proto.ops.distributed import all_reduce_sum
from nnunet_proto.ops.losses import dice_ce
from nnunet_proto.ops.pseudo_labels import gate_logits
from nnunet_proto.ops.strong_views import (
    CUTMIX_AREA,
    StrongIntensity,
    box_partners,
    channel_dropout,
    cutmix_boxes,
    gaussian_blur,
    strong_view,
)

SPATIAL = [(32, 28), (6, 20, 24)]
NO_BLUR_NOISE = StrongIntensity(p=1.0, blur_p=0.0, noise_p=0.0)


def _blobs(b, spatial, num_classes=4, seed=0):
    """(B, 1, *S) int64 label maps of coarse blobs (every class present somewhere)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (b, 1, *(max(1, s // 4) for s in spatial)), generator=g)
    return F.interpolate(coarse.float(), size=spatial, mode="nearest").long()


def _coded(labels):
    """A two-channel image whose intensity is a strictly increasing function of the label (z-score-like, negative
    values included), different per image."""
    b = labels.shape[0]
    offset = torch.linspace(-1.0, 1.0, b).view(b, 1, *([1] * (labels.dim() - 2)))
    return torch.cat([labels.float() - 1.5 + offset, 2.0 * labels.float() - 3.0 - offset], dim=1)


# ------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_a_labeled_patch_maps_voxel_for_voxel_through_weak_and_strong_view(spatial):
    labels = _blobs(4, spatial)
    weak = _coded(labels)
    view = strong_view(weak, NO_BLUR_NOISE, cutmix_p=1.0, generator=torch.Generator().manual_seed(3))
    assert view.cutmix.mask.any() and not view.cutmix.mask.all()
    mixed_labels = view.mix(labels)  # the label map of the strong view
    source = view.mix(torch.arange(4).view(4, 1, *([1] * len(spatial))).expand_as(labels))  # which image
    assert torch.equal(view.mix(weak), torch.where(view.cutmix.mask, weak[view.cutmix.partner], weak))
    for i in range(4):
        for c in range(weak.shape[1]):
            strong = view.images[i, c]
            for s in source[i].unique().tolist():
                # within one source image, every voxel of class k has one strong value, strictly increasing in k:
                # the strong view is the weak view's geometry with monotone new intensities
                values = []
                for k in range(4):
                    sel = (source[i, 0] == s) & (mixed_labels[i, 0] == k)
                    if sel.any():
                        v = strong[sel]
                        torch.testing.assert_close(v, v[:1].expand_as(v), rtol=1e-5, atol=1e-5)
                        values.append(float(v[0]))
                assert values == sorted(values) and len(set(values)) == len(values)
        outside = ~view.cutmix.mask[i, 0]
        assert (view.images[i][:, outside] - weak[i][:, outside]).abs().max() > 1e-3  # intensities differ


@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_cutmix_boxes_carry_the_targets(spatial):
    """Mixing commutes with any per-voxel map: the teacher's mixed targets equal the targets of the mixed images, at
    every voxel; a coarser map is mixed with the nearest-resized boxes."""
    weak = torch.randn(3, 2, *spatial)
    view = strong_view(weak, cutmix_p=1.0, generator=torch.Generator().manual_seed(1))
    head = getattr(torch.nn, f"Conv{len(spatial)}d")(2, 5, 1)
    with torch.no_grad():
        logits = head(weak)  # a per-voxel "teacher"
        mixed_images = view.cutmix.mix(weak)
        torch.testing.assert_close(view.mix(logits), head(mixed_images))
        probs, labels = torch.softmax(logits, 1), logits.argmax(1, keepdim=True)
        assert torch.equal(view.mix(labels), head(mixed_images).argmax(1, keepdim=True))
        torch.testing.assert_close(view.mix(probs), torch.softmax(head(mixed_images), 1))
    half = [max(1, s // 2) for s in spatial]
    box_half = view.cutmix.mask_at(half)
    assert torch.equal(box_half, F.interpolate(view.cutmix.mask.float(), size=half, mode="nearest-exact") > 0.5)
    per_image = torch.arange(3.0).view(3, 1, *([1] * len(spatial))).expand(3, 4, *half)
    mixed = view.mix(per_image)
    assert torch.equal(mixed, torch.where(box_half, view.cutmix.partner.view(3, 1, *([1] * len(spatial))).float(),
                                          per_image))
    with pytest.raises(ValueError, match="cannot mix"):
        view.mix(torch.zeros(2, 1, *spatial))


@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_box_geometry_and_partners(spatial):
    g = torch.Generator().manual_seed(0)
    volume = torch.tensor(spatial).prod().item()
    fractions = []
    for _ in range(30):
        boxes = cutmix_boxes(5, spatial, p=1.0, generator=g)
        assert not torch.equal(boxes.partner, torch.arange(5))
        assert (boxes.partner != torch.arange(5)).all(), "an image was paired with itself"
        assert sorted(boxes.partner.tolist()) == list(range(5))
        for i in range(5):
            m = boxes.mask[i, 0]
            fractions.append(m.sum().item() / volume)
            idx = m.nonzero()
            lo, hi = idx.min(0).values, idx.max(0).values
            assert m.sum().item() == torch.prod(hi - lo + 1).item(), "the mask is not one box"
    assert min(fractions) > 0 and max(fractions) <= CUTMIX_AREA[1] * 1.6
    assert not cutmix_boxes(4, spatial, p=0.0, generator=g).mask.any()
    assert torch.equal(box_partners(1), torch.tensor([0]))  # B = 1: CutMix changes nothing


@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_reproducible_with_a_seeded_generator(spatial):
    x = torch.randn(3, 1, *spatial) * 2 - 1
    a = strong_view(x, generator=torch.Generator().manual_seed(7))
    b = strong_view(x, generator=torch.Generator().manual_seed(7))
    c = strong_view(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.images, b.images) and torch.equal(a.cutmix.mask, b.cutmix.mask)
    assert torch.equal(a.cutmix.partner, b.cutmix.partner)
    assert not torch.equal(a.images, c.images)
    torch.manual_seed(5)
    d = strong_view(x)
    torch.manual_seed(5)
    assert torch.equal(d.images, strong_view(x).images)  # generator None: torch's global RNG


def test_intensity_properties():
    x = torch.randn(4, 2, 16, 16) * 3 - 2
    assert torch.equal(StrongIntensity(p=0.0, blur_p=0.0, noise_p=0.0)(x), x)  # nothing applied: identity
    g = torch.Generator().manual_seed(0)
    y = StrongIntensity(p=1.0, brightness=0.0, contrast=(1.0, 1.0), blur_p=0.0, noise_p=0.0)(x, g)
    lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))  # gamma alone keeps each patch's range
    torch.testing.assert_close(y.amin(dim=(2, 3)), lo, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.amax(dim=(2, 3)), hi, rtol=0, atol=1e-5)
    constant = torch.full((2, 1, 8, 8, 8), -0.7)  # std 0, zero span: stays finite and unchanged
    out = StrongIntensity(p=1.0, blur_p=1.0, noise_p=1.0)(constant, g)
    torch.testing.assert_close(out, constant)
    with pytest.raises(ValueError, match="contrast"):
        StrongIntensity(contrast=(0.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        StrongIntensity(p=1.5)


@pytest.mark.parametrize("spatial", [(32, 28), (14, 16, 18)], ids=["2d", "3d"])
def test_blur_moves_no_voxel(spatial):
    """A point source away from the borders keeps its mass and its centre (the kernel reaches ±6 voxels)."""
    x = torch.zeros(2, 1, *spatial)
    centre = tuple(s // 2 for s in spatial)
    x[(slice(None), 0, *centre)] = 1.0
    out = gaussian_blur(x, torch.tensor([0.5, 2.0]), 2.0)
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in spatial), indexing="ij")
    for i in range(2):
        assert out[i].sum().item() == pytest.approx(1.0, abs=1e-5)
        com = [float((g * out[i, 0]).sum()) for g in grids]  # centre of mass: still the same voxel
        assert com == pytest.approx([float(c) for c in centre], abs=1e-4)
        assert out[i, 0][centre] == out[i, 0].max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spatial", SPATIAL, ids=["2d", "3d"])
def test_finite_under_autocast(dtype, spatial):
    x = torch.randn(3, 2, *spatial) * 4
    logits = torch.randn(3, 4, *spatial) * 30
    for inp in (x, x.to(dtype)):
        with torch.autocast("cpu", dtype=dtype):
            view = strong_view(inp, StrongIntensity(p=1.0, blur_p=1.0, noise_p=1.0), cutmix_p=1.0,
                               generator=torch.Generator().manual_seed(0))
            mixed = view.mix(logits.to(inp.dtype))
        assert view.images.dtype == inp.dtype and mixed.dtype == inp.dtype
        assert torch.isfinite(view.images.float()).all() and torch.isfinite(mixed.float()).all()


def test_channel_dropout_drops_whole_channels():
    x = torch.ones(4, 16, 5, 6, 7, requires_grad=True)
    y = channel_dropout(x, 0.5, torch.Generator().manual_seed(0))
    per_channel = y.detach().flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 2.0).all(-1)).all()
    assert 0 < (per_channel == 0).all(-1).float().mean() < 1
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    assert channel_dropout(x, 0.0) is x


def test_dice_ce_is_nnunets_dc_and_ce_loss():
    """Defaults = nnU-Net's DC_and_CE_loss (batch Dice, no background, smooth 1e-5, ignored voxels masked) + 1."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, 10, generator=g) * 3
    labels = torch.randint(0, 4, (3, 1, 9, 10), generator=g)
    keep = torch.rand(3, 1, 9, 10, generator=g) > 0.3
    nnunet = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                            weight_dice=1, ignore_label=4, dice_class=MemoryEfficientSoftDiceLoss)
    expected = nnunet(logits, torch.where(keep, labels, 4)) + 1.0
    torch.testing.assert_close(dice_ce(logits, labels, keep), expected, rtol=1e-5, atol=1e-6)
    # labels outside [0, C) (a dropped pseudo label) count as invalid like keep == False
    torch.testing.assert_close(dice_ce(logits, torch.where(keep, labels, -1)), expected, rtol=1e-5, atol=1e-6)
    empty = logits.clone().requires_grad_(True)
    loss = dice_ce(empty, labels, torch.zeros_like(keep))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(empty.grad).all()


# ------------------------------------------------------------------------------------------------ trainer
def _step_before_strong_views(trainer, data_l, target, data_u):
    """``nnUNetTrainerSemiSupervised.compute_loss`` as it was before issue 23 (commit 38c03b8), verbatim."""
    self, method = trainer, trainer.method
    n_l = data_l.shape[0]
    sees_u = method.student_sees_unlabeled
    x = torch.cat([data_l, data_u]) if sees_u else data_l
    out = self.network(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    features = {layer: tap.pop() for layer, tap in self.student_taps.items()}
    out_l = [o[:n_l] for o in outs]
    sup = self.loss(out_l if isinstance(out, (list, tuple)) else out_l[0], target)
    target_full = target[0] if isinstance(target, list) else target
    t_logits, t_features = None, {}
    if self.teacher is not None:
        t_logits, t_features = self.teacher_forward(method.teacher_input(data_u))
        self.record_pseudo_label_diagnostics(t_logits, target_full)
    elif sees_u:
        self.record_pseudo_label_diagnostics(outs[0][n_l:].detach(), target_full)
    primary = method.feature_layers[0] if method.feature_layers else None
    feats = features.get(primary)
    inputs = StepInputs(
        num_classes=self.label_manager.num_segmentation_heads, ignore_index=self.label_manager.ignore_label,
        target_l=target_full, logits_l=outs[0][:n_l], feats_l=feats[:n_l] if feats is not None else None,
        logits_u=outs[0][n_l:] if sees_u else None,
        feats_u=feats[n_l:] if (feats is not None and sees_u) else None,
        teacher_logits_u=t_logits, teacher_feats_u=t_features.get(primary), features=features,
        teacher_features=t_features, modules=self.method_modules,
        teacher_modules=self.teacher_modules.module if self.teacher_modules is not None else None,
        data_l=data_l, data_u=data_u, reduce_fn=all_reduce_sum, progress=self.progress)
    return self.combine(sup, self.method_losses(inputs))


def _batch(trainer):
    batch = next(trainer.dataloader_train)
    target = batch["target"]
    return batch["data"], target, next(trainer.dataloader_unlabeled)["data"]


@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL"])
def test_switch_off_leaves_the_step_unchanged(name, synthetic_dataset, fresh_results):
    trainer = started_trainer(name, synthetic_dataset, "2d")
    try:
        assert trainer.config.strong_view is False
        batch = _batch(trainer)
        results = []
        for step in (_step_before_strong_views, type(trainer).compute_loss):
            torch.manual_seed(0)  # Mean Teacher's teacher noise draws from it
            total, logs = step(trainer, *batch)
            results.append((total.detach(), {k: v for k, v in logs.items()}, torch.get_rng_state()))
        (t0, l0, r0), (t1, l1, r1) = results
        assert torch.equal(t0, t1), f"{name}: the step changed with strong_view off ({t0} vs {t1})"
        assert l0.keys() == l1.keys() and all(torch.equal(torch.as_tensor(l0[k]), torch.as_tensor(l1[k])) for k in l0)
        assert torch.equal(r0, r1), "the switched-off step drew extra random numbers"
    finally:
        trainer.on_train_end()


def _strong_variant(name, **changes):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name(name)
    return type(name, (base,), {"config": base.config.replace(strong_view=True, **changes)})


def _capture(trainer):
    """Spies on the strong views, the teacher's input, the diagnostics' logits and the method's StepInputs."""
    seen = {}
    views, teacher_forward = trainer.strong_views, trainer.teacher_forward
    record = trainer.record_pseudo_label_diagnostics
    losses = trainer.method.losses

    def spy_views(data_u):
        seen["views"] = views(data_u)
        seen["teacher_calls"] = []
        return seen["views"]

    def spy_teacher(data):
        # the step's first teacher forward gives the targets; on an epoch's first step a second one on the student's
        # input measures the teacher-student disagreement
        out = teacher_forward(data)
        seen.setdefault("teacher_calls", []).append((data.clone(), out))
        if len(seen["teacher_calls"]) == 1:
            seen["teacher_input"], seen["teacher"] = data.clone(), out
        return out

    def spy_record(logits, target, **kwargs):
        seen["diagnostics_logits"] = logits
        seen["disagreement"] = kwargs.get("disagreement")
        return record(logits, target, **kwargs)

    def spy_losses(inputs):
        seen["inputs"] = inputs
        return losses(inputs)

    trainer.strong_views, trainer.teacher_forward = spy_views, spy_teacher
    trainer.record_pseudo_label_diagnostics, trainer.method.losses = spy_record, spy_losses
    return seen


@pytest.mark.parametrize("name,configuration", [("nnUNetTrainerMeanTeacher", "2d"), ("nnUNetTrainerCPCL", "3d_fullres"),
                                                ("nnUNetTrainerPCCS", "2d")])
def test_strong_view_teacher_on_weak_student_on_strong_targets_mixed(name, configuration, synthetic_dataset,
                                                                     fresh_results):
    cls = _strong_variant(name, cutmix_p=1.0, strong_intensity_p=1.0)
    plans = synthetic_dataset.load_plans()
    plans["continue_training"] = False
    trainer = cls(plans=plans, configuration=configuration, fold=synthetic_dataset.fold,
                  dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 2, 3
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    try:
        seen = _capture(trainer)
        data_l, target, data_u = _batch(trainer)
        torch.manual_seed(1)
        total, _ = trainer.compute_loss(data_l, target, data_u)
        assert torch.isfinite(total)
        (view,) = seen["views"]
        inputs = seen["inputs"]
        assert torch.equal(seen["teacher_input"], data_u), "the teacher must see the weak view, without teacher_input"
        assert not torch.equal(view.images, data_u)
        torch.testing.assert_close(inputs.data_u_strong, view.images)
        torch.testing.assert_close(inputs.data_u, data_u)
        weak_logits, weak_features = seen["teacher"]
        assert seen["diagnostics_logits"] is weak_logits  # collapse diagnostics: the un-mixed weak logits
        # the disagreement: on the epoch's first step the teacher predicts once more, on the student's first view
        assert len(seen["teacher_calls"]) == 2
        torch.testing.assert_close(seen["teacher_calls"][1][0], view.images)
        assert 0.0 <= float(seen["disagreement"]) <= 1.0
        torch.testing.assert_close(inputs.teacher_logits_weak_u, weak_logits)
        torch.testing.assert_close(inputs.teacher_logits_u, view.mix(weak_logits))
        assert not torch.equal(inputs.teacher_logits_u, inputs.teacher_logits_weak_u)
        for layer, feats in weak_features.items():  # full resolution (CPCL) and coarser encoder stages (PCCS)
            torch.testing.assert_close(inputs.teacher_features[layer], view.mix(feats))
        if inputs.teacher_feats_u is not None:
            primary = trainer.method.feature_layers[0]
            torch.testing.assert_close(inputs.teacher_feats_u, view.mix(weak_features[primary]))
        # the student's unlabeled logits are its prediction on the strong view (InstanceNorm: per sample)
        with torch.no_grad():
            student = trainer.network(view.images)
        student = student[0] if isinstance(student, (list, tuple)) else student
        torch.testing.assert_close(inputs.logits_u.detach(), student, rtol=1e-4, atol=1e-4)
        torch.manual_seed(1)
        again, _ = trainer.compute_loss(data_l, target, data_u)  # seeded: the same views, the same loss
        assert torch.equal(total.detach(), again.detach())
    finally:
        trainer.on_train_end()


def test_strong_view_refused_where_it_cannot_apply(synthetic_dataset, fresh_results):
    with pytest.raises(ValueError, match="strong_view needs a teacher"):
        MSPAConfig(strong_view=True)
    with pytest.raises(ValueError, match="cutmix_p"):
        MeanTeacherConfig(cutmix_p=2.0)
    plans = synthetic_dataset.load_plans()
    for name, changes, why in (("nnUNetTrainerBCP", {}, "own training step"),
                               ("nnUNetTrainerCPCL", {"student_unlabeled_features": False}, "does not see")):
        cls = _strong_variant(name, **changes)
        with pytest.raises(ValueError, match=why):
            cls(plans=dict(plans, continue_training=False), configuration="2d", fold=synthetic_dataset.fold,
                dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ UniMatch
def test_unimatch_terms_from_weak_pseudo_labels_on_strong_views():
    """Method level: the strong term is Dice + CE of each strong view against the gate of the *mixed weak* teacher
    logits; the FP term against the gate of the un-mixed weak logits; only student logits get gradient."""
    g = torch.Generator().manual_seed(0)
    b, c, spatial = 3, 4, (12, 10)
    weak_teacher = torch.randn(b, c, *spatial, generator=g) * 6
    views = [strong_view(torch.randn(b, 1, *spatial, generator=g), cutmix_p=1.0, generator=g) for _ in range(2)]
    mixed_teacher = torch.cat([v.mix(weak_teacher) for v in views])
    student = (torch.randn(2 * b, c, *spatial, generator=g) * 2).requires_grad_(True)
    fp = torch.randn(b, c, *spatial, generator=g).requires_grad_(True)
    method = UniMatch(UniMatchConfig())
    inputs = StepInputs(num_classes=c, ignore_index=None, target_l=torch.zeros(1, 1, *spatial, dtype=torch.long),
                        logits_l=torch.zeros(1, c, *spatial), logits_u=student, teacher_logits_u=mixed_teacher,
                        teacher_logits_weak_u=weak_teacher, logits_fp_u=fp)
    terms = method.losses(inputs)
    tau = UniMatchConfig().pseudo_label_threshold
    expected = []
    for k, v in enumerate(views):
        pl = gate_logits(v.mix(weak_teacher), tau)  # pseudo labels of the weak view, carried by the boxes
        expected.append(dice_ce(student[k * b:(k + 1) * b], pl.labels, pl.keep))
    torch.testing.assert_close(terms["strong"], torch.stack(expected).mean())
    pl = gate_logits(weak_teacher, tau)
    torch.testing.assert_close(terms["fp"], dice_ce(fp, pl.labels, pl.keep))
    (terms["strong"] + terms["fp"]).backward()
    assert student.grad.abs().sum() > 0 and fp.grad.abs().sum() > 0
    assert not mixed_teacher.requires_grad and not weak_teacher.requires_grad
    assert method.weights(1.0) == {"strong": 1.0, "fp": 1.0} and method.weights(0.0)["strong"] < 0.01
    paper = UniMatchConfig.paper()
    assert (paper.ema_decay, paper.rampup_length, paper.unlabeled_loss, paper.pseudo_label_threshold) == \
        (0.0, 0.0, "dice", 0.95)
    with pytest.raises(ValueError, match="strong_view=True"):
        UniMatchConfig(strong_view=False)


def test_unimatch_trainer_weak_teacher_strong_student_fp_stream(synthetic_dataset, fresh_results):
    trainer = started_trainer("nnUNetTrainerUniMatch", synthetic_dataset, "2d")
    try:
        seen = _capture(trainer)
        data_l, target, data_u = _batch(trainer)
        trainer.compute_loss(data_l, target, data_u)
        inputs, views = seen["inputs"], seen["views"]
        b = data_u.shape[0]
        assert len(views) == 2 and inputs.logits_u.shape[0] == 2 * b and inputs.logits_fp_u.shape[0] == b
        assert torch.equal(seen["teacher_input"], data_u)
        torch.testing.assert_close(inputs.teacher_logits_weak_u, seen["teacher"][0])
        torch.testing.assert_close(inputs.teacher_logits_u, torch.cat([v.mix(seen["teacher"][0]) for v in views]))
        with torch.no_grad():
            strong_pred = trainer.network(torch.cat([v.images for v in views]))[0]
            weak_pred = trainer.network(data_u)[0]
        torch.testing.assert_close(inputs.logits_u.detach(), strong_pred, rtol=1e-4, atol=1e-4)
        # the FP pass is the weak view through dropped-out encoder features: not the clean weak prediction
        assert not torch.allclose(inputs.logits_fp_u.detach(), weak_pred, atol=1e-4)
        assert all(tap._features is None for tap in trainer.student_taps.values())
    finally:
        trainer.on_train_end()


def test_unimatch_paper_teacher_is_the_network_itself(synthetic_dataset, fresh_results):
    """``_paper``: EMA decay 0, so after every step the teacher is the student (UniMatch's own no-grad prediction)."""
    trainer = started_trainer("nnUNetTrainerUniMatch_paper", synthetic_dataset, "2d")
    try:
        trainer.train_step(next(trainer.dataloader_train))
        student = trainer.network.state_dict()
        for k, v in trainer.teacher.module.state_dict().items():
            torch.testing.assert_close(v, student[k])
        assert trainer.resolved_config()["time_constants"]["ema_decay"] == 0.0
    finally:
        trainer.on_train_end()


def test_resume_of_a_checkpoint_from_before_the_strong_view_fields():
    """Checkpoints written before the fields existed trained without strong views: accepted as long as the switch
    stays off, refused (naming the field) when it is turned on."""
    from types import SimpleNamespace

    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised

    def fake(config):
        resolved = {"trainer": "T", "method": "MeanTeacher", "config": config.to_dict(), "num_epochs": 2,
                    "num_iterations_per_epoch": 3}
        return SimpleNamespace(config=config, resolved_config=lambda: resolved)

    old = MeanTeacherConfig().to_dict()
    for key in ("strong_view", "strong_intensity_p", "cutmix_p"):
        del old[key]
    saved = {"trainer": "T", "method": "MeanTeacher", "config": old, "num_epochs": 2, "num_iterations_per_epoch": 3}
    nnUNetTrainerSemiSupervised.check_resume_config(fake(MeanTeacherConfig()), saved, "ckpt.pth")
    with pytest.raises(ValueError, match="config.strong_view: checkpoint False vs now True"):
        nnUNetTrainerSemiSupervised.check_resume_config(fake(MeanTeacherConfig(strong_view=True)), saved, "ckpt.pth")
    assert UniMatchConfig.field_defaults()["strong_view"] is True
