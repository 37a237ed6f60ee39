"""BCP: bidirectional copy-paste with a mean teacher (Bai et al., "Bidirectional Copy-Paste for
Semi-Supervised Medical Image Segmentation", CVPR 2023, arXiv 2305.00673).

Two stages inside one nnU-Net run:

1. **Pre-training** (until the student is ready, ``stage_switch="ready"``, or the first ``pretrain_fraction``
   of the epochs, ``"fixed"``; ``methods/stage_switch.py``): labeled-only copy-paste. Labeled
   patch i is the context for a box cut from labeled patch (i + 1) mod B; loss = ½ Σ_regions (CE + Dice)
   of nnU-Net's head against the mixed ground truth, with nnU-Net's deep supervision.
2. **Self-training**: at the switch the EMA teacher is reset to the pre-trained student (BCP: both start
   from the pre-trained model). Each step, with one box M shared by the batch (M = 1 outside the box):

   * the teacher predicts the *un-mixed* unlabeled patches: Ŷ^u = argmax, confidence = max softmax;
   * X_in = X^l ⊙ M + X^u ⊙ (1 − M) and X_out = X^u ⊙ M + X^l_partner ⊙ (1 − M), labels mixed likewise;
   * L = L_sup + w_u · L_pseudo with
     L_sup = ½ Σ (CE + Dice) over the ground-truth regions (M of X_in, 1 − M of X_out),
     L_pseudo = ½ Σ (CE + Dice) over the pseudo-labeled regions (1 − M of X_in, M of X_out),
     w_u = 0.5 (BCP ``u_weight``), summed over both mixed images and nnU-Net's deep-supervision scales.
     This is exactly BCP's ``mix_loss`` (region weights 1 and u_weight), split in two so that the
     unlabeled part is logged and weighted as a term of its own.

Gradient: both terms reach the student; the teacher's pseudo labels are constants.

Changes for nnU-Net's regime (docs/methods/bcp.md; ``BCPConfig.paper()`` restores the paper's form):

* pseudo labels are confidence-gated (``pseudo_label_threshold`` 0.9; BCP takes the plain argmax and,
  on ACDC, the largest connected component per class); dropped voxels belong to no region;
* the EMA decay 0.99 is rescaled to this run (``time_constants``): BCP used it over its self-training
  iterations (ACDC 30k, LA 15k), so the reference is the paper's self-training length and the run length
  is this run's self-training stage;
* the switch waits until every foreground class reaches pseudo-Dice 0.5 on nnU-Net's validation cases in two
  consecutive epochs, between 10 % and 50 % of the run (BCP: after a fixed 10k of 40k / 2k of 17k iterations;
  ``stage_switch="fixed"``); unready at the cap, the teacher is not reset to the student;
* the region Dice averages over the foreground classes present in each region's labels (MPER's convention
  here; BCP: all classes incl. background, where absent classes add a constant ~1 that dilutes the gradient).

Opt-in options (issue 23, item 6; not validated yet, defaults unchanged; ``methods/stage_switch.py``):
``stage_switch="warm_start"`` skips stage one (the student is warm-started from a plain nnU-Net checkpoint with
nnU-Net's ``-pretrained_weights``, the teacher is reset to it at the start); ``stage_one_loss="plain"`` trains
stage one with nnU-Net's own loss on the un-mixed labeled batch; ``unmixed_supervised_weight`` > 0 adds, in
stage two, that weight × nnU-Net's loss on the un-mixed labeled patches (term ``unmixed``, predicted in the same
student forward as the mixed images). ``nnUNetTrainerBCP_warm`` and ``nnUNetTrainerBCP_plainstage1`` switch them on.

Batches of any size: labeled patch i pairs with unlabeled patch i (``ops.copy_paste.partner``), so B = 1,
2 or odd all work. The shared copy-paste pieces are in ``nnunet_proto/ops/copy_paste.py`` (also used by MPER).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunet_proto.methods import stage_switch as stages
from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.methods.stage_switch import epochs_for, stage_one_bounds, switch_decision, validate_switch_config
from nnunet_proto.ops.components import largest_component_only
from nnunet_proto.ops.copy_paste import (
    BCP_BOX_FRACTION,
    MixedBatch,
    bidirectional_groups,
    copy_paste_batch,
    mixed_deep_supervision_loss,
)

#: BCP §4.1 / official code (authors' confirmation in the repository's issue #10): pre-training and
#: self-training iterations, ACDC (2D) 10k + 30k, LA (3D) 2k + 15k
PAPER_PRETRAIN_STEPS = {2: 10_000, 3: 2_000}
PAPER_SELF_TRAINING_STEPS = {2: 30_000, 3: 15_000}
#: BCP's mix_loss averages CE and Dice: (Dice + CE) / 2 per mixed image
BCP_LOSS_SCALE = 0.5


@dataclass(frozen=True)
class BCPConfig(SemiSupervisedConfig):
    """BCP hyperparameters (paper / official code defaults unless said otherwise).

    Inherited fields with BCP-specific defaults:
        ema_decay: 0.99 (code); ema_warmup False (the teacher starts as a copy of the pre-trained student
            and is blended at a constant rate).
        w_max: 0.5, the weight of the pseudo-labeled regions (code ``u_weight``); constant from the switch
            (``rampup_length`` 0 = no ramp, as in BCP). A ramp over the self-training stage is possible
            with ``rampup_length`` > 0 (fraction of stage two).
        pseudo_label_threshold: 0.9, confidence gate of the pseudo labels (BCP: 0, ungated argmax).
        reference_steps: ``None`` = the paper's self-training iterations by dimensionality (30k 2D, 15k 3D);
            the EMA horizon is rescaled to this run's self-training stage.

    BCP fields:
        stage_switch / ready_dice / ready_epochs / min_pretrain_fraction / max_pretrain_fraction: when
            stage two starts (``nnunet_proto/methods/stage_switch.py``): ``"ready"`` (ours, as MPER: every
            foreground class at validation pseudo-Dice ≥ 0.5 in 2 consecutive epochs, between 10 % and 50 % of
            the run) or ``"fixed"`` (paper) at ``pretrain_fraction``.
        pretrain_fraction: stage-one share of the ``"fixed"`` switch; ``None`` = the paper's 10k / 40k = 0.25
            (2D) and 2k / 17k ≈ 0.118 (3D). At most epochs − 1 epochs, so stage two runs.
        box_fraction: edge of the pasted box as a fraction of each patch edge; 2/3.
        dice_smooth: smoothing of the region Dice (BCP 3D ``mask_DiceLoss`` 1e-5).
        dice_include_background / dice_present_only: which classes the region Dice averages over. Ours
            (as MPER): foreground classes present in the region's labels (False / True). BCP: all classes
            including background (True / False); a class absent from a region then adds a near-constant
            Dice loss of ~1 that dilutes the gradient of the present ones.
        pseudo_label_largest_component: keep only the largest connected component of each foreground class
            of the teacher's argmax (the rest becomes background) before the gate, as BCP's code does
            (``get_ACDC_masks`` / ``get_cut_mask`` with ``nms=1``; the paper does not mention it). Off: the
            confidence gate alone (``ops/components.py``).
        stage_one_loss: ``"copy_paste"`` (default: BCP's labeled copy-paste) or ``"plain"`` (ours, opt-in, not
            validated: nnU-Net's own loss on the un-mixed labeled batch in stage one).
        unmixed_supervised_weight: weight of nnU-Net's loss on the un-mixed labeled patches in stage two, beside
            the mixed terms (term ``unmixed``; 0 = off, the default; opt-in, not validated).
        ``stage_switch="warm_start"``: no stage one; the student is warm-started with nnU-Net's
            ``-pretrained_weights`` from a plain nnU-Net checkpoint (opt-in, not validated).
    """

    ema_decay: float = 0.99
    ema_warmup: bool = False
    w_max: float = 0.5
    rampup_length: float = 0.0
    reference_steps: Optional[int] = None
    pretrain_fraction: Optional[float] = None
    stage_switch: str = "ready"
    ready_dice: float = 0.5
    ready_epochs: int = 2
    min_pretrain_fraction: float = 0.1
    max_pretrain_fraction: float = 0.5
    box_fraction: float = BCP_BOX_FRACTION
    dice_smooth: float = 1e-5
    dice_include_background: bool = False
    dice_present_only: bool = True
    pseudo_label_largest_component: bool = False
    stage_one_loss: str = "copy_paste"
    unmixed_supervised_weight: float = 0.0

    @classmethod
    def paper(cls, **changes) -> "BCPConfig":
        """The paper's form: ungated argmax pseudo labels, EMA 0.99 as written, the switch after a fixed share
        of the run, the region Dice over all classes including background."""
        return cls(**{"pseudo_label_threshold": 0.0, "time_constants": "paper", "stage_switch": "fixed",
                      "dice_include_background": True, "dice_present_only": False, **changes})

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("BCP needs use_teacher=True (pseudo labels come from the EMA teacher)")
        validate_switch_config(self)
        if not 0.0 < self.box_fraction < 1.0:
            raise ValueError(f"box_fraction must be in (0, 1), got {self.box_fraction}; BCP uses 2/3")
        if self.dice_smooth <= 0:
            raise ValueError(f"dice_smooth must be > 0, got {self.dice_smooth}")


@dataclass
class BCPStepInputs(StepInputs):
    """``StepInputs`` for BCP: the mixed batch, the student's outputs on it per deep-supervision scale
    (full resolution first) and nnU-Net's deep-supervision weights."""

    batch: Optional[MixedBatch] = None
    outputs: List[torch.Tensor] = field(default_factory=list)
    scale_weights: Sequence[float] = (1.0,)


class BCP(SemiSupervisedMethod):
    """BCP term ``pseudo`` (pseudo-labeled regions); the ground-truth regions are the trainer's supervised loss.
    With ``unmixed_supervised_weight`` > 0 also the term ``unmixed``, which the trainer computes (nnU-Net's loss).

    State (saved in checkpoints): ``stage`` (1 or 2), ``stage_two_start`` (training progress at the switch) and
    ``switch_report`` (the switch decision).
    """

    config_class = BCPConfig
    term_names = ("pseudo",)
    needs_features = False

    def __init__(self, config: BCPConfig):
        super().__init__(config)
        self.term_names = stages.with_unmixed_term(type(self).term_names, config)
        self.spatial_dims: Optional[int] = None
        self.stage = 1
        self.stage_two_start: Optional[float] = None
        self.switch_report: Dict[str, Any] = {}

    def build_modules(self, feature_channels: Dict[str, int], num_classes: int, dim: int) -> None:
        """No trainable modules; records the dimensionality (paper schedule: 2D ACDC or 3D LA)."""
        if dim not in PAPER_PRETRAIN_STEPS:
            raise ValueError(f"BCP supports 2D and 3D patches, got {dim} spatial dimensions")
        self.spatial_dims = dim
        return None

    # ------------------------------------------------------------------ schedule
    @property
    def pretrain_fraction(self) -> float:
        """Stage-one fraction: the config value, or the paper's by dimensionality (2D when unknown); 0 for the
        warm start."""
        if stages.skips_stage_one(self.config):
            return 0.0
        if self.config.pretrain_fraction is not None:
            return self.config.pretrain_fraction
        dim = self.spatial_dims or 2
        return PAPER_PRETRAIN_STEPS[dim] / (PAPER_PRETRAIN_STEPS[dim] + PAPER_SELF_TRAINING_STEPS[dim])

    def stage_one_epochs(self, num_epochs: int) -> int:
        """The ``"fixed"`` switch: ⌈fraction · num_epochs⌉ epochs of pre-training, at most num_epochs − 1."""
        return epochs_for(self.pretrain_fraction, num_epochs)

    def stage_one_bounds(self, num_epochs: int) -> Tuple[int, int]:
        """(first, last) epoch at which the readiness switch may / must start stage two (floor and cap)."""
        return stage_one_bounds(self.config, num_epochs)

    def switch_decision(self, epoch: int, num_epochs: int,
                        history: Optional[Sequence[Sequence[float]]] = None) -> Optional[Dict[str, Any]]:
        """Whether stage two starts at the beginning of ``epoch`` (``methods.stage_switch.switch_decision``
        with nnU-Net's validation pseudo-Dice ``history``); None = not yet, or already switched."""
        if self.stage != 1:
            return None
        return switch_decision(self.config, epoch, num_epochs, self.pretrain_fraction, history)

    def begin_self_training(self, progress: float, decision: Optional[Mapping[str, Any]] = None) -> None:
        """Switch to stage two (once); the trainer resets the teacher to the student if the decision says so."""
        if self.stage != 1:
            raise RuntimeError("BCP is already in stage two; the switch (teacher reset) must happen once")
        self.stage, self.stage_two_start = 2, float(progress)
        self.switch_report = {**(dict(decision) if decision else {}), "progress": float(progress)}

    def time_constants(self) -> Dict[str, Any]:
        """EMA decay rescaled from the paper's self-training length to this run's self-training stage."""
        dim = self.spatial_dims
        reference = self.config.reference_steps
        if reference is None and dim is not None:
            reference = PAPER_SELF_TRAINING_STEPS[dim]
        stage_two = None
        if self.run_steps is not None:  # this run's self-training stage: known at the switch, else the plan
            start = self.stage_two_start if self.stage_two_start is not None else self.pretrain_fraction
            stage_two = max(1, round(self.run_steps * (1.0 - start)))
        decay = self.resolve_ema_decay(reference, stage_two) if reference else self.config.ema_decay
        out = super().time_constants()
        out.update({"reference_steps": reference, "stage_switch": self.config.stage_switch,
                    "pretrain_fraction": self.pretrain_fraction, "stage_two_steps": stage_two,
                    "ema_decay": decay, "ema_horizon_steps": 1.0 / (1.0 - decay)})
        if stage_two:
            out["ema_horizon_fraction"] = out["ema_horizon_steps"] / stage_two  # of the self-training stage
        return out

    # ------------------------------------------------------------------ batch and losses
    def make_batch(self, data_l: torch.Tensor, targets_l: Sequence[torch.Tensor],
                   data_u: Optional[torch.Tensor] = None, teacher_logits_u: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> MixedBatch:
        """Labeled copy-paste (stage one) or bidirectional copy-paste with gated teacher pseudo labels (stage two).

        ``teacher_logits_u`` (B, C, *S): the teacher on the un-mixed ``data_u`` (no gradient).
        """
        cfg = self.config
        if self.stage == 1:
            return copy_paste_batch(data_l, targets_l, box_fraction=cfg.box_fraction, generator=generator)
        if data_u is None or teacher_logits_u is None:
            raise ValueError("BCP stage two needs the unlabeled patches and the teacher's logits on them")
        pl = self.gate_teacher(teacher_logits_u)
        labels = (largest_component_only(pl.labels, teacher_logits_u.shape[1])
                  if cfg.pseudo_label_largest_component else pl.labels)
        # region weights 1 here: the pseudo-labeled regions are weighted by w_u through weights()
        return copy_paste_batch(data_l, targets_l, data_u, labels, pl.confidence, pl.keep,
                                box_fraction=cfg.box_fraction, unlabeled_weight=1.0, generator=generator)

    def _loss(self, inputs: BCPStepInputs, groups) -> torch.Tensor:
        cfg = self.config
        return BCP_LOSS_SCALE * mixed_deep_supervision_loss(inputs.outputs, inputs.batch, inputs.scale_weights,
                                                            inputs.ignore_index, groups, cfg.dice_smooth,
                                                            cfg.dice_include_background, cfg.dice_present_only)

    def _check(self, inputs: StepInputs) -> BCPStepInputs:
        if not isinstance(inputs, BCPStepInputs) or inputs.batch is None or not inputs.outputs:
            raise ValueError("BCP needs BCPStepInputs with the mixed batch and the student's outputs on it "
                             "(nnUNetTrainerBCP.compute_loss builds them)")
        return inputs

    def supervised_loss(self, inputs: StepInputs) -> torch.Tensor:
        """½ Σ (CE + Dice) over the ground-truth regions of the mixed batch (all regions in stage one)."""
        inputs = self._check(inputs)
        if self.stage == 1:
            return self._loss(inputs, inputs.batch.groups)
        return self._loss(inputs, bidirectional_groups(inputs.batch.images.shape[0] // 2, 1.0, 0.0))

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        """``pseudo``: ½ Σ (CE + Dice) over the pseudo-labeled regions (exactly 0 in stage one, which has none)."""
        inputs = self._check(inputs)
        if self.stage == 1:
            return {"pseudo": inputs.outputs[0].new_zeros((), dtype=torch.float32)}
        return {"pseudo": self._loss(inputs, bidirectional_groups(inputs.batch.images.shape[0] // 2, 0.0, 1.0))}

    def weights(self, progress: float) -> Dict[str, float]:
        """0 in stage one; w_u · ramp(t) in stage two, t measured from the switch (BCP: w_u = 0.5, no ramp); and
        ``unmixed_supervised_weight`` for ``unmixed`` in stage two when that option is on."""
        extra = stages.unmixed_weight(self.config, self.stage)
        if self.stage == 1 or self.stage_two_start is None:
            return {"pseudo": 0.0, **extra}
        start = self.stage_two_start
        t = (progress - start) / (1.0 - start) if start < 1.0 else 1.0
        return {"pseudo": self.config.ramp(min(max(t, 0.0), 1.0)), **extra}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "stage_two_start": self.stage_two_start, "switch_report": dict(self.switch_report)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"stage", "stage_two_start"} - set(state)
        if missing:
            raise ValueError(f"BCP method state lacks {sorted(missing)} (keys: {sorted(state)}); was the checkpoint "
                             f"written by another method?")
        if state["stage"] not in (1, 2):
            raise ValueError(f"BCP stage must be 1 or 2, got {state['stage']!r}")
        self.stage = int(state["stage"])
        self.stage_two_start = state["stage_two_start"]
        self.switch_report = dict(state.get("switch_report", {}))  # absent in checkpoints before the readiness switch
