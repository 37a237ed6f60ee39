"""Plain nnU-Net with the short schedules nnU-Net itself lacks, so that baselines match the SSL variants.

``nnUNetTrainer_smoke`` (2 epochs x 5 iterations) pairs with ``nnUNetTrainerCPCL_smoke`` etc. and
``nnUNetTrainer_demo`` (8 x 60) with ``nnUNetTrainerCPCL_demo``; for the epoch-count variants
(``_5epochs`` ...) nnU-Net's own ``nnUNetTrainer_5epochs`` and friends are used.

``nnUNetTrainer_cpubf16`` is plain nnU-Net with bfloat16 autocast on CPU: the plain counterpart of the
semi-supervised trainers run with ``NNUNET_PROTO_CPU_PRECISION=bf16`` (nnunet_proto/training/precision.py).
"""
from nnunet_proto.training.compat import nnUNetTrainer
from nnunet_proto.training.precision import CPUAutocastMixin
from nnunet_proto.training.variants import SCHEDULES, schedule_variant

nnUNetTrainer_smoke = schedule_variant(nnUNetTrainer, "smoke", *SCHEDULES["smoke"])
nnUNetTrainer_demo = schedule_variant(nnUNetTrainer, "demo", *SCHEDULES["demo"])


class nnUNetTrainer_cpubf16(CPUAutocastMixin, nnUNetTrainer):
    """nnUNetTrainer whose CPU training steps run under bfloat16 autocast (weights and optimiser in fp32)."""

    forced_cpu_precision = "bf16"
