"""Shared fixtures: nnU-Net folders in a temp dir, a tiny planned synthetic dataset, trainer builders.

The dataset is generated, planned and preprocessed once per session through the project's CLI and
nnU-Net's own API (about 20 s on 2 CPU cores); tests that train get their own results folder.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TRAINERS_DIR = REPO / "trainers"
TINY_PATCH = REPO / "plans" / "synthetic_tiny.json"
DATASET_ID = 801
PLANS = "nnUNetPlans_tiny"

def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NNUNET_ENV = {"nnUNet_compile": "f", "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(TRAINERS_DIR),
              "OMP_NUM_THREADS": "2"}


def semi_supervised_trainer_names() -> List[str]:
    """Every top-level semi-supervised trainer defined in trainers/ (schedule variants excluded)."""
    from nnunet_proto.training.discovery import semi_supervised_trainer_names as scan

    return scan(TRAINERS_DIR)


@dataclass
class SyntheticDataset:
    id: int
    name: str
    raw: Path
    preprocessed: Path
    fold: int
    plans: str = PLANS

    def load_plans(self) -> dict:
        return json.loads((self.preprocessed / f"{self.plans}.json").read_text())

    def dataset_json(self) -> dict:
        return json.loads((self.preprocessed / "dataset.json").read_text())


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
        mp.setenv("nnUNet_results", str(root / "results"))
        for k, v in NNUNET_ENV.items():
            mp.setenv(k, v)
        mp.delenv("nnUNet_n_proc_DA", raising=False)  # nnU-Net's planner crashes with 0
        yield root


def plan_and_preprocess(dataset_id: int, configurations=("2d", "3d_fullres")) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False,
                         show_progress_bar=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=configurations, num_processes=[1] * len(configurations), verbose=False)


def run_cli(*args: str) -> str:
    """Run ``nnunet_proto`` in-process; return stdout, fail on a non-zero exit code."""
    import contextlib
    import io

    from nnunet_proto.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(args))
    assert code == 0, f"nnunet_proto {' '.join(args)} exited with {code}"
    return buf.getvalue()


@pytest.fixture(scope="session")
def synthetic_dataset(nnunet_root) -> SyntheticDataset:
    """2d-mode synthetic dataset: 10 labeled, 3 in imagesUnlabeled, 2 test; tiny plans; a 3-labeled fold."""
    run_cli("synthetic", "-d", str(DATASET_ID), "--labeled", "10", "--unlabeled", "3", "--test", "2",
            "--shape", "4", "40", "40", "--seed", "1")
    plan_and_preprocess(DATASET_ID)
    run_cli("plans-patch", "-d", str(DATASET_ID), str(TINY_PATCH))
    run_cli("preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-p", PLANS)
    fold = int(run_cli("make-splits", "-d", str(DATASET_ID), "--labeled", "3", "--seed", "0").strip())
    name = f"Dataset{DATASET_ID:03d}_Synthetic"
    return SyntheticDataset(DATASET_ID, name, nnunet_root / "raw" / name, nnunet_root / "preprocessed" / name, fold)


@pytest.fixture
def fresh_results(tmp_path, monkeypatch):
    """A private nnUNet_results folder and single-process data loading for one test."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    torch.manual_seed(0)
    return tmp_path / "results"


@pytest.fixture
def copied(synthetic_dataset, tmp_path, monkeypatch):
    """Private copies of the raw and preprocessed dataset; nnUNet_raw/_preprocessed point at them (the session
    fixture stays untouched, so a test may damage its copy)."""
    ds = synthetic_dataset
    raw, pre = tmp_path / "raw" / ds.name, tmp_path / "pre" / ds.name
    shutil.copytree(ds.raw, raw)
    shutil.copytree(ds.preprocessed, pre)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return raw, pre


def build_trainer(trainer_name: str, ds: SyntheticDataset, configuration: str = "2d", fold=None,
                  plans: dict = None, dataset_json: dict = None, continue_training: bool = False):
    """Instantiate a trainer the way nnUNetv2_train does (lookup through nnUNet_extTrainer)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(trainer_name)
    plans = dict(plans if plans is not None else ds.load_plans())
    plans["continue_training"] = continue_training
    return cls(plans=plans, configuration=configuration, fold=ds.fold if fold is None else fold,
               dataset_json=dataset_json if dataset_json is not None else ds.dataset_json(),
               device=torch.device("cpu"))


def started_trainer(trainer_name: str, ds: SyntheticDataset, configuration: str = "2d", epochs: int = 2,
                    iterations: int = 3):
    """``build_trainer`` and then nnU-Net's start-of-training hooks, ready for ``train_step`` (loaders running).

    The caller ends it with ``on_train_end()``.
    """
    trainer = build_trainer(trainer_name, ds, configuration)
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


def labeled_batch(trainer):
    """One labeled training batch from the trainer's own (augmenting) data loader."""
    return next(trainer.dataloader_train)


sys.path.insert(0, str(Path(__file__).resolve().parent))  # let tests import helpers from conftest


@pytest.fixture
def plot_labels(monkeypatch) -> List[str]:
    """The ``label=`` of every ``Axes.plot`` call while the test runs (what progress.png draws)."""
    import matplotlib.axes

    labels: List[str] = []
    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    return labels

