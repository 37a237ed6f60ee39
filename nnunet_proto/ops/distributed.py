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


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; backward sums the incoming gradients over ranks as well.

    Every rank's loss depends on the same global y, so the gradient reaching a local x is the sum of all
    ranks' dL_r/dy (the same rule as torch.distributed.nn.functional.all_reduce, which is deprecated).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks and return the result; autograd flows back to every rank's input.

    Without a process group the input is returned unchanged (no copy, no communication).
    """
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


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
