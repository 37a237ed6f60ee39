"""nnUNetTrainerMPER: multi-prototype embedding refinement on bidirectional copy-paste (Bi et al., ICASSP 2025).

Stage one: labeled copy-paste until the student is ready (every foreground class at pseudo-Dice ≥ 0.5 on
nnU-Net's validation cases in two consecutive epochs, between 10 % and 50 % of the run;
``stage_switch="fixed"``: the paper's 25 % in 2D, 2/17 in 3D). Stage two: k-means prototype bank from
labeled embeddings, teacher reset to the student (skipped if the cap forced an unready switch), then
bidirectional copy-paste with gated teacher pseudo labels, L = L^l_cons + λ(t)(L^p_cons + γ L_cont),
K = 3, τ1 = τ2 = 0.1, η = 0.999 (run-relative), α = 0.9, γ 0.1 (2D) / 0.02 (3D), w_max 0.5.
nnUNetTrainerMPER_paper: the literal form (``MPERConfig.paper()``). Inference: nnU-Net's own head.
Opt-in, not validated yet (issue 23, item 6; docs/methods/mper.md, "Warm start, plain stage one,
un-mixed supervised loss"):
nnUNetTrainerMPER_warm skips stage one (``stage_switch="warm_start"``; train it with
``NNUNET_PROTO_WARM_START=<plain nnU-Net checkpoint_final.pth>`` set, every weight, or nnUNetv2_train's
``-pretrained_weights <that file>``, all but the heads; k-means and the teacher reset run at the start, on
the loaded student) and nnUNetTrainerMPER_plainstage1 trains stage one with nnU-Net's own loss
(``stage_one_loss="plain"``); both keep nnU-Net's loss on the un-mixed labeled patches beside the mixed ones in
stage two (``unmixed_supervised_weight=1``, term ``unmixed``).
All tensor logic is in nnunet_proto/methods/mper.py; see
docs/methods/mper.md. Short variants: nnUNetTrainerMPER_smoke, _1epoch, _5epochs, _10epochs, _50epochs,
_100epochs, _250epochs.
"""
from contextlib import nullcontext
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import autocast

from nnunet_proto.methods.mper import MPER, MPERConfig, MPERStepInputs
from nnunet_proto.ops.distributed import all_reduce_sum
from nnunet_proto.training import stage_switch as stages
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.stage_switch import fmt_dice, maybe_switch_stage
from nnunet_proto.training.variants import literal_variant, schedule_variants


class nnUNetTrainerMPER(nnUNetTrainerSemiSupervised):
    method_class = MPER
    config = MPERConfig()

    def initialize(self):
        super().initialize()
        self._warm_start_probe = stages.warm_start_probe(self.network)  # did -pretrained_weights load anything?

    def resolved_config(self) -> Dict:
        cfg = super().resolved_config()
        if self.method.spatial_dims is not None:  # known after initialize()
            cfg["resolved"] = self.method.resolved(self.num_epochs)
        return cfg

    def on_train_start(self):
        super().on_train_start()
        stages.warm_start(self, "MPER")  # stage_switch="warm_start": stage two now (the teacher := the loaded student)
        self.print_to_log_file(f"MPER: stage {self.method.stage} at epoch {self.current_epoch}; "
                               f"{self.method.resolved(self.num_epochs)}; stage-one loss {self.config.stage_one_loss}; "
                               f"un-mixed supervised weight in stage two {self.config.unmixed_supervised_weight:g}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        maybe_switch_stage(self, "MPER")

    def start_self_training(self, decision: Optional[Dict] = None) -> None:
        """Stage switch (once): k-means bank from labeled embeddings of the pre-trained student, then
        teacher := student, unless the cap forced the switch before the student was ready."""
        decision = decision if decision is not None else {"epoch": self.current_epoch, "reason": "forced",
                                                          "reset_teacher": True}
        reservoir = self.method.new_reservoir(self.label_manager.ignore_label)
        for feats, target in self.labeled_embeddings(self.config.kmeans_batches):
            reservoir.add(feats, target)
        report = self.method.begin_self_training(reservoir, self.progress, self.device, decision)
        if decision["reset_teacher"]:
            self.reset_teacher()
            teacher = "teacher reset to the student"
        else:
            teacher = ("WARNING: the student is not ready (pseudo-Dice below the threshold), so the teacher is NOT "
                       "reset to it; the EMA teacher of stage one continues")
        self.print_to_log_file(
            f"MPER stage two from epoch {self.current_epoch} ({decision['reason']}; validation pseudo-Dice "
            f"{fmt_dice(decision.get('pseudo_dice'))}, threshold {self.config.ready_dice:g}): k-means bank from "
            f"{self.config.kmeans_batches} labeled batches {report}; {teacher}; prototype momentum "
            f"{self.method.prototype_momentum:.6g} over {self.method.stage_two_steps()} stage-two steps")
        self.write_resolved_config()  # the switch decision and the resolved η go into nnunet_proto_config.json

    def enter_last_stage(self) -> None:
        """Switch to stage two now, whatever the readiness (for tests and tools; logged as ``forced``)."""
        if self.method.stage == 1:
            self.start_self_training()

    @torch.no_grad()
    def labeled_embeddings(self, num_batches: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(z, full-resolution target) of augmented labeled training batches, student in eval mode (for k-means)."""
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

    def compute_loss(self, data_l: torch.Tensor, target, data_u: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """Copy-paste step: mix inputs, one student forward, L^l_cons (loss_sup) + weighted MPER terms (and nnU-Net's
        loss on the un-mixed labeled patches with ``unmixed_supervised_weight``); or, in stage one with
        ``stage_one_loss="plain"``, nnU-Net's own loss on the un-mixed labeled batch."""
        method = self.method
        if stages.plain_stage_one(self):
            method.report(stage=1.0, prototype_momentum=0.0)
            return self.combine(*stages.plain_stage_one_loss(self, data_l, target))
        ignore = self.label_manager.ignore_label
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        t_logits = self.teacher_forward(data_u)[0] if method.stage == 2 else None  # un-mixed unlabeled patches
        self.record_pseudo_label_diagnostics(t_logits, targets[0])  # collapse diagnostics (no-op in stage one)
        batch = method.make_batch(data_l, targets, data_u, t_logits)
        outs, unmixed = stages.student_forward(self, batch.images, data_l, target)
        feats = self.student_taps[method.feature_layers[0]].pop()[:batch.images.shape[0]]  # the mixed images only
        sup = method.linear_consistency(outs, batch, self.deep_supervision_weights(len(outs)), ignore)
        inputs = MPERStepInputs(
            num_classes=self.label_manager.num_segmentation_heads, ignore_index=ignore,
            target_l=batch.targets[0], logits_l=outs[0], feats_l=feats, teacher_logits_u=t_logits,
            data_l=data_l, data_u=data_u, reduce_fn=all_reduce_sum, progress=self.progress, batch=batch)
        terms = self.method_losses(inputs)
        method.update_prototypes(inputs)  # no gradient; a no-op in stage one
        return self.combine(sup, stages.add_unmixed_term(self, terms, unmixed))


globals().update(schedule_variants(nnUNetTrainerMPER))
globals().update(literal_variant(nnUNetTrainerMPER, MPERConfig.paper()))
globals().update(stages.option_variants(nnUNetTrainerMPER))  # _warm, _warm_lcc, _warm_labeledcontrol, _plainstage1
