"""Issue 23, items 3 and 4: a gate that selects (the per-class quantile gate and the kept share per class) and a
teacher that lags (the per-step EMA option and the teacher-student argmax disagreement logged every epoch)."""
import math

import pytest
import torch
from conftest import started_trainer

from nnunet_proto.methods.base import SemiSupervisedConfig
from nnunet_proto.methods.mean_teacher import MeanTeacher
from nnunet_proto.ops.pseudo_labels import (
    argmax_disagreement,
    collapse_diagnostic_names,
    confidence_gate,
    kept_count,
    pseudo_label_stats,
    quantile_gate,
)
from nnunet_proto.training.progress import PREFIX


def _probs(logits):
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)


def test_kept_count_rounds_up_but_not_floating_point_noise():
    assert kept_count(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert kept_count(10, 0.31) == 4 and kept_count(1, 0.01) == 1 and kept_count(0, 0.5) == 0
    assert kept_count(7, 1.0) == 7


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
def test_quantile_gate_keeps_the_requested_share_of_each_predicted_class(spatial):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *spatial, generator=g) * 3
    probs = _probs(logits)
    pl = quantile_gate(probs, keep=0.4)
    labels, keep = pl.labels.reshape(-1), pl.keep.reshape(-1)
    conf = probs.max(dim=1).values.reshape(-1)
    for c in range(3):
        sel = labels == c
        n = int(sel.sum())
        assert n > 0
        assert int(keep[sel].sum()) == kept_count(n, 0.4)
        # the kept voxels are the most confident of their class, and the threshold separates them
        assert conf[sel & keep].min() >= conf[sel & ~keep].max() - 1e-6
        assert pl.threshold[c] == pytest.approx(float(conf[sel & keep].min()), abs=1e-6)
    stats = pseudo_label_stats(pl, 3)
    for c in range(3):
        n = int((labels == c).sum())
        assert float(stats[f"kept_c{c}"]) == pytest.approx(kept_count(n, 0.4) / n)


def test_quantile_gate_selects_where_a_fixed_threshold_keeps_everything():
    """Logit gaps beyond ~17 round p to exactly 1 in float32: a fixed tau keeps every voxel; the quantile gate ranks
    by the other classes' probability mass and still keeps the requested share."""
    gaps = torch.linspace(18.0, 40.0, 20)
    logits = torch.stack([torch.zeros(20), gaps]).reshape(1, 2, 4, 5)
    probs = _probs(logits)
    assert bool((probs.max(dim=1).values == 1.0).all())
    assert float(confidence_gate(probs, 0.9).keep.float().mean()) == 1.0
    pl = confidence_gate(probs, 0.9, mode="quantile", keep=0.25)
    assert int(pl.keep.sum()) == 5
    kept_gaps = logits[0, 1].reshape(-1)[pl.keep.reshape(-1)]
    assert torch.equal(kept_gaps.sort().values, gaps[-5:])  # the five largest gaps, i.e. the least doubt


def test_quantile_gate_floor_and_unpredicted_class():
    probs = torch.tensor([[0.55, 0.6, 0.7, 0.95], [0.45, 0.4, 0.3, 0.05], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 3, 2, 2)
    pl = quantile_gate(probs, keep=1.0, floor=0.65)
    assert pl.keep.reshape(-1).tolist() == [False, False, True, True]
    assert pl.threshold[2] == 1.0 and pl.threshold[0] == pytest.approx(0.65)
    stats = pseudo_label_stats(pl, 3)
    assert math.isnan(float(stats["kept_c2"])) and float(stats["kept_c0"]) == pytest.approx(0.5)
    # the config's floor: min(0.5, tau); tau 0 is the pure quantile gate
    assert int(confidence_gate(probs, 0.0, mode="quantile", keep=1.0).keep.sum()) == 4
    with pytest.raises(ValueError, match="keep"):
        quantile_gate(probs, keep=0.0)
    with pytest.raises(ValueError, match="floor"):
        quantile_gate(probs, keep=0.5, floor=1.5)


def test_argmax_disagreement():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]).reshape(1, 2, 2, 2)
    assert float(argmax_disagreement(a, a * 3)) == 0.0
    assert float(argmax_disagreement(a, -a)) == 1.0
    b = a.clone()
    b[0, :, 0, 0] = torch.tensor([0.0, 1.0])
    assert float(argmax_disagreement(a, b)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same voxels"):
        argmax_disagreement(a, a[:, :, :1])
    assert "teacher_disagreement" in collapse_diagnostic_names(3)


def test_config_refuses_bad_keep_and_ema_mode():
    with pytest.raises(ValueError, match="pseudo_label_keep"):
        SemiSupervisedConfig(pseudo_label_keep=0.0).validate()
    with pytest.raises(ValueError, match="ema_mode"):
        SemiSupervisedConfig(ema_mode="per_epoch").validate()


@pytest.mark.parametrize("time_constants,ema_mode,expected_mode,expected", [
    ("run_relative", "follow", "run_relative", 0.9),  # 1 - 0.01 * 100000 / 3000 floors at min_decay 0.9
    ("run_relative", "per_step", "per_step", 0.99),   # the published per-step decay whatever the run length
    ("paper", "follow", "per_step", 0.99),
    ("paper", "run_relative", "run_relative", 0.9),
])
def test_ema_mode_sets_the_teachers_decay_alone(time_constants, ema_mode, expected_mode, expected):
    cfg = MeanTeacher.config_class(ema_decay=0.99, reference_steps=100_000, time_constants=time_constants,
                                   ema_mode=ema_mode)
    method = MeanTeacher(cfg)
    method.set_run_steps(3000)
    resolved = method.time_constants()
    assert resolved["ema_mode"] == expected_mode
    assert resolved["ema_decay"] == pytest.approx(expected)
    assert resolved["ema_horizon_steps"] == pytest.approx(1.0 / (1.0 - expected))
    # the method's other constants still follow time_constants
    assert method.resolve_decay(0.99) == pytest.approx(0.9 if time_constants == "run_relative" else 0.99)


def _variant(name, **changes):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name(name)
    return type(name + "Gate", (base,), {"config": base.config.replace(**changes)})


@pytest.mark.parametrize("name", ["nnUNetTrainerCPCL", "nnUNetTrainerMeanTeacher"])
def test_trainer_logs_kept_share_per_class_and_teacher_disagreement(synthetic_dataset, fresh_results, plot_labels,
                                                                    name):
    """CPCL's teacher sees the student's input: the disagreement is measured every step. Mean Teacher's teacher
    sees a noised input: one extra teacher forward on the student's input per epoch measures it."""
    cls = _variant(name, threshold_mode="quantile", pseudo_label_keep=0.3, pseudo_label_threshold=0.0,
                   ema_mode="per_step")
    plans = synthetic_dataset.load_plans()
    plans["continue_training"] = False
    trainer = cls(plans=plans, configuration="2d", fold=synthetic_dataset.fold,
                  dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 2, 1
    forwards = []
    real = trainer.teacher_forward

    def counting(x):
        forwards.append(trainer._iter_in_epoch)
        return real(x)

    trainer.teacher_forward = counting
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging
    num_classes = trainer.label_manager.num_segmentation_heads
    for c in range(num_classes):
        kept = log[f"{PREFIX}pl_kept_c{c}"]
        assert len(kept) == 2
        # each predicted class keeps ~30 % (rounded up per batch); a class never predicted stays NaN
        assert all(math.isnan(v) or 0.3 <= v <= 0.3 + 0.2 for v in kept), (c, kept)
    assert any(not math.isnan(v) for v in log[f"{PREFIX}pl_kept_c0"])
    dis = log[f"{PREFIX}teacher_disagreement"]
    assert len(dis) == 2 and all(0.0 <= v <= 1.0 for v in dis), dis
    # one teacher forward per step, plus one per epoch where the teacher's input differs from the student's
    extra = 2 if name == "nnUNetTrainerMeanTeacher" else 0
    assert len(forwards) == 2 * 2 + extra, forwards
    text = open(trainer.log_file).read()
    assert "teacher-student argmax disagreement" in text and "quantile keep 0.3" in text
    assert "per predicted class c0" in text
    assert "ema_mode per_step" in text or "'ema_mode': 'per_step'" in text
    assert "teacher-student argmax disagreement (unlabeled voxels)" in plot_labels
    assert "background: share kept by the gate (right axis)" in plot_labels


# ------------------------------------------------------------------------------------------ weights set by signal
def test_banded_gain_moves_the_share_at_full_ramp_into_the_band():
    from nnunet_proto.ops.schedules import banded_gain

    band = (0.3, 1.0)
    # share = gain * full_weight * ratio
    assert banded_gain(1.0, ratio=5.0, full_weight=0.1, band=band) == 1.0  # 0.5: inside, kept
    mid = math.sqrt(0.3)  # the band's geometric middle
    # 0.01 -> target gain mid / 0.01 = 54.8; half the log-space way is its square root 7.4, capped at a factor 4
    assert banded_gain(1.0, ratio=0.1, full_weight=0.1, band=band) == pytest.approx(4.0)
    assert banded_gain(1.0, ratio=0.1, full_weight=0.1, band=band, max_step=100.0) == pytest.approx(
        math.sqrt(mid / 0.01))
    # too strong: 3.0 -> target gain mid / 3
    assert banded_gain(1.0, ratio=30.0, full_weight=0.1, band=band) == pytest.approx(math.sqrt(mid / 3.0))
    # repeated probes converge into the band and stay
    gain = 1.0
    for _ in range(4):  # 4, 14.8, 28.5, 39.5: inside after four probes
        gain = banded_gain(gain, ratio=0.1, full_weight=0.1, band=band)
    assert 0.3 <= gain * 0.01 <= 1.0
    assert banded_gain(gain, ratio=0.1, full_weight=0.1, band=band) == gain
    # nothing to measure: no gradient, no weight, NaN
    for ratio, full in ((0.0, 0.1), (float("nan"), 0.1), (1.0, 0.0)):
        assert banded_gain(2.0, ratio=ratio, full_weight=full, band=band) == 2.0
    assert banded_gain(1.0, ratio=1e-12, full_weight=1.0, band=band, max_step=1e9) == 1e3  # bounded


def test_weight_band_config_is_checked():
    with pytest.raises(ValueError, match="weight_band"):
        SemiSupervisedConfig(weight_band=(1.0, 0.3))
    with pytest.raises(ValueError, match="weight_band"):
        SemiSupervisedConfig(weight_band=(0.0, 1.0))
    assert SemiSupervisedConfig(weight_band=(0.3, 1.0)).weight_band == (0.3, 1.0)


def test_weight_band_trainer_adapts_logs_and_resumes_its_gains(synthetic_dataset, fresh_results):
    cls = _variant("nnUNetTrainerMeanTeacher", weight_band=(0.3, 1.0))
    plans = synthetic_dataset.load_plans()
    plans["continue_training"] = False
    trainer = cls(plans=plans, configuration="2d", fold=synthetic_dataset.fold,
                  dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 2, 1
    full = trainer.method.weights(1.0)["consistency"]
    # the rule on a given probe: ratio 0.1, share at full ramp 0.01 * 1 -> gain x4 (the cap of one probe)
    trainer._probe_weights = {"consistency": 0.05}
    trainer.adapt_weight_gains({"gradnorm_sup": 2.0, "gradnorm_consistency": 0.05 * 2.0 * 0.1})
    assert trainer.weight_gains["consistency"] == pytest.approx(min(4.0, math.sqrt(math.sqrt(0.3) / (full * 0.1))))
    assert trainer.effective_weights(1.0)["consistency"] == pytest.approx(full * trainer.weight_gains["consistency"])
    trainer.weight_gains["consistency"] = 1.0

    trainer.run_training()
    gain = trainer.weight_gains["consistency"]
    assert gain != 1.0  # two probes on a fresh network: Mean Teacher's consistency is far from the band
    text = open(trainer.log_file).read()
    assert "weight band [0.3, 1] of the supervised gradient: gains consistency 1 ->" in text
    log = trainer.logger.local_logger.my_fantastic_logging
    assert len(log[f"{PREFIX}gradnorm_consistency"]) == 2

    ckpt = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    from nnunet_proto.training.base_trainer import CHECKPOINT_KEY

    assert ckpt[CHECKPOINT_KEY]["weight_gains"] == {"consistency": gain}
    plans = synthetic_dataset.load_plans()
    plans["continue_training"] = True
    again = cls(plans=plans, configuration="2d", fold=synthetic_dataset.fold,
                dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    again.num_epochs, again.num_iterations_per_epoch = 2, 2
    again.load_checkpoint(f"{trainer.output_folder}/checkpoint_final.pth")
    assert again.weight_gains == {"consistency": gain}


def test_redesign_variants_are_one_switch_each_and_v2_trains(synthetic_dataset, fresh_results):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_proto.training.variants import REDESIGN, redesign_variants

    for name, suffixes in (("nnUNetTrainerMeanTeacher", ("strong", "ema99", "wband", "ramp20")),
                           ("nnUNetTrainerCPCL", tuple(REDESIGN)), ("nnUNetTrainerPCCS", tuple(REDESIGN)),
                           ("nnUNetTrainerUniMatch", ("wband", "quantile"))):
        base = recursive_find_trainer_class_by_name(name)
        for suffix in suffixes:
            variant = recursive_find_trainer_class_by_name(f"{name}_{suffix}")
            assert variant.variant_of.__name__ == name
            changed = {k for k, v in variant.config.to_dict().items() if base.config.to_dict()[k] != v}
            assert changed == set(REDESIGN[suffix]), (name, suffix, changed)
        if name.endswith("UniMatch"):  # already weak-to-strong with the per-step EMA: two switches, no _v2
            continue
        v2 = recursive_find_trainer_class_by_name(f"{name}_v2").config
        assert v2.strong_view and v2.ema_mode == "per_step" and v2.weight_band == (0.3, 1.0)
        assert v2.threshold_mode == ("fixed" if name.endswith("MeanTeacher") else "quantile")
        assert v2.rampup_length == base.config.rampup_length
    mt = recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher")
    assert "nnUNetTrainerMeanTeacher_quantile" not in redesign_variants(mt, gated=False)  # no gated pseudo labels

    trainer = started_trainer("nnUNetTrainerCPCL_v2", synthetic_dataset, "2d", epochs=2, iterations=2)
    try:
        out = trainer.train_step(next(trainer.dataloader_train))
        assert math.isfinite(float(out["loss"]))
        assert 0.0 <= out[f"{PREFIX}teacher_disagreement"] <= 1.0
        assert trainer.teacher.decay == pytest.approx(0.99)  # per step, whatever the run length
    finally:
        trainer.on_train_end()
    trainer = started_trainer("nnUNetTrainerUniMatch_wband", synthetic_dataset, "2d", epochs=2, iterations=2)
    try:
        out = trainer.train_step(next(trainer.dataloader_train))
        assert math.isfinite(float(out["loss"])) and set(trainer.weight_gains) == {"strong", "fp"}
    finally:
        trainer.on_train_end()
