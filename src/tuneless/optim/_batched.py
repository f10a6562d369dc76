"""Batched reductions over lists of tensors, without per-tensor Python loops.

The global statistics of learning-rate-free methods (squared norms, l1 norms, dot products
summed over every parameter) are computed here, on the device, with one multi-tensor kernel
per statistic (``torch._foreach_powsum`` and ``torch._foreach_mm``), then stacked and summed.
On the CPU, where those kernels are slow, the sums go block by block through a reused scratch
buffer (``flat_*``) or, for dot products of tensors in the sum dtype, one BLAS dot per
cache-sized chunk (``chunked_dots``, ``total_dots``). Nothing here reads a value back to the host.

Each function has a plain per-tensor twin (``*_loop``) used by the readable per-parameter
path of the optimizers; the tests check that the two agree.

Which of the two vectorized paths runs (the CPU's blocks, scratch and chunked dots, or the
batched reductions written for other devices) is decided in one place, :func:`cpu_paths`. The
tests run the other devices' path on the CPU under :func:`device_paths_on_cpu` (private), as
torch's tests force the foreach path, and check that it agrees with the CPU path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "cpu_paths",
    "CPU_BLOCK_NUMEL",
    "coefficient_dtype",
    "coefficient",
    "host_coefficients",
    "indices_by_dtype",
    "cache_blocks",
    "Scratch",
    "flat_dot",
    "flat_abs_sum",
    "flat_sum_of_squares",
    "CPU_DOT_NUMEL",
    "CPU_DOT_MIN_NUMEL",
    "chunked_dots",
    "total_dots",
    "nonfinite_count",
    "total_sum_of_squares",
    "total_abs_sum",
    "total_dot",
    "total_sum_of_squares_loop",
    "total_abs_sum_loop",
    "total_dot_loop",
]


#: Private, for the tests: when True, tensors on the CPU take the paths written for other
#: devices (see :func:`device_paths_on_cpu`).
_DEVICE_PATHS_ON_CPU = False


def cpu_paths(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CPU's paths (cache-sized blocks, the reused scratch
    buffer, chunked BLAS dots); otherwise the batched multi-tensor reductions over whole lists
    (the path for GPUs and other devices)."""
    return device.type == "cpu" and not _DEVICE_PATHS_ON_CPU


@contextlib.contextmanager
def device_paths_on_cpu() -> Iterator[None]:
    """Private, for the tests: within it, CPU tensors take the paths written for other devices
    (:func:`cpu_paths` is False), so that the CPU tests run both branches of every optimizer.
    Not thread-safe (a module-level switch), like torch's own test-only switches."""
    global _DEVICE_PATHS_ON_CPU
    saved, _DEVICE_PATHS_ON_CPU = _DEVICE_PATHS_ON_CPU, True
    try:
        yield
    finally:
        _DEVICE_PATHS_ON_CPU = saved


def coefficient_dtype(like: Tensor) -> torch.dtype:
    """The dtype of coefficients and temporaries for in-place ops on ``like``: its own, or float32
    for 16-bit tensors (rounding 0.999 to bfloat16 would change the coefficient itself)."""
    return like.dtype if like.dtype.itemsize >= 4 else torch.float32


def coefficient(scalar: Tensor, like: Tensor) -> Tensor:
    """``scalar`` (a 0-d tensor) in :func:`coefficient_dtype` of ``like``."""
    dtype = coefficient_dtype(like)
    return scalar if scalar.dtype == dtype else scalar.to(dtype)


def host_coefficients(like: Tensor, *values: float) -> list[Tensor]:
    """Numbers known on the host (computed in double) as 1-element tensors in
    :func:`coefficient_dtype` of ``like``, on its device: fills, not copies (no sync)."""
    dtype = coefficient_dtype(like)
    return [torch.full((1,), float(value), dtype=dtype, device=like.device) for value in values]


def indices_by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    """The positions of ``tensors`` grouped by dtype, in order of appearance (a foreach op needs one dtype)."""
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _sum_stacked(values: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if len(values) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack([v.reshape(()).to(dtype) for v in values]).sum()


def nonfinite_count(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """1.0 (a 0-d tensor in ``dtype``) when any entry of ``tensors`` is NaN or infinite, else 0.0.

    One read of each tensor: a sum per tensor (NaN and infinities survive a sum; finite values
    overflow it only beyond ~1e38 in float32, where a step is no better), stacked and summed.
    On the CPU, one ``sum`` per tensor (a read at memory speed); elsewhere one multi-tensor
    l1 norm per dtype."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    # a complex tensor as its real view: a NaN in the imaginary part counts too (casting a
    # complex sum to a real dtype would drop it)
    tensors = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    if cpu_paths(tensors[0].device):
        sums = [t.sum(dtype=dtype) for t in tensors]
    else:
        sums = []
        for dt, idx in indices_by_dtype(tensors).items():
            sums.extend(torch._foreach_norm([tensors[i] for i in idx], 1, dtype=dtype if dt.itemsize < 4 else None))
    total = _sum_stacked(sums, dtype, device)
    return (~torch.isfinite(total)).to(dtype)


def total_sum_of_squares(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i ||t_i||_2^2, accumulated in ``dtype``."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return _sum_stacked(torch._foreach_powsum(list(tensors), 2, dtype=dtype), dtype, device)


def total_abs_sum(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i ||t_i||_1, accumulated in ``dtype``: ``torch._foreach_norm(ord=1)``, which has a
    multi-tensor kernel (``_foreach_powsum(p=1)`` measured 5-7x slower on CPU, torch 2.13)."""
    if len(tensors) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    return _sum_stacked(torch._foreach_norm(list(tensors), 1, dtype=dtype), dtype, device)


_FOREACH_MM = getattr(torch, "_foreach_mm", None)


def foreach_mm(rows: Sequence[Tensor], cols: Sequence[Tensor]) -> list[Tensor]:
    """``torch._foreach_mm(rows, cols)``, or where this torch has no ``_foreach_mm`` (it came
    after torch 2.11, the version on record on the GPU machine, docs/gpu.md) one ``torch.mm``
    a pair: the same products, a launch each."""
    if _FOREACH_MM is not None:
        return _FOREACH_MM(list(rows), list(cols))
    return [torch.mm(r, c) for r, c in zip(rows, cols)]


def total_dot(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """sum_i <a_i, b_i>, as one batched (1 x n) @ (n x 1) product per pair: no temporaries of model size."""
    if len(a) == 0:
        return torch.zeros((), dtype=dtype, device=device)
    rows = [t.reshape(1, -1) for t in a]
    cols = [t.reshape(-1, 1) for t in b]
    return _sum_stacked(foreach_mm(rows, cols), dtype, device)


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


# ----------------------------------------------------------------------------- cache-sized blocks (CPU)

#: On the CPU, the vectorized path of a multi-pass step runs block by block, each block holding
#: at most this many elements per buffer (large tensors are cut into flat views): the dozen
#: foreach passes of a step then reuse the cache instead of streaming every buffer from memory a
#: dozen times, and the one scratch buffer is block-sized. On other devices (GPUs) everything
#: is one block.
CPU_BLOCK_NUMEL = 1 << 18


def cache_blocks(*lists: Sequence[Tensor] | None, limit: int | None = None) -> list[tuple[list[Tensor] | None, ...]]:
    """Parallel sub-lists for foreach calls: one dtype and device each and, on the CPU, at most
    ``limit`` elements (default :data:`CPU_BLOCK_NUMEL`) per list.

    ``lists`` are parallel lists of same-shaped tensors (parameter, gradient, state buffers);
    ``None`` entries stay ``None``. A tensor larger than the limit is cut into flat views when
    all its parallel tensors are contiguous (in-place ops on the views update it); one that
    cannot be cut forms a block of its own.
    """
    limit = CPU_BLOCK_NUMEL if limit is None else limit
    present = [i for i, lst in enumerate(lists) if lst is not None]
    by_kind: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, ...]]] = {}
    for items in zip(*(lists[i] for i in present)):  # type: ignore[arg-type]
        by_kind.setdefault((items[0].dtype, items[0].device), []).append(items)
    out: list[tuple[list[Tensor] | None, ...]] = []

    def emit(rows: list[tuple[Tensor, ...]]) -> None:
        if rows:
            full: list[list[Tensor] | None] = [None] * len(lists)
            for i, col in zip(present, zip(*rows)):
                full[i] = list(col)
            out.append(tuple(full))

    for rows in by_kind.values():
        if not cpu_paths(rows[0][0].device):
            emit(rows)
            continue
        block: list[tuple[Tensor, ...]] = []
        size = 0
        for items in rows:
            n = items[0].numel()
            if n > limit:
                if all(t.is_contiguous() for t in items):
                    for piece in zip(*(t.view(-1).split(limit) for t in items)):
                        emit([piece])
                else:
                    emit([items])
                continue
            if size + n > limit:
                emit(block)
                block, size = [], 0
            block.append(items)
            size += n
        emit(block)
    return out


class Scratch:
    """A flat buffer per (dtype, device) reused from step to step on the CPU: not state, never
    saved. Viewed as a list of tensors shaped like a block's tensors, it holds a block's
    temporaries, and sums over it are one reduction over contiguous memory (in cache)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device, int], Tensor] = {}
        self._views: dict[tuple[Any, ...], tuple[Tensor, list[Tensor]]] = {}

    def views(self, like: Sequence[Tensor], slot: int = 0) -> tuple[Tensor, list[Tensor]]:
        """(the flat buffer's used part, views of it shaped like ``like``), in float32 at least.

        ``slot`` chooses one of several buffers, for a block that needs two temporaries at
        once. The views are cached by shapes: a model's blocks are the same at every step. A
        block larger than :data:`CPU_BLOCK_NUMEL` (a tensor that could not be cut) gets a
        temporary.
        """
        dtype = coefficient_dtype(like[0])
        device = like[0].device
        key = (dtype, device, slot, tuple(t.shape for t in like))
        cached = self._views.get(key)
        if cached is not None:
            return cached
        n = sum(t.numel() for t in like)
        cache = n <= CPU_BLOCK_NUMEL
        if cache:
            buffer = self._buffers.get((dtype, device, slot))
            if buffer is None or buffer.numel() < n:
                buffer = self._buffers[(dtype, device, slot)] = torch.empty(max(n, CPU_BLOCK_NUMEL), dtype=dtype,
                                                                            device=device)
                self._views.clear()  # they view the buffer replaced
        else:
            buffer = torch.empty(n, dtype=dtype, device=device)
        views, start = [], 0
        for t in like:
            views.append(buffer[start:start + t.numel()].view(t.shape))
            start += t.numel()
        result = (buffer[:n], views)
        if cache:
            if len(self._views) > 4096:  # a model whose shapes keep changing: start over
                self._views.clear()
            self._views[key] = result
        return result


def flat_dot(a: Sequence[Tensor], b: Sequence[Tensor], scratch: Scratch, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """sum_i <a_i, b_i> over one block: a copied into the scratch, multiplied by b, summed at once."""
    flat, views = scratch.views(a, slot)
    torch._foreach_copy_(views, list(a))
    torch._foreach_mul_(views, list(b))
    return flat.sum(dtype=dtype)


def flat_abs_sum(a: Sequence[Tensor], scratch: Scratch, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """sum_i ||a_i||_1 over one block, through the scratch: the absolute values written straight
    into it (16-bit tensors: copied into the float32 scratch first), then one sum."""
    flat, views = scratch.views(a, slot)
    if flat.dtype != a[0].dtype:
        torch._foreach_copy_(views, list(a))
        return flat.abs_().sum(dtype=dtype)
    for t, view in zip(a, views):
        torch.abs(t, out=view)
    return flat.sum(dtype=dtype)


def flat_sum_of_squares(a: Sequence[Tensor], scratch: Scratch, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """sum_i ||a_i||_2^2 over one block, through the scratch."""
    flat, views = scratch.views(a, slot)
    torch._foreach_copy_(views, list(a))
    return flat.square_().sum(dtype=dtype)


#: On the CPU, :func:`chunked_dots` cuts tensors into 1-D views of at most this many elements,
#: so that the several dot products over the same views read them from the cache.
CPU_DOT_NUMEL = 1 << 17

#: Tensors smaller than this are packed into the scratch buffer first by :func:`chunked_dots`:
#: a dot per pair and tensor would cost more in Python calls than the copy.
CPU_DOT_MIN_NUMEL = 1 << 14


def chunked_dots(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]], dtype: torch.dtype,
                 scratch: Scratch) -> Tensor | None:
    """sum_i <lists[a][i], lists[b][i]> for each ``(a, b)`` in ``pairs``, as one vector, or
    None where this path does not apply (then use :func:`flat_dot` and its kin block by block).

    It applies on the CPU to contiguous tensors already in the sum ``dtype`` (float32 or
    float64: no cast). Each cache-sized 1-D chunk of a tensor takes one BLAS dot per pair, with
    no copy; tensors below :data:`CPU_DOT_MIN_NUMEL` are first copied side by side into the
    scratch buffer (one slot per list), whose chunks are then dotted the same way. This ran
    about twice as fast as :func:`flat_dot`'s copy-multiply-sum per statistic. The sums are
    accumulated in ``dtype`` as before, in another order.
    """
    if not lists[0] or dtype not in (torch.float32, torch.float64):
        return None
    for lst in lists:
        for t in lst:
            if not cpu_paths(t.device) or t.dtype != dtype or not t.is_contiguous():
                return None
    products: list[Tensor] = []

    def dot_chunks(flats: Sequence[Tensor]) -> None:
        n = flats[0].numel()
        for start in range(0, n, CPU_DOT_NUMEL):
            views = flats if n <= CPU_DOT_NUMEL else [f[start:start + CPU_DOT_NUMEL] for f in flats]
            products.extend(views[a].dot(views[b]) for a, b in pairs)

    small = []
    for items in zip(*lists):
        if items[0].numel() < CPU_DOT_MIN_NUMEL:
            small.append(items)
        else:
            dot_chunks([t.view(-1) for t in items])
    if small:
        for block in cache_blocks(*(list(col) for col in zip(*small))):
            packed = []
            for slot, tensors in enumerate(block):
                flat, views = scratch.views(tensors, slot)  # type: ignore[arg-type]
                torch._foreach_copy_(views, list(tensors))  # type: ignore[arg-type]
                packed.append(flat)
            dot_chunks(packed)
    if not products:  # every tensor is empty
        return torch.zeros(len(pairs), dtype=dtype)
    return torch.stack(products).view(-1, len(pairs)).sum(0)


def total_dots(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]], dtype: torch.dtype,
               device: torch.device, scratch: Scratch) -> Tensor:
    """The sums of :func:`chunked_dots` where it applies (CPU), else batched multi-tensor
    reductions (:func:`total_dot`, :func:`total_sum_of_squares` for a pair ``(a, a)``)."""
    dots = chunked_dots(lists, pairs, dtype, scratch)
    if dots is not None:
        return dots
    return torch.stack([total_sum_of_squares(lists[a], dtype, device) if a == b
                        else total_dot(lists[a], lists[b], dtype, device) for a, b in pairs])
