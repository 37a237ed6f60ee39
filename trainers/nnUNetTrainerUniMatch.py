"""nnUNetTrainerUniMatch: weak-to-strong consistency with dual strong views and feature perturbation (Yang et al.,
CVPR 2023, arXiv 2208.09910).

The EMA teacher (0.99 per step, as written) predicts on the weak view (nnU-Net's augmentation); its pseudo labels,
kept where its confidence is >= 0.95, supervise the student on two strong views (strong intensity + CutMix, the
targets mixed with the same boxes) and on the weak view's feature-perturbed pass (channel dropout 0.5 on every
encoder output), each with nnU-Net's Dice + CE at weight 1 (sigmoid ramp over the first 10 % of the run).
See nnunet_proto/methods/unimatch.py, nnunet_proto/ops/strong_views.py and docs/methods/unimatch.md.
nnUNetTrainerUniMatch_paper: the official ACDC code's form (``UniMatchConfig.paper()``: the network's own
prediction as teacher, Dice-only unlabeled loss, no ramp).
nnUNetTrainerUniMatch_wband / _quantile: issue 23's weight band (each term's gradient share at full ramp in
[0.3, 1] of the supervised gradient) / quantile gate (each predicted class keeps its most confident half), one switch
each, for the validation screening (docs/methods/unimatch.md); not validated, defaults unchanged.
Short variants: nnUNetTrainerUniMatch_smoke, _1epoch, _5epochs, ... _250epochs.
"""
from nnunet_proto.methods.unimatch import UniMatch, UniMatchConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import literal_variant, redesign_variant, schedule_variants


class nnUNetTrainerUniMatch(nnUNetTrainerSemiSupervised):
    method_class = UniMatch
    config = UniMatchConfig()


globals().update(schedule_variants(nnUNetTrainerUniMatch))
globals().update(literal_variant(nnUNetTrainerUniMatch, UniMatchConfig.paper()))
globals().update(redesign_variant(nnUNetTrainerUniMatch, "wband"))
globals().update(redesign_variant(nnUNetTrainerUniMatch, "quantile"))
