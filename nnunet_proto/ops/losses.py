"""Small loss primitives with explicit masking, safe for empty masks (never 0/0)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is true (broadcast); 0 if the mask is empty.

    The empty case returns ``values.sum() * 0`` so the graph stays connected (DDP sees every
    parameter every step) and the value is exactly 0, never NaN.
    """
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1.0)


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between softmax(student_logits) and teacher probabilities (Mean Teacher).

    Shapes ``(B, C, *spatial)``; averaged over batch, classes and voxels (SSL4MIS ``softmax_mse_loss``
    followed by ``mean``). ``mask`` (B, 1, *spatial) restricts the voxels. Float32.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        diff = (torch.softmax(student_logits.float(), dim=1) - teacher_probs.float()) ** 2
        return masked_mean(diff, mask)


def cross_entropy_ignore(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored voxels; exactly 0 (not NaN) when all are ignored.

    ``logits`` (B, C, *spatial) may contain ``-inf`` for absent classes as long as no non-ignored
    target points at such a class.
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        per_voxel = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
        keep = target != ignore_index
        per_voxel = torch.where(keep, per_voxel, torch.zeros_like(per_voxel))
        return per_voxel.sum() / keep.sum().clamp_min(1)


def dice_ce(logits: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None,
            ce_weight: float = 1.0, dice_weight: float = 1.0, include_background: bool = False,
            squared_denominator: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice + cross-entropy against hard labels, over the valid voxels; float32 scalar.

        L = ce_weight · CE + dice_weight · (1 − mean_c D_c),
        D_c = (2 Σ_v p_c y_c + s) / (Σ_v p_c^q + Σ_v y_c + s),

    sums over every valid voxel of the batch (batch Dice), CE averaged over them, q = 2 with
    ``squared_denominator`` else 1. The defaults are nnU-Net's ``DC_and_CE_loss`` (``MemoryEfficientSoftDiceLoss``
    with batch Dice, no background, smooth 1e-5, weights 1:1, voxels outside the loss mask excluded; nnU-Net
    returns −mean D, here 1 − mean D: the same gradient). ``ce_weight=0, include_background=True,
    squared_denominator=True`` is UniMatch's medical ``DiceLoss`` with its ``ignore`` mask.

    Args:
        logits: (B, C, *S), carries gradient.
        labels: (B, 1, *S) integer labels (constant); values outside [0, C) count as invalid.
        valid: optional (B, 1, *S) bool mask of the voxels that count (e.g. a confidence gate's ``keep``).

    No valid voxel gives exactly 0 with the graph connected (never 0/0).
    """
    num_classes = logits.shape[1]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_probs = torch.log_softmax(logits.float(), dim=1)
        probs = log_probs.exp()
        lab = labels.long()
        if lab.dim() == logits.dim() - 1:
            lab = lab.unsqueeze(1)
        ok = (lab >= 0) & (lab < num_classes)
        if valid is not None:
            ok = ok & valid.bool()
        mask = ok.to(probs.dtype)
        onehot = F.one_hot(lab.clamp(0, num_classes - 1)[:, 0], num_classes).movedim(-1, 1).to(probs.dtype) * mask
        ce = masked_mean(-(log_probs * onehot).sum(1, keepdim=True), mask)
        dims = (0, *range(2, logits.dim()))
        p = probs * mask
        intersect = (p * onehot).sum(dims)
        pred_sum = (p * p if squared_denominator else p).sum(dims)
        dice = (2.0 * intersect + smooth) / (pred_sum + onehot.sum(dims) + smooth).clamp_min(1e-8)
        if not include_background:
            dice = dice[1:]
        return ce_weight * ce + dice_weight * (1.0 - dice.mean())
