"""Labels of unlabeled cases are never read.

On a copy of the preprocessed dataset, the segmentation of every case in the fold's ``unlabeled`` list
is deleted (``*_seg.b2nd`` of both configurations, gt_segmentations) and its label-derived sampling
positions are destroyed (``class_locations`` set to None in the properties file). The raw labels
are deleted from a copy of the raw dataset too. CPCL and Mean Teacher then train on that fold: if
anything opened those files or used those positions, training would crash.
"""
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import build_trainer

from nnunet_proto.training.compat import load_json


@pytest.fixture
def leak_proof_dataset(synthetic_dataset, tmp_path, monkeypatch):
    ds = synthetic_dataset
    pre = tmp_path / "preprocessed"
    raw = tmp_path / "raw"
    shutil.copytree(ds.preprocessed, pre / ds.name)
    shutil.copytree(ds.raw, raw / ds.name)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    fold = load_json(str(pre / ds.name / "splits_final.json"))[ds.fold]
    assert fold["unlabeled"], "the test needs a fold with unlabeled cases"
    removed = 0
    for case in fold["unlabeled"]:
        for config_dir in ("nnUNetPlans_2d", "nnUNetPlans_3d_fullres"):
            seg = pre / ds.name / config_dir / f"{case}_seg.b2nd"
            seg.unlink()
            removed += 1
            props_file = pre / ds.name / config_dir / f"{case}.pkl"
            props = pickle.loads(props_file.read_bytes())
            props["class_locations"] = None  # any use of label-derived sampling positions would crash
            props_file.write_bytes(pickle.dumps(props))
        (pre / ds.name / "gt_segmentations" / f"{case}.nii.gz").unlink()
        (raw / ds.name / "labelsTr" / f"{case}.nii.gz").unlink()
    ds_copy = type(ds)(ds.id, ds.name, raw / ds.name, pre / ds.name, ds.fold)
    return ds_copy, fold, removed


@pytest.mark.parametrize("name", ["nnUNetTrainerCPCL", "nnUNetTrainerMeanTeacher"])
def test_training_never_reads_labels_of_unlabeled_cases(name, leak_proof_dataset, fresh_results):
    ds, fold, removed = leak_proof_dataset
    assert removed == 2 * len(fold["unlabeled"])
    trainer = build_trainer(name, ds, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 4, 1
    trainer.run_training()  # includes the end-of-training checkpoint; validation cases keep their labels
    info = trainer.unlabeled_info
    assert info["sources"].get("split") == len(fold["unlabeled"])
    assert info["num_cases"] == len(fold["unlabeled"]) + 3  # + the 3 images of imagesUnlabeled
    losses = trainer.logger.get_value("train_losses", step=None)
    assert len(losses) == 1 and np.isfinite(losses[0])
    for case in fold["unlabeled"]:
        assert not os.path.exists(ds.preprocessed / "nnUNetPlans_2d" / f"{case}_seg.b2nd")
