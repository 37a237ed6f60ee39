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
