"""MPER: multi-prototype-based embedding refinement (Bi et al., ICASSP 2025) on bidirectional copy-paste.

Reference: docs/methods/mper.md (MPER, arXiv 2503.14343; BCP, arXiv 2305.00673). The paper is implemented;
each documented departure of the official code (docs/methods/mper.md, 'Deviations') is a config switch.

Two stages inside one nnU-Net run (paper §II):

1. **Pre-training** (until the student is ready, or the paper's first ``pretrain_fraction`` of the
   epochs with ``stage_switch="fixed"``): labeled-only copy-paste. Each
   labeled patch is the context for a box cut from its neighbour in the batch; loss = region CE +
   Dice of nnU-Net's head against the mixed ground truth (BCP), deep supervision kept.
2. **Self-training**: at the first self-training epoch the prototype bank is initialised by k-means on
   labeled voxel embeddings of the pre-trained student and the EMA teacher is reset to the student,
   so both start from the end of stage one. Each step (batch of B labeled and B unlabeled patches):

   * the teacher predicts the *un-mixed* unlabeled patches: pseudo label Ŷ^u = argmax, confidence = max softmax;
   * bidirectional copy-paste with one box M shared by the batch:
     X_in = X^l ⊙ M + X^u ⊙ (1 − M) and X_out = X^u ⊙ M + X^l_partner ⊙ (1 − M), mixed labels Ŷ^m likewise;
   * the student sees [X_in; X_out] (2B patches); z = its last decoder stage (full resolution, the
     input of nnU-Net's 1×1 "linear classifier");
   * L = L^l_cons + λ(t) (L^p_cons + γ L_cont) (Eq. 6), with
     L^l_cons = region CE + Dice of nnU-Net's head vs Ŷ^m (Eq. 4; deep supervision with nnU-Net's weights),
     L^p_cons = the same for the prototype classifier logit_c = max_k cos(z, p_c^k)/τ1 (Eqs. 1, 4; full resolution),
     L_cont = InfoNCE of z against all C·K prototypes, nearest prototype (of the voxel's class, or of
     any class in the paper) as positive, τ2 (Eq. 5);
     region weights 1 for ground-truth voxels, 0.5 for pseudo-labeled ones, 0 for the ignore label;
   * after the forward, no gradient: every prototype moves towards the mean of the voxels of its class
     that are closest to it, p ← η p + (1 − η) z̄ (Eq. 2), using labeled voxels and pseudo-labeled voxels
     with confidence > α.

Gradient: all three terms reach the student (linear head and decoder through z); the bank is a
buffer (never a parameter); the teacher's pseudo labels and confidences are constants.

Batches of any size: BCP splits a batch into halves a/b; here labeled patch i is paired with
unlabeled patch i for X_in, and unlabeled patch i with labeled patch (i + 1) mod B for X_out
(``ops.copy_paste.partner``), so every patch is used once as context and once as pasted box, for
B = 1, 2 or odd. Stage one pairs labeled patch i with labeled patch (i + 1) mod B.

Changes for nnU-Net's regime (docs/methods/mper.md, last section; ``MPERConfig.paper()`` restores the
paper's behaviour): the switch to stage two waits until nnU-Net's validation pseudo-Dice shows every
foreground class (floor and cap on the stage-one fraction; no teacher reset when the cap forces it);
pseudo labels are confidence-gated; the InfoNCE positive is the nearest prototype of the voxel's own
class; pseudo-background never updates background prototypes; the region Dice averages over the
foreground classes present in each region; EMA decay and η are run-relative; w_max 0.5 (ACDC code).

Opt-in options (issue 23, item 6; not validated yet, defaults unchanged; ``methods/stage_switch.py``):
``stage_switch="warm_start"`` skips stage one (the student is warm-started from a plain nnU-Net checkpoint with
nnU-Net's ``-pretrained_weights``; k-means and the teacher reset run at the start); ``stage_one_loss="plain"``
trains stage one with nnU-Net's own loss on the un-mixed labeled batch (the prototype terms are then not computed
in stage one: weight 0, value 0); ``unmixed_supervised_weight`` > 0 adds, in stage two, that weight × nnU-Net's
loss on the un-mixed labeled patches (term ``unmixed``, predicted in the same student forward as the mixed images;
the prototype terms and update use the mixed images only). ``nnUNetTrainerMPER_warm`` and
``nnUNetTrainerMPER_plainstage1`` switch them on.

In stage one the prototype terms are still computed (against the seeded random initial bank) with
weight 0, so the autograd graph is the same in both stages and the contract test can check their
gradient; their stage-one values are meaningless and the bank is not updated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from nnunet_proto.methods import stage_switch as stages
from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.methods.stage_switch import epochs_for, stage_one_bounds, switch_decision, validate_switch_config
from nnunet_proto.ops.components import largest_component_only
from nnunet_proto.ops.copy_paste import (  # MixGroup/MixedBatch live in ops (shared with BCP), re-exported here
    BCP_BOX_FRACTION,
    MixedBatch,
    MixGroup,
    copy_paste_batch,
    mixed_deep_supervision_loss,
    mixed_region_loss,
)
from nnunet_proto.ops.kmeans import ClassReservoir, broadcast_from_rank0_, kmeans_bank
from nnunet_proto.ops.multi_prototype import (
    CONTRAST_IGNORE_MODES,
    multi_prototype_dot,
    multi_prototype_logits,
    multi_prototype_similarity,
    nearest_prototype_infonce,
    update_bank,
)

#: MPER paper §III.A: pre-training / self-training iterations, LA (3D) 2k + 15k, ACDC (2D) 10k + 30k
PAPER_PRETRAIN_FRACTION = {2: 10_000 / 40_000, 3: 2_000 / 17_000}
#: the paper's whole run (reference of the EMA decay) and its self-training stage (reference of the
#: prototype momentum, which only moves in stage two), in iterations
PAPER_RUN_STEPS = {2: 40_000, 3: 17_000}
PAPER_STAGE_TWO_STEPS = {2: 30_000, 3: 15_000}
#: MPER paper §III.A: γ = 0.02 (LA, 3D V-Net) and 0.1 (ACDC, 2D U-Net)
PAPER_GAMMA = {2: 0.1, 3: 0.02}
UPDATE_MODES = ("pooled", "per_region")
SIMILARITIES = ("cosine", "dot")
CONTRAST_POSITIVES = ("class", "any")


@dataclass(frozen=True)
class MPERConfig(SemiSupervisedConfig):
    """MPER hyperparameters: paper defaults; the official code's values as switches (docs/methods/mper.md).

    Inherited fields with MPER-specific defaults:
        ema_decay: 0.99; the paper only says "Mean Teacher", the code (LA and ACDC) uses 0.99.
        ema_warmup: False; BCP/MPER code blend at a constant 0.99 from the pre-trained copy;
            a warm-up would make the teacher copy the student again right after the reset.
        w_max: 0.5, the official ACDC code's maximum (``ACDC_train.py``), which produced the published ACDC
            numbers; the paper says "from 0 to 1" (Eq. 6) and the LA code uses 1.0 (``MPERConfig.paper()``).
            Ours for nnU-Net: the linear head is what nnU-Net predicts with, so the prototype classifier's
            consistency stays an auxiliary view at half the weight (not validated in 3D).
        reference_steps: ``None`` resolves by dimensionality to the paper's run, 40k (2D) / 17k (3D)
            iterations; the EMA decay is applied run-relative to it (``time_constants``).
        pseudo_label_threshold: the teacher's pseudo labels enter the mixed labels only where its max
            softmax ≥ this value; dropped voxels take part in no loss and no prototype update (ours,
            0.9 = the paper's α; paper and BCP: ungated argmax, 0). At the switch the student has just
            passed the readiness check, but its confidence is still low on the classes it learned last.
        rampup / rampup_length: sigmoid ramp over the whole **self-training stage** (λ(t) is measured from
            the stage switch; ``rampup_length`` is a fraction of stage two). Paper: "over the training
            period"; the LA code reaches 1 at 75 % of self-training, i.e. ``rampup_length=0.75``.
        feature_layer: must be ``"decoder"`` (the embedding z is the input of the linear classifier, paper §II).

    MPER fields:
        num_prototypes: K prototypes per class; paper 3 (Table V: best of 1-5).
        tau_proto: τ1 of the prototype classifier (Eq. 1); paper 0.1.
        tau_contrast: τ2 of the InfoNCE (Eq. 5); paper 0.1.
        gamma: weight γ of L_cont (Eq. 6). ``None`` resolves by dimensionality to the paper's values,
            0.1 for 2D (ACDC) and 0.02 for 3D (LA); the ACDC code used 0.001. We keep the
            paper's value because ``contrast_positive="class"`` removes what made L_cont harmful (pulling
            voxels into another class's cluster); with the paper's any-class positive, 0.001 is the safe
            choice.
        prototype_momentum: η of the prototype update (Eq. 2); paper 0.999, code 0.99. With
            ``time_constants="run_relative"`` it is applied relative to the self-training stage: the same
            horizon as a fraction of stage two as 1/(1 − 0.999) = 1000 of the paper's 30k (2D) / 15k (3D)
            stage-two iterations (``MPER.prototype_momentum``).
        contrast_positive: positive prototype of L_cont: ``"class"`` (ours) = the nearest prototype of
            the voxel's class in the mixed label Ŷ^m; ``"any"`` (paper Eq. 5, code) = the nearest of all
            C·K prototypes, whatever its class.
        update_background_from_pseudo: pseudo-labeled voxels may update background prototypes (paper).
            Default False (ours): background prototypes learn from ground-truth voxels only, because
            pseudo-background includes every foreground voxel the teacher missed (on ACDC the right
            ventricle of unlabeled images), which would pull the background prototypes onto it.
        confidence_threshold: α; pseudo-labeled voxels update prototypes only when the teacher's max
            softmax exceeds it; paper 0.9.
        update_background: update background prototypes too (paper: "each class"); the code never does
            (docs/methods/mper.md, 'Deviations').
        require_agreement: also require that the prototype classifier agrees with Ŷ^m before a voxel
            updates a prototype (code only). Default False: the paper uses all labeled voxels
            and the confident pseudo-labeled ones. (An earlier project spec proposed True; we follow the rule
            "paper by default" and flag it.)
        update_mode: ``"pooled"`` (paper: one momentum step per iteration from the pooled cluster means) or
            ``"per_region"`` (code: separate steps for the unlabeled region, then the labeled region, of
            each mixed batch: up to 4 steps per iteration).
        contrast_ignore: ``"none"`` (paper Eq. 5), ``"background"`` (drop voxels nearest to a
            background prototype) or ``"index0"`` (code: ``ignore_index=0``).
        contrast_similarity: ``"cosine"`` (code; Eq. 5 with the normalised vectors of Eq. 1, the same
            temperature 0.1 as τ1) or ``"dot"`` (Eq. 5 read literally as z·p on raw vectors;
            docs/methods/mper.md, 'Deviations').
        pretrain_fraction: fraction of the epochs spent in stage one. ``None`` resolves to the paper's
            iteration counts: 10k/(10k + 30k) = 0.25 for 2D (ACDC) and 2k/(2k + 15k) ≈ 0.118 for 3D (LA).
            The stage-one epoch count is ⌈fraction · epochs⌉, at most epochs − 1, so short runs reach stage two.
        box_fraction: edge of the pasted box as a fraction of each patch edge; BCP/paper 2/3.
        unlabeled_weight: weight of pseudo-labeled voxels in the mixed losses; BCP code ``u_weight`` 0.5
            (labeled voxels weigh 1).
        dice_smooth: smoothing of the region Dice; BCP's 3D ``mask_DiceLoss`` 1e-5.
        dice_include_background: the region Dice includes background (BCP/SSL4MIS convention). Default
            False (ours, nnU-Net's ``do_bg=False``).
        dice_present_only: the region Dice averages only over the classes present in the region's labels
            (ours, default True; BCP: all classes, False). An absent class otherwise adds a near-constant
            Dice loss of ~1 that dilutes the gradient of the present classes, and pushes the class to zero
            once it is nearly absent from the prediction (``ops.copy_paste.region_ce_dice``).
        pseudo_label_largest_component: keep only the largest connected component of each foreground class
            of the teacher's argmax (the rest becomes background) before the gate, as the MPER and BCP codes
            do; the paper does not mention it. Off by default (``ops/components.py``).
        stage_switch: ``"ready"`` (ours): stage two starts at the first epoch at which every foreground
            class reached ``ready_dice`` in nnU-Net's pseudo-Dice on its validation cases of the previous
            epoch, but not before ``min_pretrain_fraction`` and at the latest at ``max_pretrain_fraction``
            of the run; ``"fixed"`` (paper): at ``pretrain_fraction``. At the cap without readiness the
            switch happens without the teacher reset (the EMA teacher is kept instead of handing over a
            student that has not learned every class), and the log says so.
        ready_dice / min_pretrain_fraction / max_pretrain_fraction: 0.5 / 0.1 / 0.5 (ours). The paper's
            fixed 25 % is 250 steps of a 1000-step CPU run, after which the student's pseudo-Dice was ~0
            and its right ventricle never recovered.
        ready_epochs: readiness must hold on this many consecutive validations (ours: 2). nnU-Net's
            pseudo-Dice comes from a few random validation patches per epoch (10 batches in the
            benchmark), and the switch cannot be undone, so one lucky epoch must not trigger it.
        kmeans_batches: labeled training batches whose embeddings feed the k-means initialisation. The
            code makes one pass over its loader: 18 batches of 4 (LA) to 98 of 12 (ACDC); 20 nnU-Net
            batches cost a fraction of one epoch (forward only).
        kmeans_samples_per_class: bound on the embeddings clustered per class (our choice: 200k).
        kmeans_spherical: L2-normalise embeddings before k-means and before the momentum means (not in
            paper or code; our option). Default False (raw embeddings, code).
        kmeans_batch_size / kmeans_n_init: MiniBatchKMeans settings (its default batch 1024; n_init 3,
            its default before scikit-learn 1.4, which the official code ran with defaults).
        prototype_seed: seeds the reservoir, k-means, the fallback noise and the random stage-one bank
            (MPER's own generators only; the base config's ``seed``, None, leaves the global RNGs to
            nnU-Net or the benchmark, so runs with different seeds start differently).
        stage_one_loss: ``"copy_paste"`` (default: the paper's labeled copy-paste) or ``"plain"`` (ours, opt-in, not
            validated: nnU-Net's own loss on the un-mixed labeled batch in stage one).
        unmixed_supervised_weight: weight of nnU-Net's loss on the un-mixed labeled patches in stage two, beside
            the mixed terms (term ``unmixed``; 0 = off, the default; opt-in, not validated).
        ``stage_switch="warm_start"``: no stage one; the student is warm-started with nnU-Net's
            ``-pretrained_weights`` from a plain nnU-Net checkpoint (opt-in, not validated).
    """

    ema_decay: float = 0.99
    ema_warmup: bool = False
    w_max: float = 0.5
    rampup: str = "sigmoid"
    rampup_length: float = 1.0
    num_prototypes: int = 3
    tau_proto: float = 0.1
    tau_contrast: float = 0.1
    gamma: Optional[float] = None
    prototype_momentum: float = 0.999
    confidence_threshold: float = 0.9
    update_background: bool = True
    update_background_from_pseudo: bool = False
    require_agreement: bool = False
    update_mode: str = "pooled"
    contrast_ignore: str = "none"
    contrast_similarity: str = "cosine"
    contrast_positive: str = "class"
    pretrain_fraction: Optional[float] = None
    stage_switch: str = "ready"
    ready_dice: float = 0.5
    ready_epochs: int = 2
    min_pretrain_fraction: float = 0.1
    max_pretrain_fraction: float = 0.5
    box_fraction: float = BCP_BOX_FRACTION
    unlabeled_weight: float = 0.5
    dice_smooth: float = 1e-5
    dice_include_background: bool = False
    dice_present_only: bool = True
    pseudo_label_largest_component: bool = False
    kmeans_batches: int = 20
    kmeans_samples_per_class: int = 200_000
    kmeans_spherical: bool = False
    kmeans_batch_size: int = 1024
    kmeans_n_init: int = 3
    prototype_seed: int = 0
    stage_one_loss: str = "copy_paste"
    unmixed_supervised_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("MPER needs use_teacher=True (pseudo labels come from the EMA teacher)")
        if self.feature_layer != "decoder":
            raise ValueError(f"MPER's embedding is the last decoder stage (input of the linear classifier); "
                             f"feature_layer must be 'decoder', got {self.feature_layer!r}")
        if self.num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {self.num_prototypes}")
        for name in ("tau_proto", "tau_contrast", "dice_smooth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gamma is not None and self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 or None (paper value by dimensionality), got {self.gamma}")
        if not 0.0 <= self.prototype_momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {self.prototype_momentum}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got {self.update_mode!r}")
        if self.contrast_ignore not in CONTRAST_IGNORE_MODES:
            raise ValueError(f"contrast_ignore must be one of {CONTRAST_IGNORE_MODES}, got {self.contrast_ignore!r}")
        if self.contrast_similarity not in SIMILARITIES:
            raise ValueError(f"contrast_similarity must be one of {SIMILARITIES}, got {self.contrast_similarity!r}")
        if self.contrast_positive not in CONTRAST_POSITIVES:
            raise ValueError(f"contrast_positive must be one of {CONTRAST_POSITIVES}, got {self.contrast_positive!r}")
        validate_switch_config(self)
        if not 0.0 < self.box_fraction < 1.0:
            raise ValueError(f"box_fraction must be in (0, 1), got {self.box_fraction}; BCP uses 2/3")
        if self.unlabeled_weight < 0:
            raise ValueError(f"unlabeled_weight must be >= 0, got {self.unlabeled_weight}")
        if self.kmeans_batches < 1:
            raise ValueError(f"kmeans_batches must be >= 1, got {self.kmeans_batches}")
        if self.kmeans_samples_per_class < self.num_prototypes:
            raise ValueError(f"kmeans_samples_per_class ({self.kmeans_samples_per_class}) must be at least "
                             f"num_prototypes ({self.num_prototypes})")
        if self.kmeans_batch_size < 1 or self.kmeans_n_init < 1:
            raise ValueError(f"kmeans_batch_size and kmeans_n_init must be >= 1, got {self.kmeans_batch_size}, "
                             f"{self.kmeans_n_init}")

    @classmethod
    def paper(cls, **changes: Any) -> "MPERConfig":
        """The paper's literal behaviour where our nnU-Net defaults differ (docs/methods/mper.md, last section).

        Any-class InfoNCE positive, background prototypes updated from pseudo labels, BCP's region Dice
        over all classes, ungated argmax pseudo labels, the fixed stage switch, w_max 1 and per-step
        time constants.
        """
        literal = dict(contrast_positive="any", update_background_from_pseudo=True, dice_include_background=True,
                       dice_present_only=False, pseudo_label_threshold=0.0, stage_switch="fixed", w_max=1.0,
                       time_constants="paper")
        return cls(**{**literal, **changes})


@dataclass
class MPERStepInputs(StepInputs):
    """``StepInputs`` for MPER: ``feats_l``/``logits_l``/``target_l`` describe the *mixed* batch.

    ``feats_l`` is z ``(N, D, *S)`` of the student on ``batch.images`` (with gradient), ``logits_l`` its
    full-resolution linear logits and ``target_l`` = ``batch.targets[0]``.
    """

    batch: Optional[MixedBatch] = None


class MPER(SemiSupervisedMethod):
    """MPER terms ``proto_cons`` (L^p_cons) and ``contrast`` (L_cont); L^l_cons is the trainer's supervised loss.
    With ``unmixed_supervised_weight`` > 0 also the term ``unmixed``, which the trainer computes (nnU-Net's loss).

    State (saved in checkpoints): ``stage`` (1 or 2), ``stage_two_start`` (training progress at the
    switch), ``kmeans_done`` and the prototype ``bank`` ``(C, K, D)``.
    """

    config_class = MPERConfig
    term_names = ("proto_cons", "contrast")
    needs_features = True
    #: per-step values logged every epoch: the stage (1 or 2, shows the switch in progress.png) and the
    #: prototype momentum η in use (run-relative; 0 in stage one, where the bank does not move)
    diagnostic_names = ("stage", "prototype_momentum")

    def __init__(self, config: MPERConfig):
        super().__init__(config)
        self.term_names = stages.with_unmixed_term(type(self).term_names, config)
        self.num_classes: Optional[int] = None
        self.embed_dim: Optional[int] = None
        self.spatial_dims: Optional[int] = None
        self.bank: Optional[torch.Tensor] = None
        self.stage = 1
        self.stage_two_start: Optional[float] = None
        self.kmeans_done = False
        self.kmeans_report: Dict[str, Any] = {}
        self.switch_report: Dict[str, Any] = {}

    # ------------------------------------------------------------------ setup and resolved settings
    def build_modules(self, feature_channels: Dict[str, int], num_classes: int, dim: int) -> None:
        """No trainable modules; records C, D and the dimensionality and creates the initial bank."""
        self.setup(num_classes, feature_channels[self.config.feature_layer], dim)
        return None

    def setup(self, num_classes: int, embed_dim: int, spatial_dims: int) -> None:
        """Record the problem size; the stage-one bank is seeded N(0, I) noise until k-means replaces it."""
        if num_classes < 2:
            raise ValueError(f"MPER needs at least 2 classes (background + foreground), got {num_classes}")
        if spatial_dims not in PAPER_GAMMA:
            raise ValueError(f"MPER supports 2D and 3D patches, got {spatial_dims} spatial dimensions")
        self.num_classes, self.embed_dim, self.spatial_dims = num_classes, embed_dim, spatial_dims
        shape = (num_classes, self.config.num_prototypes, embed_dim)
        if self.bank is None or tuple(self.bank.shape) != shape:
            gen = torch.Generator(device="cpu").manual_seed(self.config.prototype_seed)
            self.bank = torch.randn(*shape, generator=gen)

    def _require_setup(self) -> None:
        if self.spatial_dims is None or self.bank is None:
            raise RuntimeError("MPER is not set up: call setup(num_classes, embed_dim, spatial_dims) (the trainer "
                               "does it in initialize() through build_modules)")

    def _config_or_paper(self, value: Optional[float], paper: Mapping[int, float]) -> float:
        if value is not None:
            return value
        self._require_setup()
        return paper[self.spatial_dims]

    @property
    def gamma(self) -> float:
        """γ: the config value, or the paper's 0.1 (2D) / 0.02 (3D)."""
        return self._config_or_paper(self.config.gamma, PAPER_GAMMA)

    @property
    def pretrain_fraction(self) -> float:
        """Stage-one fraction: the config value, or the paper's 0.25 (2D) / 2/17 (3D); 0 for the warm start."""
        if stages.skips_stage_one(self.config):
            return 0.0
        return self._config_or_paper(self.config.pretrain_fraction, PAPER_PRETRAIN_FRACTION)

    def stage_one_epochs(self, num_epochs: int) -> int:
        """Paper's fixed stage one: ⌈pretrain_fraction · num_epochs⌉ epochs, at most num_epochs − 1."""
        return epochs_for(self.pretrain_fraction, num_epochs)

    def stage_one_bounds(self, num_epochs: int) -> Tuple[int, int]:
        """(first, last) epoch at which the readiness switch may / must start stage two (floor and cap)."""
        return stage_one_bounds(self.config, num_epochs)

    def resolved(self, num_epochs: int) -> Dict[str, Any]:
        """Values that depend on the dimensionality or the schedule, for logs and nnunet_proto_config.json."""
        out = {"gamma": self.gamma, "stage_switch": self.config.stage_switch, "bank_shape": list(self.bank.shape)}
        if self.config.stage_switch == "fixed":
            out.update(pretrain_fraction=self.pretrain_fraction, stage_one_epochs=self.stage_one_epochs(num_epochs))
        elif stages.skips_stage_one(self.config):
            out.update(stage_one_epochs=0)
        else:
            floor, cap = self.stage_one_bounds(num_epochs)
            out.update(ready_dice=self.config.ready_dice, stage_one_min_epochs=floor, stage_one_max_epochs=cap)
        if self.switch_report:
            out["switch"] = dict(self.switch_report)
        return out

    # ------------------------------------------------------------------ time constants
    @property
    def reference_steps(self) -> Optional[int]:
        """The paper's run length: ``config.reference_steps`` or 40k (2D) / 17k (3D); None before setup."""
        if self.config.reference_steps is not None:
            return self.config.reference_steps
        return PAPER_RUN_STEPS.get(self.spatial_dims) if self.spatial_dims is not None else None

    def resolve_decay(self, decay: float, reference_steps: Optional[int] = None,
                      run_steps: Optional[int] = None, mode: Optional[str] = None) -> float:
        """As the base method, with the paper's run length by dimensionality as the default reference."""
        ref = self.reference_steps if reference_steps is None else reference_steps
        return super().resolve_decay(decay, ref, run_steps, mode)

    def stage_two_steps(self) -> Optional[int]:
        """Optimiser steps of stage two in this run (known once the switch happened and the run length is set)."""
        if self.run_steps is None or self.stage_two_start is None:
            return None
        return max(1, round(self.run_steps * (1.0 - self.stage_two_start)))

    @property
    def prototype_momentum(self) -> float:
        """η of Eq. 2 for this run: the paper's η relative to its self-training stage (30k 2D, 15k 3D).

        The horizon 1/(1 − η) keeps the same fraction of stage two as in the paper. Before the switch
        (stage-two length unknown) and with ``time_constants="paper"`` it is the configured η.
        """
        cfg, steps = self.config, self.stage_two_steps()
        if steps is None or self.spatial_dims is None:
            return cfg.prototype_momentum
        if cfg.reference_steps is None:
            ref = PAPER_STAGE_TWO_STEPS[self.spatial_dims]
        else:  # a user-given run length: its self-training share as in the paper
            ref = max(1, round(cfg.reference_steps * (1.0 - PAPER_PRETRAIN_FRACTION[self.spatial_dims])))
        return self.resolve_decay(cfg.prototype_momentum, reference_steps=ref, run_steps=steps)

    def time_constants(self) -> Dict[str, Any]:
        """The EMA decay (relative to the paper's whole run) plus η (relative to its self-training stage)."""
        out = super().time_constants()
        out["reference_steps"] = self.reference_steps
        out["prototype_momentum_paper"] = self.config.prototype_momentum
        steps = self.stage_two_steps()
        out["stage_two_steps"] = steps
        out["prototype_momentum"] = self.prototype_momentum if steps is not None else "resolved at the stage switch"
        return out

    # ------------------------------------------------------------------ stage switch
    def switch_decision(self, epoch: int, num_epochs: int,
                        history: Optional[Sequence[Sequence[float]]] = None) -> Optional[Dict[str, Any]]:
        """Whether stage two starts at the beginning of ``epoch`` (``methods.stage_switch.switch_decision``);
        None = not yet, or already switched."""
        if self.stage != 1:
            return None
        return switch_decision(self.config, epoch, num_epochs, self.pretrain_fraction, history)

    def new_reservoir(self, ignore_index: Optional[int]) -> ClassReservoir:
        """An empty bounded, seeded sample of labeled embeddings for ``begin_self_training``."""
        self._require_setup()
        return ClassReservoir(self.num_classes, self.config.kmeans_samples_per_class, self.config.prototype_seed,
                              ignore_index)

    def begin_self_training(self, reservoir: ClassReservoir, progress: float,
                            device: Optional[torch.device] = None,
                            decision: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """k-means initialisation of the bank and switch to stage two (once). Returns a short report.

        The bank is identical on every DDP rank (rank 0's result is broadcast). ``decision`` (from
        ``switch_decision``) is kept in the method state and the resolved config.
        """
        self._require_setup()
        if self.stage != 1 or self.kmeans_done:
            raise RuntimeError("MPER is already in stage two; the stage switch (k-means + teacher reset) must happen "
                               "once. Was the method state restored from a checkpoint?")
        cfg = self.config
        bank, report = kmeans_bank(reservoir.samples(), cfg.num_prototypes, self.bank, cfg.prototype_seed,
                                   cfg.kmeans_batch_size, cfg.kmeans_n_init, cfg.kmeans_spherical)
        device = device if device is not None else self.bank.device
        self.bank = broadcast_from_rank0_(bank.to(device))
        self.stage, self.kmeans_done, self.stage_two_start = 2, True, float(progress)
        self.switch_report = {**(dict(decision) if decision else {}), "progress": float(progress)}
        self.kmeans_report = {**report, "samples_per_class": [int(s.shape[0]) for s in reservoir.samples()],
                              "voxels_seen_per_class": [int(n) for n in reservoir.seen]}
        return dict(self.kmeans_report)

    # ------------------------------------------------------------------ copy-paste batch
    def make_batch(self, data_l: torch.Tensor, targets_l: Sequence[torch.Tensor],
                   data_u: Optional[torch.Tensor] = None, teacher_logits_u: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> MixedBatch:
        """Copy-paste mixing of the network inputs after nnU-Net's augmentation (BCP; docs/methods/mper.md).

        Args:
            data_l: ``(B, C_in, *S)`` labeled patches; targets_l: their labels per deep-supervision scale,
                ``(B, 1, *S_s)``, full resolution first (nnU-Net's target list).
            data_u: ``(B, C_in, *S)`` unlabeled patches; teacher_logits_u: the teacher's full-resolution
                logits on them (no gradient). Both required in stage two, ignored in stage one.
            generator: CPU generator for the box position (replayable); global RNG when None.
        """
        self._require_setup()
        if self.stage == 1:
            return copy_paste_batch(data_l, targets_l, box_fraction=self.config.box_fraction, generator=generator)
        if data_u is None or teacher_logits_u is None:
            raise ValueError("stage two needs the unlabeled patches and the teacher's logits on them")
        with torch.no_grad(), torch.autocast(device_type=data_l.device.type, enabled=False):
            gate = self.gate_teacher(teacher_logits_u)  # the config's gate (threshold_mode), as in the diagnostics
        # voxels below the confidence gate get DROPPED_LABEL (−1): no loss, no prototype update (BCP: ungated)
        labels = (largest_component_only(gate.labels, teacher_logits_u.shape[1])
                  if self.config.pseudo_label_largest_component else gate.labels)
        return copy_paste_batch(data_l, targets_l, data_u, labels, gate.confidence, keep=gate.keep,
                                box_fraction=self.config.box_fraction, unlabeled_weight=self.config.unlabeled_weight,
                                generator=generator)

    # ------------------------------------------------------------------ losses
    def mixed_region_loss(self, logits: torch.Tensor, target: torch.Tensor, box_mask: torch.Tensor,
                          groups: Sequence[MixGroup], ignore_index: Optional[int]) -> torch.Tensor:
        """Σ_groups [w_context (CE + Dice)(region M) + w_patch (CE + Dice)(region 1 − M)] (BCP mix_loss, Eq. 4).

        ``logits`` ``(N, C, *S)`` (gradient), ``target`` ``(N, 1, *S)`` and ``box_mask`` ``(1, 1, *S)`` constants.
        """
        cfg = self.config
        return mixed_region_loss(logits, target, box_mask, groups, ignore_index, cfg.dice_smooth,
                                 cfg.dice_include_background, cfg.dice_present_only)

    def linear_consistency(self, outputs: Sequence[torch.Tensor], batch: MixedBatch,
                           scale_weights: Sequence[float], ignore_index: Optional[int]) -> torch.Tensor:
        """L^l_cons: nnU-Net's head against the mixed labels at every deep-supervision scale.

        ``outputs`` are the student's logits per scale (full resolution first), ``scale_weights`` nnU-Net's
        deep-supervision weights (scales with weight 0 are skipped, as nnU-Net's wrapper does; the
        weights do not depend on the data). In stage one this is BCP's labeled copy-paste loss.
        """
        cfg = self.config
        return mixed_deep_supervision_loss(outputs, batch, scale_weights, ignore_index, None, cfg.dice_smooth,
                                           cfg.dice_include_background, cfg.dice_present_only)

    def _valid_voxels(self, target: torch.Tensor, ignore_index: Optional[int]) -> torch.Tensor:
        t = target.long()
        keep = (t >= 0) & (t < self.num_classes)
        if ignore_index is not None:
            keep &= t != ignore_index
        return keep

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        """L^p_cons and L_cont on the full-resolution embedding of the mixed batch (paper Eqs. 1, 4, 5).

        Returns float32 scalars, finite for any input (empty classes/regions give 0).
        """
        if not isinstance(inputs, MPERStepInputs) or inputs.batch is None or inputs.feats_l is None:
            raise ValueError("MPER.losses needs MPERStepInputs with the mixed batch and the student's embeddings "
                             "(nnUNetTrainerMPER.compute_loss builds them)")
        self._require_setup()
        z, batch, cfg = inputs.feats_l, inputs.batch, self.config
        target = batch.targets[0]
        if tuple(z.shape[2:]) != tuple(target.shape[2:]):
            raise ValueError(f"embeddings {tuple(z.shape)} must have the resolution of the mixed labels "
                             f"{tuple(target.shape)}")
        self.bank = self.bank.to(z.device)
        sim = multi_prototype_similarity(z, self.bank)  # (N, C, K, *S)
        logits_p, _ = multi_prototype_logits(sim, cfg.tau_proto)
        proto_cons = self.mixed_region_loss(logits_p, target, batch.box_masks[0], batch.groups, inputs.ignore_index)

        keep = self._valid_voxels(target, inputs.ignore_index)
        sim_c = sim if cfg.contrast_similarity == "cosine" else multi_prototype_dot(z, self.bank)
        labels = target if cfg.contrast_positive == "class" else None
        contrast = sim.new_zeros(())
        for g in batch.groups:  # one InfoNCE mean per mixed image set, summed like the consistency terms
            contrast = contrast + nearest_prototype_infonce(
                sim_c[g.start:g.stop], cfg.tau_contrast, keep[g.start:g.stop], cfg.contrast_ignore,
                labels[g.start:g.stop] if labels is not None else None)
        self.report(stage=float(self.stage), prototype_momentum=self.prototype_momentum if self.stage == 2 else 0.0)
        return {"proto_cons": proto_cons, "contrast": contrast}

    @torch.no_grad()
    def update_prototypes(self, inputs: MPERStepInputs) -> int:
        """Momentum update of the bank from the current mixed batch (stage two only; Eq. 2).

        Sources (paper): voxels labeled by ground truth, plus pseudo-labeled voxels whose teacher
        confidence exceeds α; ignore-label and gated-out voxels never. ``update_background_from_pseudo=False``
        (default) keeps pseudo-background out; ``require_agreement`` adds the code's gate (prototype
        classifier agrees with Ŷ^m); ``update_background=False`` freezes class 0 (code). η is
        ``prototype_momentum`` (run-relative).
        Returns the number of voxels used on this rank (0 in stage one, where nothing moves).
        """
        if self.stage != 2:
            return 0
        batch, cfg = inputs.batch, self.config
        z = inputs.feats_l.detach()
        if cfg.kmeans_spherical:
            z = torch.nn.functional.normalize(z.float(), dim=1, eps=1e-6)
        target = batch.targets[0]
        keep = self._valid_voxels(target, inputs.ignore_index)
        labeled = keep & ~batch.from_pseudo
        confident = keep & batch.from_pseudo & (batch.confidence > cfg.confidence_threshold)
        if not cfg.update_background_from_pseudo:  # pseudo-background holds the foreground the teacher missed
            confident &= target.long() != 0
        if cfg.require_agreement:
            logits_p, _ = multi_prototype_logits(multi_prototype_similarity(z, self.bank), cfg.tau_proto)
            agree = logits_p.argmax(dim=1, keepdim=True) == target.long()
            labeled, confident = labeled & agree, confident & agree
        classes = torch.ones(self.num_classes, dtype=torch.bool, device=z.device)
        if not cfg.update_background:
            classes[0] = False
        if cfg.update_mode == "pooled":
            selections = [labeled | confident]
        else:  # code order: unlabeled region, then labeled region, of each mixed image set
            selections = []
            for g in batch.groups:
                in_group = torch.zeros_like(keep)
                in_group[g.start:g.stop] = True
                selections += [confident & in_group, labeled & in_group]
        used = 0
        bank = self.bank.to(z.device)
        momentum = self.prototype_momentum
        for select in selections:
            bank, n = update_bank(bank, z, target, select, momentum, classes, inputs.reduce_fn)
            used += n
        self.bank = bank
        return used

    def weights(self, progress: float) -> Dict[str, float]:
        """0 in stage one; λ(t) and γ·λ(t) in stage two, t measured from the stage switch (Eq. 6); and
        ``unmixed_supervised_weight`` for ``unmixed`` in stage two when that option is on."""
        extra = stages.unmixed_weight(self.config, self.stage)
        if self.stage == 1 or self.stage_two_start is None:
            return {"proto_cons": 0.0, "contrast": 0.0, **extra}
        start = self.stage_two_start
        t = (progress - start) / (1.0 - start) if start < 1.0 else 1.0
        lam = self.config.ramp(min(max(t, 0.0), 1.0))
        return {"proto_cons": lam, "contrast": self.gamma * lam, **extra}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "stage_two_start": self.stage_two_start, "kmeans_done": self.kmeans_done,
                "kmeans_report": dict(self.kmeans_report), "switch_report": dict(self.switch_report),
                "bank": self.bank.detach().cpu().clone() if self.bank is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"stage", "stage_two_start", "kmeans_done", "bank"} - set(state)
        if missing:
            raise ValueError(f"MPER method state lacks {sorted(missing)} (keys: {sorted(state)}); was the checkpoint "
                             f"written by another method?")
        if state["stage"] not in (1, 2):
            raise ValueError(f"MPER stage must be 1 or 2, got {state['stage']!r}")
        bank = state["bank"]
        if bank is not None and self.bank is not None and tuple(bank.shape) != tuple(self.bank.shape):
            raise ValueError(f"checkpoint prototype bank {tuple(bank.shape)} does not match this network and config "
                             f"{tuple(self.bank.shape)} (classes x num_prototypes x embedding channels)")
        device = self.bank.device if self.bank is not None else torch.device("cpu")
        self.stage = int(state["stage"])
        self.stage_two_start = state["stage_two_start"]
        self.kmeans_done = bool(state["kmeans_done"])
        self.kmeans_report = dict(state.get("kmeans_report", {}))
        self.switch_report = dict(state.get("switch_report", {}))
        self.bank = bank.detach().clone().to(device) if bank is not None else self.bank

