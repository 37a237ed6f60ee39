"""The A/A control nnUNetTrainerZeroSSL: the whole semi-supervised path runs, but the update is plain nnU-Net's."""
import torch
from conftest import started_trainer

from nnunet_proto.training.compat import unwrap_network


def test_zero_ssl_runs_the_teacher_path_with_zero_weight(synthetic_dataset, fresh_results):
    trainer = started_trainer("nnUNetTrainerZeroSSL", synthetic_dataset)
    try:
        assert trainer.teacher is not None and trainer.dataloader_unlabeled is not None
        for p in (0.0, 0.5, 1.0):
            assert trainer.method.weights(p) == {"consistency": 0.0}
        batch = next(trainer.dataloader_train)
        data_u = next(trainer.dataloader_unlabeled)["data"]
        target = [t for t in batch["target"]] if isinstance(batch["target"], list) else batch["target"]
        total, logs = trainer.compute_loss(batch["data"], target, data_u)
        assert float(logs["loss_consistency"]) > 0  # the term is computed (the teacher path runs) ...
        assert torch.equal(total.detach(), logs["loss_sup"])  # ... and adds nothing
        params = [p for p in unwrap_network(trainer.network).parameters() if p.requires_grad]
        g_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        g_sup = torch.autograd.grad(trainer.loss(unwrap_network(trainer.network)(batch["data"]), target), params,
                                    allow_unused=True)
        for a, b in zip(g_total, g_sup):
            if a is not None and b is not None:
                torch.testing.assert_close(a, b)
        out = trainer.train_step(next(trainer.dataloader_train))
        assert "ssl_pl_confidence" in out  # collapse diagnostics are logged for the control too
    finally:
        trainer.on_train_end()


def _step_equivalence(synthetic_dataset, plain_name, monkeypatch, precision):
    """One train_step of plain nnU-Net and of the A/A control from the same weights on the same labeled batch."""
    import copy

    monkeypatch.setenv("NNUNET_PROTO_CPU_PRECISION", precision)
    plain = started_trainer(plain_name, synthetic_dataset)
    control = started_trainer("nnUNetTrainerZeroSSL", synthetic_dataset)
    try:
        net_p, net_c = unwrap_network(plain.network), unwrap_network(control.network)
        net_c.load_state_dict(net_p.state_dict())
        control.teacher.module.load_state_dict(net_p.state_dict())
        control.optimizer.load_state_dict(copy.deepcopy(plain.optimizer.state_dict()))
        batch = next(plain.dataloader_train)
        start = {k: v.clone() for k, v in net_p.state_dict().items()}
        for _ in range(2):  # the first step of an epoch also runs the control's gradient probe
            plain.train_step({k: (copy.deepcopy(v)) for k, v in batch.items()})
            control.train_step({k: (copy.deepcopy(v)) for k, v in batch.items()})
        moved = max(float((v.float() - start[k].float()).abs().max()) for k, v in net_p.state_dict().items()
                    if v.is_floating_point())
        assert moved > 1e-3  # the steps did change the weights, far beyond the tolerances below
        return net_p.state_dict(), net_c.state_dict()
    finally:
        plain.on_train_end()
        control.on_train_end()


def test_control_step_equals_plain_step_fp32(synthetic_dataset, fresh_results, monkeypatch):
    """The glue adds nothing to the update: same weights after two steps as plain nnU-Net (fp32)."""
    a, b = _step_equivalence(synthetic_dataset, "nnUNetTrainer", monkeypatch, "fp32")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_control_step_matches_plain_step_bf16(synthetic_dataset, fresh_results, monkeypatch):
    """The same under CPU bf16 autocast (plain = nnUNetTrainer_cpubf16, whose whole train_step is autocast;
    the control autocasts forward and loss only): equal up to rounding."""
    a, b = _step_equivalence(synthetic_dataset, "nnUNetTrainer_cpubf16", monkeypatch, "bf16")
    worst = max(float((b[k].float() - a[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-4, worst  # measured 1.5e-7 here; a step moves the weights by more than 1e-3
