"""Stray-island statistics (evaluation/islands.py) and their section in the benchmark report."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_proto.evaluation.islands import CACHE_NAME, cached_folder_islands, class_islands, folder_islands


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
