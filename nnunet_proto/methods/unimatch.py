"""UniMatch (Yang, Qi, Feng, Zhang, Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023, arXiv 2208.09910; code github.com/LiheYoung/UniMatch, ``more-scenarios/medical``).

FixMatch's weak-to-strong rule for segmentation, widened in two ways:

* **image-level**: two strong views of every unlabeled patch (strong intensity perturbations and CutMix, drawn
  independently), each trained on the same hard pseudo labels of the weak view, mixed with that view's boxes;
* **feature-level** (the "FP" stream): the weak view's encoder features with channel dropout 0.5 on every skip
  and the bottleneck, decoded and trained on the weak view's pseudo labels.

Pseudo labels are the argmax of the teacher on the weak view, kept where its max softmax ≥ τ (0.95, the ACDC
config), per voxel:

    L = L_sup + λ(t) · [ mean_k ℓ(student(strong_k), mix_k(ŷ_w), mix_k(keep_w))
                         + fp_weight · ℓ(decoder(dropout(encoder(weak))), ŷ_w, keep_w) ]

with ℓ nnU-Net's Dice + CE on the kept voxels (``ops.losses.dice_ce``; the official medical code: Dice only),
L_sup nnU-Net's own deep-supervised Dice + CE on the labeled patches.

The weak/strong plumbing (strong views, CutMix of the teacher's logits, the un-mixed weak logits for the FP
target and for the collapse diagnostics) is the shared base trainer's ``strong_view`` path; the FP pass is the
base trainer's ``feature_perturbed_logits``. This file only turns the logits into the two terms.

Which teacher: the EMA teacher at 0.99 per step, as written (docs/methods/unimatch.md, "Changes for nnU-Net's
regime"); ``UniMatchConfig.paper()`` takes the network's own prediction (EMA decay 0: nnU-Net's networks have no
dropout and no BatchNorm, so the teacher then computes exactly the student's no-grad prediction of this step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.losses import dice_ce
from nnunet_proto.ops.strong_views import CUTMIX_P, FEATURE_DROPOUT, STRONG_INTENSITY_P

#: UniMatch's ACDC confidence threshold (configs/acdc.yaml ``conf_thresh``)
UNIMATCH_ACDC_THRESHOLD = 0.95
#: ``unlabeled_loss`` choices: nnU-Net's Dice + CE, or UniMatch's medical Dice (all classes, squared denominator)
UNLABELED_LOSSES = ("dice_ce", "dice")


@dataclass(frozen=True)
class UniMatchConfig(SemiSupervisedConfig):
    """UniMatch settings (defaults: ours for nnU-Net; :meth:`paper` = the official ACDC code).

    Attributes:
        num_strong_views: strong views per unlabeled patch (UniMatch 2; 1 = FixMatch with CutMix + FP).
        fp_dropout: channel-dropout rate of the feature-perturbation stream (UniMatch ``nn.Dropout2d(0.5)``).
        fp_weight: weight of the FP term relative to the strong term (UniMatch: 0.5 vs 0.25 + 0.25, i.e. 1);
            0 drops the FP pass (and its cost).
        unlabeled_loss: ``"dice_ce"`` (nnU-Net's batch Dice without background + CE, weights 1:1) or ``"dice"``
            (UniMatch's medical DiceLoss: batch Dice over all classes with squared prediction sums, no CE).
        Inherited, changed: ``strong_view`` True (required), ``w_max`` 1.0 (weight of the strong term; UniMatch's
            0.25 + 0.25 of its halved supervised loss (CE + Dice)/2, i.e. 1 relative to nnU-Net's CE + Dice),
            ``rampup_length`` 0.1 (sigmoid ramp over the first 10 % of the run; UniMatch: none),
            ``pseudo_label_threshold`` 0.95 (UniMatch's ACDC τ). Kept: EMA teacher 0.99 with warm-up; no
            ``reference_steps``, so the decay is used as written (a 100-step horizon, not rescaled to the run).
    """

    strong_view: bool = True
    w_max: float = 1.0
    rampup_length: float = 0.1
    pseudo_label_threshold: float = UNIMATCH_ACDC_THRESHOLD
    num_strong_views: int = 2
    fp_dropout: float = FEATURE_DROPOUT
    fp_weight: float = 1.0
    unlabeled_loss: str = "dice_ce"

    @classmethod
    def paper(cls, **changes: Any) -> "UniMatchConfig":
        """The official ACDC code's form: pseudo labels from the network itself (EMA decay 0, no warm-up), τ 0.95,
        constant weights (no ramp), UniMatch's Dice-only unlabeled loss, two strong views, FP dropout 0.5, strong
        intensity p 0.8, CutMix p 0.5."""
        return cls(**{"ema_decay": 0.0, "ema_warmup": False, "time_constants": "paper", "w_max": 1.0,
                      "rampup_length": 0.0, "pseudo_label_threshold": UNIMATCH_ACDC_THRESHOLD,
                      "num_strong_views": 2, "fp_dropout": FEATURE_DROPOUT, "fp_weight": 1.0,
                      "unlabeled_loss": "dice", "strong_intensity_p": STRONG_INTENSITY_P, "cutmix_p": CUTMIX_P,
                      **changes})

    def validate(self) -> None:
        super().validate()
        if not self.strong_view:
            raise ValueError("UniMatch needs strong_view=True: its student learns the weak view's pseudo labels on "
                             "strong views (without them it is self-training on the teacher's own view)")
        if not 1 <= self.num_strong_views <= 4:
            raise ValueError(f"num_strong_views must be in 1..4 (UniMatch: 2), got {self.num_strong_views}")
        if not 0.0 <= self.fp_dropout < 1.0:
            raise ValueError(f"fp_dropout must be in [0, 1) (UniMatch: 0.5), got {self.fp_dropout}")
        if self.fp_weight < 0:
            raise ValueError(f"fp_weight must be >= 0, got {self.fp_weight}")
        if self.unlabeled_loss not in UNLABELED_LOSSES:
            raise ValueError(f"unlabeled_loss must be one of {UNLABELED_LOSSES}, got {self.unlabeled_loss!r}")


class UniMatch(SemiSupervisedMethod):
    """Hard, gated weak-view pseudo labels; Dice + CE on the strong views and on the feature-perturbed weak view."""

    config_class = UniMatchConfig
    term_names = ("strong", "fp")
    needs_features = False
    diagnostic_names = ("strong_kept",)

    @property
    def num_strong_views(self) -> int:
        return self.config.num_strong_views

    @property
    def feature_dropout(self) -> Optional[float]:
        return self.config.fp_dropout if self.config.fp_weight > 0 else None

    def unlabeled_loss(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """ℓ of the config (``ops.losses.dice_ce``) on the kept voxels."""
        if self.config.unlabeled_loss == "dice":
            return dice_ce(logits, labels, keep, ce_weight=0.0, include_background=True, squared_denominator=True)
        return dice_ce(logits, labels, keep)

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        weak = inputs.weak_teacher_logits_u
        if inputs.logits_u is None or inputs.teacher_logits_u is None or weak is None:
            raise ValueError("UniMatch needs the student's logits on the strong views and the teacher's on the weak "
                             "view (the base trainer's strong_view path)")
        k, b = self.num_strong_views, weak.shape[0]
        if inputs.logits_u.shape[0] != k * b or inputs.teacher_logits_u.shape[0] != k * b:
            raise ValueError(f"UniMatch expects {k} strong view(s) of the {b} unlabeled patches (student and mixed "
                             f"teacher logits of {k * b}); got {inputs.logits_u.shape[0]} and "
                             f"{inputs.teacher_logits_u.shape[0]}")
        mixed = self.gate_teacher(inputs.teacher_logits_u)  # per voxel: the gate of the mixed weak logits
        strong = torch.stack([
            self.unlabeled_loss(inputs.logits_u[i * b:(i + 1) * b], mixed.labels[i * b:(i + 1) * b],
                                mixed.keep[i * b:(i + 1) * b]) for i in range(k)]).mean()
        self.report(strong_kept=mixed.kept_fraction)
        if inputs.logits_fp_u is None:  # fp_weight 0: no FP pass, a zero term that keeps the graph
            fp = inputs.logits_u.sum() * 0.0
        else:
            pl = self.gate_teacher(weak)
            fp = self.unlabeled_loss(inputs.logits_fp_u, pl.labels, pl.keep)
        return {"strong": strong, "fp": fp}

    def weights(self, progress: float) -> Dict[str, float]:
        lam = self.config.ramp(progress)
        return {"strong": lam, "fp": self.config.fp_weight * lam}
