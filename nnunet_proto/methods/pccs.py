"""PCCS: prototype contrastive consistency segmentation (He, Lai, Wang, Kong; arXiv 2502.06650), docs/methods/pccs.md.

Implements our "paper intent" reading (docs/methods/pccs.md, 'Method'; the official code's teacher never updates and
its prototype CE sends no gradient). Per training step, on the unlabeled patches only, with a
projection branch (method-owned module, as in the code) mapping encoder stages 1-3, resized to the grid of
stage 2 (¼ resolution in 2D), to D = 256 channels; the student uses it, the EMA teacher uses its EMA copy,
so both live in the **same** embedding space:

* **SDM layer prototypes** (per-class SDFs only): pseudo labels Ŷ = argmax of the student softmax
  on the grid; for each image and class, the signed distance map of {Ŷ = c} is quantised into at most
  L distance layers (``nnunet_proto.ops.sdm``); every non-empty layer gives one prototype = mean student
  feature, plus the mean softmax m_i of its pixels.
* **L_contra**: uncertainty-weighted multi-positive contrastive loss on the L2-normalised layer
  prototypes, τ = 0.05, weights w_i = softmax(H(m_i)), w_i and the positive weights a_ij detached
  (``nnunet_proto.ops.contrastive``).
* **Teacher prototype memory** (C × K × D, method state; "prototype updating prototype"): teacher
  prototype prediction P_T = softmax(max_k cos(f_T, p_ck) / τ_p); each class's pixels (teacher pseudo
  label) are assigned to its K sub-prototypes by Sinkhorn; after the losses, p ← γ p + (1 − γ)·mean of
  the confident, agreeing teacher features assigned to it (γ = 0.999), then p ← normalise(0.999 p + 0.001 ·
  student layer-prototype chunk of the same class). Statistics go through ``reduce_fn`` (DDP).
* **L_aux** (ProtoSeg-style pixel-prototype CE): student features vs the teacher memory over all
  C·K sub-prototypes, targets c·K + j from the teacher pseudo label c and the Sinkhorn assignment j,
  with gradient into the student.
* **L_con + L_ent** ("uncertainty consistency"): MSE(softmax(student)↓, P_T) and the mean
  prediction entropy of the student, weighted λ(t) and 0.1·λ(t).

Total: L = L_sup + λ(t)·(L_con + 0.1·L_ent) + 0.01·L_contra + 0.3·L_aux, λ(t) = 0.1·sigmoid_rampup over
the run; the code's warm-up phases (supervised only until iteration 200, prototype terms from 500, of
15k) become fractions of the run. Everything is computed every step (zero weights, never skipped).

Restriction: the base trainer runs the teacher on unlabeled patches only, so L_con is computed on the
unlabeled patches (the code also adds it on labeled ones, where ground truth already supervises).
Gradient audit: L_con and L_ent reach the student's segmentation output; L_contra and L_aux reach the
projection branch and encoder stages 1-3; teacher, memory, P_T, pseudo labels and targets are constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.contrastive import NORM_EPS, prototype_contrastive_loss, segment_sums
from nnunet_proto.ops.losses import cross_entropy_ignore
from nnunet_proto.ops.prototypes import mask_invalid_logits, resize_masks
from nnunet_proto.ops.pseudo_labels import confidence_gate
from nnunet_proto.ops.schedules import ema_horizon, sigmoid_rampup
from nnunet_proto.ops.sdm import depth_to_layers, own_class_depth
from nnunet_proto.ops.sinkhorn import sinkhorn_assignment
from nnunet_proto.ops.uncertainty import WEIGHTINGS, entropy

#: the code's entropy threshold scale ln(2.7) (official code)
LN_2_7 = math.log(2.7)
LAYER_LABELS = ("student", "teacher")
BACKGROUND_LAYERS = ("layers", "uncertain_halves")
ENTROPY_REDUCTIONS = ("mean", "frobenius")
MEMORY_INITS = ("first_seen", "random")
Reducer = Callable[[torch.Tensor], torch.Tensor]
#: the code's constants where the nnU-Net defaults differ (``PCCSConfig.code_switches``): per-step memory
#: rates, L_aux at full weight from prototype_start on and on every unlabeled pixel
CODE_SCHEDULE = {"time_constants": "paper", "aux_rampup_length": 0.0, "pseudo_label_threshold": 0.0}


@dataclass(frozen=True)
class PCCSConfig(SemiSupervisedConfig):
    """PCCS hyperparameters; "paper intent" defaults (docs/methods/pccs.md), sources in brackets.

    Attributes:
        w_max, rampup, rampup_length: inherited; λ(t) = 0.1·sigmoid_rampup over the whole run [code: 0.1; ramp: ours].
        ema_decay: inherited, 0.99 with warm-up; covers the network and the projection branch [code config; SSL4MIS].
        projection_layers: encoder stages fused by the projection branch [code: e1, e2, e3].
        grid_layer: the stage whose grid the others are resized to [code: e2, ¼ resolution in 2D].
        projection_dim / projection_hidden: conv1×1(Σch→hidden) → ReLU → conv1×1(hidden→dim) [code: 256/256].
        num_subprototypes: K sub-prototypes per class in the teacher memory [code: 2].
        contrast_temperature: τ of L_contra [code: 0.05].
        prototype_temperature: τ_p of P_T = softmax(max_k cos / τ_p) [our choice: 0.1; the code uses a LayerNorm].
        aux_temperature: temperature of the L_aux logits cos(f_S, p)/τ [not specified (the code uses raw
            dot products); our choice: τ_p = 0.1].
        memory_momentum: γ of p ← γ p + (1 − γ) f̄ [code: 0.999], at the code's run length.
        student_mix: weight of the student layer-prototype chunk mixed into the memory [code: 1 − 0.999],
            at the code's run length.
        reference_steps: inherited; the code's 15 000 iterations. With ``time_constants=
            "run_relative"`` (inherited default) the EMA decay, γ and 1 − student_mix are applied
            run-relative (``SemiSupervisedMethod.resolve_decay``): the memory keeps the same horizon as a
            *fraction of the run* (1000 of 15 000 iterations = 6.7 %), so a 1000-step run uses γ ≈ 0.985
            and nnU-Net's 250 000 steps γ ≈ 0.99994. ``"paper"`` uses them per step as given (the code's
            behaviour at any run length): a 1000-step run would still hold ~37 % of the memory's first
            state at the end.
        memory_init: ``"first_seen"``: a class's K prototypes start as its first student layer-prototype
            chunks (our choice: with γ = 0.999 random prototypes would dominate P_T and the aux targets
            for thousands of iterations); ``"random"``: truncated-normal(0.02), L2-normalised [code].
        sinkhorn_epsilon / sinkhorn_iterations: balanced assignment [code: 0.05 / 4]; hard assignment by
            argmax (the code's Gumbel-softmax sampling is not reproduced).
        update_agreement: the memory learns only from pixels whose teacher pseudo label equals the
            teacher's prototype prediction [code's agreement mask; ProtoSeg's "correctly classified" gate].
        contra_coefficient / aux_coefficient / uncertainty_coefficient: 0.01 / 0.3 / 0.1 [code].
        aux_rampup_length: L_aux's weight is aux_coefficient · sigmoid_rampup(t, aux_rampup_length) from
            ``prototype_start`` on, the Gaussian ramp of λ(t) [ours; 0 = the code's step to the full 0.3 at
            ``prototype_start``, ~3 % of the run]. The aux targets are the teacher's argmax; at full weight
            from 3 % of the run they pull the encoder towards an untrained teacher.
        pseudo_label_threshold: L_aux targets only where the teacher's max softmax on the grid ≥ this
            value (``ops.pseudo_labels.confidence_gate``, per ``threshold_mode``) [ours: 0.9, MPER's α; code:
            every unlabeled pixel, 0]. The kept share is logged (``aux_kept``).
        aux_encoder_gradient: L_aux's gradient reaches encoder stages 1-3 through the projection branch
            [paper intent: True; the code's aux CE sends no gradient at all]. We keep it: it is the only
            way L_aux can shape the features the segmentation uses (the projection branch is not used at
            inference), and the ramp and the gate above bound what untrained targets can do. False trains
            only the projection branch with L_aux.
        consistency_start / prototype_start: fractions of the run before which L_con/L_ent and
            L_contra/L_aux have weight 0 [code: iterations 200 and 500 of 15 000]. The memory is updated
            from the earlier of the two on (P_T, the L_con target, reads it).
        entropy_eps: eps in −Σ p log(p + eps) [code: 1e-8].
        uncertain_entropy: (start, end) of the entropy threshold τ_H(t), sigmoid-ramped over the run;
            H ≤ τ_H marks a confident teacher pixel for memory updates (our use), H > τ_H an uncertain
            student pixel [code: (0.25, 0.5)·ln 2.7].
        distance_bin_width / max_layers: SDF quantisation into layers, in grid voxels [our choice: integer bins,
            at most L = 16; used in 2D too, so the prototype count stays bounded].
        layer_labels: pseudo labels whose SDF defines the layers: ``"student"`` [code] or
            ``"teacher"``.
        background_layers: ``"layers"``: background layered like every class [our choice, "pure
            per-class layers"]; ``"uncertain_halves"``: the code's two prototypes from uncertain
            background pixels split at half the deepest background distance [code].
        detach_contrastive_weights: detach w_i and a_ij [our choice; code: False].
        uncertainty_weighting: ``"entropy"`` (w ∝ e^H, what the code runs) or ``"confidence"`` (w ∝ e^−H,
            the code comment's intent).
        entropy_reduction: ``"mean"`` pixel entropy of the student [our choice] or ``"frobenius"`` ½‖H‖_F of
            the grid entropy map over the batch [code].
    """

    projection_layers: Tuple[str, ...] = ("encoder:1", "encoder:2", "encoder:3")
    grid_layer: str = "encoder:2"
    projection_dim: int = 256
    projection_hidden: int = 256
    num_subprototypes: int = 2
    contrast_temperature: float = 0.05
    prototype_temperature: float = 0.1
    aux_temperature: float = 0.1
    memory_momentum: float = 0.999
    student_mix: float = 0.001
    reference_steps: Optional[int] = 15000
    memory_init: str = "first_seen"
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 4
    update_agreement: bool = True
    contra_coefficient: float = 0.01
    aux_coefficient: float = 0.3
    uncertainty_coefficient: float = 0.1
    aux_rampup_length: float = 1.0
    pseudo_label_threshold: float = 0.9
    aux_encoder_gradient: bool = True
    consistency_start: float = 200 / 15000
    prototype_start: float = 500 / 15000
    entropy_eps: float = 1e-8
    uncertain_entropy: Tuple[float, float] = (0.25 * LN_2_7, 0.5 * LN_2_7)
    distance_bin_width: float = 1.0
    max_layers: int = 16
    layer_labels: str = "student"
    background_layers: str = "layers"
    detach_contrastive_weights: bool = True
    uncertainty_weighting: str = "entropy"
    entropy_reduction: str = "mean"

    def validate(self) -> None:
        super().validate()
        if not self.use_teacher:
            raise ValueError("PCCS needs use_teacher=True (the teacher memory and P_T come from the EMA teacher)")
        if not self.projection_layers or self.grid_layer not in self.projection_layers:
            raise ValueError(f"grid_layer {self.grid_layer!r} must be one of projection_layers "
                             f"{self.projection_layers}")
        positive = {"projection_dim": self.projection_dim, "projection_hidden": self.projection_hidden,
                    "num_subprototypes": self.num_subprototypes, "contrast_temperature": self.contrast_temperature,
                    "prototype_temperature": self.prototype_temperature, "aux_temperature": self.aux_temperature,
                    "sinkhorn_epsilon": self.sinkhorn_epsilon, "sinkhorn_iterations": self.sinkhorn_iterations,
                    "entropy_eps": self.entropy_eps, "distance_bin_width": self.distance_bin_width}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        unit = {"memory_momentum": self.memory_momentum, "student_mix": self.student_mix,
                "consistency_start": self.consistency_start, "prototype_start": self.prototype_start}
        for name, value in unit.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("contra_coefficient", "aux_coefficient", "uncertainty_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.aux_rampup_length <= 1.0:
            raise ValueError(f"aux_rampup_length must be in [0, 1], got {self.aux_rampup_length}")
        if self.memory_momentum >= 1.0:
            raise ValueError(f"memory_momentum must be < 1, got {self.memory_momentum}")
        if len(self.uncertain_entropy) != 2 or min(self.uncertain_entropy) < 0:
            raise ValueError(f"uncertain_entropy must be two entropies >= 0 (start, end) in nats, "
                             f"got {self.uncertain_entropy}")
        if self.max_layers < 2:
            raise ValueError(f"max_layers must be >= 2 (boundary and interior), got {self.max_layers}")
        choices = {"memory_init": MEMORY_INITS, "layer_labels": LAYER_LABELS,
                   "background_layers": BACKGROUND_LAYERS, "uncertainty_weighting": WEIGHTINGS,
                   "entropy_reduction": ENTROPY_REDUCTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def code_switches(cls, **changes: Any) -> "PCCSConfig":
        """Paper-intent config with every *cheap* code-faithful switch flipped (docs/methods/pccs.md, 'Deviations').

        Random memory init, the code's background prototypes, undetached contrastive weights, Frobenius
        entropy, per-step memory rates, L_aux unramped and ungated. Not a reproduction of the code: the
        teacher still follows the student by EMA, L_aux still trains the student, P_T is still a
        temperature softmax and the layers are still per-class SDFs.
        """
        code = dict(memory_init="random", background_layers="uncertain_halves",
                    detach_contrastive_weights=False, entropy_reduction="frobenius", **CODE_SCHEDULE)
        return cls(**{**code, **changes})

    @classmethod
    def paper(cls, **changes: Any) -> "PCCSConfig":
        """The paper's and code's literal schedule where our nnU-Net defaults differ (docs/methods/pccs.md):
        L_aux at its full 0.3 from ``prototype_start`` (~3 % of the run) on every unlabeled pixel (no ramp,
        no confidence gate) and per-step memory/EMA rates as written (not rescaled to the run length)."""
        return cls(**{**CODE_SCHEDULE, **changes})

    def aux_ramp(self, progress: float) -> float:
        """Factor of aux_coefficient at ``progress``: 0 before prototype_start, then the Gaussian ramp."""
        if progress < self.prototype_start:
            return 0.0
        return sigmoid_rampup(progress, self.aux_rampup_length) if self.aux_rampup_length > 0 else 1.0

    def entropy_threshold(self, progress: float) -> float:
        """τ_H(t) = start + (end − start)·sigmoid_rampup(t) (the code ramps over all iterations)."""
        start, end = self.uncertain_entropy
        return start + (end - start) * sigmoid_rampup(progress, 1.0)

    @property
    def memory_start(self) -> float:
        return min(self.consistency_start, self.prototype_start)


class PCCSProjection(nn.Module):
    """Projection branch: resize the tapped encoder stages to one grid, concatenate, conv1×1 → ReLU → conv1×1.

    Input ``{layer: (B, C_layer, *spatial_layer)}``; output ``(B, dim, *grid)`` (not normalised), grid =
    spatial size of ``grid_layer``. Resizing is bilinear/trilinear with align_corners=True as in the code
    (official code). Kept beside the stock network: its weights never enter ``network_weights``.
    """

    def __init__(self, channels: Sequence[int], layers: Sequence[str], grid_layer: str, dim: int, hidden: int,
                 spatial_dims: int):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) != len(layers):
            raise ValueError(f"one channel count per layer needed, got {list(channels)} for {list(layers)}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.layers, self.grid_layer = tuple(layers), grid_layer
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.head = nn.Sequential(conv(sum(channels), hidden, 1), nn.ReLU(inplace=True), conv(hidden, dim, 1))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        size = tuple(features[self.grid_layer].shape[2:])
        parts = [features[layer] if tuple(features[layer].shape[2:]) == size
                 else F.interpolate(features[layer], size=size, mode=self.mode, align_corners=True)
                 for layer in self.layers]
        return self.head(torch.cat(parts, dim=1))


class PrototypeMemory:
    """Teacher-side prototype memory: ``vectors`` (C, K, D) unit vectors, ``seen`` (C,) bool, update count.

    ``seen[c]`` is False while class c still holds its random initialisation (``memory_init='first_seen'``);
    such classes are masked out of P_T and of the L_aux targets (unless no class is seen yet).
    """

    def __init__(self, vectors: torch.Tensor, seen: torch.Tensor, updates: int = 0):
        self.vectors, self.seen, self.updates = vectors, seen, updates

    @classmethod
    def create(cls, num_classes: int, num_sub: int, dim: int, init: str) -> "PrototypeMemory":
        vectors = nn.init.trunc_normal_(torch.empty(num_classes, num_sub, dim), std=0.02)
        seen = torch.full((num_classes,), init == "random", dtype=torch.bool)
        return cls(F.normalize(vectors, dim=-1), seen)

    def to(self, device: torch.device) -> "PrototypeMemory":
        self.vectors, self.seen = self.vectors.to(device), self.seen.to(device)
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"vectors": self.vectors.detach().cpu().clone(), "seen": self.seen.cpu().clone(),
                "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vectors = state["vectors"]
        if tuple(vectors.shape) != tuple(self.vectors.shape):
            raise ValueError(f"PCCS prototype memory in the checkpoint has shape {tuple(vectors.shape)} but this "
                             f"trainer builds {tuple(self.vectors.shape)} (classes, num_subprototypes, "
                             f"projection_dim); resume with the configuration that wrote it")
        device = self.vectors.device
        self.vectors = vectors.to(device).float().clone()
        self.seen = state["seen"].to(device).bool().clone()
        self.updates = int(state.get("updates", 0))


@dataclass
class LayerPrototypes:
    """SDM layer prototypes of a batch (P of them, ordered by image, class, layer).

    vectors: (P, D) mean features (not normalised; carry the student's gradient);
    labels: (P,) class; mean_probs: (P, C) mean softmax of the layer's pixels; chunk: (P,) index in
    [0, K) of the depth chunk (boundary → interior) used to mix into the memory; image: (P,) batch index.
    """

    vectors: torch.Tensor
    labels: torch.Tensor
    mean_probs: torch.Tensor
    chunk: torch.Tensor
    image: torch.Tensor


def layer_index(labels: torch.Tensor, num_classes: int, config: PCCSConfig,
                uncertain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distance layer of every pixel within its own class region, ``(B, 1, *g)`` int64, −1 = no layer.

    Args:
        labels: ``(B, 1, *g)`` pseudo labels on the feature grid.
        uncertain: ``(B, 1, *g)`` bool, needed for ``background_layers='uncertain_halves'``.
    Layers: ``min(⌊(depth − 1)/w⌋, L − 1)`` with depth = ½ − SDF(Ŷ = c) (``nnunet_proto.ops.sdm``). With
    ``uncertain_halves`` the background keeps only uncertain pixels off its inner boundary ring (the code
    zeroes the ring's SDF and keeps d < 0) and splits them at ⌈max depth / 2⌉ into layers 0 and 1.
    """
    depth = own_class_depth(labels, num_classes)
    layers = depth_to_layers(depth, config.distance_bin_width, config.max_layers)
    layers = torch.where((labels >= 0) & (labels < num_classes), layers, torch.full_like(layers, -1))
    if config.background_layers == "uncertain_halves":
        if uncertain is None:
            raise ValueError("background_layers='uncertain_halves' needs the uncertain-pixel mask")
        bg = labels == 0
        deepest = depth.masked_fill(~bg, 0.0).flatten(1).amax(dim=1)  # (B,), inf if background fills the image
        half = torch.ceil(deepest / 2).view(-1, *([1] * (labels.dim() - 1)))
        bg_layer = (depth > half).long()
        bg_layer = torch.where(uncertain & (depth > 1), bg_layer, torch.full_like(bg_layer, -1))
        layers = torch.where(bg, bg_layer, layers)
    return layers


def layer_prototypes(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     config: PCCSConfig, uncertain: Optional[torch.Tensor] = None) -> LayerPrototypes:
    """One prototype per (image, class, distance layer) present: masked mean of the features (docs/methods/pccs.md).

    Args:
        features: ``(B, D, *g)`` student projection features (attached).
        probs: ``(B, C, *g)`` student softmax on the grid (m_i; attached, detached by the loss if asked).
        labels: ``(B, 1, *g)`` pseudo labels defining the per-class SDFs.
        uncertain: see ``layer_index``.
    Returns: ``LayerPrototypes``; layers whose mean feature is a zero vector are dropped (no zero vector in a cosine).
    """
    batch, dim = features.shape[:2]
    num_layers, num_sub = config.max_layers, config.num_subprototypes
    layer = layer_index(labels, num_classes, config, uncertain)
    image = torch.arange(batch, device=labels.device).view(-1, *([1] * (labels.dim() - 1)))
    segment = (image * num_classes + labels.long()) * num_layers + layer
    segment = torch.where(layer >= 0, segment, torch.full_like(segment, -1)).reshape(-1)
    num_segments = batch * num_classes * num_layers
    with torch.autocast(device_type=features.device.type, enabled=False):
        feat_sums, counts = segment_sums(features.float().movedim(1, -1).reshape(-1, dim), segment, num_segments)
        prob_sums, _ = segment_sums(probs.float().movedim(1, -1).reshape(-1, num_classes), segment, num_segments)
        means = feat_sums / counts.clamp_min(1.0).unsqueeze(1)
        valid = (counts > 0) & (means.detach().norm(dim=1) > NORM_EPS)
        # depth chunk: rank of the layer among the present layers of its (image, class), split into K parts
        present = valid.view(batch, num_classes, num_layers).long()
        rank = present.cumsum(-1) - 1
        chunk = (num_sub * rank) // present.sum(-1, keepdim=True).clamp_min(1)
        idx = valid.nonzero(as_tuple=True)[0]
        return LayerPrototypes(vectors=means[idx], labels=(idx // num_layers) % num_classes,
                               mean_probs=prob_sums[idx] / counts[idx].unsqueeze(1),
                               chunk=chunk.reshape(-1)[idx].clamp(0, num_sub - 1),
                               image=idx // (num_classes * num_layers))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, X, *g) -> (B·|g|, X), pixel order b-major (matches labels.reshape(-1))."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


@torch.no_grad()
def update_memory(memory: PrototypeMemory, teacher_feats: torch.Tensor, pseudo: torch.Tensor,
                  assignment: torch.Tensor, gate: torch.Tensor, protos: LayerPrototypes, config: PCCSConfig,
                  reduce_fn: Reducer, rates: Optional[Tuple[float, float]] = None) -> None:
    """Prototype updating prototype (docs/methods/pccs.md, paper intent): momentum + student mixing, in place.

    Args:
        teacher_feats: ``(N, D)`` L2-normalised teacher features (pixels of the unlabeled grid).
        pseudo: ``(N,)`` teacher pseudo label; assignment: ``(N,)`` Sinkhorn sub-prototype index;
        gate: ``(N,)`` bool, pixels allowed to update (confident and agreeing).
        protos: the student layer prototypes (detached here).
        rates: (γ, μ) resolved for the run (``PCCS.memory_rates``); None = the config's values.
    1. p_ck ← γ p_ck + (1 − γ)·normalise(Σ gated teacher features assigned to (c, k)), seen classes only;
    2. student chunk s_ck = normalise(mean of the L2-normalised layer prototypes of class c in depth chunk
       k; the class mean where chunk k is empty): seen classes p_ck ← (1 − μ) p_ck + μ s_ck, unseen
       classes p_ck ← s_ck (``memory_init='first_seen'``); 3. normalise. Sums and counts are DDP-reduced.
    """
    num_classes, num_sub, _ = memory.vectors.shape
    vectors, seen = memory.vectors, memory.seen
    momentum, mix = rates if rates is not None else (config.memory_momentum, config.student_mix)
    cell = torch.where(gate, pseudo * num_sub + assignment, torch.full_like(pseudo, -1))
    sums, counts = segment_sums(teacher_feats, cell, num_classes * num_sub)
    sums = reduce_fn(sums).view(num_classes, num_sub, -1)
    counts = reduce_fn(counts).view(num_classes, num_sub, 1)
    moved = momentum * vectors + (1 - momentum) * F.normalize(sums, dim=-1, eps=NORM_EPS)
    vectors = torch.where((counts > 0) & seen.view(-1, 1, 1), moved, vectors)

    unit = F.normalize(protos.vectors.detach().float(), dim=1, eps=NORM_EPS)
    chunk_sums, chunk_counts = segment_sums(unit, protos.labels * num_sub + protos.chunk, num_classes * num_sub)
    chunk_sums = reduce_fn(chunk_sums).view(num_classes, num_sub, -1)
    chunk_counts = reduce_fn(chunk_counts).view(num_classes, num_sub, 1)
    class_mean = chunk_sums.sum(1, keepdim=True) / chunk_counts.sum(1, keepdim=True).clamp_min(1.0)
    student = torch.where(chunk_counts > 0, chunk_sums / chunk_counts.clamp_min(1.0), class_mean)
    student = F.normalize(student, dim=-1, eps=NORM_EPS)
    has_class = (chunk_counts.sum(1) > 0).view(-1)
    mixed = (1 - mix) * vectors + mix * student
    vectors = torch.where((has_class & seen).view(-1, 1, 1), mixed, vectors)
    vectors = torch.where((has_class & ~seen).view(-1, 1, 1), student, vectors)
    memory.vectors = F.normalize(vectors, dim=-1, eps=NORM_EPS)
    memory.seen = seen | has_class
    memory.updates += 1


def pccs_losses(student_proj: torch.Tensor, teacher_proj: torch.Tensor, student_logits: torch.Tensor,
                teacher_logits: torch.Tensor, memory: PrototypeMemory, config: PCCSConfig, progress: float,
                reduce_fn: Optional[Reducer] = None, update: bool = True,
                student_proj_aux: Optional[torch.Tensor] = None, rates: Optional[Tuple[float, float]] = None,
                diagnostics: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """The four PCCS terms on unlabeled patches, unweighted; then (if ``update``) the memory update.

    Args:
        student_proj: ``(B, D, *g)`` student projection features (attached).
        teacher_proj: ``(B, D, *g)`` teacher (EMA) projection features (constant).
        student_logits: ``(B, C, *S)`` student full-resolution logits (attached).
        teacher_logits: ``(B, C, *S)`` teacher logits (constant; their argmax on the grid = teacher pseudo label).
        memory: teacher prototype memory (C, K, D), read before and updated after the losses.
        progress: training progress in [0, 1] (entropy threshold τ_H(t)).
        student_proj_aux: projection features used by L_aux (default ``student_proj``); the method passes
            the projection of detached encoder features when ``aux_encoder_gradient`` is False.
        rates: memory (γ, μ) resolved for the run length (``PCCS.memory_rates``).
        diagnostics: if given, receives ``aux_kept`` (share of unlabeled grid pixels whose teacher
            confidence passes ``pseudo_label_threshold``), ``memory_kept`` (share that updates the memory, on
            steps with an update) and ``memory_momentum`` (γ used).
    Returns: ``{"con", "ent", "contra", "aux"}`` float32 scalars, finite for any input.
    """
    reduce_fn = reduce_fn or (lambda t: t)
    num_classes, num_sub = student_logits.shape[1], config.num_subprototypes
    grid = tuple(student_proj.shape[2:])
    if tuple(memory.vectors.shape[:2]) != (num_classes, num_sub):
        raise ValueError(f"prototype memory holds {tuple(memory.vectors.shape[:2])} (classes, sub-prototypes) but "
                         f"the logits have {num_classes} classes and num_subprototypes={num_sub}")
    memory.to(student_proj.device)
    with torch.autocast(device_type=student_proj.device.type, enabled=False):
        probs_s = torch.softmax(student_logits.float(), dim=1)
        probs_s_grid = resize_masks(probs_s, grid)
        probs_t_grid = resize_masks(torch.softmax(teacher_logits.detach().float(), dim=1), grid)
        tau_h = config.entropy_threshold(progress)
        pseudo_t = probs_t_grid.argmax(1, keepdim=True)
        confident_t = entropy(probs_t_grid, eps=config.entropy_eps, keepdim=True) <= tau_h
        uncertain_s = entropy(probs_s_grid.detach(), eps=config.entropy_eps, keepdim=True) > tau_h
        labels = probs_s_grid.detach().argmax(1, keepdim=True) if config.layer_labels == "student" else pseudo_t

        # SDM layer prototypes and their uncertainty-weighted contrastive loss (student side)
        protos = layer_prototypes(student_proj, probs_s_grid, labels, num_classes, config, uncertain_s)
        contra = prototype_contrastive_loss(
            protos.vectors, protos.labels, entropy(protos.mean_probs, eps=config.entropy_eps),
            config.contrast_temperature, config.uncertainty_weighting, config.detach_contrastive_weights)

        # teacher prototype prediction P_T from the memory (unseen classes masked while any class is seen)
        f_t = F.normalize(_flat(teacher_proj.detach().float()), dim=1, eps=NORM_EPS)  # (N, D)
        f_s = F.normalize(_flat(student_proj.float()), dim=1, eps=NORM_EPS)
        bank = memory.vectors.reshape(num_classes * num_sub, -1)
        cos_t = (f_t @ bank.t()).view(-1, num_classes, num_sub)  # (N, C, K)
        logits_t = cos_t.amax(-1).view(len(probs_t_grid), *grid, num_classes).movedim(-1, 1)
        proto_probs_t = torch.softmax(mask_invalid_logits(logits_t / config.prototype_temperature, memory.seen), 1)
        con = ((probs_s_grid - proto_probs_t) ** 2).mean()

        if config.entropy_reduction == "mean":
            ent = entropy(probs_s, eps=config.entropy_eps).mean()
        else:  # the code's ½‖H‖_F of the grid entropy map; eps keeps sqrt's gradient finite at H = 0
            ent = 0.5 * torch.sqrt((entropy(probs_s_grid, eps=config.entropy_eps) ** 2).sum() + 1e-12)

        # balanced sub-prototype assignment of each pixel within its teacher pseudo class, and L_aux
        pseudo = pseudo_t.reshape(-1)
        member = F.one_hot(pseudo, num_classes).bool()
        plan = sinkhorn_assignment(cos_t, member, config.sinkhorn_epsilon, config.sinkhorn_iterations, reduce_fn)
        assignment = plan.gather(1, pseudo.view(-1, 1, 1).expand(-1, 1, num_sub)).squeeze(1).argmax(-1)
        usable = memory.seen[pseudo] | ~memory.seen.any()
        # confidence gate on the L_aux targets (not in the code): only confident teacher pixels teach
        confident_aux = confidence_gate(probs_t_grid, config.pseudo_label_threshold, config.threshold_mode,
                                        keep=config.pseudo_label_keep).keep.reshape(-1)
        target = torch.where(usable & confident_aux, pseudo * num_sub + assignment, torch.full_like(pseudo, -100))
        f_aux = f_s if student_proj_aux is None else F.normalize(_flat(student_proj_aux.float()), dim=1, eps=NORM_EPS)
        aux = cross_entropy_ignore(f_aux @ bank.t() / config.aux_temperature, target)
        if diagnostics is not None:
            diagnostics["aux_kept"] = confident_aux.float().mean()

        if update:
            gate = confident_t.reshape(-1)
            if config.update_agreement:
                gate = gate & (proto_probs_t.argmax(1).reshape(-1) == pseudo)
            update_memory(memory, f_t, pseudo, assignment, gate, protos, config, reduce_fn, rates)
            if diagnostics is not None:
                diagnostics["memory_kept"] = gate.float().mean()
        if diagnostics is not None:
            diagnostics["memory_momentum"] = float(rates[0] if rates is not None else config.memory_momentum)
    return {"con": con, "ent": ent, "contra": contra, "aux": aux}


class PCCS(SemiSupervisedMethod):
    """PCCS, paper-intent mode (see the module docstring and docs/methods/pccs.md)."""

    config_class = PCCSConfig
    term_names = ("con", "ent", "contra", "aux")
    needs_features = True
    #: per-step values logged every epoch: share of unlabeled pixels whose teacher confidence passes the
    #: L_aux gate, share that updates the memory (confident and agreeing; steps with a memory update only),
    #: and the memory momentum γ in use (run-relative)
    diagnostic_names = ("aux_kept", "memory_kept", "memory_momentum")

    def __init__(self, config: PCCSConfig):
        super().__init__(config)
        self.memory: Optional[PrototypeMemory] = None

    def memory_rates(self) -> Tuple[float, float]:
        """(γ, μ) of the memory update for this run (``config.time_constants``, ``reference_steps``).

        γ' = resolve_decay(γ) and μ' = 1 − resolve_decay(1 − μ): the same horizon 1/(1 − γ) as a fraction
        of the run as in the code's 15 000 iterations; at that length (or in ``"paper"`` mode) γ and μ.
        """
        cfg = self.config
        momentum = self.resolve_decay(cfg.memory_momentum) if cfg.memory_momentum > 0 else 0.0
        keep = self.resolve_decay(1.0 - cfg.student_mix) if cfg.student_mix < 1 else 0.0
        return momentum, 1.0 - keep

    def time_constants(self) -> Dict[str, Any]:
        """The trainer's EMA decay plus the memory's γ, μ and horizon for this run."""
        momentum, mix = self.memory_rates()
        return {**super().time_constants(), "memory_momentum_paper": self.config.memory_momentum,
                "memory_momentum": momentum, "student_mix": mix,
                "memory_horizon_steps": ema_horizon(momentum) if momentum < 1 else float("inf")}

    @property
    def feature_layers(self) -> Tuple[str, ...]:
        return tuple(self.config.projection_layers)

    def check_encoder_stages(self, num_stages: int, configuration: str = "") -> None:
        """Fail early if the network has fewer encoder stages than ``projection_layers`` reads."""
        needed = [int(layer.split(":")[1]) for layer in self.config.projection_layers
                  if layer.startswith("encoder:") and layer.split(":")[1].isdigit()]
        if needed and max(needed) >= num_stages:
            raise ValueError(
                f"PCCS's projection branch reads encoder stages {list(self.config.projection_layers)} but the "
                f"network of configuration {configuration!r} has only {num_stages} encoder stages "
                f"(encoder:0 … encoder:{num_stages - 1}). Use a configuration with at least {max(needed) + 1} "
                f"stages (a larger patch size), or a PCCS trainer whose config sets projection_layers to existing "
                f"stages, e.g. PCCSConfig(projection_layers=('encoder:0', 'encoder:1', 'encoder:2'), "
                f"grid_layer='encoder:1').")

    def build_modules(self, feature_channels: Dict[str, int], num_classes: int, dim: int) -> nn.Module:
        cfg = self.config
        missing = [layer for layer in cfg.projection_layers if layer not in feature_channels]
        if missing:
            raise ValueError(f"no channel count for projection layers {missing}; the trainer taps "
                             f"{sorted(feature_channels)}")
        self.memory = PrototypeMemory.create(num_classes, cfg.num_subprototypes, cfg.projection_dim, cfg.memory_init)
        return PCCSProjection([feature_channels[layer] for layer in cfg.projection_layers], cfg.projection_layers,
                              cfg.grid_layer, cfg.projection_dim, cfg.projection_hidden, dim)

    def losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        if self.memory is None or inputs.modules is None or inputs.teacher_modules is None:
            raise ValueError("PCCS needs its projection branch, its EMA copy and the prototype memory: the trainer "
                             "creates them (build_modules in initialize, the teacher in on_train_start); in unit "
                             "code call method.build_modules(...) and pass modules/teacher_modules in StepInputs")
        if inputs.logits_u is None or inputs.teacher_logits_u is None:
            raise ValueError("PCCS needs student and teacher logits on the unlabeled patches")
        layers = self.config.projection_layers
        missing = [layer for layer in layers if layer not in inputs.features or layer not in inputs.teacher_features]
        if missing:
            raise ValueError(f"PCCS needs student and teacher features of {list(layers)}; missing {missing}")
        n_l = inputs.logits_l.shape[0]
        student_proj = inputs.modules({layer: inputs.features[layer][n_l:] for layer in layers})
        proj_aux = None
        if not self.config.aux_encoder_gradient:  # L_aux trains the projection branch only
            proj_aux = inputs.modules({layer: inputs.features[layer][n_l:].detach() for layer in layers})
        with torch.no_grad():
            teacher_proj = inputs.teacher_modules({layer: inputs.teacher_features[layer] for layer in layers})
        return pccs_losses(student_proj, teacher_proj, inputs.logits_u, inputs.teacher_logits_u, self.memory,
                           self.config, inputs.progress, inputs.reduce_fn,
                           update=inputs.progress >= self.config.memory_start, student_proj_aux=proj_aux,
                           rates=self.memory_rates(), diagnostics=self.diagnostics)

    def weights(self, progress: float) -> Dict[str, float]:
        cfg = self.config
        lam = cfg.ramp(progress) if progress >= cfg.consistency_start else 0.0
        proto = 1.0 if progress >= cfg.prototype_start else 0.0
        return {"con": lam, "ent": cfg.uncertainty_coefficient * lam,
                "contra": cfg.contra_coefficient * proto, "aux": cfg.aux_coefficient * cfg.aux_ramp(progress)}

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": self.memory.state_dict()} if self.memory is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "memory" not in state:
            raise ValueError(f"the checkpoint holds no PCCS prototype memory (method state keys {sorted(state)}); "
                             f"was it written by another method?")
        if self.memory is None:
            raise ValueError("build_modules must run before the PCCS memory can be restored (the trainer's "
                             "initialize does it)")
        self.memory.load_state_dict(state["memory"])
