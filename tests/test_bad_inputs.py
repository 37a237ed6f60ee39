"""Bad input at training time gets a clear error naming the problem and the fix, before anything is written."""
import json
import shutil

import blosc2
import numpy as np
import pytest
from conftest import build_trainer

from nnunet_proto.methods.cpcl import CPCLConfig


def _copy_pre(ds, tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    shutil.copytree(ds.preprocessed, pre / ds.name)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return pre / ds.name


def test_region_based_dataset_is_refused(synthetic_dataset, fresh_results):
    dj = synthetic_dataset.dataset_json()
    dj["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "satellite": 3}
    dj["regions_class_order"] = [1, 2, 3]
    with pytest.raises(ValueError, match="region-based"):
        build_trainer("nnUNetTrainerCPCL", synthetic_dataset, dataset_json=dj)


def _start(trainer_name, ds, **kw):
    trainer = build_trainer(trainer_name, ds, **kw)
    trainer.initialize()
    return trainer


def test_no_unlabeled_data_explains_both_ways(synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name("nnUNetTrainerCPCL")
    split_only = type("nnUNetTrainerCPCLSplitOnly", (base,), {"config": CPCLConfig(unlabeled_sources=("split",))})
    plans = synthetic_dataset.load_plans()
    plans["continue_training"] = False
    import torch

    trainer = split_only(plans=plans, configuration="2d", fold=0, dataset_json=synthetic_dataset.dataset_json(),
                         device=torch.device("cpu"))
    trainer.initialize()
    with pytest.raises(FileNotFoundError, match="make-splits.*preprocess-unlabeled|preprocess-unlabeled.*make-splits"):
        trainer.find_unlabeled_cases()


def test_raw_unlabeled_images_not_preprocessed_for_configuration(synthetic_dataset, fresh_results, tmp_path,
                                                                 monkeypatch):
    pre = _copy_pre(synthetic_dataset, tmp_path, monkeypatch)
    shutil.rmtree(pre / "nnUNetPlans_2d_unlabeled")
    (pre / "nnUNetPlans_2d_unlabeled.json").unlink()
    trainer = _start("nnUNetTrainerCPCL", synthetic_dataset)
    with pytest.raises(FileNotFoundError, match=r"preprocess-unlabeled -d Dataset801_Synthetic -c 2d"):
        trainer.find_unlabeled_cases()


def test_stale_unlabeled_preprocessing(synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    pre = _copy_pre(synthetic_dataset, tmp_path, monkeypatch)
    manifest = json.loads((pre / "nnUNetPlans_2d_unlabeled.json").read_text())
    manifest["fingerprint"] = "0000"
    (pre / "nnUNetPlans_2d_unlabeled.json").write_text(json.dumps(manifest))
    trainer = _start("nnUNetTrainerCPCL", synthetic_dataset)
    with pytest.raises(ValueError, match="stale.*--overwrite"):
        trainer.find_unlabeled_cases()


@pytest.mark.parametrize("overlap_with", ["train", "val"])
def test_split_whose_unlabeled_list_overlaps(overlap_with, synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    pre = _copy_pre(synthetic_dataset, tmp_path, monkeypatch)
    splits = json.loads((pre / "splits_final.json").read_text())
    splits[synthetic_dataset.fold]["unlabeled"].append(splits[synthetic_dataset.fold][overlap_with][0])
    (pre / "splits_final.json").write_text(json.dumps(splits))
    trainer = _start("nnUNetTrainerCPCL", synthetic_dataset)
    with pytest.raises(ValueError, match=f"overlaps the {overlap_with} list"):
        trainer.find_unlabeled_cases()


def test_unlabeled_case_with_wrong_channel_count(synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    pre = _copy_pre(synthetic_dataset, tmp_path, monkeypatch)
    splits = json.loads((pre / "splits_final.json").read_text())
    first = sorted(splits[synthetic_dataset.fold]["unlabeled"])[0]
    f = pre / "nnUNetPlans_2d" / f"{first}.b2nd"
    data = np.asarray(blosc2.open(str(f), mode="r")[:])
    f.unlink()
    blosc2.asarray(np.concatenate([data, data]), urlpath=str(f))  # now 2 channels, plans expect 1
    trainer = _start("nnUNetTrainerCPCL", synthetic_dataset)
    with pytest.raises(ValueError, match=rf"{first} \(2 in"):
        trainer.get_unlabeled_dataloader()
