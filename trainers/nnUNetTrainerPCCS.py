"""nnUNetTrainerPCCS: prototype contrastive consistency segmentation (He et al., arXiv 2502.06650), paper intent.

Projection branch on encoder stages 1-3 (kept beside the stock network, EMA-copied for the teacher),
SDM distance-layer prototypes of the unlabeled pseudo labels with an uncertainty-weighted contrastive
loss (0.01), a teacher prototype memory (K = 2 per class, Sinkhorn-balanced, momentum 0.999 at the
code's 15k iterations, applied run-relative) with a pixel-prototype CE (0.3, ramped, confidence-gated),
and consistency to the teacher's prototype prediction plus entropy minimisation (λ(t) = 0.1·ramp,
0.1·λ(t)). See nnunet_proto/methods/pccs.py and docs/methods/pccs.md.
nnUNetTrainerPCCS_paper: L_aux at full weight from ~3 % of the run, ungated, per-step memory momentum
(``PCCSConfig.paper()``). nnUNetTrainerPCCS_noAuxEncoder: the defaults with L_aux training only the projection
branch (``aux_encoder_gradient=False``), an ablation. Short variants: nnUNetTrainerPCCS_smoke, _1epoch, ...
Issue 23's redesign, not validated: nnUNetTrainerPCCS_strong, _ema99, _quantile, _wband, _ramp20
(one switch each) and _v2 (all but the ramp).
"""
from nnunet_proto.methods.pccs import PCCS, PCCSConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import (
    config_variant,
    literal_variant,
    redesign_variants,
    schedule_variants,
)


class nnUNetTrainerPCCS(nnUNetTrainerSemiSupervised):
    method_class = PCCS
    config = PCCSConfig()

    def initialize(self):
        if not self.was_initialized:  # clear message before the feature taps fail on a missing stage
            arch = self.configuration_manager.network_arch_init_kwargs
            self.method.check_encoder_stages(len(arch["features_per_stage"]), self.configuration_name)
        super().initialize()


globals().update(schedule_variants(nnUNetTrainerPCCS))
globals().update(literal_variant(nnUNetTrainerPCCS, PCCSConfig.paper()))
globals().update(config_variant(nnUNetTrainerPCCS, "noAuxEncoder", PCCSConfig(aux_encoder_gradient=False),
                                "nnUNetTrainerPCCS with L_aux kept out of the encoder: the aux-gradient ablation."))
globals().update(redesign_variants(nnUNetTrainerPCCS))
