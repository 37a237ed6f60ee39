"""The unlabeled data stream: where unlabeled cases live, how they are loaded, how they are sampled.

Two sources (``SemiSupervisedConfig.unlabeled_sources``):

* ``"split"``: identifiers in the fold's ``unlabeled`` list of ``splits_final.json`` (written by
  ``nnunet_proto make-splits``). They are cases of the *labeled* preprocessed folder; their
  segmentation files (``*_seg.b2nd``) and label-derived properties (``class_locations``) are never
  read: the loader gets an all-zero dummy segmentation instead.
* ``"folder"``: ``<data_identifier>_unlabeled/`` beside the labeled folder, written by
  ``nnunet_proto preprocess-unlabeled`` from ``nnUNet_raw/DatasetXXX/imagesUnlabeled``. A manifest
  ``<data_identifier>_unlabeled.json`` records a fingerprint of the preprocessing so that stale data
  (plans changed after preprocessing) is detected.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import blosc2
import numpy as np

from nnunet_proto.training.compat import load_pickle, nnUNetDataLoader, nnUNetDatasetBlosc2

MANIFEST_SUFFIX = "_unlabeled.json"
FOLDER_SUFFIX = "_unlabeled"


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


def cases_from_folder(preprocessed_dataset_base: str, data_identifier: str, expected_fingerprint: str,
                      configuration: str, dataset_id_hint: str) -> List[UnlabeledCase]:
    """Cases of ``<data_identifier>_unlabeled/`` after checking its manifest against the plans."""
    folder = unlabeled_folder(preprocessed_dataset_base, data_identifier)
    mpath = manifest_path(preprocessed_dataset_base, data_identifier)
    if not os.path.isdir(folder):
        return []
    fix = f"nnunet_proto preprocess-unlabeled -d {dataset_id_hint} -c {configuration} --overwrite"
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{folder} exists but its manifest {mpath} is missing, so its preprocessing cannot be "
                                f"verified. Re-create it with `{fix}`.")
    with open(mpath) as f:
        manifest = json.load(f)
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
