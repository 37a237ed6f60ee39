"""nnUNetTrainerMSPA: mutual- and self-prototype alignment (Zhang, Tian, Jiao; arXiv 2206.01739).

A single network (no teacher), terms lpa, upa, spa, each weighted by λ(t) = 0.1·exp(−5(1 − t)²) over
the whole run; N = min(4, labeled patches) prototype sets, strict-majority voting, features from the
last decoder stage. See nnunet_proto/methods/mspa.py, docs/methods/mspa.md.
nnUNetTrainerMSPA_paper: the literal Eqs. (``MSPAConfig.paper()``: no temperature, no gate, undetached).
Short variants: nnUNetTrainerMSPA_smoke, _1epoch, _5epochs, _10epochs, _50epochs, _100epochs, _250epochs.
"""
from nnunet_proto.methods.mspa import MSPA, MSPAConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import literal_variant, schedule_variants


class nnUNetTrainerMSPA(nnUNetTrainerSemiSupervised):
    method_class = MSPA
    config = MSPAConfig()


globals().update(schedule_variants(nnUNetTrainerMSPA))
globals().update(literal_variant(nnUNetTrainerMSPA, MSPAConfig.paper()))
