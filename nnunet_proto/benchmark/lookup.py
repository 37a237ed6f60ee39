"""Trainer classes by name, as nnUNetv2_train finds them (nnunetv2, this repository's ``trainers/`` and the user's
``nnUNet_extTrainer`` folders), for the benchmark's checks and its cost accounting. Imports no other benchmark
module, so that every one of them can use it."""
from __future__ import annotations

import contextlib
import functools
import io
import os

from nnunet_proto.paths import ext_trainer_paths


@contextlib.contextmanager
def _ext_trainers():
    """``nnUNet_extTrainer`` as our commands set it (``ext_trainer_paths``) for the block, restored after."""
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_paths()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous


def find_trainer_class(name: str):
    """The trainer class nnUNetv2_train would use for ``name`` (nnunetv2, this repository's trainers and
    ``nnUNet_extTrainer``), or None when there is none."""
    from nnunet_proto.training.compat import recursive_find_trainer_class_by_name

    with _ext_trainers():
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every folder it searches
                return recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError):
            return None


@functools.lru_cache(maxsize=None)
def trainer_warm_starts(name: str) -> bool:
    """Whether the trainer named so skips stage one and starts from the plain run (``stage_switch="warm_start"``,
    the ``_warm`` variants): a property of the trainer, so a run that lost its ``warm_start_from`` record still
    counts plain's training in its cost. False for a name no lookup finds."""
    from nnunet_proto.training.stage_switch import warm_starts

    cls = find_trainer_class(name)
    return cls is not None and warm_starts(cls)
