"""Stray islands in a segmentation: connected components per class and the share of voxels outside the largest.

Semi-supervised trainers can predict more small false-positive islands far from the organ than plain
nnU-Net. nnU-Net's postprocessing (keep the largest component) removes them, but the raw predictions
show how often they occur, and ``island_locations`` where they lie relative to the reference
(``scripts/island_locations.py``). For one
class c of one case, with P = prediction == c:

- ``components``: number of connected components of P (full connectivity: 8 neighbours in 2D, 26 in 3D,
  as nnU-Net's ``remove_all_but_largest_component``);
- ``outside_largest``: voxels of P outside its largest component / voxels of P, in [0, 1]; NaN when P is
  empty (nothing predicted, no island).

Images are read as stored (ACDC thick-slice stacks are 3D arrays); spacing plays no role.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
from scipy import ndimage

from nnunet_proto.evaluation.metrics import _nan_to_none, read_segmentation

CACHE_NAME = "islands.json"


def _components(mask: np.ndarray):
    """(component map, count) of a boolean mask with full connectivity, as nnU-Net's postprocessing."""
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))


def class_islands(segmentation: np.ndarray, label: int) -> Dict[str, float]:
    """``{"components": n, "outside_largest": share}`` of one class in one segmentation array."""
    mask = np.asarray(segmentation) == label
    total = int(mask.sum())
    if total == 0:
        return {"components": 0, "outside_largest": math.nan}
    components, n = _components(mask)
    sizes = np.bincount(components.ravel())[1:]
    return {"components": int(n), "outside_largest": float(1.0 - sizes.max() / total)}


def island_mask(segmentation: np.ndarray, label: int) -> np.ndarray:
    """Voxels of class ``label`` outside its largest connected component (what postprocessing removes)."""
    mask = np.asarray(segmentation) == label
    if not mask.any():
        return mask
    components, _ = _components(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return mask & (components != sizes.argmax())


def island_locations(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int],
                     spacing: Iterable[float], near_mm: float = 10.0) -> Dict[str, int]:
    """Where one case's islands (all ``labels``) lie relative to the reference foreground (every label > 0).

    Counts voxels: ``predicted`` (of the labels), ``islands`` (outside each class' largest component),
    and the islands ``in_reference`` (on reference foreground of any class: a fragment on the organ),
    ``near`` (outside it but within ``near_mm`` of it, distance with the image spacing) and ``far``
    (farther, or no reference foreground at all). Counts, so that cases add up.
    """
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    labels = [int(lab) for lab in labels]
    islands = np.zeros(prediction.shape, bool)
    for lab in labels:
        islands |= island_mask(prediction, lab)
    organ = reference > 0
    if organ.any():
        distance = ndimage.distance_transform_edt(~organ, sampling=tuple(spacing))
    else:
        distance = np.full(prediction.shape, np.inf)
    return {"predicted": int(np.isin(prediction, labels).sum()), "islands": int(islands.sum()),
            "in_reference": int((islands & organ).sum()),
            "near": int((islands & ~organ & (distance <= near_mm)).sum()),
            "far": int((islands & (distance > near_mm)).sum())}


def _segmentation_files(folder: Path, file_ending: str) -> List[Path]:
    files = sorted(Path(folder).glob(f"*{file_ending}"))
    if not files:
        raise FileNotFoundError(f"no {file_ending} segmentations in {folder}")
    return files


def folder_islands(folder: Path, labels: Iterable[int], file_ending: str = ".nii.gz",
                   files: Optional[List[Path]] = None) -> Dict[str, dict]:
    """Per case and class island statistics of every ``*<file_ending>`` in ``folder``, plus the per-class mean.

    Returns ``{"per_case": {case: {label: stats}}, "mean": {label: {"components": mean, "outside_largest":
    mean over cases that predict the class}}}`` with labels as strings (JSON keys). ``files``: the folder's
    segmentations when the caller has already listed them.
    """
    labels = [int(lab) for lab in labels]
    per_case = {}
    for f in files if files is not None else _segmentation_files(folder, file_ending):
        seg, _ = read_segmentation(f)
        per_case[f.name[: -len(file_ending)]] = {str(lab): class_islands(seg, lab) for lab in labels}
    mean = {}
    for lab in map(str, labels):
        comps = [c[lab]["components"] for c in per_case.values()]
        shares = [c[lab]["outside_largest"] for c in per_case.values() if not math.isnan(c[lab]["outside_largest"])]
        mean[lab] = {"components": float(np.mean(comps)),
                     "outside_largest": float(np.mean(shares)) if shares else math.nan}
    return {"per_case": per_case, "mean": mean}


def folder_island_locations(predictions: Path, references: Path, labels: Iterable[int], near_mm: float = 10.0,
                            file_ending: str = ".nii.gz") -> Dict[str, int]:
    """``island_locations`` summed over every case of ``predictions`` (each must have its reference)."""
    total: Dict[str, int] = {}
    for f in _segmentation_files(predictions, file_ending):
        ref_file = Path(references) / f.name
        if not ref_file.is_file():
            raise FileNotFoundError(f"no reference {ref_file} for prediction {f}: pass the folder of the test labels")
        pred, _ = read_segmentation(f)
        ref, spacing = read_segmentation(ref_file)
        for k, v in island_locations(pred, ref, labels, spacing, near_mm).items():
            total[k] = total.get(k, 0) + v
    return total


def cached_folder_islands(folder: Path, labels: List[int], cache: Path, file_ending: str = ".nii.gz") -> dict:
    """``folder_islands`` stored in ``cache`` (JSON, NaN as null); recomputed when the labels or the files changed."""
    files = _segmentation_files(folder, file_ending)
    key = {"labels": [int(lab) for lab in labels], "files": [f.name for f in files]}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return _nan_back(stored["islands"])
    result = folder_islands(folder, labels, file_ending, files)
    cache.write_text(json.dumps({"key": key, "islands": _nan_to_none(result)}, indent=1))
    return result


def stored_islands(cache: Path) -> dict:
    """What ``cached_folder_islands`` stored in ``cache``, without the folder (its predictions may be gone)."""
    return _nan_back(json.loads(cache.read_text())["islands"])


def _nan_back(obj):
    """Inverse of ``_nan_to_none`` for this file's one nullable field."""
    if isinstance(obj, dict):
        return {k: (math.nan if k == "outside_largest" and v is None else _nan_back(v)) for k, v in obj.items()}
    return obj
