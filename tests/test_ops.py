"""Unit tests of the pure tensor ops: analytic values and properties, 2D and 3D."""
import math

import pytest
import torch

from nnunet_proto.ops import (
    class_feature_sums,
    cosine_similarity_map,
    cross_entropy_ignore,
    ema_decay,
    labels_to_onehot,
    linear_rampup,
    mask_invalid_logits,
    masked_average_pooling,
    masked_mean,
    prototype_logits,
    resize_masks,
    sigmoid_rampup,
    softmax_mse,
)


def _labels(shape, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, shape, generator=g)


@pytest.mark.parametrize("spatial", [(6, 7), (3, 4, 5)])
def test_constant_feature_map_prototype_is_that_constant(spatial):
    feats = torch.ones(2, 5, *spatial) * torch.arange(5.0).view(1, 5, *([1] * len(spatial)))
    onehot = labels_to_onehot(_labels((2, 1, *spatial), 3), 3)
    for reduction in ("batch_mean", "pooled"):
        protos = masked_average_pooling(feats, onehot, reduction)
        assert protos.vectors.shape == (3, 5)
        assert protos.valid.all()
        torch.testing.assert_close(protos.vectors, torch.arange(5.0).expand(3, 5))


def test_masked_average_pooling_analytic_values():
    # one image, 1-d features on 4 voxels: values 1, 2, 3, 10; class 0 on the first three voxels
    feats = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(1, 1, 2, 2)
    labels = torch.tensor([0, 0, 0, 1]).view(1, 1, 2, 2)
    protos = masked_average_pooling(feats, labels_to_onehot(labels, 2), "per_image")
    torch.testing.assert_close(protos.vectors, torch.tensor([[[2.0], [10.0]]]))
    # soft weights: weighted mean
    w = torch.tensor([1.0, 0.0, 0.0, 3.0]).view(1, 1, 2, 2)
    soft = masked_average_pooling(feats, w, "pooled")
    torch.testing.assert_close(soft.vectors, torch.tensor([[(1.0 + 30.0) / 4.0]]))


def test_batch_mean_skips_images_without_the_class_and_differs_from_pooled():
    feats = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]).view(2, 1, 2, 2)
    labels = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]).view(2, 1, 2, 2)
    onehot = labels_to_onehot(labels, 2)
    bm = masked_average_pooling(feats, onehot, "batch_mean")
    pooled = masked_average_pooling(feats, onehot, "pooled")
    # class 1 only in image 0 -> 1.0 in both; class 0: batch mean of per-image means (1 and 5) = 3,
    # pooled = (1 + 4*5) / 5 = 4.2
    torch.testing.assert_close(bm.vectors[:, 0], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(pooled.vectors[:, 0], torch.tensor([4.2, 1.0]))


@pytest.mark.parametrize("reduction", ["batch_mean", "pooled", "per_image"])
def test_absent_class_is_flagged_finite_and_zero(reduction):
    feats = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels = torch.zeros(2, 1, 5, 5, dtype=torch.long)  # only class 0 present
    protos = masked_average_pooling(feats, labels_to_onehot(labels, 3), reduction)
    valid = protos.valid if protos.valid.dim() == 1 else protos.valid[0]
    assert valid.tolist() == [True, False, False]
    assert torch.isfinite(protos.vectors).all()
    assert (protos.vectors[..., 1:, :] == 0).all()
    logits = prototype_logits(feats, protos, scale=20.0)
    assert torch.isinf(logits[:, 1:]).all() and (logits[:, 1:] < 0).all()
    probs = torch.softmax(logits, dim=1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs[:, 0], torch.ones(2, 5, 5))
    probs.sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_no_class_at_all_stays_finite():
    feats = torch.randn(1, 3, 4, 4)
    labels = torch.full((1, 1, 4, 4), 7)  # ignore label everywhere
    protos = masked_average_pooling(feats, labels_to_onehot(labels, 3, ignore_index=7))
    assert not protos.valid.any()
    logits = prototype_logits(feats, protos, 20.0)
    assert torch.isfinite(torch.softmax(logits, 1)).all()


def test_onehot_requires_channel_axis():
    with pytest.raises(ValueError, match="unsqueeze"):
        labels_to_onehot(torch.zeros(2, 4, 4, dtype=torch.long), 3)


def test_onehot_ignores_ignore_label_and_padding():
    labels = torch.tensor([[0, 1, 2, -1, 3]]).view(1, 1, 5)
    oh = labels_to_onehot(labels, 3, ignore_index=3)
    assert oh.shape == (1, 3, 5)
    assert oh.sum(1).tolist() == [[1, 1, 1, 0, 0]]


def test_2d_3d_parity():
    feats2 = torch.randn(2, 4, 6, 6)
    labels2 = _labels((2, 1, 6, 6), 3)
    p2 = masked_average_pooling(feats2, labels_to_onehot(labels2, 3))
    p3 = masked_average_pooling(feats2.unsqueeze(2), labels_to_onehot(labels2.unsqueeze(2), 3))
    torch.testing.assert_close(p2.vectors, p3.vectors)
    l2 = prototype_logits(feats2, p2, 20.0)
    l3 = prototype_logits(feats2.unsqueeze(2), p3, 20.0)
    torch.testing.assert_close(l2, l3[:, :, 0])


def test_permutation_invariance():
    feats = torch.randn(3, 4, 5, 5)
    labels = _labels((3, 1, 5, 5), 3, seed=2)
    ref = masked_average_pooling(feats, labels_to_onehot(labels, 3), "pooled").vectors
    perm = torch.randperm(25)
    f_p = feats.flatten(2)[:, :, perm].view_as(feats)
    l_p = labels.flatten(2)[:, :, perm].view_as(labels)
    torch.testing.assert_close(masked_average_pooling(f_p, labels_to_onehot(l_p, 3), "pooled").vectors, ref)
    b = torch.tensor([2, 0, 1])
    torch.testing.assert_close(masked_average_pooling(feats[b], labels_to_onehot(labels[b], 3), "batch_mean").vectors,
                               masked_average_pooling(feats, labels_to_onehot(labels, 3), "batch_mean").vectors)


def test_cosine_similarity_analytic_and_scale_invariant():
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).T.reshape(1, 2, 3, 1)
    protos = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    sim = cosine_similarity_map(feats, protos)[0, :, :, 0]
    expected = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(sim, expected)
    torch.testing.assert_close(cosine_similarity_map(feats * 7, protos), cosine_similarity_map(feats, protos))
    # per-image prototypes
    per_image = protos.unsqueeze(0)
    torch.testing.assert_close(cosine_similarity_map(feats, per_image), cosine_similarity_map(feats, protos))


def test_zero_features_give_finite_gradients():
    feats = torch.zeros(1, 4, 3, 3, requires_grad=True)
    protos = masked_average_pooling(torch.randn(1, 4, 3, 3), labels_to_onehot(torch.zeros(1, 1, 3, 3).long(), 2))
    torch.softmax(prototype_logits(feats, protos, 20.0), 1).sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_fp16_input_under_autocast_gives_finite_fp32():
    feats = (torch.randn(2, 8, 6, 6) * 100).half()
    labels = _labels((2, 1, 6, 6), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        protos = masked_average_pooling(feats, labels_to_onehot(labels, 3))
        logits = prototype_logits(feats, protos, 20.0)
        sums, mass = class_feature_sums(feats, labels_to_onehot(labels, 3))
    assert protos.vectors.dtype == torch.float32 and logits.dtype == torch.float32 and sums.dtype == torch.float32
    assert torch.isfinite(protos.vectors).all() and torch.isfinite(logits).all()


def test_prototype_logits_upsampled_before_masking_stay_nan_free():
    feats = torch.randn(1, 4, 3, 3)
    labels = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    protos = masked_average_pooling(feats, labels_to_onehot(labels, 2))
    logits = prototype_logits(feats, protos, 20.0, output_size=(6, 6))
    assert logits.shape == (1, 2, 6, 6)
    assert not torch.isnan(logits).any()
    assert torch.isinf(logits[:, 1]).all()


def test_resize_masks_is_area_average():
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :2] = 1
    torch.testing.assert_close(resize_masks(m, (2, 2))[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(resize_masks(m, (1, 1))[0, 0], torch.tensor([[0.25]]))


def test_mask_invalid_logits_per_image():
    logits = torch.zeros(2, 3, 2, 2)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    out = mask_invalid_logits(logits, valid)
    assert torch.isinf(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isfinite(out[1]).all()  # an image without any valid class is left untouched


def test_schedules():
    assert sigmoid_rampup(0.0, 1.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.5, 1.0) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(1.0, 1.0) == 1.0
    assert sigmoid_rampup(0.3, 0.6) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(0.9, 0.6) == 1.0
    assert sigmoid_rampup(0.2, 0.0) == 1.0
    assert linear_rampup(0.25, 0.5) == pytest.approx(0.5)
    assert ema_decay(0, 0.99) == 0.0
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(1000, 0.99) == 0.99
    assert ema_decay(0, 0.99, warmup=False) == 0.99
    with pytest.raises(ValueError):
        ema_decay(1, 1.0)


def test_masked_mean_empty_is_zero_with_graph():
    x = torch.randn(2, 3, requires_grad=True)
    out = masked_mean(x, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_cross_entropy_ignore_all_ignored_is_zero_and_matches_torch_otherwise():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), -100)
    assert cross_entropy_ignore(logits, target).item() == 0.0
    target = _labels((2, 4, 4), 3)
    target[0, 0, 0] = -100
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(cross_entropy_ignore(logits, target), ref)
    # -inf logits of a class no target points at are fine
    inf_logits = logits.detach().clone()
    inf_logits[:, 2] = float("-inf")
    t = target.clamp(max=1)
    assert torch.isfinite(cross_entropy_ignore(inf_logits, t))


def test_softmax_mse_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(2, 3, 4, 4)
    assert softmax_mse(logits, torch.softmax(logits, 1)).item() == pytest.approx(0.0, abs=1e-7)
    assert softmax_mse(logits, torch.softmax(-logits, 1)).item() > 0
