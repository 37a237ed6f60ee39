"""Small helpers shared by every writer of nnU-Net raw datasets (synthetic data, h5 converters).

numpy and SimpleITK only; nothing here imports nnU-Net.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

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
    """Refuse to write into an existing non-empty dataset folder unless ``overwrite`` is set, and refuse (even
    with ``overwrite``) a ``DatasetXXX_Name`` folder beside another folder of the same id: nnU-Net finds a
    dataset by its id, and two folders make the id ambiguous."""
    folder = Path(folder)
    m = re.fullmatch(r"(Dataset\d{3})_.+", folder.name)
    if m and folder.parent.is_dir():
        others = sorted(p.name for p in folder.parent.glob(f"{m.group(1)}_*") if p.is_dir() and p.name != folder.name)
        if others:
            raise FileExistsError(f"{folder.parent / others[0]} already has the dataset id {m.group(1)[7:]}; a second "
                                  f"folder {folder.name} would make the id ambiguous for nnU-Net. Use that name (-d "
                                  f"{others[0]}, with --overwrite to replace it) or another dataset id.")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a dataset folder; remove it or choose another dataset id")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty. Pass overwrite=True (CLI: --overwrite) "
                              f"to replace it, or choose another dataset id.")


def parse_dataset_arg(dataset: str, name: Optional[str] = None) -> Tuple[int, Optional[str]]:
    """``27``, ``027`` or ``Dataset027_ACDC`` (nnU-Net's two spellings) -> (27, name or None).

    A name inside ``dataset`` must agree with ``name`` (``--name``) when both are given.
    """
    text = str(dataset).strip()
    m = re.fullmatch(r"Dataset(\d{3})_(.+)", text)
    if m:
        if name is not None and name != m.group(2):
            raise ValueError(f"-d {text} names the dataset {m.group(2)!r} but --name says {name!r}; give one of them")
        return int(m.group(1)), m.group(2)
    if text.isdigit():
        return int(text), name
    raise ValueError(f"-d {text!r}: give a dataset id (e.g. 27) or a dataset name DatasetXXX_Name "
                     f"(e.g. Dataset027_ACDC)")
