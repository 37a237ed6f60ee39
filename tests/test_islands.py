"""Stray-island statistics (evaluation/islands.py) and their section in the benchmark report."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import load_script

from nnunet_proto.evaluation.islands import (
    CACHE_NAME,
    cached_folder_islands,
    class_islands,
    folder_island_locations,
    folder_islands,
    island_locations,
    island_mask,
)


def _seg():
    seg = np.zeros((4, 20, 20), dtype=np.uint8)
    seg[1:3, 2:8, 2:8] = 1  # the organ: 2*6*6 = 72 voxels
    seg[0, 15, 15] = 1  # an island of 1 voxel
    seg[3, 18:20, 0:2] = 1  # an island of 4 voxels
    seg[1, 10:12, 10:12] = 2  # class 2: one blob of 4
    seg[2, 11, 12] = 2  # diagonal neighbour in 3D of the blob above: same component with full connectivity
    return seg


def test_class_islands_counts_components_and_the_share_outside_the_largest():
    seg = _seg()
    one = class_islands(seg, 1)
    assert one["components"] == 3 and one["outside_largest"] == pytest.approx(5 / 77)
    two = class_islands(seg, 2)
    assert two == {"components": 1, "outside_largest": 0.0}
    empty = class_islands(seg, 3)
    assert empty["components"] == 0 and math.isnan(empty["outside_largest"])


def _write(folder, name, seg):
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / f"{name}.nii.gz"))


def test_folder_means_skip_cases_without_the_class_and_the_cache_follows_the_files(tmp_path):
    pred = tmp_path / "pred"
    _write(pred, "a", _seg())
    _write(pred, "b", np.zeros((4, 20, 20), dtype=np.uint8))  # predicts nothing
    result = folder_islands(pred, [1, 2])
    assert result["mean"]["1"]["components"] == pytest.approx(1.5)  # (3 + 0) / 2
    assert result["mean"]["1"]["outside_largest"] == pytest.approx(5 / 77)  # case b has no class-1 voxel
    cache = tmp_path / CACHE_NAME
    first = cached_folder_islands(pred, [1, 2], cache)
    assert json.loads(cache.read_text())["islands"]["per_case"]["b"]["1"]["outside_largest"] is None
    again = cached_folder_islands(pred, [1, 2], cache)
    assert math.isnan(again["per_case"]["b"]["1"]["outside_largest"]) and again["mean"] == first["mean"]
    _write(pred, "c", _seg())  # a new file: recomputed
    assert set(cached_folder_islands(pred, [1, 2], cache)["per_case"]) == {"a", "b", "c"}
    with pytest.raises(FileNotFoundError, match="no .nii.gz segmentations"):
        folder_islands(tmp_path / "empty_dir_that_does_not_exist", [1])


def test_island_locations_split_islands_by_distance_to_the_reference_foreground(tmp_path):
    pred = _seg()  # class 1: organ 72 voxels + islands at (0,15,15) and (3,18:20,0:2); class 2: one blob
    ref = np.zeros_like(pred)
    ref[1:3, 2:8, 2:8] = 1
    ref[0, 14:17, 14:17] = 3  # the 1-voxel island lies on reference foreground (of another class)
    ref[3, 18:20, 2] = 2  # the 4-voxel island: 1 or 2 voxels (x = 1, 0) from it, 1 mm spacing in-plane
    assert island_mask(pred, 1).sum() == 5 and not island_mask(pred, 3).any()
    spacing = (10.0, 1.0, 1.0)
    near = island_locations(pred, ref, [1, 2, 3], spacing, near_mm=1.5)
    assert near == {"predicted": 82, "islands": 5, "in_reference": 1, "near": 2, "far": 2}
    assert island_locations(pred, ref, [1, 2, 3], spacing, near_mm=10)["near"] == 4
    # no reference foreground: every island is far; shapes must agree
    assert island_locations(pred, np.zeros_like(pred), [1, 2], spacing)["far"] == 5
    with pytest.raises(ValueError, match="shape"):
        island_locations(pred, ref[:2], [1], spacing)
    _write(tmp_path / "pred", "a", pred)
    _write(tmp_path / "pred", "b", pred)
    _write(tmp_path / "ref", "a", ref)
    with pytest.raises(FileNotFoundError, match="no reference"):
        folder_island_locations(tmp_path / "pred", tmp_path / "ref", [1, 2, 3])
    _write(tmp_path / "ref", "b", ref)
    total = folder_island_locations(tmp_path / "pred", tmp_path / "ref", [1, 2, 3], near_mm=1.5)
    assert total == {k: 2 * v for k, v in near.items()}


def test_island_locations_script_prints_one_row_per_prediction_folder(tmp_path, capsys):
    script = load_script("island_locations")
    pred, ref = _seg(), np.zeros((4, 20, 20), dtype=np.uint8)
    ref[1:3, 2:8, 2:8] = 1
    _write(tmp_path / "pred", "a", pred)
    _write(tmp_path / "labelsTs", "a", ref)
    script.main([str(tmp_path / "labelsTs"), str(tmp_path / "pred"), "-l", "1", "2"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {tmp_path / 'pred'}")]
    assert rows == [f"| {tmp_path / 'pred'} | {5 / 82:.3f} | 0.00 | 0.00 | 1.00 |"]
