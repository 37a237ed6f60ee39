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
