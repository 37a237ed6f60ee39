"""Ensembles of prototype classifiers: per-set similarities, voting pseudo labels, regional prototypes.

These are the pure-tensor pieces of MSPA (Zhang, Tian, Jiao, arXiv 2206.01739; docs/methods/mspa.md),
generalised from the paper's binary rule to any class count (docs/methods/mspa.md, 'Voting rule'):

* several prototype *sets* (one per labeled image) each classify a feature map by cosine similarity
  (paper Eqs. 2, 5);
* the hard predictions of the sets plus the network's own argmax are *voters*; per voxel and class
  ``V_c`` counts the voters that predict c (the paper's vote sum S_sum, Eq. 6, is V_fg);
* the pseudo label is the class with the most votes when it has at least ``threshold`` of them and no
  other class has as many (paper Eq. 7: foreground where at least 3 of 5 vote foreground);
* the agreement regions of each pseudo-labelled class are split by vote count into an *uncertain* and a
  *reliable* part (paper Eq. 10: R_3 / R_4 for the foreground, R_2 / R_1 for the background);
* regional prototypes are probability-weighted masked averages inside those regions (Eq. 10), and the
  alignment loss pulls each uncertain prototype towards the reliable one of the same class (Eq. 11).

Conventions as in ``nnunet_proto.ops.prototypes``: ``(B, C, *spatial)`` maps, 2D and 3D alike, float32
maths with autocast disabled, absent classes/empty regions flagged invalid and never a 0/0. Label maps
use ``NO_LABEL`` (-1) for "no vote"/"no pseudo label"; ``labels_to_onehot`` turns such voxels into
all-zero rows, so they take part in no prototype and no loss. Voting itself is integer logic and
carries no gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nnunet_proto.ops.losses import masked_mean
from nnunet_proto.ops.prototypes import (
    Prototypes,
    cosine_similarity_map,
    masked_average_pooling,
    resize_masks,
)

#: label value for "abstains" (a voter) / "no pseudo label" (a voxel)
NO_LABEL = -1

#: how the agreement region of a pseudo-labelled class is split into uncertain and reliable parts;
#: see ``reliable_vote_range``
RELIABLE_RULES = ("next_level", "next_level_and_unanimous", "unanimous")


def majority_threshold(num_voters: int) -> int:
    """Default vote threshold: a strict majority, ``floor(num_voters / 2) + 1``.

    For the paper's 5 voters (N = 4 labeled prototype sets + the network) this is 3 (Eq. 7) and equals
    ``ceil(num_voters / 2)``; for an even number of voters it is one vote more, so that a tie can never
    become a pseudo label. With 2 voters (N = 1) it requires agreement (docs/methods/mspa.md, 'Voting rule').
    """
    if num_voters < 1:
        raise ValueError(f"num_voters must be >= 1, got {num_voters}")
    return num_voters // 2 + 1


def resolve_vote_threshold(num_voters: int, threshold: Optional[int] = None) -> int:
    """The threshold actually used with ``num_voters`` voters.

    ``None`` gives ``majority_threshold``. A configured threshold above ``num_voters`` (possible when a
    batch holds fewer labeled patches than configured prototype sets) is lowered to ``num_voters``,
    i.e. unanimity, the strictest rule that can still be met.
    """
    if threshold is None:
        return majority_threshold(num_voters)
    if threshold < 1:
        raise ValueError(f"vote threshold must be >= 1 (or None for a strict majority), got {threshold}")
    return min(int(threshold), num_voters)


def count_votes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Votes per class: ``V[b, c, x] = #{v : labels[b, v, x] == c}``.

    Args:
        labels: ``(B, V, *spatial)`` integer predictions of V voters; values outside ``[0, num_classes)``
            (e.g. ``NO_LABEL``) abstain.
        num_classes: C.
    Returns: ``(B, C, *spatial)`` int64 vote counts (no gradient; paper Eq. 6 generalised, S_sum = V_1
    for binary tasks).
    """
    if labels.dim() < 3:
        raise ValueError(f"labels must be (B, V, *spatial), got {tuple(labels.shape)}")
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    votes = torch.zeros((labels.shape[0], num_classes, *labels.shape[2:]), dtype=torch.long, device=labels.device)
    # each voter adds 1 to its class; abstaining voters (invalid labels) add 0 -- no (B, V, *S, C) one-hot
    return votes.scatter_add_(1, safe, valid.long())


def majority_vote(votes: torch.Tensor, threshold: int) -> torch.Tensor:
    """Voting pseudo label (paper Eq. 7 generalised to C classes).

    The pseudo label of a voxel is the class with the most votes if that class has at least
    ``threshold`` votes and no other class has as many; otherwise the voxel gets ``NO_LABEL``.

    Args:
        votes: ``(B, C, *spatial)`` vote counts (``count_votes``).
        threshold: minimum number of votes (``resolve_vote_threshold``).
    Returns: ``(B, 1, *spatial)`` int64 labels in ``[0, C)`` or ``NO_LABEL``.
    """
    top2 = votes.topk(min(2, votes.shape[1]), dim=1)
    best, label = top2.values[:, :1], top2.indices[:, :1]
    unique = best > top2.values[:, 1:2] if votes.shape[1] > 1 else torch.ones_like(best, dtype=torch.bool)
    keep = unique & (best >= threshold)
    return torch.where(keep, label, torch.full_like(label, NO_LABEL))


def reliable_vote_range(num_voters: int, threshold: int, rule: str = "next_level") -> Tuple[int, int]:
    """Vote counts ``[lo, hi]`` that make a pseudo-labelled voxel *reliable*; fewer than ``lo`` is *uncertain*.

    Rules (``threshold`` t, ``num_voters`` v):

    * ``"next_level"`` (paper, Eqs. 10-11 as written): uncertain = exactly t votes, reliable = t + 1
      votes; unanimous voxels are left out (the paper's R_3 vs R_4 and R_2 vs R_1 with 5 voters; R_5 and
      R_0 are unused). When t + 1 is already unanimity (v <= 3) the unanimous level is the reliable one,
      otherwise the reliable region would be empty by construction.
    * ``"next_level_and_unanimous"``: as above, but unanimous voxels are reliable too (our
      option, docs/methods/mspa.md 'Uncertain and reliable regions': reliable = {4, 5} and {0, 1}).
    * ``"unanimous"``: reliable = all v voters agree, uncertain = t .. v - 1 votes (our multi-class option).

    Returns ``(lo, hi)`` with ``lo <= hi <= v``; voxels with ``t <= V < lo`` are uncertain.
    """
    if rule not in RELIABLE_RULES:
        raise ValueError(f"reliable rule must be one of {RELIABLE_RULES}, got {rule!r}")
    if not 1 <= threshold <= num_voters:
        raise ValueError(f"threshold must be in [1, num_voters={num_voters}], got {threshold}")
    if rule == "unanimous":
        return num_voters, num_voters
    lo = min(threshold + 1, num_voters)
    hi = num_voters if (rule == "next_level_and_unanimous" or lo == num_voters) else num_voters - 1
    return lo, hi


def vote_regions(votes: torch.Tensor, pseudo: torch.Tensor, reliable_lo: int,
                 reliable_hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uncertain and reliable agreement regions of every pseudo-labelled class.

    ``uncertain[b, c, x] = pseudo == c and V_c < reliable_lo``; ``reliable[b, c, x] = pseudo == c and
    reliable_lo <= V_c <= reliable_hi``. Voxels without a pseudo label belong to no region.

    Args:
        votes: ``(B, C, *spatial)`` vote counts.
        pseudo: ``(B, 1, *spatial)`` pseudo labels (``majority_vote``).
    Returns: two float32 0/1 masks ``(B, C, *spatial)`` (no gradient).
    """
    classes = torch.arange(votes.shape[1], device=votes.device).view(1, -1, *([1] * (votes.dim() - 2)))
    labelled = pseudo == classes  # (B, C, *S); NO_LABEL matches no class
    uncertain = labelled & (votes < reliable_lo)
    reliable = labelled & (votes >= reliable_lo) & (votes <= reliable_hi)
    return uncertain.float(), reliable.float()


def regional_prototypes(features: torch.Tensor, probs: torch.Tensor, region: torch.Tensor) -> Prototypes:
    """Probability-weighted regional prototypes per image and class (paper Eq. 10).

    ``R_c = sum_x p_c(x) F(x) 1[x in region_c] / sum_x p_c(x) 1[x in region_c]``.

    Args:
        features: ``(B, D, *s)`` feature map (attached or not; the caller decides).
        probs: ``(B, C, *S)`` class probabilities used as soft weights (detach them to use them only as
            weights).
        region: ``(B, C, *S)`` 0/1 region masks (``vote_regions``); ``S`` may be finer than ``s``: the
            weights are area-averaged to the feature resolution.
    Returns: per-image ``Prototypes`` with vectors ``(B, C, D)``; an empty region (or one whose weights
    are all 0) is flagged invalid and its vector is 0.
    """
    if probs.shape != region.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and region {tuple(region.shape)} must have the same shape")
    weights = resize_masks(probs.float() * region.float(), tuple(features.shape[2:]))
    return masked_average_pooling(features, weights, "per_image")


def regional_alignment_loss(uncertain: Prototypes, reliable: Prototypes, detach_reliable: bool = True,
                            normalize: bool = True) -> torch.Tensor:
    """Self-prototype alignment (paper Eq. 11): ``||R_unc,c − R_rel,c||²`` summed over classes.

    With ``normalize`` the prototypes are L2-normalised first, so the distance is 2 − 2·cos ∈ [0, 4]:
    independent of the (unbounded) scale of the feature map, like the cosine classifiers of LPA/UPA.

    Per image the squared L2 distances of all classes whose uncertain *and* reliable regions are
    non-empty are summed (the paper sums the foreground and background terms); the result is averaged
    over the images that have at least one such class. With no valid pair in the batch the loss is
    exactly 0 and stays connected to the graph (never NaN).

    Args:
        uncertain / reliable: per-image ``Prototypes`` ``(B, C, D)`` (``regional_prototypes``).
        detach_reliable: stop the gradient on the reliable prototypes, so that only the uncertain
            regions move towards them (default, docs/methods/mspa.md; the paper says it pulls the uncertain
            region towards the reliable one).
        normalize: compare directions (default) instead of raw vectors (paper's literal Eq. 11).
    Returns: float32 scalar.
    """
    if uncertain.vectors.dim() != 3 or uncertain.vectors.shape != reliable.vectors.shape:
        raise ValueError(f"need per-image prototypes of equal shape (B, C, D), got {tuple(uncertain.vectors.shape)} "
                         f"and {tuple(reliable.vectors.shape)}")
    target = reliable.vectors.detach() if detach_reliable else reliable.vectors
    with torch.autocast(device_type=target.device.type, enabled=False):
        u, r = uncertain.vectors.float(), target.float()
        if normalize:  # invalid (zero) rows stay zero and are masked out by `pair` below
            u = torch.nn.functional.normalize(u, dim=-1, eps=1e-6)
            r = torch.nn.functional.normalize(r, dim=-1, eps=1e-6)
        dist = ((u - r) ** 2).sum(-1)  # (B, C)
        pair = (uncertain.valid & reliable.valid).float()
        per_image = (dist * pair).sum(-1)  # (B,)
        return masked_mean(per_image, pair.sum(-1) > 0)


def prototype_set_similarities(features: torch.Tensor, prototype_sets: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every voxel with every class prototype of several sets (paper Eq. 2).

    Args:
        features: ``(B, D, *s)``.
        prototype_sets: ``(K, C, D)``: K prototype sets (e.g. one per labeled image), shared by the batch.
    Returns: ``G`` of shape ``(B, K, C, *s)``, float32; ``G[b, k, c] = cos(F_b(x), p_kc)``. A zero
    (invalid) prototype gives 0; callers mask invalid classes.
    """
    if prototype_sets.dim() != 3:
        raise ValueError(f"prototype_sets must be (K, C, D), got {tuple(prototype_sets.shape)}")
    k, c, d = prototype_sets.shape
    sim = cosine_similarity_map(features, prototype_sets.reshape(k * c, d))  # (B, K*C, *s)
    return sim.reshape(sim.shape[0], k, c, *sim.shape[2:])


def set_predictions(similarities: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hard prediction of every prototype set (paper Eq. 5): argmax over its valid classes.

    Args:
        similarities: ``(B, K, C, *S)`` (``prototype_set_similarities``, resized as needed).
        valid: ``(K, C)`` bool, which classes each set has a prototype for.
    Returns: ``(B, K, *S)`` int64 labels; a set without any valid class abstains (``NO_LABEL``).
    """
    if valid.shape != similarities.shape[1:3]:
        raise ValueError(f"valid {tuple(valid.shape)} must be (K, C) = {tuple(similarities.shape[1:3])}")
    shape = (1, *valid.shape) + (1,) * (similarities.dim() - 3)
    masked = similarities.masked_fill(~valid.view(shape), float("-inf"))
    labels = masked.max(dim=2).indices  # = argmax(dim=2) (first maximum), much faster on CPU
    has_any = valid.any(dim=1).view(1, -1, *([1] * (labels.dim() - 2)))
    return torch.where(has_any, labels, torch.full_like(labels, NO_LABEL))
