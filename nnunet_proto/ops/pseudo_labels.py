"""Confidence-gated pseudo labels from teacher probabilities, and the statistics that reveal a collapse.

Every method that takes an argmax of a teacher (Mean-Teacher-style self-training, copy-paste with
pseudo labels, prototype targets) should train only on voxels the teacher is confident about, the
FixMatch rule (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS 2020, arXiv 2001.07685): keep voxel v if max_c p_c(v) ≥ τ. The threshold may be
one per class, τ_c, applied to the predicted class ĉ(v) = argmax_c p_c(v):

    keep(v) = [ p_ĉ(v)(v) ≥ τ_ĉ(v) ]

A per-class threshold lets a rare or hard class (the right ventricle on ACDC) keep voxels at a lower
confidence than the background, instead of vanishing from the pseudo labels, which is how a teacher
collapses onto fewer classes. The statistics below (per-class share of all and of kept pseudo labels,
mean confidence, kept fraction) are what the trainers log every epoch to make such a collapse visible.

Pure torch, (B, C, *spatial) for 2D and 3D; everything returned is detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo labels of one batch (all detached).

    Attributes:
        labels: (B, 1, *S) int64 argmax class ĉ(v) of every voxel (not gated).
        confidence: (B, 1, *S) float32 max probability p_ĉ(v)(v).
        keep: (B, 1, *S) bool, confidence ≥ threshold of the predicted class.
        threshold: (C,) float32 per-class thresholds that were applied.
        ignore_index: value :meth:`gated` writes into dropped voxels (None: :meth:`gated` needs one).
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    keep: torch.Tensor
    threshold: torch.Tensor
    ignore_index: Optional[int] = None

    def gated(self, ignore_index: Optional[int] = None) -> torch.Tensor:
        """(B, 1, *S) int64 labels with dropped voxels set to ``ignore_index`` (for a CE with ignore_index).

        Uses the gate's ``ignore_index`` unless one is given here.
        """
        value = self.ignore_index if ignore_index is None else ignore_index
        if value is None:
            raise ValueError("PseudoLabels.gated needs an ignore_index: pass one here or to gate_pseudo_labels "
                             "(e.g. -100, the default of torch's cross-entropy, or nnU-Net's ignore label)")
        return self.labels.masked_fill(~self.keep, value)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """Share of voxels that passed the gate (0-dim float32)."""
        return self.keep.float().mean()


def _thresholds(threshold: Union[float, torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(threshold, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(num_classes)
    if t.shape != (num_classes,):
        raise ValueError(f"threshold must be a float or a tensor of shape ({num_classes},) (one per class), "
                         f"got shape {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"thresholds are probabilities in [0, 1], got {t.tolist()}")
    return t


def gate_pseudo_labels(probs: torch.Tensor, threshold: Union[float, torch.Tensor],
                       ignore_index: Optional[int] = None) -> PseudoLabels:
    """Argmax pseudo labels of ``probs`` with the confidence gate keep(v) = [p_ĉ(v) ≥ τ_ĉ].

    Args:
        probs: (B, C, *S) class probabilities (softmax of teacher logits; use :func:`gate_logits` for
            logits). Read under ``no_grad`` in float32.
        threshold: τ, one float for all classes or a (C,) tensor (τ_c for the predicted class c).
            0 keeps every voxel (ungated argmax); values above 1 are refused.
        ignore_index: stored for :meth:`PseudoLabels.gated`.

    Returns:
        :class:`PseudoLabels`, detached.
    """
    if probs.dim() < 3:
        raise ValueError(f"probs must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(probs.shape)}")
    with torch.no_grad():
        p = probs.detach().float()
        t = _thresholds(threshold, p.shape[1], p.device)
        confidence, labels = p.max(dim=1, keepdim=True)
        keep = confidence >= t[labels]
    return PseudoLabels(labels=labels, confidence=confidence, keep=keep, threshold=t, ignore_index=ignore_index)


def gate_logits(logits: torch.Tensor, threshold: Union[float, torch.Tensor],
                ignore_index: Optional[int] = None, temperature: float = 1.0) -> PseudoLabels:
    """:func:`gate_pseudo_labels` on softmax(logits / temperature), computed in float32 without gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    return gate_pseudo_labels(probs, threshold, ignore_index)


def class_shares(labels: torch.Tensor, num_classes: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C,) float32 share of each class among the (valid) voxels of an integer label map; zeros if none.

    ``labels`` (B, 1, *S) or (B, *S) integers; ``valid`` a bool mask of the same shape (e.g. the gate's
    ``keep`` or labels != ignore label). Values outside [0, C) (an ignore label) are not counted.
    """
    with torch.no_grad():
        flat = labels.detach().reshape(-1).long()
        ok = (flat >= 0) & (flat < num_classes)
        if valid is not None:
            if valid.shape != labels.shape:
                raise ValueError(f"valid mask shape {tuple(valid.shape)} differs from labels {tuple(labels.shape)}")
            ok &= valid.detach().reshape(-1).bool()
        counts = torch.bincount(flat[ok], minlength=num_classes)[:num_classes].float()
        return counts / counts.sum().clamp_min(1.0)


def pseudo_label_stat_names(num_classes: int) -> Tuple[str, ...]:
    """Keys of :func:`pseudo_label_stats`, in a fixed order (to register logger keys up front)."""
    return (*(f"share_c{c}" for c in range(num_classes)), *(f"share_kept_c{c}" for c in range(num_classes)),
            "confidence", "kept", *(f"threshold_c{c}" for c in range(num_classes)),
            *(f"kept_c{c}" for c in range(num_classes)))


def pseudo_label_stats(pl: PseudoLabels, num_classes: int) -> Dict[str, torch.Tensor]:
    """Collapse diagnostics of one batch of pseudo labels, as 0-dim float32 tensors (no host sync).

    Keys (:func:`pseudo_label_stat_names`):
        ``share_c<k>``: share of all voxels whose pseudo label is class k (Σ_k = 1);
        ``share_kept_c<k>``: share of the kept voxels whose pseudo label is class k (all 0 if none kept);
        ``confidence``: mean max probability over all voxels;
        ``kept``: fraction of voxels kept by the gate;
        ``threshold_c<k>``: the gate's threshold τ_k for voxels predicted as class k (all equal to τ in the
        fixed mode; per batch in the class-relative and quantile ones);
        ``kept_c<k>``: among the voxels predicted as class k, the share the gate keeps (NaN when no voxel is
        predicted as k: there is nothing to keep; the trainer averages it over the steps that have one).
    """
    share = class_shares(pl.labels, num_classes)
    share_kept = class_shares(pl.labels, num_classes, pl.keep)
    out = {f"share_c{c}": share[c] for c in range(num_classes)}
    out.update({f"share_kept_c{c}": share_kept[c] for c in range(num_classes)})
    out["confidence"] = pl.confidence.mean()
    out["kept"] = pl.kept_fraction
    thr = pl.threshold.detach().float().reshape(-1).expand(num_classes)  # (C,) per class (a scalar broadcast)
    out.update({f"threshold_c{c}": thr[c] for c in range(num_classes)})
    with torch.no_grad():
        labels = pl.labels.detach().reshape(-1).long()
        predicted = torch.bincount(labels, minlength=num_classes)[:num_classes].float()
        kept = torch.bincount(labels[pl.keep.detach().reshape(-1)], minlength=num_classes)[:num_classes].float()
        kept_share = torch.where(predicted > 0, kept / predicted.clamp_min(1.0), torch.full_like(kept, float("nan")))
    out.update({f"kept_c{c}": kept_share[c] for c in range(num_classes)})
    return out


def argmax_disagreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Share of voxels whose argmax class differs between two predictions of the same voxels, 0-dim float32.

    ``logits_a``, ``logits_b``: (B, C, *S) logits or probabilities (argmax is the same for both). For an EMA
    teacher and its student on the same input, 0 means the teacher is a copy of the student (no temporal
    ensemble, nothing to learn from its argmax); detached, no host sync.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"argmax_disagreement needs two predictions of the same voxels, got shapes "
                         f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    with torch.no_grad():
        return (logits_a.detach().argmax(dim=1) != logits_b.detach().argmax(dim=1)).float().mean()


def collapse_diagnostic_names(num_classes: int) -> Tuple[str, ...]:
    """Keys of :func:`collapse_diagnostics`: ``pl_<stat>`` for every pseudo-label statistic, then
    ``labeled_share_c<k>``, then ``teacher_disagreement``."""
    return (*(f"pl_{k}" for k in pseudo_label_stat_names(num_classes)),
            *(f"labeled_share_c{c}" for c in range(num_classes)), "teacher_disagreement")


def partial_collapse_names(num_classes: int) -> Tuple[str, ...]:
    """Keys of :func:`collapse_diagnostics` that are NaN in some steps by design: ``pl_kept_c<k>`` (no voxel
    predicted as k) and ``teacher_disagreement`` (measured on the first step of an epoch only where the teacher's
    input differs from the student's). Their epoch value is the mean over the steps that measured them."""
    return (*(f"pl_kept_c{c}" for c in range(num_classes)), "teacher_disagreement")


def collapse_diagnostics(teacher_logits_u: torch.Tensor, target_l: torch.Tensor, num_classes: int,
                         threshold: Union[float, torch.Tensor] = 0.0,
                         ignore_index: Optional[int] = None,
                         pseudo: Optional[PseudoLabels] = None,
                         disagreement: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Teacher pseudo-label statistics on unlabeled patches next to the labeled class shares of the step.

    One function for every trainer with a teacher (the shared step and methods with their own step, e.g.
    copy-paste), so the numbers mean the same everywhere. A class whose ``pl_share_c<k>`` falls far below
    its ``labeled_share_c<k>`` is vanishing from the teacher's predictions.

    Args:
        teacher_logits_u: (B_u, C, *S) teacher logits on the un-mixed unlabeled patches.
        target_l: (B_l, 1, *S) labels of the labeled patches (ignore label not counted).
        threshold: the confidence gate τ (float or (C,)), as the method uses it.
        pseudo: the method's own gated pseudo labels of ``teacher_logits_u``; when given, ``threshold`` is unused.
        disagreement: :func:`argmax_disagreement` of the teacher and the student on the same unlabeled input,
            logged as ``teacher_disagreement``; None (no teacher, or the student does not see these patches): NaN.
    Returns: 0-dim float32 tensors, keys :func:`collapse_diagnostic_names`.
    """
    if teacher_logits_u.shape[1] != num_classes:
        raise ValueError(f"teacher logits have {teacher_logits_u.shape[1]} channels, expected {num_classes} classes")
    if pseudo is None:
        pseudo = gate_logits(teacher_logits_u, threshold)
    stats = pseudo_label_stats(pseudo, num_classes)
    out = {f"pl_{k}": v for k, v in stats.items()}
    valid = None
    if ignore_index is not None:
        valid = target_l != ignore_index
    shares = class_shares(target_l, num_classes, valid)
    out.update({f"labeled_share_c{c}": shares[c] for c in range(num_classes)})
    out["teacher_disagreement"] = (disagreement.detach().float().reshape(()) if disagreement is not None
                                   else torch.full((), float("nan"), device=shares.device))
    return out


def class_relative_thresholds(probs: torch.Tensor, threshold: float, floor: float = 0.5) -> torch.Tensor:
    """Per-class thresholds scaled by each class's learning status in this batch (FlexMatch-style), (C,) float32.

    FlexMatch (Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling",
    NeurIPS 2021, arXiv 2110.08263) lowers the threshold of classes the model has not learned yet,
    τ_c = β_c · τ with β_c = σ_c / max_k σ_k. FlexMatch's σ_c counts confident predictions per class, which
    in segmentation measures class *size* (background has most voxels), so here σ_c is the mean confidence
    of the voxels predicted as c, a per-voxel quantity independent of the class's size:

        τ_c = max(floor, τ · σ_c / max_k σ_k),    σ_c = mean_{v: ĉ(v) = c} p_c(v)

    A hard class (low σ_c) keeps its most confident voxels instead of vanishing from the pseudo labels;
    classes not predicted in the batch get τ. Computed per batch (thousands of voxels per class), so there
    is no state and no time constant. ``floor`` bounds the threshold from below (0.5: the class must hold
    the majority of the probability).
    """
    if not 0.0 <= floor <= threshold <= 1.0:
        raise ValueError(f"need 0 <= floor <= threshold <= 1, got floor={floor}, threshold={threshold}")
    with torch.no_grad():
        p = probs.detach().float()
        num_classes = p.shape[1]
        confidence, labels = p.max(dim=1)
        sums = torch.zeros(num_classes, device=p.device).index_add_(0, labels.reshape(-1), confidence.reshape(-1))
        counts = torch.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes].float()
        present = counts > 0
        status = torch.where(present, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
        top = status.max().clamp_min(1e-12)
        scaled = torch.where(present, threshold * status / top, torch.full_like(status, threshold))
        return scaled.clamp(min=floor, max=threshold)


def kept_count(num_voxels: int, keep: float) -> int:
    """Voxels of a class the quantile gate keeps: ⌈keep · n⌉ (at least 1 of a predicted class, at most n).

    Rounded to 6 decimals before the ceiling, so 0.3 · 10 (3.0000000000000004 in floating point) keeps 3, not 4.
    """
    if num_voxels <= 0:
        return 0
    return min(num_voxels, max(1, math.ceil(round(keep * num_voxels, 6))))


def quantile_gate(probs: torch.Tensor, keep: float, floor: float = 0.0) -> PseudoLabels:
    """Per-class quantile gate: of the voxels predicted as class c, keep the ⌈keep · n_c⌉ most confident ones.

    The threshold of class c is the (1 − keep) quantile of the confidences of the batch's voxels predicted as c
    (an order statistic, exact and deterministic: ``torch.kthvalue``), so every predicted class keeps its top
    share whatever its size and however (mis)calibrated the teacher is. A fixed τ does not select once the
    teacher is confident everywhere: under nnU-Net's Dice + CE the teacher's mean confidence is 0.986–0.992 and
    τ = 0.9 keeps 96–100 % of the voxels (issue 23). ``floor`` additionally drops voxels below that confidence:

        keep(v) = [ d(v) ≤ d*_ĉ(v) ] · [ p_ĉ(v)(v) ≥ floor ],   d(v) = Σ_{c ≠ ĉ(v)} p_c(v) = 1 − p_ĉ(v)(v)

    with d*_c the ⌈keep · n_c⌉-th smallest d among the voxels predicted as c. Voxels are ranked by d, the other
    classes' probability mass, not by p_ĉ: in float32 p_ĉ rounds to exactly 1 once the logit gap exceeds ~17,
    which would tie most voxels of a confident class at the top and keep far more than the requested share;
    the small probabilities keep their order (down to ~1e-38). The share kept is exact up to genuine ties of d.

    Args:
        probs: (B, C, *S) class probabilities, read in float32 without gradient.
        keep: share of each predicted class's voxels to keep, in (0, 1]; 1 keeps every voxel above ``floor``.
        floor: minimum confidence in [0, 1] (0: none).
    Returns:
        :class:`PseudoLabels`; ``threshold[c]`` = max(1 − d*_c, floor), the confidence threshold of class c in
        this batch (1 for a class not predicted in the batch: there is nothing to keep).

    Cost: one ``kthvalue`` per class predicted in the batch (a host sync each on a GPU, for the voxel count).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is the share of each class's voxels to keep, in (0, 1], got {keep}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor is a confidence in [0, 1], got {floor}")
    if probs.dim() < 3:
        raise ValueError(f"probs must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(probs.shape)}")
    with torch.no_grad():
        p = probs.detach().float()
        num_classes = p.shape[1]
        confidence, labels = p.max(dim=1, keepdim=True)
        doubt = p.scatter(1, labels, 0.0).sum(dim=1, keepdim=True)  # 1 − p_ĉ without float32's rounding to 1
        flat_doubt, flat_labels = doubt.reshape(-1), labels.reshape(-1)
        cut = torch.full((num_classes,), -1.0, device=p.device)  # −1: class not predicted, nothing kept
        for c in range(num_classes):
            d = flat_doubt[flat_labels == c]
            if d.numel():
                cut[c] = torch.kthvalue(d, kept_count(d.numel(), keep)).values
        keep_mask = (doubt <= cut[labels]) & (confidence >= floor)
        threshold = torch.where(cut >= 0, (1.0 - cut).clamp(min=floor), torch.ones_like(cut))
    return PseudoLabels(labels=labels, confidence=confidence, keep=keep_mask, threshold=threshold)


#: modes of :func:`confidence_gate`
THRESHOLD_MODES = ("fixed", "class_relative", "quantile")
#: default share of each class's voxels the ``"quantile"`` mode keeps (config ``pseudo_label_keep``)
DEFAULT_KEEP = 0.5


def confidence_gate(probs: torch.Tensor, threshold: float, mode: str = "fixed", floor: float = 0.5,
                    keep: float = DEFAULT_KEEP) -> PseudoLabels:
    """:func:`gate_pseudo_labels` with τ for every class (``"fixed"``), :func:`class_relative_thresholds`
    (``"class_relative"``, floor ``min(floor, τ)``) or :func:`quantile_gate` (``"quantile"``: each predicted class
    keeps its ``keep`` share of most confident voxels, floor ``min(floor, τ)``; τ = 0 gives the pure quantile
    gate). ``probs`` (B, C, *S); ``keep`` is used by the quantile mode only."""
    if mode == "fixed":
        return gate_pseudo_labels(probs, threshold)
    if mode == "class_relative":
        return gate_pseudo_labels(probs, class_relative_thresholds(probs, threshold, min(floor, threshold)))
    if mode == "quantile":
        return quantile_gate(probs, keep, min(floor, threshold))
    raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
