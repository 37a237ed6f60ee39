"""A small synthetic multi-class dataset in nnU-Net raw format.

The scenes imitate a cardiac short-axis stack (2D mode: few thick slices) or a small organ volume
(3D mode, near-isotropic): a bright "cavity" (label 1) surrounded by a darker "wall" (label 2) and a
"satellite" structure (label 3) attached to the wall. Shapes, positions, orientations, intensities,
bias fields and noise are drawn per case, and the intensity ranges of the classes overlap, so a
network trained on a handful of labeled cases underfits and unlabeled cases carry useful signal.

Only numpy and SimpleITK are used; nothing here imports nnU-Net.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunet_proto.data.raw_io import check_dataset_folder_writable, write_nifti

LABELS: Dict[str, int] = {"background": 0, "cavity": 1, "wall": 2, "satellite": 3}
IGNORE_LABEL = 4  # nnU-Net's ignore label must be the highest label value

#: default (z, y, x) shapes and (z, y, x) spacings per mode
DEFAULT_SHAPES = {"2d": (6, 64, 64), "3d": (32, 40, 40)}
DEFAULT_SPACINGS = {"2d": (8.0, 1.5, 1.5), "3d": (1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class SyntheticSpec:
    """What `write_synthetic_dataset` generates."""

    dataset_id: int
    name: str = "Synthetic"
    mode: str = "2d"  # '2d' = thick-slice stacks, '3d' = near-isotropic volumes
    num_labeled: int = 24  # cases in imagesTr/labelsTr
    num_unlabeled: int = 0  # cases in imagesUnlabeled (no labels written)
    num_test: int = 0  # cases in imagesTs/labelsTs
    shape: Optional[Tuple[int, int, int]] = None  # (z, y, x); default depends on mode
    spacing: Optional[Tuple[float, float, float]] = None  # (z, y, x) in mm
    seed: int = 0
    ignore_fraction: float = 0.0  # in-plane area per labeled case left unannotated (nnU-Net ignore label)

    def __post_init__(self) -> None:
        if self.mode not in DEFAULT_SHAPES:
            raise ValueError(f"mode must be '2d' or '3d', got {self.mode!r}")
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset_id must be between 1 and 999, got {self.dataset_id}")
        for what, n in (("num_unlabeled", self.num_unlabeled), ("num_test", self.num_test), ("seed", self.seed)):
            if n < 0:
                raise ValueError(f"{what} must not be negative, got {n}")
        if self.num_labeled < 2:
            raise ValueError(f"num_labeled must be at least 2 (nnU-Net needs a train and a val case), "
                             f"got {self.num_labeled}")
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 1):
            raise ValueError(f"shape must be three positive integers (z, y, x), got {self.shape}")
        if not 0.0 <= self.ignore_fraction < 1.0:
            raise ValueError(f"ignore_fraction is a fraction in [0, 1), got {self.ignore_fraction}")

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    @property
    def resolved_shape(self) -> Tuple[int, int, int]:
        return tuple(self.shape) if self.shape is not None else DEFAULT_SHAPES[self.mode]

    @property
    def resolved_spacing(self) -> Tuple[float, float, float]:
        return tuple(self.spacing) if self.spacing is not None else DEFAULT_SPACINGS[self.mode]


def _rotation(rng: np.random.Generator, mode: str) -> np.ndarray:
    """Random rotation; in 2D mode only in-plane (about z), as in a short-axis stack."""
    a = rng.uniform(0, 2 * np.pi)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    if mode == "2d":
        return rz
    b, c = rng.uniform(-0.5, 0.5, size=2)
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_distance(coords: np.ndarray, center: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid 'radius' (<1 inside) at physical coordinates (3, *shape)."""
    rel = coords - center[:, None, None, None]
    local = np.tensordot(rot.T, rel, axes=1)
    return np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))


def make_case(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
              mode: str) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic case. Returns (image float32 (z, y, x), label uint8 (z, y, x))."""
    shape = tuple(int(s) for s in shape)
    spacing_a = np.asarray(spacing, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing_a)], indexing="ij"))
    extent = np.array(shape) * spacing_a
    inplane = min(extent[1], extent[2])

    # cavity: an ellipsoid; in 2D mode elongated along z so it spans most slices, varying along them
    center = extent / 2 + rng.uniform(-0.12, 0.12, size=3) * extent * np.array([0.5 if mode == "2d" else 1, 1, 1])
    r_in = inplane * rng.uniform(0.10, 0.20)
    radii = np.array([extent[0] * rng.uniform(0.45, 0.7) if mode == "2d" else r_in * rng.uniform(0.8, 1.3),
                      r_in * rng.uniform(0.7, 1.3), r_in * rng.uniform(0.7, 1.3)])
    rot = _rotation(rng, mode)
    d_cavity = _ellipsoid_distance(grid, center, radii, rot)
    thickness = rng.uniform(0.25, 0.6)  # relative wall thickness
    cavity = d_cavity < 1.0
    wall = (d_cavity >= 1.0) & (d_cavity < 1.0 + thickness)

    # satellite: a smaller ellipsoid touching the wall on a random side (crescent-like after masking)
    angle = rng.uniform(0, 2 * np.pi)
    offset_inplane = (1.0 + thickness) * r_in * rng.uniform(1.0, 1.5)
    sat_center = center + np.array([0.0, np.cos(angle) * offset_inplane, np.sin(angle) * offset_inplane])
    sat_radii = radii * np.array([1.0, rng.uniform(0.6, 1.1), rng.uniform(0.6, 1.1)])
    satellite = (_ellipsoid_distance(grid, sat_center, sat_radii, _rotation(rng, mode)) < 1.0) & ~cavity & ~wall

    label = np.zeros(shape, dtype=np.uint8)
    label[satellite] = LABELS["satellite"]
    label[wall] = LABELS["wall"]
    label[cavity] = LABELS["cavity"]

    # intensities overlap between classes and vary per case: shape and context are needed
    means = {0: rng.uniform(0.05, 0.45), 1: rng.uniform(0.55, 1.0), 2: rng.uniform(0.15, 0.5),
             3: rng.uniform(0.45, 0.9)}
    image = np.full(shape, means[0], dtype=np.float64)
    # textured background: a few blurred random blobs
    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=4.0 / spacing_a)  # 4 mm blobs
    image += 0.15 * texture / (np.abs(texture).max() + 1e-8)
    for c in (1, 2, 3):
        image[label == c] = means[c] + rng.normal(0, 0.03)
    # distractor blob with foreground-like intensity outside the structures
    d_blob = _ellipsoid_distance(grid, extent * rng.uniform(0.15, 0.85, size=3),
                                 np.array([radii[0], r_in * 0.6, r_in * 0.6]), _rotation(rng, mode))
    image[(d_blob < 1.0) & (label == 0)] = rng.uniform(0.4, 0.9)
    # partial volume, multiplicative bias field, noise, random gamma
    image = ndimage.gaussian_filter(image, sigma=0.7 / spacing_a)  # 0.7 mm partial volume
    bias = 1 + 0.3 * np.tensordot(rng.uniform(-1, 1, size=3), (grid - extent[:, None, None, None] / 2)
                                  / extent[:, None, None, None], axes=1)
    image = image * bias + rng.normal(0, rng.uniform(0.04, 0.12), size=shape)
    image = np.clip(image, 0, None) ** rng.uniform(0.7, 1.4)
    return (image * 1000).astype(np.float32), label


def write_synthetic_dataset(spec: SyntheticSpec, raw_root: os.PathLike, overwrite: bool = False) -> Path:
    """Write the dataset to `raw_root/DatasetXXX_Name` and return that folder.

    Layout: imagesTr/labelsTr (labeled), imagesUnlabeled (no labels), imagesTs/labelsTs (held out),
    dataset.json. Case identifiers are `case_000`, `unl_000`, `test_000`.
    """
    out = Path(raw_root) / spec.folder_name
    check_dataset_folder_writable(out, overwrite)
    rng = np.random.default_rng(spec.seed)
    ignore_rng = np.random.default_rng([spec.seed, 1])  # separate stream: images are the same with or without
    groups = [("imagesTr", "labelsTr", "case", spec.num_labeled),
              ("imagesUnlabeled", None, "unl", spec.num_unlabeled),
              ("imagesTs", "labelsTs", "test", spec.num_test)]
    for img_dir, lab_dir, prefix, n in groups:
        if n == 0:
            continue
        (out / img_dir).mkdir(parents=True, exist_ok=True)
        if lab_dir:
            (out / lab_dir).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = make_case(rng, spec.resolved_shape, spec.resolved_spacing, spec.mode)
            write_nifti(image, spec.resolved_spacing, out / img_dir / f"{prefix}_{i:03d}_0000.nii.gz")
            if lab_dir:
                if spec.ignore_fraction > 0 and img_dir == "imagesTr":
                    # sparse annotation: a box covering ignore_fraction of every slice's area is unannotated
                    # (whole unannotated slices would never be sampled by nnU-Net's 2d loader)
                    side = np.sqrt(spec.ignore_fraction)
                    h, w = (max(1, int(round(side * n))) for n in label.shape[1:])
                    y0 = ignore_rng.integers(0, label.shape[1] - h + 1)
                    x0 = ignore_rng.integers(0, label.shape[2] - w + 1)
                    label[:, y0:y0 + h, x0:x0 + w] = IGNORE_LABEL
                write_nifti(label, spec.resolved_spacing, out / lab_dir / f"{prefix}_{i:03d}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {**LABELS, **({"ignore": IGNORE_LABEL} if spec.ignore_fraction > 0 else {})},
        "numTraining": spec.num_labeled,
        "file_ending": ".nii.gz",
        "name": spec.name,
        "description": (f"nnunet_proto synthetic dataset, mode {spec.mode}, shape (z,y,x) {spec.resolved_shape}, "
                        f"spacing (z,y,x) {spec.resolved_spacing} mm, seed {spec.seed}. "
                        f"imagesUnlabeled holds {spec.num_unlabeled} unlabeled cases."),
    }
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out
