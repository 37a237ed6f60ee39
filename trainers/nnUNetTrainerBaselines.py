"""Plain nnU-Net with the short schedules nnU-Net itself lacks, so that baselines match the SSL variants.

``nnUNetTrainer_smoke`` (2 epochs x 5 iterations) pairs with ``nnUNetTrainerCPCL_smoke`` etc. and
``nnUNetTrainer_demo`` (8 x 60) with ``nnUNetTrainerCPCL_demo``; for the epoch-count variants
(``_5epochs`` ...) nnU-Net's own ``nnUNetTrainer_5epochs`` and friends are used.
"""
from nnunet_proto.training.compat import nnUNetTrainer
from nnunet_proto.training.variants import SCHEDULES, schedule_variant

nnUNetTrainer_smoke = schedule_variant(nnUNetTrainer, "smoke", *SCHEDULES["smoke"])
nnUNetTrainer_demo = schedule_variant(nnUNetTrainer, "demo", *SCHEDULES["demo"])
