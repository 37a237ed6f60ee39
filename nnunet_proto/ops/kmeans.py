"""k-means initialisation of a multi-prototype bank from a bounded, seeded sample of voxel embeddings.

MPER initialises its K prototypes per class "as the clustering results of the voxel embeddings
through the MiniBatchKMeans algorithm" (MPER paper, arXiv 2503.14343, §II.A; Sculley 2010). The official code collects
*every* labeled voxel of one pass over the loader into Python lists (≈ 70M voxels; docs/methods/mper.md, 'Deviations');
here a per-class reservoir keeps a uniform random sample of at most ``capacity`` embeddings per class,
so memory is bounded by ``C · capacity · (D + 1) · 4`` bytes whatever the number of batches, and
scikit-learn's ``MiniBatchKMeans`` (an nnU-Net dependency) clusters each class's sample.

Determinism: the reservoir draws its keys from its own CPU generator seeded by the caller, and
k-means gets ``random_state=seed``; the same embeddings in the same order give the same bank.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_proto.ops.distributed import is_distributed


class ClassReservoir:
    """Uniform sample without replacement of at most ``capacity`` embeddings per class from a stream.

    Bottom-k ("priority") sampling: every incoming voxel gets an i.i.d. U(0, 1) key and the reservoir
    keeps the ``capacity`` voxels with the smallest keys seen so far, which is a uniform sample of all
    voxels of that class seen so far. Each ``add`` first keeps at most ``capacity`` candidates per class
    on the embeddings' device, so the CPU copy never exceeds ``2 · capacity`` rows per class.

    Args:
        num_classes: C; labels outside [0, C) and ``ignore_index`` are skipped.
        capacity: maximum embeddings kept per class (docs/methods/mper.md, 'Defaults and provenance': 200k).
        seed: seed of the key generator.
    """

    def __init__(self, num_classes: int, capacity: int, seed: int = 0, ignore_index: Optional[int] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_classes = num_classes
        self.capacity = capacity
        self.ignore_index = ignore_index
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.keys: List[torch.Tensor] = [torch.empty(0) for _ in range(num_classes)]
        self.values: List[Optional[torch.Tensor]] = [None] * num_classes
        self.seen = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer every voxel of a batch: ``features`` ``(B, D, *S)``, ``labels`` ``(B, 1, *S)`` (same S)."""
        if labels.dim() != features.dim() or labels.shape[1] != 1 or labels.shape[0] != features.shape[0] \
                or labels.shape[2:] != features.shape[2:]:
            raise ValueError(f"labels {tuple(labels.shape)} must be (B, 1, *S) for features {tuple(features.shape)}; "
                             f"use full-resolution features (the last decoder stage) and the full-resolution target")
        feats = features.detach().flatten(2)  # (B, D, V): a view, no copy
        lab = labels.detach().flatten(1).long().to(feats.device)  # (B, V)
        keys = torch.rand(lab.numel(), generator=self.generator).view_as(lab).to(feats.device)
        for c in range(self.num_classes):
            if self.ignore_index is not None and c == self.ignore_index:
                continue
            b_idx, v_idx = (lab == c).nonzero(as_tuple=True)
            n = b_idx.numel()
            self.seen[c] += n
            if n == 0:
                continue
            k_c = keys[b_idx, v_idx]
            if n > self.capacity:  # only the smallest keys can ever survive
                k_c, order = torch.topk(k_c, self.capacity, largest=False)
                b_idx, v_idx = b_idx[order], v_idx[order]
            if self.keys[c].numel() >= self.capacity:
                below = k_c < self.keys[c].max().to(k_c.device)
                k_c, b_idx, v_idx = k_c[below], b_idx[below], v_idx[below]
            cand = feats[b_idx, :, v_idx].float().cpu()  # (n, D)
            old = self.values[c] if self.values[c] is not None else cand.new_zeros(0, cand.shape[1])
            all_keys = torch.cat([self.keys[c], k_c.cpu()])
            all_vals = torch.cat([old, cand])
            if all_keys.numel() > self.capacity:
                all_keys, order = torch.topk(all_keys, self.capacity, largest=False)
                all_vals = all_vals[order]
            self.keys[c], self.values[c] = all_keys, all_vals

    def samples(self) -> List[torch.Tensor]:
        """The kept embeddings per class, ``(n_c, D)`` float32 on the CPU (``(0, 0)`` for unseen classes)."""
        return [v if v is not None else torch.zeros(0, 0) for v in self.values]

    @property
    def nbytes(self) -> int:
        """Bytes held by the reservoir (keys and embeddings)."""
        total = sum(k.numel() * k.element_size() for k in self.keys)
        return total + sum(v.numel() * v.element_size() for v in self.values if v is not None)


def kmeans_bank(samples: List[torch.Tensor], num_prototypes: int, fallback: torch.Tensor, seed: int = 0,
                batch_size: int = 1024, n_init: int = 3, spherical: bool = False,
                noise: float = 1e-3) -> Tuple[torch.Tensor, Dict[str, List]]:
    """Cluster each class's sample with scikit-learn's MiniBatchKMeans into K prototypes: bank ``(C, K, D)``.

    Args:
        samples: per class, ``(n_c, D)`` embeddings (e.g. ``ClassReservoir.samples()``).
        num_prototypes: K (paper 3).
        fallback: ``(C, K, D)`` rows kept for classes without any sample (the current bank).
        seed: ``random_state`` of k-means and seed of the fallback noise.
        batch_size, n_init: MiniBatchKMeans settings (1024 is its default; n_init 3 was its default
            before scikit-learn 1.4, when the official code was written).
        spherical: L2-normalise the embeddings before clustering (not in paper or code; our option).
        noise: relative size of the perturbation when a class has fewer than K distinct embeddings:
            its K prototypes are the class mean plus noise · ‖mean‖ · N(0, I/D) (our fallback; the
            official code crashes there).
    Returns: the bank (float32, CPU) and a report ``{"clustered": [...], "duplicated": [...], "absent": [...]}``
    of class indices.
    """
    from sklearn.cluster import MiniBatchKMeans

    if num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
    c, k, d = fallback.shape
    if len(samples) != c or k != num_prototypes:
        raise ValueError(f"fallback bank {tuple(fallback.shape)} does not match {len(samples)} classes x "
                         f"{num_prototypes} prototypes")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bank = fallback.detach().float().cpu().clone()
    report: Dict[str, List] = {"clustered": [], "duplicated": [], "absent": []}
    for cls, x in enumerate(samples):
        if x.numel() == 0:
            report["absent"].append(cls)
            continue
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"samples of class {cls} must be (n, {d}), got {tuple(x.shape)}")
        x = x.float()
        if spherical:
            x = F.normalize(x, dim=1, eps=1e-6)
        if torch.unique(x, dim=0).shape[0] < num_prototypes:
            mean = x.mean(0)
            scale = noise * float(mean.norm().clamp_min(1e-3)) / d ** 0.5
            bank[cls] = mean + scale * torch.randn(num_prototypes, d, generator=gen)
            report["duplicated"].append(cls)
            continue
        km = MiniBatchKMeans(n_clusters=num_prototypes, random_state=int(seed), batch_size=batch_size,
                             n_init=n_init)
        km.fit(x.numpy().astype(np.float32))
        bank[cls] = torch.from_numpy(np.asarray(km.cluster_centers_, dtype=np.float32))
        report["clustered"].append(cls)
    return bank, report


def broadcast_from_rank0_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy (no-op without torch.distributed).

    Each DDP rank samples its own embeddings, so k-means results differ between ranks; the bank must be
    identical everywhere (averaging would mix unrelated cluster orders).
    """
    if is_distributed():
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)
    return tensor
