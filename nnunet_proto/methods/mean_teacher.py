"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017, arXiv 1703.01780)
as used in SSL4MIS: the classic baseline.

Consistency between the student's softmax on unlabeled patches and the EMA teacher's softmax on the
same patches with Gaussian input noise, L = mean (softmax(s) − softmax(t))², weighted by
λ(t) = w_max · exp(−5(1 − t)²) (Gaussian ramp over the whole run).

Changes for nnU-Net's regime (docs/methods/mean_teacher.md, "Changes for nnU-Net's regime"):

* **Noise in nnU-Net's intensity units.** SSL4MIS adds N(0, 0.1²) clipped to ±0.2 to ACDC slices scaled to
  [0, 1], whose standard deviation is about 0.12: the noise is ≈ 0.8 image standard deviations. nnU-Net
  z-scores the images (standard deviation 1), where 0.1 is 8× weaker relative to the image and the teacher
  sees almost the student's input, so the consistency term is ≈ 0. The default noise is therefore
  N(0, 0.8²) clipped to ±1.6 in normalised units: the same perturbation relative to the image.
* **Optional independent photometric perturbation** of the teacher's input (per image and channel
  x ↦ (1 + c·u₁)·x + c·u₂, u ~ U(−1, 1)), off by default.
* **EMA horizon relative to the run** (base config ``time_constants``): SSL4MIS's 0.99 over its 30 000
  ACDC iterations.

``MeanTeacherConfig.ssl4mis()`` is the literal SSL4MIS form (noise 0.1/0.2, EMA 0.99 as written).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.losses import softmax_mse

#: SSL4MIS's max_iterations for ACDC (train_mean_teacher_2D.py), the run its EMA decay 0.99 was used with
SSL4MIS_ACDC_ITERATIONS = 30_000
#: standard deviation of SSL4MIS's [0, 1]-scaled ACDC slices; 0.1 / 0.12 ≈ 0.8 image standard deviations
SSL4MIS_ACDC_IMAGE_STD = 0.12


def gaussian_input_noise(x: torch.Tensor, std: float, clip: float,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x + clip(N(0, std²), −clip, clip), elementwise; ``std == 0`` returns ``x`` itself (SSL4MIS teacher noise)."""
    if std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return x + noise.clamp(-clip, clip)


def intensity_jitter(x: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per image and channel (1 + s·u₁)·x + s·u₂ with u₁, u₂ ~ U(−1, 1): contrast and brightness change.

    ``x`` (B, C, *S) in nnU-Net's normalised units (so the shift s·u₂ is in image standard deviations);
    ``strength`` s in [0, 1); 0 returns ``x`` itself.
    """
    if strength == 0:
        return x
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    u = torch.rand((2, *shape), generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    return (1 + strength * u[0]) * x + strength * u[1]


@dataclass(frozen=True)
class MeanTeacherConfig(SemiSupervisedConfig):
    """Mean Teacher settings.

    Attributes:
        noise_std / noise_clip: teacher input noise N(0, noise_std²) clipped to ±noise_clip, in nnU-Net's
            normalised intensity units (z-scores for MRI). Default 0.8 / 1.6 = SSL4MIS's 0.1 / 0.2 divided
            by its ACDC image standard deviation 0.12 (rounded); ``ssl4mis()`` uses 0.1 / 0.2 as written.
        teacher_jitter: strength of an independent contrast/brightness change of the teacher's input
            (:func:`intensity_jitter`); 0 = off (SSL4MIS has none).
        reference_steps: 30 000, SSL4MIS's ACDC run; the EMA decay 0.99 is rescaled to this run's length.
        Inherited: w_max 0.1, Gaussian ramp over the whole run, EMA 0.99 with warm-up (SSL4MIS).
    """

    noise_std: float = 0.8
    noise_clip: float = 1.6
    teacher_jitter: float = 0.0
    reference_steps: Optional[int] = SSL4MIS_ACDC_ITERATIONS

    @classmethod
    def ssl4mis(cls, **changes) -> "MeanTeacherConfig":
        """SSL4MIS's literal settings: noise 0.1 / 0.2 in input units, EMA 0.99 as written, no jitter."""
        return cls(**{"noise_std": 0.1, "noise_clip": 0.2, "teacher_jitter": 0.0, "time_constants": "paper",
                      **changes})

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("Mean Teacher needs use_teacher=True")
        if self.noise_std < 0 or self.noise_clip < 0:
            raise ValueError(f"noise_std and noise_clip must be >= 0, got {self.noise_std}, {self.noise_clip}")
        if not 0.0 <= self.teacher_jitter < 1.0:
            raise ValueError(f"teacher_jitter must be in [0, 1), got {self.teacher_jitter}")


class MeanTeacher(SemiSupervisedMethod):
    config_class = MeanTeacherConfig
    term_names = ("consistency",)
    needs_features = False

    def teacher_input(self, data_u: torch.Tensor) -> torch.Tensor:
        """The teacher's view: intensity jitter (if on), then clipped Gaussian noise; the student sees ``data_u``."""
        cfg = self.config
        return gaussian_input_noise(intensity_jitter(data_u, cfg.teacher_jitter), cfg.noise_std, cfg.noise_clip)

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        if inputs.logits_u is None or inputs.teacher_logits_u is None:
            raise ValueError("Mean Teacher needs student and teacher logits on the unlabeled patches")
        teacher_probs = torch.softmax(inputs.teacher_logits_u.float(), dim=1)
        return {"consistency": softmax_mse(inputs.logits_u, teacher_probs)}
