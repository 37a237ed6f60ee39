"""Test-set leakage check of a benchmark: no test case may be trained on, with or without its labels.

A test case leaks if its id, or the voxel content of one of its images (``image_check.voxel_hash``,
so a renamed or re-compressed copy is caught too), also appears in the labeled cases (imagesTr, and
every case named in splits_final.json, which includes the label-scarce folds' ``unlabeled`` lists)
or in the unlabeled pool (imagesUnlabeled and the cases of the preprocessed unlabeled manifests).

Every test image and test label is read completely first (``image_check.check_file_complete``): a
truncated file, a short voxel block or non-finite raw voxels refuse the benchmark before anything runs,
since SimpleITK would zero-fill them and the benchmark would train, predict and score a wrong test set.
The same holds for imagesTr (nnU-Net trained on those files). An unreadable file in imagesUnlabeled is
only counted: ``preprocess-unlabeled`` refuses or skips it, so it is never trained on.

Hashing reads every image once; the hashes are cached in a JSON file keyed by path, size and mtime,
so a resumed benchmark re-reads only new or changed files. Cached hashes of an older hash version
(``image_check.hash_version``) are recomputed. numpy, SimpleITK and the standard library only; nothing
here imports nnU-Net.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

from tqdm import tqdm

from nnunet_proto.data.image_check import HASH_VERSION, ImageError, hash_version, image_content_hash


class TestLeakageError(ValueError):
    """A test case is also part of the training data (labeled or unlabeled)."""

    __test__ = False  # not a pytest test class despite the name


def _ids_of_images(folder: Path, file_ending: str) -> Set[str]:
    pattern = re.compile(r"^(.+)_\d{4}" + re.escape(file_ending) + "$")
    return {m.group(1) for f in os.listdir(folder) if (m := pattern.match(f))} if folder.is_dir() else set()


def _image_files(folder: Path, file_ending: str) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(file_ending)) if folder.is_dir() else []


class HashCache:
    """Voxel hashes of image files, cached on disk by (path, size, mtime_ns)."""

    def __init__(self, cache_file: Optional[Path]):
        self.file = cache_file
        self.entries: Dict[str, list] = {}
        self.unreadable: List[Path] = []  # files left out by hashes(..., refuse=None)
        if cache_file is not None and cache_file.is_file():
            try:
                self.entries = json.loads(cache_file.read_text())
            except json.JSONDecodeError:
                self.entries = {}  # a damaged cache is only a cache: recompute
            if not isinstance(self.entries, dict):
                self.entries = {}

    def hashes(self, files: Iterable[Path], desc: str, refuse: Optional[str] = None) -> Dict[str, Path]:
        """{voxel hash: file}, every file read completely (``image_content_hash``) unless cached unchanged.

        A file that cannot be read completely (truncated, corrupt, non-finite voxels) raises ImageError
        (its message names the file) followed by ``refuse``; with ``refuse=None`` it is left out and listed
        in ``self.unreadable`` instead.
        """
        files = list(files)
        out: Dict[str, Path] = {}
        for path in tqdm(files, desc=desc, unit="image", disable=len(files) < 20):
            st = path.stat()
            key = str(path.resolve())
            hit = self.entries.get(key)
            if (isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns
                    and isinstance(hit[2], str) and hash_version(hit[2]) == HASH_VERSION):
                digest = hit[2]
            else:
                try:
                    digest = image_content_hash(str(path))
                except (ImageError, RuntimeError) as e:
                    if refuse is not None:
                        raise ImageError(f"{e} {refuse}") from None
                    self.unreadable.append(path)
                    continue
                self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
            out[digest] = path
        return out

    def save(self) -> None:
        if self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.file)


def _manifest_cases(path: Path, key: str, repair: str):
    """The ``key`` entry (case list or {case: record}) of a JSON manifest; a damaged one is named, with its repair."""
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"the manifest {path} is damaged (not valid JSON: {e}); repair it with `{repair}`") from None
    cases = manifest.get(key, []) if isinstance(manifest, dict) else None
    if not isinstance(cases, (list, dict)):
        raise ValueError(f"the manifest {path} is damaged (no list or object {key!r}); repair it with `{repair}`")
    return cases


def test_set_identity(test_images: Path, test_labels: Path, file_ending: str, cache_file: Optional[Path]) -> dict:
    """What a benchmark's numbers were measured on: the folders, and per case its image and label files with voxel
    hashes (cached in ``cache_file``, as by the leakage check); ``digest`` hashes the cases, not the paths."""
    import hashlib

    cache = HashCache(cache_file)
    cases: Dict[str, dict] = {}
    for folder, role in ((test_images, "images"), (test_labels, "label")):
        hashes = cache.hashes(_image_files(folder, file_ending), f"test {role}", refuse="")
        for digest, path in sorted(hashes.items(), key=lambda x: x[1].name):
            m = re.match(r"^(.+)_\d{4}" + re.escape(file_ending) + "$", path.name) if role == "images" else None
            case = m.group(1) if m else path.name[: -len(file_ending)]
            entry = cases.setdefault(case, {})
            entry.setdefault(role, []).append([path.name, digest])
    cache.save()
    digest = hashlib.sha256(json.dumps(cases, sort_keys=True).encode()).hexdigest()[:16]
    return {"images": str(test_images), "labels": str(test_labels), "digest": digest, "cases": cases}


def check_test_leakage(test_images: Path, test_labels: Path, file_ending: str, preprocessed_folder: Path,
                       raw_folder: Optional[Path], cache_file: Optional[Path] = None,
                       pseudo_label_roots: Iterable[Path] = ()) -> str:
    """Raise TestLeakageError if a test case is among the labeled or unlabeled training data.

    Args:
        test_images / test_labels: the benchmark's test folders (``<case>_XXXX<ending>`` / ``<case><ending>``).
        preprocessed_folder: nnUNet_preprocessed/DatasetXXX (splits_final.json, gt_segmentations, the
            unlabeled manifests ``*_unlabeled.json``).
        raw_folder: nnUNet_raw/DatasetXXX (imagesTr, imagesUnlabeled) for the content check; None = ids only.
        cache_file: where to keep the voxel hashes between invocations.
        pseudo_label_roots: folders of pseudo-label sets (``pseudo_labels.pseudo_label_root``): their cases and
            recorded image hashes count as unlabeled training data.

    Returns:
        A one-line summary of what was checked.

    Raises:
        TestLeakageError: a test case is part of the training data.
        ImageError: a test image, test label or imagesTr image cannot be read completely (truncated,
            corrupt, NaN/infinite voxels); the message names the file. Nothing is written then.
    """
    test_ids = _ids_of_images(test_images, file_ending)
    if test_labels.is_dir():
        test_ids |= {f[: -len(file_ending)] for f in os.listdir(test_labels) if f.endswith(file_ending)}

    labeled: Set[str] = set()
    splits = preprocessed_folder / "splits_final.json"
    if splits.is_file():
        for fold in json.loads(splits.read_text()):
            for key in ("train", "val", "unlabeled"):
                labeled |= set(map(str, fold.get(key, [])))
    gt = preprocessed_folder / "gt_segmentations"
    if gt.is_dir():
        labeled |= {f[: -len(file_ending)] for f in os.listdir(gt) if f.endswith(file_ending)}
    unlabeled: Set[str] = set()
    for manifest in preprocessed_folder.glob("*_unlabeled.json"):
        unlabeled |= set(_manifest_cases(manifest, "cases", "nnunet_proto preprocess-unlabeled ... --overwrite"))
    # pseudo-label sets (nnunet_proto pseudo-label): their cases and the voxel hashes recorded for their images
    pseudo: Dict[str, str] = {}
    for root in pseudo_label_roots or ():
        for manifest in sorted(Path(root).glob("*/manifest.json")):
            for case, record in _manifest_cases(manifest, "cases", "nnunet_proto pseudo-label ... --overwrite").items():
                unlabeled.add(case)
                for image in record.get("images", []) if isinstance(record, dict) else []:
                    pseudo[image.get("sha256", "")] = f"{case} of the pseudo-label set {manifest.parent}"
    if raw_folder is not None:
        labeled |= _ids_of_images(raw_folder / "imagesTr", file_ending)
        unlabeled |= _ids_of_images(raw_folder / "imagesUnlabeled", file_ending)

    problems = [f"test case {c} is also a labeled case (imagesTr / splits_final.json)"
                for c in sorted(test_ids & labeled)]
    problems += [f"test case {c} is also an unlabeled case (imagesUnlabeled / preprocessed unlabeled manifest / "
                 f"pseudo-label set)" for c in sorted(test_ids & unlabeled)]
    # every test image and label is read completely, also without nnUNet_raw: a zero-filled test file would be
    # predicted and scored without a word
    cache = HashCache(cache_file)
    nothing_run = ("The benchmark reads the test set completely before it starts; nothing was run. Export or copy "
                   "the file again (or remove the case from both test folders).")
    test_hashes = cache.hashes(_image_files(test_images, file_ending), "checking test images", refuse=nothing_run)
    problems += [f"test image {test_hashes[h].name} has the same voxels as the image of {pseudo[h]}"
                 for h in sorted(set(test_hashes) & set(pseudo))]
    cache.hashes(_image_files(test_labels, file_ending), "checking test labels", refuse=nothing_run)
    content = "ids only (nnUNet_raw not available, image contents not compared)"
    if raw_folder is not None:
        unreadable = []
        for sub, what in (("imagesTr", "labeled"), ("imagesUnlabeled", "unlabeled")):
            # imagesTr was trained on as nnU-Net read it: a zero-filled file there is refused, not skipped
            refuse = ("nnU-Net's preprocessing read this training image with zeros in place of the bad voxels; "
                      "replace it and re-run nnUNetv2_plan_and_preprocess. Nothing was run.") \
                if sub == "imagesTr" else None
            pool = cache.hashes(_image_files(raw_folder / sub, file_ending), f"hashing {sub}", refuse=refuse)
            problems += [f"test image {test_hashes[h].name} has the same voxels as the {what} image {pool[h]}"
                         for h in sorted(set(test_hashes) & set(pool))]
            unreadable += cache.unreadable
            cache.unreadable = []
        content = f"ids and voxel hashes of {len(test_hashes)} test images"
        if unreadable:
            content += (f" ({len(unreadable)} unreadable image(s) in imagesUnlabeled not compared, e.g. "
                        f"{unreadable[0].name}: preprocess-unlabeled refuses or skips them, so they are not "
                        f"trained on)")
    cache.save()
    if problems:
        raise TestLeakageError(f"test leakage, the benchmark refuses to run ({len(problems)} problem(s)): "
                               + "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
                               + ". A test case must never be trained on, with or without labels: remove it from the "
                               "training data (and re-run nnUNetv2_plan_and_preprocess / nnunet_proto "
                               "preprocess-unlabeled) or from the test folders.")
    return f"no test leakage: {len(test_ids)} test cases checked against {len(labeled)} labeled and " \
           f"{len(unlabeled)} unlabeled cases by {content}"
