"""CPCL's pinned confirmed form (nnUNetTrainerCPCL_v1) and the labeled-images control (..._labeledcontrol)."""
import dataclasses
import json

import pytest
from conftest import build_trainer

from nnunet_proto.methods.base import SemiSupervisedConfig
from nnunet_proto.methods.cpcl import CPCLConfig

#: the configuration acdc_confirm_bf16 measured (commit 44d3692's CPCL defaults); v1 must stay exactly this
V1 = {"use_teacher": True, "ema_decay": 0.99, "ema_warmup": True, "unlabeled_batch_size": None,
      "unlabeled_sources": ("split", "folder"), "unlabeled_workers": None, "feature_layer": "decoder", "w_max": 0.1,
      "rampup": "sigmoid", "rampup_length": 1.0, "reference_steps": 20000, "time_constants": "run_relative",
      "min_decay": 0.9, "pseudo_label_threshold": 0.9, "threshold_mode": "fixed", "seed": None, "alpha": 20.0,
      "beta": 10.0, "prototype_reduction": "batch_mean", "student_unlabeled_features": True, "strong_view": False,
      "ema_mode": "follow", "weight_band": None}
#: settings of switches that v1 keeps off (they do nothing while their switch is off)
INACTIVE = {"strong_intensity_p", "cutmix_p", "pseudo_label_keep"}


def test_v1_is_the_confirmed_form_field_by_field():
    v1 = dataclasses.asdict(CPCLConfig.v1())
    extra = {k: v for k, v in v1.items() if k not in V1 and k not in INACTIVE}
    # a field added later must keep v1's behaviour: v1 spells out the value it ran with (an "off" switch)
    assert {k: v1[k] for k in V1} == V1
    assert not extra, f"fields added since v1 was pinned: set their v1 value in CPCLConfig.v1() and here: {extra}"


def test_labeled_control_sources_are_validated():
    assert SemiSupervisedConfig(unlabeled_sources=("labeled",)).unlabeled_sources == ("labeled",)
    with pytest.raises(ValueError, match="cannot be combined"):
        SemiSupervisedConfig(unlabeled_sources=("labeled", "split"))
    with pytest.raises(ValueError, match="unlabeled_sources"):
        SemiSupervisedConfig(unlabeled_sources=("test",))


def test_labeled_control_feeds_the_folds_labeled_images_and_nothing_unlabeled(synthetic_dataset, fresh_results):
    control = build_trainer("nnUNetTrainerCPCL_labeledcontrol", synthetic_dataset)
    control.initialize()
    cases = control.find_unlabeled_cases()
    fold = json.loads((synthetic_dataset.preprocessed / "splits_final.json").read_text())[synthetic_dataset.fold]
    assert sorted(c.identifier for c in cases) == sorted(fold["train"])
    assert {c.source for c in cases} == {"labeled"}
    default = build_trainer("nnUNetTrainerCPCL", synthetic_dataset)
    default.initialize()
    ids = {c.identifier for c in default.find_unlabeled_cases()}
    assert not ids & set(fold["train"]) and set(fold["unlabeled"]) <= ids  # the real trainer: unlabeled only
    assert type(control).config.replace(unlabeled_sources=("split", "folder")) == type(default).config
