"""``nnunet_proto preprocess-unlabeled``: preprocess imagesUnlabeled with the plans' own preprocessor.

This is the path nnUNetv2_predict takes for images without labels (``run_case(images, None, ...)``):
the same transpose, cropping, resampling and normalisation (intensity statistics of the labeled
fingerprint) as the labeled cases. Output goes to ``<data_identifier>_unlabeled/`` beside the labeled
folder, never into it, plus a manifest ``<data_identifier>_unlabeled.json`` with the preprocessing
fingerprint, the cases and a size/mtime/voxel-hash record of every source file.

Integrity rules:

* Every image to be preprocessed is read completely and verified first (``image_check``): truncated or
  corrupt files, vector images and degenerate volumes (constant, mostly zeros) are refused, all of
  them listed in one error, before anything is written; with ``skip_bad`` they are skipped with a
  warning instead. A case that after cropping and resampling is smaller than half the patch along an
  axis is refused (or skipped) too, and so is a file the system cannot read (a folder named like an
  image, no read permission).
* Case ids that exist in imagesTs/labelsTs, and images whose voxels equal a test image, are refused
  (test leakage); ``skip_bad`` does not skip them. Voxels are compared by their canonical hash
  (``image_check.voxel_hash``: values as float64), so a copy saved with another voxel type is caught too;
  cases recorded with the older, type-dependent hash are verified again once and re-recorded. Cases
  kept from earlier runs are compared with the test images again on every run (by their recorded hash).
* The set follows ``imagesUnlabeled/``: a re-run drops vanished cases, redoes changed ones, adds new
  ones, and prints what changed. Finished unchanged cases are kept.
* The manifest is rewritten after every finished case, so an interrupted run resumes. A damaged
  manifest is refused with its name; ``overwrite`` rebuilds it.
* A rebuild (``overwrite``, or a changed fingerprint with ``overwrite``) writes into
  ``<folder>.partial`` and replaces the old folder and manifest only once everything succeeded; a
  failure leaves the old data untouched (and an interrupted rebuild resumes from ``.partial``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import asdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from nnunet_proto.data.image_check import (
    HASH_VERSION,
    ImageError,
    check_case,
    hash_version,
    image_content_hash,
    too_small_for_patch,
)
from nnunet_proto.training.compat import (
    PlansManager,
    comp_blosc2_params,
    maybe_convert_to_dataset_name,
    nnUNet_preprocessed,
    nnUNet_raw,
    nnUNetDatasetBlosc2,
    require_env_path,
)
from nnunet_proto.training.unlabeled import (
    FileRecord,
    ManifestError,
    channel_file_pattern,
    manifest_path,
    preprocess_command,
    preprocessing_fingerprint,
    read_manifest,
    source_changes,
    unlabeled_folder,
    write_manifest,
)

UNLABELED_DIR = "imagesUnlabeled"


def list_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Map case id -> channel files of ``imagesUnlabeled``, checked against dataset.json.

    Raises with the offending file names when the folder is missing or empty, a file has another
    ending than dataset.json's ``file_ending``, a case lacks a channel or has an extra one, or a case
    id clashes with a labeled case in imagesTr or a test case in imagesTs/labelsTs.
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
    pattern = channel_file_pattern(ending)
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
    test = test_case_ids(raw_dataset_folder, ending)
    leak = sorted(set(cases) & test)
    if leak:
        raise ValueError(f"unlabeled case ids {leak[:5]} also exist in imagesTs/labelsTs: training on test images "
                         f"(even without labels) leaks the test set. Remove them from {folder}.")
    return {case: [chans[c] for c in sorted(chans)] for case, chans in sorted(cases.items())}


def test_case_ids(raw_dataset_folder: str, file_ending: str) -> set:
    """Case ids of imagesTs (``<case>_XXXX<ending>``) and labelsTs (``<case><ending>``); empty if absent."""
    ids = set()
    images, labels = os.path.join(raw_dataset_folder, "imagesTs"), os.path.join(raw_dataset_folder, "labelsTs")
    if os.path.isdir(images):
        pattern = channel_file_pattern(file_ending)
        ids |= {m.group(1) for f in os.listdir(images) if (m := pattern.match(f))}
    if os.path.isdir(labels):
        ids |= {f[: -len(file_ending)] for f in os.listdir(labels) if f.endswith(file_ending)}
    return ids


def test_image_hashes(raw_dataset_folder: str, file_ending: str, version: int = HASH_VERSION) -> Dict[str, str]:
    """{voxel hash: file name} of every image in imagesTs (empty if absent), in hash ``version``; unreadable files
    are skipped."""
    folder = os.path.join(raw_dataset_folder, "imagesTs")
    out: Dict[str, str] = {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            if f.endswith(file_ending):
                try:
                    out[image_content_hash(os.path.join(folder, f), version=version)] = f
                except (ImageError, RuntimeError, OSError):
                    pass  # a broken test image is the benchmark's problem, not a leak
    return out


def recorded_test_leaks(cases: Iterable[str], records: Dict[str, List[dict]], test_ids: Iterable[str],
                        test_hashes: Dict[str, str]) -> Dict[str, str]:
    """{case: why} of the cases that are test cases: the id is in ``test_ids`` or a recorded voxel hash (manifest
    file records, ``image_check.FileRecord`` as dicts) is in ``test_hashes`` ({hash: file}, ``test_image_hashes``)."""
    test_ids, out = set(test_ids), {}
    for case in cases:
        if case in test_ids:
            out[case] = f"{case}: a test case id in imagesTs/labelsTs"
            continue
        same = [test_hashes[r["sha256"]] for r in records.get(case, []) if r.get("sha256") in test_hashes]
        if same:
            out[case] = f"{case}: identical voxels to the test image(s) {same} in imagesTs"
    return out


def manifest_test_leaks(manifest: dict, raw_dataset_folder: str, file_ending: str) -> Dict[str, str]:
    """{case: why} of the manifest's cases that are test cases of ``raw_dataset_folder`` (ids and voxel hashes,
    see ``recorded_test_leaks``): what the trainer checks at start. Reads every imagesTs image once."""
    if not manifest.get("cases"):
        return {}
    files = manifest.get("files", {})
    test_hashes: Dict[str, str] = {}
    # records written with an older hash version are compared in their own version (preprocess-unlabeled
    # re-records them in the current one)
    versions = {hash_version(r["sha256"]) for c in manifest["cases"] for r in files.get(c, []) if r.get("sha256")}
    for version in versions:
        test_hashes.update(test_image_hashes(raw_dataset_folder, file_ending, version))
    return recorded_test_leaks(manifest["cases"], files, test_case_ids(raw_dataset_folder, file_ending), test_hashes)


def default_configurations(plans: dict, preprocessed_dataset_folder: str) -> List[str]:
    """Configurations to preprocess when none are given: those of the plans that are not cascade stages and
    whose labeled data has been preprocessed (all non-cascade ones if none has)."""
    candidates = [c for c, cfg in plans["configurations"].items()
                  if not cfg.get("previous_stage") and "cascade" not in c]
    done = [c for c in candidates
            if os.path.isdir(os.path.join(preprocessed_dataset_folder,
                                          PlansManager(plans).get_configuration(c).data_identifier))]
    return done or candidates


def _preprocess_one(args) -> Tuple[str, Tuple[int, ...]]:
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
    return case, tuple(data.shape[1:])


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _remove_case(folder: str, case: str) -> None:
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        path = os.path.join(folder, case + suffix)
        if os.path.isfile(path):
            os.remove(path)


def _unreadable(e: OSError) -> str:
    """What ``check_case`` met when the operating system refused a file: the path, the reason and the fix."""
    path = e.filename or "an image"
    if isinstance(e, IsADirectoryError):
        return f"{path}: a folder named like an image, not an image file. Move it out of {UNLABELED_DIR}."
    if isinstance(e, PermissionError):
        return f"{path}: cannot be read ({e.strerror}). Fix its permissions (chmod a+r) or remove it."
    return f"{path}: cannot be read ({e.strerror or e}). Copy it again or remove it."


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


class _Validator:
    """Verifies each case once (shared by all configurations): {case: records} or {case: problem}."""

    def __init__(self, cases: Dict[str, List[str]], raw_folder: str, file_ending: str):
        self.cases, self.raw_folder, self.ending = cases, raw_folder, file_ending
        self.records: Dict[str, List[FileRecord]] = {}
        self.problems: Dict[str, str] = {}
        self.leaks: Dict[str, str] = {}
        self._test_hashes: Optional[Dict[str, str]] = None

    def test_hashes(self) -> Dict[str, str]:
        """{voxel hash: file name} of imagesTs, read once."""
        if self._test_hashes is None:
            self._test_hashes = test_image_hashes(self.raw_folder, self.ending)
        return self._test_hashes

    def check(self, ids: Sequence[str], verbose: bool) -> None:
        todo = [c for c in ids if c not in self.records and c not in self.problems and c not in self.leaks]
        if not todo:
            return
        self.test_hashes()
        for case in tqdm(todo, desc="verifying unlabeled images", unit="case", disable=not verbose or len(todo) < 2,
                         file=sys.stderr):
            try:
                records = check_case(self.cases[case])
            except ImageError as e:
                self.problems[case] = str(e)
                continue
            except OSError as e:  # a folder named like an image, no read permission, an I/O error
                self.problems[case] = _unreadable(e)
                continue
            same = [self._test_hashes[r.sha256] for r in records if r.sha256 in self._test_hashes]
            if same:
                self.leaks[case] = f"{case}: identical voxels to the test image(s) {same} in imagesTs"
            else:
                self.records[case] = records


def preprocess_unlabeled(dataset: str, configurations: Optional[Sequence[str]] = None,
                         plans_identifier: str = "nnUNetPlans", num_processes: int = 1, overwrite: bool = False,
                         verbose: bool = True, skip_bad: bool = False) -> Dict[str, dict]:
    """Preprocess imagesUnlabeled for each configuration (default: ``default_configurations``).

    Returns {configuration: {"folder", "num_cases", "new" (cases preprocessed now), "vanished",
    "changed", "skipped" (case -> reason), "fingerprint"}}. See the module docstring for the rules.
    """
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
    configurations = list(configurations) if configurations else default_configurations(plans, pre_folder)
    for configuration in configurations:  # all arguments checked before anything is written
        if configuration not in plans["configurations"]:
            raise KeyError(f"configuration {configuration!r} is not in {plans_file} "
                           f"(available: {sorted(plans['configurations'])})")
        if PlansManager(plans).get_configuration(configuration).previous_stage_name is not None:
            raise ValueError(f"{configuration!r} is a cascade stage; nnunet_proto does not support cascades")
    cases = list_unlabeled_cases(raw_folder, dataset_json)
    validator = _Validator(cases, raw_folder, dataset_json["file_ending"])
    return {c: _preprocess_configuration(c, cases, validator, plans, plans_identifier, dataset_json, raw_folder,
                                         pre_folder, dataset_name, num_processes, overwrite, verbose, skip_bad)
            for c in configurations}


def _preprocess_configuration(configuration: str, cases: Dict[str, List[str]], validator: _Validator, plans: dict,
                              plans_identifier: str, dataset_json: dict, raw_folder: str, pre_folder: str,
                              dataset_name: str, num_processes: int, overwrite: bool, verbose: bool,
                              skip_bad: bool) -> dict:
    cm = PlansManager(plans).get_configuration(configuration)
    fingerprint = preprocessing_fingerprint(plans, configuration, dataset_json)
    out_folder = unlabeled_folder(pre_folder, cm.data_identifier)
    mpath = manifest_path(pre_folder, cm.data_identifier)
    old, damaged = None, False
    if os.path.isfile(mpath):
        try:
            old = read_manifest(mpath)
        except ManifestError as e:
            if not overwrite:
                fix = preprocess_command(dataset_name, configuration, plans_identifier, overwrite=True)
                raise ManifestError(f"{e}. Rebuild the data with `{fix}` (the old data stays until the rebuild "
                                    f"succeeds).") from None
            _warn(f"{e}; rebuilding (--overwrite)")
            damaged = True
    if old is not None and old.get("fingerprint") != fingerprint and not overwrite:
        raise ValueError(f"{out_folder} was preprocessed with other settings (fingerprint {old.get('fingerprint')} "
                         f"vs {fingerprint} now). Pass --overwrite to replace it.")
    if old is None and os.path.isdir(out_folder) and os.listdir(out_folder) and not overwrite:
        raise FileExistsError(f"{out_folder} exists without a manifest; pass --overwrite to replace it")
    rebuild = overwrite and (old is not None or damaged or os.path.isdir(out_folder))
    fresh = {"fingerprint": fingerprint, "cases": [], "files": {}, "skipped": {}}
    if rebuild:  # build beside the old data; swap only on success
        target, target_manifest = out_folder + ".partial", mpath + ".partial"
        try:
            state = read_manifest(target_manifest) if os.path.isfile(target_manifest) else None
        except ManifestError:
            state = None  # a damaged record of an interrupted rebuild: start the rebuild afresh
        if state is None or state.get("fingerprint") != fingerprint:
            shutil.rmtree(target, ignore_errors=True)
            state = fresh
        elif verbose:
            print(f"{dataset_name} {configuration}: resuming the interrupted rebuild in {target}")
    else:
        target, target_manifest, state = out_folder, mpath, old or fresh
    state.update(fingerprint=fingerprint, plans_name=plans.get("plans_name", plans_identifier),
                 configuration=configuration, data_identifier=cm.data_identifier,
                 source=os.path.join(raw_folder, UNLABELED_DIR))
    state["skipped"] = {}

    changes = source_changes(state, cases)
    # listed cases whose preprocessed files went missing are redone
    lost = [c for c in state["cases"] if c in cases and c not in changes.changed
            and not os.path.isfile(os.path.join(target, c + ".b2nd"))]
    if verbose and state["cases"] and (changes.vanished or changes.changed):
        print(f"{dataset_name} {configuration}: imagesUnlabeled changed since the last run: {changes.describe()}")
    # unrecorded (version-1 manifest) and outdated (older voxel hash) cases are verified again like new ones,
    # leakage check included: the older hash missed re-typed copies of test images
    recheck = changes.unrecorded + changes.outdated
    if verbose and changes.outdated:
        print(f"{dataset_name} {configuration}: re-verifying {len(changes.outdated)} case(s) recorded with an older "
              f"voxel hash (read once, then recorded in the current format)")
    validator.check(changes.new + changes.changed + recheck + lost, verbose)
    involved = set(changes.new + changes.changed + recheck + lost)
    leaks = [validator.leaks[c] for c in sorted(involved) if c in validator.leaks]
    # cases kept from earlier runs too: a test image may have been added (or copied from here) since
    kept = [c for c in state["cases"] if c in cases and c not in involved and state["files"].get(c)]
    if kept:
        leaks += list(recorded_test_leaks(kept, state["files"], (), validator.test_hashes()).values())
    if leaks:
        raise ValueError(f"{len(leaks)} unlabeled image(s) are copies of test images (test leakage): "
                         f"{'; '.join(leaks[:5])}. Remove them from {state['source']}. Nothing was changed.")
    bad = {c: validator.problems[c] for c in sorted(involved) if c in validator.problems}
    if bad and not skip_bad:
        raise ValueError(f"{len(bad)} unlabeled image(s) cannot be used:\n  " + "\n  ".join(bad.values())
                         + "\nRemove or replace them, or pass --skip-bad to skip them. Nothing was changed.")
    for case, why in bad.items():
        _warn(f"skipping unlabeled case {case}: {why}")
        state["skipped"][case] = why

    # apply the folder's changes to the manifest before any new work, so an interruption leaves it consistent
    os.makedirs(target, exist_ok=True)
    drop = set(changes.vanished) | set(changes.changed) | set(lost) | (set(recheck) & set(bad))
    for case in drop:
        _remove_case(target, case)
    state["cases"] = sorted(c for c in state["cases"] if c not in drop)
    state["files"] = {c: r for c, r in state["files"].items() if c in state["cases"]}
    for case in changes.unrecorded:  # version-1 manifest: record the verified files of kept cases
        if case in validator.records:
            state["files"][case] = [asdict(r) for r in validator.records[case]]
    for case in changes.touched:  # same voxels, new size/mtime (copied or touched): refresh the record
        state["files"][case] = [asdict(FileRecord(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns,
                                                  r["sha256"]))
                                for f, r in zip(cases[case], state["files"][case])]
    for case in changes.outdated:  # re-verified: their records in the current hash version
        if case in validator.records and case in state["cases"]:
            state["files"][case] = [asdict(r) for r in validator.records[case]]
    write_manifest(target_manifest, state)

    todo = [c for c in sorted(set(changes.new) | set(changes.changed) | set(lost)) if c in validator.records]
    if verbose:
        print(f"{dataset_name} {configuration}: {len(todo)} unlabeled case(s) to preprocess, {len(state['cases'])} "
              f"already done -> {out_folder}")
    jobs = [(c, cases[c], target, plans, configuration, dataset_json) for c in todo]
    too_small: Dict[str, str] = {}
    patch = tuple(cm.patch_size)
    with tqdm(total=len(jobs), desc=f"preprocessing {configuration}", unit="case", disable=not verbose or not jobs,
              file=sys.stderr) as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            results = map(_preprocess_one, jobs)
            pool = None
        else:
            # workers ignore Ctrl-C: the main process stops them and reports once (no traceback per worker)
            pool = multiprocessing.get_context("spawn").Pool(num_processes, initializer=_ignore_sigint)
            results = pool.imap_unordered(_preprocess_one, jobs)
        try:
            for case, shape in results:
                bar.update(1)
                if too_small_for_patch(shape, patch):
                    _remove_case(target, case)
                    too_small[case] = (f"{shape} voxels after cropping and resampling, less than half the "
                                       f"patch {list(patch)} along an axis (mostly padding)")
                    continue
                state["cases"] = sorted(set(state["cases"]) | {case})
                state["files"][case] = [asdict(r) for r in validator.records[case]]
                write_manifest(target_manifest, state)  # after every case: an interrupted run resumes here
        finally:
            if pool is not None:
                pool.terminate()
    if too_small and not skip_bad:
        kept = f"The old data in {out_folder} is unchanged; " if rebuild else ""
        raise ValueError(f"{len(too_small)} unlabeled case(s) are degenerate:\n  "
                         + "\n  ".join(f"{c}: {why}" for c, why in too_small.items())
                         + f"\n{kept}remove them or pass --skip-bad to skip them.")
    for case, why in too_small.items():
        _warn(f"skipping unlabeled case {case}: {why}")
        state["skipped"][case] = why
    write_manifest(target_manifest, state)
    if rebuild:
        if os.path.isdir(out_folder):
            shutil.rmtree(out_folder + ".old", ignore_errors=True)
            os.replace(out_folder, out_folder + ".old")
        os.replace(target, out_folder)
        os.replace(target_manifest, mpath)
        shutil.rmtree(out_folder + ".old", ignore_errors=True)
    return {"folder": out_folder, "num_cases": len(state["cases"]), "new": len(todo) - len(too_small),
            "vanished": changes.vanished, "changed": changes.changed, "skipped": dict(state["skipped"]),
            "fingerprint": fingerprint}
