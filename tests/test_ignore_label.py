"""Sparse annotations: a dataset with nnU-Net's ignore label (part of every slice unannotated) trains with every
semi-supervised trainer; the ignore label takes part in no prototype and no loss, and nothing is NaN."""
import numpy as np
import pytest
import torch
from conftest import (
    TINY_PATCH,
    SyntheticDataset,
    build_trainer,
    plan_and_preprocess,
    run_cli,
    semi_supervised_trainer_names,
)

IGNORE_ID = 803


@pytest.fixture(scope="module")
def ignore_dataset(nnunet_root):
    run_cli("synthetic", "-d", str(IGNORE_ID), "--name", "Sparse", "--labeled", "8", "--shape", "4", "40", "40",
            "--ignore-fraction", "0.4", "--seed", "3")
    plan_and_preprocess(IGNORE_ID, configurations=("2d",))
    run_cli("plans-patch", "-d", str(IGNORE_ID), str(TINY_PATCH))
    fold = int(run_cli("make-splits", "-d", str(IGNORE_ID), "--labeled", "3", "--seed", "0").strip())
    name = f"Dataset{IGNORE_ID:03d}_Sparse"
    return SyntheticDataset(IGNORE_ID, name, nnunet_root / "raw" / name, nnunet_root / "preprocessed" / name, fold)


@pytest.mark.parametrize("name", semi_supervised_trainer_names())
def test_trainers_on_an_ignore_label_dataset(name, ignore_dataset, fresh_results):
    trainer = build_trainer(name, ignore_dataset, "2d")
    assert trainer.label_manager.has_ignore_label and trainer.label_manager.ignore_label == 4
    trainer.num_epochs, trainer.num_iterations_per_epoch = 2, 3
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    try:
        seen_ignore = False
        for _ in range(3):
            batch = next(trainer.dataloader_train)
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
            seen_ignore |= bool((target == 4).any())
            out = trainer.train_step(batch)
            assert np.isfinite(out["loss"])
            for key, value in out.items():
                if key.startswith("ssl_loss_"):
                    assert np.isfinite(value), f"{key} is not finite on an ignore-label batch"
        assert seen_ignore, "the batches should contain ignored voxels"
        assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    finally:
        trainer.on_train_end()
