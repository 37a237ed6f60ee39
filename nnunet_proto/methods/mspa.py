"""MSPA: mutual- and self-prototype alignment (Zhang, Tian, Jiao; arXiv 2206.01739); docs/methods/mspa.md.

One network, no teacher (paper §2). Per training step, with N = min(n_pairs, labeled patches):

* LPA, labeled → unlabeled (Eqs. 1-4): one prototype set p_i = MAP(f_li, Y_li) per labeled patch
  i = 1..N; each set scores the unlabeled features by cosine similarity G_ui = cos(f_u, p_i); the scores
  are summed (paper) or averaged (default) over the sets and softmaxed, M̂_u = softmax_c(Σ_i G_ui^c / τ);
  L_LPA = mean_{c,x} (Ŝ_up − M̂_u)², Ŝ_up the network's own softmax on the unlabeled patch.
* UPA, unlabeled → labeled (Eqs. 5-9): the N sets' argmaxes and the network's argmax vote; the voting
  pseudo label S_u gives unlabeled prototypes p_u = MAP(f_u, S_u), averaged over the unlabeled patches
  (Eq. 8); they classify the labeled features, L_UPA = CE(softmax_c cos(f_l, p_u), Y_l).
* SPA, inside each unlabeled patch (Eqs. 10-11): regional prototypes weighted by Ŝ_up in the
  uncertain and reliable agreement regions of every class; L_SPA = Σ_c ||R_unc,c − sg(R_rel,c)||².
* Total (Eq. 12): L = L_sup + λ(t)·(L_LPA + L_UPA + L_SPA), λ(t) = w_max·exp(−5(1 − t/t_max)²).

Multi-class voting (docs/methods/mspa.md 'Voting rule', generalising Eq. 7): V_c(x) = number of the N + 1 voters whose
argmax is c; pseudo label = argmax_c V_c where the maximum is unique and reaches the threshold
(default: strict majority, 3 of 5 as in the paper), otherwise the voxel is unlabeled. See
``nnunet_proto.ops.voting`` and docs/methods/mspa.md for the rule with worked examples.

Changes for nnU-Net's regime (docs/methods/mspa.md, last section; ``MSPAConfig.paper()`` restores the
literal form): cosine classifiers with temperature τ = 0.1 and the LPA cosines averaged (not summed)
over the sets; M̂_u (LPA) and p_u (UPA) are detached targets; UPA's voting pseudo labels are gated by
the network's confidence; L_SPA compares L2-normalised prototypes (scale-free).

Absent classes: a labeled set without class c does not vote for c, and the LPA score of c is the sum
over the sets that have c rescaled by N / (number of such sets), which equals the paper's plain sum
when every set has every class; a class no set has gets logit −inf. Unlabeled prototypes of classes
without pseudo-labelled voxels are invalid; their labeled target voxels are ignored in L_UPA. The
ignore label (and nnU-Net's −1 padding) takes part in no prototype and no loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.losses import cross_entropy_ignore, masked_mean
from nnunet_proto.ops.prototypes import (
    channel_argmax,
    labels_to_onehot,
    mask_invalid_logits,
    masked_average_pooling,
    prototype_logits,
    prototype_targets,
    resize_logits,
    resize_masks,
)
from nnunet_proto.ops.pseudo_labels import class_shares, confidence_gate
from nnunet_proto.ops.voting import (
    NO_LABEL,
    RELIABLE_RULES,
    count_votes,
    majority_vote,
    prototype_set_similarities,
    regional_alignment_loss,
    regional_prototypes,
    reliable_vote_range,
    resolve_vote_threshold,
    set_predictions,
    vote_regions,
)

LABELED_PROTOTYPE_MASKS = ("gt", "pred")
SET_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class MSPAConfig(SemiSupervisedConfig):
    """MSPA hyperparameters. Where the paper is silent the value is our choice (docs/methods/mspa.md).

    Attributes:
        use_teacher: ``False``: the paper trains a single network; every prediction (the network's
            softmax Ŝ_up, its vote, the SPA weights) and every feature map comes from the student.
            ``True`` is refused: the paper has no teacher and this implementation does not define one.
        n_pairs: N, the number of labeled prototype sets per step (paper §3.1: 4, the labeled batch). The
            first min(n_pairs, labeled patches) labeled patches of the batch are used, so nnU-Net 3D batches
            of 2 give N = 2.
        vote_threshold: minimum votes of the winning class (paper Eq. 7: 3 of 5). ``None`` = strict
            majority floor((N+1)/2) + 1 of the N + 1 voters (3 for N = 4, agreement of both voters for N = 1,
            docs/methods/mspa.md 'Voting rule'); a value above N + 1 is lowered to N + 1 (unanimity). Ties never win.
        spa_reliable: how each pseudo-labelled class's region is split (``ops.voting.reliable_vote_range``):
            ``"next_level"`` (paper Eqs. 10-11 as written: uncertain = threshold votes, reliable = one vote
            more, unanimous voxels unused), ``"next_level_and_unanimous"`` (our option) or
            ``"unanimous"`` (our multi-class option: reliable = all voters agree).
        labeled_prototype_mask: mask of the labeled prototypes (Eq. 1): ``"gt"`` (our default;
            the paper's text says "predicted mask", which is ambiguous) or ``"pred"`` (the network's argmax on
            the labeled patch, ignore-label voxels excluded).
        temperature: τ of the cosine classifiers, logits = cos/τ in LPA (Eq. 3), in UPA (Eq. 9) and for
            the votes. Paper: no temperature (1.0). Default 0.1 (ours, the value of the prototype
            classifiers of ProtoSeg, Zhou et al. CVPR 2022, and MPER, Bi et al. ICASSP 2025): nnU-Net's
            decoder features come after a LeakyReLU and are nearly non-negative, so cos ∈ [0, 1] and with
            τ = 1 a 4-class softmax can never exceed e/(e + 3) ≈ 0.48; the UPA cross-entropy then never drops
            below 0.74 and pushes on the features for the whole run.
        lpa_set_reduction: how the N prototype sets' cosines are combined before the softmax of Eq. 3:
            ``"sum"`` (paper: Σ_i G_ui, so the effective temperature is τ/N) or ``"mean"`` (default, ours:
            (1/N) Σ_i G_ui, so τ means the same for any N, as in UPA's single set).
        lpa_detach_prototype_prediction: detach M̂_u in L_LPA, so the labeled-prototype ensemble is a
            soft target for the network's softmax Ŝ_up. Paper silent; default True (ours). False (the
            earlier symmetric choice) lets the MSE pull features and labeled prototypes
            towards the network's own prediction, which the cosine classifier cannot match.
        upa_detach_prototypes: detach the unlabeled prototypes p_u in L_UPA, so they are a fixed target that
            classifies the labeled features (as CPCL's teacher prototypes). Paper silent; default True (ours).
            False sends the labeled cross-entropy into the unlabeled features through pseudo-labelled
            prototypes, i.e. trains on ungated pseudo-label errors.
        pseudo_label_threshold: confidence gate on the voting pseudo label S_u (Eq. 7): a voxel keeps its
            voted class c only if the network's own argmax is c with softmax Ŝ_up^c ≥ threshold
            (``ops.pseudo_labels.confidence_gate``, per ``threshold_mode``).
            Paper: no gate (0.0). Default 0.9 (ours; MPER's α for trusting a pseudo label). It applies
            to the hard labels of UPA's prototypes; SPA's regions keep the paper's vote levels, because its
            uncertain region exists to be pulled towards the reliable one and Eq. 10 already weights every
            voxel by Ŝ_up.
        spa_detach_reliable: stop-gradient on the reliable regional prototypes (our default; the
            paper pulls the uncertain region towards the reliable one). False = symmetric.
        spa_normalize: compare L2-normalised regional prototypes in L_SPA (distance 2 − 2·cos ∈ [0, 4]).
            Our choice: MSPA classifies by cosine similarity (Eqs. 2-3), so a prototype's direction is what
            matters, while the literal ‖R_3 − R_4‖² of Eq. 11 grows with the unbounded scale of nnU-Net's
            decoder features. With the literal form our ACDC benchmark run diverged (L_SPA 1.6 → 135 as
            λ ramped up; the network collapsed to test Dice 0). False = the paper's raw distance.
        spa_detach_weights: use Ŝ_up in Eq. 10 as a constant soft weight (our choice; the paper calls it a
            weighting role). False lets the loss also change the network's confidences.
        lpa_weight / upa_weight / spa_weight: factors on λ(t) per term (paper Eq. 12: all 1). Setting one to
            0 reproduces the ablations of Table 1; the term is still computed and logged. Our default
            spa_weight is 0: with L_SPA at weight 1 the ACDC screening lost the right ventricle (validation
            Dice 37.8, RV 0), with weight 0 it kept every class (79.8, RV 76.8) on the same fold
            (docs/methods/mspa.md). ``paper()`` sets it back to 1.
        w_max: final weight of the Gaussian ramp (paper: not given; our assumption 0.1, the CPCL/UA-MT
            convention). rampup/rampup_length: Gaussian ramp over the whole run (paper: t_max = maximum
            training step).
        feature_layer: prototype features (paper silent; our choice: last decoder stage, full
            resolution). At a coarser layer, cosine scores are computed at feature resolution and the
            C-channel logits are upsampled; masks and SPA weights are area-averaged down.
    """

    use_teacher: bool = False
    n_pairs: int = 4
    vote_threshold: Optional[int] = None
    spa_reliable: str = "next_level"
    labeled_prototype_mask: str = "gt"
    temperature: float = 0.1
    lpa_set_reduction: str = "mean"
    lpa_detach_prototype_prediction: bool = True
    upa_detach_prototypes: bool = True
    pseudo_label_threshold: float = 0.9
    spa_detach_reliable: bool = True
    spa_detach_weights: bool = True
    spa_normalize: bool = True
    lpa_weight: float = 1.0
    upa_weight: float = 1.0
    spa_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.use_teacher:
            raise ValueError("MSPA trains a single network (paper §2); use_teacher=True is not supported. "
                             "Keep use_teacher=False.")
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1 (paper: 4), got {self.n_pairs}")
        if self.vote_threshold is not None and self.vote_threshold < 1:
            raise ValueError(f"vote_threshold must be >= 1 or None (strict majority), got {self.vote_threshold}")
        if self.spa_reliable not in RELIABLE_RULES:
            raise ValueError(f"spa_reliable must be one of {RELIABLE_RULES}, got {self.spa_reliable!r}")
        if self.labeled_prototype_mask not in LABELED_PROTOTYPE_MASKS:
            raise ValueError(f"labeled_prototype_mask must be one of {LABELED_PROTOTYPE_MASKS}, "
                             f"got {self.labeled_prototype_mask!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (paper: 1.0, default 0.1), got {self.temperature}")
        if self.lpa_set_reduction not in SET_REDUCTIONS:
            raise ValueError(f"lpa_set_reduction must be one of {SET_REDUCTIONS}, got {self.lpa_set_reduction!r}")
        for name in ("lpa_weight", "upa_weight", "spa_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def paper(cls, **changes: Any) -> "MSPAConfig":
        """The paper's literal form (arXiv 2206.01739 Eqs. 3, 7, 9, 11), for comparison with the defaults.

        No temperature, summed set cosines, no confidence gate, no stop-gradient on M̂_u or p_u (the paper
        is silent; this was our earlier symmetric choice) and the raw ‖R_unc − R_rel‖² of Eq. 11.
        """
        literal = dict(temperature=1.0, lpa_set_reduction="sum", lpa_detach_prototype_prediction=False,
                       upa_detach_prototypes=False, pseudo_label_threshold=0.0, spa_normalize=False,
                       spa_weight=1.0)
        return cls(**{**literal, **changes})


def mspa_losses(feats_l: torch.Tensor, target_l: torch.Tensor, feats_u: torch.Tensor, logits_u: torch.Tensor,
                num_classes: int, ignore_index: Optional[int], config: MSPAConfig,
                reduce_fn=None, logits_l: Optional[torch.Tensor] = None,
                diagnostics: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The three MSPA terms, unweighted.

    Args:
        feats_l: ``(B_l, D, *s)`` features of the labeled patches (attached).
        target_l: ``(B_l, 1, *S)`` labels at full resolution.
        feats_u: ``(B_u, D, *s)`` features of the unlabeled patches (attached).
        logits_u: ``(B_u, C, *S)`` the network's highest-resolution logits on the unlabeled patches.
        num_classes: C. ignore_index: nnU-Net's ignore label or None.
        reduce_fn: sums tensors across DDP ranks (unlabeled prototypes of Eq. 8 are batch-global).
        logits_l: ``(B_l, C, *S)`` labeled logits; needed only for ``labeled_prototype_mask="pred"``.
        diagnostics: if given, receives ``vote_labelled`` (share of unlabeled voxels with a majority
            vote), ``gate_kept`` (share of those the confidence gate keeps for UPA) and ``pl_share_c<c>``
            (share of foreground class c among the kept pseudo labels), as detached 0-dim tensors.
    Returns: ``{"lpa", "upa", "spa"}`` float32 scalars, finite for any input; empty classes or regions
    contribute 0. Which side is detached is set by the config (see ``MSPAConfig``).
    """
    if feats_l.shape[1] != feats_u.shape[1] or feats_l.shape[2:] != feats_u.shape[2:]:
        raise ValueError(f"labeled features {tuple(feats_l.shape)} and unlabeled features {tuple(feats_u.shape)} "
                         f"must have the same channels and spatial size (one network, one feature layer)")
    full_size = tuple(target_l.shape[2:])
    feat_size = tuple(feats_l.shape[2:])
    if tuple(logits_u.shape[2:]) != full_size:
        raise ValueError(f"unlabeled logits {tuple(logits_u.shape)} must have the label size {full_size}: pass the "
                         f"highest-resolution output")
    n = min(config.n_pairs, feats_l.shape[0])
    scale = 1.0 / config.temperature
    with torch.autocast(device_type=logits_u.device.type, enabled=False):
        probs_u = torch.softmax(logits_u.float(), dim=1)  # Ŝ_up

    # --- LPA (Eqs. 1-4): one prototype set per labeled patch, summed cosine scores -------------------
    mask_l = _labeled_masks(target_l[:n], logits_l[:n] if logits_l is not None else None, num_classes,
                            ignore_index, config.labeled_prototype_mask)
    sets = masked_average_pooling(feats_l[:n], resize_masks(mask_l, feat_size), "per_image")  # (N, C, D)
    sims = prototype_set_similarities(feats_u, sets.vectors)  # (B_u, N, C, *s)
    set_valid = sets.valid.view(1, *sets.valid.shape, *([1] * len(feat_size))).float()
    n_valid = sets.valid.float().sum(0)  # (C,) sets that have each class
    # mean over the sets that have the class; × N = the paper's plain sum when every set has every class
    sets_factor = float(n) if config.lpa_set_reduction == "sum" else 1.0
    summed = (sims * set_valid).sum(1) * (sets_factor / n_valid.clamp_min(1.0)).view(1, -1, *([1] * len(feat_size)))
    lpa_logits = mask_invalid_logits(_to_size(summed * scale, full_size), n_valid > 0)
    with torch.autocast(device_type=logits_u.device.type, enabled=False):
        m_u = torch.softmax(lpa_logits, dim=1)  # M̂_u
        if config.lpa_detach_prototype_prediction:
            m_u = m_u.detach()
        has_set = (n_valid > 0).any().float()  # no labeled class at all: the term is 0, not a uniform target
        lpa = masked_mean((probs_u - m_u) ** 2, has_set.view(*([1] * probs_u.dim())))

    # --- voting pseudo label (Eqs. 5-7 generalised) ----------------------------------------------------
    with torch.no_grad():
        set_labels = set_predictions(_to_size(sims.flatten(1, 2), full_size).unflatten(1, sims.shape[1:3]),
                                     sets.valid)  # (B_u, N, *S)
        own = channel_argmax(probs_u, keepdim=True)  # S_u(N+1)
        votes = count_votes(torch.cat([set_labels, own], dim=1), num_classes)  # (B_u, C, *S)
        num_voters = n + 1
        threshold = resolve_vote_threshold(num_voters, config.vote_threshold)
        pseudo = majority_vote(votes, threshold)  # (B_u, 1, *S), NO_LABEL where no majority
        # confidence gate: the network must give the voted class at least the threshold (not in the paper)
        voted = pseudo != NO_LABEL
        gate = confidence_gate(probs_u, config.pseudo_label_threshold, config.threshold_mode,
                               keep=config.pseudo_label_keep)
        gated = voted & gate.keep.reshape(pseudo.shape) & (gate.labels.reshape(pseudo.shape) == pseudo)
        if config.pseudo_label_threshold <= 0.0 and config.threshold_mode != "quantile":  # quantile, τ 0: no floor
            gated = voted  # the paper's ungated rule, also where the network's argmax lost the vote
        upa_pseudo = torch.where(gated, pseudo, torch.full_like(pseudo, NO_LABEL))
        stats = {"vote_labelled": voted.float().mean(),
                 "gate_kept": gated.float().sum() / voted.float().sum().clamp_min(1.0)}
        # class shares of the gated pseudo labels: a class going to 0 shows up in progress.png
        shares = class_shares(upa_pseudo, num_classes)
        stats.update({f"pl_share_c{c}": shares[c] for c in range(1, num_classes)})

    # --- UPA (Eqs. 8-9): batch-averaged unlabeled prototypes classify the labeled features -----------
    onehot_u = labels_to_onehot(upa_pseudo, num_classes)
    protos_u = masked_average_pooling(feats_u, resize_masks(onehot_u, feat_size), "batch_mean", reduce_fn)
    if config.upa_detach_prototypes:
        protos_u = protos_u._replace(vectors=protos_u.vectors.detach())
    upa_logits = prototype_logits(feats_l, protos_u, scale, full_size)
    upa = cross_entropy_ignore(upa_logits, prototype_targets(target_l, protos_u.valid, num_classes, ignore_index))

    # --- SPA (Eqs. 10-11): uncertain vs reliable regional prototypes per class ------------------------
    lo, hi = reliable_vote_range(num_voters, threshold, config.spa_reliable)
    uncertain, reliable = vote_regions(votes, pseudo, lo, hi)
    weights = probs_u.detach() if config.spa_detach_weights else probs_u
    spa = regional_alignment_loss(regional_prototypes(feats_u, weights, uncertain),
                                  regional_prototypes(feats_u, weights, reliable),
                                  detach_reliable=config.spa_detach_reliable, normalize=config.spa_normalize)
    out = {"lpa": lpa, "upa": upa, "spa": spa}
    if diagnostics is not None:
        diagnostics.update(stats)  # detached 0-dim tensors: no host sync per step
    return out


def _to_size(logits: torch.Tensor, size) -> torch.Tensor:
    """Upsample C-channel score maps from feature to label resolution (no-op when equal)."""
    return logits if tuple(logits.shape[2:]) == tuple(size) else resize_logits(logits, size)


def _labeled_masks(target: torch.Tensor, logits: Optional[torch.Tensor], num_classes: int,
                   ignore_index: Optional[int], source: str) -> torch.Tensor:
    """One-hot masks ``(N, C, *S)`` of the labeled prototypes: ground truth, or the network's argmax.

    The predicted variant takes the argmax (no gradient) only where the ground truth is a real class, so
    ignore-label and padding voxels stay out of the prototypes either way.
    """
    gt = labels_to_onehot(target, num_classes, ignore_index)
    if source == "gt":
        return gt
    if logits is None:
        raise ValueError("labeled_prototype_mask='pred' needs the labeled logits (logits_l)")
    pred = channel_argmax(logits.detach(), keepdim=True)
    known = gt.sum(1, keepdim=True) > 0
    return labels_to_onehot(torch.where(known, pred, torch.full_like(pred, NO_LABEL)), num_classes)


class MSPA(SemiSupervisedMethod):
    """Single-network MSPA; terms ``lpa``, ``upa``, ``spa``, each weighted by λ(t) × its factor."""

    config_class = MSPAConfig
    term_names = ("lpa", "upa", "spa")
    needs_features = True
    #: per-step values logged every epoch: share of unlabeled voxels with a majority vote, share of
    #: those the confidence gate keeps as UPA pseudo labels, and (``diagnostic_keys``) the foreground
    #: class shares of the kept pseudo labels
    diagnostic_names = ("vote_labelled", "gate_kept")

    def diagnostic_keys(self, num_classes: int) -> Tuple[str, ...]:
        return (*self.diagnostic_names, *(f"pl_share_c{c}" for c in range(1, num_classes)))

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        if inputs.feats_l is None or inputs.feats_u is None or inputs.logits_u is None:
            raise ValueError("MSPA needs the student's features on labeled and unlabeled patches and its logits on "
                             "the unlabeled patches (student_sees_unlabeled must stay True)")
        return mspa_losses(inputs.feats_l, inputs.target_l, inputs.feats_u, inputs.logits_u, inputs.num_classes,
                           inputs.ignore_index, self.config, inputs.reduce_fn, logits_l=inputs.logits_l,
                           diagnostics=self.diagnostics)

    def weights(self, progress: float) -> Dict[str, float]:
        lam = self.config.ramp(progress)
        cfg = self.config
        return {"lpa": cfg.lpa_weight * lam, "upa": cfg.upa_weight * lam, "spa": cfg.spa_weight * lam}
