"""Contract tests run for every semi-supervised trainer in trainers/ (new trainers are picked up automatically).

* found by nnU-Net's own lookup with nnUNet_extTrainer set, constructor signature equal to nnUNetTrainer's;
* one train step on a tiny network gives a finite loss; every unsupervised term sends a non-zero
  gradient into the student; the teacher changes only through the EMA update;
* checkpoint round trip restores student, teacher, method modules and state; network_weights load into
  a plain nnUNetTrainer network; resuming with another config is refused.
"""
import inspect

import numpy as np
import pytest
import torch
from conftest import build_trainer, semi_supervised_trainer_names, started_trainer

from nnunet_proto.ops.schedules import ema_decay
from nnunet_proto.training.compat import nnUNetTrainer, unwrap_network

TRAINERS = semi_supervised_trainer_names()


def test_core_trainers_exist():
    expected = {"nnUNetTrainerCPCL", "nnUNetTrainerMeanTeacher", "nnUNetTrainerBCP", "nnUNetTrainerZeroSSL"}
    assert expected <= set(TRAINERS)


@pytest.mark.parametrize("name", TRAINERS)
def test_found_by_nnunet_lookup_with_ext_trainer(name, nnunet_root):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for variant in (name, f"{name}_smoke", f"{name}_5epochs"):
        cls = recursive_find_trainer_class_by_name(variant)
        assert cls.__name__ == variant and issubclass(cls, nnUNetTrainer)
        assert "__" not in variant
        assert inspect.signature(cls.__init__, eval_str=True) == \
            inspect.signature(nnUNetTrainer.__init__, eval_str=True)


def _to(batch_part, device="cpu"):
    return [t.to(device) for t in batch_part] if isinstance(batch_part, list) else batch_part.to(device)


#: confidence gates on pseudo labels are data-dependent: a freshly initialised network is confident
#: nowhere, so the gradient-path check opens them (each method's tests check the gate itself)
GATE_FIELDS = ("pseudo_label_threshold",)


def _open_gates(trainer):
    cfg = trainer.method.config
    changes = {field: 0.0 for field in GATE_FIELDS if hasattr(cfg, field)}
    if changes:
        trainer.method.config = cfg.replace(**changes)


def _started(name, ds, configuration):
    return started_trainer(name, ds, configuration)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
@pytest.mark.parametrize("name", TRAINERS)
def test_train_step_gradients_and_ema(name, configuration, synthetic_dataset, fresh_results):
    trainer = _started(name, synthetic_dataset, configuration)
    trainer.enter_last_stage()  # staged methods: check every term in the stage where it is used
    _open_gates(trainer)
    try:
        batch = next(trainer.dataloader_train)
        data_u = next(trainer.dataloader_unlabeled)["data"]
        captured = {}
        combine = trainer.combine

        def spy(sup, terms):
            captured.update(terms)
            return combine(sup, terms)

        trainer.combine = spy
        total, logs = trainer.compute_loss(batch["data"], _to(batch["target"]), data_u)
        assert torch.isfinite(total)
        assert set(captured) == set(trainer.method.term_names) and captured
        params = [p for p in trainer.trainable_parameters() if p.requires_grad]
        for term in trainer.method.term_names:
            assert torch.isfinite(captured[term]), f"{term} is not finite"
            grads = torch.autograd.grad(captured[term], params, retain_graph=True, allow_unused=True)
            norm = sum(float(g.abs().sum()) for g in grads if g is not None)
            assert norm > 0, f"loss term {term!r} of {name} sends no gradient into the student"
        trainer.combine = combine

        teacher = trainer.teacher
        if teacher is not None:
            assert all(not p.requires_grad for p in teacher.module.parameters())
            assert not teacher.module.training
        for step in range(2):
            before = {k: v.clone() for k, v in teacher.module.state_dict().items()} if teacher else None
            global_step = trainer.global_step
            out = trainer.train_step(next(trainer.dataloader_train))
            assert np.isfinite(out["loss"])
            if teacher is None:
                continue
            assert all(p.grad is None for p in teacher.module.parameters())
            alpha = ema_decay(global_step, teacher.decay, trainer.config.ema_warmup)
            student = unwrap_network(trainer.network).state_dict()
            for k, t_after in teacher.module.state_dict().items():
                if t_after.dtype.is_floating_point:
                    expected = alpha * before[k] + (1 - alpha) * student[k]
                    torch.testing.assert_close(t_after, expected, rtol=1e-5, atol=1e-6,
                                               msg=f"teacher tensor {k} did not move by EMA (step {step})")
    finally:
        trainer.on_train_end()


@pytest.mark.parametrize("name", TRAINERS)
def test_checkpoint_round_trip(name, synthetic_dataset, fresh_results):
    trainer = _started(name, synthetic_dataset, "2d")
    try:
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()  # writes checkpoint_final.pth (+ teacher export)
    ckpt_file = f"{trainer.output_folder}/checkpoint_final.pth"
    saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert "nnunet_proto" in saved

    restored = build_trainer(name, synthetic_dataset, "2d", continue_training=True)
    restored.num_epochs, restored.num_iterations_per_epoch = 2, 3
    restored.load_checkpoint(ckpt_file)
    for k, v in unwrap_network(trainer.network).state_dict().items():
        torch.testing.assert_close(unwrap_network(restored.network).state_dict()[k], v)
    if trainer.teacher is not None:
        for k, v in trainer.teacher.module.state_dict().items():
            torch.testing.assert_close(restored.teacher.module.state_dict()[k], v)
    if trainer.method_modules is not None:
        for k, v in trainer.method_modules.state_dict().items():
            torch.testing.assert_close(restored.method_modules.state_dict()[k], v)
    assert _tensors_equal(restored.method.state_dict(), trainer.method.state_dict())

    # student weights load strictly into plain nnU-Net's network; so does the teacher export
    plain = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    plain.load_state_dict(saved["network_weights"], strict=True)
    if trainer.teacher is not None:
        slim = torch.load(f"{trainer.output_folder}/checkpoint_final_teacher.pth", map_location="cpu",
                          weights_only=False)
        plain.load_state_dict(slim["network_weights"], strict=True)
        assert slim["trainer_name"] == name

    # resuming with a different method configuration is refused before anything is loaded
    changed = type(name, (type(trainer),),
                   {"config": trainer.config.replace(w_max=trainer.config.w_max + 1.0)})
    other = changed(plans=_plans(synthetic_dataset), configuration="2d", fold=synthetic_dataset.fold,
                    dataset_json=synthetic_dataset.dataset_json(), device=torch.device("cpu"))
    other.num_epochs, other.num_iterations_per_epoch = 2, 3
    with pytest.raises(ValueError, match="config.w_max"):
        other.load_checkpoint(ckpt_file)


def _plans(ds):
    plans = ds.load_plans()
    plans["continue_training"] = True
    return plans


def _tensors_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_teacher_starts_from_pretrained_weights(synthetic_dataset, fresh_results, tmp_path):
    """nnUNetv2_train -pretrained_weights loads into the student after initialize(); the teacher must be
    created from those weights (in on_train_start), not from the random initialisation."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    donor = build_trainer("nnUNetTrainer", synthetic_dataset, "2d")
    donor.initialize()
    with torch.no_grad():
        for p in donor.network.parameters():
            p.add_(0.5)  # clearly different from any fresh initialisation
    pretrained = tmp_path / "pretrained.pth"
    donor.save_checkpoint(str(pretrained))

    trainer = build_trainer("nnUNetTrainerCPCL", synthetic_dataset, "2d")
    trainer.initialize()  # the order of nnunetv2.run.run_training.maybe_load_checkpoint
    load_pretrained_weights(trainer.network, str(pretrained), verbose=False)
    trainer.on_train_start()
    try:
        student = unwrap_network(trainer.network).state_dict()
        for k, v in trainer.teacher.module.state_dict().items():
            if ".seg_layers." not in k:  # nnU-Net does not transfer segmentation heads
                torch.testing.assert_close(v, student[k])
                torch.testing.assert_close(v, donor.network.state_dict()[k])
    finally:
        trainer.on_train_end()


def test_resume_accepts_a_checkpoint_from_before_a_new_config_field():
    """A field added later is compared with its default (what the old run trained with); a real change is refused."""
    from types import SimpleNamespace

    from nnunet_proto.methods.bcp import BCPConfig
    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised

    def fake(config):
        resolved = {"trainer": "T", "method": "BCP", "config": config.to_dict(), "num_epochs": 2,
                    "num_iterations_per_epoch": 3}
        return SimpleNamespace(config=config, resolved_config=lambda: resolved)

    old = BCPConfig().to_dict()
    del old["pseudo_label_largest_component"]  # a checkpoint written before the field existed
    saved = {"trainer": "T", "method": "BCP", "config": old, "num_epochs": 2, "num_iterations_per_epoch": 3}
    nnUNetTrainerSemiSupervised.check_resume_config(fake(BCPConfig()), saved, "ckpt.pth")  # no error
    with pytest.raises(ValueError, match=r"config.pseudo_label_largest_component: checkpoint False vs now True"):
        nnUNetTrainerSemiSupervised.check_resume_config(fake(BCPConfig(pseudo_label_largest_component=True)),
                                                        saved, "ckpt.pth")
    assert BCPConfig.field_defaults()["pseudo_label_largest_component"] is False
