"""Mean Teacher (Tarvainen & Valpola 2017) as used in SSL4MIS: the classic baseline.

Consistency between the student's softmax on unlabeled patches and the EMA teacher's softmax on the
same patches with small Gaussian input noise, L = mean (softmax(s) − softmax(t))², weighted by
λ(t) = w_max · exp(−5(1 − t)²) (Gaussian ramp over the whole run).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.losses import softmax_mse


@dataclass(frozen=True)
class MeanTeacherConfig(SemiSupervisedConfig):
    """SSL4MIS defaults: w_max 0.1, EMA 0.99 with warm-up, teacher input noise N(0, 0.1²) clipped to ±0.2.

    The noise is added to nnU-Net's normalised intensities (z-scores for MRI), as SSL4MIS adds it to
    its normalised inputs.
    """

    noise_std: float = 0.1
    noise_clip: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("Mean Teacher needs use_teacher=True")
        if self.noise_std < 0 or self.noise_clip < 0:
            raise ValueError(f"noise_std and noise_clip must be >= 0, got {self.noise_std}, {self.noise_clip}")


class MeanTeacher(SemiSupervisedMethod):
    config_class = MeanTeacherConfig
    term_names = ("consistency",)
    needs_features = False

    def teacher_input(self, data_u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.noise_std == 0:
            return data_u
        noise = torch.randn_like(data_u) * cfg.noise_std
        return data_u + noise.clamp(-cfg.noise_clip, cfg.noise_clip)

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        if inputs.logits_u is None or inputs.teacher_logits_u is None:
            raise ValueError("Mean Teacher needs student and teacher logits on the unlabeled patches")
        teacher_probs = torch.softmax(inputs.teacher_logits_u.float(), dim=1)
        return {"consistency": softmax_mse(inputs.logits_u, teacher_probs)}
