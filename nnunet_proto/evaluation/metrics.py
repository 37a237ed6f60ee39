"""Per-case, per-class Dice, IoU, HD95 and ASD (mm) of a prediction folder against a reference folder.

nnU-Net 2.8's own evaluator reports overlap metrics only. This module adds the surface distances
the semi-supervised literature reports, in millimetres with each reference image's voxel spacing,
using DeepMind's ``surface-distance`` package (surfel-area weighted distances; the distance maths
is theirs, not re-implemented here). See docs/evaluation.md.

Metrics for one class c of one case, with R = reference == c and P = prediction == c:

- ``Dice`` = 2 |R & P| / (|R| + |P|), ``IoU`` = |R & P| / |R | P| (voxel counts).
- ``HD95``: ``compute_robust_hausdorff(.., 95)``, the larger of the two directed 95th percentiles
  of surface-to-surface distances, in mm.
- ``ASD``: the *symmetric* average surface distance (often called ASSD), i.e. the mean of the two
  directed averages returned by ``compute_average_surface_distance`` (R -> P and P -> R), in mm.
  (medpy's ``asd`` is the directed R -> P value; ours is its ``assd`` counterpart.)

Empty-mask rule (the library itself returns inf or crashes when a mask is empty, so we decide first):

- both R and P empty (``both_empty``): all four metrics are NaN and the case is left out of that
  class's mean (nnU-Net's convention: nothing to find, nothing found, no information).
- exactly one of them empty (``reference_empty``: a false-positive structure; ``prediction_empty``: a
  missed structure): Dice 0, IoU 0, HD95 = ASD = the image diagonal in mm,
  sqrt(sum_i (shape_i * spacing_i)^2), an upper bound on any distance inside the image. The penalty is
  finite, so the case counts in the mean and a failure is never rewarded (some SSL codes report 0).
- otherwise (``both_present``): the metrics above.

Per class, the summary counts how many cases fell under each rule.

2D datasets in nnU-Net raw format are 3D images with one slice or thick-slice stacks; they are
evaluated as stored, on the 3D array with its 3D spacing (as SSL4MIS evaluates ACDC volumes, though
SSL4MIS ignores spacing). A genuinely 2D image file (e.g. a PNG) is evaluated in 2D.

What cannot be scored is refused, naming the file and the fix (a ValueError; nothing is written):
a truncated or corrupt file, a short voxel block or NaN/infinite raw voxels (``image_check.
check_file_complete``: SimpleITK would zero-fill them), a label map with non-integer values (a
probability map), and a prediction whose shape, spacing, origin or direction differs from its reference
(voxels would be compared that are not at the same place). What can be scored but is probably a
mistake is scored and warned about (stderr and the result's ``warnings``): a label that occurs in no
reference and no prediction (its means are NaN), and label values that dataset.json does not define.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from surface_distance import (
    compute_average_surface_distance,
    compute_robust_hausdorff,
    compute_surface_distances,
)
from tqdm import tqdm

from nnunet_proto.data.image_check import ImageError, read_complete

METRIC_NAMES: Tuple[str, ...] = ("Dice", "IoU", "HD95", "ASD")
RULE_BOTH_PRESENT = "both_present"
RULE_BOTH_EMPTY = "both_empty"
RULE_REFERENCE_EMPTY = "reference_empty"
RULE_PREDICTION_EMPTY = "prediction_empty"
RULES: Tuple[str, ...] = (RULE_BOTH_PRESENT, RULE_BOTH_EMPTY, RULE_REFERENCE_EMPTY, RULE_PREDICTION_EMPTY)
DEFAULT_FILE_ENDING = ".nii.gz"
#: relative tolerance for comparing reference and prediction spacing (NIfTI stores float32 pixdims)
SPACING_RTOL = 1e-4
#: origins may differ by this fraction of the smallest voxel size: far below what moves a voxel onto another
ORIGIN_TOL_VOXELS = 0.01
#: absolute tolerance for the direction cosines (NIfTI stores them as float32 quaternions)
DIRECTION_ATOL = 1e-4

EMPTY_MASK_RULE_TEXT = (
    "both masks empty: Dice, IoU, HD95, ASD = NaN (null in JSON) and the case is excluded from the class mean; "
    "exactly one mask empty: Dice 0, IoU 0, HD95 = ASD = image diagonal in mm (finite worst-case penalty); "
    "ASD is the symmetric average surface distance (mean of the two directed averages)."
)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """sqrt(sum_i (shape_i * spacing_i)^2) in mm: the physical diagonal of the image's extent."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def binary_metrics(reference: np.ndarray, prediction: np.ndarray,
                   spacing: Sequence[float]) -> Tuple[Dict[str, float], str]:
    """Dice, IoU, HD95, ASD of two masks, and which empty-mask rule applied (see the module docstring).

    Args:
        reference, prediction: boolean masks of the same shape, 2D (y, x) or 3D (z, y, x).
        spacing: voxel spacing in mm, one value per array axis, in the same order as the array axes.

    Returns:
        ({"Dice", "IoU", "HD95", "ASD"} -> float, rule) where rule is one of ``RULES``. Distances in mm.
    """
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if reference.ndim not in (2, 3) or len(spacing) != reference.ndim:
        raise ValueError(f"masks must be 2D or 3D with one spacing per axis; got shape {reference.shape} and "
                         f"spacing {tuple(spacing)}")
    n_ref, n_pred = int(np.count_nonzero(reference)), int(np.count_nonzero(prediction))
    if n_ref == 0 and n_pred == 0:
        return {m: float("nan") for m in METRIC_NAMES}, RULE_BOTH_EMPTY
    if n_ref == 0 or n_pred == 0:
        penalty = image_diagonal_mm(reference.shape, spacing)
        rule = RULE_REFERENCE_EMPTY if n_ref == 0 else RULE_PREDICTION_EMPTY
        return {"Dice": 0.0, "IoU": 0.0, "HD95": penalty, "ASD": penalty}, rule

    n_inter = int(np.count_nonzero(reference & prediction))
    # both masks are non-empty here, so the library never takes its empty-surface branch (which returns inf
    # and, in surface-distance 0.1 under numpy 2, raises on the removed np.Inf)
    distances = compute_surface_distances(reference, prediction, [float(s) for s in spacing])
    ref_to_pred, pred_to_ref = compute_average_surface_distance(distances)
    return {
        "Dice": 2.0 * n_inter / (n_ref + n_pred),
        "IoU": n_inter / (n_ref + n_pred - n_inter),
        "HD95": float(compute_robust_hausdorff(distances, 95)),
        "ASD": 0.5 * (float(ref_to_pred) + float(pred_to_ref)),
    }, RULE_BOTH_PRESENT


def case_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int],
                 spacing: Sequence[float]) -> Dict[str, Dict[str, object]]:
    """Metrics of every label in one case: {str(label): {"Dice", "IoU", "HD95", "ASD", "rule"}}.

    ``reference`` and ``prediction`` are label maps of the same shape; ``spacing`` in mm, array axis order.
    """
    out: Dict[str, Dict[str, object]] = {}
    for label in labels:
        values, rule = binary_metrics(reference == label, prediction == label, spacing)
        out[str(label)] = {**values, "rule": rule}
    return out


class Segmentation(NamedTuple):
    """A label map read by ``read_segmentation_image``."""

    array: np.ndarray  # integer labels in numpy axis order, e.g. (z, y, x)
    spacing: Tuple[float, ...]  # mm, numpy axis order
    origin: Tuple[float, ...]  # mm, SimpleITK (x, y, z) order
    direction: Tuple[float, ...]  # SimpleITK's direction cosines, row-major


def read_segmentation_image(path: os.PathLike) -> Segmentation:
    """Read a label map completely and check that it can be scored.

    Raises ValueError (``image_check.ImageError``) naming the file for a truncated or corrupt file, a short
    voxel block or NaN/infinite raw voxels (``check_file_complete``; SimpleITK would zero-fill them), a
    vector image, and non-integer values (a probability or intensity image, which compared with integer
    labels would score as empty). Integer-valued float maps are accepted and returned as integers.
    """
    path = str(path)
    image = read_complete(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ImageError(f"{path}: a vector image ({image.GetNumberOfComponentsPerPixel()} components per voxel), "
                         f"not a label map; write one integer label per voxel")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        fractional = ~finite | (array != np.round(array))
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(array[fractional])[:3])
            raise ImageError(f"{path}: a float image with {int(np.count_nonzero(fractional))} non-integer voxel "
                             f"value(s) (e.g. {examples}); a segmentation holds integer labels, and these voxels "
                             f"would match no label (scored as empty). Write the label map (argmax, integers), not "
                             f"probabilities or an intensity image.")
        array = array.astype(np.int64 if np.abs(array).max(initial=0) >= 2 ** 31 else np.int32)
    # SimpleITK reports spacing (x, y, z); numpy arrays from it are (z, y, x)
    return Segmentation(array, tuple(float(s) for s in reversed(image.GetSpacing())),
                        tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))


def read_segmentation(path: os.PathLike) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """(label map in numpy axis order, e.g. (z, y, x), spacing in mm in the same order).

    Checked as in ``read_segmentation_image`` (complete file, finite, integer labels).
    """
    seg = read_segmentation_image(path)
    return seg.array, seg.spacing


def _label_values(array: np.ndarray) -> List[int]:
    """The distinct values of an integer label map (bincount for small non-negative labels: fast)."""
    if array.size == 0:
        return []
    lo, hi = int(array.min()), int(array.max())
    if array.dtype.kind in "iu" and array.dtype.itemsize < 8 and lo >= 0 and hi < 65536:
        return [int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=hi + 1))]
    return [int(v) for v in np.unique(array)]


def _load_dataset_json(folders: Sequence[Path]) -> Tuple[Optional[dict], Optional[str]]:
    """The dataset.json to use (the first folder's wins) and the file ending all of them agree on."""
    found = [(f / "dataset.json", json.loads((f / "dataset.json").read_text()))
             for f in folders if (f / "dataset.json").is_file()]
    endings = {str(p): d["file_ending"] for p, d in found if "file_ending" in d}
    if len(set(endings.values())) > 1:
        raise ValueError(f"the dataset.json files disagree on file_ending: {endings}; remove the wrong one")
    return (found[0][1] if found else None), (next(iter(endings.values())) if endings else None)


def foreground_labels(dataset_json: dict) -> Dict[int, str]:
    """{label value: name} of the foreground labels of an nnU-Net dataset.json (value 0 is background)."""
    labels = dataset_json.get("labels", {})
    if "ignore" in labels:
        raise ValueError("dataset.json defines an 'ignore' label; its unannotated voxels would distort surface "
                         "distances, which nnunet_proto evaluate does not handle. Use nnUNetv2_evaluate_folder "
                         "for Dice on such datasets.")
    regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple))}
    if regions:
        raise ValueError(f"dataset.json uses region labels {regions}; pass the plain label values with -l instead")
    return {int(v): k for k, v in sorted(labels.items(), key=lambda kv: int(kv[1])) if int(v) != 0}


def _read_for_case(case: str, role: str, path: Path) -> Segmentation:
    fix = ("Predict this case again (nnUNetv2_predict writes complete label maps)" if role == "prediction"
           else "Export or copy the reference again")
    try:
        return read_segmentation_image(path)
    except ImageError as e:
        raise ImageError(f"case {case}, {role}: {e} Nothing was scored. {fix}, then re-run the evaluation.") from None


def _check_same_place(case: str, ref_file: Path, pred_file: Path, ref: Segmentation, pred: Segmentation) -> None:
    """Refuse a prediction whose origin or direction differs from its reference (after shape and spacing)."""
    where = (f"Predictions must be in the reference's geometry (nnUNetv2_predict writes them so): re-predict, or "
             f"resample {pred_file} onto the reference grid (nearest neighbour), or check that the folders belong "
             f"together.")
    tol = ORIGIN_TOL_VOXELS * min(ref.spacing)
    if len(ref.origin) != len(pred.origin) or not np.allclose(ref.origin, pred.origin, rtol=0, atol=tol):
        raise ValueError(f"case {case}: prediction {pred_file} has origin {_fmt(pred.origin)} but the reference "
                         f"{ref_file} has {_fmt(ref.origin)} mm (x, y, z): the voxels compared would not be at the "
                         f"same place. {where}")
    if len(ref.direction) != len(pred.direction) or not np.allclose(ref.direction, pred.direction, rtol=0,
                                                                    atol=DIRECTION_ATOL):
        raise ValueError(f"case {case}: prediction {pred_file} has direction {_fmt(pred.direction)} but the "
                         f"reference {ref_file} has {_fmt(ref.direction)} (axes flipped or rotated): the voxels "
                         f"compared would not be at the same place. {where}")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _evaluate_pair(case: str, ref_file: Path, pred_file: Path, labels: Sequence[int]) -> dict:
    ref_seg = _read_for_case(case, "reference", ref_file)
    pred_seg = _read_for_case(case, "prediction", pred_file)
    ref, ref_spacing = ref_seg.array, ref_seg.spacing
    pred, pred_spacing = pred_seg.array, pred_seg.spacing
    if ref.shape != pred.shape:
        raise ValueError(f"case {case}: prediction {pred_file} has shape {pred.shape} but the reference {ref_file} "
                         f"has {ref.shape} (numpy axis order). Predictions must be in the reference's geometry "
                         f"(nnUNetv2_predict writes them so); check that the folders belong together.")
    if len(ref_spacing) != len(pred_spacing) or not np.allclose(ref_spacing, pred_spacing, rtol=SPACING_RTOL, atol=0):
        raise ValueError(f"case {case}: prediction spacing {pred_spacing} != reference spacing {ref_spacing} mm "
                         f"(numpy axis order). Distances would be in the wrong units; resample the prediction "
                         f"onto the reference grid or check that the folders belong together.")
    _check_same_place(case, ref_file, pred_file, ref_seg, pred_seg)
    return {"case": case, "reference_file": str(ref_file), "prediction_file": str(pred_file),
            "shape": list(ref.shape), "spacing": list(ref_spacing),
            "metrics": case_metrics(ref, pred, labels, ref_spacing),
            "_values": {"reference": _label_values(ref), "prediction": _label_values(pred)}}


def summarize(per_case: List[dict], label_names: Dict[int, str]) -> Tuple[Dict[str, dict], Dict[str, float]]:
    """(per-class means with rule counts, foreground mean over classes) of ``metric_per_case`` entries.

    A class mean averages the cases whose rule is not ``both_empty`` (NaN if there are none); the
    foreground mean averages the defined class means.
    """
    mean: Dict[str, dict] = {}
    for label, name in label_names.items():
        entries = [c["metrics"][str(label)] for c in per_case]
        counts = {f"n_{r}": sum(e["rule"] == r for e in entries) for r in RULES}
        used = [e for e in entries if e["rule"] != RULE_BOTH_EMPTY]
        values = {m: float(np.mean([e[m] for e in used])) if used else float("nan") for m in METRIC_NAMES}
        mean[str(label)] = {"name": name, **values, "n_cases": len(entries), "n_in_mean": len(used), **counts}
    foreground = {}
    for m in METRIC_NAMES:
        defined = [v[m] for v in mean.values() if not math.isnan(v[m])]
        foreground[m] = float(np.mean(defined)) if defined else float("nan")
    return mean, foreground


def evaluate_folders(reference_folder: os.PathLike, prediction_folder: os.PathLike,
                     labels: Optional[Sequence[int]] = None, file_ending: Optional[str] = None,
                     num_processes: int = 1, progress: bool = False) -> dict:
    """Evaluate every reference case against the prediction of the same file name.

    Args:
        reference_folder: reference label maps (e.g. ``labelsTs``).
        prediction_folder: predictions named like the references (e.g. ``nnUNetv2_predict``'s output).
        labels: label values to evaluate; default all foreground labels of the dataset.json found in the
            prediction folder (nnUNetv2_predict copies it there) or else in the reference folder.
        file_ending: default: ``file_ending`` of that dataset.json, else ``.nii.gz``.
        num_processes: cases evaluated in parallel (processes).
        progress: show a tqdm progress bar (stderr).

    Returns:
        {"reference_folder", "prediction_folder", "file_ending", "labels": {str(label): name}, "metrics",
        "empty_mask_rule", "metric_per_case": [{"case", "reference_file", "prediction_file", "shape",
        "spacing", "metrics": {str(label): {"Dice", "IoU", "HD95", "ASD", "rule"}}}],
        "mean": {str(label): {"name", "Dice", ..., "n_cases", "n_in_mean", "n_<rule>" for each rule}},
        "foreground_mean": {"Dice", ...}, "unmatched_predictions": [...], "warnings": [...] (``label_warnings``,
        also printed to stderr)}. NaN marks undefined values.

    Raises:
        FileNotFoundError: a folder is missing, holds no reference file, or predictions are missing.
        ValueError: no labels can be determined; a reference or prediction is truncated, corrupt, non-finite or
            not integer (``read_segmentation_image``); or a prediction's shape, spacing, origin or direction
            differs from its reference.
    """
    ref_dir, pred_dir = Path(reference_folder), Path(prediction_folder)
    for d in (ref_dir, pred_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder {d} does not exist")
    dataset_json, json_ending = _load_dataset_json([pred_dir, ref_dir])
    ending = file_ending or json_ending or DEFAULT_FILE_ENDING
    if labels:
        known = {v: k for k, v in (dataset_json or {}).get("labels", {}).items() if isinstance(v, int)}
        label_names = {int(l): known.get(int(l), str(l)) for l in labels}
    elif dataset_json:
        label_names = foreground_labels(dataset_json)
    else:
        raise ValueError(f"no dataset.json in {pred_dir} or {ref_dir} to take the labels from; pass them with -l "
                         f"(e.g. -l 1 2 3)")
    if not label_names:
        raise ValueError("no foreground label to evaluate; pass labels with -l")

    cases = sorted(f.name[: -len(ending)] for f in ref_dir.iterdir() if f.name.endswith(ending))
    if not cases:
        raise FileNotFoundError(f"no reference files ending in {ending!r} in {ref_dir}")
    missing = [c for c in cases if not (pred_dir / f"{c}{ending}").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(cases)} reference cases have no prediction in {pred_dir}: "
                                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Predict them or evaluate a "
                                f"reference folder that holds only the predicted cases.")
    predicted = sorted(f.name[: -len(ending)] for f in pred_dir.iterdir() if f.name.endswith(ending))
    jobs = [(c, ref_dir / f"{c}{ending}", pred_dir / f"{c}{ending}", list(label_names)) for c in cases]
    bar = tqdm(total=len(jobs), desc="evaluating", unit="case", disable=not progress)
    with bar:
        if num_processes > 1:
            with ProcessPoolExecutor(max_workers=num_processes) as pool:
                per_case = []
                for result in pool.map(_evaluate_pair, *zip(*jobs)):
                    per_case.append(result)
                    bar.update(1)
        else:
            per_case = []
            for job in jobs:
                per_case.append(_evaluate_pair(*job))
                bar.update(1)
    values = {c["case"]: c.pop("_values") for c in per_case}
    json_file = next((d / "dataset.json" for d in (pred_dir, ref_dir) if (d / "dataset.json").is_file()), None)
    warnings = label_warnings(per_case, values, label_names, dataset_json, json_file)
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    mean, foreground = summarize(per_case, label_names)
    return {
        "reference_folder": str(ref_dir), "prediction_folder": str(pred_dir), "file_ending": ending,
        "labels": {str(k): v for k, v in label_names.items()}, "metrics": list(METRIC_NAMES),
        "empty_mask_rule": EMPTY_MASK_RULE_TEXT,
        "metric_per_case": per_case, "mean": mean, "foreground_mean": foreground,
        "unmatched_predictions": sorted(set(predicted) - set(cases)), "warnings": warnings,
    }


def label_warnings(per_case: List[dict], values: Dict[str, Dict[str, List[int]]], label_names: Dict[int, str],
                   dataset_json: Optional[dict], json_file: Optional[Path]) -> List[str]:
    """Warnings about labels that are scored but probably not what the user meant (see the module docstring).

    - a label that occurs in no reference and no prediction: every case is ``both_empty``, its means are NaN
      and it is left out of the foreground mean (typically a mistyped ``-l``);
    - label values in a reference or prediction that dataset.json does not define. They are scored (as
      background to every evaluated label, so a prediction is penalised, never rewarded) and named with the
      cases that hold them: refusing would also block the labels that are right, and the usual causes (a
      model trained with another label numbering, the wrong dataset.json) are for the user to judge.

    ``values``: {case: {"reference": [values], "prediction": [values]}}.
    """
    out = []
    defined = None
    if dataset_json is not None:
        defined = {int(v) for v in dataset_json.get("labels", {}).values() if isinstance(v, int)}
    for label, name in label_names.items():
        rules = [c["metrics"][str(label)]["rule"] for c in per_case]
        if rules and all(r == RULE_BOTH_EMPTY for r in rules):
            extra = ""
            if defined is not None and label not in defined:
                extra = (f" It is not a label of {json_file} either ({dataset_json.get('labels')}): check the "
                         f"labels given with -l.")
            out.append(f"label {label} ({name}) occurs in no reference and no prediction of the {len(rules)} case(s): "
                       f"its Dice, IoU, HD95 and ASD are NaN and it is left out of the foreground mean.{extra}")
    if defined is None:
        return out
    for role in ("prediction", "reference"):
        unknown: Dict[int, List[str]] = {}
        for case in sorted(values):
            for v in values[case][role]:
                if v not in defined:
                    unknown.setdefault(v, []).append(case)
        if unknown:
            found = "; ".join(f"{v} in {len(cs)} case(s) ({', '.join(cs[:3])}{', ...' if len(cs) > 3 else ''})"
                              for v, cs in sorted(unknown.items()))
            out.append(f"{role}s hold label value(s) that {json_file} does not define "
                       f"({dataset_json.get('labels')}): {found}. Unless evaluated with -l, these voxels count as "
                       f"background for every evaluated label. Check that the {role} folder belongs to this "
                       f"dataset and uses its label numbering.")
    return out


def _nan_to_none(obj):
    """JSON has no NaN: write undefined values as null so strict parsers can read the file."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


#: file names used when ``-o`` is a folder or not given (next to the predictions)
DEFAULT_RESULT_NAME = "metrics"


def result_paths(output: Optional[os.PathLike], prediction_folder: os.PathLike) -> Tuple[Path, Path]:
    """(JSON path, CSV path) for an evaluation output given as a file, a folder or nothing.

    - None: ``<prediction_folder>/metrics.json`` and ``.csv`` (like nnUNetv2_evaluate_folder, which writes
      its summary into the prediction folder);
    - an existing folder, or a path ending in a separator: ``<folder>/metrics.json`` and ``.csv``;
    - ``x.json`` or ``x.csv``: ``x.json`` and ``x.csv`` (either name gives both, never the same file twice);
    - a path without a suffix that is not a folder: ``path.json`` and ``path.csv``.

    Raises ValueError for another suffix (e.g. ``x.txt``), naming the accepted forms.
    """
    if output is None:
        base = Path(prediction_folder) / DEFAULT_RESULT_NAME
    else:
        text = os.fspath(output)
        out = Path(text)
        if out.is_dir() or text.endswith((os.sep, "/")):
            base = out / DEFAULT_RESULT_NAME
        elif out.suffix.lower() in (".json", ".csv"):
            base = out.with_suffix("")
        elif out.suffix == "":
            base = out
        else:
            raise ValueError(f"-o {text!r}: give a .json or .csv file name (both are written, with the same stem) "
                             f"or a folder (metrics.json and metrics.csv go there)")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")


def write_results(results: dict, output: os.PathLike) -> Tuple[Path, Path]:
    """Write ``results`` as JSON (NaN -> null) and a CSV (one row per case and class); returns both paths.

    ``output`` is resolved by ``result_paths`` (a .json or .csv name, or a folder): the two files always
    share a stem and never overwrite each other.
    """
    json_path, csv_path = result_paths(output, results.get("prediction_folder", "."))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_nan_to_none(results), indent=2, allow_nan=False))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", "name", *METRIC_NAMES, "rule"])
        for c in results["metric_per_case"]:
            for label, v in c["metrics"].items():
                writer.writerow([c["case"], label, results["labels"][label], *(v[m] for m in METRIC_NAMES), v["rule"]])
    return json_path, csv_path


def format_mean_table(results: dict) -> str:
    """Plain-text table of the per-class means, rule counts and the foreground mean."""
    head = (f"{'label':>5} {'name':<14} {'Dice':>7} {'IoU':>7} {'HD95 mm':>8} {'ASD mm':>8} {'n':>4} "
            f"{'both_empty':>10} {'ref_empty':>9} {'pred_empty':>10}")
    lines = [head, "-" * len(head)]
    for label, v in results["mean"].items():
        lines.append(f"{label:>5} {v['name'][:14]:<14} {v['Dice']:7.4f} {v['IoU']:7.4f} {v['HD95']:8.2f} "
                     f"{v['ASD']:8.2f} {v['n_in_mean']:>4} {v[f'n_{RULE_BOTH_EMPTY}']:>10} "
                     f"{v[f'n_{RULE_REFERENCE_EMPTY}']:>9} {v[f'n_{RULE_PREDICTION_EMPTY}']:>10}")
    fg = results["foreground_mean"]
    lines.append(f"{'':>5} {'foreground':<14} {fg['Dice']:7.4f} {fg['IoU']:7.4f} {fg['HD95']:8.2f} {fg['ASD']:8.2f}")
    return "\n".join(lines)
