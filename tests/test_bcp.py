"""BCP: stages, the split of BCP's mix loss into ground-truth and pseudo-labeled terms, the gate, run-relative EMA,
state, and the teacher reset at the switch."""
import pytest
import torch
from conftest import build_trainer

from nnunet_proto.methods.bcp import BCP, BCP_LOSS_SCALE, BCPConfig, BCPStepInputs
from nnunet_proto.ops.copy_paste import DROPPED_LABEL, bidirectional_groups, mixed_deep_supervision_loss, resize_labels
from nnunet_proto.training.compat import unwrap_network


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _method(dims=2, **changes):
    m = BCP(BCPConfig(**changes))
    m.build_modules({}, 3, dims)
    return m


def _data(b=2, spatial=(8, 10), c=3, seed=0):
    g = _gen(seed)
    data_l, data_u = torch.randn(b, 1, *spatial, generator=g), torch.randn(b, 1, *spatial, generator=g)
    labels = torch.randint(0, c, (b, 1, *spatial), generator=g)
    targets = [labels, resize_labels(labels, [s // 2 for s in spatial])]
    t_logits = torch.randn(b, c, *spatial, generator=g) * 3
    return data_l, targets, data_u, t_logits


def _inputs(m, batch, c=3, seed=1):
    g = _gen(seed)
    outs = [torch.randn(batch.images.shape[0], c, *t.shape[2:], generator=g).requires_grad_(True)
            for t in batch.targets]
    return BCPStepInputs(num_classes=c, ignore_index=None, target_l=batch.targets[0], logits_l=outs[0],
                         batch=batch, outputs=outs, scale_weights=(0.6, 0.4))


def test_stage_one_is_labeled_copy_paste_only():
    m = _method()
    data_l, targets, _, _ = _data()
    batch = m.make_batch(data_l, targets, generator=_gen(3))
    assert batch.images.shape[0] == data_l.shape[0] and not batch.from_pseudo.any()
    inputs = _inputs(m, batch)
    sup = m.supervised_loss(inputs)
    # our Dice convention (MPER's): foreground classes present in the region
    full = mixed_deep_supervision_loss(inputs.outputs, batch, (0.6, 0.4), include_background=False, present_only=True)
    torch.testing.assert_close(sup, BCP_LOSS_SCALE * full)
    bcp = _method(dice_include_background=True, dice_present_only=False)  # BCP's: all classes incl. background
    torch.testing.assert_close(bcp.supervised_loss(inputs),
                               BCP_LOSS_SCALE * mixed_deep_supervision_loss(inputs.outputs, batch, (0.6, 0.4)))
    assert not torch.allclose(bcp.supervised_loss(inputs), sup)
    assert m.losses(inputs)["pseudo"].item() == 0.0 and m.weights(0.1) == {"pseudo": 0.0}


@pytest.mark.parametrize("spatial", [(8, 10), (4, 8, 10)])
def test_stage_two_terms_add_up_to_bcp_mix_loss(spatial):
    """Paper form (ungated): L_sup + 0.5 L_pseudo == BCP's mix_loss with u_weight 0.5, halved (CE + Dice)/2."""
    m = _method(len(spatial), **{"pseudo_label_threshold": 0.0, "dice_include_background": True,
                                 "dice_present_only": False})
    m.begin_self_training(0.25)
    data_l, targets, data_u, t_logits = _data(3, spatial)
    batch = m.make_batch(data_l, targets, data_u, t_logits, generator=_gen(5))
    assert batch.images.shape[0] == 6 and batch.from_pseudo.any()
    inputs = _inputs(m, batch)
    sup, pseudo = m.supervised_loss(inputs), m.losses(inputs)["pseudo"]
    w = m.weights(0.5)["pseudo"]
    assert w == 0.5 and m.weights(1.0)["pseudo"] == 0.5  # BCP: constant u_weight, no ramp
    bcp = BCP_LOSS_SCALE * mixed_deep_supervision_loss(inputs.outputs, batch, (0.6, 0.4),
                                                       groups=bidirectional_groups(3, 1.0, 0.5))
    torch.testing.assert_close(sup + w * pseudo, bcp)
    for term in (sup, pseudo):
        (g,) = torch.autograd.grad(term, inputs.outputs[0], retain_graph=True)
        assert g.abs().sum() > 0
    # the pseudo term only sees pseudo-labeled voxels, the supervised one only ground truth
    (g_p,) = torch.autograd.grad(pseudo, inputs.outputs[0], retain_graph=True)
    (g_s,) = torch.autograd.grad(sup, inputs.outputs[0])
    gt = ~batch.from_pseudo.expand_as(g_p)
    assert (g_p[gt] == 0).all() and (g_s[~gt] == 0).all()


def test_gate_drops_unconfident_pseudo_labels_from_the_loss():
    m = _method(pseudo_label_threshold=0.9)
    m.begin_self_training(0.25)
    data_l, targets, data_u, t_logits = _data(2)
    conf = torch.softmax(t_logits, 1).amax(1, keepdim=True)
    assert (conf < 0.9).any() and (conf >= 0.9).any()
    batch = m.make_batch(data_l, targets, data_u, t_logits, generator=_gen(2))
    dropped = batch.from_pseudo & (batch.confidence < 0.9)
    assert dropped.any()
    assert (batch.targets[0][dropped] == DROPPED_LABEL).all()
    kept = batch.from_pseudo & ~dropped
    assert (batch.targets[0][kept] >= 0).all()
    inputs = _inputs(m, batch)
    (g,) = torch.autograd.grad(m.losses(inputs)["pseudo"], inputs.outputs[0])
    assert (g[dropped.expand_as(g)] == 0).all() and g.abs().sum() > 0
    paper = BCPConfig.paper()
    assert paper.pseudo_label_threshold == 0.0 and paper.time_constants == "paper"


def test_largest_component_switch_removes_pseudo_label_islands():
    """pseudo_label_largest_component (BCP's code): a class's islands become background in the pseudo regions."""
    b, spatial = 2, (12, 12)
    data_l, targets, data_u, _ = _data(b, spatial)
    t_logits = torch.zeros(b, 3, *spatial)
    t_logits[:, 0] = 8.0
    t_logits[:, 0, 2:7, 2:7], t_logits[:, 1, 2:7, 2:7] = 0.0, 8.0  # 25 voxels of class 1
    t_logits[:, 0, 10, 10], t_logits[:, 1, 10, 10] = 0.0, 8.0  # a one-voxel island of class 1
    batches = []
    for on in (False, True):
        m = _method(pseudo_label_largest_component=on)
        m.begin_self_training(0.25)
        batches.append(m.make_batch(data_l, targets, data_u, t_logits, generator=_gen(4)))
    off, on = batches
    changed = off.targets[0] != on.targets[0]
    # every unlabeled voxel lies in exactly one of X_in / X_out: the island changes once per unlabeled patch
    assert int(changed.sum()) == b and (off.targets[0][changed] == 1).all() and (on.targets[0][changed] == 0).all()
    assert off.from_pseudo[changed].all()
    assert not BCPConfig().pseudo_label_largest_component


@pytest.mark.parametrize("dims,run_steps", [(2, 40_000), (3, 17_000)])
def test_ema_reduces_to_the_paper_value_at_the_paper_run_length(dims, run_steps):
    m = _method(dims)
    m.set_run_steps(run_steps)
    tc = m.time_constants()
    assert tc["ema_decay"] == 0.99  # exactly the paper's value
    assert tc["stage_two_steps"] == {2: 30_000, 3: 15_000}[dims]
    m.set_run_steps(run_steps * 10)  # ten times longer run: ten times longer horizon
    assert m.time_constants()["ema_horizon_steps"] == pytest.approx(1000.0)
    m.set_run_steps(1000)
    assert m.time_constants()["ema_decay"] == pytest.approx(0.9)  # floor: a 10-step horizon
    literal = _method(dims, time_constants="paper")
    literal.set_run_steps(1000)
    assert literal.time_constants()["ema_decay"] == 0.99


def test_schedule_and_state():
    m = _method(2, stage_switch="fixed")
    assert m.stage_one_epochs(100) == 25 and m.stage_one_epochs(2) == 1 and m.stage_one_epochs(1) == 0
    assert _method(3).stage_one_epochs(17) == 2
    assert m.switch_decision(25, 100)["reason"] == "fixed" and m.switch_decision(24, 100) is None
    assert BCPConfig.paper().stage_switch == "fixed" and BCPConfig().stage_switch == "ready"
    ready = _method(2)  # floor 10 %, cap 50 %, two consecutive validations with every class >= 0.5
    assert ready.switch_decision(9, 100, [[0.9, 0.9]] * 9) is None  # before the floor
    assert ready.switch_decision(10, 100, [[0.9, 0.9], [0.9, 0.4]]) is None
    assert ready.switch_decision(10, 100, [[0.6, 0.5], [0.9, 0.7]])["reason"] == "ready"
    cap = ready.switch_decision(50, 100, [[0.9, 0.0]] * 2)
    assert cap["reason"] == "cap" and cap["reset_teacher"] is False
    m.begin_self_training(0.25, m.switch_decision(25, 100))
    with pytest.raises(RuntimeError, match="once"):
        m.begin_self_training(0.3)
    other = _method(2)
    other.load_state_dict(m.state_dict())
    assert other.stage == 2 and other.stage_two_start == 0.25 and other.switch_report["reason"] == "fixed"
    old = {"stage": 2, "stage_two_start": 0.25}  # a checkpoint from before the readiness switch
    other.load_state_dict(old)
    assert other.switch_report == {}
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"stage": 1})
    with pytest.raises(ValueError, match="pretrain_fraction"):
        BCPConfig(pretrain_fraction=1.0)


def test_trainer_switch_resets_teacher_and_trains_on_pseudo_labels(synthetic_dataset, fresh_results):
    from nnunet_proto.training.compat import PSEUDO_DICE_KEY

    trainer = build_trainer("nnUNetTrainerBCP", synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 4, 2  # readiness floor epoch 1, cap epoch 2
    trainer.on_train_start()
    try:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        assert trainer.method.stage == 1
        out = trainer.train_step(next(trainer.dataloader_train))
        assert out["ssl_weight_pseudo"] == 0.0 and "ssl_pl_kept" not in out
        trainer.train_step(next(trainer.dataloader_train))
        trainer.on_train_epoch_end([out])
        trainer.logger.log(PSEUDO_DICE_KEY, [0.2, 0.6], 0)  # what nnU-Net's validation of epoch 0 logged
        trainer.current_epoch = 1
        trainer.on_train_epoch_start()
        assert trainer.method.stage == 1  # a class below 0.5: not ready
        trainer.logger.log(PSEUDO_DICE_KEY, [0.7, 0.6], 1)
        trainer.current_epoch = 2  # the cap: ready once only, so the teacher is not handed the student...
        trainer.train_step(next(trainer.dataloader_train))  # (the EMA teacher now lags the student)
        teacher = {k: v.clone() for k, v in trainer.teacher.module.state_dict().items()}
        trainer.on_train_epoch_start()
        assert trainer.method.stage == 2 and trainer.method.switch_report["reason"] == "cap"
        assert "the teacher is NOT reset" in open(trainer.log_file).read()
        for k, v in trainer.teacher.module.state_dict().items():
            torch.testing.assert_close(v, teacher[k])
        assert trainer.resolved_config()["switch"]["reason"] == "cap"
    finally:
        trainer.on_train_end()

    trainer = build_trainer("nnUNetTrainerBCP", synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 4, 2
    trainer.on_train_start()
    try:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
        for epoch in (0, 1):
            trainer.logger.log(PSEUDO_DICE_KEY, [0.7, 0.6], epoch)
        trainer.current_epoch = 1  # at the floor, ready in two consecutive validations
        trainer.on_train_epoch_start()
        assert trainer.method.stage == 2 and trainer.method.switch_report["reason"] == "ready"
        student = unwrap_network(trainer.network).state_dict()
        for k, v in trainer.teacher.module.state_dict().items():
            torch.testing.assert_close(v, student[k])  # teacher := pre-trained student
        assert not trainer.config.ema_warmup and trainer.teacher.decay == pytest.approx(0.9)  # 6 steps: floor
        out = trainer.train_step(next(trainer.dataloader_train))
        assert out["ssl_weight_pseudo"] == 0.5 and 0.0 <= out["ssl_pl_kept"] <= 1.0
        assert torch.isfinite(torch.tensor(out["ssl_loss_pseudo"]))
    finally:
        trainer.on_train_end()
