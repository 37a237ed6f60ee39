"""Small helpers shared by every writer of nnU-Net raw datasets (synthetic data, h5 converters).

numpy and SimpleITK only; nothing here imports nnU-Net.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


def write_nifti(array_zyx: np.ndarray, spacing_zyx: Sequence[float], path: os.PathLike) -> None:
    """Write a (z, y, x) array as a compressed NIfTI (or any SimpleITK format, by ``path``'s ending).

    ``spacing_zyx`` is in mm, in the array's axis order. SimpleITK indexes images (x, y, z), i.e. the
    reverse of numpy's order, so the spacing is reversed here and nowhere else.
    """
    if len(spacing_zyx) != array_zyx.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} has {len(spacing_zyx)} entries but the array has "
                         f"{array_zyx.ndim} axes (shape {array_zyx.shape}); give one spacing per axis")
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path), useCompression=True)


def check_dataset_folder_writable(folder: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty dataset folder unless ``overwrite`` is set."""
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty. Pass overwrite=True (CLI: --overwrite) "
                              f"to replace it, or choose another dataset id.")
