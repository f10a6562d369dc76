r"""Reductions across processes: the one place where tuneless talks to ``torch.distributed``.

A learning-rate-free step size is a function of global statistics (squared gradient norm, dot
products, distances) summed over *all* parameters, and for the Polyak family of the loss. Under
data-parallel training two things can go wrong silently, and this module is where both are
handled:

* **Sharded parameters** (FSDP2's ``fully_shard``, or sharding by hand): each process holds a
  part of every parameter and so only *partial* sums. They must be added up over the processes
  that share the parameters. An optimizer hands all of a step's partial sums to
  :func:`global_sum` as one vector (``TunelessOptimizer._global_sum``): **one all-reduce per
  step**, of a few numbers.
* **Per-rank losses**: every rank sees its own minibatch, so the loss it passes to
  ``step(loss=...)`` differs from rank to rank; a step size computed from it (Polyak, SPS, MoMo,
  the default Tuneless) would differ too, and replicas would drift apart. :func:`average_loss`
  (called by ``TunelessOptimizer.step``) averages it over the data-parallel ranks: one more
  all-reduce of one number, for the methods that take a loss.

Which process groups are used (:func:`set_process_group` and :func:`set_loss_group` override them):

================================  ==============================  =============================
parameters                        statistics summed over          loss averaged over
================================  ==============================  =============================
plain tensors, one process        nothing                         nothing
plain tensors, several processes  nothing (replicas agree)        the default group (WORLD)
(DDP)
DTensor, FSDP2 ``fully_shard``    the mesh dimension sharding     the whole device mesh
                                  them (found from placements)
sharded by hand                   ``set_process_group(opt, pg)``  the same ``pg``
================================  ==============================  =============================

Under DDP the gradients are already averaged and identical on every rank, so every statistic
computed from gradients and parameters agrees without communication; only the loss differs, and
it is averaged over the default process group with nothing to set up (when
``torch.distributed`` is initialised with more than one process). Opt out with
``set_loss_group(opt, None)`` when the loss given to ``step`` is already the mean over the
ranks, or when the ranks train different models (then each rank uses its own loss, and no
collective is made); ``set_loss_group(opt, group)`` averages over another group (e.g. the
data-parallel ranks of a pipeline- or tensor-parallel run, where WORLD would mix different
models' losses).

**The collective contract** (what an optimizer module must keep so that no rank hangs): on every
step, every rank calls ``_global_sum`` the same number of times with a vector of the same length
whose entries mean the same thing on every rank, whether or not its local part of the parameters
has gradients or elements. A rank with nothing to add passes zeros. Set the environment variable
``TUNELESS_CHECK_COLLECTIVES=1`` to check the lengths at every call (one extra collective), which
turns a mismatch into an error that names the optimizer instead of a hang or a wrong sum.

**Devices.** The partial sums live on the parameters' device and are reduced there: gloo for CPU
tensors, NCCL for CUDA tensors (a device mesh built with ``init_device_mesh("cuda", ...)`` already
has NCCL groups). Tested on CPU with gloo; the CUDA/NCCL path runs the same calls but is untested
here. No step synchronizes with the host: an all-reduce is enqueued on the device stream.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch import Tensor

__all__ = ["set_process_group", "set_loss_group", "reduction_group", "loss_group", "global_sum", "average_loss"]

_UNSET: Any = object()
_SAME: Any = object()

# Attributes stored on the optimizer (plain attributes: not in state_dict, not pickled meaning).
_EXPLICIT_SUM = "_tuneless_process_group"
_EXPLICIT_LOSS = "_tuneless_loss_group"
_AUTO = "_tuneless_auto_groups"

_CHECK_ENV = "TUNELESS_CHECK_COLLECTIVES"


def set_process_group(optimizer: torch.optim.Optimizer, process_group: Any, *, loss_group: Any = _SAME) -> None:
    """Choose the process groups of ``optimizer`` by hand (overrides the automatic choice).

    Args:
        optimizer: a tuneless optimizer (a wrapper such as :class:`~tuneless.Mechanic` or
            :class:`~tuneless.ScheduleFree` passes the setting on to the optimizer it wraps).
        process_group: the processes that hold *parts* of the same parameters (shards): the
            partial sums of the statistics are added up over it. ``None``: no sum (replicated
            parameters, as in DDP, or a single process). Every rank of the group must list the
            same parameters in the same param groups and order; a rank may hold an empty part,
            or no gradient, for any of them.
        loss_group: the processes whose losses are averaged (the data-parallel ranks, each with
            its own minibatch). Default: ``process_group``, or where that is ``None`` the
            automatic choice (the default group when several processes run, as under DDP).
            ``None``: the loss passed to ``step`` is used as given (see :func:`set_loss_group`).

    Example (sharding by hand, ZeRO-style, over ``shard_group``)::

        opt = tuneless.Prodigy(my_shards)
        tuneless.distributed.set_process_group(opt, shard_group)
    """
    for opt in _optimizer_chain(optimizer):
        setattr(opt, _EXPLICIT_SUM, process_group)
        if loss_group is not _SAME:
            setattr(opt, _EXPLICIT_LOSS, loss_group)
        elif process_group is not None:
            setattr(opt, _EXPLICIT_LOSS, process_group)


def set_loss_group(optimizer: torch.optim.Optimizer, group: Any) -> None:
    """Choose over which processes the loss given to ``step`` is averaged (overrides the automatic choice).

    Only the methods that take their step size from the loss (Polyak, SPS, SPS_max, MoMo, MoMo*,
    the default Tuneless, and wrappers over them) use it. By default, when ``torch.distributed``
    is initialised with more than one process and the parameters are plain tensors (DDP), the
    loss is averaged over the default group; under FSDP2, over the device mesh.

    Args:
        optimizer: a tuneless optimizer (a wrapper passes the setting on to the one it wraps).
        group: a process group to average over, or ``None``: the loss is used as given, with no
            collective. Use ``None`` when every rank already passes the mean loss of all ranks,
            or when the ranks train different models (each rank then uses its own loss).

    Example (each rank trains its own model, in one multi-process job)::

        opt = tuneless.Polyak(model.parameters())
        tuneless.distributed.set_loss_group(opt, None)
    """
    for opt in _optimizer_chain(optimizer):
        setattr(opt, _EXPLICIT_LOSS, group)


def _optimizer_chain(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """The optimizer and the ones it wraps (Mechanic's ``base_optimizer``, ScheduleFree's ``base``)."""
    seen: set[int] = set()
    todo = [optimizer]
    while todo:
        opt = todo.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        yield opt
        for name in ("base_optimizer", "base"):
            inner = opt.__dict__.get(name)
            if isinstance(inner, torch.optim.Optimizer):
                todo.append(inner)


def _all_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _whole_mesh_group(mesh: Any) -> Any:
    """The process group of every rank of ``mesh``."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group(0)
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise NotImplementedError(  # pragma: no cover - needs a multi-dimensional mesh smaller than the world
        "tuneless: cannot find the data-parallel group of a multi-dimensional device mesh that does not "
        "span every process; call tuneless.distributed.set_process_group(opt, shard_group, loss_group=...)"
    )


def _detect(optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(statistics group, loss group) found from the parameters: DTensor shards, or nothing."""
    params = _all_params(optimizer)
    sharded = [p for p in params if getattr(p, "device_mesh", None) is not None and getattr(p, "placements", None)]
    if not sharded:
        return None, _default_loss_group()  # one process, or DDP: replicas; average the ranks' losses
    mesh = sharded[0].device_mesh
    dims = {tuple(i for i, pl in enumerate(p.placements) if pl.is_shard()) for p in sharded}
    if any(p.device_mesh != mesh for p in sharded):
        raise NotImplementedError(
            "tuneless: the parameters are DTensors on different device meshes; call "
            "tuneless.distributed.set_process_group(opt, group) with the group to sum statistics over"
        )
    if len(dims) != 1:
        raise NotImplementedError(
            f"tuneless: the parameters are sharded over different mesh dimensions ({sorted(dims)}): the partial "
            f"sums of differently sharded parameters cannot be added up in one reduction; shard every parameter "
            f"the same way (fully_shard the root module) or call tuneless.distributed.set_process_group"
        )
    if len(sharded) != len(params):
        raise ValueError(
            f"tuneless: {len(params) - len(sharded)} of the {len(params)} parameters are plain tensors while the "
            f"others are DTensor shards: their statistics would be counted once per process. Shard every "
            f"parameter the optimizer steps (apply fully_shard to the root module too)"
        )
    (shard_dims,) = dims
    loss = _whole_mesh_group(mesh) if mesh.size() > 1 else None
    if not shard_dims or mesh.size() == 1:
        return None, loss  # replicated DTensors: every rank has the whole of every statistic
    if len(shard_dims) == 1:
        return mesh.get_group(mesh_dim=shard_dims[0]), loss
    if len(shard_dims) == mesh.ndim:
        return _whole_mesh_group(mesh), loss
    raise NotImplementedError(  # pragma: no cover - needs a mesh of 3+ dimensions
        "tuneless: parameters sharded over some but not all dimensions of a multi-dimensional mesh; call "
        "tuneless.distributed.set_process_group(opt, group) with the group of their shards"
    )


def _several_processes() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process (host-side, no collective)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _default_loss_group() -> Any:
    """The loss group of replicated (plain) parameters: the default group when several processes run."""
    import torch.distributed as dist

    return dist.group.WORLD if _several_processes() else None


def _groups(optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    explicit_sum = getattr(optimizer, _EXPLICIT_SUM, _UNSET)
    explicit_loss = getattr(optimizer, _EXPLICIT_LOSS, _UNSET)
    if explicit_sum is not _UNSET:  # set by hand: the loss group too, or the default of plain parameters
        return explicit_sum, (explicit_loss if explicit_loss is not _UNSET else _default_loss_group())
    # Found once per parameter layout and process-group setup (host-side only: no collective, no sync).
    available = torch.distributed.is_available()
    key = (tuple(len(group["params"]) for group in optimizer.param_groups),
           available and torch.distributed.is_initialized())
    cached = getattr(optimizer, _AUTO, None)
    if cached is None or cached[0] != key:
        groups = _detect(optimizer) if available else (None, None)
        cached = (key, groups)
        setattr(optimizer, _AUTO, cached)
    statistics, loss = cached[1]
    return statistics, (explicit_loss if explicit_loss is not _UNSET else loss)


def reduction_group(optimizer: torch.optim.Optimizer) -> Any:
    """The process group the optimizer's statistics are summed over (None: no reduction)."""
    return _groups(optimizer)[0]


def loss_group(optimizer: torch.optim.Optimizer) -> Any:
    """The process group the loss given to ``step`` is averaged over (None: used as given)."""
    return _groups(optimizer)[1]


def _check_lengths(optimizer: torch.optim.Optimizer, tensor: Tensor, group: Any, what: str) -> None:
    """Debug check (TUNELESS_CHECK_COLLECTIVES=1): every rank reduces a vector of the same length."""
    import torch.distributed as dist

    n = torch.tensor([tensor.numel(), -tensor.numel()], dtype=torch.int64, device=tensor.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    if int(n[0]) != -int(n[1]):
        raise RuntimeError(
            f"{type(optimizer).__name__}: the ranks {what} vectors of different lengths "
            f"(this rank: {tensor.numel()}, largest: {int(n[0])}, smallest: {-int(n[1])}); every rank must "
            f"pass the same statistics at every step, whether or not its shard has gradients"
        )


def global_sum(optimizer: torch.optim.Optimizer, partial_sums: Tensor) -> Tensor:
    """Add up ``partial_sums`` (a 1-D tensor) over the optimizer's reduction group, in one all-reduce.

    Returns ``partial_sums`` itself when there is nothing to reduce, else a new tensor.
    """
    group = reduction_group(optimizer)
    if group is None:
        return partial_sums
    import torch.distributed as dist

    out = partial_sums.detach().clone()
    if os.environ.get(_CHECK_ENV, "") not in ("", "0"):
        _check_lengths(optimizer, out, group, "summed")
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def any_rank_nonfinite(optimizer: torch.optim.Optimizer, bad: Tensor) -> Tensor:
    """Whether any rank of the reduction group saw a non-finite gradient: ``bad`` (0-d, 1 on this
    rank when one of its gradients is not finite) summed over the group, in one all-reduce of
    one int32 number. Returns ``bad`` itself when there is nothing to reduce (one process, DDP)."""
    group = reduction_group(optimizer)
    if group is None:
        return bad
    import torch.distributed as dist

    out = bad.detach().reshape(1).to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.reshape(()).to(bad.dtype)


def average_loss(optimizer: torch.optim.Optimizer, loss: Tensor) -> Tensor:
    """The mean of the ranks' losses over the optimizer's loss group (one all-reduce of one number).

    ``loss`` is this rank's loss as a 0-d tensor; it is returned unchanged when there is no loss
    group (one process, or :func:`set_loss_group` ``(opt, None)``). The name and signature are
    what every loss-based method calls (through ``TunelessOptimizer.step``).
    """
    group = loss_group(optimizer)
    if group is None:
        return loss
    import torch.distributed as dist

    out = loss.detach().reshape(1).clone()
    if os.environ.get(_CHECK_ENV, "") not in ("", "0"):
        _check_lengths(optimizer, out, group, "averaged losses as")
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return (out / dist.get_world_size(group)).reshape(())

