"""Bidirectional copy-paste (BCP: Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023, arXiv 2305.00673) on network input patches.

One zero box is cut out of a mask M (1 = context, 0 = pasted box) and shared by all images of a
batch; a mixed image is ``context ⊙ M + patch ⊙ (1 − M)`` and its label is mixed the same way. The
box edge is ⌊2/3 · s⌋ for every patch axis s (BCP: 74×74×53 for 112×112×80, 170×170 for 256²),
derived here from whatever patch size nnU-Net planned, 2D or 3D.

The mixed-label loss is BCP's ``mix_loss``: for each of the two regions (M and 1 − M), a
cross-entropy averaged over the region plus a soft Dice restricted to the region, multiplied by the
region's weight (1 for ground truth, 0.5 for pseudo labels). Ignore-label voxels belong to no region.

The batch builder (:func:`copy_paste_batch`) and the deep-supervised mixed loss
(:func:`mixed_deep_supervision_loss`) are shared by BCP (``methods/bcp.py``) and MPER (``methods/mper.py``).

Pure torch; float32 maths with autocast disabled; every function is finite for empty regions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_proto.ops.losses import masked_mean
from nnunet_proto.ops.prototypes import labels_to_onehot

#: BCP's box edge as a fraction of the patch edge (BCP and MPER papers: 74×74×53 of 112×112×80, 170² of 256²)
BCP_BOX_FRACTION = 2.0 / 3.0
#: label written into pseudo-labeled voxels that the confidence gate dropped: outside [0, C), so every loss
#: here and ``labels_to_onehot`` leave them out (no region, no prototype)
DROPPED_LABEL = -1


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


# ---------------------------------------------------------------------------------------------- mixed batches
@dataclass(frozen=True)
class MixGroup:
    """Images ``start:stop`` of a mixed batch and the weights of their two regions.

    ``context_weight`` applies where the box mask M is 1, ``patch_weight`` inside the box; 1 for
    ground-truth regions, the unlabeled weight for pseudo-labeled ones.
    """

    start: int
    stop: int
    context_weight: float
    patch_weight: float


def bidirectional_groups(batch_size: int, labeled_weight: float, pseudo_weight: float) -> Tuple[MixGroup, MixGroup]:
    """Region weights of a bidirectional batch ``[X_in; X_out]`` of 2B images.

    X_in (images 0..B−1) has a labeled context and a pseudo-labeled box; X_out (B..2B−1) the reverse.
    ``bidirectional_groups(B, 1, 0)`` selects the ground-truth regions only, ``(B, 0, 1)`` the
    pseudo-labeled ones, ``(B, 1, u)`` is BCP's weighting.
    """
    b = int(batch_size)
    return (MixGroup(0, b, labeled_weight, pseudo_weight), MixGroup(b, 2 * b, pseudo_weight, labeled_weight))


@dataclass
class MixedBatch:
    """The student's copy-paste batch and everything needed to supervise it.

    Attributes:
        images: ``(N, C_in, *S)`` mixed input patches (N = B labeled-only, 2B bidirectional).
        targets: per deep-supervision scale, ``(N, 1, *S_s)`` mixed labels Ŷ^m (constant); pseudo-labeled
            voxels dropped by the confidence gate hold ``DROPPED_LABEL``.
        box_masks: per scale, ``(1, 1, *S_s)`` float, 1 = context region, 0 = pasted box.
        groups: the mixed sub-batches and their region weights (the losses are summed over groups).
        from_pseudo: ``(N, 1, *S)`` bool, voxels whose label comes from the teacher (kept or dropped).
        confidence: ``(N, 1, *S)`` float, the teacher's max softmax on pseudo-labeled voxels, 1 elsewhere.
    """

    images: torch.Tensor
    targets: List[torch.Tensor]
    box_masks: List[torch.Tensor]
    groups: Tuple[MixGroup, ...]
    from_pseudo: torch.Tensor
    confidence: torch.Tensor


def copy_paste_batch(data_l: torch.Tensor, targets_l: Sequence[torch.Tensor], data_u: Optional[torch.Tensor] = None,
                     pseudo_labels: Optional[torch.Tensor] = None, confidence: Optional[torch.Tensor] = None,
                     keep: Optional[torch.Tensor] = None, box_fraction: float = BCP_BOX_FRACTION,
                     unlabeled_weight: float = 0.5, generator: Optional[torch.Generator] = None) -> MixedBatch:
    """Copy-paste mixing of network input patches after nnU-Net's augmentation (BCP).

    Labeled-only (``data_u`` None; BCP pre-training): X = X^l_i ⊙ M + X^l_{i+1} ⊙ (1 − M), labels likewise.
    Bidirectional (self-training), one box M for the whole batch:
        X_in  = X^l_i ⊙ M + X^u_i ⊙ (1 − M)        (labeled context, unlabeled box)
        X_out = X^u_i ⊙ M + X^l_{i+1} ⊙ (1 − M)    (unlabeled context, labeled box)
    with the teacher's pseudo labels for the unlabeled pixels; voxels with ``keep`` False get ``DROPPED_LABEL``.

    Args:
        data_l: ``(B, C_in, *S)`` labeled patches; targets_l: their labels per deep-supervision scale,
            ``(B, 1, *S_s)``, full resolution first (nnU-Net's target list).
        data_u: ``(B, C_in, *S)`` unlabeled patches (same shape as ``data_l``).
        pseudo_labels / confidence / keep: ``(B, 1, *S)`` argmax labels, max softmax and gate of the teacher
            on the *un-mixed* unlabeled patches (``ops.pseudo_labels.PseudoLabels``); ``keep`` None keeps all.
        unlabeled_weight: region weight of pseudo-labeled regions (BCP ``u_weight`` 0.5); labeled regions 1.
        generator: CPU generator for the box position (replayable); global RNG when None.
    """
    targets_l = list(targets_l)
    if tuple(targets_l[0].shape[2:]) != tuple(data_l.shape[2:]):
        raise ValueError(f"the first target {tuple(targets_l[0].shape)} must be full resolution like the data "
                         f"{tuple(data_l.shape)} (nnU-Net's deep-supervision list starts at full resolution)")
    b = data_l.shape[0]
    mask = random_box_mask(data_l.shape[2:], box_fraction, generator, data_l.device)
    masks = [resize_box_mask(mask, t.shape[2:]) for t in targets_l]
    full = (b, 1, *data_l.shape[2:])
    if data_u is None:
        images = paste(data_l, partner(data_l), mask)
        targets = [paste(t, partner(t), m) for t, m in zip(targets_l, masks)]
        return MixedBatch(images, targets, masks, (MixGroup(0, b, 1.0, 1.0),),
                          torch.zeros(full, dtype=torch.bool, device=data_l.device),
                          torch.ones(full, device=data_l.device))

    if pseudo_labels is None or confidence is None:
        raise ValueError("bidirectional copy-paste needs the teacher's pseudo labels and confidences on data_u")
    if data_u.shape != data_l.shape:
        raise ValueError(f"copy-paste pairs labeled and unlabeled patches one to one: got labeled "
                         f"{tuple(data_l.shape)} and unlabeled {tuple(data_u.shape)}; set "
                         f"unlabeled_batch_size=None (= the labeled batch size)")
    if tuple(pseudo_labels.shape) != full or tuple(confidence.shape) != full:
        raise ValueError(f"pseudo labels {tuple(pseudo_labels.shape)} and confidences {tuple(confidence.shape)} "
                         f"must be {full}")
    pseudo = pseudo_labels.detach().long()
    if keep is not None:
        pseudo = pseudo.masked_fill(~keep.bool(), DROPPED_LABEL)
    conf = confidence.detach().float()
    pseudo_scales = [resize_labels(pseudo, t.shape[2:]).to(t.dtype) for t in targets_l]
    x_in = paste(data_l, data_u, mask)  # labeled context, unlabeled box
    x_out = paste(data_u, partner(data_l), mask)  # unlabeled context, labeled box
    targets = [torch.cat([paste(t, p, m), paste(p, partner(t), m)])
               for t, p, m in zip(targets_l, pseudo_scales, masks)]
    inside = (mask < 0.5).expand(full)
    from_pseudo = torch.cat([inside, ~inside])
    ones = torch.ones_like(conf)
    confidence_m = torch.cat([paste(ones, conf, mask), paste(conf, ones, mask)])
    return MixedBatch(torch.cat([x_in, x_out]), targets, masks, bidirectional_groups(b, 1.0, unlabeled_weight),
                      from_pseudo, confidence_m)


def mixed_region_loss(logits: torch.Tensor, target: torch.Tensor, box_mask: torch.Tensor,
                      groups: Sequence[MixGroup], ignore_index: Optional[int] = None, smooth: float = 1e-5,
                      include_background: bool = True, present_only: bool = False) -> torch.Tensor:
    """Σ_groups [w_context (CE + Dice)(region M) + w_patch (CE + Dice)(region 1 − M)] (BCP mix_loss, MPER Eq. 4).

    ``logits`` ``(N, C, *S)`` (gradient), ``target`` ``(N, 1, *S)`` and ``box_mask`` ``(1, 1, *S)`` constants.
    A region with weight 0 contributes exactly 0 (and no gradient). ``include_background`` and
    ``present_only`` select the Dice classes (``region_ce_dice``).
    """
    total = logits.new_zeros((), dtype=torch.float32)
    for g in groups:
        regions = tuple((m, w) for m, w in ((box_mask, g.context_weight), (1.0 - box_mask, g.patch_weight)) if w != 0)
        if regions:
            total = total + region_ce_dice(logits[g.start:g.stop], target[g.start:g.stop], regions, ignore_index,
                                           smooth, include_background, present_only)
    return total


def mixed_deep_supervision_loss(outputs: Sequence[torch.Tensor], batch: MixedBatch, scale_weights: Sequence[float],
                                ignore_index: Optional[int] = None, groups: Optional[Sequence[MixGroup]] = None,
                                smooth: float = 1e-5, include_background: bool = True,
                                present_only: bool = False) -> torch.Tensor:
    """Σ_s w_s · mixed_region_loss(outputs[s], batch.targets[s]) over nnU-Net's deep-supervision scales.

    ``outputs`` are the student's logits per scale (full resolution first), ``scale_weights`` nnU-Net's
    deep-supervision weights (scales with weight 0 are skipped, as nnU-Net's wrapper does). ``groups``
    defaults to ``batch.groups``; pass e.g. ``bidirectional_groups(B, 0, 1)`` for the pseudo-labeled regions only.
    """
    if len(outputs) != len(batch.targets) or len(scale_weights) != len(outputs):
        raise ValueError(f"{len(outputs)} network outputs, {len(batch.targets)} targets and "
                         f"{len(scale_weights)} deep-supervision weights must match")
    groups = batch.groups if groups is None else groups
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for logits, target, mask, w in zip(outputs, batch.targets, batch.box_masks, scale_weights):
        if w != 0:
            total = total + w * mixed_region_loss(logits, target, mask, groups, ignore_index, smooth,
                                                  include_background, present_only)
    return total
