"""Reductions across processes: the one place where tuneless talks to ``torch.distributed``.

A learning-rate-free step size is a function of global statistics (squared gradient norm,
dot products, distances) summed over *all* parameters. When parameters are sharded across
processes (FSDP2's ``fully_shard``: parameters and gradients are DTensor shards), each process
holds only partial sums, and they must be added up over the process group that shards them.
With replicated parameters (one process, or DDP) nothing needs reducing.

The process group is found from the parameters (the device mesh of a sharded DTensor), or set
explicitly with :func:`set_process_group`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["global_sum", "set_process_group", "reduction_group"]

_UNSET = object()


def set_process_group(optimizer: torch.optim.Optimizer, process_group: Any) -> None:
    """Sum the optimizer's global statistics over ``process_group`` (``None``: no reduction).

    Overrides the automatic choice (the shard group of DTensor parameters). Use it when the
    parameters are sharded by hand, without DTensor.
    """
    optimizer._tuneless_process_group = process_group  # type: ignore[attr-defined]


def _sharded_group(optimizer: torch.optim.Optimizer) -> Any:
    """The process group that shards the DTensor parameters, or None if nothing is sharded."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            placements = getattr(p, "placements", None)
            mesh = getattr(p, "device_mesh", None)
            if placements is None or mesh is None:
                continue
            shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
            if not shard_dims:
                continue
            if len(shard_dims) != 1:  # pragma: no cover - multi-dimensional sharding untested
                raise NotImplementedError("tuneless: parameters sharded over several mesh dimensions")
            return mesh.get_group(mesh_dim=shard_dims[0])
    return None


def reduction_group(optimizer: torch.optim.Optimizer) -> Any:
    """The process group the optimizer's statistics are summed over (None: no reduction)."""
    explicit = getattr(optimizer, "_tuneless_process_group", _UNSET)
    if explicit is not _UNSET:
        return explicit
    cached = getattr(optimizer, "_tuneless_auto_group", _UNSET)
    if cached is _UNSET:
        cached = _sharded_group(optimizer) if torch.distributed.is_available() else None
        optimizer._tuneless_auto_group = cached  # type: ignore[attr-defined]
    return cached


def global_sum(optimizer: torch.optim.Optimizer, partial_sums: Tensor) -> Tensor:
    """Add up ``partial_sums`` (a 1-D tensor) over the optimizer's reduction group, in one collective."""
    group = reduction_group(optimizer)
    if group is None:
        return partial_sums
    import torch.distributed as dist

    out = partial_sums.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
