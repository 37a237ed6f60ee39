"""The unlabeled data stream: where unlabeled cases live, how they are loaded, how they are sampled.

Two sources (``SemiSupervisedConfig.unlabeled_sources``):

* ``"split"``: identifiers in the fold's ``unlabeled`` list of ``splits_final.json`` (written by
  ``nnunet_proto make-splits``). They are cases of the *labeled* preprocessed folder; their
  segmentation files (``*_seg.b2nd``) and label-derived properties (``class_locations``) are never
  read: the loader gets an all-zero dummy segmentation instead.
* ``"folder"``: ``<data_identifier>_unlabeled/`` beside the labeled folder, written by
  ``nnunet_proto preprocess-unlabeled`` from ``nnUNet_raw/DatasetXXX/imagesUnlabeled``. A manifest
  ``<data_identifier>_unlabeled.json`` records a fingerprint of the preprocessing so that stale data
  (plans changed after preprocessing) is detected, the list of cases (training uses exactly these),
  and per source file its size, mtime and voxel hash, so that images deleted from or changed in
  ``imagesUnlabeled/`` after preprocessing are noticed (see ``source_changes``; a missing folder is
  every image deleted). At the start of training the manifest's cases are also checked against the
  test set (ids in imagesTs/labelsTs, recorded voxel hashes against imagesTs), as
  ``preprocess-unlabeled`` checks them (``cases_from_folder``).

Manifest format (version 2; a version-1 manifest, written before file records existed, is read as
version 2 with no records, and ``preprocess-unlabeled`` fills them in)::

    {"version": 2, "fingerprint": "...", "plans_name": "...", "configuration": "2d",
     "data_identifier": "...", "source": ".../imagesUnlabeled", "cases": ["unl_000", ...],
     "files": {"unl_000": [{"name": "unl_000_0000.nii.gz", "size": 1234, "mtime_ns": 1, "sha256": "..."}]},
     "skipped": {"unl_007": "why it was skipped (--skip-bad)"}}

``sha256`` is ``image_check.voxel_hash``, prefixed with its version (``"v2:..."``). A record without the
prefix was written with the version-1 hash (which depended on the voxel type): it is compared in its own
version, so it never looks changed because of the format, and ``preprocess-unlabeled`` re-verifies such
cases (including the test-leakage check) and rewrites their records in the current version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import blosc2
import numpy as np

from nnunet_proto.data.image_check import HASH_VERSION, FileRecord, ImageError, hash_version, image_content_hash
from nnunet_proto.training.compat import load_pickle, nnUNetDataLoader, nnUNetDatasetBlosc2

MANIFEST_SUFFIX = "_unlabeled.json"
FOLDER_SUFFIX = "_unlabeled"
MANIFEST_VERSION = 2
DEFAULT_PLANS = "nnUNetPlans"  # nnU-Net's default plans identifier (-p)


def unlabeled_folder(preprocessed_dataset_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_base, data_identifier + FOLDER_SUFFIX)


def manifest_path(preprocessed_dataset_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_base, data_identifier + MANIFEST_SUFFIX)


def preprocessing_fingerprint(plans: dict, configuration: str, dataset_json: dict) -> str:
    """Hash of everything that determines the preprocessed voxels of an image (not patch/batch/network).

    Two plans that differ only in training settings (e.g. the CPU-budget plans in plans/) share the
    fingerprint and therefore the preprocessed unlabeled data.
    """
    cfg = plans["configurations"][configuration]
    if "inherits_from" in cfg:  # resolve nnU-Net's configuration inheritance
        parent = dict(plans["configurations"][cfg["inherits_from"]])
        parent.update(cfg)
        cfg = parent
    relevant = {
        "transpose_forward": plans.get("transpose_forward"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "channel_names": dataset_json.get("channel_names", dataset_json.get("modality")),
        "file_ending": dataset_json.get("file_ending"),
    }
    for key in ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                "resampling_fn_data", "resampling_fn_data_kwargs"):
        relevant[key] = cfg.get(key)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ManifestError(ValueError):
    """A manifest that cannot be read (not JSON, or not the manifest's structure); the message names the file."""


def read_manifest(path: str) -> dict:
    """The manifest at ``path``, upgraded to the current version (version 1 had no file records).

    Raises ManifestError naming the file when it is not JSON or not a manifest (``preprocess-unlabeled
    --overwrite`` rebuilds it).
    """
    with open(path) as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"the unlabeled manifest {path} is damaged (not valid JSON: {e})") from None
    problem = None
    if not isinstance(manifest, dict):
        problem = f"a JSON {type(manifest).__name__}, not an object"
    elif not isinstance(manifest.get("cases", []), list) or not all(isinstance(c, str) for c in manifest.get(
            "cases", [])):
        problem = "'cases' is not a list of case ids"
    elif not all(isinstance(manifest.get(k, {}), dict) for k in ("files", "skipped")):
        problem = "'files' or 'skipped' is not an object"
    if problem:
        raise ManifestError(f"the unlabeled manifest {path} is damaged ({problem})")
    manifest.setdefault("cases", [])
    manifest.setdefault("files", {})  # version 1: records unknown until preprocess-unlabeled fills them in
    manifest.setdefault("skipped", {})
    manifest["version"] = MANIFEST_VERSION
    return manifest


def write_manifest(path: str, manifest: dict) -> None:
    """Write atomically (temp file + rename): an interrupted write never leaves half a manifest."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**manifest, "version": MANIFEST_VERSION}, f, indent=2)
    os.replace(tmp, path)


@dataclass
class SourceChanges:
    """How ``imagesUnlabeled/`` differs from a manifest (case ids, sorted)."""

    vanished: List[str] = field(default_factory=list)  # in the manifest, no longer in the folder
    changed: List[str] = field(default_factory=list)  # different content (or different channel files)
    new: List[str] = field(default_factory=list)  # in the folder, not in the manifest
    unrecorded: List[str] = field(default_factory=list)  # in both, but the manifest has no file record (version 1)
    touched: List[str] = field(default_factory=list)  # size/mtime differ but the voxels are identical
    outdated: List[str] = field(default_factory=list)  # unchanged, but recorded with an older voxel hash version

    def describe(self) -> str:
        parts = [f"{len(v)} {k} ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
                 for k, v in (("vanished", self.vanished), ("changed", self.changed), ("new", self.new)) if v]
        return "; ".join(parts) if parts else "no change"


def _case_changed(records: List[dict], files: Sequence[str]) -> Optional[bool]:
    """True/False = content changed or not; None = stat changed but voxels identical (refresh the record)."""
    if sorted(r["name"] for r in records) != sorted(os.path.basename(f) for f in files):
        return True
    by_name = {r["name"]: FileRecord(**r) for r in records}
    stat_changed = [f for f in files if not by_name[os.path.basename(f)].same_stat(f)]
    if not stat_changed:
        return False
    for f in stat_changed:  # confirm by content: a copy or a touch keeps the voxels
        rec = by_name[os.path.basename(f)]
        if not rec.sha256:
            return True
        try:  # in the record's own hash version: an old record is not a change
            if image_content_hash(f, version=hash_version(rec.sha256)) != rec.sha256:
                return True
        except (ImageError, RuntimeError, OSError):  # unreadable now (e.g. a folder or no permission): changed
            return True
    return None


def channel_file_pattern(file_ending: str) -> "re.Pattern":
    """``<case>_XXXX<file_ending>``: nnU-Net's channel file naming (group 1 = case, group 2 = channel)."""
    return re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")


def group_channel_files(folder: str, file_ending: str) -> Dict[str, List[str]]:
    """{case: channel file paths sorted by channel} of the nnU-Net-named files in ``folder`` (others ignored)."""
    pattern = channel_file_pattern(file_ending)
    cases: Dict[str, Dict[int, str]] = {}
    for f in os.listdir(folder):
        m = pattern.match(f)
        if m:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    return {c: [ch[k] for k in sorted(ch)] for c, ch in sorted(cases.items())}


def source_changes(manifest: dict, raw_cases: Dict[str, List[str]]) -> SourceChanges:
    """Compare a manifest with the current cases of imagesUnlabeled ({case: channel files}).

    Size and mtime decide quickly; a case whose size or mtime differs is re-hashed (in the hash version of
    its record) and counts as changed only if its voxels differ. An unchanged case whose records hold an
    older hash version is listed in ``outdated`` as well (``preprocess-unlabeled`` re-verifies it).
    """
    listed = set(manifest.get("cases", []))
    out = SourceChanges(vanished=sorted(listed - set(raw_cases)), new=sorted(set(raw_cases) - listed))
    for case in sorted(listed & set(raw_cases)):
        records = manifest.get("files", {}).get(case)
        if not records:
            out.unrecorded.append(case)
            continue
        changed = _case_changed(records, raw_cases[case])
        if changed:
            out.changed.append(case)
            continue
        if changed is None:
            out.touched.append(case)
        if any(hash_version(r.get("sha256", "")) != HASH_VERSION for r in records):
            out.outdated.append(case)
    return out


@dataclass(frozen=True)
class UnlabeledCase:
    identifier: str
    folder: str
    source: str  # "split" or "folder"


def cases_from_split(fold_dict: dict, labeled_folder: str, fold) -> List[UnlabeledCase]:
    """Unlabeled cases listed in one fold of splits_final.json, checked against train/val."""
    ids = list(fold_dict.get("unlabeled", []))
    if not ids:
        return []
    overlap_tr = sorted(set(ids) & set(fold_dict.get("train", [])))
    overlap_val = sorted(set(ids) & set(fold_dict.get("val", [])))
    if overlap_tr or overlap_val:
        raise ValueError(f"splits_final.json fold {fold}: the 'unlabeled' list overlaps the "
                         f"{'train' if overlap_tr else 'val'} list ({(overlap_tr or overlap_val)[:5]}...). A case "
                         f"must be labeled, validation or unlabeled, never two of them. Recreate the fold with "
                         f"`nnunet_proto make-splits` or fix the file by hand.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"splits_final.json fold {fold}: the 'unlabeled' list has duplicate identifiers")
    missing = [i for i in ids if not os.path.isfile(os.path.join(labeled_folder, i + ".b2nd"))]
    if missing:
        raise FileNotFoundError(f"splits_final.json fold {fold} lists unlabeled cases that are not preprocessed in "
                                f"{labeled_folder}: {missing[:5]}{'...' if len(missing) > 5 else ''}. Re-run "
                                f"nnUNetv2_preprocess for this configuration or fix the split.")
    return [UnlabeledCase(i, labeled_folder, "split") for i in ids]


def cases_from_labeled(fold_dict: dict, labeled_folder: str, fold) -> List[UnlabeledCase]:
    """The fold's labeled training cases as an "unlabeled" stream (labels unused): the labeled-images control."""
    ids = list(fold_dict.get("train", []))
    if not ids:
        raise ValueError(f"splits_final.json fold {fold} has no 'train' cases for the labeled-images control")
    missing = [i for i in ids if not os.path.isfile(os.path.join(labeled_folder, i + ".b2nd"))]
    if missing:
        raise FileNotFoundError(f"fold {fold}: training cases {missing[:5]} are not preprocessed in {labeled_folder}")
    return [UnlabeledCase(i, labeled_folder, "labeled") for i in ids]


def preprocess_command(dataset: str, configuration: str, plans_identifier: str = DEFAULT_PLANS,
                       overwrite: bool = False) -> str:
    """The ``nnunet_proto preprocess-unlabeled`` command for this data; ``-p`` only for other than the default plans
    (followed without it, the hint would rebuild the default plans' data and training would still refuse)."""
    plans = f" -p {plans_identifier}" if plans_identifier and plans_identifier != DEFAULT_PLANS else ""
    return (f"nnunet_proto preprocess-unlabeled -d {dataset} -c {configuration}{plans}"
            + (" --overwrite" if overwrite else ""))


def cases_from_folder(preprocessed_dataset_base: str, data_identifier: str, expected_fingerprint: str,
                      configuration: str, dataset_id_hint: str,
                      raw_unlabeled_folder: Optional[str] = None,
                      file_ending: str = ".nii.gz", plans_identifier: str = DEFAULT_PLANS) -> List[UnlabeledCase]:
    """Exactly the manifest's cases of ``<data_identifier>_unlabeled/``, after checking the manifest.

    The manifest must match the plans (fingerprint) and every listed case must be preprocessed. If
    ``raw_unlabeled_folder`` is given (nnUNet_raw is set), images deleted from it or changed since
    preprocessing are an error (they would otherwise still be trained on), and a missing folder counts as
    every case vanished; new images are not used until preprocessed. A case that is also a test case of
    the raw dataset (its id in imagesTs/labelsTs, or its recorded voxel hash equal to an imagesTs image's)
    is refused, as ``preprocess-unlabeled`` refuses it. ``plans_identifier`` only goes into the hints.
    """
    folder = unlabeled_folder(preprocessed_dataset_base, data_identifier)
    mpath = manifest_path(preprocessed_dataset_base, data_identifier)
    if not os.path.isdir(folder):
        return []
    fix = preprocess_command(dataset_id_hint, configuration, plans_identifier, overwrite=True)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{folder} exists but its manifest {mpath} is missing, so its preprocessing cannot be "
                                f"verified. Re-create it with `{fix}`.")
    try:
        manifest = read_manifest(mpath)
    except ManifestError as e:
        raise ManifestError(f"{e}. Rebuild it with `{fix}`.") from None
    if manifest.get("fingerprint") != expected_fingerprint:
        raise ValueError(f"The preprocessed unlabeled data in {folder} is stale: it was made with preprocessing "
                         f"fingerprint {manifest.get('fingerprint')} (plans {manifest.get('plans_name')!r}, "
                         f"configuration {manifest.get('configuration')!r}) but the current plans give "
                         f"{expected_fingerprint}. Re-run `{fix}`.")
    ids = sorted(manifest.get("cases", []))
    missing = [i for i in ids if not os.path.isfile(os.path.join(folder, i + ".b2nd"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} unlabeled cases listed in {mpath} are missing from {folder} "
                                f"(e.g. {missing[:3]}). Re-run `{fix}`.")
    if raw_unlabeled_folder and ids:
        if not os.path.isdir(raw_unlabeled_folder):  # moved or deleted: every case vanished
            raise FileNotFoundError(
                f"{raw_unlabeled_folder} does not exist, but the {len(ids)} unlabeled cases in {folder} were "
                f"preprocessed from it: every case vanished, and training would use images that are gone. Put the "
                f"folder back, or, to train without these unlabeled images, delete {folder} and {mpath}.")
        changes = source_changes(manifest, group_channel_files(raw_unlabeled_folder, file_ending))
        if changes.vanished or changes.changed:
            raise ValueError(f"{raw_unlabeled_folder} changed after preprocessing: {changes.describe()}. Training "
                             f"would use stale or deleted images. Re-run "
                             f"`{preprocess_command(dataset_id_hint, configuration, plans_identifier)}` (it drops "
                             f"vanished and redoes changed cases).")
        from nnunet_proto.data.unlabeled_preprocessing import manifest_test_leaks  # (imports this module)

        leaks = manifest_test_leaks(manifest, os.path.dirname(os.path.normpath(raw_unlabeled_folder)), file_ending)
        if leaks:
            raise ValueError(f"{len(leaks)} unlabeled case(s) of {mpath} are test cases (test leakage): "
                             f"{'; '.join(list(leaks.values())[:5])}. Training on test images, even without labels, "
                             f"leaks the test set. Remove them from {raw_unlabeled_folder} (or from the test folders) "
                             f"and re-run `{preprocess_command(dataset_id_hint, configuration, plans_identifier)}`.")
    return [UnlabeledCase(i, folder, "folder") for i in ids]


class UnlabeledDataset(nnUNetDatasetBlosc2):
    """nnUNetDatasetBlosc2 over unlabeled cases from one or more folders; never opens a segmentation.

    ``load_case`` returns ``(data, dummy_seg, None, properties)`` where ``dummy_seg`` is an all-zero
    array of shape (1, *spatial) (lazily allocated by the OS, so only the cropped part costs memory)
    and ``properties['class_locations']`` is emptied, so neither voxel labels nor label-derived
    sampling positions reach the stream.
    """

    def __init__(self, cases: Sequence[UnlabeledCase]):
        self._index: Dict[str, UnlabeledCase] = {}
        for c in cases:
            key = c.identifier
            if key in self._index:  # same id in two sources: keep both under distinct keys
                key = f"{c.source}:{c.identifier}"
            self._index[key] = c
        if not self._index:
            raise ValueError("UnlabeledDataset needs at least one case")
        super().__init__(folder=cases[0].folder, identifiers=list(self._index))

    def load_case(self, identifier: str):
        case = self._index[identifier]
        data = blosc2.open(urlpath=os.path.join(case.folder, case.identifier + ".b2nd"), mode="r",
                           dparams={"nthreads": 1}, **self.mmap_kwargs)
        seg = np.zeros((1, *data.shape[1:]), dtype=np.int16)  # calloc: pages untouched outside the crop
        properties = load_pickle(os.path.join(case.folder, case.identifier + ".pkl"))
        properties["class_locations"] = {}
        return data, seg, None, properties

    def sources(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for c in self._index.values():
            counts[c.source] = counts.get(c.source, 0) + 1
        return counts


class UnlabeledDataLoader(nnUNetDataLoader):
    """nnUNetDataLoader with random crops only: no foreground oversampling, no ignore-label sampling."""

    def __init__(self, data: UnlabeledDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        self.has_ignore = False  # annotated-class sampling would need labels


def check_input_channels(expected: int, cases: Sequence[UnlabeledCase]) -> None:
    """Every unlabeled case must have the plans' channel count (read from the blosc2 headers, cheap)."""
    bad = []
    for c in cases:
        shape = blosc2.open(urlpath=os.path.join(c.folder, c.identifier + ".b2nd"), mode="r").shape
        if shape[0] != expected:
            bad.append(f"{c.identifier} ({shape[0]} in {c.folder})")
    if bad:
        raise ValueError(f"{len(bad)} unlabeled case(s) have a different number of input channels than the plans "
                         f"expect ({expected}, dataset.json 'channel_names'): {bad[:5]}. Unlabeled images must have "
                         f"the same channels as imagesTr, named <case>_0000, <case>_0001, ...")


def load_fold(splits_file: str, fold) -> Optional[dict]:
    """The fold dict from splits_final.json, or None (fold 'all', or a fold nnU-Net creates at random)."""
    if fold == "all" or not os.path.isfile(splits_file):
        return None
    with open(splits_file) as f:
        splits = json.load(f)
    return splits[fold] if int(fold) < len(splits) else None
