"""make-splits, plan patches, preprocess-unlabeled and the synthetic generator."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET_ID, run_cli

from nnunet_proto.data.plans_patch import apply_plans_patch
from nnunet_proto.data.splits import LabeledAmount, choose_labeled, make_label_scarce_fold
from nnunet_proto.data.synthetic import LABELS, SyntheticSpec, write_synthetic_dataset
from nnunet_proto.data.unlabeled_preprocessing import list_unlabeled_cases, preprocess_unlabeled


# ---------------------------------------------------------------- splits
def test_labeled_amount_parsing():
    assert LabeledAmount.parse("8").resolve(20) == 8
    assert LabeledAmount.parse("10%").resolve(20) == 2
    assert LabeledAmount.parse("1%").resolve(20) == 1  # at least one
    for bad in ("0", "-3", "abc", "0%", "150%"):
        with pytest.raises(ValueError, match="--labeled"):
            LabeledAmount.parse(bad)
    with pytest.raises(ValueError, match="only 5"):
        LabeledAmount.parse("6").resolve(5)


def test_choose_labeled_keeps_groups_and_is_seeded():
    pool = [f"patient{p:03d}_frame{f:02d}" for p in range(10) for f in (1, 2)]
    lab, unl = choose_labeled(pool, LabeledAmount.parse("3"), seed=0, group_regex=r"(patient\d+)")
    assert len(lab) == 6 and len(unl) == 14 and not set(lab) & set(unl) and set(lab) | set(unl) == set(pool)
    patients = {c.split("_")[0] for c in lab}
    assert len(patients) == 3 and all(f"{p}_frame01" in lab and f"{p}_frame02" in lab for p in patients)
    assert choose_labeled(pool, LabeledAmount.parse("3"), 0, r"(patient\d+)") == (lab, unl)
    assert choose_labeled(pool, LabeledAmount.parse("3"), 1, r"(patient\d+)") != (lab, unl)
    lab20, _ = choose_labeled(pool, LabeledAmount.parse("20%"), 0)  # 20% of 20 cases (no groups)
    assert len(lab20) == 4
    with pytest.raises(ValueError, match="no unlabeled"):
        choose_labeled(pool, LabeledAmount.parse("10"), 0, r"(patient\d+)")


def test_make_splits_appends_and_never_touches_nnunet_folds(synthetic_dataset, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(synthetic_dataset.preprocessed, pre)
    (pre / "splits_final.json").unlink()
    fold, content = make_label_scarce_fold(str(pre), LabeledAmount.parse("4"), seed=3)
    splits = json.loads((pre / "splits_final.json").read_text())
    from nnunet_proto.training.compat import generate_crossval_split

    ids = sorted(p.name[:-7] for p in (pre / "gt_segmentations").glob("*.nii.gz"))
    assert [dict(train=list(s["train"]), val=list(s["val"])) for s in splits[:5]] == \
        [dict(train=list(map(str, s["train"])), val=list(map(str, s["val"]))) for s in generate_crossval_split(ids)]
    assert fold == 5 and len(splits) == 6
    base = splits[0]
    assert content["val"] == base["val"]
    assert sorted(content["train"] + content["unlabeled"]) == sorted(base["train"])
    assert len(content["train"]) == 4 and content["nnunet_proto"]["seed"] == 3
    again, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse("4"), seed=3)
    assert again == 5 and len(json.loads((pre / "splits_final.json").read_text())) == 6
    same, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse("50%"), seed=3)  # 50% of 8 = the same 4
    assert same == 5
    other, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse("25%"), seed=3)
    assert other == 6
    assert json.loads((pre / "splits_final.json").read_text())[:5] == splits[:5]
    with pytest.raises(ValueError, match="label-scarce"):
        make_label_scarce_fold(str(pre), LabeledAmount.parse("2"), base_fold=5)


def test_missing_split_file_is_created_grouped_with_group_regex(tmp_path):
    from nnunet_proto.data.splits import default_folds

    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(12) for f in (1, 2)]
    folds = default_folds(ids, r"(patient\d+)")
    assert len(folds) == 5
    for fold in folds:
        train_p = {c.split("_")[0] for c in fold["train"]}
        val_p = {c.split("_")[0] for c in fold["val"]}
        assert not train_p & val_p and sorted(fold["train"] + fold["val"]) == sorted(ids)
    assert sorted(c for f in folds for c in f["val"]) == sorted(ids)  # every case validated exactly once
    assert default_folds(ids, r"(patient\d+)") == folds  # deterministic


def test_make_splits_cli_prints_fold_number(synthetic_dataset):
    out = run_cli("make-splits", "-d", str(DATASET_ID), "--labeled", "3", "--seed", "0")
    assert int(out.strip()) == synthetic_dataset.fold  # same fold as the fixture made: reused, not appended


# ---------------------------------------------------------------- plan patches
def test_plans_patch_recomputes_topology_and_keeps_preprocessing(synthetic_dataset):
    plans = json.loads((synthetic_dataset.preprocessed / "nnUNetPlans.json").read_text())
    patch = {"plans_name": "nnUNetPlans_x", "configurations": {
        "2d": {"patch_size": [16, 16], "batch_size": 3, "base_num_features": 8, "max_num_features": 16}}}
    new = apply_plans_patch(plans, patch)
    cfg, old = new["configurations"]["2d"], plans["configurations"]["2d"]
    arch = cfg["architecture"]["arch_kwargs"]
    assert cfg["patch_size"] == [16, 16] and cfg["batch_size"] == 3
    assert arch["n_stages"] == 3 and len(arch["strides"]) == 3 and len(arch["kernel_sizes"]) == 3
    assert arch["features_per_stage"] == [8, 16, 16]
    assert len(arch["n_conv_per_stage"]) == 3 and len(arch["n_conv_per_stage_decoder"]) == 2
    for key in ("data_identifier", "spacing", "normalization_schemes"):
        assert cfg[key] == old[key]
    assert new["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "nnUNetPlans"  # input untouched
    with pytest.raises(ValueError, match="unknown plan patch fields"):
        apply_plans_patch(plans, {"plans_name": "p", "configurations": {"2d": {"lr": 1}}})
    with pytest.raises(ValueError, match="__"):
        apply_plans_patch(plans, {"plans_name": "a__b", "configurations": {}})


def test_repository_plan_patches_apply(synthetic_dataset):
    from pathlib import Path

    plans = json.loads((synthetic_dataset.preprocessed / "nnUNetPlans.json").read_text())
    for patch_file in sorted(Path(__file__).resolve().parent.parent.glob("plans/*.json")):
        patch = json.loads(patch_file.read_text())
        assert patch["plans_name"] and patch.get("description"), patch_file.name
        for name in patch["configurations"]:
            if name in plans["configurations"]:
                apply_plans_patch(plans, {"plans_name": patch["plans_name"], "configurations":
                                          {name: patch["configurations"][name]}})


# ---------------------------------------------------------------- preprocess-unlabeled
def _copy_raw(ds, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    pre = tmp_path / "pre"
    shutil.copytree(ds.raw, raw / ds.name)
    shutil.copytree(ds.preprocessed, pre / ds.name)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return raw / ds.name, pre / ds.name


def test_list_unlabeled_cases_errors(synthetic_dataset, tmp_path, monkeypatch):
    raw, _ = _copy_raw(synthetic_dataset, tmp_path, monkeypatch)
    dj = synthetic_dataset.dataset_json()
    assert list(list_unlabeled_cases(str(raw), dj)) == ["unl_000", "unl_001", "unl_002"]
    unl = raw / "imagesUnlabeled"
    shutil.copy(unl / "unl_000_0000.nii.gz", unl / "unl_000_0001.nii.gz")
    with pytest.raises(ValueError, match="channel files \\[0, 1\\].*1 channel"):
        list_unlabeled_cases(str(raw), dj)
    (unl / "unl_000_0001.nii.gz").unlink()
    shutil.copy(unl / "unl_000_0000.nii.gz", unl / "unl_009_0001.nii.gz")
    with pytest.raises(ValueError, match="unl_009"):
        list_unlabeled_cases(str(raw), dj)
    (unl / "unl_009_0001.nii.gz").unlink()
    shutil.copy(unl / "unl_000_0000.nii.gz", unl / "unl_003_0000.nii")
    with pytest.raises(ValueError, match="file_ending"):
        list_unlabeled_cases(str(raw), dj)
    (unl / "unl_003_0000.nii").unlink()
    shutil.copy(unl / "unl_000_0000.nii.gz", unl / "case_000_0000.nii.gz")
    with pytest.raises(ValueError, match="also exist in imagesTr"):
        list_unlabeled_cases(str(raw), dj)
    (unl / "case_000_0000.nii.gz").unlink()
    shutil.rmtree(unl)
    with pytest.raises(FileNotFoundError, match="imagesUnlabeled"):
        list_unlabeled_cases(str(raw), dj)


def test_preprocess_unlabeled_is_incremental_and_guards_stale_data(synthetic_dataset, tmp_path, monkeypatch):
    raw, pre = _copy_raw(synthetic_dataset, tmp_path, monkeypatch)
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], "nnUNetPlans_tiny", verbose=False)
    assert summary["2d"]["new"] == 0 and summary["2d"]["num_cases"] == 3  # all done by the fixture
    # without -c: the configurations of the plans whose labeled data is preprocessed
    assert set(preprocess_unlabeled(str(DATASET_ID), None, "nnUNetPlans_tiny", verbose=False)) == {"2d", "3d_fullres"}
    img = sitk.ReadImage(str(raw / "imagesUnlabeled" / "unl_000_0000.nii.gz"))
    sitk.WriteImage(img, str(raw / "imagesUnlabeled" / "unl_100_0000.nii.gz"))
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], "nnUNetPlans_tiny", verbose=False)
    assert summary["2d"]["new"] == 1 and summary["2d"]["num_cases"] == 4
    assert (pre / "nnUNetPlans_2d_unlabeled" / "unl_100.b2nd").is_file()
    assert not (pre / "nnUNetPlans_2d" / "unl_100.b2nd").exists()  # never into the labeled folder
    # plans change that alters preprocessing -> refused without --overwrite
    plans_file = pre / "nnUNetPlans_tiny.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["spacing"] = [2.0, 2.0]
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess_unlabeled(str(DATASET_ID), ["2d"], "nnUNetPlans_tiny", verbose=False)
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], "nnUNetPlans_tiny", overwrite=True, verbose=False)
    assert summary["2d"]["new"] == 4


# ---------------------------------------------------------------- synthetic data
def test_synthetic_dataset_layout_and_overwrite_guard(tmp_path):
    spec = SyntheticSpec(dataset_id=990, num_labeled=3, num_unlabeled=2, num_test=1, shape=(3, 24, 24))
    out = write_synthetic_dataset(spec, tmp_path)
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 3 and len(list((out / "labelsTr").iterdir())) == 3
    assert len(list((out / "imagesUnlabeled").iterdir())) == 2 and not (out / "labelsUnlabeled").exists()
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == LABELS and dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "case_000.nii.gz")))
    assert lab.shape == (3, 24, 24) and set(np.unique(lab)) <= {0, 1, 2, 3} and (lab == 1).any()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(spec, tmp_path)
    # the CLI takes nnU-Net's dataset name as well as the id
    run_cli("synthetic", "-d", "Dataset991_Named", "--labeled", "2", "--shape", "2", "16", "16", "-o", str(tmp_path))
    assert (tmp_path / "Dataset991_Named" / "dataset.json").is_file()
    from nnunet_proto.cli import main

    assert main(["synthetic", "-d", "Dataset992_A", "--name", "B", "-o", str(tmp_path)]) == 2
    # cases differ (shapes and intensities vary)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "case_000.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "case_001.nii.gz")))
    assert not np.array_equal(a, b)
