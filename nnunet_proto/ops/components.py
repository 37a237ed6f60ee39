"""Largest connected component per class of a label map: the pseudo-label clean-up of the BCP and MPER codes.

The official BCP and MPER codes keep, for every foreground class of a teacher's argmax pseudo label, only
its largest connected component (per 2D slice on ACDC, per volume on the left atrium) and give every other
voxel of that class to the background. Here it acts per patch of nnU-Net's network input, i.e. per 2D
slice in ``2d`` and per 3D patch in ``3d_fullres``, with full connectivity (8 in 2D, 26 in 3D; scikit-image's
default, which those codes use). The connected-component labelling runs on the CPU with
``scipy.ndimage.label``: on a GPU every training step then waits for a copy of the pseudo labels to the CPU
and back and for the labelling of each class of each patch (unmeasured; off by default in both methods).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import generate_binary_structure
from scipy.ndimage import label as connected_components


def largest_component_only(labels: torch.Tensor, num_classes: int, background: int = 0) -> torch.Tensor:
    """(B, 1, *S) integer labels with every foreground class cut to its largest connected component.

    Voxels of class c ≥ 1 outside c's largest component become ``background``; other values (background,
    negative "no label" values, classes ≥ num_classes) are left as they are. Ties keep the component that
    scipy numbers first. Returns a new tensor on the input's device and dtype.
    """
    if labels.dim() < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial), got {tuple(labels.shape)}")
    arr = labels.detach().cpu().numpy().copy()
    structure = generate_binary_structure(arr.ndim - 2, arr.ndim - 2)
    for b in range(arr.shape[0]):
        image = arr[b, 0]
        for c in range(1, num_classes):
            mask = image == c
            if not mask.any():
                continue
            comp, n = connected_components(mask, structure=structure)
            if n > 1:
                sizes = np.bincount(comp.ravel())[1:]
                image[mask & (comp != 1 + int(np.argmax(sizes)))] = background
    return torch.from_numpy(arr).to(device=labels.device, dtype=labels.dtype)
