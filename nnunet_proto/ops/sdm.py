"""Signed distance maps of label masks and their quantisation into distance layers (PCCS, docs/methods/pccs.md).

The exact Euclidean distance transform runs on the CPU with ``scipy.ndimage.distance_transform_edt``
(a maintained implementation; scipy is a dependency of nnU-Net). Distances are in voxels of the grid
they are computed on; nothing here carries gradient (label maps are integers).

Conventions:

* ``SDF(x) = EDT(¬B)(x) − ½`` outside the mask B and ``−(EDT(B)(x) − ½)`` inside, so the zero level
  lies half-way between the last voxel inside and the first voxel outside and ``|x − c| − R`` of a
  disk/sphere is matched to discretisation accuracy. The PCCS code uses ``EDT(¬B) − EDT(B)`` with the
  inner boundary set to 0; the two differ by ½ voxel, which quantisation into layers absorbs.
* The *depth* of a voxel inside its own class region is ``½ − SDF = EDT(B)`` (1 on the inner boundary
  ring). A class that fills the whole patch has no boundary in it: its depth is ``+inf`` and its SDF
  ``−inf``; an empty mask has SDF ``+inf``.
* Distance *layers* quantise the depth: ``l = min(⌊(depth − 1) / w⌋, L − 1)``; layer 0 is the inner
  boundary ring, ``L − 1`` collects everything deeper (and whole-patch classes), so the number of layers
  is bounded in 3D where the number of distinct EDT values (√(a² + b² + c²)) explodes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, find_objects


def _inside_distance(mask: np.ndarray) -> np.ndarray:
    """EDT(B): distance of every voxel of B to the nearest voxel outside B (0 outside B).

    scipy returns meaningless values when B fills the array (there is no zero to measure to), so that
    case is answered with ``+inf`` here.
    """
    if mask.all():
        return np.full(mask.shape, np.inf)
    if not mask.any():
        return np.zeros(mask.shape)
    return distance_transform_edt(mask)


def signed_distance_map(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Signed distance map of a binary mask, negative inside, positive outside (voxel units).

    Args:
        mask: ``(*spatial)`` boolean (or 0/1) array or tensor, any number of dimensions (2D, 3D).
    Returns:
        float64 numpy array of the same shape: ``EDT(¬B) − ½`` outside, ``½ − EDT(B)`` inside;
        ``+inf`` everywhere for an empty mask, ``−inf`` everywhere for a full one.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).astype(bool)
    inside = _inside_distance(mask)
    outside = _inside_distance(~mask)
    return np.where(mask, 0.5 - inside, outside - 0.5)


def own_class_depth(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Depth of every voxel inside the region of its own class, per image.

    Args:
        labels: ``(B, 1, *spatial)`` integer class map (e.g. argmax pseudo labels on a feature grid).
        num_classes: C; voxels with a label outside ``[0, C)`` get depth 0 (they belong to no layer).
    Returns:
        ``(B, 1, *spatial)`` float32 tensor on the device of ``labels``: ``EDT(Ŷ_b = c)`` at voxels of
        class c (≥ 1, the inner boundary ring is 1), ``+inf`` where class c fills image b.
        Equivalent to ``½ − SDF(Ŷ_b = c)`` inside the class (per-class SDFs only, never class unions,
        docs/methods/pccs.md 'Deviations').

    One scipy EDT per image and present class, restricted to the class's bounding box grown by one voxel
    (clipped at the image border). This is exact: clamping any voxel outside that box into it lands on
    the one-voxel ring, which lies outside the class and is no farther from a voxel inside. Small
    structures then cost little even on large 3D grids with many classes.
    """
    if labels.dim() < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial), got {tuple(labels.shape)}; add the channel axis "
                         f"with labels.unsqueeze(1)")
    lab = labels[:, 0].detach().cpu().numpy()
    depth = np.zeros(lab.shape, dtype=np.float32)
    for b in range(lab.shape[0]):
        image = lab[b]
        # find_objects wants labels 1..C; 0 marks voxels outside [0, C) (they belong to no class)
        shifted = np.where((image >= 0) & (image < num_classes), image + 1, 0)
        for c, box in enumerate(find_objects(shifted, max_label=num_classes)):
            if box is None:
                continue
            crop = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, image.shape))
            mask = image[crop] == c
            depth[b][crop][mask] = _inside_distance(mask)[mask]
    return torch.from_numpy(depth).unsqueeze(1).to(labels.device)


def depth_to_layers(depth: torch.Tensor, bin_width: float, max_layers: int) -> torch.Tensor:
    """Quantise depths (≥ 1 inside a class) into distance layers ``min(⌊(depth − 1)/w⌋, L − 1)``.

    Args:
        depth: float tensor, any shape (``own_class_depth`` output); ``+inf`` maps to layer ``L − 1``.
        bin_width: w > 0 in voxels (1 = integer distance bins; a small w approaches the code's one layer
            per distinct EDT value in 2D).
        max_layers: L ≥ 1, the bound on the number of layers per class and image.
    Returns: int64 tensor of the same shape with values in ``[0, L)`` (depths below 1 give layer 0).
    """
    if bin_width <= 0:
        raise ValueError(f"bin_width must be > 0 voxels, got {bin_width}")
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    layers = torch.floor((depth.float() - 1.0).clamp_min(0.0) / bin_width)
    return layers.clamp(max=max_layers - 1).long()
