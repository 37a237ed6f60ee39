"""MSPA: voting and regional-prototype ops, and the method's terms, on hand-built tensors with known answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_proto.methods.base import StepInputs
from nnunet_proto.methods.mspa import MSPA, MSPAConfig, mspa_losses
from nnunet_proto.ops.prototypes import Prototypes
from nnunet_proto.ops.voting import (
    NO_LABEL,
    count_votes,
    majority_threshold,
    majority_vote,
    prototype_set_similarities,
    regional_alignment_loss,
    regional_prototypes,
    reliable_vote_range,
    resolve_vote_threshold,
    set_predictions,
    vote_regions,
)


def binary_votes_from_sum(s_sum: torch.Tensor, voters: int) -> torch.Tensor:
    """(B, 1, *S) foreground vote sums (the paper's S_sum) -> (B, 2, *S) class vote counts."""
    return torch.cat([voters - s_sum, s_sum], dim=1)


def onehot(labels: torch.Tensor, c: int) -> torch.Tensor:
    """(B, 1, *S) labels -> (B, C, *S) float one-hot."""
    return F.one_hot(labels[:, 0].long(), c).movedim(-1, 1).float()


# ---------------------------------------------------------------------------------------------- votes
def test_count_votes_known_counts_and_abstention():
    # 3 voters on a 1x3 image; voter 2 abstains at the last voxel
    labels = torch.tensor([[[0, 1, 2]], [[0, 2, 2]], [[1, 2, NO_LABEL]]]).view(1, 3, 1, 3)
    votes = count_votes(labels, 3)
    expected = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 2, 2]]).view(1, 3, 1, 3)
    assert torch.equal(votes, expected)
    assert votes.dtype == torch.int64


def test_count_votes_2d_3d_parity():
    g = torch.Generator().manual_seed(0)
    labels3d = torch.randint(-1, 4, (2, 5, 3, 4, 6), generator=g)
    votes3d = count_votes(labels3d, 4)
    votes2d = count_votes(labels3d.flatten(2, 3), 4)
    assert torch.equal(votes3d.flatten(2, 3), votes2d)
    assert torch.equal(votes3d.sum(1), (labels3d >= 0).sum(1))


@pytest.mark.parametrize("voters, expected", [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4)])
def test_majority_threshold_is_strict_majority(voters, expected):
    assert majority_threshold(voters) == expected
    if voters % 2 == 1:
        assert expected == math.ceil(voters / 2)  # equals ceil((N+1)/2) for the paper's 5 voters


def test_resolve_vote_threshold():
    assert resolve_vote_threshold(5) == 3
    assert resolve_vote_threshold(5, 4) == 4
    assert resolve_vote_threshold(3, 5) == 3  # configured for 4 sets, batch had 2: unanimity
    with pytest.raises(ValueError, match="threshold"):
        resolve_vote_threshold(5, 0)


def test_majority_vote_reproduces_paper_binary_rule():
    # paper Eq. 7: 5 voters, foreground where S_sum in {3, 4, 5}, background where S_sum in {0, 1, 2}
    s_sum = torch.arange(6).view(1, 1, 1, 6)
    pseudo = majority_vote(binary_votes_from_sum(s_sum, 5), threshold=3)
    assert pseudo.tolist() == [[[[0, 0, 0, 1, 1, 1]]]]


def test_majority_vote_multiclass_threshold_and_ties():
    votes = torch.tensor([
        [3, 1, 1],  # clear majority -> 0
        [2, 2, 1],  # tie -> no label
        [1, 2, 2],  # tie -> no label
        [1, 1, 3],  # -> 2
        [2, 1, 1],  # plurality below threshold 3 -> no label
        [0, 0, 0],  # everybody abstained
    ]).T.reshape(1, 3, 1, 6)
    assert majority_vote(votes, 3).flatten().tolist() == [0, NO_LABEL, NO_LABEL, 2, NO_LABEL, NO_LABEL]
    # a lower threshold accepts the plurality, but still never a tie
    assert majority_vote(votes, 2).flatten().tolist() == [0, NO_LABEL, NO_LABEL, 2, 0, NO_LABEL]


def test_two_voters_need_agreement():
    labels = torch.tensor([[[0, 1, 1]], [[0, 0, 1]]]).view(1, 2, 1, 3)  # N = 1 set + the network
    pseudo = majority_vote(count_votes(labels, 2), majority_threshold(2))
    assert pseudo.flatten().tolist() == [0, NO_LABEL, 1]


def test_worked_example_of_the_docs():
    # docs/methods/mspa.md: N = 4 sets + the network, 3 classes, voxels a..g
    voters = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 2], [1, 1, 0, 1, 2], [1, 1, 0, 2, 2], [0, 2, 1, 0, 2],
              [0, 0, 0, 1, 1], [2, 2, 0, 2, 1]]
    votes = count_votes(torch.tensor(voters).T.reshape(1, 5, 1, 7), 3)
    assert votes[0, :, 0].T.tolist() == [[0, 5, 0], [0, 4, 1], [1, 3, 1], [1, 2, 2], [2, 1, 2], [3, 2, 0], [1, 1, 3]]
    pseudo = majority_vote(votes, majority_threshold(5))
    assert pseudo.flatten().tolist() == [1, 1, 1, NO_LABEL, NO_LABEL, 0, 2]
    uncertain, reliable = vote_regions(votes, pseudo, *reliable_vote_range(5, 3))
    assert uncertain.sum(1).flatten().tolist() == [0, 0, 1, 0, 0, 1, 1]
    assert reliable.sum(1).flatten().tolist() == [0, 1, 0, 0, 0, 0, 0]


# -------------------------------------------------------------------------------------------- regions
@pytest.mark.parametrize("rule, voters, threshold, expected", [
    ("next_level", 5, 3, (4, 4)),  # paper: R_3 uncertain, R_4 reliable, R_5 unused
    ("next_level_and_unanimous", 5, 3, (4, 5)),
    ("unanimous", 5, 3, (5, 5)),  # multi-class option: reliable = unanimous
    ("next_level", 3, 2, (3, 3)),  # N = 2: the next level is unanimity
    ("next_level", 4, 3, (4, 4)),
    ("next_level", 2, 2, (2, 2)),  # N = 1: nothing below unanimity can be pseudo-labelled
])
def test_reliable_vote_range(rule, voters, threshold, expected):
    assert reliable_vote_range(voters, threshold, rule) == expected


def test_reliable_vote_range_errors():
    with pytest.raises(ValueError, match="rule"):
        reliable_vote_range(5, 3, "all")
    with pytest.raises(ValueError, match="threshold"):
        reliable_vote_range(5, 6)


def test_vote_regions_match_paper_regions():
    # S_sum = 0..5 with 5 voters: R_3 uncertain fg, R_4 reliable fg, R_2 uncertain bg, R_1 reliable bg
    s_sum = torch.arange(6).view(1, 1, 1, 6)
    votes = binary_votes_from_sum(s_sum, 5)
    pseudo = majority_vote(votes, 3)
    lo, hi = reliable_vote_range(5, 3, "next_level")
    uncertain, reliable = vote_regions(votes, pseudo, lo, hi)
    assert uncertain[0, 1, 0].tolist() == [0, 0, 0, 1, 0, 0]
    assert reliable[0, 1, 0].tolist() == [0, 0, 0, 0, 1, 0]
    assert uncertain[0, 0, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert reliable[0, 0, 0].tolist() == [0, 1, 0, 0, 0, 0]
    # our option: unanimous voxels are reliable too
    _, reliable_u = vote_regions(votes, pseudo, *reliable_vote_range(5, 3, "next_level_and_unanimous"))
    assert reliable_u[0, 1, 0].tolist() == [0, 0, 0, 0, 1, 1]
    assert reliable_u[0, 0, 0].tolist() == [1, 1, 0, 0, 0, 0]


def test_vote_regions_exclude_unlabelled_voxels_multiclass():
    votes = torch.tensor([[2, 2, 1], [3, 1, 1], [5, 0, 0], [1, 0, 4]]).T.reshape(1, 3, 1, 4)
    pseudo = majority_vote(votes, 3)
    uncertain, reliable = vote_regions(votes, pseudo, *reliable_vote_range(5, 3))
    assert uncertain.sum(1).flatten().tolist() == [0, 1, 0, 0]  # tie: no region; 3 votes: uncertain
    assert reliable.sum(1).flatten().tolist() == [0, 0, 0, 1]  # 5 votes unused; 4 votes reliable
    assert reliable[0, 2, 0, 3] == 1


# ------------------------------------------------------------------------------- regional prototypes
def test_regional_prototype_is_probability_weighted_mean():
    feats = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    probs = torch.tensor([[0.0, 0.5, 0.75, 1.0], [1.0, 0.5, 0.25, 0.0]]).view(1, 2, 1, 4)
    region = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float).view(1, 2, 1, 4)
    protos = regional_prototypes(feats, probs, region)
    assert protos.valid.tolist() == [[False, True]]
    expected = (1.0 * 1 + 0.5 * 2 + 0.25 * 3) / (1.0 + 0.5 + 0.25)
    assert protos.vectors[0, 1, 0].item() == pytest.approx(expected)
    assert protos.vectors[0, 0, 0].item() == 0.0  # empty region: zero vector, flagged, no NaN


def test_regional_prototype_with_zero_weight_region_is_invalid():
    feats = torch.randn(1, 3, 2, 2)
    probs = torch.zeros(1, 2, 2, 2)
    protos = regional_prototypes(feats, probs, torch.ones(1, 2, 2, 2))
    assert not protos.valid.any() and torch.isfinite(protos.vectors).all()


def test_regional_prototypes_at_coarser_feature_resolution():
    # constant features: every non-empty regional prototype is that constant, whatever the weights
    feats = torch.full((1, 2, 2, 2), 3.0)
    probs = torch.rand(1, 2, 4, 4)
    region = torch.zeros(1, 2, 4, 4)
    region[:, 0, :2, :2] = 1
    protos = regional_prototypes(feats, probs, region)
    assert protos.valid.tolist() == [[True, False]]
    torch.testing.assert_close(protos.vectors[0, 0], torch.full((2,), 3.0))


def test_regional_alignment_loss_value_mean_over_images_with_pairs():
    u = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[5.0, 5.0], [0.0, 0.0]]], requires_grad=True)  # (B=2, C=2, D=2)
    r = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    u_valid = torch.tensor([[True, True], [True, False]])
    r_valid = torch.tensor([[True, True], [False, True]])  # image 2 has no complete pair
    loss = regional_alignment_loss(Prototypes(u, u_valid), Prototypes(r, r_valid), normalize=False)
    assert loss.item() == pytest.approx((1 + 4) + (0 + 1))  # image 1 only: sum over both classes
    loss.backward()
    assert r.grad is None  # reliable side detached (docs/methods/mspa.md, 'Defaults and provenance')
    torch.testing.assert_close(u.grad[0], 2 * u.detach()[0])
    assert u.grad[1].abs().sum() == 0
    u.grad = None
    sym = regional_alignment_loss(Prototypes(u, u_valid), Prototypes(r, r_valid), detach_reliable=False,
                                  normalize=False)
    sym.backward()
    assert r.grad is not None and r.grad.abs().sum() > 0


def test_normalised_regional_alignment_is_scale_invariant_and_bounded():
    torch.manual_seed(0)
    u, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    valid = torch.ones(2, 3, dtype=torch.bool)
    base = regional_alignment_loss(Prototypes(u, valid), Prototypes(r, valid))
    scaled = regional_alignment_loss(Prototypes(100 * u, valid), Prototypes(100 * r, valid))
    torch.testing.assert_close(scaled, base)
    assert 0 <= base.item() <= 4 * 3  # at most 4 per class, 3 classes per image
    raw = regional_alignment_loss(Prototypes(100 * u, valid), Prototypes(100 * r, valid), normalize=False)
    assert raw.item() > 1000 * base.item()  # the literal form grows with the feature scale


def test_regional_alignment_loss_without_pairs_is_zero_with_graph():
    u = torch.randn(2, 3, 4, requires_grad=True)
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss = regional_alignment_loss(Prototypes(u, none), Prototypes(torch.randn(2, 3, 4), none))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(u.grad).all()


# ------------------------------------------------------------------------------ prototype sets
def test_prototype_set_similarities_and_set_predictions():
    feats = onehot(torch.tensor([0, 1, 2, 1]).view(1, 1, 2, 2), 3)  # D = 3 one-hot features
    sets = torch.stack([torch.eye(3), torch.eye(3)[[0, 2, 1]]])  # set 1 swaps classes 1 and 2
    sims = prototype_set_similarities(feats, sets)
    assert sims.shape == (1, 2, 3, 2, 2)
    assert sims[0, 0, 1, 0, 1] == 1.0 and sims[0, 1, 2, 0, 1] == 1.0
    valid = torch.tensor([[True, True, True], [True, True, False]])  # set 1 has no class 2
    preds = set_predictions(sims, valid)
    assert preds[0, 0].flatten().tolist() == [0, 1, 2, 1]
    # set 1: e_2 matches its class-1 prototype; e_1 matches only its missing class 2 and falls back to the
    # best valid class (all similarities 0 -> class 0)
    assert preds[0, 1].flatten().tolist() == [0, 0, 1, 0]
    abstain = set_predictions(sims, torch.tensor([[True, True, True], [False, False, False]]))
    assert (abstain[0, 1] == NO_LABEL).all()


# ------------------------------------------------------------------------------------ the method
def test_lpa_analytic_with_one_hot_features():
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]]).view(2, 1, 2, 2)
    y_u = torch.tensor([[1, 0, 0, 1]]).view(1, 1, 2, 2)
    feats_l, feats_u = onehot(y_l, c), onehot(y_u, c)
    p = 0.7
    logits_u = torch.log(torch.where(onehot(y_u, c) > 0, torch.tensor(p), torch.tensor(1 - p)))
    out = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig.paper())
    # both sets are {e_0, e_1}: summed cosines are (2, 0) towards the true class, M̂ = softmax(2, 0)
    m = math.exp(2) / (math.exp(2) + 1)
    assert out["lpa"].item() == pytest.approx((p - m) ** 2, rel=1e-5)
    # all three voters agree everywhere: pseudo label = y_u, unlabeled prototypes e_0, e_1;
    # UPA: logits (1, 0) towards the truth, CE = log(1 + e^-1); SPA: every voxel unanimous -> no region -> 0
    assert out["upa"].item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    assert out["spa"].item() == 0.0


def test_lpa_rescales_classes_missing_from_some_sets():
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]).view(2, 1, 2, 2)  # image 2 has no class 1
    y_u = torch.tensor([[1, 0, 0, 1]]).view(1, 1, 2, 2)
    logits_u = torch.zeros(1, c, 2, 2)
    out = mspa_losses(onehot(y_l, c), y_l, onehot(y_u, c), logits_u, c, None, MSPAConfig.paper())
    # class 0: sum over 2 sets = 2 at class-0 voxels; class 1: 2 × (the one set's cosine) = 2 at class-1 voxels
    m = math.exp(2) / (math.exp(2) + 1)
    assert out["lpa"].item() == pytest.approx((0.5 - m) ** 2, rel=1e-5)


def test_n_pairs_limits_the_labeled_prototype_sets():
    torch.manual_seed(0)
    c = 3
    y_l = torch.randint(0, c, (3, 1, 6, 6))
    feats_l = torch.randn(3, 5, 6, 6)
    feats_u, logits_u = torch.randn(2, 5, 6, 6), torch.randn(2, c, 6, 6)
    cfg = MSPAConfig(n_pairs=2, pseudo_label_threshold=0.0)
    base = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, cfg)
    changed = feats_l.clone()
    changed[2] = torch.randn(5, 6, 6)  # the third labeled patch is not a prototype set with N = 2
    other = mspa_losses(changed, y_l, feats_u, logits_u, c, None, cfg)
    torch.testing.assert_close(other["lpa"], base["lpa"])
    torch.testing.assert_close(other["spa"], base["spa"])
    assert other["upa"] != base["upa"]  # UPA classifies every labeled patch


def test_spa_known_answer_with_three_voters():
    # N = 2 identical sets {e_0, e_1}; unlabeled features (cos θ, sin θ) -> sets predict class 1 where θ > 45°.
    # The network predicts class 1 only at the last voxel, so class 0 is unanimous (3 votes, reliable) at
    # θ = 0°, 20°; the voxels at 60°, 70° have 2 of 3 votes for class 1 (uncertain); 80° is unanimous class 1.
    c = 2
    y_l = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]).view(2, 1, 1, 5)  # one-hot features: sets {e_0, e_1}
    feats_l = onehot(y_l, c)
    theta = torch.deg2rad(torch.tensor([0.0, 20.0, 60.0, 70.0, 80.0]))
    feats_u = torch.stack([torch.cos(theta), torch.sin(theta)]).view(1, 2, 1, 5).requires_grad_(True)
    p1 = torch.tensor([0.1, 0.2, 0.4, 0.3, 0.9])
    logits_u = torch.log(torch.stack([1 - p1, p1])).view(1, 2, 1, 5)
    out = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None,
                      MSPAConfig())
    f = feats_u.detach()[0, :, 0].T  # (5, D)
    w_unc = p1[2:4]
    r_unc = (w_unc[:, None] * f[2:4]).sum(0) / w_unc.sum()
    r_rel = f[4]  # only one reliable class-1 voxel
    unit = torch.nn.functional.normalize
    expected = float(((unit(r_unc, dim=0) - unit(r_rel, dim=0)) ** 2).sum())  # class 0: no uncertain region
    assert out["spa"].item() == pytest.approx(expected, rel=1e-5)
    raw = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(spa_normalize=False))
    assert raw["spa"].item() == pytest.approx(float(((r_unc - r_rel) ** 2).sum()), rel=1e-5)  # literal Eq. 11
    (g,) = torch.autograd.grad(out["spa"], feats_u)
    assert g[0, :, 0, 2:4].abs().sum() > 0  # uncertain voxels move
    assert g[0, :, 0, 4].abs().sum() == 0  # the reliable prototype is a stop-gradient target
    # "unanimous" and "next_level" coincide with 3 voters
    out_u = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(spa_reliable="unanimous"))
    assert out_u["spa"].item() == pytest.approx(expected, rel=1e-5)


def test_every_term_sends_gradient_into_both_streams():
    """Paper form (nothing detached): LPA and UPA reach both streams; defaults: M̂_u and p_u are constant targets."""
    torch.manual_seed(1)
    c = 4
    feats_l = torch.randn(2, 8, 8, 8, requires_grad=True)
    feats_u = torch.randn(2, 8, 8, 8, requires_grad=True)
    logits_u = torch.randn(2, c, 8, 8, requires_grad=True)
    y_l = torch.randint(0, c, (2, 1, 8, 8))
    out = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig.paper())
    grads = {k: torch.autograd.grad(v, [feats_l, feats_u, logits_u], retain_graph=True, allow_unused=True)
             for k, v in out.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["lpa"])  # both sides of the L2 consistency
    assert grads["upa"][0].abs().sum() > 0 and grads["upa"][1].abs().sum() > 0  # f_l and p_u
    assert grads["spa"][1].abs().sum() > 0
    detached = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(pseudo_label_threshold=0.0))
    g_u = torch.autograd.grad(detached["upa"], [feats_l, feats_u], allow_unused=True)
    assert g_u[0].abs().sum() > 0 and (g_u[1] is None or g_u[1].abs().sum() == 0)  # p_u is a constant target
    g_lpa = torch.autograd.grad(detached["lpa"], [feats_l, feats_u, logits_u], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_lpa[:2])  # M̂_u is a constant soft target
    assert g_lpa[2].abs().sum() > 0  # ... for the network's softmax Ŝ_up
    g_spa = torch.autograd.grad(detached["spa"], feats_u)[0]
    assert g_spa.abs().sum() > 0


def test_temperature_sharpens_cosine_classifiers_and_mean_of_sets_is_n_free():
    """τ = 0.1 on cosines in [0, 1]: the UPA CE can approach 0 (with τ = 1 it is ≥ log(1 + e^-1))."""
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]]).view(2, 1, 2, 2)
    y_u = torch.tensor([[1, 0, 0, 1]]).view(1, 1, 2, 2)
    feats_l, feats_u = onehot(y_l, c), onehot(y_u, c)
    logits_u = 5.0 * (onehot(y_u, c) - 0.5)  # confident network, softmax 0.993 on the true class
    out = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig())
    # UPA logits (1/τ, 0) = (10, 0) towards the truth
    assert out["upa"].item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-6)
    # LPA: mean over the 2 sets of (1, 0), / τ -> M̂ = softmax(10, 0) on the true class
    m = 1 / (1 + math.exp(-10))
    p = 1 / (1 + math.exp(-5))
    assert out["lpa"].item() == pytest.approx((p - m) ** 2, rel=1e-4)
    summed = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(lpa_set_reduction="sum"))
    m2 = 1 / (1 + math.exp(-20))  # the paper's sum doubles the logits with 2 sets
    assert summed["lpa"].item() == pytest.approx((p - m2) ** 2, rel=1e-4)
    paper = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig.paper())
    assert paper["upa"].item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    # 4 classes, non-negative features (after LeakyReLU): with τ = 1 the CE is bounded below by 0.74
    c4 = 4
    y4 = torch.arange(4).view(1, 1, 1, 4)
    f4 = onehot(y4, c4)
    strong = 10.0 * (onehot(y4, c4) - 0.5)
    bound = math.log(1 + 3 * math.exp(-1))
    assert mspa_losses(f4, y4, f4, strong, c4, None, MSPAConfig.paper())["upa"].item() >= bound - 1e-5
    assert mspa_losses(f4, y4, f4, strong, c4, None, MSPAConfig())["upa"].item() < 1e-3


def test_confidence_gate_on_voting_pseudo_labels():
    """A unanimous vote whose network confidence is below the threshold makes no UPA prototype."""
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]]).view(2, 1, 2, 2)
    y_u = torch.tensor([[1, 0, 0, 1]]).view(1, 1, 2, 2)
    feats_l, feats_u = onehot(y_l, c), onehot(y_u, c)
    p1 = torch.tensor([0.95, 0.2, 0.3, 0.6]).view(1, 1, 2, 2)  # class-1 prob; argmax agrees with y_u everywhere
    logits_u = torch.log(torch.cat([1 - p1, p1], 1))
    diag = {}
    cfg = MSPAConfig(pseudo_label_threshold=0.75)
    mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, cfg, diagnostics=diag)
    # every voxel has a unanimous vote; confidences 0.95, 0.8, 0.7, 0.6 -> the gate keeps 2 of 4
    assert float(diag["vote_labelled"]) == pytest.approx(1.0) and float(diag["gate_kept"]) == pytest.approx(0.5)
    assert float(diag["pl_share_c1"]) == pytest.approx(0.5)  # kept: one class-1 and one class-0 voxel
    # the kept voxels (classes 1 and 0) still give both prototypes: UPA unchanged; gate all out -> UPA 0
    none = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(pseudo_label_threshold=0.99),
                       diagnostics=diag)
    assert none["upa"].item() == 0.0 and float(diag["gate_kept"]) == 0.0
    # class 1 only at the kept voxel with 0.95: raising the threshold to 0.9 drops class 0's prototype,
    # so the labeled class-0 voxels are ignored in UPA and only class 1 is scored
    only1 = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig(pseudo_label_threshold=0.9))
    assert only1["upa"].item() == pytest.approx(0.0, abs=1e-6)  # a single valid class: CE of a 1-way softmax
    m = MSPA(MSPAConfig(pseudo_label_threshold=0.75))
    m.losses(StepInputs(c, None, y_l, torch.zeros(2, c, 2, 2), feats_l=feats_l, logits_u=logits_u, feats_u=feats_u))
    assert set(m.diagnostics) == set(m.diagnostic_keys(c)) == {"vote_labelled", "gate_kept", "pl_share_c1"}


def test_ignore_label_takes_part_in_no_prototype_and_no_loss():
    torch.manual_seed(2)
    c, ignore = 3, 3
    y_l = torch.randint(0, c, (2, 1, 6, 6))
    y_l[:, :, :2] = ignore
    feats_l = torch.randn(2, 5, 6, 6)
    feats_u, logits_u = torch.randn(2, 5, 6, 6), torch.randn(2, c, 6, 6)
    base = mspa_losses(feats_l, y_l, feats_u, logits_u, c, ignore, MSPAConfig())
    assert all(torch.isfinite(v) for v in base.values())
    changed = feats_l.clone()
    changed[:, :, :2] += 50.0  # features under the ignore label change nothing
    other = mspa_losses(changed, y_l, feats_u, logits_u, c, ignore, MSPAConfig())
    for k in base:
        torch.testing.assert_close(other[k], base[k])
    # nnU-Net's -1 padding behaves the same
    y_pad = y_l.clone()
    y_pad[y_pad == ignore] = -1
    padded = mspa_losses(feats_l, y_pad, feats_u, logits_u, c, None, MSPAConfig())
    for k in base:
        torch.testing.assert_close(padded[k], base[k])


def test_absent_classes_and_degenerate_batches_stay_finite():
    c = 4
    # labeled patches hold background only, unlabeled network output is constant: every class but 0 absent
    y_l = torch.zeros(1, 1, 5, 5, dtype=torch.long)
    feats_l = torch.randn(1, 3, 5, 5, requires_grad=True)
    feats_u = torch.zeros(2, 3, 5, 5, requires_grad=True)  # zero features: cosine 0 everywhere
    logits_u = torch.zeros(2, c, 5, 5, requires_grad=True)
    out = mspa_losses(feats_l, y_l, feats_u, logits_u, c, None, MSPAConfig())  # N = 1: two voters
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    for t in (feats_l, feats_u, logits_u):
        assert torch.isfinite(t.grad).all()
    # a labeled patch that is entirely ignored: no prototype set at all -> LPA 0, UPA 0, still finite
    y_ign = torch.full((1, 1, 5, 5), 9)
    out = mspa_losses(feats_l, y_ign, feats_u, logits_u, c, 9, MSPAConfig())
    assert out["lpa"].item() == 0.0 and out["upa"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("spatial", [(8, 8), (3, 6, 6)])
def test_2d_3d_and_coarse_feature_layer(spatial):
    torch.manual_seed(3)
    c = 3
    coarse = tuple(max(1, s // 2) for s in spatial)
    feats_l = torch.randn(2, 6, *coarse, requires_grad=True)
    feats_u = torch.randn(2, 6, *coarse, requires_grad=True)
    logits_u = torch.randn(2, c, *spatial, requires_grad=True)
    out = mspa_losses(feats_l, torch.randint(0, c, (2, 1, *spatial)), feats_u, logits_u, c, None,
                      MSPAConfig(feature_layer="bottleneck", pseudo_label_threshold=0.0))
    assert all(torch.isfinite(v) for v in out.values())
    g = torch.autograd.grad(out["lpa"] + out["upa"] + out["spa"], [feats_l, feats_u])
    assert all(x.abs().sum() > 0 for x in g)


def test_fp16_inputs_give_finite_fp32_terms():
    torch.manual_seed(4)
    c = 3
    out = mspa_losses(torch.randn(2, 4, 6, 6).half(), torch.randint(0, c, (2, 1, 6, 6)),
                      torch.randn(2, 4, 6, 6).half(), torch.randn(2, c, 6, 6).half(), c, None, MSPAConfig())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_predicted_labeled_masks_option():
    c = 2
    y_l = torch.tensor([[0, 0, 1, 1]]).view(1, 1, 2, 2)
    feats = onehot(y_l, c)
    wrong = torch.log(onehot(1 - y_l, c).clamp_min(1e-3))  # the network predicts the opposite labels
    logits_u = torch.zeros(1, c, 2, 2)
    gt = mspa_losses(feats, y_l, feats, logits_u, c, None, MSPAConfig())
    pred = mspa_losses(feats, y_l, feats, logits_u, c, None, MSPAConfig(labeled_prototype_mask="pred"),
                       logits_l=wrong)
    assert pred["lpa"].item() == pytest.approx(gt["lpa"].item())  # symmetric: same soft target, swapped
    with pytest.raises(ValueError, match="logits_l"):
        mspa_losses(feats, y_l, feats, logits_u, c, None, MSPAConfig(labeled_prototype_mask="pred"))


def test_unlabeled_prototypes_use_reduce_fn():
    calls = []

    def reduce_fn(t):
        calls.append(tuple(t.shape))
        return t

    mspa_losses(torch.randn(2, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4)), torch.randn(2, 4, 4, 4),
                torch.randn(2, 3, 4, 4), 3, None, MSPAConfig(), reduce_fn)
    assert (3, 4) in calls and (3,) in calls  # the batch-averaged unlabeled prototypes of Eq. 8


def test_method_interface_weights_and_config():
    m = MSPA(MSPAConfig())
    assert m.term_names == ("lpa", "upa", "spa") and m.needs_features and m.student_sees_unlabeled
    assert not m.uses_teacher
    assert m.weights(1.0) == {"lpa": pytest.approx(0.1), "upa": pytest.approx(0.1), "spa": 0.0}  # spa_weight 0
    assert m.weights(0.0)["lpa"] == pytest.approx(0.1 * math.exp(-5))
    with_spa = MSPA(MSPAConfig(spa_weight=1.0))
    assert with_spa.weights(1.0)["spa"] == pytest.approx(0.1)
    assert MSPAConfig.paper().spa_weight == 1.0
    c = 2
    logits = torch.randn(2, c, 4, 4, requires_grad=True)
    inputs = StepInputs(c, None, torch.randint(0, c, (2, 1, 4, 4)), logits, feats_l=torch.randn(2, 3, 4, 4),
                        logits_u=logits, feats_u=torch.randn(2, 3, 4, 4))
    assert set(m.losses(inputs)) == {"lpa", "upa", "spa"}
    with pytest.raises(ValueError, match="unlabeled"):
        m.losses(StepInputs(c, None, inputs.target_l, logits, feats_l=inputs.feats_l))


@pytest.mark.parametrize("bad", [dict(use_teacher=True), dict(n_pairs=0), dict(vote_threshold=0),
                                 dict(spa_reliable="majority"), dict(labeled_prototype_mask="soft"),
                                 dict(temperature=0.0),
                                 dict(lpa_set_reduction='max'), dict(pseudo_label_threshold=1.5),
                                 dict(spa_weight=-1.0), dict(w_max=-0.1)])
def test_config_validation_names_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        MSPAConfig(**bad)
