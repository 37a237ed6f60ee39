"""Data integrity: corrupt or degenerate unlabeled images, an unlabeled set that follows its folder, no test
leakage, nothing lost on failure, safe make-splits grouping and benchmark bookkeeping.

Every test asserts the message the user sees and that nothing was lost (old data kept) or leaked (a bad or
test image never reaches the manifest the trainer reads).
"""
import gzip
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET_ID, PLANS

from nnunet_proto.cli import main
from nnunet_proto.data import unlabeled_preprocessing
from nnunet_proto.data.unlabeled_preprocessing import preprocess_unlabeled
from nnunet_proto.training.unlabeled import cases_from_folder, preprocessing_fingerprint, read_manifest

MANIFEST_2D = "nnUNetPlans_2d_unlabeled.json"
FOLDER_2D = "nnUNetPlans_2d_unlabeled"




def _snapshot(pre):
    """Manifest text and {file: bytes} of the preprocessed unlabeled 2d folder."""
    folder = pre / FOLDER_2D
    return (pre / MANIFEST_2D).read_text(), {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _trainer_cases(raw, pre, ds):
    """The unlabeled cases a trainer would use (same call as nnUNetTrainerSemiSupervised.find_unlabeled_cases)."""
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    fp = preprocessing_fingerprint(plans, "2d", ds.dataset_json())
    return cases_from_folder(str(pre), "nnUNetPlans_2d", fp, "2d", ds.name, str(raw / "imagesUnlabeled"), ".nii.gz")


def _write(array, path, spacing=(8.0, 1.5, 1.5)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(img, str(path), useCompression=True)


# ---------------------------------------------------------------- 1. corrupt images
def test_truncated_and_degenerate_images_are_refused_or_skipped(copied, synthetic_dataset, capsys):
    raw, pre = copied
    unl = raw / "imagesUnlabeled"
    good = (unl / "unl_000_0000.nii.gz").read_bytes()
    (unl / "unl_050_0000.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip stream
    (unl / "unl_051_0000.nii.gz").write_bytes(good[:200])
    # a complete gzip stream whose NIfTI voxel block is short: SimpleITK would zero-fill it
    (unl / "unl_052_0000.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)[:2000]))
    _write(np.zeros((4, 40, 40), np.float32), unl / "unl_053_0000.nii.gz")  # constant
    vector = sitk.GetImageFromArray(np.random.rand(4, 40, 40, 2).astype(np.float32), isVector=True)
    sitk.WriteImage(vector, str(unl / "unl_054_0000.nii.gz"))
    before = _snapshot(pre)

    with pytest.raises(ValueError) as err:
        preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)
    msg = str(err.value)
    assert "5 unlabeled image(s) cannot be used" in msg and "--skip-bad" in msg and "Nothing was changed" in msg
    assert "unl_050_0000.nii.gz: the gzip stream ends early" in msg
    assert "unl_051_0000.nii.gz: the gzip stream ends early" in msg
    assert "unl_052_0000.nii.gz: the header announces" in msg and "truncated" in msg
    assert "unl_053_0000.nii.gz: degenerate, every voxel is 0.0" in msg
    assert "unl_054_0000.nii.gz: a vector image (2 components per voxel)" in msg
    assert _snapshot(pre) == before  # nothing written

    # the CLI says the same, without a traceback
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 2
    assert "gzip stream ends early" in capsys.readouterr().err

    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False, skip_bad=True)["2d"]
    err_text = capsys.readouterr().err
    assert sorted(summary["skipped"]) == ["unl_050", "unl_051", "unl_052", "unl_053", "unl_054"]
    assert "WARNING: skipping unlabeled case unl_050" in err_text
    manifest = read_manifest(str(pre / MANIFEST_2D))
    assert manifest["cases"] == ["unl_000", "unl_001", "unl_002"]  # no bad case reaches training
    assert sorted(manifest["skipped"]) == sorted(summary["skipped"])
    assert not list((pre / FOLDER_2D).glob("unl_05*"))
    assert [c.identifier for c in _trainer_cases(raw, pre, synthetic_dataset)] == manifest["cases"]


def test_image_smaller_than_half_the_patch_is_refused_on_overwrite_and_old_data_kept(copied, capsys):
    raw, pre = copied
    rng = np.random.default_rng(0)
    _write(rng.uniform(1, 2, (4, 6, 6)).astype(np.float32), raw / "imagesUnlabeled" / "unl_060_0000.nii.gz")
    before = _snapshot(pre)
    with pytest.raises(ValueError, match=r"unl_060: \(4, 6, 6\) voxels .* less than half the patch \[32, 32\]"
                                         r"(.|\n)*old data in .* is unchanged"):
        preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, overwrite=True, verbose=False)
    assert _snapshot(pre) == before
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, overwrite=True, verbose=False,
                                   skip_bad=True)["2d"]
    assert "unl_060" in summary["skipped"] and summary["num_cases"] == 3
    assert not (pre / (FOLDER_2D + ".partial")).exists() and not (pre / (MANIFEST_2D + ".partial")).exists()


# ---------------------------------------------------------------- 2. the set follows imagesUnlabeled
def test_deleted_and_changed_unlabeled_images_on_rerun(copied, synthetic_dataset, capsys):
    raw, pre = copied
    ds = synthetic_dataset
    unl = raw / "imagesUnlabeled"
    old_002 = (pre / FOLDER_2D / "unl_002.b2nd").read_bytes()
    (unl / "unl_001_0000.nii.gz").unlink()
    img = sitk.ReadImage(str(unl / "unl_002_0000.nii.gz"))
    changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:, ::-1].copy())
    changed.CopyInformation(img)
    sitk.WriteImage(changed, str(unl / "unl_002_0000.nii.gz"), useCompression=True)

    # before the re-run the trainer refuses to train on the deleted / outdated images
    with pytest.raises(ValueError, match=r"changed after preprocessing: 1 vanished \(unl_001\); 1 changed "
                                         r"\(unl_002\).*preprocess-unlabeled"):
        _trainer_cases(raw, pre, ds)

    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS)["2d"]
    out = capsys.readouterr().out
    assert "imagesUnlabeled changed since the last run: 1 vanished (unl_001); 1 changed (unl_002)" in out
    assert summary["vanished"] == ["unl_001"] and summary["changed"] == ["unl_002"] and summary["new"] == 1
    manifest = read_manifest(str(pre / MANIFEST_2D))
    assert manifest["cases"] == ["unl_000", "unl_002"]
    assert not (pre / FOLDER_2D / "unl_001.b2nd").exists() and not (pre / FOLDER_2D / "unl_001.pkl").exists()
    assert (pre / FOLDER_2D / "unl_002.b2nd").read_bytes() != old_002  # redone from the new image
    assert [c.identifier for c in _trainer_cases(raw, pre, ds)] == ["unl_000", "unl_002"]

    # a copy with a new mtime but the same voxels is not redone
    shutil.copy(unl / "unl_000_0000.nii.gz", unl / "tmp.nii.gz")
    (unl / "tmp.nii.gz").replace(unl / "unl_000_0000.nii.gz")
    assert preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)["2d"]["new"] == 0


def test_manifest_written_by_older_code_is_upgraded(copied, synthetic_dataset):
    raw, pre = copied
    manifest = json.loads((pre / MANIFEST_2D).read_text())
    for key in ("version", "files", "skipped"):
        manifest.pop(key, None)
    (pre / MANIFEST_2D).write_text(json.dumps(manifest))  # the version-1 format
    assert len(_trainer_cases(raw, pre, synthetic_dataset)) == 3  # still read by the trainer
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)["2d"]
    assert summary["new"] == 0 and summary["num_cases"] == 3  # nothing redone
    upgraded = json.loads((pre / MANIFEST_2D).read_text())
    assert upgraded["version"] == 2 and sorted(upgraded["files"]) == ["unl_000", "unl_001", "unl_002"]
    assert upgraded["files"]["unl_000"][0]["name"] == "unl_000_0000.nii.gz"


def test_interrupted_run_resumes_from_the_manifest(copied, monkeypatch):
    raw, pre = copied
    for i in (70, 71):
        shutil.copy(raw / "imagesTr" / "case_000_0000.nii.gz", raw / "imagesUnlabeled" / f"unl_0{i}_0000.nii.gz")
    real = unlabeled_preprocessing._preprocess_one

    def dies_on_second(job):
        if job[0] == "unl_071":
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(unlabeled_preprocessing, "_preprocess_one", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)
    assert "unl_070" in read_manifest(str(pre / MANIFEST_2D))["cases"]  # recorded as soon as it finished
    monkeypatch.setattr(unlabeled_preprocessing, "_preprocess_one", real)
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)["2d"]
    assert summary["new"] == 1 and summary["num_cases"] == 5


# ---------------------------------------------------------------- 3. no test leakage
def test_test_images_in_imagesUnlabeled_are_refused(copied):
    raw, pre = copied
    unl = raw / "imagesUnlabeled"
    before = _snapshot(pre)
    shutil.copy(raw / "imagesTs" / "test_000_0000.nii.gz", unl / "test_000_0000.nii.gz")
    with pytest.raises(ValueError, match=r"\['test_000'\] also exist in imagesTs/labelsTs.*leaks the test set"):
        preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False)
    (unl / "test_000_0000.nii.gz").rename(unl / "unl_080_0000.nii.gz")  # same voxels under another id
    for skip_bad in (False, True):  # --skip-bad does not hide a leak
        with pytest.raises(ValueError, match=r"copies of test images.*unl_080: identical voxels to the test image\(s\) "
                                             r"\['test_000_0000.nii.gz'\]"):
            preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, verbose=False, skip_bad=skip_bad)
    assert _snapshot(pre) == before


# ---------------------------------------------------------------- 4. overwrite keeps the old data on failure
def test_overwrite_with_a_bad_file_keeps_the_old_data(copied, synthetic_dataset):
    raw, pre = copied
    before = _snapshot(pre)
    good = (raw / "imagesUnlabeled" / "unl_000_0000.nii.gz").read_bytes()
    (raw / "imagesUnlabeled" / "unl_090_0000.nii.gz").write_bytes(good[:300])
    with pytest.raises(ValueError, match="(?s)unl_090_0000.nii.gz: the gzip stream ends early.*Nothing was changed"):
        preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, overwrite=True, verbose=False)
    assert _snapshot(pre) == before
    assert len(_trainer_cases(raw, pre, synthetic_dataset)) == 3  # training is not blocked
    (raw / "imagesUnlabeled" / "unl_090_0000.nii.gz").unlink()
    summary = preprocess_unlabeled(str(DATASET_ID), ["2d"], PLANS, overwrite=True, verbose=False)["2d"]
    assert summary["new"] == 3 and not (pre / (FOLDER_2D + ".partial")).exists()


# ---------------------------------------------------------------- 5. make-splits
def test_group_regex_that_matches_nothing_is_refused(synthetic_dataset, tmp_path, monkeypatch, capsys):
    pre = tmp_path / "pre" / synthetic_dataset.name
    shutil.copytree(synthetic_dataset.preprocessed, pre)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    splits = (pre / "splits_final.json").read_text()
    cases = [(r"(patient\d+)", r"matched 0/8 cases into 8 groups: it matches no case id"),
             (r"(case)_\d+", r"matched 8/8 cases into 1 groups: every case is in the same group 'case'"),
             (r"(case", r"not a valid regular expression")]
    for regex, message in cases:
        assert main(["make-splits", "-d", str(DATASET_ID), "--labeled", "2", "--group-regex", regex]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and message in captured.err and "Traceback" not in captured.err
    assert (pre / "splits_final.json").read_text() == splits  # no fold appended or reused


def test_make_splits_writes_only_the_fold_number_to_stdout(synthetic_dataset, tmp_path, monkeypatch, capsys):
    pre = tmp_path / "pre" / synthetic_dataset.name
    shutil.copytree(synthetic_dataset.preprocessed, pre)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    # a grouping that straddles nnU-Net's ungrouped base fold: the summary and the WARNING must go to stderr
    base = json.loads((pre / "splits_final.json").read_text())[0]
    regex = f"(?:{base['val'][0]}|{base['train'][0]})()"  # one val and one train case share the group ''
    assert main(["make-splits", "-d", str(DATASET_ID), "--labeled", "2", "--group-regex", regex]) == 0
    captured = capsys.readouterr()
    splits = json.loads((pre / "splits_final.json").read_text())
    assert captured.out == f"{len(splits) - 1}\n"  # fold=$(nnunet_proto make-splits ...) gets just the number
    assert "matched 1/8 cases into 8 groups" in captured.err and "WARNING: groups" in captured.err


# ---------------------------------------------------------------- 6. benchmark
def _bench_args(results, *extra):
    return ["benchmark", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "--labeled", "3", "--epochs", "1",
            "--iterations", "1", "--name", "leak", "--results-dir", str(results), *extra]


def test_benchmark_refuses_test_leakage(copied, tmp_path, capsys):
    raw, pre = copied
    results = tmp_path / "bench"
    splits = (pre / "splits_final.json").read_text()
    shutil.copy(raw / "imagesTs" / "test_001_0000.nii.gz", raw / "imagesUnlabeled" / "unl_099_0000.nii.gz")
    assert main(_bench_args(results, "-tr", "nnUNetTrainerCPCL")) == 2
    err = capsys.readouterr().err
    assert "test leakage, the benchmark refuses to run" in err
    assert "test image test_001_0000.nii.gz has the same voxels as the unlabeled image" in err
    assert not (results / "runs.json").exists() and not (results / "runs").exists()
    assert (pre / "splits_final.json").read_text() == splits

    (raw / "imagesUnlabeled" / "unl_099_0000.nii.gz").unlink()
    shutil.copy(raw / "imagesTs" / "test_001_0000.nii.gz", raw / "imagesTr" / "test_001_0000.nii.gz")
    assert main(_bench_args(results, "-tr", "nnUNetTrainerCPCL")) == 2
    err = capsys.readouterr().err
    assert "test case test_001 is also a labeled case" in err and "as the labeled image" in err
    assert not (results / "runs.json").exists()


def test_benchmark_misspelled_trainer_forget_and_report_only(copied, tmp_path, capsys):
    results = tmp_path / "bench"
    assert main(_bench_args(results, "--report-only")) == 2
    assert "nothing has run there yet" in capsys.readouterr().err

    assert main(_bench_args(results, "-tr", "nnUNetTrainerCPLC")) == 2
    err = capsys.readouterr().err
    assert "unknown trainer(s) nnUNetTrainerCPLC (did you mean nnUNetTrainerCPCL" in err and "Nothing was run" in err
    assert not (results / "runs.json").exists() and not (results / "benchmark_spec.json").exists()

    # a benchmark folder as the earlier code wrote it: runs.json lists runs that never started
    from nnunet_proto.benchmark.spec import BenchmarkSpec

    spec = BenchmarkSpec(dataset=str(DATASET_ID), configuration="2d", plans=PLANS, trainers=("nnUNetTrainerCPLC",),
                         amounts=("3",), seeds=(0,), test_images=".", test_labels=".", epochs=1,
                         iterations_per_epoch=1, name="leak")
    results.mkdir()
    (results / "benchmark_spec.json").write_text(spec.to_json())
    runs = [{"trainer": t, "amount": "3", "seed": 0, "fold": 5} for t in ("nnUNetTrainer", "nnUNetTrainerCPLC")]
    (results / "runs.json").write_text(json.dumps(runs))
    assert main(["benchmark", "--results-dir", str(results), "--forget", "nnUNetTrainerCPLC"]) == 0
    assert "dropped 1 run(s) of nnUNetTrainerCPLC" in capsys.readouterr().err
    assert [r["trainer"] for r in json.loads((results / "runs.json").read_text())] == ["nnUNetTrainer"]
    assert json.loads((results / "benchmark_spec.json").read_text())["trainers"] == []
    # plain and the A/A control are still planned (the spec keeps its default control)
    assert "Runs finished: 0/2" in (results / "report" / "README.md").read_text()
