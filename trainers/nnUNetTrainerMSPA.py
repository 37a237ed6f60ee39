"""nnUNetTrainerMSPA: mutual- and self-prototype alignment (Zhang, Tian, Jiao; arXiv 2206.01739).

A single network (no teacher), terms lpa and upa weighted by λ(t) = 0.1·exp(−5(1 − t)²) over the whole
run, spa computed and logged with weight 0 (it cost the right ventricle on ACDC, docs/methods/mspa.md);
N = min(4, labeled patches) prototype sets, strict-majority voting, features from the last decoder stage.
See nnunet_proto/methods/mspa.py, docs/methods/mspa.md.
nnUNetTrainerMSPA_paper: the literal Eqs. (``MSPAConfig.paper()``: no temperature, no gate, undetached, L_SPA on).
nnUNetTrainerMSPA_SPA: the defaults with the (normalised) L_SPA weighted λ(t) like the others, as in the
paper's Eq. 12; our default until the ACDC screening showed it loses the right ventricle.
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
globals().update(config_variant(nnUNetTrainerMSPA, "SPA", MSPAConfig(spa_weight=1.0),
                                "nnUNetTrainerMSPA with the normalised L_SPA weighted like L_LPA and L_UPA "
                                "(paper Eq. 12): the L_SPA ablation."))
