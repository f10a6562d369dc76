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
  tensors are passed flattened (1-D views); a list whose length is not a multiple of the group
  size is padded with small zero tensors, which every kernel here leaves at zero and which add
  nothing to the sums (each kernel's docstring says why).
* Values that change from step to step (the learned step size, bias corrections) must be
  tensors (0-d ones reach the kernel as 1-element tensors); Python numbers are compiled in as
  constants (hyperparameters), so a changed one compiles another variant.
* **No Dynamo guards.** Checking the guards of a graph over ~100 tensors cost about as much as
  the kernel itself on many small tensors, so each variant is compiled without them
  (``torch.compiler.skip_all_guards_unsafe``) and this class does the guarding: a variant is
  keyed by everything a guard would check here (the dtypes of a row, the device, the constants
  and the scalars' dtypes, grad mode), and it only receives what the compiled code assumes:
  contiguous 1-D tensors of at least 2 elements (sizes 0 and 1 are specialized by the
  compiler), the same size within a row (one parameter and its buffers), none aliasing another.
  Everything else (non-contiguous or single-element tensors) goes through the plain per-tensor
  function (uncompiled), one tensor at a time.
* **Sizes are a guard too.** Inductor tunes a kernel for dynamic sizes from the sizes it
  first sees (its size hints: how a sum is split across threads or GPU blocks). A kernel
  compiled on tiny tensors and reused on large ones is correct but can be very slow: on an
  H200, AdamHD's fused step on 12 tensors of 4 M floats took 3.5 s when compiled on a 3-tensor
  toy first, against 2.15 ms when compiled at that size (``benchmarks/fused_at_scale.py``,
  docs/gpu.md). So each tensor's *size class* (a factor of 16 in size, :func:`size_class`) is
  part of a variant's key, and the rows of one kind are stably sorted by size class, largest
  first, before they are grouped: a group's tensors share a class, and a model compiles a few
  variants (one per size class and one per boundary between two). Untested on a GPU since.
* If compilation fails (no C++ compiler, an unsupported device), a warning says so once per
  process and reason (an optimizer with two kernels, such as Prodigy, warns once, not once per
  kernel) and the same per-tensor function runs uncompiled: slower, same results.
* For kernel authors: torch 2.13's Inductor can miscompile ``z.copy_(y)`` followed by a
  mutation of ``y`` in the same graph: z receives the new y (its ``remove_noop_ops`` pass,
  pytorch/pytorch#198131). Copy an expression instead (``y + 0.0``), or copy outside the
  kernel. Every kernel here has a parity test against its uncompiled function.

The first fused step of a process compiles, which is why ``fused`` is opt-in: on a 2-core CPU
with an empty cache, 57 s for Tuneless and 43 s for AdamHD (over its first two steps) on a
192-tensor transformer-shaped list, three variants per kernel; before size classes, one variant,
29 s and 20 s (``benchmarks/fused_compile_time.py``, ``benchmarks/results/fused_compile_time.md``).
Torch's on-disk cache makes later processes faster.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Sequence

import torch
import torch._dynamo.config as _dynamo_config
import torch.fx.experimental._config as _shape_config
from torch import Tensor

__all__ = ["GROUP_SIZE", "MAX_VARIANTS", "KERNELS", "FusedKernel", "size_class"]

#: Tensors per compiled call.
GROUP_SIZE = 16

#: Compiled variants per kernel in a process (each compiles for seconds); more run uncompiled.
MAX_VARIANTS = 16

#: Every kernel made (module-level ones, a few): whether one fell back is ``kernel.failed``.
KERNELS: list["FusedKernel"] = []

#: The reasons already warned about in this process (a missing compiler fails every kernel
#: alike: one warning, naming the first kernel).
_WARNED_REASONS: set[str] = set()


def size_class(numel: int) -> int:
    """A tensor's size class for the compiled kernels: ``ceil(log2(numel)) // 4``, so each class
    spans a factor of 16 (0: up to 8 elements, 1: 9-128, 2: 129-2048, 3: up to 32768, ...).
    A kernel is compiled for a signature of size classes and reused only within it."""
    return (max(numel, 1) - 1).bit_length() // 4


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
        self._variants: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._failed = False
        self._warned = False
        self._padding: dict[tuple[Any, ...], list[list[Tensor]]] = {}
        KERNELS.append(self)

    @property
    def failed(self) -> bool:
        """Whether compiling failed in this process (the kernel then runs uncompiled)."""
        return self._failed

    # ------------------------------------------------------------------ the grouped function

    def _compiled_grouped(self, key: tuple[Any, ...]) -> Callable[..., Any]:
        """The compiled function for one signature (dtypes, device, constants, size classes): one ``torch.compile``
        each, of a code object of its own, without Dynamo's guards (the key is the guard)."""
        grouped = _grouped_function(self.per_tensor, self.num_tensors, GROUP_SIZE)
        return torch.compile(grouped, dynamic=True, fullgraph=True,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})

    def _run_group(self, tensors: list[Tensor], scalars: tuple[Any, ...], key: tuple[Any, ...]) -> tuple[Tensor, ...]:
        if not self._failed:
            try:
                compiled = self._variants.get(key)
                if compiled is not None:
                    return compiled(*tensors, *scalars)
                if len(self._variants) >= MAX_VARIANTS:
                    self._warn_once(f"more than {MAX_VARIANTS} variants (dtypes, devices, hyperparameter values, size classes) "
                                    "were asked for in this process; the others run uncompiled (slower, same results)")
                    return self._grouped(*tensors, *scalars)
                compiled = self._compiled_grouped(key)
                # The first call compiles. Without "duck sizing": tensors of different parameters
                # that happen to have the same size at this call must not be assumed equal.
                # Python floats compiled in as constants (hyperparameters; as graph inputs they
                # cost 2x in the generated loops).
                with _shape_config.patch(use_duck_shape=False), _dynamo_config.patch(specialize_float=True):
                    out = compiled(*tensors, *scalars)
                self._variants[key] = compiled
                return out
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, say so once
                self._failed = True
                self._warn_once(f"compiling it failed ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}); running it uncompiled "
                                "(slower, same results). Use fused=False for the vectorized path.")
        return self._grouped(*tensors, *scalars)

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            if why in _WARNED_REASONS:
                return
            _WARNED_REASONS.add(why)
            warnings.warn(f"tuneless: fused step ({getattr(self.per_tensor, '__name__', 'kernel')}): {why}",
                          RuntimeWarning, stacklevel=5)

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
        # Tensor operands on the parameters' device (a tensor lr made on the CPU for parameters
        # on a GPU; a copy to the device, no host read, as torch's fused Adam does): a kernel
        # takes its operands on one device (found on an H200, docs/gpu.md).
        on = lists[0][0].device if lists and len(lists[0]) else device
        scalars = tuple(v.to(on) if isinstance(v, Tensor) and v.device != on else v for v in scalars)
        # 0-d tensors as 1-element ones: the compiled graph would read a 0-d CPU tensor's value
        # on the host (a NaN check) when it compiles.
        compiled_scalars = tuple(v.reshape(1) if isinstance(v, Tensor) and v.dim() == 0 else v for v in scalars)
        parts: list[tuple[Tensor, ...]] = []
        by_kind: dict[tuple[Any, ...], list[tuple[Tensor, ...]]] = {}
        for row in zip(*lists):
            n = row[0].numel()
            if not all(t.is_contiguous() and t.numel() == n for t in row):  # uncompiled, as they are
                parts.append(tuple(self.per_tensor(*row, *scalars)))
            elif n <= 1:  # uncompiled, flattened like the others
                parts.append(tuple(self.per_tensor(*(t.view(-1) for t in row), *compiled_scalars)))
            else:
                kind = (tuple(t.dtype for t in row), row[0].device)
                by_kind.setdefault(kind, []).append(tuple(t.view(-1) for t in row))
        scalar_key = tuple((t.dtype, t.device) if isinstance(t, Tensor) else (type(t), t) for t in compiled_scalars)
        for (dtypes, row_device), flat in by_kind.items():  # one graph per dtype combination and device
            classes = [size_class(row[0].numel()) for row in flat]
            order = sorted(range(len(flat)), key=lambda i: -classes[i])  # stable: the lists' order within a class
            for start in range(0, len(order), GROUP_SIZE):
                chosen = order[start:start + GROUP_SIZE]
                group = [list(flat[i]) for i in chosen]
                signature = tuple(classes[i] for i in chosen)
                if len(group) < GROUP_SIZE:
                    group += self._pad(group[0], GROUP_SIZE - len(group))
                    signature += (size_class(2),) * (GROUP_SIZE - len(chosen))
                key = (dtypes, row_device, scalar_key, torch.is_grad_enabled(), signature)
                parts.append(tuple(self._run_group([t for row in group for t in row], compiled_scalars, key)))
        if not parts:
            return [torch.zeros((), dtype=sum_dtype, device=device) for _ in range(self.num_sums)]
        # (parameters on several devices in one process: each device's partial sums moved to
        # ``device``; untested here, no GPU)
        return [torch.stack([part[i].reshape(()).to(device=device, dtype=sum_dtype) for part in parts]).sum()
                for i in range(self.num_sums)]


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
