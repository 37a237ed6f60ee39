"""nnUNetTrainerMeanTeacher: the classic Mean Teacher baseline (SSL4MIS settings).

Softmax MSE between student and EMA teacher (0.99, warm-up) on unlabeled patches, teacher input noise
N(0, 0.1²) clipped to ±0.2, w_max = 0.1 with a Gaussian ramp. See nnunet_proto/methods/mean_teacher.py.
Short variants: nnUNetTrainerMeanTeacher_smoke, _1epoch, _5epochs, ... _250epochs.
"""
from nnunet_proto.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import schedule_variants


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    method_class = MeanTeacher
    config = MeanTeacherConfig()


globals().update(schedule_variants(nnUNetTrainerMeanTeacher))
