"""Label-scarce folds appended to nnU-Net's splits_final.json (``nnunet_proto make-splits``).

A label-scarce fold is an ordinary nnU-Net fold dict with one extra key:

    {"train": [few labeled cases], "val": [nnU-Net's validation cases of the base fold],
     "unlabeled": [the other training cases of the base fold],
     "nnunet_proto": {"labeled": "10%", "seed": 0, "base_fold": 0, "group_regex": null}}

nnU-Net reads only ``train`` and ``val``, so plain ``nnUNetTrainer`` on this fold is the supervised
baseline on exactly the same labeled cases, while nnunet_proto trainers also read ``unlabeled``.
nnU-Net's own five folds are never modified; new folds are appended (an identical fold is reused).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class LabeledAmount:
    """``8`` (a count) or ``10%`` (a fraction of the base fold's training cases or groups)."""

    count: Optional[int] = None
    fraction: Optional[float] = None

    @classmethod
    def parse(cls, text) -> "LabeledAmount":
        s = str(text).strip()
        try:
            if s.endswith("%"):
                frac = float(s[:-1]) / 100.0
                if not 0.0 < frac <= 1.0:
                    raise ValueError
                return cls(fraction=frac)
            count = int(s)
            if count < 1:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(f"--labeled must be a positive count (e.g. 8) or a percentage in (0, 100] "
                             f"(e.g. 10%), got {text!r}") from None

    def resolve(self, n: int) -> int:
        if self.count is not None:
            if self.count > n:
                raise ValueError(f"asked for {self.count} labeled cases/groups but the base fold's training part "
                                 f"has only {n}")
            return self.count
        return max(1, int(round(self.fraction * n)))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction * 100:g}%"


def group_of(identifier: str, pattern: Optional[re.Pattern]) -> str:
    """Group key of a case: the regex's first capture group (or whole match); the id if no match."""
    if pattern is None:
        return identifier
    m = pattern.search(identifier)
    if m is None:
        return identifier
    # an optional capture group that did not take part in the match falls back to the whole match
    return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)


def compile_group_regex(group_regex: Optional[str]) -> Optional[re.Pattern]:
    """The compiled ``--group-regex`` (None stays None); an invalid pattern is a ValueError naming it."""
    if not group_regex:
        return None
    try:
        return re.compile(group_regex)
    except re.error as e:
        raise ValueError(f"--group-regex {group_regex!r} is not a valid regular expression ({e}); e.g. "
                         f"'(patient\\d+)' groups ACDC cases by patient") from None


def check_grouping(pool: Sequence[str], group_regex: Optional[str]) -> str:
    """Check that ``group_regex`` groups ``pool`` usefully; returns "matched k/n cases into g groups".

    Refuses a regex that matches no case (it would silently give the ungrouped fold) and one that puts
    every case into a single group (nothing could be split into labeled and unlabeled).
    """
    pattern = compile_group_regex(group_regex)
    if pattern is None:
        return f"no --group-regex: {len(pool)} cases, each its own group"
    matched = [c for c in pool if pattern.search(c)]
    groups = {group_of(c, pattern) for c in pool}
    summary = f"--group-regex {group_regex!r} matched {len(matched)}/{len(pool)} cases into {len(groups)} groups"
    if not matched:
        raise ValueError(f"{summary}: it matches no case id (e.g. {sorted(pool)[:3]}). Fix the pattern; its first "
                         f"capture group is the group key, e.g. '(patient\\d+)'.")
    if len(groups) < 2:
        raise ValueError(f"{summary}: every case is in the same group {next(iter(groups))!r}, so nothing can be split "
                         f"into labeled and unlabeled cases. Put the part that differs between groups into the first "
                         f"capture group, e.g. '(patient\\d+)'.")
    return summary


def choose_labeled(pool: Sequence[str], amount: LabeledAmount, seed: int,
                   group_regex: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Split ``pool`` into (labeled, unlabeled); whole groups go to one side. Deterministic in ``seed``.

    With a group regex, counts and percentages refer to groups (e.g. ACDC patients), not cases.
    """
    pattern = compile_group_regex(group_regex)
    groups: Dict[str, List[str]] = {}
    for case in sorted(pool):
        groups.setdefault(group_of(case, pattern), []).append(case)
    keys = sorted(groups)
    k = amount.resolve(len(keys))
    if k >= len(keys):
        raise ValueError(f"labeling {k} of {len(keys)} {'groups' if pattern else 'cases'} leaves no unlabeled case; "
                         f"choose a smaller --labeled")
    order = np.random.default_rng(seed).permutation(len(keys))
    chosen = {keys[i] for i in order[:k]}
    labeled = sorted(c for g in keys if g in chosen for c in groups[g])
    unlabeled = sorted(c for g in keys if g not in chosen for c in groups[g])
    return labeled, unlabeled


def case_identifiers(preprocessed_dataset_folder: str, raw_dataset_folder: Optional[str] = None,
                     file_ending: str = ".nii.gz") -> List[str]:
    """Labeled case identifiers, from gt_segmentations (after preprocessing) or raw labelsTr."""
    for folder in [os.path.join(preprocessed_dataset_folder, "gt_segmentations"),
                   os.path.join(raw_dataset_folder, "labelsTr") if raw_dataset_folder else None]:
        if folder and os.path.isdir(folder):
            ids = sorted(f[: -len(file_ending)] for f in os.listdir(folder) if f.endswith(file_ending))
            if ids:
                return ids
    raise FileNotFoundError(f"no labeled cases found in {preprocessed_dataset_folder}/gt_segmentations or labelsTr; "
                            f"run nnUNetv2_plan_and_preprocess first")


def default_folds(identifiers: Sequence[str], group_regex: Optional[str] = None) -> List[dict]:
    """nnU-Net's 5-fold split (KFold, shuffle, seed 12345). With a group regex the same KFold runs over the
    sorted groups and each fold takes whole groups, so e.g. both frames of a patient share a side."""
    from nnunet_proto.training.compat import generate_crossval_split

    pattern = compile_group_regex(group_regex)
    if pattern is None:
        return [{"train": [str(i) for i in s["train"]], "val": [str(i) for i in s["val"]]}
                for s in generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)]
    groups: Dict[str, List[str]] = {}
    for case in sorted(identifiers):
        groups.setdefault(group_of(case, pattern), []).append(case)
    folds = []
    for s in generate_crossval_split(sorted(groups), seed=12345, n_splits=5):
        folds.append({"train": sorted(c for g in s["train"] for c in groups[str(g)]),
                      "val": sorted(c for g in s["val"] for c in groups[str(g)])})
    return folds


def read_splits(path: Path) -> List[dict]:
    """nnU-Net's splits_final.json: a list of folds, each an object with 'train' and 'val' lists of case ids.

    Raises ValueError naming the file, the fold and what is wrong (nnU-Net itself would fail later with a
    bare KeyError).
    """
    fix = ("Fix it by hand (delete it only if nothing was trained on its folds yet: folds appended by make-splits "
           "may get other numbers when made again).")
    try:
        splits = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}). {fix}") from None
    if not isinstance(splits, list):
        raise ValueError(f"{path} holds a JSON {type(splits).__name__}; nnU-Net expects a list of folds, each "
                         f"{{\"train\": [...], \"val\": [...]}}. {fix}")
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict):
            raise ValueError(f"{path}: fold {i} is a JSON {type(fold).__name__}, not an object with 'train' and "
                             f"'val' lists. {fix}")
        for key in ("train", "val") + (("unlabeled",) if "unlabeled" in fold else ()):
            if key not in fold:
                raise ValueError(f"{path}: fold {i} has no '{key}' list (it has {sorted(fold)}). {fix}")
            if not isinstance(fold[key], list) or not all(isinstance(c, str) for c in fold[key]):
                raise ValueError(f"{path}: fold {i}: '{key}' is not a list of case ids. {fix}")
    return splits


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    os.replace(tmp, path)


def make_label_scarce_fold(preprocessed_dataset_folder: str, amount: LabeledAmount, seed: int = 0,
                           group_regex: Optional[str] = None, base_fold: int = 0,
                           raw_dataset_folder: Optional[str] = None, file_ending: str = ".nii.gz") -> Tuple[int, dict]:
    """Append (or find) a label-scarce fold; returns (fold index, fold dict).

    If splits_final.json does not exist yet, nnU-Net's five folds are created first: exactly as nnU-Net
    would (5-fold KFold, seed 12345, over the sorted labeled identifiers), or, with ``group_regex``, the
    same KFold over groups so that no group is split between train and val (nnU-Net's default would
    put the two frames of an ACDC patient on both sides). Existing folds are never modified.
    Diagnostics (the grouping summary, warnings) go to stderr, so that stdout can carry the fold number.
    """
    splits_file = Path(preprocessed_dataset_folder) / "splits_final.json"
    if splits_file.is_file():
        splits = read_splits(splits_file)
    else:
        ids = case_identifiers(preprocessed_dataset_folder, raw_dataset_folder, file_ending)
        print(check_grouping(ids, group_regex), file=sys.stderr)
        splits = default_folds(ids, group_regex)
    if not 0 <= base_fold < len(splits):
        raise ValueError(f"base fold {base_fold} does not exist (splits_final.json has {len(splits)} folds)")
    base = splits[base_fold]
    if "unlabeled" in base:
        raise ValueError(f"base fold {base_fold} is itself a label-scarce fold; use one of nnU-Net's folds")
    if group_regex:
        print(check_grouping(list(base["train"]), group_regex) + f" (training part of base fold {base_fold})",
              file=sys.stderr)
    labeled, unlabeled = choose_labeled(base["train"], amount, seed, group_regex)
    val = list(base["val"])
    if group_regex:
        pattern = compile_group_regex(group_regex)
        straddling = sorted({group_of(c, pattern) for c in val} & {group_of(c, pattern) for c in base["train"]})
        if straddling:
            print(f"WARNING: groups {straddling[:5]} have cases both in the validation part and the training part "
                  f"of base fold {base_fold} (nnU-Net's default split ignores groups). Validation scores of these "
                  f"groups are optimistic; the held-out test set is unaffected.", file=sys.stderr)
    fold = {"train": labeled, "val": val, "unlabeled": unlabeled,
            "nnunet_proto": {"labeled": str(amount), "seed": seed, "base_fold": base_fold,
                             "group_regex": group_regex}}
    for i, existing in enumerate(splits):
        if (sorted(existing.get("train", [])) == labeled and sorted(existing.get("val", [])) == sorted(val)
                and sorted(existing.get("unlabeled", [])) == unlabeled):
            return i, existing
    splits.append(fold)
    write_json_atomic(splits_file, splits)
    return len(splits) - 1, fold
