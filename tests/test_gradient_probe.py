"""Gradient norms per loss term: probed on the first step of every epoch, logged, printed and plotted.

The probe measures ‖∂(w·term)/∂θ‖ for each weighted term and the supervised loss, next to the total norm
before nnU-Net's clipping. With every weight at zero (the A/A control) the total gradient is the supervised
one, so the two norms must agree on a one-step epoch; a method term with weight > 0 must show a gradient.
"""
import math

import pytest
from conftest import build_trainer, load_script, started_trainer

from nnunet_proto.training.progress import PREFIX


def _run(name, ds, epochs=2, iterations=1):
    trainer = build_trainer(name, ds, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 1
    trainer.run_training()
    return trainer, trainer.logger.local_logger.my_fantastic_logging


def test_zero_weights_total_gradient_is_the_supervised_one(synthetic_dataset, fresh_results, plot_labels):
    trainer, log = _run("nnUNetTrainerZeroSSL", synthetic_dataset)
    labels = plot_labels
    sup, total = log[f"{PREFIX}gradnorm_sup"], log[f"{PREFIX}gradnorm_total"]
    assert len(sup) == len(total) == 2 and all(v > 0 for v in sup)
    # one step per epoch: the probe and the real backward see the same parameters and batch
    assert total == pytest.approx(sup, rel=1e-4)
    assert all(v == 0.0 for v in log[f"{PREFIX}gradnorm_consistency"])  # weight 0: no gradient
    text = open(trainer.log_file).read()
    assert "gradient norms (weighted terms, first step): sup " in text and "total before clipping at 12" in text
    assert "weight x consistency (probe)" in labels and "total before clipping (epoch mean)" in labels


def test_weighted_term_has_a_gradient_and_the_probe_leaves_the_step_unchanged(synthetic_dataset, fresh_results):
    trainer = started_trainer("nnUNetTrainerCPCL", synthetic_dataset, iterations=2)
    loader_u = trainer.dataloader_unlabeled
    try:
        import itertools

        import torch

        batch = next(trainer.dataloader_train)
        trainer.dataloader_unlabeled = itertools.repeat(next(loader_u))  # the same unlabeled batch twice
        trainer.method.weights = lambda progress: {n: 1.0 for n in trainer.method.term_names}
        import copy

        state = copy.deepcopy((trainer.network.state_dict(), trainer.teacher.state_dict(),
                               trainer.optimizer.state_dict()))
        torch.manual_seed(0)
        probed = trainer.train_step(batch)  # _iter_in_epoch == 0: probe step
        probe = dict(trainer._epoch_probe)  # what the epoch end logs
        after_probe = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        trainer.network.load_state_dict(state[0])
        trainer.teacher.load_state_dict(state[1])
        trainer.optimizer.load_state_dict(state[2])
        trainer._iter_in_epoch, trainer.grad_probe = 0, False
        torch.manual_seed(0)
        plain = trainer.train_step(batch)
    finally:
        trainer.dataloader_unlabeled = loader_u
        trainer.on_train_end()
    assert set(probe) == {f"gradnorm_{n}" for n in ("sup", *trainer.method.term_names)}
    assert all(math.isfinite(v) for v in probe.values())
    assert probe["gradnorm_sup"] > 0 and probe["gradnorm_fpc"] > 0
    # every step's output has the same, finite keys (nnU-Net collates them); the probe is not among them
    assert probed.keys() == plain.keys() and all(math.isfinite(float(v)) for v in plain.values())
    assert plain[f"{PREFIX}gradnorm_total"] > 0 and f"{PREFIX}gradnorm_sup" not in plain
    # the probe's extra backward passes do not change the update
    assert probed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for k, v in trainer.network.state_dict().items():
        assert torch.allclose(v, after_probe[k], atol=1e-6), k


def test_probe_per_epoch_over_several_steps_and_term_gradients_script(synthetic_dataset, fresh_results, capsys):
    """One probe value per epoch over several steps; then scripts/term_gradients.py on the finished checkpoint:
    one row per term, nothing written to the results folder."""
    import os
    from pathlib import Path

    trainer, log = _run("nnUNetTrainerMeanTeacher", synthetic_dataset, epochs=2, iterations=3)
    for key in (f"{PREFIX}gradnorm_sup", f"{PREFIX}gradnorm_consistency", f"{PREFIX}gradnorm_total"):
        assert len(log[key]) == 2 and all(math.isfinite(v) and v >= 0 for v in log[key]), key
    assert all(v > 0 for v in log[f"{PREFIX}gradnorm_sup"])
    fold_dir = Path(trainer.output_folder)
    before = sorted(p.name for p in fold_dir.iterdir())
    script = load_script("term_gradients")
    script.main(["-d", str(synthetic_dataset.id), "-c", "2d", "-p", synthetic_dataset.plans, "-f",
                 str(synthetic_dataset.fold), "-tr", "nnUNetTrainerMeanTeacher", "--batches", "2"])
    out = capsys.readouterr().out.splitlines()  # nnU-Net's own prints first, then the report
    header = [r for r in out if r.startswith("nnUNetTrainerMeanTeacher fold")]
    assert len(header) == 1 and "(epoch 2, progress 1.00)" in header[0]
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in out if r.startswith("| ") and "---" not in r}
    assert set(rows) >= {"sup", "consistency", "total"}
    assert float(rows["sup"][3]) > 0 and float(rows["sup"][4].strip(" |")) == 1.0
    assert sorted(p.name for p in fold_dir.iterdir()) == before  # no log or debug file added
    assert os.environ["nnUNet_results"] == str(fresh_results)  # restored
