"""Read raw images completely and verify them before they enter training (``preprocess-unlabeled``).

SimpleITK (and nnU-Net's readers built on it) zero-fill the missing part of a truncated ``.nii.gz``
without an error, so a half-copied file would be preprocessed and trained on. This module therefore

* decompresses a gzip stream to its end (a truncated stream or a bad CRC is an error) and compares the
  number of bytes with what the NIfTI-1/NIfTI-2 header announces (vox_offset + prod(dim) * bitpix / 8);
* refuses vector images (more than one component per voxel: nnU-Net wants one file per channel),
  images that are not 2D/3D and non-finite values;
* flags degenerate volumes: constant, or more than ``MAX_ZERO_FRACTION`` exact zeros;
* checks the raw voxel block of a float NIfTI for NaN and infinite values (SimpleITK reads them as 0, so
  a check on the array it returns never fires);
* hashes the voxel content in a canonical form (``voxel_hash``: shape, spacing rounded to 1e-4 mm and the
  values as float64, not the file) so that an image copied under another name, re-saved with other
  compression or with another voxel type (e.g. int16 saved again as float64) is still recognised.

Stored hashes carry their version as a prefix (``"v2:<hex>"``); an unprefixed hash is version 1 (sha256
of dtype, shape and voxel bytes, written before version 2 existed). ``hash_version`` tells them apart and
``image_content_hash(path, version=...)`` recomputes either, so an old record is compared in its own
version (never reported as a change just because the format changed) and can be rewritten in the current one.

numpy and SimpleITK only; nothing here imports nnU-Net.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

#: more exact zeros than this is "mostly zeros" (a skull-stripped BraTS brain has about 85 %, so it passes)
MAX_ZERO_FRACTION = 0.98
#: a preprocessed case smaller than this fraction of the patch along an axis is mostly padding in every patch
MIN_PATCH_FRACTION = 0.5

# NIfTI datatype codes whose voxels hold more than one value (complex, RGB, RGBA): vector images
_NIFTI_VECTOR_TYPES = {32: "complex64", 128: "RGB24", 1792: "complex128", 2048: "complex256", 2304: "RGBA32"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class FileRecord:
    """What the unlabeled manifest stores per source file to notice later changes."""

    name: str  # file name inside imagesUnlabeled
    size: int  # bytes on disk
    mtime_ns: int
    sha256: str  # content hash of the voxels (see ``voxel_hash``), "" if not computed

    def same_stat(self, path: str) -> bool:
        st = os.stat(path)
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


#: version of ``voxel_hash``; stored hashes carry it as the prefix "v<N>:" (no prefix = version 1)
HASH_VERSION = 2
#: spacing enters the hash rounded to this many decimals (mm): NIfTI stores it as float32, other formats as double
SPACING_DECIMALS = 4


def hash_version(digest: str) -> int:
    """Version of a stored voxel hash: ``"v2:<hex>"`` -> 2, an unprefixed sha256 hex digest -> 1."""
    head, sep, _ = digest.partition(":")
    return int(head[1:]) if sep and head[:1] == "v" and head[1:].isdigit() else 1


def voxel_hash(array: np.ndarray, spacing: Optional[Sequence[float]] = None) -> str:
    """Canonical content hash (version 2): ``"v2:"`` + sha256 of the shape, the spacing and the voxel values.

    The values are hashed as little-endian float64 (-0.0 as 0.0), so the same image under another name,
    compression or voxel type (a test image saved again as float64) gets the same hash; the spacing (mm,
    numpy axis order, rounded to ``SPACING_DECIMALS``) is part of it because it changes what nnU-Net's
    preprocessing makes of the voxels. ``spacing=None`` hashes the voxels alone. Float64 copies are made one
    slice at a time, so memory stays bounded for large volumes.
    """
    array = np.asarray(array)
    sp = "-" if spacing is None else ",".join(f"{float(s):.{SPACING_DECIMALS}f}" for s in spacing)
    h = hashlib.sha256(f"v{HASH_VERSION}|{tuple(int(n) for n in array.shape)}|{sp}|".encode())
    for block in (array.reshape(array.shape[0], -1) if array.ndim > 1 and array.size else array.reshape(1, -1)):
        h.update((np.asarray(block, dtype="<f8") + 0.0).tobytes())  # + 0.0 turns -0.0 into 0.0
    return f"v{HASH_VERSION}:" + h.hexdigest()


def voxel_hash_v1(array: np.ndarray) -> str:
    """The version-1 hash (sha256 of dtype, shape and voxel bytes, no prefix), to compare records written with it.

    It depends on the voxel type, so a re-typed copy of an image escaped it; new records use ``voxel_hash``.
    """
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _spacing_of(image: "sitk.Image") -> Tuple[float, ...]:
    """Voxel spacing in numpy axis order (SimpleITK reports x, y, z; its arrays are z, y, x)."""
    return tuple(float(s) for s in reversed(image.GetSpacing()))


class _NiftiLayout(NamedTuple):
    """Where the voxels of a single-file NIfTI lie in its (decompressed) bytes."""

    vox_offset: int
    n_voxels: int
    datatype: int
    bitpix: int
    endian: str  # "<" or ">"

    @property
    def expected_bytes(self) -> int:
        return self.vox_offset + self.n_voxels * max(self.bitpix, 8) // 8


# NIfTI float datatypes -> numpy type (float128 where numpy has it): their raw voxels may hold NaN or infinity
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", **({1536: "f16"} if hasattr(np, "float128") else {})}


def _nifti_layout(header: bytes, path: str) -> Optional[_NiftiLayout]:
    """The voxel layout of a single-file NIfTI-1/NIfTI-2 header, or None if it is no single-file NIfTI.

    Raises ImageError for vector datatypes (complex, RGB), which nnU-Net cannot use as one channel.
    """
    if len(header) < 348:
        raise ImageError(f"{path}: only {len(header)} bytes after decompression, shorter than a NIfTI header "
                         f"(348 bytes). The file is truncated; copy it again.")
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540 and header[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None  # Analyze or a header/image pair: SimpleITK's own checks only
    if datatype in _NIFTI_VECTOR_TYPES or (dims[0] >= 5 and dims[5] > 1):
        kind = _NIFTI_VECTOR_TYPES.get(datatype, f"{dims[5]} components per voxel")
        raise ImageError(f"{path}: a vector image ({kind}); nnU-Net expects one scalar image per channel file. "
                         f"Split the components into separate files <case>_0000, <case>_0001, ... and list them "
                         f"in dataset.json 'channel_names'.")
    n_dims = max(0, min(int(dims[0]), 7))
    n_voxels = int(np.prod([max(int(d), 1) for d in dims[1:1 + n_dims]], dtype=np.int64))
    return _NiftiLayout(vox_offset, n_voxels, int(datatype), int(bitpix), endian)


def _check_raw_finite(raw: bytes, layout: _NiftiLayout, path: str) -> None:
    """Raise ImageError if the raw voxel block of a float NIfTI holds NaN or infinite values.

    SimpleITK returns such voxels as 0, so this has to look at the bytes in the file (as nibabel would).
    """
    code = _NIFTI_FLOAT_TYPES.get(layout.datatype)
    if code is None or layout.n_voxels == 0:
        return
    block = np.frombuffer(raw, dtype=layout.endian + code, count=layout.n_voxels, offset=layout.vox_offset)
    bad = layout.n_voxels - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ImageError(f"{path}: {bad} of {layout.n_voxels} voxels are NaN or infinite in the file (SimpleITK "
                         f"and nnU-Net would silently read them as 0). Replace them with a finite value and save "
                         f"the image again, or remove it.")


def check_file_complete(path: str) -> None:
    """Decompress ``path`` to its end and compare its size with the NIfTI header (NIfTI files only).

    Raises ImageError naming the file for a truncated or corrupt gzip stream, for a voxel block shorter
    than the header announces (SimpleITK would silently fill the rest with zeros) and for NaN or infinite
    values in the raw voxel block of a float NIfTI (SimpleITK would read them as 0).
    """
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise ImageError(f"{path}: the gzip stream ends early ({len(raw)} bytes on disk); the file is truncated. "
                             f"Copy it again or remove it.") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise ImageError(f"{path}: corrupt gzip data ({e}). Copy the file again or remove it.") from None
    if path.endswith((".nii", ".nii.gz")):
        layout = _nifti_layout(raw[:540], path)
        if layout is not None and len(raw) < layout.expected_bytes:
            raise ImageError(f"{path}: the header announces {layout.expected_bytes} bytes (offset + voxels) but the "
                             f"file holds {len(raw)} after decompression; it is truncated. Copy it again or remove "
                             f"it.")
        if layout is not None:
            _check_raw_finite(raw, layout, path)


def read_complete(path: str) -> "sitk.Image":
    """``check_file_complete``, then SimpleITK's read; an unreadable file raises ImageError naming it."""
    check_file_complete(path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise ImageError(f"{path}: SimpleITK cannot read it ({str(e).strip().splitlines()[-1]})") from None


def read_checked(path: str) -> Tuple[Tuple[int, ...], str]:
    """Read a whole image after ``check_file_complete``; returns (shape in numpy axis order, voxel hash).

    Raises ImageError for unreadable, vector, non-2D/3D or non-finite images and for degenerate content
    (constant, or more than MAX_ZERO_FRACTION exact zeros).
    """
    image = read_complete(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ImageError(f"{path}: a vector image ({image.GetNumberOfComponentsPerPixel()} components per voxel); "
                         f"nnU-Net expects one scalar image per channel file. Split the components into separate "
                         f"files <case>_0000, <case>_0001, ... and list them in dataset.json 'channel_names'.")
    if image.GetDimension() not in (2, 3):
        raise ImageError(f"{path}: a {image.GetDimension()}D image; nnU-Net reads 2D or 3D images (one file per "
                         f"channel, one channel per file)")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageError(f"{path}: contains NaN or infinite values; fix or remove the image")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise ImageError(f"{path}: degenerate, every voxel is {lo} (shape {array.shape}); an empty or failed "
                         f"export. Remove it (or pass --skip-bad to skip such images).")
    zeros = float(np.count_nonzero(array == 0)) / array.size
    if zeros > MAX_ZERO_FRACTION:
        raise ImageError(f"{path}: degenerate, {zeros:.1%} of its voxels are exactly 0 (more than "
                         f"{MAX_ZERO_FRACTION:.0%}); probably a failed or zero-filled export. Remove it (or pass "
                         f"--skip-bad to skip such images).")
    return tuple(array.shape), voxel_hash(array, _spacing_of(image))


def check_case(files: Iterable[str]) -> List[FileRecord]:
    """Verify every channel file of one case; returns their records (with content hashes).

    Raises ImageError if any file fails ``read_checked`` or the channels disagree in shape.
    """
    records, shapes = [], {}
    for path in files:
        shape, digest = read_checked(path)
        shapes[os.path.basename(path)] = shape
        st = os.stat(path)
        records.append(FileRecord(os.path.basename(path), st.st_size, st.st_mtime_ns, digest))
    if len(set(shapes.values())) > 1:
        raise ImageError(f"the channel files of one case have different shapes {shapes}; every channel must be on "
                         f"the same voxel grid")
    return records


def image_content_hash(path: str, version: int = HASH_VERSION) -> str:
    """Voxel hash of an image for leakage and change checks, in the given hash ``version`` (see ``voxel_hash``).

    The file is checked first (``check_file_complete``: truncated, corrupt, non-finite raw voxels); a float
    image of another format with NaN or infinite values is refused too. Raises ImageError naming the file.
    """
    image = read_complete(path)  # keep a reference: the array view borrows its buffer
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageError(f"{path}: contains NaN or infinite values; replace them and save the image again, or "
                         f"remove it")
    if version == 1:
        return voxel_hash_v1(array)
    if version != HASH_VERSION:
        raise ValueError(f"unknown voxel hash version {version} (this code writes {HASH_VERSION} and reads 1)")
    return voxel_hash(array, _spacing_of(image))


def too_small_for_patch(spatial_shape: Tuple[int, ...], patch_size: Tuple[int, ...]) -> bool:
    """True if the preprocessed (cropped, resampled) shape is below MIN_PATCH_FRACTION of the patch on an axis.

    The patch is compared with the trailing axes (a 2d configuration's patch covers (y, x) of a (z, y, x) case).
    """
    tail = tuple(spatial_shape)[-len(patch_size):]
    return any(s < MIN_PATCH_FRACTION * p for s, p in zip(tail, patch_size))
