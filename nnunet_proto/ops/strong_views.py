"""Strong views of network input patches for weak-to-strong consistency (FixMatch, UniMatch), 2D and 3D.

The *weak* view is a patch as nnU-Net's data augmentation delivers it. Its *strong* view is the same patch after

1. strong intensity perturbations, per sample (:class:`StrongIntensity`): brightness (an additive shift),
   contrast (a multiplication around the patch mean) and gamma (on a min-max normalised copy, mapped back to
   the patch's range) together with probability 0.8, then Gaussian blur and Gaussian noise with probability
   0.5 each. Every one of them maps voxel v to voxel v (blur mixes a neighbourhood): the geometry is unchanged,
   so the teacher's prediction on the weak view is voxel-aligned with the student's input;
2. CutMix between the patches of the batch (:func:`cutmix_boxes`): with probability 0.5 a random box of patch
   i is replaced by the same box of patch ``partner[i]``. The returned :class:`CutMix` mixes any per-voxel
   tensor with the same boxes (teacher logits, probabilities, labels; at lower resolution with a nearest
   resized mask), so voxel v of the student's input and voxel v of the mixed teacher target come from the
   same image.

Magnitudes (module constants; ``nnU-Net`` = nnunetv2's ``get_training_transforms`` of nnU-Net 2.x;
``UniMatch`` = ``more-scenarios/medical/dataset/acdc.py`` and ``transform.py`` of github.com/LiheYoung/UniMatch,
which draw ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` with p 0.8, ``blur`` with p 0.5 and ``obtain_cutmix_box`` with
p 0.5 on [0, 1] grey images):

* ``STRONG_INTENSITY_P`` 0.8: UniMatch applies ColorJitter with p 0.8.
* ``BRIGHTNESS_SHIFT`` ±0.5 patch standard deviations: UniMatch's brightness 0.5 (a factor in [0.5, 1.5] on
  [0, 1] images, i.e. a shift of the mean by up to half its value); here an additive shift, because nnU-Net's
  z-scores are centred on 0, where a factor would act as a contrast change.
* ``CONTRAST_RANGE`` factor in [0.5, 1.5] around the patch mean: UniMatch's contrast 0.5 (torchvision blends with
  the mean grey value, as here); nnU-Net's ContrastTransform (0.75, 1.25) doubled.
* ``GAMMA_RANGE`` γ in [0.5, 2], log-uniform: nnU-Net's GammaTransform (0.7, 1.5) widened (UniMatch's saturation
  and hue do nothing to grey images).
* ``BLUR_P``, ``BLUR_SIGMA`` 0.5, σ in [0.1, 2] voxels: UniMatch's blur (PIL GaussianBlur radius U(0.1, 2.0));
  nnU-Net: (0.5, 1.0) at p 0.2.
* ``NOISE_P``, ``NOISE_VARIANCE`` 0.5, variance in [0, 0.1] patch variances: nnU-Net's GaussianNoiseTransform
  (0, 0.1) at p 0.1, here at p 0.5 (UniMatch has no noise).
* ``CUTMIX_P`` 0.5: UniMatch's ``obtain_cutmix_box(p=0.5)``.
* ``CUTMIX_AREA`` box volume 2-40 % of the patch: UniMatch's size_min 0.02, size_max 0.4 of the image area.
* ``CUTMIX_ASPECT`` edge ratios in [0.3, 1/0.3]: UniMatch's ratio_1 0.3, ratio_2 1/0.3.
* ``FEATURE_DROPOUT`` 0.5: UniMatch's ``nn.Dropout2d(0.5)`` on the encoder features (its FP stream).

Shifts and noise are in units of each patch's (and channel's) own standard deviation, so they mean the same for
nnU-Net's per-image z-scores (MRI) and its dataset-wide CT normalisation.

Randomness: every draw comes from ``generator`` (any device; the global RNG of the data's device when None), so
a seeded generator replays a view exactly. Maths in float32 with autocast off; outputs keep the input dtype.
Pure torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

STRONG_INTENSITY_P = 0.8
BRIGHTNESS_SHIFT = 0.5
CONTRAST_RANGE = (0.5, 1.5)
GAMMA_RANGE = (0.5, 2.0)
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
NOISE_P = 0.5
NOISE_VARIANCE = (0.0, 0.1)
CUTMIX_P = 0.5
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_ASPECT = (0.3, 1.0 / 0.3)
FEATURE_DROPOUT = 0.5
#: the blur kernel reaches 3 σ_max on either side
_BLUR_TRUNCATE = 3.0
_EPS = 1e-6


def _rand(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """U(0, 1) float32 of ``shape`` drawn from ``generator`` on its own device, then moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gdev, dtype=torch.float32).to(device)


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float32).to(device)


def _uniform(shape: Sequence[int], low: float, high: float, generator: Optional[torch.Generator],
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * _rand(shape, generator, device)


def _check_range(name: str, value: Tuple[float, float], lowest: float, highest: float = math.inf) -> None:
    lo, hi = value
    if not lowest <= lo <= hi <= highest:
        raise ValueError(f"{name} must be a range (low, high) with {lowest} <= low <= high <= {highest}, got {value}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value}")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every sample of ``x`` (B, C, *S) with its own σ (B,) in voxels, on every spatial axis.

    The kernel spans ±⌈3·max_sigma⌉ voxels for all samples (so one grouped convolution serves the batch) and is
    normalised to sum 1; borders are replicated. float32, autocast off; returns float32.
    """
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    radius = max(1, int(math.ceil(_BLUR_TRUNCATE * max_sigma)))
    with torch.autocast(device_type=x.device.type, enabled=False):
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        s = sigma.to(device=x.device, dtype=torch.float32).clamp_min(_EPS).view(b, 1)
        kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, K)
        out = x.float().reshape(1, b * c, *spatial)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
        for axis in range(len(spatial)):
            shape = [b * c, 1] + [1] * len(spatial)
            shape[2 + axis] = kernel.shape[1]
            pad = [0, 0] * len(spatial)  # F.pad lists the last axis first
            pad[2 * (len(spatial) - 1 - axis)] = radius
            pad[2 * (len(spatial) - 1 - axis) + 1] = radius
            out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape), groups=b * c)
        return out.reshape(x.shape)


@dataclass(frozen=True)
class StrongIntensity:
    """Strong intensity perturbation of a batch of patches (module docstring: magnitudes and provenance).

    Per sample (and, for brightness/contrast/gamma, per channel), in this order:

    * with probability ``p``: x ← (x − μ)·c + μ + b·σ (contrast c, shift b·σ; μ, σ the patch's mean and standard
      deviation), then gamma: with lo, hi the min and max of the result, x ← lo + (hi − lo)·((x − lo)/(hi − lo))^γ
      (z-scores may be negative: the power acts on the normalised copy and the range is restored);
    * with probability ``blur_p``: Gaussian blur with σ ~ U(blur_sigma) voxels on every spatial axis;
    * with probability ``noise_p``: + N(0, v·σ²), v ~ U(noise_variance).

    All are monotone per-voxel maps except the blur, which averages a neighbourhood: no voxel moves.
    """

    p: float = STRONG_INTENSITY_P
    brightness: float = BRIGHTNESS_SHIFT
    contrast: Tuple[float, float] = CONTRAST_RANGE
    gamma: Tuple[float, float] = GAMMA_RANGE
    blur_p: float = BLUR_P
    blur_sigma: Tuple[float, float] = BLUR_SIGMA
    noise_p: float = NOISE_P
    noise_variance: Tuple[float, float] = NOISE_VARIANCE

    def __post_init__(self) -> None:
        for name in ("p", "blur_p", "noise_p"):
            _check_probability(name, getattr(self, name))
        if self.brightness < 0:
            raise ValueError(f"brightness is a shift range ±b in patch standard deviations, b >= 0; "
                             f"got {self.brightness}")
        _check_range("contrast", self.contrast, 0.0)
        if self.contrast[0] <= 0:
            raise ValueError(f"contrast factors must be > 0 (a factor <= 0 inverts or erases the image), "
                             f"got {self.contrast}")
        _check_range("gamma", self.gamma, 0.0)
        if self.gamma[0] <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        _check_range("blur_sigma", self.blur_sigma, 0.0)
        _check_range("noise_variance", self.noise_variance, 0.0)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The perturbed batch, (B, C, *S) like ``x`` and in its dtype (maths in float32, autocast off)."""
        if x.dim() < 3:
            raise ValueError(f"x must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(x.shape)}")
        dev = x.device
        b, c = x.shape[:2]
        nd = x.dim() - 2
        dims = tuple(range(2, x.dim()))
        per_sample = (b, 1) + (1,) * nd
        per_channel = (b, c) + (1,) * nd
        with torch.autocast(device_type=dev.type, enabled=False):
            y = x.float()
            mean = y.mean(dim=dims, keepdim=True)
            std = y.std(dim=dims, keepdim=True, unbiased=False)
            # colour-jitter analogue: contrast around the mean and an additive shift, then gamma
            apply = _rand(per_sample, generator, dev) < self.p
            shift = _uniform(per_channel, -self.brightness, self.brightness, generator, dev) * std
            factor = _uniform(per_channel, *self.contrast, generator, dev)
            jitter = (y - mean) * factor + mean + shift
            log_lo, log_hi = math.log(self.gamma[0]), math.log(self.gamma[1])
            gamma = torch.exp(_uniform(per_channel, log_lo, log_hi, generator, dev))
            lo = jitter.amin(dim=dims, keepdim=True)
            span = jitter.amax(dim=dims, keepdim=True) - lo
            unit = ((jitter - lo) / span.clamp_min(_EPS)).clamp(0.0, 1.0)
            jitter = torch.where(span > _EPS, lo + span * unit.pow(gamma), jitter)  # constant patch: unchanged
            y = torch.where(apply, jitter, y)
            # blur
            blur = _rand(per_sample, generator, dev) < self.blur_p
            sigma = _uniform((b,), *self.blur_sigma, generator, dev)
            if self.blur_p > 0 and self.blur_sigma[1] > 0:
                y = torch.where(blur, gaussian_blur(y, sigma, self.blur_sigma[1]), y)
            # noise, in units of the weak patch's standard deviation
            noisy = _rand(per_sample, generator, dev) < self.noise_p
            variance = _uniform(per_sample, *self.noise_variance, generator, dev)
            noise = _randn(y.shape, generator, dev) * variance.sqrt() * std
            y = torch.where(noisy, y + noise, y)
            return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- CutMix
def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest ('nearest-exact', as nnU-Net's deep-supervision targets) resize of a bool (B, 1, *S) mask."""
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[2:]) == size:
        return mask
    with torch.autocast(device_type=mask.device.type, enabled=False):
        return F.interpolate(mask.float(), size=size, mode="nearest-exact") > 0.5


@dataclass(frozen=True)
class CutMix:
    """CutMix boxes of one batch.

    Attributes:
        mask: (B, 1, *S) bool, True inside the box of image i, whose voxels come from image ``partner[i]``.
        partner: (B,) int64 on the mask's device.
    """

    mask: torch.Tensor
    partner: torch.Tensor

    def mask_at(self, size: Sequence[int]) -> torch.Tensor:
        """The boxes at another resolution (nearest resize), (B, 1, *size) bool; ``size`` = the full one is exact."""
        return resize_mask(self.mask, size)

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """``where(box, t[partner], t)`` for any per-voxel tensor ``t`` (B, K, *S'), any dtype (labels are copied,
        never averaged). At a resolution S' other than the boxes' the mask is resized to S' (nearest); there the
        box edges are exact only up to one coarse voxel, and a coarse feature near an edge has seen both images."""
        if t.shape[0] != self.mask.shape[0] or t.dim() != self.mask.dim():
            raise ValueError(f"CutMix of a batch of {self.mask.shape[0]} (B, 1, *{tuple(self.mask.shape[2:])}) boxes "
                             f"cannot mix a tensor of shape {tuple(t.shape)}: it needs (B, K, *spatial) with B = "
                             f"{self.mask.shape[0]} and {self.mask.dim() - 2} spatial dims")
        mask = self.mask_at(t.shape[2:]).to(t.device)
        return torch.where(mask, t[self.partner.to(t.device)], t)


def box_partners(batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random cyclic derangement: image σ_i is paired with σ_{i+1} for a random permutation σ (CPU int64).

    No image is paired with itself when B ≥ 2 (UniMatch pairs with an image of a second, independently shuffled
    loader); with B = 1 the image is its own partner and CutMix changes nothing.
    """
    order = torch.argsort(_rand((batch_size,), generator, torch.device("cpu")))
    partner = torch.empty(batch_size, dtype=torch.long)
    partner[order] = torch.roll(order, shifts=-1)
    return partner


def box_edges(spatial: Sequence[int], volume_fraction: float, log_aspects: Sequence[float]) -> List[int]:
    """Edge lengths of a box holding ``volume_fraction`` of the patch, with the given relative log edge ratios.

    Edge fraction on axis j: f_j = r^(1/d)·exp(a_j − mean(a)), so ∏ f_j = r and f_j / f_k = exp(a_j − a_k);
    each edge is rounded and clipped to [1, S_j] (a box clipped at a border holds a little less than r).
    """
    d = len(spatial)
    mean = sum(log_aspects) / d
    return [min(int(s), max(1, int(round(volume_fraction ** (1.0 / d) * math.exp(a - mean) * int(s)))))
            for s, a in zip(spatial, log_aspects)]


def cutmix_boxes(batch_size: int, spatial: Sequence[int], p: float = CUTMIX_P,
                 area: Tuple[float, float] = CUTMIX_AREA, aspect: Tuple[float, float] = CUTMIX_ASPECT,
                 generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> CutMix:
    """Random CutMix boxes for a batch (UniMatch's ``obtain_cutmix_box`` generalised to 2D and 3D).

    Per image, with probability ``p``: a volume fraction r ~ U(area); log edge factors a_j ~ U(±½·log(aspect[1] /
    aspect[0])) per axis, so any two edges have a ratio within ``aspect`` (UniMatch: h/w ~ U(0.3, 1/0.3) in 2D);
    edges :func:`box_edges`; the corner uniform such that the box fits. Partners: :func:`box_partners`.
    The geometry is drawn on the CPU (or from ``generator`` on its device and read back: a few scalars).
    """
    _check_probability("cutmix p", p)
    _check_range("cutmix area", area, 0.0, 1.0)
    _check_range("cutmix aspect", aspect, _EPS)
    spatial = [int(s) for s in spatial]
    d = len(spatial)
    half = 0.5 * math.log(aspect[1] / aspect[0])
    draws = _rand((batch_size, 2 + 2 * d), generator, torch.device("cpu")).tolist()  # one small host read
    mask = torch.zeros((batch_size, 1, *spatial), dtype=torch.bool)
    for i, u in enumerate(draws):
        if not u[0] < p:
            continue
        r = area[0] + (area[1] - area[0]) * u[1]
        edges = box_edges(spatial, r, [-half + 2 * half * a for a in u[2:2 + d]])
        starts = [min(s - e, int(v * (s - e + 1))) for s, e, v in zip(spatial, edges, u[2 + d:])]
        mask[(i, 0, *(slice(st, st + e) for st, e in zip(starts, edges)))] = True
    partner = box_partners(batch_size, generator)
    device = device if device is not None else torch.device("cpu")
    return CutMix(mask.to(device), partner.to(device))


@dataclass(frozen=True)
class StrongView:
    """A strong view of a batch: ``images`` (B, C, *S) = CutMix of the strong-intensity patches, and its boxes."""

    images: torch.Tensor
    cutmix: CutMix

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """A per-voxel tensor of the weak view (teacher logits, probabilities, labels, features) mixed with the
        boxes of this view: voxel v of the result belongs to the same image as voxel v of ``images``."""
        return self.cutmix.mix(t)


def strong_view(x: torch.Tensor, intensity: Optional[StrongIntensity] = None, cutmix_p: float = CUTMIX_P,
                cutmix_area: Tuple[float, float] = CUTMIX_AREA, cutmix_aspect: Tuple[float, float] = CUTMIX_ASPECT,
                generator: Optional[torch.Generator] = None) -> StrongView:
    """Strong view of the weak patches ``x`` (B, C, *S): :class:`StrongIntensity` per patch, then CutMix.

    A box of patch i carries the *strongly perturbed* voxels of its partner (as UniMatch pastes ``img_u_s1_mix``);
    the teacher's targets of the weak view are mixed with ``view.mix`` (same boxes). ``intensity`` None = the
    default magnitudes. Nothing here needs gradient; the result has ``x``'s dtype and device.
    """
    intensity = intensity if intensity is not None else StrongIntensity()
    perturbed = intensity(x, generator)
    boxes = cutmix_boxes(x.shape[0], x.shape[2:], cutmix_p, cutmix_area, cutmix_aspect, generator, x.device)
    return StrongView(boxes.mix(perturbed), boxes)


def channel_dropout(x: torch.Tensor, p: float = FEATURE_DROPOUT,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Channel dropout (``nn.Dropout2d`` / ``Dropout3d`` in training mode): each (sample, channel) map of ``x``
    (B, C, *S) is zeroed with probability p and the others scaled by 1/(1 − p). Differentiable in ``x``;
    ``p == 0`` returns ``x``. UniMatch's feature perturbation (p 0.5 on every encoder output)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0:
        return x
    keep = _rand(x.shape[:2] + (1,) * (x.dim() - 2), generator, x.device) >= p
    return x * (keep.to(x.dtype) / (1.0 - p))
