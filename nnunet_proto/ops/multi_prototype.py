"""Multi-prototype classifier, nearest-prototype InfoNCE and momentum prototype update (MPER, docs/methods/mper.md).

The prototype bank is a ``(C, K, D)`` tensor: K prototypes ("sub-centres") per class, class-major,
raw (unnormalised) embedding vectors that are L2-normalised when a cosine is taken. It is not a
parameter: gradient flows into the voxel embeddings only.

Conventions: embeddings ``(B, D, *S)``, label maps ``(B, 1, *S)``, 2D or 3D; float32 maths with
autocast disabled; empty selections give 0 / "no update", never 0/0.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunet_proto.ops.losses import cross_entropy_ignore
from nnunet_proto.ops.prototypes import cosine_similarity_map

CONTRAST_IGNORE_MODES = ("none", "background", "index0")


def _check_bank(bank: torch.Tensor, features: Optional[torch.Tensor] = None) -> None:
    if bank.dim() != 3:
        raise ValueError(f"prototype bank must be (C, K, D), got {tuple(bank.shape)}")
    if features is not None and features.shape[1] != bank.shape[2]:
        raise ValueError(f"embeddings have {features.shape[1]} channels but the prototype bank has dimension "
                         f"{bank.shape[2]}; build the bank from the same feature layer")


def multi_prototype_similarity(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every voxel embedding with every prototype: ``(B, C, K, *S)`` float32.

    ``features`` ``(B, D, *S)`` (gradient kept), ``bank`` ``(C, K, D)`` (used as a constant).
    """
    _check_bank(bank, features)
    c, k, d = bank.shape
    sim = cosine_similarity_map(features, bank.detach().reshape(c * k, d))  # (B, C*K, *S)
    return sim.reshape(sim.shape[0], c, k, *sim.shape[2:])


def multi_prototype_dot(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Unnormalised dot products z·p with every prototype, ``(B, C, K, *S)`` float32 (paper Eq. 5 read literally)."""
    _check_bank(bank, features)
    with torch.autocast(device_type=features.device.type, enabled=False):
        dots = torch.einsum("bdn,ckd->bckn", features.float().flatten(2), bank.detach().float())
    return dots.reshape(features.shape[0], bank.shape[0], bank.shape[1], *features.shape[2:])


def multi_prototype_logits(similarity: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prototype classifier (MPER Eq. 1): logit_c(x) = max_k sim(z(x), p_c^k) / τ1.

    Args:
        similarity: ``(B, C, K, *S)`` from ``multi_prototype_similarity``.
        tau: temperature τ1 (paper 0.1, so logits lie in [−10, 10]).
    Returns: class logits ``(B, C, *S)`` (softmax over C gives ŷ^p of Eq. 1; gradient flows into the
    embeddings through the selected prototype) and the index k* of the best prototype per class
    ``(B, C, *S)`` (long, no gradient).
    """
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    best, k_star = similarity.max(dim=2)
    return best / tau, k_star


def nearest_prototype_infonce(similarity: torch.Tensor, tau: float, keep: Optional[torch.Tensor] = None,
                              ignore: str = "none", labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE with the nearest prototype as the positive (MPER Eq. 5), averaged over kept voxels.

    L = −log exp(s(z, p*)/τ2) / Σ_{c,k} exp(s(z, p_c^k)/τ2), all C·K prototypes in the denominator.
    The positive p* (computed from detached values) is

    * without ``labels`` (paper Eq. 5): the nearest prototype of *any* class, argmax over all C·K;
    * with ``labels``: the nearest prototype *of the voxel's class* y, p* = p_y^{k*}, k* = argmax_k
      s(z, p_y^k). Then the loss never pulls a voxel into another class's cluster (with the paper's
      rule a right-ventricle voxel closest to a background prototype is pulled into the background).

    Args:
        similarity: ``(B, C, K, *S)`` cosine (or dot) similarities, gradient into the embeddings.
        tau: temperature τ2 (paper 0.1).
        keep: ``(B, 1, *S)`` bool, voxels that take part (e.g. not ignore-label); all when None.
        ignore: ``"none"`` (paper), ``"background"`` (drop voxels whose positive belongs to class 0) or
            ``"index0"`` (official code: ``ignore_index=0`` drops only voxels whose positive is
            prototype (class 0, k 0)).
        labels: ``(B, 1, *S)`` integer classes for class-restricted positives; voxels with a label
            outside [0, C) (ignore label, a gated-out pseudo label) take no part.
    Returns a float32 scalar; 0 when no voxel is kept.
    """
    if ignore not in CONTRAST_IGNORE_MODES:
        raise ValueError(f"ignore must be one of {CONTRAST_IGNORE_MODES}, got {ignore!r}")
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    num_c, num_k = similarity.shape[1], similarity.shape[2]
    logits = similarity.flatten(1, 2) / tau  # (B, C*K, *S), class-major
    mask = torch.ones(logits.shape[:1] + logits.shape[2:], dtype=torch.bool, device=logits.device) \
        if keep is None else keep[:, 0].to(torch.bool)
    if labels is None:
        target = logits.detach().argmax(dim=1)  # (B, *S)
    else:
        if labels.shape[0] != similarity.shape[0] or tuple(labels.shape[2:]) != tuple(similarity.shape[3:]):
            raise ValueError(f"labels {tuple(labels.shape)} must be (B, 1, *S) for similarities "
                             f"{tuple(similarity.shape)}")
        y = labels[:, 0].long()
        valid = (y >= 0) & (y < num_c)
        y = torch.where(valid, y, torch.zeros_like(y))
        own = similarity.detach().gather(1, y[:, None, None].expand(-1, 1, num_k, *y.shape[1:]))  # (B, 1, K, *S)
        target = y * num_k + own[:, 0].argmax(dim=1)
        mask = mask & valid
    if ignore == "background":
        mask &= target >= num_k
    elif ignore == "index0":
        mask &= target != 0
    return cross_entropy_ignore(logits, torch.where(mask, target, torch.full_like(target, -100)))


def cluster_statistics(features: torch.Tensor, labels: torch.Tensor, select: torch.Tensor,
                       bank: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of the embeddings assigned to each prototype (MPER paper §II.A, Eq. 2).

    Every selected voxel with label c ∈ [0, C) is assigned to the prototype of class c it is most
    similar to (cosine): k*(x) = argmax_k cos(z(x), p_c^k). No gradient.

    Args:
        features: ``(B, D, *S)`` embeddings (detached here).
        labels: ``(B, 1, *S)`` integer labels (the mixed label Ŷ^m).
        select: ``(B, 1, *S)`` bool, voxels allowed to update (labeled, or confident pseudo-labeled).
        bank: ``(C, K, D)``.
    Returns: ``sums`` ``(C, K, D)`` of raw embeddings and ``counts`` ``(C, K)``, float32; add them
    across DDP ranks before ``momentum_update``.
    """
    _check_bank(bank, features)
    c, k, d = bank.shape
    with torch.no_grad(), torch.autocast(device_type=features.device.type, enabled=False):
        lab = labels[:, 0].long()
        sel = select[:, 0].to(torch.bool) & (lab >= 0) & (lab < c)
        b_idx, *sp_idx = sel.nonzero(as_tuple=True)
        z = features.detach()[(b_idx, slice(None), *sp_idx)].float()  # (N, D)
        cls = lab[(b_idx, *sp_idx)]  # (N,)
        own = F.normalize(bank.float(), dim=-1, eps=1e-6)[cls]  # (N, K, D): prototypes of the voxel's class
        k_star = torch.einsum("nkd,nd->nk", own, F.normalize(z, dim=-1, eps=1e-6)).argmax(dim=1)
        index = cls * k + k_star
        sums = torch.zeros(c * k, d, device=features.device).index_add_(0, index, z)
        counts = torch.bincount(index, minlength=c * k).float()
    return sums.view(c, k, d), counts.view(c, k)


def momentum_update(bank: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float,
                    classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """p ← η p + (1 − η) z̄ for every prototype with a non-empty cluster (MPER Eq. 2); a new tensor.

    Args:
        bank: ``(C, K, D)``; sums/counts from ``cluster_statistics`` (summed over ranks).
        momentum: η in [0, 1) (paper 0.999).
        classes: ``(C,)`` bool, classes allowed to move (e.g. all but background); all when None.
    Prototypes with an empty cluster, or of a class not allowed, keep their value exactly.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    with torch.no_grad():
        bank32 = bank.float()
        mean = sums.float() / counts.float().clamp_min(1.0).unsqueeze(-1)
        move = counts > 0
        if classes is not None:
            move &= classes.to(move.device).view(-1, 1)
        updated = momentum * bank32 + (1.0 - momentum) * mean
        return torch.where(move.unsqueeze(-1), updated, bank32).to(bank.dtype)


def update_bank(bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, select: torch.Tensor,
                momentum: float, classes: Optional[torch.Tensor] = None,
                reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[torch.Tensor, int]:
    """One momentum step of the bank from the selected voxels; returns (new bank, voxels used on this rank)."""
    sums, counts = cluster_statistics(features, labels, select, bank)
    used = int(counts.sum().item())
    if reduce_fn is not None:
        sums, counts = reduce_fn(sums), reduce_fn(counts)
    return momentum_update(bank, sums, counts, momentum, classes), used
