"""Unit tests of PCCS: SDM ops, layer prototypes, contrastive loss, uncertainty weights, Sinkhorn, memory, losses."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_proto.methods.base import StepInputs
from nnunet_proto.methods.pccs import (
    PCCS,
    LayerPrototypes,
    PCCSConfig,
    PrototypeMemory,
    layer_index,
    layer_prototypes,
    pccs_losses,
    update_memory,
)
from nnunet_proto.ops.contrastive import prototype_contrastive_loss, segment_sums
from nnunet_proto.ops.sdm import depth_to_layers, own_class_depth, signed_distance_map
from nnunet_proto.ops.sinkhorn import sinkhorn_assignment
from nnunet_proto.ops.uncertainty import entropy, uncertainty_weights

LAYERS = ("encoder:1", "encoder:2", "encoder:3")


# ----------------------------------------------------------------------------- signed distance maps
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("radius", [4.6, 8.3])
def test_sdm_of_disk_and_sphere_matches_analytic_distance(ndim, radius):
    n = 31 if ndim == 2 else 23
    centre = np.array([15.2, 14.7, 15.4][:ndim]) if ndim == 2 else np.array([11.3, 10.8, 11.4])
    grid = np.stack(np.meshgrid(*[np.arange(n)] * ndim, indexing="ij"), axis=-1)
    dist = np.linalg.norm(grid - centre, axis=-1)
    sdm = signed_distance_map(dist <= radius)
    err = np.abs(sdm - (dist - radius))
    # the zero level lies half-way between voxels: the discretisation error is at most about half a voxel
    assert err.max() < 0.6 and err.mean() < 0.3
    assert (sdm[dist <= radius] < 0).all() and (sdm[dist > radius] > 0).all()
    # the code's convention EDT(¬B) − EDT(B) is off by half a voxel everywhere
    assert np.abs(sdm - (dist - radius)).mean() < np.abs(sdm + 0.5 * np.sign(sdm) - (dist - radius)).mean()


def test_sdm_empty_and_full_masks_have_no_boundary():
    assert np.isposinf(signed_distance_map(np.zeros((4, 5), bool))).all()
    assert np.isneginf(signed_distance_map(torch.ones(3, 4, 5, dtype=torch.bool))).all()
    depth = own_class_depth(torch.ones(1, 1, 4, 4, dtype=torch.long), 2)
    assert torch.isposinf(depth).all()
    assert (depth_to_layers(depth, 1.0, 5) == 4).all()


def _square_labels(ndim=2):
    """9×9 (×5 in 3D) background with a 5×5 (×5×5 across the full depth in 3D) class-1 square at 2..6."""
    lab = torch.zeros((1, 1) + ((5,) if ndim == 3 else ()) + (9, 9), dtype=torch.long)
    lab[..., 2:7, 2:7] = 1
    return lab


@pytest.mark.parametrize("ndim", [2, 3])
def test_depth_and_layers_of_a_square_are_its_rings(ndim):
    lab = _square_labels(ndim)
    depth = own_class_depth(lab, 2)[0, 0]
    if ndim == 3:  # the square fills the depth axis: in-plane distances, the same on every slice
        assert torch.equal(depth, depth[:1].expand_as(depth))
        depth = depth[2]
    # rings of the square: 1 on its inner boundary, then 2, centre 3
    assert depth[2, 2] == 1 and depth[3, 4] == 2 and depth[4, 4] == 3 and depth[2, 4] == 1
    # background: 1 next to the square, corner (0, 0) at √8 from (2, 2)
    assert depth[1, 4] == 1 and depth[0, 0] == pytest.approx(math.sqrt(8))
    layers = depth_to_layers(depth, 1.0, 16)
    assert layers[2, 2] == 0 and layers[3, 4] == 1 and layers[4, 4] == 2 and layers[0, 0] == 1
    assert set(layers[2:7, 2:7].unique().tolist()) == {0, 1, 2}
    capped = depth_to_layers(depth, 1.0, 2)
    assert capped[4, 4] == 1 and capped.max() == 1  # deeper layers merge into the last one
    assert depth_to_layers(depth, 2.0, 16)[4, 4] == 1  # wider bins: depths 1-2 → 0, 3-4 → 1


@pytest.mark.parametrize("shape", [(2, 1, 13, 11), (2, 1, 5, 9, 8)])
def test_bounding_box_depth_equals_full_grid_edt(shape):
    from scipy.ndimage import distance_transform_edt

    g = torch.Generator().manual_seed(0)
    low = torch.randn(shape[0], 4, *[max(2, s // 3) for s in shape[2:]], generator=g)
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    labels = F.interpolate(low, size=shape[2:], mode=mode).argmax(1, keepdim=True)  # blobs touching borders
    labels[0, 0, 0] = -1  # out-of-range voxels belong to no class
    depth = own_class_depth(labels, 4)
    for b in range(shape[0]):
        for c in range(4):
            mask = (labels[b, 0] == c).numpy()
            if mask.any():
                expected = torch.from_numpy(distance_transform_edt(mask)[mask]).float()
                torch.testing.assert_close(depth[b, 0][torch.from_numpy(mask)], expected)
    assert (depth[0, 0, 0] == 0).all()


def test_layer_index_excludes_labels_outside_the_classes():
    lab = _square_labels()
    lab[..., 0, 0] = -1  # e.g. padding
    layers = layer_index(lab, 2, PCCSConfig())
    assert layers[0, 0, 0, 0] == -1 and (layers[0, 0, 1:, :] >= 0).all()


# ----------------------------------------------------------------------------- layer prototypes
def test_layer_prototypes_on_hand_built_map():
    lab = _square_labels()
    ring = depth_to_layers(own_class_depth(lab, 2), 1.0, 16).float()  # (1, 1, 9, 9)
    # feature = (layer index + 1, 10·class, 1): constant within each (class, layer) region
    feats = torch.cat([ring + 1, 10.0 * lab.float(), torch.ones_like(ring)], dim=1)
    probs = torch.cat([1 - 0.25 * lab.float(), 0.25 * lab.float()], 1) * torch.ones(1, 2, 9, 9)
    protos = layer_prototypes(feats, probs, lab, 2, PCCSConfig())
    # background layers 0 and 1 (depths 1..2.83), square layers 0, 1, 2: ordered by (image, class, layer)
    assert protos.labels.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(protos.vectors[:, 0], torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(protos.vectors[:, 1], torch.tensor([0.0, 0.0, 10.0, 10.0, 10.0]))
    torch.testing.assert_close(protos.mean_probs[2], torch.tensor([0.75, 0.25]))
    # K = 2 depth chunks: background layers (0, 1) → chunks (0, 1); square layers (0, 1, 2) → (0, 0, 1)
    assert protos.chunk.tolist() == [0, 1, 0, 0, 1] and protos.image.tolist() == [0] * 5


def test_layer_prototypes_drop_zero_vectors_and_count_images():
    lab = torch.cat([_square_labels(), torch.zeros_like(_square_labels())])
    feats = torch.ones(2, 3, 9, 9)
    feats[0, :, 2:7, 2:7] = 0.0  # the square's features are zero: no "prototype" from them (zero vectors are dropped)
    protos = layer_prototypes(feats, torch.full((2, 2, 9, 9), 0.5), lab, 2, PCCSConfig())
    assert 1 not in protos.labels.tolist()
    assert protos.image.tolist() == [0, 0, 1]  # image 1 is all background: one whole-patch layer


def test_uncertain_halves_background_keeps_uncertain_pixels_in_two_layers():
    lab = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    lab[..., :2, :] = 1  # background depths 1..10 below a 2-row band
    uncertain = torch.zeros_like(lab, dtype=torch.bool)
    uncertain[..., :, :6] = True
    cfg = PCCSConfig(background_layers="uncertain_halves")
    layers = layer_index(lab, 2, cfg, uncertain)[0, 0]
    bg = layers[2:]
    assert set(bg[:, :6].unique().tolist()) == {-1, 0, 1}  # inner ring (depth 1) dropped, two halves kept
    assert (bg[0, :6] == -1).all() and (bg[1:5, :6] == 0).all() and (bg[5:, :6] == 1).all()
    assert (bg[:, 6:] == -1).all()  # certain background pixels give no prototype
    assert (layers[:2] >= 0).all()  # the foreground class is layered as usual
    with pytest.raises(ValueError, match="uncertain"):
        layer_index(lab, 2, cfg)


# ----------------------------------------------------------------------------- contrastive loss
def test_contrastive_loss_analytic_value():
    protos = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # class 0 twice (same direction), class 1 once
    loss = prototype_contrastive_loss(protos, torch.tensor([0, 0, 1]), temperature=1.0)
    # rows 0 and 1: positive s = 1, negative s = 0 → log(e + 1) − 1; row 2 has no positive and is dropped
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_contrastive_loss_lower_for_aligned_than_for_shuffled_prototypes():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(5)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=1)
    protos = centres[labels] + 0.1 * torch.randn(15, 16, generator=g)
    aligned = prototype_contrastive_loss(protos, labels)
    for seed in range(3):
        perm = torch.randperm(15, generator=torch.Generator().manual_seed(seed))
        assert aligned < 0.5 * prototype_contrastive_loss(protos, labels[perm])


def test_contrastive_loss_degenerate_inputs_are_finite_zero_with_graph():
    v = torch.randn(4, 3, requires_grad=True)
    for labels in (torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3])):  # no negatives / no positives
        loss = prototype_contrastive_loss(v, labels, torch.rand(4))
        (g,) = torch.autograd.grad(loss, v)
        assert loss.item() == 0.0 and torch.isfinite(g).all()
    empty = prototype_contrastive_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0


def test_contrastive_loss_fp16_input_gives_finite_fp32():
    # exp(s/τ) = e^20 overflows fp16; the loss never exponentiates a similarity directly
    protos = torch.randn(6, 8).half()
    loss = prototype_contrastive_loss(protos, torch.tensor([0, 0, 1, 1, 2, 2]), torch.rand(6).half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_contrastive_weights_detached_by_default():
    protos = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    u = torch.rand(6, requires_grad=True)
    assert not prototype_contrastive_loss(protos, labels, u).requires_grad
    loss = prototype_contrastive_loss(protos, labels, u, detach_weights=False)  # the code's gradient path
    (g,) = torch.autograd.grad(loss, u)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ----------------------------------------------------------------------------- uncertainty
def test_uncertainty_weights_finite_at_zero_entropy():
    mean_probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    u = entropy(mean_probs)
    assert torch.isfinite(u).all() and u[0].abs() < 1e-6 and u[2].item() == pytest.approx(math.log(2), rel=1e-6)
    valid = torch.tensor([True, True, True])
    w = uncertainty_weights(u, valid, detach=False)
    (g,) = torch.autograd.grad((w * torch.arange(3.0)).sum(), mean_probs)
    assert torch.isfinite(w).all() and torch.isfinite(g).all()
    assert w.sum().item() == pytest.approx(1.0) and w[2] > w[0]  # the code: higher entropy weighs more
    assert uncertainty_weights(u, valid, "confidence")[2] < uncertainty_weights(u, valid, "confidence")[0]
    assert torch.equal(uncertainty_weights(u, torch.zeros(3, dtype=torch.bool)), torch.zeros(3))
    assert uncertainty_weights(u, torch.tensor([True, False, True]))[1] == 0
    with pytest.raises(ValueError, match="eps"):
        entropy(mean_probs, eps=0.0)


# ----------------------------------------------------------------------------- Sinkhorn and segment sums
def test_sinkhorn_balances_sub_prototypes_within_each_class():
    n = 12
    scores = torch.zeros(n, 2, 2)
    scores[:, :, 0] = 0.9  # every pixel prefers sub-prototype 0 ...
    scores[:, :, 1] = torch.linspace(-0.5, 0.8, n).unsqueeze(1)  # ... some less strongly than others
    member = torch.zeros(n, 2, dtype=torch.bool)
    member[:8, 0] = True  # class 0: 8 pixels; class 1: 4 pixels
    member[8:, 1] = True
    plan = sinkhorn_assignment(scores, member)
    torch.testing.assert_close(plan.sum(-1), member.float())  # member rows sum to 1, others 0
    # greedy argmax would put all 8 class-0 pixels on k = 0; 4 Sinkhorn rounds move about 3 of them
    assert plan[:8, 0].sum(0).min() > 2.5 and (plan.argmax(-1)[:8, 0] == 1).sum() >= 3
    converged = sinkhorn_assignment(scores, member, iterations=30)
    torch.testing.assert_close(converged[:8, 0].sum(0), torch.tensor([4.0, 4.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(converged[8:, 1].sum(0), torch.tensor([2.0, 2.0]), atol=0.05, rtol=0)
    # the pixels that like k = 1 most are the ones that go there
    assert converged.argmax(-1)[:8, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # two identical DDP ranks (sums doubled) solve the same problem
    torch.testing.assert_close(sinkhorn_assignment(scores, member, reduce_fn=lambda t: 2 * t), plan)


def test_sinkhorn_empty_class_is_finite():
    plan = sinkhorn_assignment(torch.rand(5, 3, 2) * 2 - 1, F.one_hot(torch.zeros(5, dtype=torch.long), 3).bool())
    assert torch.isfinite(plan).all() and plan[:, 1:].abs().sum() == 0


def test_segment_sums():
    values = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 1.0]])
    sums, counts = segment_sums(values, torch.tensor([0, 2, -1, 0]), 3)
    torch.testing.assert_close(sums, torch.tensor([[8.0, 1.0], [0.0, 0.0], [3.0, 2.0]]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- teacher prototype memory
def _protos(vectors, labels, chunk):
    n = len(labels)
    return LayerPrototypes(torch.as_tensor(vectors, dtype=torch.float32).reshape(n, 3),
                           torch.tensor(labels, dtype=torch.long), torch.full((n, 2), 0.5),
                           torch.tensor(chunk, dtype=torch.long), torch.zeros(n, dtype=torch.long))


def test_memory_first_seen_initialises_from_student_chunks_then_moves_by_momentum():
    cfg = PCCSConfig(num_subprototypes=2, student_mix=0.0)
    memory = PrototypeMemory.create(2, 2, 3, cfg.memory_init)
    random_c1 = memory.vectors[1].clone()
    assert not memory.seen.any()
    protos = _protos([[1.0, 0, 0], [0, 2.0, 0], [0, 1.0, 1.0]], [0, 0, 0], [0, 1, 1])  # class 0 only
    teacher = torch.tensor([[0.0, 0.0, 1.0]])
    zero = torch.zeros(1, dtype=torch.long)
    update_memory(memory, teacher, zero, zero, torch.ones(1, dtype=torch.bool), protos, cfg, lambda t: t)
    # unseen class 0 takes its chunks (chunk 1 = mean of two unit vectors); the teacher pixel did not count yet
    torch.testing.assert_close(memory.vectors[0, 0], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(memory.vectors[0, 1], F.normalize(torch.tensor([0, 1 + 0.5 ** 0.5, 0.5 ** 0.5]), dim=0))
    assert memory.seen.tolist() == [True, False]
    torch.testing.assert_close(memory.vectors[1], random_c1)  # class 1 was not seen: untouched
    # a confident, agreeing teacher pixel assigned to (0, 0) moves p_00 by (1 − γ), then normalised
    before = memory.vectors[0, 0].clone()
    no_protos = _protos(torch.zeros(0, 3), [], [])
    update_memory(memory, teacher, zero, zero, torch.ones(1, dtype=torch.bool), no_protos, cfg, lambda t: t)
    expected = F.normalize(0.999 * before + 0.001 * teacher[0], dim=0)
    torch.testing.assert_close(memory.vectors[0, 0], expected)
    # a gated-out pixel changes nothing
    update_memory(memory, teacher, zero, zero, torch.zeros(1, dtype=torch.bool), no_protos, cfg, lambda t: t)
    torch.testing.assert_close(memory.vectors[0, 0], expected)
    assert memory.updates == 3


def test_memory_update_agrees_across_identical_ranks_and_round_trips():
    torch.manual_seed(0)
    cfg = PCCSConfig(memory_init="random")
    feats = F.normalize(torch.randn(20, 4), dim=1)
    pseudo = torch.randint(0, 3, (20,))
    assign = torch.randint(0, 2, (20,))
    protos = LayerPrototypes(torch.randn(5, 4), torch.tensor([0, 0, 1, 2, 2]), torch.full((5, 3), 1 / 3),
                             torch.tensor([0, 1, 0, 0, 1]), torch.zeros(5, dtype=torch.long))
    one, two = PrototypeMemory.create(3, 2, 4, "random"), None
    two = PrototypeMemory(one.vectors.clone(), one.seen.clone())
    gate = torch.rand(20) > 0.3
    update_memory(one, feats, pseudo, assign, gate, protos, cfg, lambda t: t)
    update_memory(two, feats, pseudo, assign, gate, protos, cfg, lambda t: 2 * t)
    torch.testing.assert_close(one.vectors, two.vectors)
    torch.testing.assert_close(one.vectors.norm(dim=-1), torch.ones(3, 2))

    method = PCCS(cfg)
    method.build_modules({layer: 4 for layer in LAYERS}, 3, 2)
    method.memory.vectors = F.normalize(torch.randn(3, 2, 256), dim=-1)
    state = method.state_dict()
    other = PCCS(cfg)
    other.build_modules({layer: 4 for layer in LAYERS}, 3, 2)
    other.load_state_dict(state)
    assert torch.equal(other.memory.vectors, method.memory.vectors) and other.memory.updates == 0
    wrong = PCCS(cfg)
    wrong.build_modules({layer: 4 for layer in LAYERS}, 4, 2)
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="no PCCS prototype memory"):
        other.load_state_dict({})


# ----------------------------------------------------------------------------- the four terms
def _step(num_classes, grid, cfg=PCCSConfig(), seed=0, logits=None):
    g = torch.Generator().manual_seed(seed)
    method = PCCS(cfg)
    sizes = {"encoder:1": tuple(2 * s for s in grid), "encoder:2": grid,
             "encoder:3": tuple(max(1, s // 2) for s in grid)}
    module = method.build_modules({layer: 5 for layer in LAYERS}, num_classes, len(grid))
    full = tuple(4 * s for s in grid)
    b_l, b_u = 1, 2

    def features(batch):
        return {layer: torch.randn(batch, 5, *size, generator=g) for layer, size in sizes.items()}

    student_logits = torch.randn(b_l + b_u, num_classes, *full, generator=g) if logits is None else logits
    student_logits.requires_grad_(True)
    teacher = PCCS(cfg).build_modules({layer: 5 for layer in LAYERS}, num_classes, len(grid)).requires_grad_(False)
    inputs = StepInputs(num_classes=num_classes, ignore_index=None, target_l=torch.zeros(b_l, 1, *full).long(),
                        logits_l=student_logits[:b_l], logits_u=student_logits[b_l:],
                        teacher_logits_u=torch.randn(b_u, num_classes, *full, generator=g),
                        features=features(b_l + b_u), teacher_features=features(b_u), modules=module,
                        teacher_modules=teacher, progress=0.5)
    return method, inputs, student_logits


@pytest.mark.parametrize("grid", [(8, 8), (3, 6, 6)])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_pccs_terms_finite_with_gradient_into_the_student(grid, num_classes):
    # random teacher logits are confident nowhere: open the L_aux gate to check the gradient path
    method, inputs, logits = _step(num_classes, grid, PCCSConfig(pseudo_label_threshold=0.0))
    terms = method.losses(inputs)
    assert set(terms) == set(PCCS.term_names)
    params = list(inputs.modules.parameters())
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        g_logits, *g_params = torch.autograd.grad(value, [logits, *params], retain_graph=True, allow_unused=True)
        to_logits = g_logits is not None and g_logits.abs().sum() > 0
        to_head = sum(float(g.abs().sum()) for g in g_params if g is not None) > 0
        # L_con, L_ent train the segmentation output; L_contra, L_aux the projection branch
        assert (to_logits, to_head) == ((True, False) if name in ("con", "ent") else (False, True)), name
        if g_logits is not None:
            assert g_logits[:1].abs().sum() == 0  # labeled patches are untouched by the PCCS terms
    assert method.memory.updates == 1 and method.memory.seen.any()
    assert all(p.grad is None for p in inputs.teacher_modules.parameters())


def test_pccs_single_class_batch_is_finite_and_contra_zero():
    logits = torch.zeros(3, 3, 32, 32)
    logits[:, 1] = 5.0  # student predicts class 1 everywhere: nothing to contrast
    method, inputs, _ = _step(3, (8, 8), logits=logits)
    inputs.teacher_logits_u = logits[1:].clone()
    terms = method.losses(inputs)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["contra"].item() == 0.0


@pytest.mark.parametrize("cfg", [PCCSConfig.code_switches(), PCCSConfig(layer_labels="teacher", max_layers=3,
                                                                         uncertainty_weighting="confidence")])
def test_pccs_switches_run_finite(cfg):
    method, inputs, logits = _step(3, (8, 8), cfg)
    terms = method.losses(inputs)
    assert all(torch.isfinite(v) for v in terms.values())
    if not cfg.detach_contrastive_weights:  # the code's path: L_contra also reaches the softmax via w_i, a_ij
        (g,) = torch.autograd.grad(terms["contra"], logits)
        assert g.abs().sum() > 0


def test_pccs_half_precision_inputs_give_fp32_terms():
    method, inputs, _ = _step(2, (8, 8))
    module, teacher = inputs.modules, inputs.teacher_modules
    feats_s = {k: v[1:] for k, v in inputs.features.items()}
    terms = pccs_losses(module(feats_s).half(), teacher(inputs.teacher_features).half(),
                        inputs.logits_u.half(), inputs.teacher_logits_u.half(), method.memory, method.config, 0.5)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_memory_not_updated_before_the_consistency_phase():
    method, inputs, _ = _step(2, (8, 8))
    inputs.progress = 0.0
    before = method.memory.vectors.clone()
    method.losses(inputs)
    assert method.memory.updates == 0 and torch.equal(method.memory.vectors, before)


def test_weights_follow_the_code_phases_and_ramp():
    method = PCCS(PCCSConfig())
    assert set(method.weights(0.0).values()) == {0.0}
    w = method.weights(0.02)  # after iteration 200/15k, before 500/15k
    assert w["con"] == pytest.approx(0.1 * math.exp(-5 * 0.98 ** 2)) and w["ent"] == pytest.approx(0.1 * w["con"])
    assert w["contra"] == 0.0 and w["aux"] == 0.0
    w = method.weights(1.0)
    assert w == pytest.approx({"con": 0.1, "ent": 0.01, "contra": 0.01, "aux": 0.3})
    cfg = PCCSConfig()
    assert cfg.entropy_threshold(0.0) == pytest.approx(0.25 * math.log(2.7) + 0.25 * math.log(2.7) * math.exp(-5))
    assert cfg.entropy_threshold(1.0) == pytest.approx(0.5 * math.log(2.7))


def test_aux_weight_is_ramped_from_the_prototype_phase_and_code_step_is_a_switch():
    cfg = PCCSConfig()
    method = PCCS(cfg)
    start = cfg.prototype_start
    assert method.weights(start - 1e-6)["aux"] == 0.0
    # Gaussian ramp of λ(t): at 3.4 % of the run the code's full 0.3 is ~0.3·e^-5 ≈ 0.002
    assert method.weights(start + 1e-3)["aux"] == pytest.approx(0.3 * math.exp(-5 * (1 - start - 1e-3) ** 2))
    assert method.weights(0.5)["aux"] == pytest.approx(0.3 * math.exp(-5 * 0.25))
    code = PCCS(PCCSConfig.code_switches())
    assert code.weights(start)["aux"] == pytest.approx(0.3) and code.weights(start - 1e-6)["aux"] == 0.0


def test_memory_update_share_is_logged():
    """memory_kept: the share of unlabeled grid pixels allowed to move the memory (confident, and agreeing)."""
    grid = (8, 8)
    full = tuple(4 * s for s in grid)
    teacher = torch.zeros(2, 2, *full)
    teacher[:, 1, :, : full[1] // 2] = 6.0  # left half: entropy ~0.017; right half: p = 0.5, entropy ln 2
    cfg = PCCSConfig(uncertain_entropy=(0.1, 0.1), update_agreement=False)
    method, inputs, _ = _step(2, grid, cfg)
    inputs.teacher_logits_u = teacher
    method.losses(inputs)
    assert float(method.diagnostics["memory_kept"]) == pytest.approx(0.5)
    agree, inputs_a, _ = _step(2, grid, PCCSConfig(uncertain_entropy=(0.1, 0.1)))
    inputs_a.teacher_logits_u = teacher
    agree.losses(inputs_a)
    assert 0.0 <= float(agree.diagnostics["memory_kept"]) <= 0.5  # agreement only removes pixels
    assert "memory_kept" in PCCS.diagnostic_names


def test_aux_targets_are_gated_by_teacher_confidence():
    """Only pixels whose teacher max-softmax passes the threshold get an L_aux target."""
    grid = (8, 8)
    full = tuple(4 * s for s in grid)
    teacher = torch.zeros(2, 2, *full)
    teacher[:, 1, :, : full[1] // 2] = 6.0  # left half: class 1 with p ≈ 0.9975; right half: p = 0.5
    gated, inputs, _ = _step(2, grid, PCCSConfig(pseudo_label_threshold=0.9))
    inputs.teacher_logits_u = teacher
    terms = gated.losses(inputs)
    assert float(gated.diagnostics["aux_kept"]) == pytest.approx(0.5)
    open_, inputs_o, _ = _step(2, grid, PCCSConfig(pseudo_label_threshold=0.0))
    inputs_o.teacher_logits_u = teacher
    open_.losses(inputs_o)
    assert float(open_.diagnostics["aux_kept"]) == 1.0
    # nothing confident: L_aux is exactly 0 and finite, still in the graph
    shut, inputs_s, _ = _step(2, grid, PCCSConfig(pseudo_label_threshold=0.9))
    inputs_s.teacher_logits_u = torch.zeros(2, 2, *full)
    out = shut.losses(inputs_s)
    assert out["aux"].item() == 0.0 and out["aux"].requires_grad and torch.isfinite(terms["aux"])
    assert set(shut.diagnostics) == set(PCCS.diagnostic_names)


def test_aux_encoder_gradient_switch():
    """Default: L_aux reaches the encoder features; aux_encoder_gradient=False stops it at the projection branch."""
    for flag in (True, False):
        method, inputs, _ = _step(2, (8, 8), PCCSConfig(pseudo_label_threshold=0.0, aux_encoder_gradient=flag))
        feats = {k: v.clone().requires_grad_(True) for k, v in inputs.features.items()}
        inputs.features = feats
        aux = method.losses(inputs)["aux"]
        grads = torch.autograd.grad(aux, list(feats.values()) + list(inputs.modules.parameters()), allow_unused=True)
        to_encoder = sum(float(g.abs().sum()) for g in grads[:len(feats)] if g is not None) > 0
        to_head = sum(float(g.abs().sum()) for g in grads[len(feats):] if g is not None) > 0
        assert (to_encoder, to_head) == (flag, True)
        method2, inputs2, _ = _step(2, (8, 8), PCCSConfig(pseudo_label_threshold=0.0, aux_encoder_gradient=flag))
        contra = method2.losses(inputs2)["contra"]  # L_contra is unaffected by the switch
        assert torch.isfinite(contra)


def test_memory_rates_are_run_relative_and_reduce_to_the_code_at_its_run_length():
    def rates(run_steps, cfg=PCCSConfig()):
        method = PCCS(cfg)
        if run_steps is not None:
            method.set_run_steps(run_steps)
        return method.memory_rates()

    assert rates(15000) == pytest.approx((0.999, 0.001))
    assert rates(None) == pytest.approx((0.999, 0.001), abs=1e-12)  # run length unknown: the values as given
    g_short, mix_short = rates(1000)
    g_long, _ = rates(250_000)
    # the horizon 1/(1 − γ) is the same fraction of the run (1000/15000)
    assert 1 / (1 - g_short) == pytest.approx(1000 * 1000 / 15000, rel=1e-6)
    assert 1 / (1 - g_long) == pytest.approx(1000 * 250_000 / 15000, rel=1e-6)
    assert mix_short == pytest.approx(1 - g_short)
    assert rates(10)[0] == pytest.approx(0.9)  # floor: at least a 10-update horizon
    assert rates(1000, PCCSConfig.code_switches()) == pytest.approx((0.999, 0.001), abs=1e-12)  # per step (code)
    method = PCCS(PCCSConfig())
    method.set_run_steps(1000)
    tc = method.time_constants()
    assert tc["memory_momentum"] == pytest.approx(g_short) and tc["memory_momentum_paper"] == 0.999
    assert tc["memory_horizon_steps"] == pytest.approx(1000 / 15)
    # the update uses the resolved rate
    method, inputs, _ = _step(2, (8, 8))
    method.set_run_steps(1000)
    method.losses(inputs)
    assert method.diagnostics["memory_momentum"] == pytest.approx(g_short)


# ----------------------------------------------------------------------------- configuration and errors
@pytest.mark.parametrize("changes, match", [
    ({"use_teacher": False}, "use_teacher"),
    ({"grid_layer": "encoder:4"}, "grid_layer"),
    ({"contrast_temperature": 0.0}, "contrast_temperature"),
    ({"memory_momentum": 1.5}, "memory_momentum"),
    ({"max_layers": 1}, "max_layers"),
    ({"layer_labels": "gt"}, "layer_labels"),
    ({"uncertain_entropy": (0.1,)}, "uncertain_entropy"),
    ({"aux_coefficient": -1.0}, "aux_coefficient"),
    ({"pseudo_label_threshold": 1.5}, "pseudo_label_threshold"),
    ({"aux_rampup_length": -0.1}, "aux_rampup_length"),
    ({"reference_steps": 0}, "reference_steps"),
])
def test_config_validation_names_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        PCCSConfig(**changes)


def test_too_few_encoder_stages_fail_clearly():
    method = PCCS(PCCSConfig())
    method.check_encoder_stages(4, "2d")
    with pytest.raises(ValueError, match=r"only 3 encoder stages.*projection_layers"):
        method.check_encoder_stages(3, "2d")


def test_losses_without_modules_fail_clearly():
    method, inputs, _ = _step(2, (8, 8))
    inputs.teacher_modules = None
    with pytest.raises(ValueError, match="projection branch"):
        method.losses(inputs)


# ----------------------------------------------------------------------------- through the real trainer
def test_trainer_projection_branch_is_optimised_ema_copied_and_checkpointed(synthetic_dataset, fresh_results):
    from conftest import build_trainer, started_trainer

    from nnunet_proto.ops.schedules import ema_decay

    trainer = started_trainer("nnUNetTrainerPCCS", synthetic_dataset)
    try:
        head = list(trainer.method_modules.parameters())
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert head and all(id(p) in optimised for p in head)
        ema = trainer.teacher_modules
        assert all(not p.requires_grad for p in ema.module.parameters())
        for _ in range(2):
            before = {k: v.clone() for k, v in ema.module.state_dict().items()}
            alpha = ema_decay(trainer.global_step, trainer.config.ema_decay, trainer.config.ema_warmup)
            trainer.train_step(next(trainer.dataloader_train))
            student = trainer.method_modules.state_dict()
            for k, v in ema.module.state_dict().items():
                torch.testing.assert_close(v, alpha * before[k] + (1 - alpha) * student[k])
        assert trainer.method.memory.updates == 1  # step 0 is before the consistency phase, step 1 after it
    finally:
        trainer.on_train_end()
    saved = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    head_keys = {f"head.{k}" for k in trainer.method_modules.head.state_dict()}
    assert head_keys.isdisjoint(saved["network_weights"]) and saved["nnunet_proto"]["modules"].keys() == {
        k for k in trainer.method_modules.state_dict()}  # the branch is saved beside network_weights
    restored = build_trainer("nnUNetTrainerPCCS", synthetic_dataset, "2d", continue_training=True)
    restored.num_epochs, restored.num_iterations_per_epoch = 2, 3
    restored.load_checkpoint(f"{trainer.output_folder}/checkpoint_final.pth")
    for k, v in trainer.teacher_modules.module.state_dict().items():
        torch.testing.assert_close(restored.teacher_modules.module.state_dict()[k], v)
    assert torch.equal(restored.method.memory.vectors, trainer.method.memory.vectors.cpu())
    assert restored.method.memory.updates == 1


def test_trainer_with_too_few_encoder_stages_fails_before_building(synthetic_dataset, fresh_results):
    from conftest import build_trainer

    plans = synthetic_dataset.load_plans()
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    for key in ("features_per_stage", "strides", "kernel_sizes", "n_conv_per_stage"):
        arch[key] = arch[key][:3]
    arch["n_stages"] = 3
    arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][:2]
    trainer = build_trainer("nnUNetTrainerPCCS", synthetic_dataset, "2d", plans=plans)
    with pytest.raises(ValueError, match=r"configuration '2d' has only 3 encoder stages"):
        trainer.initialize()
