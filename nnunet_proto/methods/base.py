"""What every semi-supervised method provides: a frozen config and named loss terms.

A method is pure tensor code (no nnU-Net import). The shared base trainer runs the networks and
hands the method a ``StepInputs``; the method returns unweighted loss terms by name and, separately,
the weight of each term at the current training progress. The trainer adds
``sum_k weight_k * term_k`` to nnU-Net's supervised loss, logs every term and weight each epoch and
draws them in progress.png.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from nnunet_proto.ops.pseudo_labels import DEFAULT_KEEP, THRESHOLD_MODES, PseudoLabels, confidence_gate
from nnunet_proto.ops.schedules import (
    MIN_RUN_RELATIVE_DECAY,
    ema_horizon,
    linear_rampup,
    run_relative_decay,
    sigmoid_rampup,
)
from nnunet_proto.ops.strong_views import CUTMIX_P, STRONG_INTENSITY_P

#: named prototype feature layers (nnU-Net U-Net stages; see training/feature_tap.py, which also
#: accepts "encoder:<i>" and "decoder:<i>" for methods that need several stages)
FEATURE_LAYERS = ("decoder", "decoder-2", "bottleneck")
RAMPS = {"sigmoid": sigmoid_rampup, "linear": linear_rampup}
#: where the unlabeled stream reads cases: the fold's ``unlabeled`` split list, ``imagesUnlabeled`` (preprocessed), or
#: (control only, alone) the fold's labeled training images with their labels unused
UNLABELED_SOURCES = ("split", "folder", "labeled")
#: ``time_constants`` modes: rescale EMA/momentum decays to the run length, or use the paper's values as written
TIME_CONSTANT_MODES = ("run_relative", "paper")
#: ``ema_mode`` of the teacher's EMA decay alone: as ``time_constants`` says (``"follow"``), the decay as written per
#: optimiser step (``"per_step"``), or rescaled to the run (``"run_relative"``), whatever ``time_constants`` says
EMA_MODES = ("follow", "per_step", "run_relative")


def _as_stored(value: Any) -> Any:
    """A config value as checkpoints and nnunet_proto_config.json store it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SemiSupervisedConfig:
    """Settings shared by all semi-supervised trainers (subclassed per method).

    Attributes:
        use_teacher: whether an EMA teacher is kept, updated and saved.
        ema_decay: teacher EMA decay α in θ_T ← α θ_T + (1 − α) θ_S (docs/methods/README.md, 'EMA teacher').
        ema_warmup: use min(1 − 1/(step+1), α) early in training (SSL4MIS / CPCL code).
        unlabeled_batch_size: unlabeled patches per step; ``None`` = the labeled batch size.
        unlabeled_sources: where unlabeled cases come from: ``"split"`` = the fold's ``unlabeled`` list
            in splits_final.json (cases of the labeled folder whose labels are never read),
            ``"folder"`` = ``<data_identifier>_unlabeled/`` made by ``nnunet_proto preprocess-unlabeled``;
            ``("labeled",)`` alone = a control: the fold's own labeled training images, labels unused, so
            the method runs unchanged without any unlabeled image (does a gain need the unlabeled data?).
        unlabeled_workers: background workers of the unlabeled stream; ``None`` = half of nnU-Net's
            ``nnUNet_n_proc_DA`` budget (at least 1; 0 workers when that budget is 0).
        feature_layer: prototype feature map: ``"decoder"`` (last decoder stage, full resolution),
            ``"decoder-2"`` (half resolution) or ``"bottleneck"`` (last encoder stage).
        w_max: maximum consistency weight of the ramp λ(t) = w_max · ramp(t).
        rampup: ramp shape, ``"sigmoid"`` (Gaussian exp(−5(1−t)²)) or ``"linear"``.
        rampup_length: fraction of all training iterations after which λ reaches w_max.
        reference_steps: length in iterations of the run the paper tuned its time constants for (EMA decay,
            prototype / memory momenta); ``None`` = unknown, the decays are then used as written. Each
            method sets its paper's value (e.g. 30 000 for SSL4MIS's ACDC Mean Teacher).
        time_constants: ``"run_relative"`` (default): every decay α is replaced by
            α' = 1 − (1 − α)·reference_steps/run_steps (``ops.schedules.run_relative_decay``), so its horizon
            1/(1 − α) is the same fraction of this run (num_epochs × num_iterations_per_epoch) as of the
            paper's; at the paper's run length α' = α. ``"paper"``: the literal values. This covers the teacher's
            EMA decay and the method's momenta (PCCS's memory, MPER's prototypes) together; ``ema_mode`` sets the
            teacher's decay alone.
        ema_mode: the teacher's EMA decay alone: ``"follow"`` (default) = as ``time_constants`` says
            (``"paper"`` → per step, ``"run_relative"`` → rescaled); ``"per_step"`` = ``ema_decay`` as written, per
            optimiser step (the published 0.99 is a 100-step horizon whatever the run length), while the method's
            momenta stay as ``time_constants`` says; ``"run_relative"`` = rescaled to the run even when
            ``time_constants="paper"``. The resolved mode is written to nnunet_proto_config.json
            (``time_constants.ema_mode``) and the training log.
        min_decay: floor of a run-relative decay (default 0.9, a 10-step horizon; see
            ``ops.schedules.MIN_RUN_RELATIVE_DECAY``).
        pseudo_label_threshold: confidence gate τ for argmax pseudo labels of the teacher
            (``ops.pseudo_labels.gate_pseudo_labels``): used by methods that train on such labels, and by
            the collapse diagnostics every trainer with a teacher logs (kept fraction, kept class shares).
            0 keeps every voxel (ungated, as the papers do).
        threshold_mode: ``"fixed"``: τ for every class; ``"class_relative"``: τ_c = max(0.5, τ·σ_c/max σ) with
            σ_c the batch's mean confidence of voxels predicted as c
            (``ops.pseudo_labels.class_relative_thresholds``): a class the teacher is unsure of keeps its
            most confident voxels instead of vanishing from the pseudo labels; ``"quantile"``: of the voxels predicted
            as c in the batch, the ``pseudo_label_keep`` share with the highest confidence is kept (τ_c = the
            (1 − keep) quantile of their confidences, ``ops.pseudo_labels.quantile_gate``), and none below the floor
            min(0.5, τ) (τ = 0: no floor): a gate that selects even when the teacher is confident everywhere.
        pseudo_label_keep: the share of each predicted class's voxels the ``"quantile"`` mode keeps, in (0, 1]
            (default 0.5; unused by the other modes).
        seed: if set, Python, NumPy and torch are seeded (seed + DDP rank) when the trainer initialises,
            before the network is built and the data loaders start. With nnUNet_n_proc_DA=0 a CPU run is
            then repeatable step for step (docs/reproducibility.md); background augmentation workers
            (nnUNet_n_proc_DA > 0) draw their own random seeds, as in nnU-Net.
        strong_view: weak-to-strong consistency (FixMatch, UniMatch; off by default, so every existing trainer
            keeps its step bit for bit). When on, the teacher predicts on the *weak* view, the unlabeled patches
            as nnU-Net's augmentation delivers them, *without* the method's ``teacher_input`` perturbation (Mean
            Teacher's noise would make the teacher's view the noisier one, the reverse of the rule); the student
            trains on a *strong* view of the same patches (``ops.strong_views``: strong intensity perturbations,
            then CutMix between the unlabeled patches of the batch), and every teacher tensor the method receives
            for the unlabeled patches (``teacher_logits_u``, ``teacher_feats_u``, ``teacher_features``) is mixed
            with the same boxes, so voxel v of the student's input and of the teacher's target come from the same
            image (coarser feature maps with a nearest-resized box mask). The collapse diagnostics read the
            teacher's un-mixed weak-view logits. Needs a teacher (``use_teacher``) and a method whose student
            sees the unlabeled patches through the shared step (the trainer refuses it otherwise, e.g. for
            copy-paste trainers with their own step).
        strong_intensity_p: per-patch probability of the strong brightness/contrast/gamma change (UniMatch's
            ColorJitter probability 0.8); blur and noise have their own (``ops.strong_views``).
        cutmix_p: per-patch probability of a CutMix box (UniMatch 0.5).
        weight_band: None (default: the weights are the method's, as written) or (lo, hi): weights set by signal.
            On the first step of every epoch the gradient probe measures each term's gradient against the supervised
            one; the trainer then moves a per-term gain so that the term's gradient share at *full ramp*
            (gain · weight at full ramp · ‖∇L_term‖ / ‖∇L_sup‖) lands in [lo, hi] (``ops.schedules.banded_gain``:
            half of the log-space way per epoch, at most a factor 4). The ramp keeps its shape; the gains are logged,
            saved in checkpoints and restored on ``--c``. Needs the gradient probe (not under DDP or torch.compile,
            where the gains stay 1 with a warning). Issue 23 proposes (0.3, 1.0).
    """

    use_teacher: bool = True
    ema_decay: float = 0.99
    ema_warmup: bool = True
    unlabeled_batch_size: Optional[int] = None
    unlabeled_sources: Tuple[str, ...] = ("split", "folder")
    unlabeled_workers: Optional[int] = None
    feature_layer: str = "decoder"
    w_max: float = 0.1
    rampup: str = "sigmoid"
    rampup_length: float = 1.0
    reference_steps: Optional[int] = None
    time_constants: str = "run_relative"
    min_decay: float = MIN_RUN_RELATIVE_DECAY
    pseudo_label_threshold: float = 0.9
    threshold_mode: str = "fixed"
    ema_mode: str = "follow"
    pseudo_label_keep: float = DEFAULT_KEEP
    seed: Optional[int] = None
    strong_view: bool = False
    strong_intensity_p: float = STRONG_INTENSITY_P
    cutmix_p: float = CUTMIX_P
    weight_band: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field and the allowed values."""
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.unlabeled_batch_size is not None and self.unlabeled_batch_size < 1:
            raise ValueError(f"unlabeled_batch_size must be >= 1 or None, got {self.unlabeled_batch_size}")
        bad = [s for s in self.unlabeled_sources if s not in UNLABELED_SOURCES]
        if bad or not self.unlabeled_sources:
            raise ValueError(f"unlabeled_sources must be a non-empty subset of ('split', 'folder'), or ('labeled',) "
                             f"for the labeled-images control, got {self.unlabeled_sources}")
        if "labeled" in self.unlabeled_sources and len(self.unlabeled_sources) > 1:
            raise ValueError(f"unlabeled_sources ('labeled',) is the control that feeds the fold's labeled images "
                             f"(labels unused) to the unlabeled stream; it cannot be combined with "
                             f"{[s for s in self.unlabeled_sources if s != 'labeled']}")
        if self.unlabeled_workers is not None and self.unlabeled_workers < 0:
            raise ValueError(f"unlabeled_workers must be >= 0 or None, got {self.unlabeled_workers}")
        if self.feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS}, got {self.feature_layer!r}")
        if self.w_max < 0:
            raise ValueError(f"w_max must be >= 0, got {self.w_max}")
        if self.rampup not in RAMPS:
            raise ValueError(f"rampup must be one of {tuple(RAMPS)}, got {self.rampup!r}")
        if not 0.0 <= self.rampup_length <= 1.0:
            raise ValueError(f"rampup_length is a fraction of training in [0, 1], got {self.rampup_length}")
        if self.reference_steps is not None and self.reference_steps < 1:
            raise ValueError(f"reference_steps must be >= 1 or None (no paper run length), got {self.reference_steps}")
        if self.time_constants not in TIME_CONSTANT_MODES:
            raise ValueError(f"time_constants must be one of {TIME_CONSTANT_MODES}, got {self.time_constants!r}")
        if not 0.0 <= self.min_decay < 1.0:
            raise ValueError(f"min_decay must be in [0, 1), got {self.min_decay}")
        if not 0.0 <= self.pseudo_label_threshold <= 1.0:
            raise ValueError(f"pseudo_label_threshold is a probability in [0, 1], got {self.pseudo_label_threshold}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        if self.ema_mode not in EMA_MODES:
            raise ValueError(f"ema_mode must be one of {EMA_MODES}, got {self.ema_mode!r}")
        if not 0.0 < self.pseudo_label_keep <= 1.0:
            raise ValueError(f"pseudo_label_keep is the share of each class's voxels the quantile gate keeps, in "
                             f"(0, 1], got {self.pseudo_label_keep}")
        for name in ("strong_intensity_p", "cutmix_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.weight_band is not None and not (
                len(self.weight_band) == 2 and 0.0 < float(self.weight_band[0]) <= float(self.weight_band[1])):
            raise ValueError(f"weight_band is (lo, hi) with 0 < lo <= hi, the target band of each term's gradient "
                             f"share at full ramp (e.g. (0.3, 1.0)), or None; got {self.weight_band!r}")
        if self.strong_view and not self.use_teacher:
            raise ValueError("strong_view needs a teacher (use_teacher=True): the teacher predicts on the weak view "
                             "and the student learns its targets on the strong view")

    def ramp(self, progress: float) -> float:
        """λ(t) = w_max · ramp(progress / rampup_length), progress in [0, 1]."""
        return self.w_max * RAMPS[self.rampup](progress, self.rampup_length)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly dict with the config class name (stored in checkpoints)."""
        d = {k: _as_stored(v) for k, v in dataclasses.asdict(self).items()}
        d["config_class"] = type(self).__name__
        return d

    @classmethod
    def field_defaults(cls) -> Dict[str, Any]:
        """Each field's default as ``to_dict`` writes it: the value a checkpoint written before the field existed
        was trained with (a new field's default keeps the old behaviour)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                v = f.default
            elif f.default_factory is not dataclasses.MISSING:
                v = f.default_factory()
            else:
                continue
            out[f.name] = _as_stored(v)
        return out

    def replace(self, **changes: Any) -> "SemiSupervisedConfig":
        """A copy with some fields changed (validated again); for leaf trainer variants."""
        return dataclasses.replace(self, **changes)


@dataclass
class StepInputs:
    """Everything a method may need from one training step (full-resolution tensors).

    Student tensors carry gradient; teacher tensors were computed under ``no_grad``.

    Attributes:
        num_classes: C, number of softmax outputs (incl. background).
        ignore_index: nnU-Net ignore label value or None.
        target_l: (B_l, 1, *S) integer labels of the labeled patches.
        logits_l: (B_l, C, *S) student logits (highest-resolution output) on labeled patches.
        feats_l: (B_l, D, *s) student features on labeled patches (or None if not requested).
        logits_u / feats_u: student outputs on unlabeled patches (None if the student does not see them).
        teacher_logits_u / teacher_feats_u: teacher outputs on unlabeled patches (None without teacher).
        features: every tapped layer of the student (``SemiSupervisedMethod.feature_layers``), for the
            whole student batch (labeled patches first, then unlabeled ones if the student sees them).
        teacher_features: every tapped layer of the teacher on the unlabeled patches.
        modules / teacher_modules: the method's own trainable modules (``build_modules``) and their
            EMA copy (None if the method has none).
        data_l / data_u: the labeled / unlabeled patches as nnU-Net's data loaders deliver them (the weak view);
            without ``strong_view`` they are the network inputs.
        data_u_strong: with ``strong_view``: the student's input on the unlabeled patches, its strong views one
            after the other (k·B_u, k = ``SemiSupervisedMethod.num_strong_views``); ``logits_u``, ``feats_u``,
            ``teacher_logits_u``, ``teacher_feats_u`` and ``teacher_features`` are then k·B_u long too (view-major),
            the teacher tensors mixed with each view's CutMix boxes. None without ``strong_view``.
        teacher_logits_weak_u: with ``strong_view``: the teacher's un-mixed logits on the weak view (B_u);
            None without it (then ``teacher_logits_u`` is un-mixed). See :attr:`weak_teacher_logits_u`.
        logits_fp_u: student logits of a feature-perturbed pass on the weak unlabeled view (B_u; UniMatch's FP
            stream) when the method asks for one (``SemiSupervisedMethod.feature_dropout``), else None.
        reduce_fn: sums a tensor across DDP ranks (identity without torch.distributed).
        progress: training progress in [0, 1].
    """

    num_classes: int
    ignore_index: Optional[int]
    target_l: torch.Tensor
    logits_l: torch.Tensor
    feats_l: Optional[torch.Tensor] = None
    logits_u: Optional[torch.Tensor] = None
    feats_u: Optional[torch.Tensor] = None
    teacher_logits_u: Optional[torch.Tensor] = None
    teacher_feats_u: Optional[torch.Tensor] = None
    features: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    modules: Optional[nn.Module] = None
    teacher_modules: Optional[nn.Module] = None
    data_l: Optional[torch.Tensor] = None
    data_u: Optional[torch.Tensor] = None
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    progress: float = 0.0
    data_u_strong: Optional[torch.Tensor] = None
    teacher_logits_weak_u: Optional[torch.Tensor] = None
    logits_fp_u: Optional[torch.Tensor] = None

    @property
    def weak_teacher_logits_u(self) -> Optional[torch.Tensor]:
        """The teacher's un-mixed logits on the unlabeled patches (B_u), with or without ``strong_view``."""
        return self.teacher_logits_weak_u if self.teacher_logits_weak_u is not None else self.teacher_logits_u


class SemiSupervisedMethod(ABC):
    """Interface between a method file and the shared trainer.

    Class attributes a method sets:
        config_class: its frozen config dataclass.
        term_names: names of the loss terms it returns (logged as ``loss_<name>``).
        needs_features: whether the trainer must tap the feature layer (student and teacher).
        diagnostic_names: names of the per-step diagnostics it reports (logged as ``diag_<name>``), see
            :attr:`diagnostics`. Declared up front because nnU-Net's logger needs every key registered
            before training and one value per epoch.

    Diagnostics: during :meth:`losses` a method may put values it wants to see in the log and in
    progress.png into ``self.diagnostics`` (name → float or 0-dim tensor; tensors avoid a host sync per
    step). The trainer reads and clears the dict after every step, averages each key over the epoch
    (steps that did not report a key are skipped; an epoch with none logs NaN) and refuses names that
    were not declared in :meth:`diagnostic_keys`.
    """

    config_class: ClassVar[type] = SemiSupervisedConfig
    term_names: ClassVar[Tuple[str, ...]] = ()
    needs_features: ClassVar[bool] = False
    diagnostic_names: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, config: SemiSupervisedConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.diagnostics: Dict[str, Union[float, torch.Tensor]] = {}
        self.run_steps: Optional[int] = None  # set by the trainer: num_epochs × num_iterations_per_epoch

    def gate_teacher(self, teacher_logits: torch.Tensor) -> PseudoLabels:
        """The config's confidence gate on teacher logits (B, C, *S): ``pseudo_label_threshold`` per
        ``threshold_mode`` (and ``pseudo_label_keep`` in the quantile mode). Every method and the trainer's
        collapse diagnostics use this one gate."""
        with torch.no_grad():
            probs = torch.softmax(teacher_logits.detach().float(), dim=1)
        return self.gate_probs(probs)

    def gate_probs(self, probs: torch.Tensor) -> PseudoLabels:
        """The config's gate (:meth:`gate_teacher`) on probabilities (B, C, *S) a method computed itself."""
        cfg = self.config
        return confidence_gate(probs, cfg.pseudo_label_threshold, cfg.threshold_mode, keep=cfg.pseudo_label_keep)

    # ------------------------------------------------------------------ time constants relative to the run
    def set_run_steps(self, run_steps: int) -> None:
        """Tell the method how many optimiser steps this run has (the trainer does it before training)."""
        if int(run_steps) < 1:
            raise ValueError(f"run_steps must be >= 1, got {run_steps}")
        self.run_steps = int(run_steps)

    def resolve_decay(self, decay: float, reference_steps: Optional[int] = None,
                      run_steps: Optional[int] = None, mode: Optional[str] = None) -> float:
        """A paper decay for this run: ``run_relative_decay`` in mode ``"run_relative"``, else ``decay``.

        ``reference_steps`` defaults to ``config.reference_steps`` and ``run_steps`` to this run's length
        (pass the stage length for a constant that lives in one stage); ``mode`` to ``config.time_constants``
        (the teacher's decay passes its own, :attr:`ema_mode`). Returns ``decay`` unchanged when either length is
        unknown or the mode is ``"paper"``.
        """
        ref = self.config.reference_steps if reference_steps is None else reference_steps
        run = self.run_steps if run_steps is None else run_steps
        mode = self.config.time_constants if mode is None else mode
        if mode == "paper" or ref is None or run is None:
            return float(decay)
        return run_relative_decay(decay, ref, run, min_decay=self.config.min_decay)

    @property
    def ema_mode(self) -> str:
        """The teacher's EMA mode, resolved: ``"per_step"`` or ``"run_relative"`` (config ``ema_mode``; ``"follow"``
        takes it from ``time_constants``)."""
        if self.config.ema_mode == "follow":
            return "per_step" if self.config.time_constants == "paper" else "run_relative"
        return self.config.ema_mode

    def resolve_ema_decay(self, reference_steps: Optional[int] = None, run_steps: Optional[int] = None) -> float:
        """The teacher's EMA decay for this run: ``ema_decay`` as written (:attr:`ema_mode` ``"per_step"``) or
        :meth:`resolve_decay` of it relative to the run."""
        return self.resolve_decay(self.config.ema_decay, reference_steps, run_steps,
                                  mode="paper" if self.ema_mode == "per_step" else "run_relative")

    def time_constants(self) -> Dict[str, Any]:
        """Resolved time constants of this run, for the log, nnunet_proto_config.json and checkpoints.

        ``ema_decay`` is what the trainer's EMA teacher uses (``ema_mode``: per step or run-relative). Methods
        with more constants (momenta,
        stage switches) extend the dict (call ``super().time_constants()``).
        """
        decay = self.resolve_ema_decay()
        out: Dict[str, Any] = {"mode": self.config.time_constants, "run_steps": self.run_steps,
                               "reference_steps": self.config.reference_steps, "ema_mode": self.ema_mode,
                               "ema_decay_paper": self.config.ema_decay, "ema_decay": decay,
                               "ema_horizon_steps": ema_horizon(decay)}
        if self.run_steps:
            out["ema_horizon_fraction"] = ema_horizon(decay) / self.run_steps
        return out

    def diagnostic_keys(self, num_classes: int) -> Tuple[str, ...]:
        """All diagnostic names this method may report for ``num_classes`` classes.

        Default: ``diagnostic_names``. Override to add per-class names (e.g. ``f"share_c{c}"``).
        """
        return tuple(self.diagnostic_names)

    def report(self, **values: Union[float, torch.Tensor]) -> None:
        """Record diagnostics of the current step (detached); names must be in :meth:`diagnostic_keys`."""
        for name, value in values.items():
            self.diagnostics[name] = value.detach() if isinstance(value, torch.Tensor) else float(value)

    @property
    def uses_teacher(self) -> bool:
        return self.config.use_teacher

    @property
    def feature_layers(self) -> Tuple[str, ...]:
        """Layers the trainer taps on student and teacher; the first one fills feats_l/feats_u."""
        return (self.config.feature_layer,) if self.needs_features else ()

    def build_modules(self, feature_channels: Dict[str, int], num_classes: int, dim: int) -> Optional[nn.Module]:
        """Trainable modules the method keeps beside the stock network (e.g. a projection head).

        ``feature_channels`` maps every layer in ``feature_layers`` to its channel count; ``dim`` is 2 or 3.
        The trainer optimises their parameters with the network, keeps an EMA copy when a teacher is
        used, saves them in checkpoints (never in ``network_weights``, which must load into plain
        nnU-Net) and averages their gradients across DDP ranks. Default: none.
        """
        return None

    @property
    def student_sees_unlabeled(self) -> bool:
        """Whether the student forward includes the unlabeled patches (default: yes)."""
        return True

    def teacher_input(self, data_u: torch.Tensor) -> torch.Tensor:
        """Perturbation applied to the teacher's input (default: none). Not used with ``config.strong_view``:
        the teacher then sees the weak view as delivered."""
        return data_u

    @property
    def num_strong_views(self) -> int:
        """Strong views of every unlabeled patch the student trains on with ``config.strong_view`` (default 1;
        UniMatch 2). The student's unlabeled outputs hold them one after the other (view-major, k·B_u)."""
        return 1

    @property
    def feature_dropout(self) -> Optional[float]:
        """Channel-dropout rate of a feature-perturbed student pass on the weak unlabeled view (UniMatch's FP
        stream: dropout on every encoder output before the decoder), delivered as ``StepInputs.logits_fp_u``;
        None (default) = no such pass."""
        return None

    @abstractmethod
    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        """Unweighted loss terms, one scalar tensor per name in ``term_names``."""

    def weights(self, progress: float) -> Dict[str, float]:
        """Weight of each term at ``progress`` (default: the shared ramp λ(t) for every term)."""
        lam = self.config.ramp(progress)
        return {name: lam for name in self.term_names}

    # method state (prototype banks, stage flags); stateless methods keep the defaults
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but the checkpoint holds method state "
                             f"{sorted(state)}; was it written by another method?")
