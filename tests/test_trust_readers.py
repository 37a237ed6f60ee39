"""Results you can trust (issue 24, items 1, 3, 5, 6): every command that reads images refuses what SimpleITK would
silently read wrong (a cut gzip stream, a short voxel block, NaN/Inf voxels), evaluation refuses what it cannot
score and names what it scores but probably should not, and the leakage checks see a re-typed copy of a test image.

Each test runs the command a user runs (``nnunet_proto.cli.main``), asserts the exit code, that the message names
the file, and that nothing was lost (outputs, manifests and caches unchanged).
"""
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET_ID, PLANS

from nnunet_proto.cli import main
from nnunet_proto.data.convert_h5 import ACDC, convert_acdc_h5, convert_h5_unlabeled
from nnunet_proto.data.image_check import HASH_VERSION, hash_version, image_content_hash, voxel_hash_v1
from nnunet_proto.data.leakage import check_test_leakage
from nnunet_proto.data.raw_io import write_nifti
from nnunet_proto.training.unlabeled import read_manifest, source_changes

MANIFEST_2D = "nnUNetPlans_2d_unlabeled.json"
FOLDER_2D = "nnUNetPlans_2d_unlabeled"
DEFECTS = ("cut_gzip", "short_block", "non_finite")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict:
    """{relative path: sha256} of every file below ``folder`` (what 'nothing was lost' compares)."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def make_defect(good: Path, defect: str, out: Path) -> None:
    """Write a broken copy of the NIfTI ``good`` to ``out`` (``out`` may be ``good``).

    cut_gzip: the gzip stream cut in half; short_block: a complete gzip stream whose voxel block is half as long
    as the header announces (SimpleITK zero-fills both); non_finite: one NaN and one +Inf voxel in a float32 copy
    with the same geometry (SimpleITK reads them as 0).
    """
    data = good.read_bytes()
    if defect == "cut_gzip":
        out.write_bytes(data[: len(data) // 2])
    elif defect == "short_block":
        raw = gzip.decompress(data)
        out.write_bytes(gzip.compress(raw[: 352 + (len(raw) - 352) // 2]))
    else:
        image = sitk.ReadImage(str(good))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array.flat[0], array.flat[-1] = np.nan, np.inf
        broken = sitk.GetImageFromArray(array)
        broken.CopyInformation(image)
        sitk.WriteImage(broken, str(out), useCompression=True)


DEFECT_TEXT = {"cut_gzip": "the gzip stream ends early", "short_block": "the header announces",
               "non_finite": "NaN or infinite"}


# ---------------------------------------------------------------- evaluation folders
LABELS = {"background": 0, "cavity": 1, "wall": 2}


def _label_map(seed: int, shape=(4, 24, 20)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    out[np.broadcast_to((y - 6 - seed) ** 2 + (x - 4) ** 2 < 12, shape)] = 1
    out[np.broadcast_to((y - 5) ** 2 + (x - 8 + seed) ** 2 < 3, shape)] = 2
    return out


@pytest.fixture()
def eval_folders(tmp_path: Path):
    """labelsTs-like references, predictions identical to them (true Dice 1.0), a dataset.json, a kept result."""
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for i in range(2):
        write_nifti(_label_map(i), (5.0, 1.2, 1.0), ref / f"case_{i}.nii.gz")
        shutil.copy(ref / f"case_{i}.nii.gz", pred / f"case_{i}.nii.gz")
    (pred / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": LABELS,
                                                   "numTraining": 2, "file_ending": ".nii.gz"}))
    out = tmp_path / "out" / "result.json"
    assert _evaluate(ref, pred, out) == 0  # an earlier result: a refused evaluation must leave it as it is
    assert json.loads(out.read_text())["foreground_mean"]["Dice"] == 1.0
    return ref, pred, out


def _evaluate(ref, pred, out, *extra):
    """``nnunet_proto evaluate ref pred -o out --overwrite``: even told to overwrite, a refusal writes nothing."""
    return main(["evaluate", str(ref), str(pred), "-o", str(out), "--overwrite", *extra])


def _kept(out: Path):
    return _sha(out), _sha(out.with_suffix(".csv"))


# ---------------------------------------------------------------- copies of the planned synthetic dataset


def _bench_args(results, *extra):
    return ["benchmark", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "--labeled", "3", "--epochs", "1",
            "--iterations", "1", "--name", "trust", "--results-dir", str(results), "-tr", "nnUNetTrainerCPCL", *extra]


# ================================================================ 1. a truncated segmentation is never scored
def test_evaluate_refuses_a_truncated_prediction_or_reference(eval_folders, capsys):
    ref, pred, out = eval_folders
    kept = _kept(out)
    # the repro: the prediction's gzip stream cut in half was scored (foreground Dice 0.8775, truth 1.0)
    make_defect(ref / "case_1.nii.gz", "cut_gzip", pred / "case_1.nii.gz")
    assert _evaluate(ref, pred, out) == 2
    err = capsys.readouterr().err
    assert f"{pred / 'case_1.nii.gz'}: the gzip stream ends early" in err
    assert "case case_1, prediction" in err and "Predict this case again" in err and "Nothing was scored" in err
    assert _kept(out) == kept

    shutil.copy(ref / "case_1.nii.gz", pred / "case_1.nii.gz")
    make_defect(ref / "case_0.nii.gz", "short_block", ref / "case_0.nii.gz")  # a truncated reference
    assert _evaluate(ref, pred, out) == 2
    err = capsys.readouterr().err
    assert f"{ref / 'case_0.nii.gz'}: the header announces" in err and "truncated" in err
    assert "case case_0, reference" in err and "Export or copy the reference again" in err
    assert _kept(out) == kept


def test_benchmark_refuses_a_truncated_test_image_or_label_before_anything_runs(copied, tmp_path, capsys):
    raw, pre = copied
    results = tmp_path / "bench"
    before = _tree(pre)
    image = raw / "imagesTs" / "test_001_0000.nii.gz"
    good = image.read_bytes()
    make_defect(image, "cut_gzip", image)
    assert main(_bench_args(results)) == 2
    err = capsys.readouterr().err
    assert f"{image}: the gzip stream ends early" in err and "nothing was run" in err
    assert not (results / "runs.json").exists() and not (results / "runs").exists()
    assert not (results / "test_leakage_hashes.json").exists()
    assert _tree(pre) == before  # no fold added to splits_final.json

    image.write_bytes(good)
    label = raw / "labelsTs" / "test_000.nii.gz"
    make_defect(label, "short_block", label)
    assert main(_bench_args(results)) == 2
    err = capsys.readouterr().err
    assert f"{label}: the header announces" in err and "nothing was run" in err
    assert not (results / "runs.json").exists() and _tree(pre) == before


# ================================================================ 3. a re-typed copy of a test image is a leak
def _retyped_copy(src: Path, dst: Path) -> None:
    """``src`` saved again as float64 with identical values and geometry."""
    image = sitk.ReadImage(str(src))
    assert image.GetPixelID() != sitk.sitkFloat64
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat64), str(dst), useCompression=True)


def test_retyped_copy_of_a_test_image_is_refused_by_preprocess_unlabeled_and_benchmark(copied, tmp_path, capsys):
    raw, pre = copied
    copy = raw / "imagesUnlabeled" / "unl_099_0000.nii.gz"
    _retyped_copy(raw / "imagesTs" / "test_001_0000.nii.gz", copy)
    before = _tree(pre)
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 2
    err = capsys.readouterr().err
    assert "copies of test images (test leakage)" in err
    assert "unl_099: identical voxels to the test image(s) ['test_001_0000.nii.gz']" in err
    assert _tree(pre) == before

    results = tmp_path / "bench"
    assert main(_bench_args(results)) == 2
    err = capsys.readouterr().err
    assert f"test image test_001_0000.nii.gz has the same voxels as the unlabeled image {copy}" in err
    assert not (results / "runs.json").exists() and _tree(pre) == before


def _hash_v1(path: Path) -> str:
    """The hash the earlier code stored (dtype, shape and voxel bytes)."""
    return voxel_hash_v1(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_hashes_of_the_older_version_are_compared_in_their_version_and_rewritten(copied, synthetic_dataset,
                                                                                 tmp_path, capsys):
    """A manifest and a benchmark hash cache written with the version-1 hash: nothing looks changed, a touched
    file is still recognised, preprocess-unlabeled re-verifies (finding a re-typed test copy the old hash missed)
    and rewrites the records, and the benchmark recomputes its cache."""
    raw, pre = copied
    unl = raw / "imagesUnlabeled"

    def as_version_1(manifest):
        for records in manifest["files"].values():
            for r in records:
                r["sha256"] = _hash_v1(unl / r["name"])
        (pre / MANIFEST_2D).write_text(json.dumps(manifest))

    manifest = read_manifest(str(pre / MANIFEST_2D))
    assert all(hash_version(r["sha256"]) == HASH_VERSION for rs in manifest["files"].values() for r in rs)
    as_version_1(manifest)
    files = {c: [str(unl / f"{c}_0000.nii.gz")] for c in manifest["cases"]}
    touched = unl / "unl_001_0000.nii.gz"
    touched.write_bytes(touched.read_bytes())  # same voxels, new mtime: must be re-hashed in version 1
    changes = source_changes(read_manifest(str(pre / MANIFEST_2D)), files)
    assert changes.changed == [] and changes.vanished == [] and changes.touched == ["unl_001"]
    assert changes.outdated == ["unl_000", "unl_001", "unl_002"]
    # the trainer's check (the same source_changes) does not refuse an old manifest either
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 0
    out = capsys.readouterr().out
    assert "re-verifying 3 case(s) recorded with an older voxel hash" in out
    assert "0 unlabeled case(s) to preprocess" in out  # nothing preprocessed again
    upgraded = read_manifest(str(pre / MANIFEST_2D))
    assert upgraded["cases"] == manifest["cases"]
    assert all(r["sha256"] == image_content_hash(str(unl / r["name"]))
               for rs in upgraded["files"].values() for r in rs)

    # an old-code manifest that accepted a re-typed copy of a test image (version 1 could not see it)
    _retyped_copy(raw / "imagesTs" / "test_000_0000.nii.gz", unl / "unl_002_0000.nii.gz")
    as_version_1(upgraded)
    before = _tree(pre)
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 2
    err = capsys.readouterr().err
    assert "unl_002: identical voxels to the test image(s) ['test_000_0000.nii.gz']" in err
    assert _tree(pre) == before

    # the benchmark's cache of version-1 hashes (right size and mtime) is not trusted: recomputed and rewritten
    (unl / "unl_002_0000.nii.gz").unlink()
    cache = tmp_path / "hashes.json"
    entries = {}
    for p in sorted((raw / "imagesTs").iterdir()):
        st = p.stat()
        entries[str(p.resolve())] = [st.st_size, st.st_mtime_ns, _hash_v1(p)]
    cache.write_text(json.dumps(entries))
    _retyped_copy(raw / "imagesTs" / "test_001_0000.nii.gz", unl / "unl_098_0000.nii.gz")
    with pytest.raises(ValueError, match="test image test_001_0000.nii.gz has the same voxels as the unlabeled"):
        check_test_leakage(raw / "imagesTs", raw / "labelsTs", ".nii.gz", pre, raw, cache)
    (unl / "unl_098_0000.nii.gz").unlink()
    assert "voxel hashes of 2 test images" in check_test_leakage(raw / "imagesTs", raw / "labelsTs", ".nii.gz",
                                                                 pre, raw, cache)
    assert all(hash_version(v[2]) == HASH_VERSION for v in json.loads(cache.read_text()).values())


# ================================================================ 5. evaluation refuses what it cannot score
@pytest.mark.parametrize("change", ["direction", "origin"])
def test_evaluate_refuses_a_prediction_in_another_place(change, eval_folders, capsys):
    ref, pred, out = eval_folders
    kept = _kept(out)
    image = sitk.ReadImage(str(pred / "case_0.nii.gz"))
    if change == "direction":  # x flipped: scored today as if aligned (Dice 1.0)
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    else:
        image.SetOrigin((0.0, 3.6, 0.0))  # three voxels along y
    sitk.WriteImage(image, str(pred / "case_0.nii.gz"), useCompression=True)
    assert _evaluate(ref, pred, out) == 2
    err = capsys.readouterr().err
    assert f"case case_0: prediction {pred / 'case_0.nii.gz'} has {change}" in err
    assert str(ref / "case_0.nii.gz") in err and "not be at the same place" in err and "re-predict" in err
    assert _kept(out) == kept


def test_evaluate_refuses_a_float_probability_map_but_accepts_integer_floats(eval_folders, capsys):
    ref, pred, out = eval_folders
    kept = _kept(out)
    probabilities = _label_map(0).astype(np.float32) * 0.45  # 0.45, 0.9: scored as empty (Dice 0) before
    write_nifti(probabilities, (5.0, 1.2, 1.0), pred / "case_0.nii.gz")
    assert _evaluate(ref, pred, out) == 2
    err = capsys.readouterr().err
    assert f"{pred / 'case_0.nii.gz'}: a float image with" in err and "non-integer" in err and "0.45" in err
    assert _kept(out) == kept

    write_nifti(_label_map(0).astype(np.float32), (5.0, 1.2, 1.0), pred / "case_0.nii.gz")  # 0.0, 1.0, 2.0
    assert _evaluate(ref, pred, out) == 0
    assert json.loads(out.read_text())["foreground_mean"]["Dice"] == 1.0


def test_evaluate_warns_about_absent_and_undefined_labels(eval_folders, capsys):
    ref, pred, out = eval_folders
    assert _evaluate(ref, pred, out, "-l", "1", "99") == 0
    err = capsys.readouterr().err
    assert "WARNING: label 99 (99) occurs in no reference and no prediction of the 2 case(s)" in err
    assert f"not a label of {pred / 'dataset.json'}" in err and "-l" in err
    result = json.loads(out.read_text())
    assert result["mean"]["99"]["Dice"] is None and len(result["warnings"]) == 1
    assert result["foreground_mean"]["Dice"] == 1.0

    seg = _label_map(1)
    seg[0, :3, :3] = 7  # a value dataset.json does not define
    write_nifti(seg, (5.0, 1.2, 1.0), pred / "case_1.nii.gz")
    assert _evaluate(ref, pred, out) == 0  # scored (7 counts as background for labels 1 and 2), and named
    err = capsys.readouterr().err
    assert "WARNING: predictions hold label value(s) that" in err and "7 in 1 case(s) (case_1)" in err
    assert "references hold" not in err
    assert len(json.loads(out.read_text())["warnings"]) == 1


# ================================================================ 6. NaN/Inf in a NIfTI unlabeled image
def test_preprocess_unlabeled_refuses_nan_voxels_that_simpleitk_reads_as_zero(copied, capsys):
    raw, pre = copied
    bad = raw / "imagesUnlabeled" / "unl_097_0000.nii.gz"
    make_defect(raw / "imagesUnlabeled" / "unl_000_0000.nii.gz", "non_finite", bad)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(bad))).flat[0] == 0  # what every reader saw before
    before = _tree(pre)
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 2 of " in err and "voxels are NaN or infinite" in err and "--skip-bad" in err
    assert _tree(pre) == before
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "--skip-bad"]) == 0
    manifest = read_manifest(str(pre / MANIFEST_2D))
    assert "unl_097" not in manifest["cases"] and "unl_097" in manifest["skipped"]
    assert manifest["cases"] == ["unl_000", "unl_001", "unl_002"]


# ================================================================ every reader refuses every defect
@pytest.mark.parametrize("defect", DEFECTS)
def test_preprocess_unlabeled_refuses_each_defect(defect, copied, capsys):
    raw, pre = copied
    bad = raw / "imagesUnlabeled" / "unl_096_0000.nii.gz"
    make_defect(raw / "imagesUnlabeled" / "unl_001_0000.nii.gz", defect, bad)
    before = _tree(pre)
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: {DEFECT_TEXT[defect]}" in err or (f"{bad}: " in err and DEFECT_TEXT[defect] in err)
    assert _tree(pre) == before


@pytest.mark.parametrize("role", ["prediction", "reference"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_evaluate_refuses_each_defect(defect, role, eval_folders, capsys):
    ref, pred, out = eval_folders
    kept = _kept(out)
    target = (pred if role == "prediction" else ref) / "case_1.nii.gz"
    make_defect(ref / "case_1.nii.gz", defect, target)
    assert _evaluate(ref, pred, out) == 2
    err = capsys.readouterr().err
    assert f"case case_1, {role}: {target}: " in err and DEFECT_TEXT[defect] in err
    assert _kept(out) == kept


@pytest.fixture()
def leakage_folders(tmp_path: Path):
    """Minimal benchmark inputs for check_test_leakage: imagesTs/labelsTs and a raw dataset with imagesTr."""
    rng = np.random.default_rng(0)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for sub in ("imagesTs", "labelsTs", "imagesTr"):
        (raw / sub).mkdir(parents=True)
    pre.mkdir()
    for case, sub in (("test_0", "imagesTs"), ("test_1", "imagesTs"), ("train_0", "imagesTr")):
        write_nifti(rng.normal(size=(3, 12, 10)).astype(np.float32), (5.0, 1.0, 1.0), raw / sub / f"{case}_0000.nii.gz")
        if sub == "imagesTs":
            write_nifti(_label_map(0, (3, 12, 10)), (5.0, 1.0, 1.0), raw / "labelsTs" / f"{case}.nii.gz")
    cache = tmp_path / "hashes.json"
    cache.write_text("{}")
    return raw, pre, cache


@pytest.mark.parametrize("where", ["imagesTs/test_1_0000.nii.gz", "labelsTs/test_0.nii.gz",
                                   "imagesTr/train_0_0000.nii.gz"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_benchmark_leakage_check_refuses_each_defect(defect, where, leakage_folders):
    raw, pre, cache = leakage_folders
    target = raw / where
    make_defect(target, defect, target)
    with pytest.raises(ValueError) as err:
        check_test_leakage(raw / "imagesTs", raw / "labelsTs", ".nii.gz", pre, raw, cache)
    msg = str(err.value)
    assert f"{target}: " in msg and DEFECT_TEXT[defect] in msg and "nothing was run" in msg.lower()
    assert cache.read_text() == "{}"


def test_benchmark_leakage_check_counts_but_does_not_refuse_a_broken_unlabeled_image(leakage_folders):
    """preprocess-unlabeled refuses or skips a broken unlabeled image, so it is never trained on: only counted."""
    raw, pre, cache = leakage_folders
    (raw / "imagesUnlabeled").mkdir()
    make_defect(raw / "imagesTr" / "train_0_0000.nii.gz", "cut_gzip", raw / "imagesUnlabeled" / "u_0_0000.nii.gz")
    summary = check_test_leakage(raw / "imagesTs", raw / "labelsTs", ".nii.gz", pre, raw, cache)
    assert "voxel hashes of 2 test images (1 unreadable image(s) in imagesUnlabeled not compared" in summary


# h5 converters: HDF5 stores its end-of-file address, so a cut file is refused when it is opened; a "short block"
# inside an intact file does not exist in that format (a cut anywhere shortens the file), so the cut file covers it.
def _h5(path: Path, image: np.ndarray, label=None) -> None:
    with h5py.File(path, "w") as h:
        h.create_dataset("image", data=image)
        if label is not None:
            h.create_dataset("label", data=label)


@pytest.mark.parametrize("mode", ["labeled", "unlabeled"])
@pytest.mark.parametrize("defect", ["cut_file", "non_finite"])
def test_h5_converters_refuse_each_defect_before_writing(defect, mode, tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "h5"
    src.mkdir()
    raw = tmp_path / "raw"
    shape = (3, 8, 6)
    names = [f"patient{p:03d}_frame01" for p in (1, 2, 3)]
    for n in names:
        _h5(src / f"{n}.h5", rng.random(shape, dtype=np.float32), rng.integers(0, 4, shape).astype(np.uint8))
    if mode == "unlabeled":
        convert_acdc_h5(src, raw, 27, test_patients=["patient001"])
        shutil.rmtree(src)
        src.mkdir()
        names = [f"patient{p:03d}_frame01" for p in (20, 21)]
        for n in names:
            _h5(src / f"{n}.h5", rng.random(shape, dtype=np.float32))
    bad = src / f"{names[-1]}.h5"
    if defect == "cut_file":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(bad, "r+") as h:
            image = h["image"][...]
            image[0, 0, 0] = np.nan
            h["image"][...] = image
    before = _tree(raw) if raw.exists() else {}
    args = ["convert-acdc", str(src), "-d", "27", "-o", str(raw)] + (["--unlabeled"] if mode == "unlabeled" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ("truncated" in err if defect == "cut_file" else "NaN or infinite" in err)
    assert (_tree(raw) if raw.exists() else {}) == before  # nothing written (or deleted)
    if mode == "unlabeled":
        assert not (raw / "Dataset027_ACDC" / "imagesUnlabeled").exists()
    # the same for the Python API of the unlabeled mode
    if mode == "unlabeled":
        with pytest.raises(ValueError, match=str(bad.name)):
            convert_h5_unlabeled(ACDC, src, raw, 27)
