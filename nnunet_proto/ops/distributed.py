"""All-reduce helpers that are no-ops without an initialised torch.distributed process group.

Every cross-rank reduction of prototype statistics goes through here, so single-process training
and DDP training use the same code path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks and return the result (autograd-aware).

    Without a process group the input is returned unchanged. With one, the functional collective
    keeps the autograd graph: the gradient of the global sum with respect to the local input is the
    identity on every rank, which is what DDP's gradient averaging expects.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no autograd), for buffers such as prototype banks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_gradients_(parameters) -> None:
    """Average ``.grad`` of parameters outside DDP's wrapper (e.g. projection heads) across ranks."""
    if not is_distributed():
        return
    n = dist.get_world_size()
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= n
