"""Convert the community h5 releases of ACDC (SSL4MIS) and LA (UA-MT) into nnU-Net raw datasets.

In the spirit of nnU-Net's ``dataset_conversion/Dataset027_ACDC.py``: one call writes
``raw_root/DatasetXXX_Name/{imagesTr,labelsTr[,imagesTs,labelsTs]}`` and ``dataset.json``.

    nnunet_proto convert-acdc /data/acdc30_h5 -d 27 --test-count 10 --seed 0
    nnunet_proto convert-la /data/la20_h5 -d 28 --test-list 06SR5RBREL16DQ6M8LWS 0RZDK210BSMWAA6467LU
    nnunet_proto convert-acdc /data/acdc_unlabeled_h5 -d 27 --unlabeled   # images only -> imagesUnlabeled/

The images-only mode (``--unlabeled``, ``convert_h5_unlabeled``) adds h5 files that hold only an
``image`` (or whose labels are to be ignored) to ``imagesUnlabeled/`` of a dataset converted before,
with that dataset's spacing: the path a user's unlabeled scans take (then ``nnunet_proto
preprocess-unlabeled``). It refuses cases, and for ACDC patients, that are already in imagesTr or
imagesTs, so no test patient can leak into the unlabeled pool.

Source layouts:

- ACDC (SSL4MIS): ``patientXXX_frameYY.h5`` with ``image`` float32 (slices, H, W) scaled to 0..1 and
  ``label`` uint8 (0 background, 1 RV, 2 myocardium, 3 LV). The arrays are already (z, y, x). No
  spacing is stored; the spacing passed in (default 10 mm between slices, 1.5 x 1.5 mm in-plane) is
  written into every NIfTI and into dataset.json. The two frames (ED/ES) of one patient are the same
  heart, so the patient is the unit of every split: the test set takes whole patients, and
  dataset.json records the group regex ``(patient\\d+)`` and the case -> patient map so that
  ``nnunet_proto make-splits --group-regex`` keeps them together too.
- LA (UA-MT): ``<ID>.h5`` with ``image`` float32 (X, Y, Z), z-scored, and ``label`` uint8 0/1;
  isotropic 0.625 mm. The arrays are transposed to (z, y, x) before SimpleITK sees them, so voxel
  (i, j, k) of the NIfTI is ``h5['image'][i, j, k]``. Each case is its own patient.

Every h5 file is read completely before anything is written or deleted: a cut file (HDF5 records its
end-of-file address, so it fails to open), a data block that cannot be read and NaN or infinite image
values are refused, naming the file.

Everything the converter decided (spacing, groups, test cases, seed) is stored in dataset.json under
the key ``"nnunet_proto"``; nnU-Net ignores extra keys. Only numpy, h5py and SimpleITK are used.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from nnunet_proto.data.raw_io import check_dataset_folder_writable, write_nifti
from nnunet_proto.data.splits import LabeledAmount, choose_labeled, group_of

ACDC_GROUP_REGEX = r"(patient\d+)"
#: (z, y, x) in mm. ACDC's true in-plane spacing is about 1.37-1.68 mm and its slice thickness 5-10 mm;
#: the h5 release dropped both, so this is an assumption, recorded in dataset.json.
ACDC_DEFAULT_SPACING: Tuple[float, float, float] = (10.0, 1.5, 1.5)
LA_DEFAULT_SPACING: Tuple[float, float, float] = (0.625, 0.625, 0.625)
CHANNEL_NAMES = {"0": "MRI"}
FILE_ENDING = ".nii.gz"
#: subfolders a conversion writes; overwrite=True removes exactly these (and dataset.json), nothing else
WRITTEN_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


@dataclass(frozen=True)
class H5Format:
    """What distinguishes one h5 release from another."""

    key: str  # short name used in messages and dataset.json
    title: str  # human-readable source description
    reference: str
    labels: Dict[str, int]
    stem_regex: str  # a file stem must match this fully
    group_regex: Optional[str]  # first capture group = patient; None: every case is its own patient
    h5_axes: str  # 'zyx': arrays are stored (z, y, x); 'xyz': stored (x, y, z) and transposed on reading
    default_spacing: Tuple[float, float, float]  # (z, y, x) mm
    spacing_note: str

    @property
    def test_unit(self) -> str:
        return "patient" if self.group_regex else "case"


ACDC = H5Format(
    key="acdc",
    title="ACDC cine MRI, SSL4MIS h5 release",
    reference="Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation "
              "and Diagnosis: Is the Problem Solved? IEEE TMI 2018",
    labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3},
    stem_regex=r"patient\d+_frame\d+",
    group_regex=ACDC_GROUP_REGEX,
    h5_axes="zyx",
    default_spacing=ACDC_DEFAULT_SPACING,
    spacing_note="assumed: the h5 files store no spacing (original data: 1.37-1.68 mm in-plane, 5-10 mm slices)",
)

LA = H5Format(
    key="la",
    title="Left atrium LGE-MRI (2018 Atrial Segmentation Challenge), UA-MT h5 release",
    reference="Xiong et al., A global benchmark of algorithms for segmenting the left atrium from late "
              "gadolinium-enhanced cardiac magnetic resonance imaging. Medical Image Analysis 2021",
    labels={"background": 0, "left_atrium": 1},
    stem_regex=r"[A-Za-z0-9]+",
    group_regex=None,
    h5_axes="xyz",
    default_spacing=LA_DEFAULT_SPACING,
    spacing_note="assumed: the h5 files store no spacing (original data: isotropic 0.625 mm)",
)


def _validate_spacing(spacing: Sequence[float]) -> Tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers (z, y, x) in mm, got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _validate_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name or ""):
        raise ValueError(f"dataset name must be letters, digits, '_' or '-' (it becomes part of the folder name "
                         f"Dataset{int(dataset_id):03d}_<name>), got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def list_h5_cases(input_dir: Path, fmt: H5Format) -> Dict[str, Path]:
    """Case id (file stem) -> h5 file, sorted by id; every stem must match ``fmt.stem_regex``."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist or is not a folder")
    files = sorted(input_dir.glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"no .h5 files in {input_dir}; expected the {fmt.title}")
    bad = [f.name for f in files if not re.fullmatch(fmt.stem_regex, f.stem)]
    if bad:
        raise ValueError(f"{len(bad)} file(s) in {input_dir} are not named like the {fmt.title} "
                         f"(stem must match {fmt.stem_regex!r}): {bad[:5]}. Remove them or use the other converter.")
    return {f.stem: f for f in files}


def _check_h5_image(path: Path) -> Tuple[int, ...]:
    """Shape of the ``image`` array in ``path`` (a 3D array), checked without reading the voxels."""
    try:
        with h5py.File(path, "r") as h:
            if "image" not in h:
                raise ValueError(f"{path} has no dataset 'image'; found {sorted(h.keys())}")
            shape = h["image"].shape
    except OSError as e:
        raise ValueError(f"cannot read {path} as HDF5: {e}. Copy or download the file again.") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{path}: 'image' must be a non-empty 3D array, got shape {shape}")
    return tuple(int(s) for s in shape)


def _check_h5_header(path: Path) -> Tuple[int, ...]:
    """Shape of the (image, label) pair in ``path``, checked without reading the voxels."""
    try:
        with h5py.File(path, "r") as h:
            missing = [k for k in ("image", "label") if k not in h]
            if missing:
                raise ValueError(f"{path} has no dataset(s) {missing}; found {sorted(h.keys())}")
            shape_img, shape_lab = h["image"].shape, h["label"].shape
    except OSError as e:
        raise ValueError(f"cannot read {path} as HDF5: {e}. Copy or download the file again.") from None
    if len(shape_img) != 3 or shape_img != shape_lab:
        raise ValueError(f"{path}: 'image' {shape_img} and 'label' {shape_lab} must be 3D arrays of the same shape")
    return tuple(int(s) for s in shape_img)


def _read_h5_arrays(path: Path, keys: Sequence[str]) -> List[np.ndarray]:
    """The arrays ``keys`` of ``path``, read completely; a file that breaks off while reading is a ValueError."""
    try:
        with h5py.File(path, "r") as h:
            return [np.asarray(h[k][...]) for k in keys]
    except OSError as e:  # a truncated or corrupt data block is only noticed when it is read
        raise ValueError(f"cannot read {path} completely ({e}); the file is truncated or corrupt. Copy or "
                         f"download it again. Nothing was written.") from None


def _check_finite_image(path: Path, image: np.ndarray) -> None:
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise ValueError(f"{path}: 'image' holds {bad} NaN or infinite value(s); replace them or leave the file "
                         f"out. Nothing was written.")


def read_h5_image(path: Path, fmt: H5Format) -> np.ndarray:
    """The ``image`` of one h5 file as float32 (z, y, x); any ``label`` in the file is not read."""
    _check_h5_image(path)
    (image,) = _read_h5_arrays(path, ("image",))
    image = image.astype(np.float32, copy=False)
    _check_finite_image(path, image)
    return np.ascontiguousarray(image.transpose(2, 1, 0)) if fmt.h5_axes == "xyz" else image


def read_h5_case(path: Path, fmt: H5Format) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32 (z, y, x), label uint8 (z, y, x)) of one h5 file; label values checked against fmt."""
    _check_h5_header(path)
    image, label_raw = _read_h5_arrays(path, ("image", "label"))
    image = image.astype(np.float32, copy=False)
    _check_finite_image(path, image)
    values = np.unique(label_raw)
    allowed = sorted(fmt.labels.values())
    unexpected = [v.item() for v in values if v not in allowed]
    if unexpected:
        raise ValueError(f"{path}: label values {unexpected} are not among the {fmt.key.upper()} labels "
                         f"{fmt.labels}; is this the right converter for these files?")
    label = label_raw.astype(np.uint8)
    if fmt.h5_axes == "xyz":
        # SimpleITK's GetImageFromArray reads numpy arrays as (z, y, x); reversing the axes makes voxel
        # (i, j, k) of the written image equal to h5 element [i, j, k].
        image, label = np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(label.transpose(2, 1, 0))
    return image, label


def select_test_cases(case_ids: Sequence[str], fmt: H5Format, test_count: int = 0,
                      test_ids: Optional[Sequence[str]] = None, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Choose the held-out test set; returns (test patients/cases, test cases), both sorted.

    The unit is ``fmt.test_unit``: for ACDC whole patients (both frames go together), for LA cases.
    Either ``test_ids`` names the units explicitly, or ``test_count`` units are drawn with
    ``np.random.default_rng(seed)`` (the same draw ``make-splits`` uses for labeled cases).
    """
    pattern = re.compile(fmt.group_regex) if fmt.group_regex else None
    case_group = {c: group_of(c, pattern) for c in case_ids}
    groups = sorted(set(case_group.values()))
    if test_ids and test_count:
        raise ValueError("give either a test count or a list of test ids, not both")
    if test_ids:
        unknown = [t for t in test_ids if t not in groups]
        if unknown:
            hint = ""
            if pattern and any(t in case_group for t in unknown):
                hint = (f" The test unit is the {fmt.test_unit} (both frames go together): pass e.g. "
                        f"{case_group[next(t for t in unknown if t in case_group)]!r} instead of a case id.")
            raise ValueError(f"test id(s) {unknown} are not {fmt.test_unit}s of the input; known "
                             f"{fmt.test_unit}s look like {groups[:3]}.{hint}")
        chosen = sorted(set(test_ids))
    elif test_count:
        if not 0 < test_count < len(groups):
            raise ValueError(f"test count must be between 0 and {len(groups) - 1} (the input has {len(groups)} "
                             f"{fmt.test_unit}s and at least one must stay for training), got {test_count}")
        test_cases, _ = choose_labeled(list(case_ids), LabeledAmount(count=test_count), seed, fmt.group_regex)
        chosen = sorted({case_group[c] for c in test_cases})
    else:
        chosen = []
    if len(chosen) == len(groups):
        raise ValueError(f"all {len(groups)} {fmt.test_unit}s were put into the test set; keep some for training")
    test_cases = sorted(c for c in case_ids if case_group[c] in set(chosen))
    return chosen, test_cases


def convert_h5_dataset(fmt: H5Format, input_dir: Path, raw_root: Path, dataset_id: int, name: str,
                       spacing: Optional[Sequence[float]] = None, test_count: int = 0,
                       test_ids: Optional[Sequence[str]] = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Convert every h5 file in ``input_dir`` into ``raw_root/DatasetXXX_name``; returns that folder.

    Args:
        fmt: ``ACDC`` or ``LA`` (module constants).
        spacing: (z, y, x) in mm; default ``fmt.default_spacing``.
        test_count / test_ids / seed: held-out test set, see ``select_test_cases``.
        overwrite: allow writing into an existing non-empty dataset folder; its imagesTr, labelsTr,
            imagesTs, labelsTs and dataset.json are deleted first so no stale case survives, other
            contents (e.g. imagesUnlabeled) are left alone.
    """
    sp = _validate_spacing(fmt.default_spacing if spacing is None else spacing)
    out = Path(raw_root) / _validate_name(dataset_id, name)
    check_dataset_folder_writable(out, overwrite)
    cases = list_h5_cases(Path(input_dir), fmt)
    for path in cases.values():  # fail on a broken file before writing anything
        _check_h5_header(path)
    test_units, test_cases = select_test_cases(list(cases), fmt, test_count, test_ids, seed)
    for path in cases.values():  # read every file completely (broken data, NaN) before anything is deleted
        read_h5_case(path, fmt)

    if out.exists():
        for sub in WRITTEN_SUBFOLDERS:
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "dataset.json").unlink(missing_ok=True)
    test_set = set(test_cases)
    for case, path in cases.items():
        img_dir, lab_dir = ("imagesTs", "labelsTs") if case in test_set else ("imagesTr", "labelsTr")
        (out / img_dir).mkdir(parents=True, exist_ok=True)
        (out / lab_dir).mkdir(parents=True, exist_ok=True)
        image, label = read_h5_case(path, fmt)
        write_nifti(image, sp, out / img_dir / f"{case}_0000{FILE_ENDING}")
        write_nifti(label, sp, out / lab_dir / f"{case}{FILE_ENDING}")

    pattern = re.compile(fmt.group_regex) if fmt.group_regex else None
    num_training = len(cases) - len(test_cases)
    zyx = "x".join(f"{s:g}" for s in sp)
    test_text = (f"{len(test_cases)} test cases ({len(test_units)} {fmt.test_unit}s) in imagesTs/labelsTs"
                 if test_cases else "no test set")
    description = (f"{fmt.title}, converted by nnunet_proto from {len(cases)} h5 files. Voxel spacing (z, y, x) = "
                   f"{zyx} mm, {fmt.spacing_note}. {num_training} training cases, {test_text}.")
    dataset_json = {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": dict(fmt.labels),
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": description,
        "reference": fmt.reference,
        "converted_by": f"nnunet_proto convert-{fmt.key}",
        "nnunet_proto": {
            "source_format": fmt.title,
            "source_folder": str(Path(input_dir).resolve()),
            "h5_axes": fmt.h5_axes,
            "spacing_zyx_mm": list(sp),
            "spacing_note": fmt.spacing_note,
            "group_regex": fmt.group_regex,
            "case_to_patient": {c: group_of(c, pattern) for c in cases},
            "test": {"unit": fmt.test_unit, "selection": "list" if test_ids else ("count" if test_count else "none"),
                     "count": len(test_units), "seed": seed if test_count else None,
                     f"{fmt.test_unit}s": test_units, "cases": test_cases},
        },
    }
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out


def find_dataset_folder(raw_root: Path, dataset_id: int) -> Path:
    """The existing ``raw_root/DatasetXXX_*`` folder of ``dataset_id`` (exactly one must exist)."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, got {dataset_id}")
    found = sorted(p for p in Path(raw_root).glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one dataset folder Dataset{int(dataset_id):03d}_* in {raw_root}, found "
            f"{[p.name for p in found] or 'none'}. Convert the labeled data first (without --unlabeled), then add "
            f"the unlabeled images to it.")
    return found[0]


def convert_h5_unlabeled(fmt: H5Format, input_dir: Path, raw_root: Path, dataset_id: int,
                         spacing: Optional[Sequence[float]] = None, overwrite: bool = False) -> Tuple[Path, List[str]]:
    """Write the images of every h5 file in ``input_dir`` into ``imagesUnlabeled/`` of an existing dataset.

    Returns (dataset folder, case ids written). Labels in the files are ignored. The spacing defaults to
    the one recorded in the dataset's dataset.json by the labeled conversion, and a different explicit
    spacing is refused (the unlabeled images must look like the labeled ones to nnU-Net's
    preprocessing). Refused before anything is written: a case id, or (for ACDC) a patient, that is
    already in imagesTr or imagesTs (that would leak test patients or duplicate labeled ones), and
    existing files in imagesUnlabeled unless ``overwrite``. Nothing else of the dataset is touched.
    """
    out = find_dataset_folder(Path(raw_root), dataset_id)
    info = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").is_file() else {}
    recorded = (info.get("nnunet_proto") or {}).get("spacing_zyx_mm")
    if spacing is not None and recorded is not None and \
            not np.allclose(_validate_spacing(spacing), recorded):
        raise ValueError(f"spacing {tuple(spacing)} differs from the spacing {tuple(recorded)} recorded in "
                         f"{out / 'dataset.json'} for the labeled images; omit --spacing to use the recorded one")
    sp = _validate_spacing(spacing if spacing is not None else (recorded or fmt.default_spacing))
    ending = info.get("file_ending", FILE_ENDING)
    cases = list_h5_cases(Path(input_dir), fmt)
    for path in cases.values():  # fail on a broken file before writing anything
        _check_h5_image(path)
    pattern = re.compile(fmt.group_regex) if fmt.group_regex else None
    existing = {}
    for sub in ("imagesTr", "imagesTs"):
        for f in (out / sub).glob(f"*_0000{ending}") if (out / sub).is_dir() else []:
            case = f.name[: -len(ending) - 5]
            existing[group_of(case, pattern)] = f"{sub}/{f.name}"
    clash = {c: existing[group_of(c, pattern)] for c in cases if group_of(c, pattern) in existing}
    if clash:
        first = dict(list(clash.items())[:5])
        raise ValueError(f"{len(clash)} unlabeled case(s) belong to a {fmt.test_unit} that is already in the "
                         f"dataset (labeled or test): {first}. Remove them from {input_dir}; the unlabeled pool must "
                         f"not contain test or labeled {fmt.test_unit}s.")
    target = out / "imagesUnlabeled"
    present = [c for c in cases if (target / f"{c}_0000{ending}").exists()]
    if present and not overwrite:
        raise FileExistsError(f"{len(present)} image(s) already exist in {target}, e.g. {present[:3]}; pass "
                              f"overwrite=True (CLI: --overwrite) to replace them")
    for path in cases.values():  # read every file completely (broken data, NaN) before anything is written
        read_h5_image(path, fmt)
    target.mkdir(parents=True, exist_ok=True)
    for case, path in cases.items():
        tmp = target / f".{case}_0000{ending}.tmp{ending}"
        write_nifti(read_h5_image(path, fmt), sp, tmp)
        tmp.replace(target / f"{case}_0000{ending}")
    return out, list(cases)


def convert_acdc_h5(input_dir: Path, raw_root: Path, dataset_id: int, name: str = "ACDC",
                    spacing: Sequence[float] = ACDC_DEFAULT_SPACING, test_count: int = 0,
                    test_patients: Optional[Sequence[str]] = None, seed: int = 0, overwrite: bool = False) -> Path:
    """ACDC (SSL4MIS h5) -> nnU-Net raw. Test unit = patient (``patient001``); spacing (z, y, x) mm."""
    return convert_h5_dataset(ACDC, input_dir, raw_root, dataset_id, name, spacing, test_count, test_patients,
                              seed, overwrite)


def convert_la_h5(input_dir: Path, raw_root: Path, dataset_id: int, name: str = "LA",
                  spacing: Sequence[float] = LA_DEFAULT_SPACING, test_count: int = 0,
                  test_cases: Optional[Sequence[str]] = None, seed: int = 0, overwrite: bool = False) -> Path:
    """LA (UA-MT h5, arrays (X, Y, Z)) -> nnU-Net raw. Test unit = case (file stem); spacing (z, y, x) mm."""
    return convert_h5_dataset(LA, input_dir, raw_root, dataset_id, name, spacing, test_count, test_cases,
                              seed, overwrite)


FORMATS: Dict[str, H5Format] = {ACDC.key: ACDC, LA.key: LA}
