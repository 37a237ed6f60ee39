"""nnUNetTrainerMSPA: mutual- and self-prototype alignment (Zhang, Tian, Jiao; arXiv 2206.01739).

A single network (no teacher), terms lpa, upa, spa, each weighted by λ(t) = 0.1·exp(−5(1 − t)²) over
the whole run; N = min(4, labeled patches) prototype sets, strict-majority voting, features from the
last decoder stage. See nnunet_proto/methods/mspa.py, docs/methods/mspa.md.
nnUNetTrainerMSPA_paper: the literal Eqs. (``MSPAConfig.paper()``: no temperature, no gate, undetached).
nnUNetTrainerMSPA_noSPA: the defaults with L_SPA's weight 0 (still computed and logged), the ablation of the
term whose gradient dominates (docs/methods/mspa.md).
Short variants: nnUNetTrainerMSPA_smoke, _1epoch, _5epochs, _10epochs, _50epochs, _100epochs, _250epochs.
"""
from nnunet_proto.methods.mspa import MSPA, MSPAConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import config_variant, literal_variant, schedule_variants


class nnUNetTrainerMSPA(nnUNetTrainerSemiSupervised):
    method_class = MSPA
    config = MSPAConfig()


globals().update(schedule_variants(nnUNetTrainerMSPA))
globals().update(literal_variant(nnUNetTrainerMSPA, MSPAConfig.paper()))
globals().update(config_variant(nnUNetTrainerMSPA, "noSPA", MSPAConfig(spa_weight=0.0),
                                "nnUNetTrainerMSPA with L_SPA weighted 0 (computed and logged): the L_SPA ablation."))
