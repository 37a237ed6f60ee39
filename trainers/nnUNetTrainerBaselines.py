"""Plain nnU-Net with the short schedules nnU-Net itself lacks, so that baselines match the SSL variants.

``nnUNetTrainer_smoke`` (2 epochs x 5 iterations) pairs with ``nnUNetTrainerCPCL_smoke`` etc.; for the
epoch-count variants use nnU-Net's own ``nnUNetTrainer_5epochs`` and friends.
"""
from nnunet_proto.training.compat import nnUNetTrainer
from nnunet_proto.training.variants import schedule_variant

nnUNetTrainer_smoke = schedule_variant(nnUNetTrainer, "smoke", 2, 5, 2)
