"""nnUNetTrainerZeroSSL: the A/A control. The shared base trainer's whole Mean-Teacher path with zero weight.

Unlabeled stream, EMA teacher and its forward, the consistency term and its logging all run as in
nnUNetTrainerMeanTeacher, but every semi-supervised weight is 0 (w_max = 0), so the parameter update is
plain nnU-Net's. A benchmark row of this trainer must match plain nnU-Net within run-to-run noise; if it
does not, the glue (data stream, teacher, step, checkpointing) has a defect that any method would inherit.
Short variants: nnUNetTrainerZeroSSL_smoke, _1epoch, _5epochs, ... _250epochs.
"""
from nnunet_proto.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import schedule_variants


class nnUNetTrainerZeroSSL(nnUNetTrainerSemiSupervised):
    method_class = MeanTeacher
    config = MeanTeacherConfig(w_max=0.0)


globals().update(schedule_variants(nnUNetTrainerZeroSSL))
