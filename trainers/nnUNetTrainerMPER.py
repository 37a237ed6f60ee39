"""nnUNetTrainerMPER: multi-prototype embedding refinement on bidirectional copy-paste (Bi et al., ICASSP 2025).

Stage one (first 25 % of the epochs in 2D, 2/17 in 3D, paper iteration counts): labeled copy-paste.
Stage two: k-means prototype bank from labeled embeddings, teacher reset to the student, then
bidirectional copy-paste with teacher pseudo labels, L = L^l_cons + λ(t)(L^p_cons + γ L_cont), K = 3,
τ1 = τ2 = 0.1, η = 0.999, α = 0.9, γ 0.1 (2D) / 0.02 (3D). Inference: nnU-Net's own head.
All tensor logic is in nnunet_proto/methods/mper.py; see docs/methods/mper.md and METHODS.md §4.
Short variants: nnUNetTrainerMPER_smoke, _1epoch, _5epochs, _10epochs, _50epochs, _100epochs, _250epochs.
"""
from contextlib import nullcontext
from typing import Dict, Iterator, Tuple

import torch
from torch import autocast

from nnunet_proto.methods.mper import MPER, MPERConfig, MPERStepInputs
from nnunet_proto.ops.distributed import all_reduce_sum
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import schedule_variants


class nnUNetTrainerMPER(nnUNetTrainerSemiSupervised):
    method_class = MPER
    config = MPERConfig()

    def resolved_config(self) -> Dict:
        cfg = super().resolved_config()
        if self.method.spatial_dims is not None:  # known after initialize()
            cfg["resolved"] = self.method.resolved(self.num_epochs)
        return cfg

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"MPER: stage {self.method.stage} at epoch {self.current_epoch}; "
                               f"{self.method.resolved(self.num_epochs)}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.method.needs_switch(self.current_epoch, self.num_epochs):
            self.start_self_training()

    def start_self_training(self) -> None:
        """Stage switch (once): k-means bank from labeled embeddings of the pre-trained student, teacher := student."""
        reservoir = self.method.new_reservoir(self.label_manager.ignore_label)
        for feats, target in self.labeled_embeddings(self.config.kmeans_batches):
            reservoir.add(feats, target)
        report = self.method.begin_self_training(reservoir, self.progress, self.device)
        self.reset_teacher()
        self.print_to_log_file(f"MPER stage two from epoch {self.current_epoch}: k-means bank from "
                               f"{self.config.kmeans_batches} labeled batches {report}; teacher reset to the student")

    @torch.no_grad()
    def labeled_embeddings(self, num_batches: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(z, full-resolution target) of augmented labeled training batches, student in eval mode (METHODS.md §4.5)."""
        tap = self.student_taps[self.method.feature_layers[0]]
        was_training = self.network.training
        self.network.eval()
        try:
            for _ in range(num_batches):
                batch = next(self.dataloader_train)
                target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
                data = batch["data"].to(self.device, non_blocking=True)
                with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext():
                    self.network(data)
                yield tap.pop(), target.to(self.device, non_blocking=True)
        finally:
            tap.clear()
            self.network.train(was_training)

    def deep_supervision_weights(self, num_outputs: int) -> Tuple[float, ...]:
        """nnU-Net's own deep-supervision weights (``DeepSupervisionWrapper.weight_factors``), or (1,) without DS."""
        weights = getattr(self.loss, "weight_factors", None)
        if weights is None:
            weights = (1.0,)
        if len(weights) != num_outputs:
            raise RuntimeError(f"the network returned {num_outputs} outputs but nnU-Net's loss has {len(weights)} "
                               f"deep-supervision weights")
        return tuple(float(w) for w in weights)

    def compute_loss(self, data_l: torch.Tensor, target, data_u: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """Copy-paste step: mix inputs, one student forward, L^l_cons (loss_sup) + weighted MPER terms."""
        method = self.method
        ignore = self.label_manager.ignore_label
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        t_logits = self.teacher_forward(data_u)[0] if method.stage == 2 else None  # un-mixed unlabeled patches
        batch = method.make_batch(data_l, targets, data_u, t_logits)
        out = self.network(batch.images)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        feats = self.student_taps[method.feature_layers[0]].pop()
        sup = method.linear_consistency(outs, batch, self.deep_supervision_weights(len(outs)), ignore)
        inputs = MPERStepInputs(
            num_classes=self.label_manager.num_segmentation_heads, ignore_index=ignore,
            target_l=batch.targets[0], logits_l=outs[0], feats_l=feats, teacher_logits_u=t_logits,
            data_l=data_l, data_u=data_u, reduce_fn=all_reduce_sum, progress=self.progress, batch=batch)
        terms = self.method_losses(inputs)
        method.update_prototypes(inputs)  # no gradient; a no-op in stage one
        return self.combine(sup, terms)


globals().update(schedule_variants(nnUNetTrainerMPER))
