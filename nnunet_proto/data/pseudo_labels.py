"""``nnunet_proto pseudo-label``: offline pseudo labels of the unlabeled pool from a finished nnU-Net run.

The recipe nnU-Net's maintainers give for unlabeled scans (train, predict the unlabeled cases, train again on
both), with nnU-Net's own machinery at every step:

* the teacher is any finished run (plain ``nnUNetTrainer`` or one of ours), loaded by ``nnUNetPredictor``
  (sliding window, Gaussian weighting, mirroring unless ``use_mirroring=False``);
* its postprocessing is applied where it was determined (``fold_X/validation/postprocessing.pkl`` as
  ``nnunet_proto benchmark`` and ``self-train`` write it, or nnU-Net's ``crossval_results_folds_X``), with
  nnU-Net's ``apply_postprocessing``;
* each pseudo label is preprocessed with the plans' own preprocessor *with* the label (``run_case(images,
  label, ...)``, as nnU-Net preprocesses labelsTr), so the student trains through nnU-Net's data loader and
  loss like on labeled cases.

The pool is the dataset's unlabeled cases: ``imagesUnlabeled/`` and the fold's ``unlabeled`` split list (images
from imagesTr whose labels are never read). Training and validation cases of the fold are never in it; test
cases are refused by id and by voxel content, and so are copies of the fold's validation images.

A *pseudo-label set* belongs to the student that learns from it: (dataset, plans, configuration, fold, round).
It lives apart from the ground truth, in ``$NNUNET_PROTO_PSEUDO_LABELS/<dataset>/<set>/`` (default
``$nnUNet_preprocessed/<dataset>/pseudo_labels/<set>/``, ``<set>`` = ``<plans>__<configuration>__fold_<k>__round_<r>``):

* ``labels/<case><ending>`` the pseudo labels in the images' own geometry (for inspection, and to re-preprocess);
* ``<data_identifier>/`` the preprocessed cases (images + pseudo labels) the student reads;
* ``manifest.json``: the teacher (model folder, checkpoint path and sha256, mirroring, postprocessing), the
  preprocessing fingerprint, per case its source, image records (size, mtime, voxel hash), the label's sha256
  and its confidence (mean max-softmax inside the predicted foreground, and mean normalised entropy there), the
  ranking by confidence, and which least-confident share is dropped.

The manifest is rewritten after every case, so an interrupted run resumes where it stopped. Asking for a set
with another teacher (or other mirroring / postprocessing) is refused by name unless ``overwrite``; a changed
image is predicted again; a vanished one leaves the set. ``open_set`` is what the student calls at start: it
refuses a set whose images or teacher checkpoint changed since, whose plans changed, or that holds test cases.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from nnunet_proto.data.image_check import FileRecord, ImageError, check_case, hash_version, image_content_hash

PSEUDO_LABELS_ENV = "NNUNET_PROTO_PSEUDO_LABELS"
MANIFEST = "manifest.json"
SET_FORMAT = 1
#: share of the least confident pseudo labels the student leaves out unless told otherwise. 0.0: on ACDC
#: validation (docs/methods/self_training.md) dropping the least confident quarter did not help; see there.
DEFAULT_DROP = 0.0
SOURCE_FOLDER = "imagesUnlabeled"
SOURCE_SPLIT = "split"


class PseudoLabelError(ValueError):
    """A pseudo-label set that cannot be used or made as asked; the message names the set, the case and the fix."""


# ---------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class SetKey:
    """Which student a pseudo-label set is for."""

    dataset: str  # DatasetXXX_Name
    plans: str
    configuration: str
    fold: int
    round: int = 1

    @property
    def name(self) -> str:
        return f"{self.plans}__{self.configuration}__fold_{self.fold}__round_{self.round}"


def pseudo_label_root(dataset: str) -> Path:
    """``$NNUNET_PROTO_PSEUDO_LABELS/<dataset>``, else ``$nnUNet_preprocessed/<dataset>/pseudo_labels``."""
    root = os.environ.get(PSEUDO_LABELS_ENV)
    if root:
        return Path(root) / dataset
    from nnunet_proto.training.compat import nnUNet_preprocessed, require_env_path

    return Path(require_env_path(nnUNet_preprocessed)) / dataset / "pseudo_labels"


def set_folder(key: SetKey) -> Path:
    return pseudo_label_root(key.dataset) / key.name


@dataclass(frozen=True)
class Teacher:
    """A finished nnU-Net run that predicts the pseudo labels."""

    trainer: str
    plans: str
    configuration: str
    fold: int
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = True

    def model_folder(self, dataset: str) -> Path:
        from nnunet_proto.training.compat import get_output_folder

        return Path(get_output_folder(dataset, self.trainer, self.plans, self.configuration))

    def checkpoint_path(self, dataset: str) -> Path:
        return self.model_folder(dataset) / f"fold_{self.fold}" / self.checkpoint

    def describe(self) -> str:
        return (f"{self.trainer} ({self.plans}, {self.configuration}, fold {self.fold}, {self.checkpoint}, "
                f"{'with' if self.use_mirroring else 'without'} mirroring)")


def file_sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- confidence


def confidence_stats(probabilities: np.ndarray, segmentation: np.ndarray) -> Dict[str, float]:
    """How sure the teacher is of one pseudo label.

    Args:
        probabilities: (C, *spatial) softmax probabilities of the C classes (background included).
        segmentation: (*spatial) the pseudo label (after postprocessing), 0 = background.
    Returns:
        ``confidence``: mean over the predicted foreground of the largest class probability (0.0 when nothing is
        predicted: an empty pseudo label ranks last); ``entropy``: mean over the predicted foreground of the
        entropy divided by log C (0 certain, 1 uniform; 1.0 when empty); ``foreground_fraction``.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    fg = np.asarray(segmentation) > 0
    if probs.shape[1:] != fg.shape:
        raise ValueError(f"probabilities {probs.shape} and segmentation {fg.shape} disagree in shape")
    n = int(fg.sum())
    if n == 0:
        return {"confidence": 0.0, "entropy": 1.0, "foreground_fraction": 0.0}
    p = probs[:, fg]  # (C, n)
    ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(0) / math.log(max(probs.shape[0], 2))
    return {"confidence": float(p.max(0).mean()), "entropy": float(ent.mean()),
            "foreground_fraction": n / fg.size}


def ranking(cases: Dict[str, dict]) -> List[str]:
    """Case ids, most confident first (ties: by lower entropy, then by id)."""
    return sorted(cases, key=lambda c: (-cases[c]["confidence"], cases[c]["entropy"], c))


def least_confident(cases: Dict[str, dict], share: float) -> List[str]:
    """The ``round(share * n)`` least confident cases (at least one case is always kept)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the share of pseudo labels to drop must be in [0, 1), got {share}")
    order = ranking(cases)
    n_drop = min(int(round(share * len(order))), max(0, len(order) - 1))
    return order[len(order) - n_drop:] if n_drop else []


# ---------------------------------------------------------------------------------------------- the pool


def _split_images(raw_folder: Path, case: str, n_channels: int, ending: str) -> List[str]:
    files = [str(raw_folder / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"unlabeled split case {case!r}: image file(s) {missing} not found. The fold's "
                                f"'unlabeled' cases are predicted from their raw images in imagesTr.")
    return files


def unlabeled_pool(raw_folder: Path, dataset_json: dict, fold_dict: Optional[dict]) -> Dict[str, Tuple[str, List[str]]]:
    """{case: (source, image files)} of the fold's unlabeled split cases and of imagesUnlabeled.

    Never a training or validation case of the fold (they are labeled); test ids are refused.
    """
    from nnunet_proto.data.unlabeled_preprocessing import list_unlabeled_cases, test_case_ids

    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    pool: Dict[str, Tuple[str, List[str]]] = {}
    fold_dict = fold_dict or {}
    labeled = set(fold_dict.get("train", [])) | set(fold_dict.get("val", []))
    for case in fold_dict.get("unlabeled", []):
        if case in labeled:
            raise PseudoLabelError(f"case {case!r} is both in the fold's 'unlabeled' list and a training or "
                                   f"validation case of it; fix splits_final.json")
        pool[case] = (SOURCE_SPLIT, _split_images(raw_folder, case, n_channels, ending))
    folder = raw_folder / SOURCE_FOLDER
    if folder.is_dir() and any(not f.startswith(".") for f in os.listdir(folder)):
        for case, files in list_unlabeled_cases(str(raw_folder), dataset_json).items():
            if case in labeled:  # list_unlabeled_cases refuses imagesTr ids already; a val id from elsewhere too
                raise PseudoLabelError(f"{folder} holds case {case!r}, a training or validation case of the fold")
            pool[case] = (SOURCE_FOLDER, files)
    leak = sorted(set(pool) & test_case_ids(str(raw_folder), ending))
    if leak:
        raise PseudoLabelError(f"unlabeled case ids {leak[:5]} are also test cases (imagesTs/labelsTs); pseudo "
                               f"labels of test images would leak the test set into training. Remove them.")
    return pool


def _validation_hashes(raw_folder: Path, fold_dict: Optional[dict], dataset_json: dict) -> Dict[str, str]:
    """{voxel hash: 'validation case X'} of the fold's validation images (a copy of one in the pool is refused)."""
    out: Dict[str, str] = {}
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    for case in (fold_dict or {}).get("val", []):
        for c in range(n_channels):
            f = raw_folder / "imagesTr" / f"{case}_{c:04d}{ending}"
            if f.is_file():
                try:
                    out[image_content_hash(str(f))] = f"validation case {case} ({f.name})"
                except ImageError:
                    pass  # nnU-Net's own validation will report a broken image
    return out


def _records_unchanged(records: List[dict], files: Sequence[str]) -> Optional[bool]:
    """True if the recorded image files are unchanged (same stat, else the same voxel hash), False if changed,
    None if a file vanished."""
    if [r["name"] for r in records] != [os.path.basename(f) for f in files]:
        return False
    for r, f in zip(records, files):
        if not os.path.isfile(f):
            return None
        rec = FileRecord(**r)
        if rec.same_stat(f):
            continue
        try:
            if image_content_hash(f, hash_version(rec.sha256)) != rec.sha256:
                return False
        except ImageError:
            return False
    return True


# ---------------------------------------------------------------------------------------------- manifest


def read_set_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PseudoLabelError(f"the pseudo-label manifest {path} is damaged ({e}); make the set again with "
                               f"`nnunet_proto pseudo-label ... --overwrite`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), dict) or \
            not isinstance(manifest.get("teacher"), dict):
        raise PseudoLabelError(f"the pseudo-label manifest {path} is not a manifest (no 'teacher'/'cases' objects); "
                               f"make the set again with `nnunet_proto pseudo-label ... --overwrite`")
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, folder / MANIFEST)


def _teacher_identity(record: dict) -> dict:
    """What makes two teachers the same for the pseudo labels they produce."""
    return {k: record.get(k) for k in ("trainer", "plans", "configuration", "fold", "checkpoint_sha256",
                                        "use_mirroring", "postprocessing_sha256")}


def _same_source(manifest: dict, teacher_record: dict, fingerprint: str) -> bool:
    return (_teacher_identity(manifest["teacher"]) == _teacher_identity(teacher_record)
            and manifest.get("fingerprint") == fingerprint)


def manifest_digest(manifest: dict) -> str:
    """Short hash of what a student learns from: the teacher, the preprocessing, the cases with their labels.

    Not the least-confident share dropped (re-running with another ``--drop-least-confident`` keeps the digest);
    student checkpoints record the cases they trained on for that."""
    content = {"teacher": _teacher_identity(manifest["teacher"]), "fingerprint": manifest.get("fingerprint"),
               "labels": {c: v.get("label_sha256") for c, v in sorted(manifest["cases"].items())}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- making a set


def _postprocessing(teacher: Teacher, dataset: str, postprocessing: Optional[str]):
    """(functions, kwargs, record) of the teacher run's postprocessing; ``postprocessing``: "auto" (where it was
    determined), "none", or a postprocessing.pkl file."""
    from nnunet_proto.training.compat import load_pickle

    if postprocessing == "none":
        return [], [], {"file": None, "steps": [], "note": "switched off (--no-postprocessing)"}
    if postprocessing in (None, "auto"):
        model = teacher.model_folder(dataset)
        candidates = [model / f"fold_{teacher.fold}" / "validation" / "postprocessing.pkl",
                      model / f"crossval_results_folds_{teacher.fold}" / "postprocessing.pkl"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            return [], [], {"file": None, "steps": [],
                            "note": "not determined for this run (none of " + ", ".join(map(str, candidates))
                                    + "); pseudo labels are raw argmax maps"}
    else:
        found = Path(postprocessing)
        if not found.is_file():
            raise FileNotFoundError(f"postprocessing file {found} not found (nnUNetv2_determine_postprocessing "
                                    f"writes postprocessing.pkl)")
    fns, kwargs = load_pickle(str(found))
    steps = [{"function": f.__name__, "kwargs": k} for f, k in zip(fns, kwargs)]
    return fns, kwargs, {"file": str(found), "sha256": file_sha256(found), "steps": steps}


def _check_dataset(plans: dict, configuration: str, dataset_json: dict) -> None:
    from nnunet_proto.training.compat import PlansManager

    pm = PlansManager(plans)
    if configuration not in plans["configurations"]:
        raise KeyError(f"configuration {configuration!r} is not in plans {plans.get('plans_name')} (available: "
                       f"{sorted(plans['configurations'])})")
    if pm.get_label_manager(dataset_json).has_regions:
        raise PseudoLabelError("region-based datasets (overlapping 'labels' regions in dataset.json) are not "
                               "supported by pseudo-label: a region prediction has no single label per voxel. "
                               "Train with integer classes, or use plain nnU-Net.")
    if pm.get_configuration(configuration).previous_stage_name is not None:
        raise PseudoLabelError(f"{configuration!r} is a cascade stage; pseudo-label supports 2d, 3d_fullres and "
                               f"3d_lowres")


def _temp_name(folder: Path, case: str, ending: str) -> Path:
    return folder / f".partial_{case}{ending}"


def make_pseudo_labels(dataset: str, teacher: Teacher, round_: int = 1, drop: float = DEFAULT_DROP,
                       postprocessing: Optional[str] = "auto", overwrite: bool = False, skip_bad: bool = False,
                       device: str = "cpu", verbose: bool = True) -> dict:
    """Predict the fold's unlabeled pool with ``teacher`` into the pseudo-label set of round ``round_``.

    Returns a summary {"folder", "cases", "new", "redone", "vanished", "dropped", "ranking", "teacher",
    "postprocessing"}. See the module docstring for the rules; every refusal happens before anything is written.
    """
    import torch

    from nnunet_proto.paths import ext_trainer_paths
    from nnunet_proto.training.compat import (
        PlansManager,
        apply_postprocessing,
        comp_blosc2_params,
        convert_predicted_logits_to_segmentation_with_correct_shape,
        load_json,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
        nnUNet_raw,
        nnUNetDatasetBlosc2,
        nnUNetPredictor,
        require_env_path,
    )
    from nnunet_proto.training.unlabeled import load_fold, preprocessing_fingerprint

    if round_ < 1:
        raise ValueError(f"--round must be >= 1, got {round_}")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"--drop-least-confident must be in [0, 1), got {drop}")
    name = maybe_convert_to_dataset_name(dataset)
    raw_folder = Path(require_env_path(nnUNet_raw)) / name
    pre = Path(require_env_path(nnUNet_preprocessed)) / name
    plans_file = pre / f"{teacher.plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: the teacher's plans must exist (nnUNetv2_plan_and_preprocess"
                                f", plans-patch)")
    plans, dataset_json = load_json(str(plans_file)), load_json(str(pre / "dataset.json"))
    _check_dataset(plans, teacher.configuration, dataset_json)
    ckpt = teacher.checkpoint_path(name)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {ckpt} not found. Train the teacher first: nnUNetv2_train {name} "
            f"{teacher.configuration} {teacher.fold} -tr {teacher.trainer} -p {teacher.plans} (or give -chk)")
    fold_dict = load_fold(str(pre / "splits_final.json"), teacher.fold)
    if fold_dict is None:
        raise PseudoLabelError(f"fold {teacher.fold} is not in {pre / 'splits_final.json'}: the pool and the "
                               f"excluded validation cases come from the fold")
    key = SetKey(name, teacher.plans, teacher.configuration, teacher.fold, round_)
    folder = set_folder(key)
    fns, fn_kwargs, pp_record = _postprocessing(teacher, name, postprocessing)
    teacher_record = {**asdict(teacher), "model_folder": str(teacher.model_folder(name)), "checkpoint_path": str(ckpt),
                      "checkpoint_sha256": file_sha256(ckpt), "postprocessing": pp_record,
                      "postprocessing_sha256": pp_record.get("sha256")}
    fingerprint = preprocessing_fingerprint(plans, teacher.configuration, dataset_json)
    # with --overwrite a damaged manifest is no obstacle: it is the documented repair
    try:
        old = read_set_manifest(folder) if folder.is_dir() else None
    except PseudoLabelError:
        if not overwrite:
            raise
        old = None
    if old is not None and overwrite and _same_source(old, teacher_record, fingerprint):
        overwrite = False  # the same teacher and settings (an interrupted --overwrite run): resume, do not redo
    elif overwrite:
        old = None
    if old is not None:
        diffs = [f"{k}: set {v!r} vs now {_teacher_identity(teacher_record)[k]!r}"
                 for k, v in _teacher_identity(old["teacher"]).items() if v != _teacher_identity(teacher_record)[k]]
        if old.get("fingerprint") != fingerprint:
            diffs.append(f"preprocessing fingerprint: set {old.get('fingerprint')} vs now {fingerprint}")
        if diffs:
            raise PseudoLabelError(
                f"the pseudo labels in {folder} were made by another teacher ({old['teacher'].get('trainer')}, "
                f"checkpoint {old['teacher'].get('checkpoint_path')}) or with other settings:\n  " + "\n  ".join(diffs)
                + f"\nThey are stale for {teacher.describe()}. Pass --overwrite to replace them (the old set is "
                  f"deleted), or pick another --round.")
    elif folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists without {MANIFEST}; pass --overwrite to replace it")

    pool = unlabeled_pool(raw_folder, dataset_json, fold_dict)
    if not pool:
        raise PseudoLabelError(f"no unlabeled cases for fold {teacher.fold}: its 'unlabeled' list is empty and "
                               f"{raw_folder / SOURCE_FOLDER} holds no images")
    kept_old = {} if old is None else old["cases"]
    ending = dataset_json["file_ending"]
    data_identifier = PlansManager(plans).get_configuration(teacher.configuration).data_identifier
    vanished = sorted(set(kept_old) - set(pool))
    status = {c: (_records_unchanged(kept_old[c]["images"], files) if c in kept_old else None)
              for c, (_, files) in pool.items()}
    redone = sorted(c for c, s in status.items() if s is False)
    lost = sorted(c for c, s in status.items() if s and not ((folder / "labels" / f"{c}{ending}").is_file()
                                                             and (folder / data_identifier / f"{c}.b2nd").is_file()))
    todo = sorted(c for c, s in status.items() if not s) + lost
    # verify every image to predict, and refuse leaks, before anything is written
    from nnunet_proto.data.unlabeled_preprocessing import test_image_hashes

    forbidden = {**_validation_hashes(raw_folder, fold_dict, dataset_json),
                 **{h: f"test image {f}" for h, f in test_image_hashes(str(raw_folder), ending).items()}}
    records, bad, leaks = {}, {}, []
    for case in tqdm(todo, desc="verifying images", unit="case", disable=not verbose or len(todo) < 2,
                     file=sys.stderr):
        try:
            records[case] = check_case(pool[case][1])
        except ImageError as e:
            bad[case] = str(e)
            continue
        same = [forbidden[r.sha256] for r in records[case] if r.sha256 in forbidden]
        if same:
            leaks.append(f"{case}: identical voxels to {', '.join(same)}")
    if leaks:
        raise PseudoLabelError(f"{len(leaks)} unlabeled image(s) are copies of validation or test images: "
                               + "; ".join(leaks[:5]) + ". Remove them from the pool. Nothing was written.")
    if bad and not skip_bad:
        raise PseudoLabelError(f"{len(bad)} unlabeled image(s) cannot be used:\n  " + "\n  ".join(bad.values())
                               + "\nRemove or replace them, or pass --skip-bad. Nothing was written.")

    if overwrite and folder.is_dir():
        shutil.rmtree(folder)
    cm = PlansManager(plans).get_configuration(teacher.configuration)
    labels_dir, data_dir = folder / "labels", folder / cm.data_identifier
    labels_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": SET_FORMAT, "set": key.name, "dataset": name, "plans": teacher.plans,
                "configuration": teacher.configuration, "fold": teacher.fold, "round": round_,
                "data_identifier": cm.data_identifier, "fingerprint": fingerprint, "file_ending": ending,
                "teacher": teacher_record, "cases": {c: v for c, v in kept_old.items()
                                                     if c in pool and status.get(c) and c not in lost},
                "skipped": {c: why for c, why in bad.items()}, "complete": False}
    for case in vanished + redone + lost:
        _remove_case_files(folder, cm.data_identifier, case, ending)
    _write_manifest(folder, manifest)
    todo = [c for c in todo if c in records]
    if verbose:
        print(f"{name}: pseudo labels of {len(pool)} unlabeled case(s) by {teacher.describe()} -> {folder}; "
              f"{len(manifest['cases'])} done, {len(todo)} to predict"
              + (f", {len(redone)} changed since" if redone else "") + (f", {len(vanished)} vanished" if vanished
                                                                        else ""), file=sys.stderr, flush=True)
    if todo:
        os.environ["nnUNet_extTrainer"] = ext_trainer_paths()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=teacher.use_mirroring,
                                    device=torch.device(device), verbose=False, verbose_preprocessing=False,
                                    allow_tqdm=False)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every folder it searches for the trainer
            predictor.initialize_from_trained_model_folder(
                str(teacher.model_folder(name)), use_folds=(teacher.fold,), checkpoint_name=teacher.checkpoint)
        pm = PlansManager(plans)
        rw = pm.image_reader_writer_class()
        lm = pm.get_label_manager(dataset_json)
        preprocessor = cm.preprocessor_class(verbose=False)
        for case in tqdm(todo, desc="pseudo-labeling", unit="case", disable=not verbose, file=sys.stderr):
            source, files = pool[case]
            # nnUNetPredictor's own steps, in this process (predict_single_npy_array would spawn a worker per
            # case): the plans' preprocessing, the sliding window with mirroring, resampling back with softmax
            image, _, props = preprocessor.run_case(files, None, pm, cm, dataset_json)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(image)).cpu()
            seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, pm, cm, lm, props, return_probabilities=True, num_threads_torch=torch.get_num_threads())
            seg = apply_postprocessing(seg, fns, fn_kwargs) if fns else seg
            stats = confidence_stats(probs, seg)
            tmp = _temp_name(labels_dir, case, ending)
            rw.write_seg(seg.astype(np.uint8 if seg.max() < 256 else np.int16), str(tmp), props)
            os.replace(tmp, labels_dir / f"{case}{ending}")
            label = labels_dir / f"{case}{ending}"
            data, pseg, pprops = preprocessor.run_case(files, str(label), pm, cm, dataset_json)
            data = data.astype(np.float32, copy=False)
            pseg = pseg.astype(np.int16, copy=False)
            blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(pseg.shape, tuple(cm.patch_size), pseg.itemsize)
            nnUNetDatasetBlosc2.save_case(data, pseg, pprops, str(data_dir / case), chunks=chunks, blocks=blocks,
                                          chunks_seg=chunks_seg, blocks_seg=blocks_seg)
            manifest["cases"][case] = {"source": source, "images": [asdict(r) for r in records[case]],
                                       "label": f"labels/{case}{ending}", "label_sha256": file_sha256(label),
                                       **{k: round(v, 6) for k, v in stats.items()}}
            _write_manifest(folder, manifest)  # after every case: an interrupted run resumes here
    manifest["drop_least_confident"] = drop
    manifest["ranking"] = ranking(manifest["cases"])
    manifest["dropped"] = least_confident(manifest["cases"], drop)
    manifest["complete"] = True
    manifest["digest"] = manifest_digest(manifest)
    _write_manifest(folder, manifest)
    return {"folder": str(folder), "cases": len(manifest["cases"]), "new": len(todo), "redone": redone,
            "vanished": vanished, "dropped": manifest["dropped"], "ranking": manifest["ranking"],
            "confidence": {c: manifest["cases"][c]["confidence"] for c in manifest["ranking"]},
            "teacher": teacher.describe(), "postprocessing": pp_record, "skipped": dict(bad)}


def _remove_case_files(folder: Path, data_identifier: str, case: str, ending: str) -> None:
    for path in (folder / "labels" / f"{case}{ending}", *(folder / data_identifier / f"{case}{s}"
                                                          for s in (".b2nd", "_seg.b2nd", ".pkl"))):
        if path.is_file():
            path.unlink()


# ---------------------------------------------------------------------------------------------- the student's view


@dataclass
class PseudoLabelSet:
    """A complete, verified pseudo-label set as the student uses it."""

    folder: Path
    data_folder: Path
    manifest: dict
    cases: List[str]  # the cases the student trains on (dropped ones excluded)
    dropped: List[str]
    drop: float

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    def describe(self) -> dict:
        t = self.manifest["teacher"]
        return {"folder": str(self.folder), "digest": self.digest, "teacher": {k: t.get(k) for k in (
            "trainer", "plans", "configuration", "fold", "checkpoint_path", "checkpoint_sha256", "use_mirroring")},
            "postprocessing": t.get("postprocessing", {}).get("steps"), "cases": len(self.cases),
            "dropped": self.dropped, "drop_least_confident": self.drop, "round": self.manifest.get("round")}


def open_set(key: SetKey, expected_fingerprint: str, raw_folder: Optional[Path], drop: Optional[float] = None,
             check_teacher: bool = True) -> PseudoLabelSet:
    """The student's check at start: the set exists, is complete, and nothing it was made from has changed.

    ``drop``: the least-confident share to leave out (None: the share the set was made with). Refuses, naming the
    case or file: a missing or incomplete set, other preprocessing, an image changed or vanished since its label
    was made, a teacher checkpoint that changed since, a case that is now a test case (id or voxels).
    """
    folder = set_folder(key)
    hint = (f"nnunet_proto pseudo-label -d {key.dataset} -c {key.configuration} -p {key.plans} -f {key.fold}"
            f"{'' if key.round == 1 else f' --round {key.round}'} -tr TEACHER")
    manifest = read_set_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise FileNotFoundError(f"no pseudo labels for this student: {folder / MANIFEST} is missing. Make them from "
                                f"a finished teacher run first: {hint}")
    if not manifest.get("complete"):
        raise PseudoLabelError(f"the pseudo-label set {folder} is incomplete (interrupted?). Run the same "
                               f"pseudo-label command again to finish it: {hint}")
    if manifest.get("fingerprint") != expected_fingerprint:
        raise PseudoLabelError(f"the pseudo labels in {folder} were preprocessed with other settings (fingerprint "
                               f"{manifest.get('fingerprint')} vs {expected_fingerprint} of these plans); make them "
                               f"again: {hint} --overwrite")
    teacher = manifest["teacher"]
    if check_teacher:
        ckpt = Path(teacher.get("checkpoint_path", ""))
        if ckpt.is_file() and file_sha256(ckpt) != teacher.get("checkpoint_sha256"):
            raise PseudoLabelError(f"the teacher checkpoint {ckpt} changed since the pseudo labels in {folder} were "
                                   f"made (sha256 differs): they are stale. Make them again: {hint} --overwrite")
        if not ckpt.is_file():
            print(f"WARNING: the teacher checkpoint {ckpt} of the pseudo labels in {folder} no longer exists; "
                  f"training on the labels as recorded", file=sys.stderr)
    if raw_folder is not None:
        from nnunet_proto.data.unlabeled_preprocessing import test_case_ids, test_image_hashes

        ending = manifest["file_ending"]
        tests = test_case_ids(str(raw_folder), ending)
        leak = sorted(set(manifest["cases"]) & tests)
        test_hashes = test_image_hashes(str(raw_folder), ending)
        leak += sorted(c for c, v in manifest["cases"].items() for r in v["images"] if r["sha256"] in test_hashes)
        if leak:
            raise PseudoLabelError(f"pseudo-labeled case(s) {sorted(set(leak))[:5]} in {folder} are test cases "
                                   f"(imagesTs/labelsTs, by id or voxels): training on them leaks the test set. "
                                   f"Remove them from the unlabeled pool and make the set again: {hint} --overwrite")
        for case, v in manifest["cases"].items():
            sub = "imagesTr" if v["source"] == SOURCE_SPLIT else SOURCE_FOLDER
            files = [str(raw_folder / sub / r["name"]) for r in v["images"]]
            state = _records_unchanged(v["images"], files)
            if state is None:
                raise PseudoLabelError(f"the image of pseudo-labeled case {case!r} ({files[0]}) vanished since its "
                                       f"label was made. Make the set again so it follows the pool: {hint}")
            if state is False:
                raise PseudoLabelError(f"the image of pseudo-labeled case {case!r} ({files[0]}) changed since its "
                                       f"label was made: the label is stale. Make the set again (changed images are "
                                       f"predicted again): {hint}")
    data_folder = folder / manifest["data_identifier"]
    missing = [c for c in manifest["cases"] if not (data_folder / f"{c}.b2nd").is_file()]
    if missing:
        raise PseudoLabelError(f"preprocessed pseudo-labeled case(s) {missing[:5]} are missing in {data_folder}; run "
                               f"the pseudo-label command again to redo them: {hint}")
    share = manifest.get("drop_least_confident", DEFAULT_DROP) if drop is None else drop
    dropped = least_confident(manifest["cases"], share)
    cases = [c for c in ranking(manifest["cases"]) if c not in set(dropped)]
    return PseudoLabelSet(folder, data_folder, manifest, sorted(cases), dropped, share)
