"""torch.distributed helpers for the batch-level losses (ITC, VICReg).

``gather_with_grad`` concatenates a tensor over ranks with a backward that routes the
gradient of every rank's copy back to its owner (a reduce-scatter of the gradients).
Every rank then computes the loss of the *global* batch, so the value at world size W
equals the single-process loss on the concatenated batch; DDP's gradient averaging
turns the W identical-loss backward passes (each local gradient is W * dL/dx) into
exactly dL/dtheta. All ranks must pass the same local batch size (drop_last=True).
ITM hard negatives are drawn from the gathered similarities (as BLIP does; ALBEF draws
them locally): the negative's unimodal states are gathered with gradients, so each
rank's local ITM loss sends gradients to the rank that encoded the negative, and DDP's
averaging gives the gradient of the mean ITM loss over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGather(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient w.r.t. the gathered tensor
    (all_reduce) and keeps this rank's slice -- i.e. a reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0, differentiable; identity in one process."""
    if not is_distributed():
        return x
    return _AllGather.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0 without gradients (ids, labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def global_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks (the value itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
