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
            "confidence", "kept", *(f"threshold_c{c}" for c in range(num_classes)))


def pseudo_label_stats(pl: PseudoLabels, num_classes: int) -> Dict[str, torch.Tensor]:
    """Collapse diagnostics of one batch of pseudo labels, as 0-dim float32 tensors (no host sync).

    Keys (:func:`pseudo_label_stat_names`):
        ``share_c<k>``: share of all voxels whose pseudo label is class k (Σ_k = 1);
        ``share_kept_c<k>``: share of the kept voxels whose pseudo label is class k (all 0 if none kept);
        ``confidence``: mean max probability over all voxels;
        ``kept``: fraction of voxels kept by the gate;
        ``threshold_c<k>``: the gate's threshold τ_k for voxels predicted as class k (all equal to τ in the
        fixed mode; per batch in the class-relative one).
    """
    share = class_shares(pl.labels, num_classes)
    share_kept = class_shares(pl.labels, num_classes, pl.keep)
    out = {f"share_c{c}": share[c] for c in range(num_classes)}
    out.update({f"share_kept_c{c}": share_kept[c] for c in range(num_classes)})
    out["confidence"] = pl.confidence.mean()
    out["kept"] = pl.kept_fraction
    thr = pl.threshold.detach().float().reshape(-1).expand(num_classes)  # (C,) per class (a scalar broadcast)
    out.update({f"threshold_c{c}": thr[c] for c in range(num_classes)})
    return out


def collapse_diagnostic_names(num_classes: int) -> Tuple[str, ...]:
    """Keys of :func:`collapse_diagnostics`: ``pl_<stat>`` for every pseudo-label statistic, then
    ``labeled_share_c<k>``."""
    return (*(f"pl_{k}" for k in pseudo_label_stat_names(num_classes)),
            *(f"labeled_share_c{c}" for c in range(num_classes)))


def collapse_diagnostics(teacher_logits_u: torch.Tensor, target_l: torch.Tensor, num_classes: int,
                         threshold: Union[float, torch.Tensor] = 0.0,
                         ignore_index: Optional[int] = None,
                         pseudo: Optional[PseudoLabels] = None) -> Dict[str, torch.Tensor]:
    """Teacher pseudo-label statistics on unlabeled patches next to the labeled class shares of the step.

    One function for every trainer with a teacher (the shared step and methods with their own step, e.g.
    copy-paste), so the numbers mean the same everywhere. A class whose ``pl_share_c<k>`` falls far below
    its ``labeled_share_c<k>`` is vanishing from the teacher's predictions.

    Args:
        teacher_logits_u: (B_u, C, *S) teacher logits on the un-mixed unlabeled patches.
        target_l: (B_l, 1, *S) labels of the labeled patches (ignore label not counted).
        threshold: the confidence gate τ (float or (C,)), as the method uses it.
        pseudo: the method's own gated pseudo labels of ``teacher_logits_u``; when given, ``threshold`` is unused.
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


#: modes of :func:`confidence_gate`
THRESHOLD_MODES = ("fixed", "class_relative")


def confidence_gate(probs: torch.Tensor, threshold: float, mode: str = "fixed", floor: float = 0.5) -> PseudoLabels:
    """:func:`gate_pseudo_labels` with τ for every class (``"fixed"``) or :func:`class_relative_thresholds`
    (``"class_relative"``, floor ``min(floor, τ)``). ``probs`` (B, C, *S)."""
    if mode == "fixed":
        return gate_pseudo_labels(probs, threshold)
    if mode == "class_relative":
        return gate_pseudo_labels(probs, class_relative_thresholds(probs, threshold, min(floor, threshold)))
    raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
