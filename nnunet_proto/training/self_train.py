"""``nnunet_proto self-train``: k rounds of offline self-training end to end, resumable.

Round r: the teacher (round 1: the run the user names; round r > 1: the student of round r - 1) pseudo-labels the
fold's unlabeled pool (``pseudo_labels.make_pseudo_labels`` into the set of round r), then the student of round r
(``nnUNetTrainerSelfTraining``, ``..._round2``, ...) trains with nnU-Net's own ``run_training`` (the function
behind ``nnUNetv2_train``, with its final validation), and nnU-Net's postprocessing is determined on that
validation (``fold_X/validation/postprocessing.pkl``) so that the next round's pseudo labels are post-processed
too. A finished round (validation done, postprocessing determined) is skipped; an interrupted one resumes
(``--c`` semantics) and an interrupted pseudo-labeling continues where it stopped.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import List

import torch

from nnunet_proto.data.pseudo_labels import DEFAULT_DROP, Teacher, make_pseudo_labels

STUDENT = "nnUNetTrainerSelfTraining"
MAX_ROUNDS = 3


def round_trainer(student: str, round_: int) -> str:
    """The student trainer of round ``round_``: ``student`` itself in round 1, else ``student`` with ``_round<r>``
    after the ``nnUNetTrainerSelfTraining`` stem (``..._smoke`` -> ``..._round2_smoke``)."""
    if round_ == 1:
        return student
    if not student.startswith(STUDENT):
        raise ValueError(f"rounds beyond the first need {STUDENT} (or one of its schedule variants) as the student, "
                         f"got {student}")
    return f"{STUDENT}_round{round_}{student[len(STUDENT):]}"


def determine_fold_postprocessing(dataset: str, trainer: str, plans: str, configuration: str, fold: int) -> Path:
    """nnU-Net's postprocessing determined on the run's validation predictions; returns postprocessing.pkl."""
    from nnunet_proto.training.compat import (
        determine_postprocessing,
        get_output_folder,
        load_json,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
        require_env_path,
    )

    model = Path(get_output_folder(dataset, trainer, plans, configuration))
    val = model / f"fold_{fold}" / "validation"
    pkl = val / "postprocessing.pkl"
    if pkl.is_file():
        return pkl
    if not (val / "summary.json").is_file():
        raise FileNotFoundError(f"no validation predictions in {val}: nnU-Net's final validation of the run must "
                                f"have finished")
    ref = Path(require_env_path(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(dataset) / "gt_segmentations"
    determine_postprocessing(str(val), str(ref), load_json(str(model / "plans.json")),
                             load_json(str(model / "dataset.json")), num_processes=1, keep_postprocessed_files=False)
    return pkl


def self_train(dataset: str, teacher: Teacher, rounds: int = 1, student: str = STUDENT,
               drop: float = DEFAULT_DROP, device: str = "cpu") -> List[str]:
    """Run ``rounds`` rounds; returns the student trainer names, one per round (the last is the final model).

    Each student starts as its config says (default: from the weights of the teacher that labeled its set,
    ``SelfTrainingConfig.init_from_teacher``; ``_scratch``: from scratch).
    """
    from nnunet_proto.paths import ext_trainer_paths
    from nnunet_proto.training.compat import get_output_folder, recursive_find_trainer_class_by_name, run_training

    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"--rounds must be 1 to {MAX_ROUNDS}, got {rounds}")
    os.environ["nnUNet_extTrainer"] = ext_trainer_paths()
    names = [round_trainer(student, r) for r in range(1, rounds + 1)]
    for name in names:  # a misspelled student fails now, not after the first round
        try:
            recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError):
            raise ValueError(f"student trainer {name} not found in nnUNet_extTrainer ({ext_trainer_paths()})") \
                from None
    current = teacher
    for r, name in enumerate(names, 1):
        fold_dir = Path(get_output_folder(dataset, name, teacher.plans, teacher.configuration, teacher.fold))
        finished = (fold_dir / "validation" / "summary.json").is_file() and \
            (fold_dir / "validation" / "postprocessing.pkl").is_file()
        print(f"[self-train] round {r}/{rounds}: teacher {current.describe()}, student {name}"
              + (" (finished earlier)" if finished else ""), file=sys.stderr, flush=True)
        if not finished:
            make_pseudo_labels(dataset, current, r, drop, device=device)
            resume = any((fold_dir / f).is_file() for f in ("checkpoint_final.pth", "checkpoint_latest.pth"))
            run_training(dataset, teacher.configuration, teacher.fold, name, teacher.plans,
                         continue_training=resume, device=torch.device(device))
            determine_fold_postprocessing(dataset, name, teacher.plans, teacher.configuration, teacher.fold)
        current = replace(teacher, trainer=name, checkpoint="checkpoint_final.pth")
    return names


def describe_result(dataset: str, names: List[str], plans: str, configuration: str, fold: int) -> str:
    """The command a user predicts with afterwards."""
    return (f"final student: {names[-1]}; predict with nnUNetv2_predict -i INPUT -o OUTPUT -d {dataset} -c "
            f"{configuration} -p {plans} -f {fold} -tr {names[-1]}")
