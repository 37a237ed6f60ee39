"""Exact resume after SIGKILL, reproducibility, and the empty-unlabeled-split error."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATASET_ID, PLANS, TRAINERS_DIR, build_trainer

from nnunet_proto.training.base_trainer import CHECKPOINT_KEY

RESUME_TRAINERS = ["nnUNetTrainerCPCL", "nnUNetTrainerMPER", "nnUNetTrainerPCCS", "nnUNetTrainerBCP"]


def _ext_trainers(folder: Path) -> Path:
    """A trainers folder with test variants: 4 epochs x 4 iterations, checkpoint_latest every epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent('''
        import importlib.util, os, torch
        from nnunet_proto.training.variants import schedule_variant

        def _load(name):
            path = os.path.join(os.environ["NNUNET_PROTO_TRAINERS"], name + ".py")
            spec = importlib.util.spec_from_file_location("_base_" + name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return getattr(module, name)

        def _resumable(base):
            cls = schedule_variant(base, "resume", 4, 4, 1)
            init = cls.__init__

            def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                         device: torch.device = torch.device("cuda")):
                init(self, plans, configuration, fold, dataset_json, device)
                self.save_every = 1

            cls.__init__ = __init__
            return cls
    ''')
    for base in RESUME_TRAINERS:
        code += f"\n{base}_resume = _resumable(_load({base!r}))\n"
    (folder / "resume_variants.py").write_text(code)
    return folder


@pytest.mark.parametrize("name", RESUME_TRAINERS)
def test_sigkill_mid_epoch_then_resume(name, synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    ext = _ext_trainers(tmp_path / "ext")
    monkeypatch.setenv("NNUNET_PROTO_TRAINERS", str(TRAINERS_DIR))
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(ext), str(TRAINERS_DIR)]))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    variant = f"{name}_resume"
    out = fresh_results / synthetic_dataset.name / f"{variant}__{PLANS}__2d" / f"fold_{synthetic_dataset.fold}"
    latest = out / "checkpoint_latest.pth"
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(DATASET_ID), "2d", str(synthetic_dataset.fold),
           "-tr", variant, "-p", PLANS, "-device", "cpu"]
    if not Path(cmd[0]).is_file():
        cmd = [sys.executable, "-c", "from nnunetv2.run.run_training import run_training_entry; run_training_entry()",
               *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill -9 in the middle of epoch 2 (checkpoint_latest holds epochs 0-1 by then)
    deadline = time.time() + 300
    killed_at = None
    for line in proc.stdout:
        if "Epoch 2" in line and latest.is_file():
            proc.send_signal(signal.SIGKILL)  # epoch 2 has just started: its iterations are lost
            killed_at = 2
            break
        assert time.time() < deadline, "training did not reach epoch 2 in time"
    proc.wait()
    assert killed_at == 2 and proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint_final.pth").exists()
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 2
    extra = saved[CHECKPOINT_KEY]

    # resume exactly like `nnUNetv2_train ... --c` does (same functions), inspecting state before training
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer = get_trainer_from_args(str(DATASET_ID), "2d", synthetic_dataset.fold, variant, PLANS,
                                    continue_training=True, device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, True, False, None)
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * 4
    for k, v in extra["teacher"]["weights"].items():
        torch.testing.assert_close(trainer.teacher.module.state_dict()[k], v.to(trainer.device))
    _assert_state_equal(trainer.method.state_dict(), extra["method_state"])
    if extra.get("modules") is not None:
        for k, v in extra["modules"].items():
            torch.testing.assert_close(trainer.method_modules.state_dict()[k], v)
    before = {k: list(v) for k, v in saved["logging"].items()}
    trainer.run_training()
    assert (out / "checkpoint_final.pth").is_file()
    log = trainer.logger.local_logger.my_fantastic_logging
    for key, values in log.items():
        assert len(values) == 4, f"{key} has {len(values)} entries after resume, expected one per epoch"
        # NaN-aware: epochs without pseudo labels (stage one of copy-paste methods) log NaN diagnostics
        np.testing.assert_array_equal(values[:2], before[key][:2], err_msg=f"{key}: epochs before the kill changed")
    for key in [k for k in log if k.startswith("ssl_weight_")]:
        w = log[key]
        assert all(np.isfinite(w)) and w == sorted(w), f"{key} does not continue its ramp-up: {w}"


def _assert_state_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.cpu(), b.cpu())
    else:
        assert a == b


def _seeded_losses(ds, name, steps=4):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name(name)
    seeded = type(name, (base,), {"config": base.config.replace(seed=123)})
    plans = ds.load_plans()
    plans["continue_training"] = False
    trainer = seeded(plans=plans, configuration="2d", fold=ds.fold, dataset_json=ds.dataset_json(),
                     device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(steps)]
    weights = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.on_train_end()
    return losses, weights


@pytest.mark.parametrize("name", ["nnUNetTrainerCPCL", "nnUNetTrainerMeanTeacher"])
def test_seeded_cpu_runs_are_identical(name, synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    # one intra-op thread for both runs (docs/reproducibility.md): nnU-Net's predictor changes torch's thread count
    # in-process, so without this the count would depend on the tests that ran before in the same worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, w1 = _seeded_losses(synthetic_dataset, name)
        shutil.rmtree(fresh_results)
        second, w2 = _seeded_losses(synthetic_dataset, name)
    finally:
        torch.set_num_threads(threads)
    assert first == second  # bit-identical losses
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert len(set(first)) > 1


def test_split_with_empty_unlabeled_list_and_no_other_source(synthetic_dataset, fresh_results, tmp_path,
                                                              monkeypatch):
    pre = tmp_path / "pre" / synthetic_dataset.name
    shutil.copytree(synthetic_dataset.preprocessed, pre)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    splits = json.loads((pre / "splits_final.json").read_text())
    splits[synthetic_dataset.fold]["unlabeled"] = []
    (pre / "splits_final.json").write_text(json.dumps(splits))
    shutil.rmtree(pre / "nnUNetPlans_2d_unlabeled")
    (pre / "nnUNetPlans_2d_unlabeled.json").unlink()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "no_raw"))  # no imagesUnlabeled either
    trainer = build_trainer("nnUNetTrainerCPCL", synthetic_dataset)
    trainer.initialize()
    with pytest.raises(FileNotFoundError, match="'unlabeled' list must not be empty"):
        trainer.find_unlabeled_cases()
