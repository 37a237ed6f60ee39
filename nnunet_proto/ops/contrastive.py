"""Segment (group) averaging and the multi-positive prototype contrastive loss of PCCS (docs/methods/pccs.md).

All maths in float32 with autocast disabled; similarities ``s_ij = v_i·v_j / τ`` reach 1/τ = 20 for
τ = 0.05, and e^20 overflows fp16, so the loss is written with logsumexp / softplus and never
exponentiates a similarity directly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nnunet_proto.ops.uncertainty import uncertainty_weights

#: eps of the L2 normalisation of prototypes (as nnunet_proto.ops.prototypes.NORM_EPS)
NORM_EPS = 1e-6
#: stands in for -inf in masked logsumexps: exp(-1e4) is exactly 0 in float32, and unlike -inf it
#: keeps the backward pass of an all-masked row finite (d logsumexp over only -inf entries is NaN)
MASKED = -1.0e4


def segment_sums(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of rows grouped by segment id (a scatter-add; the sufficient statistics of a mean).

    Args:
        values: ``(N, D)`` rows (e.g. pixel features); gradient flows into them.
        segments: ``(N,)`` int64 segment id in ``[0, num_segments)``, or ``-1`` for rows that belong to none.
        num_segments: S.
    Returns: ``(S, D)`` float32 sums and ``(S,)`` float32 counts.
    """
    if values.dim() != 2 or segments.shape != values.shape[:1]:
        raise ValueError(f"values must be (N, D) and segments (N,), got {tuple(values.shape)} and "
                         f"{tuple(segments.shape)}")
    with torch.autocast(device_type=values.device.type, enabled=False):
        keep = segments >= 0
        # rows without a segment go to an extra dump row that is dropped
        idx = torch.where(keep, segments, torch.full_like(segments, num_segments))
        sums = values.float().new_zeros(num_segments + 1, values.shape[1]).index_add(0, idx, values.float())
        counts = values.new_zeros(num_segments + 1, dtype=torch.float32).index_add(
            0, idx, keep.float())
    return sums[:num_segments], counts[:num_segments]


def prototype_contrastive_loss(prototypes: torch.Tensor, labels: torch.Tensor,
                               uncertainty: Optional[torch.Tensor] = None, temperature: float = 0.05,
                               weighting: str = "entropy", detach_weights: bool = True) -> torch.Tensor:
    """Uncertainty-weighted multi-positive prototype contrastive loss (PCCS code ``_loss_constrative_by_multilayer``).

    With unit vectors v_i (rows of ``prototypes`` after L2 normalisation), class c_i and
    ``s_ij = v_i·v_j / τ``:

    * positives pos(i) = {j ≠ i : c_j = c_i}, negatives neg(i) = {k : c_k ≠ c_i};
    * ``N_i = Σ_{k∈neg(i)} exp(s_ik)``;
    * ``ℓ_ij = log(exp(s_ij) + N_i) − s_ij = softplus(log N_i − s_ij)`` (InfoNCE with only the negatives
      and the positive itself in the denominator; 0 when i has no negative);
    * similarity-weighted positives ``a_ij = softmax_{j∈pos(i)}(s_ij)``;
    * ``ℓ_i = Σ_{j∈pos(i)} a_ij ℓ_ij``; rows without positives are dropped (the code divides 0 by 0);
    * ``L = Σ_i w_i ℓ_i`` with ``w = uncertainty_weights(u, rows with positives, weighting)``
      (uniform over those rows if ``uncertainty`` is None).

    Args:
        prototypes: ``(P, D)``, need not be normalised; gradient flows through them (student side).
        labels: ``(P,)`` int class of each prototype.
        uncertainty: ``(P,)`` u_i = entropy of the prototype's mean probabilities, or None.
        temperature: τ (0.05 in PCCS).
        weighting: ``"entropy"`` (w ∝ e^u, the code) or ``"confidence"`` (w ∝ e^−u).
        detach_weights: detach a_ij and w_i (default, our choice; the official code keeps their gradient).
    Returns: float32 scalar, finite for any input; exactly 0 (graph kept) if no row has a positive.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if prototypes.dim() != 2 or labels.shape != prototypes.shape[:1]:
        raise ValueError(f"prototypes must be (P, D) and labels (P,), got {tuple(prototypes.shape)} and "
                         f"{tuple(labels.shape)}")
    with torch.autocast(device_type=prototypes.device.type, enabled=False):
        v = F.normalize(prototypes.float(), dim=1, eps=NORM_EPS)
        s = v @ v.t() / temperature  # (P, P)
        same = labels.view(-1, 1) == labels.view(1, -1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        log_neg = torch.logsumexp(s.masked_fill(~neg, MASKED), dim=1, keepdim=True)  # log N_i (≈ -1e4 if none)
        pair_loss = F.softplus(log_neg - s)  # ℓ_ij for every pair; only positives are used
        a = torch.softmax(s.masked_fill(~pos, MASKED), dim=1) * pos.float()
        if detach_weights:
            a = a.detach()
        row_loss = (a * pair_loss).sum(dim=1)  # ℓ_i, 0 for rows without positives
        has_pos = pos.any(dim=1)
        if uncertainty is None:
            uncertainty = torch.zeros(len(labels), device=prototypes.device)
        w = uncertainty_weights(uncertainty, has_pos, weighting, detach=detach_weights)
        return (w * row_loss).sum()
