"""Test-set leakage check of a benchmark: no test case may be trained on, with or without its labels.

A test case leaks if its id, or the voxel content of one of its images (``image_check.voxel_hash``,
so a renamed or re-compressed copy is caught too), also appears in the labeled cases (imagesTr, and
every case named in splits_final.json, which includes the label-scarce folds' ``unlabeled`` lists)
or in the unlabeled pool (imagesUnlabeled and the cases of the preprocessed unlabeled manifests).

Hashing reads every image once; the hashes are cached in a JSON file keyed by path, size and mtime,
so a resumed benchmark re-reads only new or changed files. numpy, SimpleITK and the standard library
only; nothing here imports nnU-Net.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

from tqdm import tqdm

from nnunet_proto.data.image_check import ImageError, image_content_hash


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
        if cache_file is not None and cache_file.is_file():
            try:
                self.entries = json.loads(cache_file.read_text())
            except json.JSONDecodeError:
                self.entries = {}  # a damaged cache is only a cache: recompute

    def hashes(self, files: Iterable[Path], desc: str) -> Dict[str, Path]:
        """{voxel hash: file}; unreadable files are left out (their own checks report them)."""
        files = list(files)
        out: Dict[str, Path] = {}
        for path in tqdm(files, desc=desc, unit="image", disable=len(files) < 20):
            st = path.stat()
            key = str(path.resolve())
            hit = self.entries.get(key)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                digest = hit[2]
            else:
                try:
                    digest = image_content_hash(str(path))
                except (ImageError, RuntimeError):
                    continue
                self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
            out[digest] = path
        return out

    def save(self) -> None:
        if self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.file)


def check_test_leakage(test_images: Path, test_labels: Path, file_ending: str, preprocessed_folder: Path,
                       raw_folder: Optional[Path], cache_file: Optional[Path] = None) -> str:
    """Raise TestLeakageError if a test case is among the labeled or unlabeled training data.

    Args:
        test_images / test_labels: the benchmark's test folders (``<case>_XXXX<ending>`` / ``<case><ending>``).
        preprocessed_folder: nnUNet_preprocessed/DatasetXXX (splits_final.json, gt_segmentations, the
            unlabeled manifests ``*_unlabeled.json``).
        raw_folder: nnUNet_raw/DatasetXXX (imagesTr, imagesUnlabeled) for the content check; None = ids only.
        cache_file: where to keep the voxel hashes between invocations.

    Returns:
        A one-line summary of what was checked.
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
        unlabeled |= set(json.loads(manifest.read_text()).get("cases", []))
    if raw_folder is not None:
        labeled |= _ids_of_images(raw_folder / "imagesTr", file_ending)
        unlabeled |= _ids_of_images(raw_folder / "imagesUnlabeled", file_ending)

    problems = [f"test case {c} is also a labeled case (imagesTr / splits_final.json)"
                for c in sorted(test_ids & labeled)]
    problems += [f"test case {c} is also an unlabeled case (imagesUnlabeled / preprocessed unlabeled manifest)"
                 for c in sorted(test_ids & unlabeled)]
    content = "ids only (nnUNet_raw not available, image contents not compared)"
    if raw_folder is not None:
        cache = HashCache(cache_file)
        test_hashes = cache.hashes(_image_files(test_images, file_ending), "hashing test images")
        for sub, what in (("imagesTr", "labeled"), ("imagesUnlabeled", "unlabeled")):
            pool = cache.hashes(_image_files(raw_folder / sub, file_ending), f"hashing {sub}")
            problems += [f"test image {test_hashes[h].name} has the same voxels as the {what} image {pool[h]}"
                         for h in sorted(set(test_hashes) & set(pool))]
        cache.save()
        content = f"ids and voxel hashes of {len(test_hashes)} test images"
    if problems:
        raise TestLeakageError(f"test leakage, the benchmark refuses to run ({len(problems)} problem(s)): "
                               + "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
                               + ". A test case must never be trained on, with or without labels: remove it from the "
                               "training data (and re-run nnUNetv2_plan_and_preprocess / nnunet_proto "
                               "preprocess-unlabeled) or from the test folders.")
    return f"no test leakage: {len(test_ids)} test cases checked against {len(labeled)} labeled and " \
           f"{len(unlabeled)} unlabeled cases by {content}"
