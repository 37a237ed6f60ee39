"""nnUNetTrainerCPCL: cyclic prototype consistency learning (Xu et al., JBHI 2022).

α = 20, β = 10, w_max = 0.1 with a Gaussian ramp over the whole run, EMA teacher 0.99 rescaled to the run
length, features from the last decoder stage; for nnU-Net the student also sees the unlabeled patches and the
U2L pseudo labels are confidence-gated (0.9). See nnunet_proto/methods/cpcl.py and docs/methods/cpcl.md.
nnUNetTrainerCPCL_paper: the paper's literal form (``CPCLConfig.paper()``).
nnUNetTrainerCPCL_v1: the form of the confirmation benchmark acdc_confirm_bf16, pinned (``CPCLConfig.v1()``).
nnUNetTrainerCPCL_labeledcontrol: CPCL unchanged, but its "unlabeled" stream serves the fold's labeled training
images (labels unused): no unlabeled image at all. Whether CPCL's gain needs the unlabeled images.
Short variants: nnUNetTrainerCPCL_smoke, _1epoch, _5epochs, _10epochs, _50epochs, _100epochs, _250epochs.
Issue 23's redesign, not validated: nnUNetTrainerCPCL_strong, _ema99, _quantile, _wband, _ramp20
(one switch each) and _v2 (all but the ramp).
"""
from nnunet_proto.methods.cpcl import CPCL, CPCLConfig
from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import (
    config_variant,
    literal_variant,
    redesign_variants,
    schedule_variants,
)


class nnUNetTrainerCPCL(nnUNetTrainerSemiSupervised):
    method_class = CPCL
    config = CPCLConfig()


globals().update(schedule_variants(nnUNetTrainerCPCL))
globals().update(literal_variant(nnUNetTrainerCPCL, CPCLConfig.paper()))
globals().update(config_variant(nnUNetTrainerCPCL, "v1", CPCLConfig.v1(),
                                "nnUNetTrainerCPCL as measured in the confirmation benchmark acdc_confirm_bf16, pinned "
                                "(CPCLConfig.v1()): later changes of CPCL's defaults leave it unchanged."))
globals().update(config_variant(nnUNetTrainerCPCL, "labeledcontrol", CPCLConfig(unlabeled_sources=("labeled",)),
                                "Control: nnUNetTrainerCPCL whose unlabeled stream serves the fold's labeled training "
                                "images with their labels unused (unlabeled_sources=('labeled',)): CPCL without any "
                                "unlabeled image."))
globals().update(redesign_variants(nnUNetTrainerCPCL))
