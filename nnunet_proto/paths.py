"""Where the repository's trainer leaves live: the folder ``nnUNet_extTrainer`` must point at.

Standard library only, so that every layer (the CLI, the benchmark runner, tests) can import it
without importing each other.
"""
from __future__ import annotations

from pathlib import Path

REPO_TRAINERS = Path(__file__).resolve().parent.parent / "trainers"


def trainers_path() -> Path:
    """The folder to put into ``nnUNet_extTrainer`` (the repository's ``trainers/``)."""
    if not (REPO_TRAINERS / "nnUNetTrainerCPCL.py").is_file():
        raise FileNotFoundError(f"{REPO_TRAINERS} not found: nnunet_proto must be installed from a checkout of the "
                                f"repository (pip install -e .) so that the trainers/ folder exists")
    return REPO_TRAINERS


def ext_trainer_paths() -> str:
    """``nnUNet_extTrainer`` as our commands set it: this repository's trainers, then the user's own folders.

    nnU-Net looks trainer classes up by name for training *and* prediction (the predictor rebuilds the network
    through the trainer class), so every command that trains or predicts sets it.
    """
    import os

    paths = [str(trainers_path())] + (os.environ.get("nnUNet_extTrainer") or "").split(os.pathsep)
    return os.pathsep.join(dict.fromkeys(p for p in paths if p))
