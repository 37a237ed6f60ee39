"""nnUNetTrainerMeanTeacher: the classic Mean Teacher (SSL4MIS loss and weights; noise and EMA in nnU-Net terms).

Softmax MSE between student and EMA teacher (0.99 rescaled to the run length, warm-up) on unlabeled patches,
teacher input noise N(0, 0.65²) clipped to ±1.3 in nnU-Net's z-units (SSL4MIS's 0.1 / 0.2 on [0, 1] images),
w_max = 0.1 with a Gaussian ramp. See nnunet_proto/methods/mean_teacher.py and docs/methods/mean_teacher.md.
nnUNetTrainerMeanTeacher_paper: SSL4MIS's literal settings (``MeanTeacherConfig.ssl4mis()``).
Short variants: nnUNetTrainerMeanTeacher_smoke, _1epoch, _5epochs, ... _250epochs.
Issue 23's redesign, not validated: nnUNetTrainerMeanTeacher_strong, _ema99, _wband, _ramp20
(one switch each) and _v2 (all but the ramp).
"""
from nnunet_proto.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import literal_variant, redesign_variants, schedule_variants


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    method_class = MeanTeacher
    config = MeanTeacherConfig()


globals().update(schedule_variants(nnUNetTrainerMeanTeacher))
globals().update(literal_variant(nnUNetTrainerMeanTeacher, MeanTeacherConfig.ssl4mis()))
globals().update(redesign_variants(nnUNetTrainerMeanTeacher, gated=False))
