"""nnUNetTrainerBCP: bidirectional copy-paste with a mean teacher (Bai et al., CVPR 2023, arXiv 2305.00673).

Stage one: labeled copy-paste until the student is ready (every foreground class at pseudo-Dice ≥ 0.5 on
nnU-Net's validation cases in two consecutive epochs, between 10 % and 50 % of the run; ``stage_switch="fixed"``:
the paper's 25 % in 2D, 2/17 in 3D). Stage two: teacher reset to the student (not if the cap forced an unready
switch), then bidirectional copy-paste of labeled and unlabeled patches
with the teacher's confidence-gated pseudo labels, L = L_sup(ground-truth regions) + 0.5 · L_pseudo, EMA
0.99 rescaled to the run. ``BCPConfig.paper()`` is the paper's ungated form. Inference: nnU-Net's own head.
Tensor logic: nnunet_proto/methods/bcp.py and nnunet_proto/ops/copy_paste.py; see docs/methods/bcp.md.
nnUNetTrainerBCP_paper: that form as a trainer.
Opt-in, not validated yet (issue 23, item 6; docs/methods/bcp.md, "Warm start, plain stage one,
un-mixed supervised loss"):
nnUNetTrainerBCP_warm skips stage one (``stage_switch="warm_start"``; train it with
``NNUNET_PROTO_WARM_START=<plain nnU-Net checkpoint_final.pth>`` set, every weight, or nnUNetv2_train's
``-pretrained_weights <that file>``, all but the heads, the teacher is reset to the loaded student at the
start) and nnUNetTrainerBCP_plainstage1 trains stage one with nnU-Net's own loss (``stage_one_loss="plain"``); both
keep nnU-Net's loss on the un-mixed labeled patches beside the mixed ones in stage two
(``unmixed_supervised_weight=1``, term ``unmixed``). nnUNetTrainerBCP_warm_lcc: _warm with largest-component
pseudo labels. nnUNetTrainerBCP_warm_labeledcontrol: a control, _warm whose unlabeled stream serves the fold's
labeled images (labels unused): no unlabeled image at all.
Short variants: nnUNetTrainerBCP_smoke, _1epoch, _5epochs, _10epochs, _50epochs, _100epochs, _250epochs.
"""
from typing import Dict, Optional, Tuple

import torch

from nnunet_proto.methods.bcp import BCP, BCPConfig, BCPStepInputs
from nnunet_proto.ops.distributed import all_reduce_sum
from nnunet_proto.training import stage_switch as stages
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.precision import float32_fields, float32_math
from nnunet_proto.training.stage_switch import fmt_dice, maybe_switch_stage
from nnunet_proto.training.variants import literal_variant, schedule_variants


class nnUNetTrainerBCP(nnUNetTrainerSemiSupervised):
    method_class = BCP
    config = BCPConfig()

    def initialize(self):
        super().initialize()
        self._warm_start_probe = stages.warm_start_probe(self.network)  # did -pretrained_weights load anything?

    def on_train_start(self):
        super().on_train_start()
        stages.warm_start(self, "BCP")  # stage_switch="warm_start": stage two now (the teacher := the loaded student)
        if self.config.stage_switch == "fixed":
            plan = f"{self.method.stage_one_epochs(self.num_epochs)} pre-training epoch(s)"
        elif self.config.stage_switch == "warm_start":
            plan = "no stage one (warm start)"
        else:
            floor, cap = self.method.stage_one_bounds(self.num_epochs)
            plan = (f"stage two when every foreground class reaches validation pseudo-Dice {self.config.ready_dice:g} "
                    f"(epochs {floor}..{cap})")
        self.print_to_log_file(f"BCP: stage {self.method.stage} at epoch {self.current_epoch}; {plan}; stage-one loss "
                               f"{self.config.stage_one_loss}; un-mixed supervised weight in stage two "
                               f"{self.config.unmixed_supervised_weight:g}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        maybe_switch_stage(self, "BCP")

    def start_self_training(self, decision: Optional[Dict] = None) -> None:
        """Stage switch (once): teacher := the pre-trained student, unless the cap forced an unready switch; then
        bidirectional copy-paste."""
        decision = decision if decision is not None else {"epoch": self.current_epoch, "reason": "forced",
                                                          "reset_teacher": True}
        self.method.begin_self_training(self.progress, decision)
        if decision["reset_teacher"]:
            self.reset_teacher()
            teacher = "teacher reset to the student"
        else:
            self._ensure_teacher()  # the stage-two length is known now: the EMA decay follows it
            teacher = ("WARNING: the student is not ready (pseudo-Dice below the threshold), so the teacher is NOT "
                       "reset to it; the EMA teacher of stage one continues")
        self.print_to_log_file(
            f"BCP stage two from epoch {self.current_epoch} ({decision['reason']}; validation pseudo-Dice "
            f"{fmt_dice(decision.get('pseudo_dice'))}): {teacher} (EMA {self.teacher.decay:.5g})")
        self.write_resolved_config()  # the switch and the resolved EMA decay go into nnunet_proto_config.json

    def resolved_config(self) -> Dict:
        cfg = super().resolved_config()
        if self.method.switch_report:
            cfg["switch"] = dict(self.method.switch_report)
        return cfg

    def enter_last_stage(self) -> None:
        """Switch to stage two now, whatever the readiness (for tests and tools; logged as ``forced``)."""
        if self.method.stage == 1:
            self.start_self_training()

    def compute_loss(self, data_l: torch.Tensor, target, data_u: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """Copy-paste step: teacher on the un-mixed unlabeled patches, mix, one student forward, both terms (and
        nnU-Net's loss on the un-mixed labeled patches with ``unmixed_supervised_weight``); or, in stage one with
        ``stage_one_loss="plain"``, nnU-Net's own loss on the un-mixed labeled batch."""
        if stages.plain_stage_one(self):
            return self.combine(*stages.plain_stage_one_loss(self, data_l, target))
        method = self.method
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        t_logits = None
        if method.stage == 2:
            t_logits = self.teacher_forward(data_u)[0]
            self.record_pseudo_label_diagnostics(t_logits, targets[0])
        batch = method.make_batch(data_l, targets, data_u, t_logits)
        outs, unmixed = stages.student_forward(self, batch.images, data_l, target)
        inputs = BCPStepInputs(
            num_classes=self.label_manager.num_segmentation_heads, ignore_index=self.label_manager.ignore_label,
            target_l=batch.targets[0], logits_l=outs[0], teacher_logits_u=t_logits, data_l=data_l, data_u=data_u,
            reduce_fn=all_reduce_sum, progress=self.progress, batch=batch, outputs=outs,
            scale_weights=self.deep_supervision_weights(len(outs)))
        with float32_math(self.device.type):  # region CE + Dice of fp16/bf16 outputs in float32, like every method
            sup = method.supervised_loss(float32_fields(inputs))
        return self.combine(sup, stages.add_unmixed_term(self, self.method_losses(inputs), unmixed))


globals().update(schedule_variants(nnUNetTrainerBCP))
globals().update(literal_variant(nnUNetTrainerBCP, BCPConfig.paper()))
globals().update(stages.option_variants(nnUNetTrainerBCP))  # _warm, _warm_lcc, _warm_labeledcontrol, _plainstage1
