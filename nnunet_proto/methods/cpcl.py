"""CPCL: cyclic prototype consistency learning (Xu et al., IEEE JBHI 2022, arXiv 2109.13930); docs/methods/cpcl.md.

Paper gradient path (docs/methods/cpcl.md, 'Deviations'): the student's labeled features F_l carry
gradient; the teacher's unlabeled features F_u, probabilities P_u and pseudo labels Ŷ_u are constants.
(The official code detaches everything, so its prototype losses are inert; we implement the paper.)

* L2U, forward (Eq. 6): prototypes p_l = MAP(F_l, Y_l) classify F_u:
  P_l2u = softmax(α·cos(F_u, p_l)); L_fpc = mean (P_l2u − P_u)². Gradient: F_l → p_l.
* U2L, backward (Eqs. 8-10): prototypes p_u = MAP(F_u, onehot(argmax P_u)) classify F_l;
  L_bpc = CE(α·cos(F_l, p_u), Y_l) on the logits (the code's double softmax is not reproduced).
* Total (Eq. 11): L = L_sup + λ(t)·(L_fpc + β·L_bpc), λ(t) = 0.1·exp(−5(1 − t)²), β = 10, α = 20.

Multi-class (beyond the binary paper; docs/methods/cpcl.md): one prototype per class including
background, batch-averaged over the images in which the class is present; an absent class gets logit
−inf and its target voxels are ignored; the ignore label takes part in no prototype and no loss.

Changes for nnU-Net's regime (docs/methods/cpcl.md, "Changes for nnU-Net's regime"); ``CPCLConfig.paper()``
restores the paper's form:

* **Gated U2L pseudo labels.** Only unlabeled voxels whose teacher confidence reaches
  ``pseudo_label_threshold`` (0.9) of their argmax class build the unlabeled prototypes p_u
  (``ops.pseudo_labels``); the paper uses every voxel's argmax, so early in a short run the prototypes
  are averages over mostly wrong labels. The share kept is reported as the diagnostic ``u2l_kept``.
* **The student sees the unlabeled patches** (``student_unlabeled_features=True``): F_u comes from the
  student, with gradient, P_u and Ŷ_u still from the teacher. In the paper unlabeled data reaches the
  student only through C×D prototype vectors, a very narrow signal.
* **EMA horizon relative to the run** (base ``time_constants``): the paper's 0.99 over 20 000 iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.losses import cross_entropy_ignore, masked_mean
from nnunet_proto.ops.prototypes import (
    labels_to_onehot,
    masked_average_pooling,
    prototype_logits,
    prototype_targets,
    resize_masks,
)
from nnunet_proto.ops.pseudo_labels import confidence_gate

PROTOTYPE_REDUCTIONS = ("batch_mean", "pooled", "per_image")
#: CPCL paper (BraTS, KiTS): 20 000 iterations with EMA 0.99
CPCL_PAPER_ITERATIONS = 20_000


@dataclass(frozen=True)
class CPCLConfig(SemiSupervisedConfig):
    """CPCL hyperparameters (paper defaults).

    Attributes:
        alpha: cosine scale α of the prototype classifier (Eq. 4).
        beta: weight β of the backward (U2L) term (Eq. 11; Table III best 10).
        prototype_reduction: ``"batch_mean"`` (paper Eq. 3: mean of per-image prototypes),
            ``"pooled"`` (all voxels of the batch) or ``"per_image"`` (code: labeled image k pairs with
            unlabeled image k; needs equal labeled and unlabeled batch sizes).
        student_unlabeled_features: take F_u from the student (with gradient) instead of the teacher;
            P_u and Ŷ_u still come from the teacher. Default True (not in the paper: its student never
            sees an unlabeled patch); ``paper()`` sets False.
        pseudo_label_threshold: inherited; confidence gate of the U2L pseudo labels (0.9; paper 0 = ungated).
        reference_steps: 20 000 (the paper's iterations) for the run-relative EMA decay.
        feature_layer: inherited; default ``"decoder"`` (last decoder stage, full resolution).
            ``"bottleneck"`` is the paper's encoder bottleneck (prototypes at low resolution, the
            C-channel logits are upsampled), ``"decoder-2"`` the code's half-resolution stage.
    """

    alpha: float = 20.0
    beta: float = 10.0
    prototype_reduction: str = "batch_mean"
    student_unlabeled_features: bool = True
    reference_steps: Optional[int] = CPCL_PAPER_ITERATIONS

    @classmethod
    def paper(cls, **changes) -> "CPCLConfig":
        """The paper's form: teacher unlabeled features, ungated U2L argmax, EMA 0.99 as written."""
        return cls(**{"student_unlabeled_features": False, "pseudo_label_threshold": 0.0,
                      "time_constants": "paper", **changes})

    @classmethod
    def v1(cls) -> "CPCLConfig":
        """The form measured in the confirmation benchmark ``acdc_confirm_bf16`` (+2.2 Dice after postprocessing at
        4 labeled ACDC patients), every setting spelled out so that later changes of the defaults leave it as it
        was: ``nnUNetTrainerCPCL_v1``."""
        return cls(use_teacher=True, ema_decay=0.99, ema_warmup=True, unlabeled_batch_size=None,
                   unlabeled_sources=("split", "folder"), unlabeled_workers=None, feature_layer="decoder", w_max=0.1,
                   rampup="sigmoid", rampup_length=1.0, reference_steps=CPCL_PAPER_ITERATIONS,
                   time_constants="run_relative", min_decay=0.9, pseudo_label_threshold=0.9, threshold_mode="fixed",
                   seed=None, alpha=20.0, beta=10.0, prototype_reduction="batch_mean", student_unlabeled_features=True,
                   strong_view=False, ema_mode="follow", weight_band=None)

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("CPCL needs use_teacher=True (its unlabeled side comes from the EMA teacher)")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.prototype_reduction not in PROTOTYPE_REDUCTIONS:
            raise ValueError(f"prototype_reduction must be one of {PROTOTYPE_REDUCTIONS}, "
                             f"got {self.prototype_reduction!r}")


def cpcl_losses(feats_l: torch.Tensor, target_l: torch.Tensor, feats_u: torch.Tensor, probs_u: torch.Tensor,
                num_classes: int, ignore_index, config: CPCLConfig, reduce_fn=None) -> Dict[str, torch.Tensor]:
    """The two CPCL terms, unweighted.

    Args:
        feats_l: (B_l, D, *s) student features of labeled patches (attached).
        target_l: (B_l, 1, *S) labels at full resolution.
        feats_u: (B_u, D, *s) features of unlabeled patches (teacher: constant; or student).
        probs_u: (B_u, C, *S) teacher softmax on unlabeled patches (constant).
    Returns: ``{"fpc": L2U MSE, "bpc": U2L CE, "u2l_kept": share of unlabeled voxels in p_u}``, float32
    scalars, finite for any input (``u2l_kept`` is detached, a diagnostic).
    """
    if config.prototype_reduction == "per_image" and feats_l.shape[0] != feats_u.shape[0]:
        raise ValueError(f"prototype_reduction='per_image' pairs labeled image k with unlabeled image k and "
                         f"needs equal batch sizes, got {feats_l.shape[0]} labeled and {feats_u.shape[0]} "
                         f"unlabeled; use 'batch_mean' or set unlabeled_batch_size to the labeled batch size")
    probs_u = probs_u.float().detach()
    full_size = tuple(target_l.shape[2:])
    feat_size = tuple(feats_l.shape[2:])

    # labeled prototypes from ground truth (ignore label and padding excluded)
    onehot_l = labels_to_onehot(target_l, num_classes, ignore_index)
    protos_l = masked_average_pooling(feats_l, resize_masks(onehot_l, feat_size),
                                      config.prototype_reduction, reduce_fn)

    # L2U: labeled prototypes classify the unlabeled features; match the teacher's softmax
    p_l2u = torch.softmax(prototype_logits(feats_u, protos_l, config.alpha, full_size), dim=1)
    has_proto_l = protos_l.valid.any(dim=-1).float()  # (B,) or scalar: images with no prototype give 0
    if has_proto_l.dim() == 0:
        has_proto_l = has_proto_l.expand(feats_u.shape[0])
    fpc = masked_mean((p_l2u - probs_u) ** 2, has_proto_l.view(-1, *([1] * (probs_u.dim() - 1))))

    # U2L: prototypes of the unlabeled features under the teacher's confident pseudo labels classify F_l
    pl = confidence_gate(probs_u, config.pseudo_label_threshold, config.threshold_mode, keep=config.pseudo_label_keep)
    onehot_u = labels_to_onehot(pl.labels, num_classes) * pl.keep
    protos_u = masked_average_pooling(feats_u, resize_masks(onehot_u, tuple(feats_u.shape[2:])),
                                      config.prototype_reduction, reduce_fn)
    logits_u2l = prototype_logits(feats_l, protos_u, config.alpha, full_size)
    bpc = cross_entropy_ignore(logits_u2l, prototype_targets(target_l, protos_u.valid, num_classes, ignore_index))
    return {"fpc": fpc, "bpc": bpc, "u2l_kept": pl.kept_fraction}


class CPCL(SemiSupervisedMethod):
    config_class = CPCLConfig
    term_names = ("fpc", "bpc")
    needs_features = True
    diagnostic_names = ("u2l_kept",)

    @property
    def student_sees_unlabeled(self) -> bool:
        # paper: the student sees labeled patches only; unlabeled data enters through the teacher
        return self.config.student_unlabeled_features

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        if inputs.feats_l is None or inputs.teacher_logits_u is None:
            raise ValueError("CPCL needs student labeled features and teacher unlabeled logits")
        feats_u = inputs.feats_u if self.config.student_unlabeled_features else inputs.teacher_feats_u
        if feats_u is None:
            raise ValueError("CPCL needs unlabeled features (teacher, or student with student_unlabeled_features)")
        probs_u = torch.softmax(inputs.teacher_logits_u.float(), dim=1)
        out = cpcl_losses(inputs.feats_l, inputs.target_l, feats_u, probs_u, inputs.num_classes,
                          inputs.ignore_index, self.config, inputs.reduce_fn)
        self.report(u2l_kept=out.pop("u2l_kept"))
        return out

    def weights(self, progress: float) -> Dict[str, float]:
        lam = self.config.ramp(progress)
        return {"fpc": lam, "bpc": self.config.beta * lam}
