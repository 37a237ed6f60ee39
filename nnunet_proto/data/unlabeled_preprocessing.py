"""``nnunet_proto preprocess-unlabeled``: preprocess imagesUnlabeled with the plans' own preprocessor.

This is the path nnUNetv2_predict takes for images without labels (``run_case(images, None, ...)``):
the same transpose, cropping, resampling and normalisation (intensity statistics of the labeled
fingerprint) as the labeled cases. Output goes to ``<data_identifier>_unlabeled/`` beside the labeled
folder, never into it, plus a manifest ``<data_identifier>_unlabeled.json`` with the preprocessing
fingerprint. Re-running adds new cases and keeps finished ones; a changed fingerprint is an error
unless ``overwrite`` is given (then the old folder is replaced).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from typing import Dict, List, Sequence

import numpy as np

from nnunet_proto.training.compat import (
    PlansManager,
    comp_blosc2_params,
    maybe_convert_to_dataset_name,
    nnUNet_preprocessed,
    nnUNet_raw,
    nnUNetDatasetBlosc2,
    require_env_path,
)
from nnunet_proto.training.unlabeled import manifest_path, preprocessing_fingerprint, unlabeled_folder

UNLABELED_DIR = "imagesUnlabeled"


def list_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Map case id -> channel files of ``imagesUnlabeled``, checked against dataset.json.

    Raises with the offending file names when the folder is missing or empty, a file has another
    ending than dataset.json's ``file_ending``, a case lacks a channel or has an extra one, or a case
    id clashes with a labeled case in imagesTr.
    """
    folder = os.path.join(raw_dataset_folder, UNLABELED_DIR)
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    n_channels = len(channels)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist. Put the unlabeled images there, named like imagesTr "
                                f"(<case>_0000{ending} for the first channel).")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder} is empty")
    wrong = [f for f in files if not f.endswith(ending)]
    if wrong:
        raise ValueError(f"{len(wrong)} file(s) in {folder} do not end with the dataset's file_ending {ending!r} "
                         f"(e.g. {wrong[:3]}). Convert them to {ending} or fix dataset.json.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: Dict[str, Dict[int, str]] = {}
    for f in files:
        m = pattern.match(f)
        if m is None:
            raise ValueError(f"{os.path.join(folder, f)} is not named <case>_XXXX{ending} (XXXX = 4-digit channel "
                             f"index), as nnU-Net requires")
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    expected = set(range(n_channels))
    for case, chans in sorted(cases.items()):
        if set(chans) != expected:
            raise ValueError(f"unlabeled case {case!r} has channel files {sorted(chans)} but dataset.json defines "
                             f"{n_channels} channel(s) {sorted(expected)} ({channels}). Provide exactly "
                             f"{', '.join(f'{case}_{c:04d}{ending}' for c in sorted(expected))}.")
    labeled_dir = os.path.join(raw_dataset_folder, "imagesTr")
    if os.path.isdir(labeled_dir):
        labeled = {m.group(1) for f in os.listdir(labeled_dir) if (m := pattern.match(f))}
        clash = sorted(set(cases) & labeled)
        if clash:
            raise ValueError(f"unlabeled case ids {clash[:5]} also exist in imagesTr; rename the unlabeled files "
                             f"so every case id is unique")
    return {case: [chans[c] for c in sorted(chans)] for case, chans in sorted(cases.items())}


def _preprocess_one(args) -> str:
    case, files, out_folder, plans, configuration, dataset_json = args
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case(files, None, plans_manager, cm, dataset_json)
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)  # crop mask only (0 inside, -1 outside): no label information
    properties["class_locations"] = {}
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, os.path.join(out_folder, case), chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return case


def preprocess_unlabeled(dataset: str, configurations: Sequence[str], plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, overwrite: bool = False, verbose: bool = True) -> Dict[str, dict]:
    """Preprocess imagesUnlabeled for each configuration; returns {configuration: summary}."""
    require_env_path(nnUNet_raw)
    require_env_path(nnUNet_preprocessed)
    dataset_name = maybe_convert_to_dataset_name(dataset)
    raw_folder = os.path.join(nnUNet_raw.get(), dataset_name)
    pre_folder = os.path.join(nnUNet_preprocessed.get(), dataset_name)
    plans_file = os.path.join(pre_folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} not found. Run nnUNetv2_plan_and_preprocess -d {dataset} first "
                                f"(and pass -p if you use other plans).")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(pre_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    cases = list_unlabeled_cases(raw_folder, dataset_json)
    summaries = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise KeyError(f"configuration {configuration!r} is not in {plans_file} "
                           f"(available: {sorted(plans['configurations'])})")
        cm = PlansManager(plans).get_configuration(configuration)
        if cm.previous_stage_name is not None:
            raise ValueError(f"{configuration!r} is a cascade stage; nnunet_proto does not support cascades")
        fingerprint = preprocessing_fingerprint(plans, configuration, dataset_json)
        out_folder = unlabeled_folder(pre_folder, cm.data_identifier)
        mpath = manifest_path(pre_folder, cm.data_identifier)
        done: List[str] = []
        if os.path.isfile(mpath):
            with open(mpath) as f:
                manifest = json.load(f)
            if manifest.get("fingerprint") != fingerprint:
                if not overwrite:
                    raise ValueError(f"{out_folder} was preprocessed with other settings (fingerprint "
                                     f"{manifest.get('fingerprint')} vs {fingerprint} now). Pass --overwrite to "
                                     f"replace it.")
                shutil.rmtree(out_folder, ignore_errors=True)
                os.remove(mpath)
            elif overwrite:
                shutil.rmtree(out_folder, ignore_errors=True)
                os.remove(mpath)
            else:
                done = [c for c in manifest.get("cases", []) if os.path.isfile(os.path.join(out_folder, c + ".b2nd"))]
        elif os.path.isdir(out_folder):
            if not overwrite:
                raise FileExistsError(f"{out_folder} exists without a manifest; pass --overwrite to replace it")
            shutil.rmtree(out_folder)
        os.makedirs(out_folder, exist_ok=True)
        todo = [c for c in cases if c not in done]
        if verbose:
            print(f"{dataset_name} {configuration}: {len(todo)} unlabeled case(s) to preprocess, "
                  f"{len(done)} already done -> {out_folder}")
        jobs = [(c, cases[c], out_folder, plans, configuration, dataset_json) for c in todo]
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                _preprocess_one(job)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for _ in pool.imap_unordered(_preprocess_one, jobs):
                    pass
        manifest = {"fingerprint": fingerprint, "plans_name": plans.get("plans_name", plans_identifier),
                    "configuration": configuration, "data_identifier": cm.data_identifier,
                    "source": os.path.join(raw_folder, UNLABELED_DIR), "cases": sorted(set(done) | set(todo))}
        tmp = mpath + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, mpath)
        summaries[configuration] = {"folder": out_folder, "num_cases": len(manifest["cases"]),
                                    "new": len(todo), "fingerprint": fingerprint}
    return summaries

