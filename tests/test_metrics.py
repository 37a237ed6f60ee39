"""Dice / IoU / HD95 / ASD: analytic cases, empty-mask rule, folder evaluation and the CLI."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_proto.cli import main
from nnunet_proto.data.raw_io import write_nifti
from nnunet_proto.evaluation.metrics import (
    METRIC_NAMES,
    binary_metrics,
    evaluate_folders,
    image_diagonal_mm,
)

SPACING_3D = (2.0, 1.0, 0.8)  # (z, y, x) mm, deliberately anisotropic
SHAPE_3D = (25, 40, 50)  # 50 x 40 x 40 mm


def ball(shape, spacing, center_mm, radius_mm) -> np.ndarray:
    """Voxels whose centres lie within ``radius_mm`` of ``center_mm`` (physical coordinates, array order)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center_mm)) <= radius_mm ** 2


def continuous_surface_distances(radius: float, offset: float, dim: int) -> np.ndarray:
    """Distances from the surface of one ball to the surface of an equal ball shifted by ``offset``.

    A surface point at angle t to the shift axis lies |sqrt(r^2 - 2 r d cos t + d^2) - r| from the other
    surface. Equal surface measure: uniform t on a circle (2D), uniform cos t on a sphere (3D).
    By symmetry both directions have the same distribution.
    """
    u = np.linspace(-1, 1, 400_001) if dim == 3 else np.cos(np.linspace(0, 2 * np.pi, 400_001))
    return np.abs(np.sqrt(radius ** 2 - 2 * radius * offset * u + offset ** 2) - radius)


def test_identical_masks():
    a = ball(SHAPE_3D, SPACING_3D, (24, 20, 20), 9)
    m, rule = binary_metrics(a, a.copy(), SPACING_3D)
    assert rule == "both_present"
    assert m == {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "ASD": 0.0}


def test_dice_iou_exact_from_voxel_counts():
    a = np.zeros((12, 14, 16), bool)
    b = np.zeros_like(a)
    a[1:11, 2:12, 3:13] = True  # 1000 voxels
    b[1:11, 2:12, 5:15] = True  # 1000 voxels, 800 shared
    m, _ = binary_metrics(a, b, SPACING_3D)
    assert m["Dice"] == pytest.approx(2 * 800 / 2000)
    assert m["IoU"] == pytest.approx(800 / 1200)
    # the faces perpendicular to x are 2 voxels = 1.6 mm apart; nothing is farther than that
    assert 0 < m["ASD"] < m["HD95"] <= 1.6 + 1e-9


def test_concentric_spheres_anisotropic():
    r1, r2 = 8.0, 12.0
    inner = ball(SHAPE_3D, SPACING_3D, (24, 20, 20), r1)
    outer = ball(SHAPE_3D, SPACING_3D, (24, 20, 20), r2)
    m, _ = binary_metrics(outer, inner, SPACING_3D)
    n_in, n_out = inner.sum(), outer.sum()
    assert m["Dice"] == pytest.approx(2 * n_in / (n_in + n_out))  # inner is inside outer
    assert m["IoU"] == pytest.approx(n_in / n_out)
    assert m["Dice"] == pytest.approx(2 * r1 ** 3 / (r1 ** 3 + r2 ** 3), abs=0.01)  # continuous volumes
    voxel = max(SPACING_3D)
    # every point of either surface is exactly r2 - r1 from the other one
    assert abs(m["HD95"] - (r2 - r1)) <= voxel
    assert abs(m["ASD"] - (r2 - r1)) <= voxel


def test_offset_spheres_shift_along_coarse_axis():
    r, d = 10.0, 6.0  # shifted by 3 slices of 2 mm
    a = ball(SHAPE_3D, SPACING_3D, (22, 20, 20), r)
    b = ball(SHAPE_3D, SPACING_3D, (22 + d, 20, 20), r)
    m, _ = binary_metrics(a, b, SPACING_3D)
    inter = (a & b).sum()
    assert m["Dice"] == pytest.approx(2 * inter / (a.sum() + b.sum()))
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12  # volume of the intersection of two balls
    assert m["Dice"] == pytest.approx(lens / (4 / 3 * math.pi * r ** 3), abs=0.02)
    dist = continuous_surface_distances(r, d, dim=3)
    assert abs(m["HD95"] - np.percentile(dist, 95)) <= max(SPACING_3D)
    assert abs(m["ASD"] - dist.mean()) <= max(SPACING_3D)


@pytest.mark.parametrize("as_3d", [False, True], ids=["2d-array", "one-slice-3d"])
def test_offset_disks_anisotropic(as_3d):
    spacing, shape = (1.0, 0.7), (80, 100)  # (y, x) mm
    r, d = 15.0, 4.0
    a = ball(shape, spacing, (40, 30), r)
    b = ball(shape, spacing, (40, 30 + d), r)
    lens = 2 * r ** 2 * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r ** 2 - d ** 2)
    if as_3d:  # how 2D data sits in nnU-Net raw format: one slice of a 3D image, with a slice thickness
        a, b, spacing = a[None], b[None], (8.0, *spacing)
    m, _ = binary_metrics(a, b, spacing)
    assert m["Dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert m["Dice"] == pytest.approx(lens / (math.pi * r ** 2), abs=0.02)
    dist = continuous_surface_distances(r, d, dim=2)
    if as_3d:
        # the slice's top and bottom faces are surface too and lie partly on each other (distance 0), so
        # only bounds hold: no farther than in 2D, and not zero
        assert 0 < m["HD95"] <= np.percentile(dist, 95) + 1.0
        assert 0 < m["ASD"] <= dist.mean() + 1.0
    else:
        assert abs(m["HD95"] - np.percentile(dist, 95)) <= 1.0
        assert abs(m["ASD"] - dist.mean()) <= 1.0


def test_asd_is_symmetric_mean_of_directed_averages():
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    small = ball(SHAPE_3D, SPACING_3D, (24, 20, 20), 6)
    big = ball(SHAPE_3D, SPACING_3D, (26, 21, 19), 11)
    m, _ = binary_metrics(big, small, SPACING_3D)
    assert binary_metrics(small, big, SPACING_3D)[0]["ASD"] == pytest.approx(m["ASD"])
    # medpy's assd (voxel-face distances) is the same quantity by another discretisation: close, not equal
    assert m["ASD"] == pytest.approx(medpy_binary.assd(small, big, voxelspacing=SPACING_3D), abs=max(SPACING_3D))


def test_empty_mask_rule():
    empty = np.zeros(SHAPE_3D, bool)
    a = ball(SHAPE_3D, SPACING_3D, (24, 20, 20), 6)
    diagonal = image_diagonal_mm(SHAPE_3D, SPACING_3D)
    assert diagonal == pytest.approx(math.sqrt(50 ** 2 + 40 ** 2 + 40 ** 2))

    m, rule = binary_metrics(empty, empty, SPACING_3D)
    assert rule == "both_empty" and all(math.isnan(m[k]) for k in METRIC_NAMES)
    m, rule = binary_metrics(empty, a, SPACING_3D)
    assert rule == "reference_empty" and m == {"Dice": 0.0, "IoU": 0.0, "HD95": diagonal, "ASD": diagonal}
    m, rule = binary_metrics(a, empty, SPACING_3D)
    assert rule == "prediction_empty" and m == {"Dice": 0.0, "IoU": 0.0, "HD95": diagonal, "ASD": diagonal}


# ---------------------------------------------------------------------------------------- folders and CLI


def _label_map(shape, spacing, balls) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for label, center, radius in balls:
        out[ball(shape, spacing, center, radius)] = label
    return out


@pytest.fixture()
def folders(tmp_path: Path):
    """Three cases, labels 1 and 2: a regular case, label 2 absent from both, label 1 missed by the prediction."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    shape, sp = (6, 30, 32), (5.0, 1.2, 1.0)
    cases = {
        "case_a": ([(1, (15, 15, 12), 6), (2, (15, 15, 24), 4)], [(1, (15, 16, 12), 6), (2, (15, 15, 24), 4)]),
        "case_b": ([(1, (15, 15, 12), 6)], [(1, (15, 15, 12), 6)]),
        "case_c": ([(1, (15, 15, 12), 6), (2, (15, 15, 24), 4)], [(2, (15, 15, 24), 4)]),
    }
    for case, (r, p) in cases.items():
        write_nifti(_label_map(shape, sp, r), sp, ref / f"{case}.nii.gz")
        write_nifti(_label_map(shape, sp, p), sp, pred / f"{case}.nii.gz")
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "cavity": 1, "wall": 2},
                    "numTraining": 3, "file_ending": ".nii.gz"}
    (pred / "dataset.json").write_text(json.dumps(dataset_json))  # as nnUNetv2_predict leaves it
    return ref, pred, shape, sp


def test_evaluate_folders_rules_and_means(folders):
    ref, pred, shape, sp = folders
    res = evaluate_folders(ref, pred)
    assert res["labels"] == {"1": "cavity", "2": "wall"}
    per_case = {c["case"]: c["metrics"] for c in res["metric_per_case"]}
    assert per_case["case_b"]["1"]["Dice"] == 1.0 and per_case["case_b"]["2"]["rule"] == "both_empty"
    assert per_case["case_c"]["1"]["rule"] == "prediction_empty"
    assert per_case["case_c"]["1"]["HD95"] == pytest.approx(image_diagonal_mm(shape, sp))
    assert res["metric_per_case"][0]["spacing"] == pytest.approx(sp)  # NIfTI stores float32

    wall = res["mean"]["2"]
    assert wall["n_both_empty"] == 1 and wall["n_in_mean"] == 2 and wall["n_cases"] == 3
    assert wall["Dice"] == pytest.approx(1.0)  # the both-empty case is excluded, not counted as 0 or 1
    cavity = res["mean"]["1"]
    assert cavity["n_prediction_empty"] == 1 and cavity["n_in_mean"] == 3
    assert cavity["HD95"] == pytest.approx(np.mean([per_case[c]["1"]["HD95"] for c in per_case]))
    assert res["foreground_mean"]["Dice"] == pytest.approx((cavity["Dice"] + wall["Dice"]) / 2)

    only_wall = evaluate_folders(ref, pred, labels=[2])
    assert list(only_wall["mean"]) == ["2"] and only_wall["mean"]["2"]["name"] == "wall"
    assert evaluate_folders(ref, pred, num_processes=2)["mean"]["1"]["ASD"] == pytest.approx(cavity["ASD"])


def test_evaluate_folders_errors(folders, tmp_path):
    ref, pred, shape, sp = folders
    (pred / "case_b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 reference cases have no prediction.*case_b"):
        evaluate_folders(ref, pred)
    write_nifti(np.zeros(shape, np.uint8), (5.0, 1.2, 1.1), pred / "case_b.nii.gz")
    with pytest.raises(ValueError, match="case_b: prediction spacing"):
        evaluate_folders(ref, pred)
    write_nifti(np.zeros((6, 30, 31), np.uint8), sp, pred / "case_b.nii.gz")
    with pytest.raises(ValueError, match=r"case_b: prediction .* has shape \(6, 30, 31\)"):
        evaluate_folders(ref, pred)
    (pred / "dataset.json").unlink()
    with pytest.raises(ValueError, match="-l"):
        evaluate_folders(ref, pred)


def test_cli_evaluate_writes_json_and_csv(folders, tmp_path, capsys):
    ref, pred, _, _ = folders
    out = tmp_path / "results" / "summary.json"
    assert main(["evaluate", str(ref), str(pred), "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "HD95 mm" in table and "cavity" in table and "foreground" in table

    res = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert res["metrics"] == ["Dice", "IoU", "HD95", "ASD"]
    assert set(res) >= {"metric_per_case", "mean", "foreground_mean"}
    assert set(res["mean"]["1"]) >= set(METRIC_NAMES)
    case_b = next(c for c in res["metric_per_case"] if c["case"] == "case_b")
    assert case_b["metrics"]["2"]["Dice"] is None

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 3 * 2
    assert list(rows[0]) == ["case", "label", "name", "Dice", "IoU", "HD95", "ASD", "rule"]

    assert main(["evaluate", str(ref), str(tmp_path / "nope"), "-o", str(out), "--overwrite"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reference_against_itself(folders, tmp_path):
    ref, _, _, _ = folders
    res = evaluate_folders(ref, ref, labels=[1, 2])
    for v in res["mean"].values():
        assert (v["Dice"], v["IoU"], v["HD95"], v["ASD"]) == (1.0, 1.0, 0.0, 0.0)
    assert sitk.ReadImage(str(ref / "case_a.nii.gz")).GetSpacing() == pytest.approx((1.0, 1.2, 5.0))


def test_cli_evaluate_output_names_never_collide(folders, tmp_path, capsys):
    """-o x.csv keeps both outputs (x.json + x.csv), -o folder/ writes into the folder, no -o writes next to the
    predictions, and a bad -o fails before anything is computed."""
    ref, pred, _, _ = folders
    out = tmp_path / "x.csv"
    assert main(["evaluate", str(ref), str(pred), "-o", str(out)]) == 0
    res = json.loads((tmp_path / "x.json").read_text())  # the JSON is intact, not overwritten by the CSV
    assert set(res) >= {"metric_per_case", "mean"}
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and rows[0]["case"] == "case_a"
    assert "x.json and " in capsys.readouterr().err

    folder = tmp_path / "new_folder"
    assert main(["evaluate", str(ref), str(pred), "-o", str(folder) + "/"]) == 0
    assert (folder / "metrics.json").is_file() and (folder / "metrics.csv").is_file()
    # an existing folder without the slash (its results exist now: replacing them needs --overwrite)
    assert main(["evaluate", str(ref), str(pred), "-o", str(folder), "--overwrite"]) == 0
    assert main(["evaluate", str(ref), str(pred)]) == 0
    assert json.loads((pred / "metrics.json").read_text())["prediction_folder"] == str(pred)
    assert (pred / "metrics.csv").is_file()

    assert main(["evaluate", str(ref), str(pred), "-o", str(tmp_path / "x.txt")]) == 2
    assert "give a .json or .csv file name" in capsys.readouterr().err
