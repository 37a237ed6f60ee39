"""Balanced assignment of pixels to the K sub-prototypes of their class (Sinkhorn-Knopp, ProtoSeg style).

Used by PCCS's "prototype updating prototype" (docs/methods/pccs.md, 'One training step'): within each class, pixels are
spread evenly over the class's K prototypes so that no sub-prototype collapses or starves. All
classes are solved at once (masked), in float32 with autocast disabled and without gradient. The
marginals are global: every statistic summed over pixels goes through ``reduce_fn``, so DDP ranks
solve the same transport problem and agree on the result.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]
_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_assignment(scores: torch.Tensor, membership: torch.Tensor, epsilon: float = 0.05,
                        iterations: int = 4, reduce_fn: Optional[Reducer] = None) -> torch.Tensor:
    """Soft balanced assignment ``Q`` of pixels to the sub-prototypes of their class.

    Per class c with pixel set N_c (global size n_c), Q_c ∝ exp(scores / ε) is alternately rescaled so
    that every sub-prototype receives n_c / K pixels' mass and every pixel a mass of 1 (``iterations``
    rounds of Sinkhorn-Knopp, starting with the sub-prototype marginal).

    Args:
        scores: ``(N, C, K)`` cosine similarities of each pixel with each sub-prototype, in [−1, 1]
            (values are clamped there; the exponent ``(s − 1)/ε`` is then ≤ 0, so nothing overflows and
            ε = 0.05 keeps the smallest value e^−40 a normal float32).
        membership: ``(N, C)`` bool, the class of each pixel (one-hot; all-False rows are unassigned).
        epsilon: entropic regularisation ε (0.05 in PCCS / ProtoSeg).
        iterations: Sinkhorn rounds (4 in PCCS / ProtoSeg).
        reduce_fn: sums a tensor across DDP ranks (identity if None).
    Returns: ``(N, C, K)`` float32 plan, rows of member pixels summing to 1 over K, 0 elsewhere (no gradient).
    """
    if epsilon <= 0:
        raise ValueError(f"Sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"Sinkhorn iterations must be >= 1, got {iterations}")
    if scores.dim() != 3 or membership.shape != scores.shape[:2]:
        raise ValueError(f"scores must be (N, C, K) and membership (N, C), got {tuple(scores.shape)} and "
                         f"{tuple(membership.shape)}")
    reduce_fn = reduce_fn or (lambda t: t)
    num_sub = scores.shape[2]
    with torch.autocast(device_type=scores.device.type, enabled=False):
        member = membership.float().unsqueeze(-1)  # (N, C, 1)
        q = torch.exp((scores.float().clamp(-1.0, 1.0) - 1.0) / epsilon) * member
        n_c = reduce_fn(member.sum(0)).clamp_min(1.0)  # (C, 1) global pixels per class
        q = q / reduce_fn(q.sum(dim=(0, 2))).clamp_min(_TINY).view(1, -1, 1)
        for _ in range(iterations):
            q = q / reduce_fn(q.sum(0)).clamp_min(_TINY).unsqueeze(0) / num_sub  # each sub-prototype: 1/K
            q = q / q.sum(2, keepdim=True).clamp_min(_TINY) / n_c.unsqueeze(0)  # each pixel: 1/n_c
        return q * n_c.unsqueeze(0)
