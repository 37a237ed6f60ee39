"""Collapse diagnostics: the teacher's pseudo-label class shares, confidence and kept fraction are logged every
epoch and drawn in progress.png; a collapsing teacher triggers the warning; method diagnostics are declared,
logged and plotted."""
import json
import math

import pytest
import torch
from conftest import build_trainer

from nnunet_proto.methods.mean_teacher import MeanTeacher
from nnunet_proto.training.progress import (
    DIAG_PREFIX,
    PREFIX,
    class_label,
    class_names_from_dataset_json,
    collapsing_classes,
)


def _plans(ds):
    plans = ds.load_plans()
    plans["continue_training"] = False
    return plans


def test_class_names_from_dataset_json():
    names = class_names_from_dataset_json({"labels": {"background": 0, "RV": 1, "MYO": 2, "ignore": 3}})
    assert names == {0: "background", 1: "RV", 2: "MYO"}
    assert class_label(1, names) == "class 1 (RV)" and class_label(5, names) == "class 5"
    assert class_names_from_dataset_json({"labels": {"background": 0, "whole": [1, 2]}}) == {0: "background"}


def test_collapsing_classes_needs_consecutive_low_epochs():
    log = {f"{PREFIX}pl_share_c1": [0.05, 0.001, 0.001, 0.001], f"{PREFIX}labeled_share_c1": [0.05] * 4,
           f"{PREFIX}pl_share_c2": [0.001, 0.001, 0.04, 0.001], f"{PREFIX}labeled_share_c2": [0.05] * 4,
           f"{PREFIX}pl_share_c3": [0.0, 0.0, 0.0, float("nan")], f"{PREFIX}labeled_share_c3": [0.05] * 4}
    assert collapsing_classes(log, 4, epochs=3) == [1]  # class 2 recovered, class 3's last epoch has no value
    assert collapsing_classes(log, 4, epochs=5) == []  # not enough epochs yet
    # a class absent from the labeled patches (share 0) never counts as collapsed
    assert collapsing_classes({f"{PREFIX}pl_share_c1": [0.0] * 3, f"{PREFIX}labeled_share_c1": [0.0] * 3}, 2) == []


class _ReportingMeanTeacher(MeanTeacher):
    diagnostic_names = ("student_confidence",)

    def losses(self, inputs):
        self.report(student_confidence=torch.softmax(inputs.logits_u.detach().float(), 1).amax(1).mean())
        return super().losses(inputs)


def _collapsing_teacher(trainer):
    """Wrap the teacher forward: the teacher predicts background with confidence ~1 everywhere."""
    real = trainer.teacher_forward

    def forward(data):
        logits, feats = real(data)
        fake = torch.zeros_like(logits)
        fake[:, 0] = 10.0
        return fake, feats

    return forward


def test_collapse_is_logged_plotted_and_warned(synthetic_dataset, fresh_results, plot_labels):
    base = build_trainer("nnUNetTrainerMeanTeacher", synthetic_dataset, "2d")
    cls = type("nnUNetTrainerMeanTeacherDiag", (type(base),), {"method_class": _ReportingMeanTeacher})
    trainer = cls(plans=_plans(synthetic_dataset), configuration="2d", fold=synthetic_dataset.fold,
                  dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 4, 2, 1
    trainer.teacher_forward = _collapsing_teacher(trainer)
    labels = plot_labels
    trainer.run_training()

    log = trainer.logger.local_logger.my_fantastic_logging
    num_classes = trainer.label_manager.num_segmentation_heads
    for key in [f"{PREFIX}pl_share_c{c}" for c in range(num_classes)] + \
               [f"{PREFIX}labeled_share_c{c}" for c in range(num_classes)] + \
               [f"{PREFIX}pl_confidence", f"{PREFIX}pl_kept", f"{DIAG_PREFIX}student_confidence"]:
        assert len(log[key]) == 4, key  # one value per epoch
    assert all(v == pytest.approx(1.0) for v in log[f"{PREFIX}pl_share_c0"])
    assert all(v == 0.0 for v in log[f"{PREFIX}pl_share_c1"])
    assert all(v > 0 for v in log[f"{PREFIX}labeled_share_c1"])  # the labeled patches do contain class 1
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in log[f"{PREFIX}pl_confidence"])
    assert log[f"{PREFIX}pl_threshold_c1"] == pytest.approx([trainer.config.pseudo_label_threshold] * 4)
    assert all(0.0 < v <= 1.0 and not math.isnan(v) for v in log[f"{DIAG_PREFIX}student_confidence"])

    text = open(trainer.log_file).read()
    assert "teacher pseudo labels (unlabeled patches): class share c1 0.0000" in text
    warnings = [line for line in text.splitlines() if "WARNING: pseudo-label collapse" in line]
    assert len(warnings) == 2  # epochs 3 and 4 (0-based 2, 3): three consecutive epochs needed
    assert "[1, 2, 3] (class 1 (cavity), class 2 (wall), class 3 (satellite))" in warnings[0]
    assert "in the teacher's pseudo labels" in warnings[0]
    assert "method diagnostics: student_confidence" in text
    assert "time constants for this run of 8 steps: mode run_relative" in text and "ema_decay 0.9," in text

    assert "class 1 (cavity): pseudo labels (unlabeled)" in labels and "kept by the gate" in labels
    assert "class 1 (cavity): labeled patches" in labels and "student_confidence" in labels
    assert "background: pseudo labels (right axis)" in labels
    config = json.load(open(f"{trainer.output_folder}/nnunet_proto_config.json"))
    assert config["time_constants"]["run_steps"] == 8


def test_undeclared_diagnostic_is_refused(synthetic_dataset, fresh_results):
    class Undeclared(MeanTeacher):
        def losses(self, inputs):
            self.report(typo=1.0)
            return super().losses(inputs)

    base = build_trainer("nnUNetTrainerMeanTeacher", synthetic_dataset, "2d")
    cls = type("nnUNetTrainerMeanTeacherTypo", (type(base),), {"method_class": Undeclared})
    trainer = cls(plans=_plans(synthetic_dataset), configuration="2d", fold=synthetic_dataset.fold,
                  dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 1
    trainer.on_train_start()
    try:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        with pytest.raises(RuntimeError, match="typo"):
            trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()


def test_single_network_method_logs_its_own_pseudo_label_shares_and_warns(synthetic_dataset, fresh_results):
    """MSPA has no teacher: the collapse diagnostics come from the network's own unlabeled predictions, so a
    class the network stops predicting (MSPA lost the RV in the ACDC screening) is logged and warned about."""
    trainer = build_trainer("nnUNetTrainerMSPA", synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 3, 2, 1
    assert trainer.method.config.use_teacher is False
    trainer.initialize()
    real = trainer.network.forward

    def background_only(x):  # the network predicts background everywhere (a collapsed single network)
        out = real(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        fixed = []
        for o in outs:
            bias = torch.zeros_like(o)
            bias[:, 0] = 50.0
            fixed.append(o + bias)
        return fixed if isinstance(out, (list, tuple)) else fixed[0]

    trainer.network.forward = background_only
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging
    assert len(log[f"{PREFIX}pl_share_c1"]) == 3 and all(v == 0.0 for v in log[f"{PREFIX}pl_share_c1"])
    text = open(trainer.log_file).read()
    assert "network's own (no teacher) pseudo labels (unlabeled patches): class share c1 0.0000" in text
    assert "WARNING: pseudo-label collapse" in text and "The network is losing these classes" in text


def test_log_line_names_per_class_thresholds_of_the_class_relative_gate():
    from types import SimpleNamespace

    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised

    lines = []
    means = {"pl_confidence": 0.9, "pl_kept": 0.7, **{f"pl_share_c{c}": 0.5 for c in range(2)},
             **{f"labeled_share_c{c}": 0.5 for c in range(2)}, "pl_threshold_c0": 0.9, "pl_threshold_c1": 0.6}
    for mode, expected in (("class_relative", "(tau 0.9, class_relative; per class c0 0.900 c1 0.600) 0.700"),
                           ("fixed", "(tau 0.9, fixed) 0.700")):
        fake = SimpleNamespace(
            logger=SimpleNamespace(local_logger=SimpleNamespace(num_classes=2, my_fantastic_logging={},
                                                                class_names={})),
            teacher=object(), config=SimpleNamespace(pseudo_label_threshold=0.9, threshold_mode=mode),
            print_to_log_file=lines.append)
        nnUNetTrainerSemiSupervised.log_collapse_diagnostics(fake, means)
        assert expected in lines[-1], lines[-1]
