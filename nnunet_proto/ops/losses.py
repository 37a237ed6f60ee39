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
