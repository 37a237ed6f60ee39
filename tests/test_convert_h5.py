"""h5 -> nnU-Net raw converters on tiny generated files (no downloaded data needed)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_proto.cli import main
from nnunet_proto.data.convert_h5 import ACDC, convert_acdc_h5, convert_h5_unlabeled, convert_la_h5

ACDC_SHAPE = (3, 6, 5)  # (slices, H, W): all different so a swapped axis cannot go unnoticed
LA_SHAPE = (7, 5, 4)  # (X, Y, Z)


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as h:
        h.create_dataset("image", data=image.astype(np.float32))
        h.create_dataset("label", data=label.astype(np.uint8))


def _case_arrays(seed: int, shape, num_labels: int):
    rng = np.random.default_rng(seed)
    # a ramp makes every voxel distinct, so axis order and flips are checked exactly
    image = (np.arange(np.prod(shape)).reshape(shape) / np.prod(shape) + seed).astype(np.float32)
    label = rng.integers(0, num_labels, size=shape)
    return image, label


@pytest.fixture()
def acdc_dir(tmp_path: Path) -> Path:
    d = tmp_path / "acdc_h5"
    d.mkdir()
    for p in (1, 2, 3, 5, 8, 13):
        for f in (1, 2):
            _write_h5(d / f"patient{p:03d}_frame{f:02d}.h5", *_case_arrays(p * 10 + f, ACDC_SHAPE, 4))
    return d


@pytest.fixture()
def la_dir(tmp_path: Path) -> Path:
    d = tmp_path / "la_h5"
    d.mkdir()
    for i, name in enumerate(["A1B2", "C3D4", "E5F6", "G7H8"]):
        _write_h5(d / f"{name}.h5", *_case_arrays(i, LA_SHAPE, 2))
    return d


def _read(path: Path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _ids(folder: Path, suffix: str):
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def test_acdc_shapes_labels_spacing(acdc_dir, tmp_path):
    out = convert_acdc_h5(acdc_dir, tmp_path / "raw", 27, spacing=(10.0, 1.5, 1.25))
    assert out.name == "Dataset027_ACDC"
    img, arr = _read(out / "imagesTr" / "patient003_frame02_0000.nii.gz")
    lab, lab_arr = _read(out / "labelsTr" / "patient003_frame02.nii.gz")
    src_img, src_lab = _case_arrays(32, ACDC_SHAPE, 4)
    # h5 (slices, H, W) is already numpy (z, y, x): SimpleITK size is (W, H, slices), spacing (x, y, z)
    assert img.GetSize() == (5, 6, 3) and lab.GetSize() == (5, 6, 3)
    assert img.GetSpacing() == pytest.approx((1.25, 1.5, 10.0))
    assert lab.GetSpacing() == pytest.approx((1.25, 1.5, 10.0))
    np.testing.assert_array_equal(arr, src_img)
    np.testing.assert_array_equal(lab_arr, src_lab)
    assert lab_arr.dtype == np.uint8 and arr.dtype == np.float32

    info = json.loads((out / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert info["channel_names"] == {"0": "MRI"}
    assert info["file_ending"] == ".nii.gz"
    assert info["numTraining"] == len(list((out / "imagesTr").iterdir())) == 12
    assert not (out / "imagesTs").exists()
    assert "10x1.5x1.25 mm" in info["description"]
    meta = info["nnunet_proto"]
    assert meta["spacing_zyx_mm"] == [10.0, 1.5, 1.25]
    assert meta["group_regex"] == r"(patient\d+)"
    assert meta["case_to_patient"]["patient013_frame02"] == "patient013"
    assert len(meta["case_to_patient"]) == 12
    assert meta["test"]["cases"] == [] and meta["test"]["selection"] == "none"


def test_la_axis_order_and_default_spacing(la_dir, tmp_path):
    out = convert_la_h5(la_dir, tmp_path / "raw", 28)
    img, arr = _read(out / "imagesTr" / "C3D4_0000.nii.gz")
    _, lab_arr = _read(out / "labelsTr" / "C3D4.nii.gz")
    src_img, src_lab = _case_arrays(1, LA_SHAPE, 2)
    # h5 (X, Y, Z) -> SimpleITK size (X, Y, Z), and voxel index (i, j, k) holds h5[i, j, k]
    assert img.GetSize() == LA_SHAPE
    assert img.GetSpacing() == pytest.approx((0.625, 0.625, 0.625))
    for idx in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (5, 3, 2)]:
        assert img.GetPixel(idx) == pytest.approx(src_img[idx])
    np.testing.assert_array_equal(arr, src_img.transpose(2, 1, 0))
    np.testing.assert_array_equal(lab_arr, src_lab.transpose(2, 1, 0))
    info = json.loads((out / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "left_atrium": 1}
    assert info["nnunet_proto"]["spacing_zyx_mm"] == [0.625, 0.625, 0.625]
    assert info["numTraining"] == 4


def test_acdc_test_set_keeps_patients_together(acdc_dir, tmp_path):
    out = convert_acdc_h5(acdc_dir, tmp_path / "raw", 27, test_count=2, seed=0)
    test = json.loads((out / "dataset.json").read_text())["nnunet_proto"]["test"]
    assert test["unit"] == "patient" and test["count"] == 2 and test["seed"] == 0
    assert len(test["patients"]) == 2
    ts, ts_labels, tr = _ids(out / "imagesTs", "_0000.nii.gz"), _ids(out / "labelsTs", ".nii.gz"), \
        _ids(out / "imagesTr", "_0000.nii.gz")
    assert ts == ts_labels == test["cases"]
    assert ts == sorted(f"{p}_frame{f:02d}" for p in test["patients"] for f in (1, 2))
    assert not {c.split("_")[0] for c in tr} & set(test["patients"])
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(tr) == 8


def test_seeded_test_choice_is_reproducible(acdc_dir, tmp_path):
    def chosen(seed: int, root: str):
        out = convert_acdc_h5(acdc_dir, tmp_path / root, 27, test_count=2, seed=seed)
        return json.loads((out / "dataset.json").read_text())["nnunet_proto"]["test"]["patients"]

    assert chosen(3, "a") == chosen(3, "b")
    assert len({tuple(chosen(s, f"s{s}")) for s in range(5)}) > 1  # the seed matters


def test_explicit_test_list(acdc_dir, la_dir, tmp_path):
    out = convert_acdc_h5(acdc_dir, tmp_path / "raw", 27, test_patients=["patient005"])
    assert _ids(out / "imagesTs", "_0000.nii.gz") == ["patient005_frame01", "patient005_frame02"]
    with pytest.raises(ValueError, match="'patient002'"):  # a case id: the message names the patient to pass
        convert_acdc_h5(acdc_dir, tmp_path / "raw2", 27, test_patients=["patient002_frame01"])
    with pytest.raises(ValueError, match="both"):
        convert_acdc_h5(acdc_dir, tmp_path / "raw3", 27, test_patients=["patient005"], test_count=1)
    out = convert_la_h5(la_dir, tmp_path / "raw", 28, test_cases=["E5F6"])
    assert _ids(out / "labelsTs", ".nii.gz") == ["E5F6"]
    assert json.loads((out / "dataset.json").read_text())["nnunet_proto"]["test"]["cases"] == ["E5F6"]


def test_overwrite_protection(acdc_dir, tmp_path):
    raw = tmp_path / "raw"
    out = convert_acdc_h5(acdc_dir, raw, 27, test_patients=["patient001"])
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_acdc_h5(acdc_dir, raw, 27)
    (out / "imagesUnlabeled").mkdir()  # user content outside the converter's folders survives
    convert_acdc_h5(acdc_dir, raw, 27, test_patients=["patient002"], overwrite=True)
    assert _ids(out / "imagesTs", "_0000.nii.gz") == ["patient002_frame01", "patient002_frame02"]
    assert "patient001_frame01" in _ids(out / "imagesTr", "_0000.nii.gz")  # no stale test case left behind
    assert (out / "imagesUnlabeled").is_dir()


def test_rejects_bad_input(acdc_dir, la_dir, tmp_path):
    _write_h5(la_dir / "BAD1.h5", np.zeros(LA_SHAPE), np.full(LA_SHAPE, 3))
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        convert_la_h5(la_dir, tmp_path / "raw", 28)
    with pytest.raises(ValueError, match="not named like"):
        convert_acdc_h5(la_dir, tmp_path / "raw", 27)
    with pytest.raises(ValueError, match="spacing"):
        convert_acdc_h5(acdc_dir, tmp_path / "raw", 27, spacing=(10.0, 0.0, 1.5))
    with pytest.raises(ValueError, match="test count"):
        convert_acdc_h5(acdc_dir, tmp_path / "raw", 27, test_count=6)


def test_cli_convert(acdc_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    args = ["convert-acdc", str(acdc_dir), "-d", "27", "-o", str(raw), "--test-count", "1", "--seed", "1",
            "--spacing", "8", "1.4", "1.4"]
    assert main(args) == 0
    assert "10 training cases, 2 test cases from 1 patients" in capsys.readouterr().out
    info = json.loads((raw / "Dataset027_ACDC" / "dataset.json").read_text())
    assert info["nnunet_proto"]["spacing_zyx_mm"] == [8.0, 1.4, 1.4]
    assert main(args) == 2  # exists: refused, error printed by main()
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def _write_image_only(path: Path, image: np.ndarray) -> None:
    with h5py.File(path, "w") as h:
        h.create_dataset("image", data=image.astype(np.float32))


def test_unlabeled_images_only_mode(acdc_dir, tmp_path, capsys):
    """Images-only h5 files go into imagesUnlabeled with the dataset's spacing; nothing else is touched."""
    raw = tmp_path / "raw"
    out = convert_acdc_h5(acdc_dir, raw, 27, spacing=(8.0, 1.4, 1.4), test_patients=["patient001"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    unl = tmp_path / "unlabeled_h5"
    unl.mkdir()
    for p in (21, 34):
        for f in (1, 9):
            _write_image_only(unl / f"patient{p:03d}_frame{f:02d}.h5", _case_arrays(p + f, ACDC_SHAPE, 4)[0])
    assert main(["convert-acdc", str(unl), "-d", "27", "-o", str(raw), "--unlabeled"]) == 0
    assert "wrote 4 unlabeled images" in capsys.readouterr().out
    assert _ids(out / "imagesUnlabeled", "_0000.nii.gz") == ["patient021_frame01", "patient021_frame09",
                                                             "patient034_frame01", "patient034_frame09"]
    img, arr = _read(out / "imagesUnlabeled" / "patient021_frame09_0000.nii.gz")
    np.testing.assert_allclose(img.GetSpacing(), (1.4, 1.4, 8.0))  # (x, y, z) = the labeled dataset's spacing
    np.testing.assert_array_equal(arr, _case_arrays(30, ACDC_SHAPE, 4)[0])
    assert {p: p.stat().st_mtime_ns for p in before} == before  # labeled/test files and dataset.json untouched
    # a second run refuses to overwrite, a different spacing is refused
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_acdc_h5_unlabeled(unl, raw)
    with pytest.raises(ValueError, match="differs from the spacing"):
        convert_h5_unlabeled(ACDC, unl, raw, 27, spacing=(10.0, 1.5, 1.5), overwrite=True)


def test_unlabeled_mode_refuses_test_and_labeled_patients(acdc_dir, tmp_path):
    """A frame of a test (or labeled) patient, even a frame not in the dataset, cannot enter the unlabeled pool."""
    raw = tmp_path / "raw"
    out = convert_acdc_h5(acdc_dir, raw, 27, test_patients=["patient001"])
    unl = tmp_path / "unlabeled_h5"
    unl.mkdir()
    _write_image_only(unl / "patient050_frame01.h5", np.ones(ACDC_SHAPE))
    _write_image_only(unl / "patient001_frame07.h5", np.ones(ACDC_SHAPE))  # other frame of a test patient
    with pytest.raises(ValueError, match=r"patient001_frame07.*imagesTs"):
        convert_acdc_h5_unlabeled(unl, raw)
    assert not (out / "imagesUnlabeled").exists()  # refused before anything was written
    (unl / "patient001_frame07.h5").unlink()
    _write_image_only(unl / "patient002_frame05.h5", np.ones(ACDC_SHAPE))  # a labeled training patient
    with pytest.raises(ValueError, match="imagesTr"):
        convert_acdc_h5_unlabeled(unl, raw)
    with pytest.raises(FileNotFoundError, match="Convert the labeled data first"):
        convert_h5_unlabeled(ACDC, unl, raw, 99)


def convert_acdc_h5_unlabeled(input_dir: Path, raw: Path):
    return convert_h5_unlabeled(ACDC, input_dir, raw, 27)
