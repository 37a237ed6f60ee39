"""One file per semi-supervised method: a frozen config and a pure-tensor loss (no nnU-Net import)."""
from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.methods.bcp import BCP, BCPConfig
from nnunet_proto.methods.cpcl import CPCL, CPCLConfig, cpcl_losses
from nnunet_proto.methods.mean_teacher import MeanTeacher, MeanTeacherConfig

__all__ = ["BCP", "BCPConfig", "CPCL", "CPCLConfig", "MeanTeacher", "MeanTeacherConfig", "SemiSupervisedConfig",
           "SemiSupervisedMethod", "StepInputs", "cpcl_losses"]
