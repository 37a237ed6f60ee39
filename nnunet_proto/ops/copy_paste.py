"""Bidirectional copy-paste (BCP, Bai et al. CVPR 2023) on network input patches, METHODS.md §1.7 and §6.5.

One zero box is cut out of a mask M (1 = context, 0 = pasted box) and shared by all images of a
batch; a mixed image is ``context ⊙ M + patch ⊙ (1 − M)`` and its label is mixed the same way. The
box edge is ⌊2/3 · s⌋ for every patch axis s (BCP: 74×74×53 for 112×112×80, 170×170 for 256²),
derived here from whatever patch size nnU-Net planned, 2D or 3D.

The mixed-label loss is BCP's ``mix_loss``: for each of the two regions (M and 1 − M), a
cross-entropy averaged over the region plus a soft Dice restricted to the region, multiplied by the
region's weight (1 for ground truth, 0.5 for pseudo labels). Ignore-label voxels belong to no region.

Pure torch; float32 maths with autocast disabled; every function is finite for empty regions.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_proto.ops.losses import masked_mean
from nnunet_proto.ops.prototypes import labels_to_onehot

#: BCP's box edge as a fraction of the patch edge (paper 002: 74×74×53 of 112×112×80, 170² of 256²)
BCP_BOX_FRACTION = 2.0 / 3.0


def box_size(patch_size: Sequence[int], fraction: float = BCP_BOX_FRACTION) -> Tuple[int, ...]:
    """Edge lengths of the pasted box: ⌊fraction · s⌋ per axis, at least 1 voxel.

    ``box_size((112, 112, 80)) == (74, 74, 53)`` and ``box_size((256, 256)) == (170, 170)`` as in BCP.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"box fraction must be in (0, 1), got {fraction}; BCP uses 2/3")
    if any(int(s) < 1 for s in patch_size):
        raise ValueError(f"patch size must be positive on every axis, got {tuple(patch_size)}")
    # the 1e-9 keeps exact multiples (e.g. 2/3 · 81 = 54) from rounding down through float error
    return tuple(max(1, int(math.floor(fraction * int(s) + 1e-9))) for s in patch_size)


def random_box_mask(patch_size: Sequence[int], fraction: float = BCP_BOX_FRACTION,
                    generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """BCP mask M of shape ``(1, 1, *patch_size)``, float32: 1 everywhere except one box of zeros.

    The box has ``box_size(patch_size, fraction)`` and a uniformly random corner, start ∈ [0, s − b]
    on every axis, drawn from ``generator`` (CPU; the global RNG when None) so that a seed replays
    it. The same mask is shared by every image of the batch (BCP).
    """
    size = box_size(patch_size, fraction)
    starts = [int(torch.randint(0, int(s) - b + 1, (1,), generator=generator)) for s, b in zip(patch_size, size)]
    mask = torch.ones(1, 1, *[int(s) for s in patch_size])
    box = (slice(None), slice(None)) + tuple(slice(st, st + b) for st, b in zip(starts, size))
    mask[box] = 0.0
    return mask.to(device) if device is not None else mask


def resize_box_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``(1, 1, *S)`` mask to ``size`` (mode 'nearest-exact').

    This is the interpolation nnU-Net's ``DownsampleSegForDSTransform`` uses for the deep-supervision
    targets, so the resized box lines up with the loader's lower-scale labels.
    """
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    with torch.autocast(device_type=mask.device.type, enabled=False):
        return F.interpolate(mask.float(), size=tuple(int(s) for s in size), mode="nearest-exact")


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour ('nearest-exact') resize of a ``(B, 1, *S)`` label map; keeps the dtype."""
    if tuple(labels.shape[2:]) == tuple(size):
        return labels
    out = F.interpolate(labels.float(), size=tuple(int(s) for s in size), mode="nearest-exact")
    return out.to(labels.dtype)


def paste(context: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``context ⊙ M + patch ⊙ (1 − M)`` for images (float) and label maps (integer), dtype kept.

    ``mask`` is ``(1, 1, *S)`` (or anything broadcastable to the inputs); written with ``torch.where``
    so that integer labels are copied, never averaged.
    """
    if context.shape != patch.shape:
        raise ValueError(f"context {tuple(context.shape)} and patch {tuple(patch.shape)} must have the same shape")
    return torch.where(mask.to(device=context.device) > 0.5, context, patch.to(context.dtype))


def partner(x: torch.Tensor) -> torch.Tensor:
    """The batch rolled by one: image i is paired with image (i + 1) mod B.

    BCP splits a batch into halves a/b, which needs an even batch; pairing every image with its
    neighbour works for any batch size (with B = 1 an image is paired with itself).
    """
    return torch.roll(x, shifts=-1, dims=0)


def region_ce_dice(logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Tuple[torch.Tensor, float]],
                   ignore_index: Optional[int] = None, smooth: float = 1e-5,
                   include_background: bool = True, present_only: bool = False) -> torch.Tensor:
    """BCP's mixed-label loss (MPER Eq. 4 per region): Σ_r w_r [CE_r + Dice_r], float32 scalar.

    For every region r with weight w_r:

    * CE_r = Σ_x m_r(x) CE(x) / Σ_x m_r(x), the cross-entropy averaged over the region (0 if empty);
    * Dice_r = 1 − mean_{b,c} (2 Σ_x p_c y_c m_r + s) / (Σ_x (p_c + y_c) m_r + s), the soft Dice of
      BCP's 3D ``mask_DiceLoss`` restricted to the region, per image and class (background included
      unless ``include_background`` is False); an empty region gives s/s = 1, i.e. 0 loss.
      With ``present_only`` the mean runs only over the (image, class) pairs whose class occurs in the
      region's labels (0 if none does). In BCP's form (all classes) a class absent from a region has a
      Dice of s/(Σp + s) ≈ 0: a near-constant loss of 1 that dilutes the mean, so a present class's
      Dice gradient shrinks by the share of absent (image, class) pairs, and that turns into a steep push
      to zero once the absent class's summed probability nears s (e.g. the right ventricle in every
      region whose pseudo label lacks it).

    Ignore-label voxels and labels outside [0, C) (e.g. −1 for a pseudo label dropped by a confidence
    gate) are removed from every region.

    Args:
        logits: ``(B, C, *S)``, carries gradient; the softmax is computed once for all regions.
        target: ``(B, 1, *S)`` integer labels (constant).
        regions: ``(mask, weight)`` pairs, masks ``(B or 1, 1, *S)`` in [0, 1] (constant).
    """
    num_classes = logits.shape[1]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_probs = torch.log_softmax(logits.float(), dim=1)
        probs = log_probs.exp()
        onehot = labels_to_onehot(target, num_classes, ignore_index)
        valid = onehot.sum(1, keepdim=True)  # 1 on voxels with a usable label
        nll = -(log_probs * onehot).sum(1, keepdim=True)  # per-voxel CE, 0 where invalid
        overlap, total = probs * onehot, probs + onehot
        dims = tuple(range(2, logits.dim()))
        loss = logits.new_zeros((), dtype=torch.float32)
        for region, weight in regions:
            m = region.float().expand_as(valid) * valid
            ce = masked_mean(nll, m)
            dice = (2.0 * (overlap * m).sum(dims) + smooth) / ((total * m).sum(dims) + smooth)  # (B, C)
            present = (onehot * m).sum(dims) > 0  # (B, C) class occurs in the region's labels
            if not include_background:
                dice, present = dice[:, 1:], present[:, 1:]
            dice_loss = masked_mean(1.0 - dice, present) if present_only else 1.0 - dice.mean()
            loss = loss + weight * (ce + dice_loss)
        return loss
