"""Unit tests of the CPCL and Mean Teacher method files on hand-built tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_proto.methods import CPCL, CPCLConfig, MeanTeacher, MeanTeacherConfig, StepInputs, cpcl_losses


def onehot_feats(labels: torch.Tensor, c: int) -> torch.Tensor:
    """(B, 1, *S) labels -> (B, C, *S) float one-hot 'features'."""
    return F.one_hot(labels[:, 0], c).movedim(-1, 1).float()


def test_cpcl_analytic_values_with_one_hot_features():
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1]]).view(1, 1, 2, 2)
    y_u = torch.tensor([[1, 0, 0, 1]]).view(1, 1, 2, 2)
    feats_l, feats_u = onehot_feats(y_l, c), onehot_feats(y_u, c)
    probs_u = torch.where(onehot_feats(y_u, c) > 0, torch.tensor(0.8), torch.tensor(0.2))
    out = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, None, CPCLConfig.paper())
    # labeled prototypes are e_0, e_1, so the L2U softmax is (e^20, 1)/(e^20 + 1) towards the teacher class
    p_hi = math.exp(20) / (math.exp(20) + 1)
    expected_fpc = ((p_hi - 0.8) ** 2 + (1 - p_hi - 0.2) ** 2) / 2
    assert out["fpc"].item() == pytest.approx(expected_fpc, rel=1e-5)
    # unlabeled prototypes e_0, e_1 classify the labeled one-hot features: CE = log(1 + e^-20)
    assert out["bpc"].item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-7)


def test_cpcl_paper_gradient_path():
    torch.manual_seed(0)
    c, shape = 3, (2, 1, 6, 6)
    y_l = torch.randint(0, c, shape)
    feats_l = torch.randn(2, 8, 6, 6, requires_grad=True)
    feats_u = torch.randn(2, 8, 6, 6)  # teacher: constant
    probs_u = torch.softmax(torch.randn(2, c, 6, 6), 1)
    out = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, None, CPCLConfig())
    for name in ("fpc", "bpc"):
        (g,) = torch.autograd.grad(out[name], feats_l, retain_graph=True)
        assert g.abs().sum() > 0, f"{name} sends no gradient into the student's labeled features"
    # optional variant: student unlabeled features also receive gradient through L2U and U2L
    feats_u_student = feats_u.clone().requires_grad_(True)
    out = cpcl_losses(feats_l, y_l, feats_u_student, probs_u, c, None, CPCLConfig(student_unlabeled_features=True))
    (g,) = torch.autograd.grad(out["fpc"] + out["bpc"], feats_u_student)
    assert g.abs().sum() > 0


def test_cpcl_absent_class_and_ignore_label():
    c, ignore = 3, 3
    y_l = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    y_l[..., :2, :] = 1  # class 2 absent from the labeled batch
    y_l[..., 0, 0] = ignore
    feats_l = torch.randn(1, 5, 4, 4, requires_grad=True)
    feats_u = torch.randn(1, 5, 4, 4)
    pseudo = torch.tensor([0, 1, 2, 2] * 4).view(1, 4, 4)
    probs_u = F.one_hot(pseudo, c).movedim(-1, 1).float() * 0.9 + 0.1 / 3
    out = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, ignore, CPCLConfig())
    assert all(torch.isfinite(v) for v in out.values())
    (out["fpc"] + out["bpc"]).backward()
    assert torch.isfinite(feats_l.grad).all()
    # the ignored voxel takes part in no prototype: changing its feature changes neither loss's prototype side
    feats_l2 = feats_l.detach().clone()
    feats_l2[..., 0, 0] += 100.0
    out2 = cpcl_losses(feats_l2, y_l, feats_u, probs_u, c, ignore, CPCLConfig())
    torch.testing.assert_close(out2["fpc"], out["fpc"].detach())


def test_cpcl_unlabeled_class_missing_from_pseudo_labels_is_ignored_in_bpc():
    c = 3
    y_l = torch.tensor([0, 1, 2, 2]).view(1, 1, 2, 2)
    feats_l = onehot_feats(y_l, c)
    # teacher never predicts class 2 -> no unlabeled prototype for class 2 -> those labeled voxels are ignored
    probs_u = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]).T.reshape(1, 3, 2, 1).expand(1, 3, 2, 2)
    feats_u = torch.zeros(1, 3, 2, 2)
    feats_u[:, 0, 0] = 1
    feats_u[:, 1, 1] = 1
    out = cpcl_losses(feats_l, y_l, feats_u, probs_u.contiguous(), c, None, CPCLConfig.paper())
    assert out["bpc"].item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-6)


def test_cpcl_per_image_needs_equal_batches():
    cfg = CPCLConfig(prototype_reduction="per_image")
    with pytest.raises(ValueError, match="equal batch sizes"):
        cpcl_losses(torch.randn(2, 4, 3, 3), torch.zeros(2, 1, 3, 3, dtype=torch.long), torch.randn(3, 4, 3, 3),
                    torch.softmax(torch.randn(3, 2, 3, 3), 1), 2, None, cfg)


def test_cpcl_bottleneck_features_at_low_resolution():
    c = 2
    y_l = torch.randint(0, c, (2, 1, 8, 8))
    feats_l = torch.randn(2, 6, 2, 2, requires_grad=True)  # 1/4 resolution
    out = cpcl_losses(feats_l, y_l, torch.randn(2, 6, 2, 2), torch.softmax(torch.randn(2, c, 8, 8), 1), c, None,
                      CPCLConfig(feature_layer="bottleneck"))
    assert all(torch.isfinite(v) for v in out.values())
    (g,) = torch.autograd.grad(out["fpc"] + out["bpc"], feats_l)
    assert g.abs().sum() > 0


def test_cpcl_weights_follow_paper():
    m = CPCL(CPCLConfig.paper())
    w_end = m.weights(1.0)
    assert w_end == {"fpc": pytest.approx(0.1), "bpc": pytest.approx(1.0)}
    w_start = m.weights(0.0)
    assert w_start["fpc"] == pytest.approx(0.1 * math.exp(-5))
    assert not m.student_sees_unlabeled


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(beta=-1), dict(prototype_reduction="max"),
                                 dict(feature_layer="encoder"), dict(use_teacher=False), dict(ema_decay=1.0),
                                 dict(rampup_length=2.0), dict(unlabeled_sources=("web",))])
def test_config_validation_names_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field.split("_")[0]):
        CPCLConfig(**bad)


def test_mean_teacher_loss_and_noise():
    m = MeanTeacher(MeanTeacherConfig())
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    same = m.losses(StepInputs(3, None, torch.zeros(2, 1, 4, 4), logits, logits_u=logits,
                               teacher_logits_u=logits.detach()))
    assert same["consistency"].item() == pytest.approx(0.0, abs=1e-7)
    other = m.losses(StepInputs(3, None, torch.zeros(2, 1, 4, 4), logits, logits_u=logits,
                                teacher_logits_u=-logits.detach()))
    other["consistency"].backward()
    assert other["consistency"].item() > 0 and logits.grad.abs().sum() > 0
    x = torch.zeros(4000)
    literal = MeanTeacher(MeanTeacherConfig.ssl4mis()).teacher_input(x)
    assert literal.abs().max() <= 0.2 + 1e-6 and literal.std() == pytest.approx(0.1, rel=0.25)
    assert MeanTeacher(MeanTeacherConfig(noise_std=0.0)).teacher_input(x) is x


def test_mean_teacher_noise_is_scaled_to_normalised_intensities():
    """SSL4MIS's N(0, 0.1) on [0, 1] images of std 0.12 is ~0.8 image stds; on z-scored images (std 1) the
    default noise must be that strong relative to the image, the literal one 8x weaker."""
    torch.manual_seed(0)
    z = torch.randn(2, 1, 64, 64)  # nnU-Net z-scored patch
    ssl4mis_img = z * 0.12 + 0.5  # the same patch in SSL4MIS's [0, 1] scaling
    rel_default = (MeanTeacher(MeanTeacherConfig()).teacher_input(z) - z).std() / z.std()
    rel_ssl4mis = (MeanTeacher(MeanTeacherConfig.ssl4mis()).teacher_input(ssl4mis_img) - ssl4mis_img).std() \
        / ssl4mis_img.std()
    rel_literal_on_z = (MeanTeacher(MeanTeacherConfig.ssl4mis()).teacher_input(z) - z).std() / z.std()
    assert float(rel_default) == pytest.approx(float(rel_ssl4mis), rel=0.1)
    assert float(rel_literal_on_z) < float(rel_default) / 6
    cfg = MeanTeacherConfig.ssl4mis()
    assert cfg.time_constants == "paper" and cfg.noise_std == 0.1
    assert MeanTeacherConfig().reference_steps == 30000


def test_mean_teacher_independent_jitter_changes_contrast_per_image():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 8)
    m = MeanTeacher(MeanTeacherConfig(noise_std=0.0, teacher_jitter=0.3))
    y = m.teacher_input(x)
    # per image and channel an affine map a*x + b with |a - 1| <= 0.3, |b| <= 0.3, not the identity
    for b in range(3):
        for c in range(2):
            a = torch.linalg.lstsq(torch.stack([x[b, c].flatten(), torch.ones(64)], 1), y[b, c].flatten()[:, None])
            slope, shift = a.solution[:, 0].tolist()
            assert abs(slope - 1) <= 0.3 + 1e-4 and abs(shift) <= 0.3 + 1e-4
    assert not torch.allclose(x, y)
    with pytest.raises(ValueError, match="teacher_jitter"):
        MeanTeacherConfig(teacher_jitter=1.0)


def test_cpcl_gate_drops_unconfident_voxels_from_unlabeled_prototypes():
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1]]).view(1, 1, 2, 2)
    feats_l = onehot_feats(y_l, c).requires_grad_(True)
    # unlabeled: 2 confident voxels (one per class) with clean features, 2 unconfident ones with features
    # pointing the wrong way; the gate must drop those, so p_u stays (e_0, e_1) and U2L is ~0
    feats_u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).t().reshape(1, 2, 2, 2)
    probs_u = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.4, 0.6]]).t().reshape(1, 2, 2, 2)
    gated = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, None, CPCLConfig(pseudo_label_threshold=0.9))
    ungated = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, None, CPCLConfig.paper())
    assert gated["bpc"].item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-6)
    assert ungated["bpc"].item() == pytest.approx(math.log(2), rel=1e-4)  # p_u0 = p_u1: averaged over wrong labels
    assert gated["u2l_kept"].item() == pytest.approx(0.5) and ungated["u2l_kept"].item() == 1.0
    # nothing confident: no unlabeled prototype, U2L is exactly 0 and finite
    none = cpcl_losses(feats_l, y_l, feats_u, probs_u, c, None, CPCLConfig(pseudo_label_threshold=0.99))
    assert none["bpc"].item() == 0.0 and none["u2l_kept"].item() == 0.0


def test_cpcl_nnunet_defaults_and_paper_switch():
    m = CPCL(CPCLConfig())
    assert m.student_sees_unlabeled and m.config.pseudo_label_threshold == 0.9
    assert m.config.reference_steps == 20000 and m.config.time_constants == "run_relative"
    m.set_run_steps(20000)
    assert m.time_constants()["ema_decay"] == 0.99  # the paper's value at the paper's run length
    m.set_run_steps(1000)
    assert m.time_constants()["ema_decay"] == 0.9  # 1 - 0.01*20 < floor
    p = CPCL(CPCLConfig.paper())
    p.set_run_steps(1000)
    assert not p.student_sees_unlabeled and p.config.pseudo_label_threshold == 0.0
    assert p.time_constants()["ema_decay"] == 0.99


def test_mean_teacher_time_constants_reduce_to_the_paper_at_its_run_length():
    m = MeanTeacher(MeanTeacherConfig())
    m.set_run_steps(30000)
    assert m.time_constants()["ema_decay"] == 0.99
    m.set_run_steps(300000)
    tc = m.time_constants()
    assert tc["ema_horizon_steps"] == pytest.approx(1000.0)
    assert tc["ema_horizon_fraction"] == pytest.approx(1 / 300)
