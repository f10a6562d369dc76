"""Fused steps: one compiled single-pass kernel over a group of tensors (``torch.compile``).

A chain of ``torch._foreach_*`` operations reads and writes every buffer once per operation;
on a CPU that keeps an Adam-like step at 4-6x its memory-bandwidth bound however the chain is
blocked (``benchmarks/results/step_speed.md``). A *fused* step instead runs the per-parameter
math of an optimizer (the same function, written for one tensor) as a compiled kernel that
reads each buffer once and writes it once, reductions included. ``torch.compile`` (Inductor)
generates it: C++ loops on the CPU, Triton kernels on a GPU (that path is untested here).

How the kernel is called, so that neither the compile time nor the calls grow with the model:

* The per-tensor function is compiled once, with dynamic shapes, over a *group* of
  :data:`GROUP_SIZE` tensors (one graph, one call per group: no per-tensor Python loop). The
  tensors are passed flattened (1-D aliases of their memory); a list whose length is not a multiple of the group
  size is padded with small zero tensors, which every kernel here leaves at zero and which add
  nothing to the sums (each kernel's docstring says why).
* Values that change from step to step (the learned step size, bias corrections) must be
  tensors (0-d ones reach the kernel as 1-element tensors); Python numbers are compiled in as
  constants (hyperparameters), so a changed one recompiles.
* Tensors that are not contiguous cannot be flattened without a copy: they go through the
  plain per-tensor function (uncompiled), one at a time.
* If compilation fails (no C++ compiler, an unsupported device), a warning says so once and
  the same per-tensor function runs uncompiled: slower, same results.

The first fused step of a process compiles (about 10-30 s on a 2-core CPU; torch's on-disk
cache makes later processes faster), which is why ``fused`` is opt-in.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Sequence

import torch
import torch._dynamo.config as _dynamo_config
import torch.fx.experimental._config as _shape_config
from torch import Tensor

__all__ = ["GROUP_SIZE", "KERNELS", "FusedKernel"]

#: Tensors per compiled call.
GROUP_SIZE = 16

#: Every kernel made (module-level ones, a few): whether one fell back is ``kernel.failed``.
KERNELS: list["FusedKernel"] = []


class FusedKernel:
    """A per-tensor step function run as one compiled kernel per group of tensors.

    ``per_tensor(*tensors, *scalars) -> tuple of 0-d sums`` updates its tensors in place (1-D
    views of a parameter, its gradient and its state buffers, in the order of the lists given
    to :meth:`__call__`) and returns ``num_sums`` partial sums (an empty tuple when it has none).
    """

    def __init__(self, per_tensor: Callable[..., tuple[Tensor, ...]], num_tensors: int, num_sums: int) -> None:
        self.per_tensor = per_tensor
        self.num_tensors = num_tensors
        self.num_sums = num_sums
        self._grouped = _grouped_function(per_tensor, num_tensors, GROUP_SIZE)
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        self._padding: dict[tuple[Any, ...], list[list[Tensor]]] = {}
        KERNELS.append(self)

    @property
    def failed(self) -> bool:
        """Whether compiling failed in this process (the kernel then runs uncompiled)."""
        return self._failed

    # ------------------------------------------------------------------ the grouped function

    def _compiled_grouped(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = torch.compile(self._grouped, dynamic=True, fullgraph=True)
        return self._compiled

    def _run_group(self, tensors: list[Tensor], scalars: tuple[Any, ...]) -> tuple[Tensor, ...]:
        if not self._failed:
            try:
                # Without "duck sizing": tensors of different parameters that happen to have the
                # same size at the first call must not be assumed equal (a recompile each time
                # the pattern changes).
                # Python floats compiled in as constants (hyperparameters; as graph inputs they
                # cost 2x in the generated loops).
                with _shape_config.patch(use_duck_shape=False), _dynamo_config.patch(specialize_float=True):
                    return self._compiled_grouped()(*tensors, *scalars)
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, say so once
                self._failed = True
                warnings.warn(
                    f"tuneless: compiling the fused step ({getattr(self.per_tensor, '__name__', 'kernel')}) "
                    f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                    f"running it uncompiled (slower, same results). Use fused=False for the vectorized path.",
                    RuntimeWarning, stacklevel=4)
        return self._grouped(*tensors, *scalars)

    def _pad(self, like: Sequence[Tensor], count: int) -> list[list[Tensor]]:
        """``count`` rows of zero tensors shaped (2,) like ``like``'s dtypes (zeroed before each use;
        2 elements because sizes 0 and 1 would specialize the compiled graph)."""
        key = tuple((t.dtype, t.device) for t in like)
        pool = self._padding.setdefault(key, [])
        while len(pool) < count:
            pool.append([torch.zeros(2, dtype=dt, device=dev) for dt, dev in key])
        rows = pool[:count]
        torch._foreach_zero_([t for row in rows for t in row])
        return rows

    # ------------------------------------------------------------------ the step

    def __call__(self, lists: Sequence[Sequence[Tensor]], scalars: Sequence[Any], *,
                 sum_dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Run the kernel over parallel ``lists`` (one entry per tensor each); returns the sums."""
        sums = [torch.zeros((), dtype=sum_dtype, device=device) for _ in range(self.num_sums)]
        # 0-d tensors as 1-element ones: the compiled graph would read a 0-d CPU tensor's value
        # on the host in its guards (a NaN check), at every call.
        scalars = tuple(v.reshape(1) if isinstance(v, Tensor) and v.dim() == 0 else v for v in scalars)
        by_dtypes: dict[tuple[torch.dtype, ...], list[tuple[Tensor, ...]]] = {}
        for row in zip(*lists):
            if all(t.is_contiguous() for t in row):
                by_dtypes.setdefault(tuple(t.dtype for t in row), []).append(tuple(_flat_alias(t) for t in row))
            else:  # uncompiled, one tensor at a time
                out = self.per_tensor(*row, *scalars)
                sums = [a + b.to(sum_dtype) for a, b in zip(sums, out)]
        for flat in by_dtypes.values():  # one graph per dtype combination
            for start in range(0, len(flat), GROUP_SIZE):
                group = [list(row) for row in flat[start:start + GROUP_SIZE]]
                if len(group) < GROUP_SIZE:
                    group += self._pad(group[0], GROUP_SIZE - len(group))
                out = self._run_group([t for row in group for t in row], scalars)
                sums = [a + b.to(sum_dtype) for a, b in zip(sums, out)]
        return sums


def _grouped_function(per_tensor: Callable[..., tuple[Tensor, ...]], n: int, k: int) -> Callable[..., tuple[Tensor, ...]]:
    """``per_tensor`` over ``k`` tensors at once (``n`` arguments each), summing what it returns.

    Each kernel gets a code object of its own: ``torch.compile`` keeps its compiled graphs (and
    its limit of 8 recompilations) per code object, so kernels sharing one would evict each
    other, and every call would test the others' guards."""

    def grouped(*args: Any) -> tuple[Tensor, ...]:
        tensors, scalars = args[: n * k], args[n * k:]
        sums: list[Tensor] | None = None
        for i in range(k):
            out = per_tensor(*tensors[i * n:(i + 1) * n], *scalars)
            sums = list(out) if sums is None else [a + b for a, b in zip(sums, out)]
        return tuple(sums or ())

    name = f"fused_{getattr(per_tensor, '__name__', 'kernel').lstrip('_')}"
    code = grouped.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, grouped.__globals__, name, None, grouped.__closure__)


def _flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor over ``t``'s memory (contiguous ``t``) that is not a view in autograd's sense:
    a view would make the compiled graph guard on its base's shape and ``requires_grad``, and
    recompile for every new combination."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
