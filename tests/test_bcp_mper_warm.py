"""BCP and MPER opt-in options of issue 23, item 6 (not validated yet; defaults unchanged): nnU-Net's own loss in stage
one (``stage_one_loss="plain"``), the warm start without stage one from nnU-Net's ``-pretrained_weights``
(``stage_switch="warm_start"``), and nnU-Net's loss on the un-mixed labeled patches beside the mixed terms in stage
two (``unmixed_supervised_weight``, term ``unmixed``); the ``_warm`` and ``_plainstage1`` trainer variants."""
import math
from unittest import mock

import pytest
import torch
from conftest import build_trainer
from test_mper import _count_switches, _state

from nnunet_proto.methods.bcp import BCP, BCPConfig
from nnunet_proto.methods.mper import MPER, MPERConfig
from nnunet_proto.training.compat import unwrap_network

METHODS = {"BCP": (BCP, BCPConfig, ("pseudo",)), "MPER": (MPER, MPERConfig, ("proto_cons", "contrast"))}


def _method(name, **changes):
    method_class, config_class, _ = METHODS[name]
    m = method_class(config_class(**changes))
    m.build_modules({"decoder": 4}, 3, 2)
    return m


def _trainer_class(name):
    """The trainer found by nnU-Net's lookup; MPER with 2 k-means batches so that the tests stay fast."""
    from nnunet_proto.training.compat import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    if "MPER" in name:
        cls = type(name, (cls,), {"config": cls.config.replace(kmeans_batches=2)})
    return cls


def _trainer(name, ds, continue_training=False, epochs=2, iterations=2, configuration="2d"):
    plans = ds.load_plans()
    plans["continue_training"] = continue_training
    trainer = _trainer_class(name)(plans=plans, configuration=configuration, fold=ds.fold,
                                   dataset_json=ds.dataset_json(), device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 1
    return trainer


def _started(name, ds, configuration="2d"):
    """``_trainer`` with nnU-Net's start-of-training hooks run, ready for ``compute_loss`` (end: on_train_end)."""
    trainer = _trainer(name, ds, configuration=configuration)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


def _loss_parts(trainer, data_l, target, data_u):
    """``compute_loss`` and what it handed to ``combine``: (total, logs, {"sup": ..., term: ...})."""
    with mock.patch.object(trainer, "combine", wraps=trainer.combine) as combine:
        total, logs = trainer.compute_loss(data_l, target, data_u)
    sup, terms = combine.call_args.args
    return total, logs, {**terms, "sup": sup}


def _batch(trainer):
    batch = next(trainer.dataloader_train)
    return batch["data"], batch["target"], next(trainer.dataloader_unlabeled)["data"]


# --------------------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("name", METHODS)
def test_defaults_are_unchanged_and_the_options_are_validated(name):
    method_class, config_class, terms = METHODS[name]
    for cfg in (config_class(), config_class.paper()):
        assert cfg.stage_one_loss == "copy_paste" and cfg.unmixed_supervised_weight == 0.0
    assert config_class().stage_switch == "ready" and config_class.paper().stage_switch == "fixed"
    # old checkpoints (without the new fields) resume with these defaults
    defaults = config_class.field_defaults()
    assert defaults["stage_one_loss"] == "copy_paste" and defaults["unmixed_supervised_weight"] == 0.0
    m = _method(name)
    assert m.term_names == terms == method_class.term_names  # no "unmixed" term when off
    m.stage, m.stage_two_start = 2, 0.25
    assert set(m.weights(0.5)) == set(terms)
    with pytest.raises(ValueError, match="stage_one_loss"):
        config_class(stage_one_loss="mixed")
    with pytest.raises(ValueError, match="unmixed_supervised_weight"):
        config_class(unmixed_supervised_weight=-1.0)
    with pytest.raises(ValueError, match="warm_start"):
        config_class(stage_switch="warm_start", stage_one_loss="plain")


def test_default_trainers_keep_their_configs(nnunet_root):
    from nnunet_proto.training.compat import recursive_find_trainer_class_by_name

    for name, config in (("nnUNetTrainerBCP", BCPConfig()), ("nnUNetTrainerMPER", MPERConfig()),
                         ("nnUNetTrainerBCP_paper", BCPConfig.paper()),
                         ("nnUNetTrainerMPER_paper", MPERConfig.paper())):
        assert recursive_find_trainer_class_by_name(name).config == config, name


@pytest.mark.parametrize("name", METHODS)
def test_variants_switch_the_options_on_together(name, nnunet_root):
    from nnunet_proto.training.compat import recursive_find_trainer_class_by_name

    warm = recursive_find_trainer_class_by_name(f"nnUNetTrainer{name}_warm").config
    plain = recursive_find_trainer_class_by_name(f"nnUNetTrainer{name}_plainstage1").config
    base = METHODS[name][1]()
    assert warm == base.replace(stage_switch="warm_start", unmixed_supervised_weight=1.0)
    lcc = recursive_find_trainer_class_by_name(f"nnUNetTrainer{name}_warm_lcc").config
    assert lcc == warm.replace(pseudo_label_largest_component=True) and not warm.pseudo_label_largest_component
    control = recursive_find_trainer_class_by_name(f"nnUNetTrainer{name}_warm_labeledcontrol").config
    assert control == warm.replace(unlabeled_sources=("labeled",)) and warm.unlabeled_sources == ("split", "folder")
    assert plain == base.replace(stage_one_loss="plain", unmixed_supervised_weight=1.0)


@pytest.mark.parametrize("name", METHODS)
def test_method_warm_start_and_unmixed_weight(name):
    m = _method(name, stage_switch="warm_start", unmixed_supervised_weight=0.7)
    assert m.term_names[-1] == "unmixed" and m.pretrain_fraction == 0.0 and m.stage_one_bounds(100) == (0, 0)
    decision = m.switch_decision(0, 100, [])
    assert decision["reason"] == "warm_start" and decision["reset_teacher"] is True
    assert m.weights(0.0)["unmixed"] == 0.0  # stage one: off
    if name == "BCP":
        m.begin_self_training(0.0, decision)
    else:
        from nnunet_proto.ops.kmeans import ClassReservoir

        reservoir = ClassReservoir(3, 100, 0, None)
        reservoir.add(torch.randn(2, 4, 6, 6), torch.randint(0, 3, (2, 1, 6, 6)))
        m.begin_self_training(reservoir, 0.0, decision=decision)
    assert m.switch_decision(1, 100, []) is None  # once
    weights = m.weights(0.0)
    assert weights["unmixed"] == 0.7 and all(w > 0 for w in weights.values())
    assert m.time_constants()["ema_decay"] > 0


# --------------------------------------------------------------------------------------------------- stage one
@pytest.mark.parametrize("name", ["nnUNetTrainerBCP_plainstage1", "nnUNetTrainerMPER_plainstage1"])
def test_plain_stage_one_loss_is_nnunets_own_loss(name, synthetic_dataset, fresh_results):
    trainer = _started(name, synthetic_dataset)
    try:
        assert trainer.method.stage == 1
        data_l, target, data_u = _batch(trainer)
        total, logs, captured = _loss_parts(trainer, data_l, target, data_u)
        expected = trainer.loss(trainer.network(data_l), target)  # what plain nnU-Net's train_step computes
        torch.testing.assert_close(captured["sup"], expected)
        torch.testing.assert_close(total, expected)  # every method term has weight 0 in stage one
        assert logs["weight_unmixed"] == 0.0 and float(logs["loss_unmixed"]) == 0.0
        params = [p for p in trainer.trainable_parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        out = trainer.train_step(next(trainer.dataloader_train))
        assert math.isfinite(float(out["loss"])) and out["ssl_weight_unmixed"] == 0.0
        if "MPER" in name:
            assert out["ssl_diag_stage"] == 1.0
    finally:
        trainer.on_train_end()


# --------------------------------------------------------------------------------------------------- warm start
@pytest.mark.parametrize("name", ["nnUNetTrainerBCP_warm", "nnUNetTrainerMPER_warm"])
def test_warm_start_teacher_is_the_loaded_pretrained_student_and_resumes(name, synthetic_dataset, fresh_results,
                                                                        tmp_path):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    torch.manual_seed(123)
    plain = build_trainer("nnUNetTrainer", synthetic_dataset)
    plain.initialize()
    plain_ckpt = str(tmp_path / "plain_checkpoint_final.pth")
    plain.save_checkpoint(plain_ckpt)
    pretrained = torch.load(plain_ckpt, map_location="cpu", weights_only=False)["network_weights"]

    trainer = _trainer(name, synthetic_dataset)
    switches = _count_switches(trainer)
    trainer.initialize()  # as maybe_load_checkpoint does before loading (it skips an initialised trainer)
    initial = _state(unwrap_network(trainer.network))
    maybe_load_checkpoint(trainer, False, False, plain_ckpt)  # what nnUNetv2_train -pretrained_weights does
    student = _state(unwrap_network(trainer.network))
    transferred = [k for k in pretrained if ".seg_layers." not in k]  # nnU-Net never transfers the heads
    assert transferred and all(torch.equal(student[k], pretrained[k]) for k in transferred)
    assert not all(torch.equal(initial[k], pretrained[k]) for k in transferred)  # the load changed the student
    trainer.on_train_start()
    try:
        assert switches == [0] and trainer.method.stage == 2 and trainer.method.stage_two_start == 0.0
        assert trainer.method.switch_report["reason"] == "warm_start"
        teacher = _state(trainer.teacher.module)
        assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in student)
        assert all(torch.equal(teacher[k], pretrained[k]) for k in transferred)
        log = open(trainer.log_file).read()
        assert "stage one is SKIPPED" in log and "-pretrained_weights" in log
        assert "no -pretrained_weights were loaded" not in log
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        assert switches == [0]
        out = trainer.train_step(next(trainer.dataloader_train))  # self-training from the first step
        weight = "ssl_weight_pseudo" if "BCP" in name else "ssl_weight_proto_cons"
        assert out[weight] > 0 and out["ssl_weight_unmixed"] == 1.0 and math.isfinite(out["ssl_loss_unmixed"])
        checkpoint = str(tmp_path / "warm.pth")
        trainer.save_checkpoint(checkpoint)
        saved_teacher = _state(trainer.teacher.module)
    finally:
        trainer.on_train_end()

    resumed = _trainer(name, synthetic_dataset, continue_training=True)  # nnUNetv2_train --c
    resumed_switches = _count_switches(resumed)
    resumed.load_checkpoint(checkpoint)
    resumed.on_train_start()
    try:
        assert resumed_switches == [] and resumed.method.stage == 2 and resumed.method.stage_two_start == 0.0
        teacher = _state(resumed.teacher.module)
        assert all(torch.equal(teacher[k], saved_teacher[k]) for k in saved_teacher)
        assert "resumed in stage two" in open(resumed.log_file).read()
        resumed.on_epoch_start()
        resumed.on_train_epoch_start()
        assert math.isfinite(float(resumed.train_step(next(resumed.dataloader_train))["loss"]))
    finally:
        resumed.on_train_end()


def test_warm_start_from_the_environment_loads_every_weight_heads_included(synthetic_dataset, fresh_results,
                                                                          tmp_path, monkeypatch):
    """NNUNET_PROTO_WARM_START: the whole plain network, the segmentation heads included (which nnU-Net's
    -pretrained_weights leaves random), in student and teacher; a missing file or another network is refused."""
    from nnunet_proto.training.stage_switch import WARM_START_ENV

    torch.manual_seed(7)
    plain = build_trainer("nnUNetTrainer", synthetic_dataset)
    plain.initialize()
    plain_ckpt = tmp_path / "plain_checkpoint_final.pth"
    plain.save_checkpoint(str(plain_ckpt))
    pretrained = torch.load(plain_ckpt, map_location="cpu", weights_only=False)["network_weights"]
    assert any(".seg_layers." in k for k in pretrained)
    monkeypatch.setenv(WARM_START_ENV, str(plain_ckpt))
    trainer = _trainer("nnUNetTrainerBCP_warm", synthetic_dataset)
    trainer.on_train_start()
    try:
        student, teacher = _state(unwrap_network(trainer.network)), _state(trainer.teacher.module)
        assert student.keys() == pretrained.keys()
        assert all(torch.equal(student[k], pretrained[k]) and torch.equal(teacher[k], pretrained[k])
                   for k in pretrained)
        log = open(trainer.log_file).read()
        assert f"every weight of {plain_ckpt} loaded" in log and "WARNING" not in log
    finally:
        trainer.on_train_end()

    monkeypatch.setenv(WARM_START_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth is not a file"):
        _trainer("nnUNetTrainerBCP_warm", synthetic_dataset).on_train_start()
    other = build_trainer("nnUNetTrainer", synthetic_dataset, "3d_fullres")
    other.initialize()
    other.save_checkpoint(str(tmp_path / "other.pth"))
    monkeypatch.setenv(WARM_START_ENV, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="does not fit this network"):
        _trainer("nnUNetTrainerBCP_warm", synthetic_dataset).on_train_start()


@pytest.mark.parametrize("name", ["nnUNetTrainerBCP", "nnUNetTrainerCPCL"])
def test_warm_start_variable_is_refused_where_nothing_would_load_it(name, synthetic_dataset, fresh_results,
                                                                   monkeypatch):
    from nnunet_proto.training.stage_switch import WARM_START_ENV

    monkeypatch.setenv(WARM_START_ENV, "/x/checkpoint_final.pth")
    with pytest.raises(ValueError, match=f"{WARM_START_ENV} is set .*{name} does not warm-start.*Unset it"):
        _trainer(name, synthetic_dataset).on_train_start()


def test_warm_start_without_pretrained_weights_warns(synthetic_dataset, fresh_results):
    trainer = _trainer("nnUNetTrainerBCP_warm", synthetic_dataset)
    trainer.on_train_start()
    try:
        assert trainer.method.stage == 2
        assert "WARNING: BCP warm start without pretrained weights" in open(trainer.log_file).read()
    finally:
        trainer.on_train_end()


# --------------------------------------------------------------------------------------------------- un-mixed term
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
@pytest.mark.parametrize("name", ["nnUNetTrainerBCP_warm", "nnUNetTrainerMPER_warm"])
def test_unmixed_term_is_nnunets_loss_on_the_unmixed_patches_with_gradient(name, configuration, synthetic_dataset,
                                                                           fresh_results):
    trainer = _started(name, synthetic_dataset, configuration)
    try:
        assert trainer.method.stage == 2 and "unmixed" in trainer.method.term_names
        assert "unmixed" in trainer.logger.local_logger.term_names  # logged and plotted like the other terms
        data_l, target, data_u = _batch(trainer)
        total, logs, captured = _loss_parts(trainer, data_l, target, data_u)
        assert torch.isfinite(total) and logs["weight_unmixed"] == 1.0
        unmixed = captured["unmixed"]
        assert torch.isfinite(unmixed) and float(logs["loss_unmixed"]) == float(unmixed)
        params = [p for p in trainer.trainable_parameters() if p.requires_grad]
        for term in trainer.method.term_names:
            grads = torch.autograd.grad(captured[term], params, retain_graph=True, allow_unused=True)
            assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, term
        # the same forward as the mixed images; per-sample InstanceNorm: equal to a forward of its own
        alone = trainer.loss(trainer.network(data_l), target)
        for tap in trainer.student_taps.values():
            tap.clear()
        torch.testing.assert_close(unmixed, alone, rtol=1e-4, atol=1e-5)
    finally:
        trainer.on_train_end()


@pytest.mark.parametrize("name", ["nnUNetTrainerBCP", "nnUNetTrainerMPER"])
def test_unmixed_term_is_absent_by_default(name, synthetic_dataset, fresh_results):
    trainer = _started(name, synthetic_dataset)
    try:
        trainer.enter_last_stage()
        forwards = []
        hook = unwrap_network(trainer.network).register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
        data_l, target, data_u = _batch(trainer)
        _, logs, captured = _loss_parts(trainer, data_l, target, data_u)
        hook.remove()
        assert "unmixed" not in captured and "loss_unmixed" not in logs and "weight_unmixed" not in logs
        assert forwards == [2 * data_l.shape[0]]  # the student sees the two mixed sets only, as before
        assert "unmixed" not in trainer.logger.local_logger.term_names
    finally:
        trainer.on_train_end()


@pytest.mark.parametrize("name", ["nnUNetTrainerBCP_plainstage1", "nnUNetTrainerMPER_plainstage1"])
def test_plain_stage_one_run_switches_and_logs_the_unmixed_term(name, synthetic_dataset, fresh_results, plot_labels):
    """A whole (tiny) run: stage one with nnU-Net's loss, the readiness switch at its cap, stage two with the un-mixed
    term in the epoch log, the log file and progress.png."""
    from nnunet_proto.training.progress import PREFIX

    trainer = _trainer(name, synthetic_dataset)  # 2 epochs: floor and cap at epoch 1
    trainer.run_training()
    assert trainer.method.stage == 2 and trainer.method.switch_report["epoch"] == 1
    log = trainer.logger.local_logger.my_fantastic_logging
    assert log[f"{PREFIX}weight_unmixed"] == [0.0, 1.0]
    assert log[f"{PREFIX}loss_unmixed"][0] == 0.0 and math.isfinite(log[f"{PREFIX}loss_unmixed"][1])
    assert log[f"{PREFIX}loss_unmixed"][1] > 0
    assert "loss_unmixed" in open(trainer.log_file).read()
    assert "unmixed (unweighted)" in plot_labels


def test_warm_labeled_control_warm_starts_on_the_folds_labeled_images_only(synthetic_dataset, fresh_results):
    """BCP_warm's control: the same warm start, its "unlabeled" stream the fold's labeled images, no unlabeled one."""
    import json

    from nnunet_proto.training.stage_switch import warm_starts

    control = build_trainer("nnUNetTrainerBCP_warm_labeledcontrol", synthetic_dataset)
    control.initialize()
    assert warm_starts(control)
    fold = json.loads((synthetic_dataset.preprocessed / "splits_final.json").read_text())[synthetic_dataset.fold]
    cases = control.find_unlabeled_cases()
    assert sorted(c.identifier for c in cases) == sorted(fold["train"]) and {c.source for c in cases} == {"labeled"}
