"""Batched reductions over lists of tensors, without per-tensor Python loops.

The global statistics of learning-rate-free methods (squared norms, l1 norms, dot products
summed over every parameter) are computed here, on the device, with one multi-tensor kernel
per statistic (``torch._foreach_powsum`` and ``torch._foreach_mm``), then stacked and summed.
Nothing here reads a value back to the host.

Each function has a plain per-tensor twin (``*_loop``) used by the readable per-parameter
path of the optimizers; the tests check that the two agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "total_sum_of_squares",
    "total_abs_sum",
    "total_dot",
    "total_sum_of_squares_loop",
    "total_abs_sum_loop",
    "total_dot_loop",
]


def _sum_stacked(values: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if len(values) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack([v.reshape(()).to(dtype) for v in values]).sum()


def total_sum_of_squares(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i ||t_i||_2^2, accumulated in ``dtype``."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return _sum_stacked(torch._foreach_powsum(list(tensors), 2, dtype=dtype), dtype, device)


def total_abs_sum(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i ||t_i||_1, accumulated in ``dtype``."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return _sum_stacked(torch._foreach_powsum(list(tensors), 1, dtype=dtype), dtype, device)


def total_dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i <a_i, b_i>, as one batched (1 x n) @ (n x 1) product per pair: no temporaries of model size."""
    if len(a) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    rows = [t.reshape(1, -1) for t in a]
    cols = [t.reshape(-1, 1) for t in b]
    return _sum_stacked(torch._foreach_mm(rows, cols), dtype, device)


# Plain per-tensor twins: the readable truth the batched versions are tested against.


def total_sum_of_squares_loop(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _sum_stacked([t.pow(2).sum() for t in tensors], dtype, device)


def total_abs_sum_loop(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _sum_stacked([t.abs().sum() for t in tensors], dtype, device)


def total_dot_loop(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _sum_stacked([(x * y).sum() for x, y in zip(a, b)], dtype, device)


def add_scaled_(targets: Sequence[Tensor], sources: Sequence[Tensor], scale: Tensor) -> None:
    """targets[i] += scale * sources[i] in place, for a 0-d tensor ``scale`` (no host sync).

    One multi-tensor ``addcmul_`` with the 0-d scale broadcast: no temporaries of model size.
    (On CUDA the broadcast takes torch's per-tensor slow path; correct, untested for speed.)
    """
    if len(targets) == 0:
        return
    torch._foreach_addcmul_(list(targets), list(sources), [scale] * len(targets))
