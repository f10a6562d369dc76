r"""D-Adaptation: SGD, Adam and AdaGrad whose step size is learned from a lower bound on the distance to the solution.

Paper: A. Defazio and K. Mishchenko, "Learning-Rate-Free Learning by D-Adaptation",
ICML 2023, arXiv:2301.07733. The idea: for a convex function, the weighted sum of the
gradients seen so far, :math:`s`, and the dot products :math:`\langle g_k, s_k\rangle` give
a *lower bound* :math:`\hat d` on :math:`D = \|x_0 - x_*\|`; the step size is set from the
running maximum :math:`d` of those bounds, which therefore only grows, starting from a tiny
``d0``.

Reference implementation matched: ``dadaptation`` 3.2 (the authors' package,
``DAdaptSGD``, ``DAdaptAdam``, ``DAdaptAdaGrad``): same arguments, defaults and update,
parameter for parameter to a relative 1e-10 over hundreds of steps in float64
(``tests/test_parity_dadapt.py``) wherever the reference accepts the inputs. Where tuneless
differs on purpose, the class docstrings say so and ``tests/test_dadapt.py`` covers it. The
differences common to the three classes:

* **Per-group lr.** A group's ``lr`` multiplies the shared d (group B with ``lr=0.1`` moves
  0.1x as far as group A at the first step); the reference refuses groups whose lrs differ
  (other than 0). With equal lrs the two agree.
* **A group with lr = 0 is frozen**: it neither moves nor updates its buffers nor adds to the
  statistics of d (the reference skips its statistics too but still moves it, through
  momentum or a stale first moment). A step in which no group with lr > 0 has a gradient
  changes nothing, not even the step counter (the reference returns early in most such cases).
* **Per-group weight decay** (the reference's SGD reads group 0's for every group), and
  ``p.grad`` is never modified (the reference adds the coupled weight decay into it).
* **No early return.** The reference returns before the step, and before its all-reduce,
  when the norm of :math:`s` is 0; here every step reaches the one
  :meth:`~tuneless.optim.base.TunelessOptimizer._global_sum`, so sharded ranks cannot hang.
* **"Nothing moved" is decided globally.** Whether a step moved anything (some group with
  lr > 0 has a gradient on *some* rank) travels in the step's one all-reduce, and d, the other
  shared scalars and the step counter ``k`` (a 0-d tensor) change only when it did, through
  ``torch.where``: a rank whose shard has no gradient at all on a step (sharding by hand, a
  frozen layer) stays identical to the others. Only the first step of DAdaptSGD, where
  :math:`\|g_0\|` is measured, needs a host-side decision: under a multi-process reduction it
  is the first step with some lr > 0 (if no rank has a gradient then, :math:`\|g_0\| = 1`).
* **d never decreases and never becomes NaN**: :math:`d \leftarrow \max(d, \min(\hat d,
  \text{growth\_rate}\cdot d))`, and an estimate that is not finite (0/0 when the norms
  underflow with tiny gradients, an overflow, a NaN gradient) is ignored.
* **Zero host syncs** per step (the reference reads 2 to 5 scalars per tensor with
  ``.item()``); d and the other shared scalars are 0-d tensors on the parameters' device.
  One exception: with ``skip_nonfinite``, DAdaptSGD's step that measures :math:`\|g_0\|` (the
  first) reads whether it was finite, so that a skipped first step leaves :math:`\|g_0\|` to
  the next one. Sharded parameters are handled by the base class: there is no
  ``fsdp_in_use`` argument (and no ``log_every``: the learned step size is published as
  ``group["effective_lr"]``).
* Sparse gradients are refused (the reference's DAdaptAdaGrad accepts them; that path is not
  kept).
* **d0 for 16-bit parameters**: by default (``d0=None``) 1e-3 when any parameter is bfloat16 or
  float16, where the reference's 1e-6 gives first updates that round away (x stays at or near
  :math:`x_0`, so the estimate, and d, barely grow); 1e-6, as in the reference, otherwise.
* **A step with a gradient that is not finite is skipped** (``skip_nonfinite=True``, the
  default): parameters, buffers, d, the sums, ``k`` and the published ``effective_lr`` stay
  exactly as they were (the reference lets the NaN through, as ``skip_nonfinite=False`` does).
  The step computes from zero gradients and gates, on the device, whatever a zero gradient would
  still change (decay factors, decoupled weight decay, Adam's step, the momentum average, the
  shared scalars).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _validate as v
from ..errors import InvalidArgumentError
from ._batched import (Scratch, cpu_paths, _sum_stacked, add_scaled_, cache_blocks, coefficient, coefficient_dtype,
                       flat_abs_sum, flat_dot, flat_sum_of_squares, total_abs_sum, total_dot, total_sum_of_squares)
from ._fused import FusedKernel
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, local_tensor, lr_is_zero, lr_moves

__all__ = ["DAdaptSGD", "DAdaptAdam", "DAdaptAdaGrad"]


# ============================================================================= shared machinery


class _DAdaptBase(TunelessOptimizer):
    """What the three D-Adaptation classes share: the shared scalars, option checks, the d rule."""

    #: Options that drive the one shared estimate of d: identical in every param group.
    _SHARED_OPTIONS: ClassVar[tuple[str, ...]] = ("d0", "growth_rate")
    #: Scalars shared by the whole optimizer (0-d tensors), stored identically in every group,
    #: with their initial value (None: ``d0``). ``k`` counts the steps that moved something.
    _SCALARS: ClassVar[dict[str, float | None]] = {"d": None, "k": 0.0}
    #: Host-side values shared by every group (plain Python values), with their initial value.
    _HOST_VALUES: ClassVar[dict[str, Any]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: its values are checked, and the shared ones must equal group 0's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        self._check_hyperparameters(type(self).__name__, group)
        first = self.param_groups[0]
        if group["d0"] is None and first["d0"] is not None:
            group["d0"] = first["d0"]  # a group added after the construction: the d0 chosen then
        for key in self._SHARED_OPTIONS:
            if key == "d0" and None in (group[key], first[key]):
                continue  # under construction: checked (and chosen) by _resolve_d0 once every group is in
            if group[key] != first[key]:
                raise InvalidArgumentError(
                    f"{type(self).__name__}: {key} = {group[key]!r} in param group {len(self.param_groups) - 1} "
                    f"differs from {first[key]!r} in group 0; the estimate of d is shared, so {key} must be "
                    f"the same in every group"
                )
        # A group added after some steps takes the shared scalars of the others.
        source = next((g for g in self.param_groups if "d" in g), None)
        if source is not None and source is not group:
            for key in (*self._SCALARS, *self._HOST_VALUES):
                group[key] = source[key]

    def _resolve_d0(self) -> None:
        """``d0=None`` (in the defaults or in a group), at the end of the construction: chosen from
        the parameters' dtypes (:func:`_default_d0`), or the number given in some group. The groups
        then hold a number (``state_dict`` saves it); the defaults keep None, so that a group added
        later takes group 0's value (see :meth:`add_param_group`)."""
        given = [(i, g["d0"]) for i, g in enumerate(self.param_groups) if g["d0"] is not None]
        for i, value in given:
            if value != given[0][1]:
                raise InvalidArgumentError(
                    f"{type(self).__name__}: d0 = {value!r} in param group {i} differs from {given[0][1]!r} in "
                    f"group {given[0][0]}; the estimate of d is shared, so d0 must be the same in every group"
                )
        d0 = given[0][1] if given else _default_d0(p for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            group["d0"] = d0

    @staticmethod
    def _check_hyperparameters(owner: str, h: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _shared_scalars(self) -> dict[str, Tensor]:
        """The shared scalars as 0-d tensors on the parameters' device (created at the first step)."""
        dtype, device = self._stat_dtype(), self._stat_device()
        first = self.param_groups[0]
        if "d" not in first:
            for group in self.param_groups:
                for key, init in self._SCALARS.items():
                    group[key] = float(first["d0"] if init is None else init)
                group.update(self._HOST_VALUES)
        out = {}
        for key in self._SCALARS:
            value = first[key]
            if isinstance(value, Tensor):  # also moves scalars loaded from a checkpoint elsewhere
                out[key] = value.to(device=device, dtype=dtype)
            else:  # a number: the first step, or a checkpoint that stored a plain int k
                out[key] = torch.tensor(float(value), dtype=dtype, device=device)
        return out

    def _store_shared(self, old: dict[str, Tensor], new: dict[str, Tensor], moved: Tensor) -> None:
        """Store ``new`` where ``moved`` (a 0-d bool tensor, the same on every rank), else keep ``old``;
        ``k`` advances by one when ``moved``. A step that is not finite moved nothing. No host sync."""
        finite = self._step_finite()
        if finite is not None:
            moved = moved & finite.to(moved.device)
        values = {key: torch.where(moved, new.get(key, value), value) for key, value in old.items()}
        values["k"] = old["k"] + moved.to(old["k"].dtype)
        for group in self.param_groups:
            group.update(values)

    def _publish(self, group: dict[str, Any], value: Tensor) -> None:
        """Publish the group's step size; a step that is not finite keeps the one published before."""
        finite, old = self._step_finite(), group.get(STEP_SIZE_KEY)
        if finite is not None and isinstance(old, Tensor):
            value = torch.where(finite.to(value.device), value, old.to(device=value.device, dtype=value.dtype))
        self._publish_step_size(group, value)

    def _reduces_across_processes(self) -> bool:
        """Whether the statistics are summed over other processes (then a local "nothing here"
        says nothing about the other ranks)."""
        from .. import distributed as _dist  # local import: torch.distributed is optional

        return _dist.reduction_group(self) is not None

    def _check_shared_options(self) -> None:
        """Raise if a shared option was changed in one group only (after construction)."""
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups[1:], start=1):
            for key in self._SHARED_OPTIONS:
                if group[key] != first[key]:
                    raise InvalidArgumentError(
                        f"{type(self).__name__}: {key} = {group[key]!r} in param group {i} differs from "
                        f"{first[key]!r} in group 0; it must be the same in every group"
                    )


def _grow(d: Tensor, d_hat: Tensor, growth_rate: float) -> Tensor:
    r""":math:`\max(d, \min(\hat d, \text{growth\_rate}\cdot d))`; a non-finite result keeps d."""
    new = torch.maximum(d, torch.minimum(d_hat, d * growth_rate))
    return torch.where(torch.isfinite(new), new, d)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (no NaN from 0/0, no host sync)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _coupled(grads: list[Tensor], xs: list[Tensor], wd: float, foreach: bool,
             finite: Tensor | None = None) -> list[Tensor]:
    """g + wd x in new tensors (coupled weight decay; ``p.grad`` itself is never modified); zeros
    on a step that is not finite (``finite`` False: the new tensors are zeroed in place)."""
    if wd == 0 or not grads:
        return grads
    if foreach:
        out = list(torch._foreach_add(grads, xs, alpha=wd))
    else:
        out = [g.add(x, alpha=wd) for g, x in zip(grads, xs)]
    if finite is not None:
        zero = torch.zeros((), dtype=out[0].dtype, device=out[0].device)
        for t in out:
            torch.where(finite, t, zero, out=t)
    return out


def _gated(finite: Tensor | None, like: Tensor, value: float, skipped: float, cache: dict[Any, Tensor]) -> Any:
    """A number of a vectorized step, for foreach ops on tensors like ``like``: the number itself
    when the step is not checked (``finite`` None, the ops unchanged); else a 0-d tensor in
    :func:`~tuneless.optim._batched.coefficient_dtype` of ``like`` that is ``skipped`` on a step
    that is not finite (a decay factor 1, a step 0: an exact no-op). ``cache`` holds them for
    the blocks of one call."""
    if finite is None:
        return value
    dtype = coefficient_dtype(like)
    key = (value, skipped, dtype, like.device)
    out = cache.get(key)
    if out is None:
        full = torch.full((), value, dtype=dtype, device=like.device)
        out = cache[key] = torch.where(finite.to(like.device), full, torch.full_like(full, skipped))
    return out


def _checked(finite: Tensor | None, device: torch.device) -> Tensor:
    """The step's finiteness flag for the per-parameter functions and the kernels: True when the
    step is not checked (``skip_nonfinite=False``: ``where(True, new, old)`` is ``new``)."""
    return torch.ones((), dtype=torch.bool, device=device) if finite is None else finite


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: sums of squares that must neither underflow nor overflow."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_common(owner: str, h: dict[str, Any]) -> None:
    h["lr"] = v.check_lr(owner, h["lr"], recommended=1.0)
    v.check_range(owner, "weight_decay", h["weight_decay"], 0.0, None, inclusive="[)", recommended=0.0)
    v.check_optional_range(owner, "d0", h["d0"], 0.0, None, inclusive="()", recommended=1e-6)
    rate = h["growth_rate"]
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 1):  # NaN fails too
        v.fail(owner, "growth_rate", rate, "1 <= growth_rate (inf: no limit)", math.inf)


#: d0 = None: the paper's start, and the one for 16-bit parameters, whose first updates (~d0 per
#: coordinate) must not round away (bfloat16's spacing is 2^-8 relative to the weight).
_D0_DEFAULT, _D0_LOW_PRECISION = 1e-6, 1e-3
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _default_d0(params: Any) -> float:
    """d0 for ``d0=None``: 1e-3 when any parameter is 16-bit (bfloat16/float16), else 1e-6."""
    return _D0_LOW_PRECISION if any(p.dtype in _LOW_PRECISION for p in params) else _D0_DEFAULT


# ============================================================================= DAdaptSGD


class DAdaptSGD(_DAdaptBase):
    r"""SGD with D-Adaptation: dual averaging whose step size is learned (Defazio & Mishchenko, 2023).

    With :math:`\gamma` the group's ``lr``, :math:`\lambda` its ``weight_decay``,
    :math:`\beta` its ``momentum`` and :math:`g_0` the first gradient (all parameters),
    step :math:`k` is

    .. math::
        \tilde g_k &= \nabla f(x_k) + \lambda x_k, \qquad
        \eta_k = d_k\,\gamma / \|g_0\| \quad\text{(published as ``effective_lr``)} \\
        r_{k+1} &= r_k + \eta_k \langle \tilde g_k, s_k\rangle, \qquad
        s_{k+1} = s_k + \eta_k \tilde g_k \\
        \hat d_{k+1} &= 2\, r_{k+1} / \|s_{k+1}\|_2, \qquad
        d_{k+1} = \max\big(d_k,\ \min(\hat d_{k+1},\ \text{growth\_rate}\cdot d_k)\big) \\
        z_{k+1} &= x_0 - s_{k+1}, \qquad x_{k+1} = \beta x_k + (1-\beta) z_{k+1}

    where :math:`r_0 = 0`, :math:`s_0 = 0`, :math:`d_0` = ``d0``, and the inner products and
    norms run over every parameter of every group. With ``momentum=0`` this is plain dual
    averaging, :math:`x_{k+1} = x_0 - s_{k+1} = x_k - \eta_k\tilde g_k`.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size (default 1.0; leave it unless the training is
            unstable). torch lr schedulers drive it; it may differ between param groups.
        momentum: :math:`\beta`, primal averaging of the dual-averaging iterates (default 0.0,
            as in the reference; 0.9 is the usual choice for deep networks), per group.
        weight_decay: coupled L2 penalty :math:`\lambda`, per group (default 0.0).
        d0: initial estimate of d (default None: 1e-6, the paper's and the reference's value,
            when every parameter is 32- or 64-bit, and 1e-3 when any parameter of the
            optimizer is 16-bit, bfloat16 or float16). The first update has norm d0 times lr
            (:math:`\eta_0 g_0 = d_0\gamma\, g_0/\|g_0\|`) and d grows only from the distance
            the updates travel: they must be representable in the parameters' dtype. In bfloat16
            (a spacing of :math:`2^{-8}` to :math:`2^{-7}` relative to the weight) most coordinates
            of a 1e-6 step round away, x barely leaves :math:`x_0` and d grows late (a bfloat16
            MLP's loss ratio after 20 steps: 0.987 with 1e-6, 0.433 with 1e-3).
            The choice is made once, at construction, from the parameters given then, and
            stored as a number in every param group (``group["d0"]``, saved by ``state_dict``); a
            group added later takes group 0's value. A number is used as given
            (with 32-bit parameters it rarely needs changing).
        growth_rate: the most d may grow per step, a factor >= 1 (default inf: no limit;
            1.02 gives a kind of warm-up).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.DAdaptSGD([x])
        >>> for _ in range(50):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> bool(opt.param_groups[0]["d"] > 1e-3)   # d grew from 1e-6 towards ||x0 - x*|| = 5
        True

    References:
        A. Defazio, K. Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
        arXiv:2301.07733. Reference implementation: ``dadaptation`` 3.2 (``DAdaptSGD``).

    Deliberate differences from ``dadaptation`` 3.2, besides those of the module docstring:

    * **Memory.** With ``momentum=0`` the state is :math:`s` only (one copy of the
      parameters; the update :math:`x_k - \eta_k\tilde g_k` equals :math:`x_0 - s_{k+1}`); with
      momentum it is :math:`s` and :math:`x_0` (two copies). The reference keeps three
      (:math:`z`, :math:`s`, :math:`x_0`).
    * :math:`\|g_0\|` is measured in float64 over every parameter that has a gradient, whatever
      its group's lr, at the first step that moves (some group with lr > 0 has a gradient). The
      reference sums in the
      gradients' dtype (float32 gradients of ~1e-30 underflow to :math:`\|g_0\| = 0` and it
      raises ``ZeroDivisionError``), skips groups whose lr is 0, and raises when every lr is
      0 at the first step (a warm-up from 0). If the first gradient is exactly zero,
      :math:`\|g_0\| = 1` is used (the reference raises ``ZeroDivisionError``). As in the
      reference, :math:`\|g_0\|` is the norm of the loss's gradient, without the weight-decay
      term. The step that measures it is the one step that reads a value on the host (with
      ``skip_nonfinite``): whether its gradients were finite; if not, nothing is measured and
      the next step measures (and reads) again.

    .. warning:: d only grows. If training diverges after d has risen, lower ``lr`` or set
       ``growth_rate``. Coupled weight decay costs one gradient-sized temporary per step, since
       ``p.grad`` is left as it is.
    """

    registry_name = "dadapt_sgd"
    learning_rate_free = True
    _SCALARS = {"d": None, "k": 0.0, "numerator_weighted": 0.0, "g0_norm": 0.0}
    #: Whether ||g0|| has been measured (a host-side flag: it decides which reduction a step makes).
    _HOST_VALUES = {"g0_measured": False}

    def __init__(self, params: Any, lr: float = 1.0, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 d0: float | None = None, growth_rate: float = math.inf, foreach: bool | None = None,
                 skip_nonfinite: bool = True) -> None:
        v.check_bool(type(self).__name__, "skip_nonfinite", skip_nonfinite)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, d0=d0, growth_rate=growth_rate,
                        foreach=foreach, skip_nonfinite=skip_nonfinite)
        self._check_hyperparameters(type(self).__name__, defaults)
        super().__init__(params, defaults)
        self._resolve_d0()

    @staticmethod
    def _check_hyperparameters(owner: str, h: dict[str, Any]) -> None:
        _check_common(owner, h)
        v.check_range(owner, "momentum", h["momentum"], 0.0, 1.0, inclusive="[)", recommended=0.9)

    def _init_state(self, p: Tensor, momentum: float) -> dict[str, Any]:
        """The per-parameter buffers, created at the parameter's first step."""
        state = self.state[p]
        if "s" not in state:
            # s: the sum of the weighted gradients, eta_i * g_i (x = x0 - s without momentum).
            state["s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if momentum > 0 and "x0" not in state:
            # x0: the dual-averaging origin, z = x0 - s (only kept with momentum). Equal to x + s
            # when the parameter has so far moved without momentum (x = x0 - s).
            state["x0"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            local_tensor(state["x0"]).copy_(local_tensor(p)).add_(local_tensor(state["s"]))
        return state

    def _update(self, loss: Tensor | None) -> None:
        self._check_shared_options()
        dtype, device = self._stat_dtype(), self._stat_device()
        scalars = self._shared_scalars()
        first = self.param_groups[0]
        d, g0 = scalars["d"], scalars["g0_norm"]
        finite = self._step_finite()  # None: not checked
        per_group = [self._params_with_grad(group) for group in self.param_groups]
        active = [not lr_is_zero(group["lr"]) for group in self.param_groups]  # a tensor lr: on, see lr_is_zero
        stepped = any(on and grads for on, (_, grads) in zip(active, per_group))  # something moves here
        moved_here = torch.zeros((), dtype=dtype, device=device)  # on the device: a tensor lr may be 0
        for on, group, (_, grads) in zip(active, self.param_groups, per_group):
            if on and grads:
                moved_here = torch.maximum(moved_here, lr_moves(group["lr"], moved_here))
        measured = first.get("g0_measured")
        if measured is None:  # a checkpoint of an earlier version (plain int k): one sync, once
            measured = bool(float(scalars["k"]) > 0)

        if not measured:
            # ||g0|| over every gradient, summed in float64 (no underflow), then the step size's unit.
            wide = _wide_dtype(device)
            partial = torch.zeros((), dtype=wide, device=device)
            for group, (_, grads) in zip(self.param_groups, per_group):
                if not grads:
                    continue
                if self._use_foreach(group):
                    partial = partial + _sum_stacked(list(torch._foreach_powsum(grads, 2, dtype=wide)), wide, device)
                else:
                    partial = partial + _sum_stacked([torch.linalg.vector_norm(g, dtype=wide) ** 2 for g in grads],
                                                   wide, device)
            g0_sq, moved = self._global_sum(torch.stack([partial, moved_here.to(wide)])).unbind(0)
            g0_new = g0_sq.sqrt().to(dtype)
            g0_new = torch.where((g0_new > 0) & torch.isfinite(g0_new), g0_new, torch.ones_like(g0_new))
            # Measured at the first step that moves. With other processes in the reduction, this
            # rank cannot know whether one of them has a gradient: the first step with some lr > 0
            # counts (||g0|| = 1 if none had one). Alone, a step without gradients waits.
            g0 = g0_new  # (nothing moves with it when no rank has a gradient)
            just_measured = stepped or (any(active) and self._reduces_across_processes())
            if just_measured and finite is not None:
                # The one host read of a checked run (the first step may read): a step that is not
                # finite measures nothing (it moves nothing, with zero gradients and the momentum
                # gated), and the next step measures again. Every rank reads the same flag.
                just_measured = bool(finite)

        numerator = torch.zeros((), dtype=dtype, device=device)
        s_sq = torch.zeros((), dtype=dtype, device=device)
        for group, (params, grads), on in zip(self.param_groups, per_group, active):
            step_size = d * (group["lr"] / g0)  # eta_k for this group
            self._publish(group, step_size if on else torch.zeros_like(step_size))
            if not on or not params:
                continue  # lr = 0: the group is frozen
            momentum = group["momentum"]
            states = [self._init_state(p, momentum) for p in params]
            xs = [local_tensor(p) for p in params]
            foreach = self._use_foreach(group)
            # A step that is not finite computes from zero gradients (zeroed after the coupled decay).
            if foreach:
                impl, extra = _multi_tensor_dadapt_sgd, dict(scratch=self._scratch(), finite=finite)
                if group["weight_decay"] == 0:
                    grads = self._finite_grads(grads)
            else:
                impl, extra = _single_tensor_dadapt_sgd, dict(finite=_checked(finite, device))
            dot, sq = impl(xs, grads, states, step_size=step_size, weight_decay=group["weight_decay"],
                           momentum=momentum, with_stats=measured, dtype=dtype, device=device, **extra)
            numerator = numerator + step_size * dot
            s_sq = s_sq + sq

        new: dict[str, Tensor] = {}
        if measured:
            # One reduction per step, always reached (no early return: no hang when sharded). At
            # the first step it is ||g0||'s, and d cannot change then (s_0 = 0, so r_1 = 0).
            numerator, s_sq, moved = self._global_sum(torch.stack([numerator, s_sq, moved_here])).unbind(0)
            r = scalars["numerator_weighted"] + numerator
            new.update(numerator_weighted=r, d=_grow(d, _ratio(2 * r, s_sq.sqrt()), first["growth_rate"]))
        self._store_shared(scalars, new, moved > 0)
        if not measured and just_measured:
            for group in self.param_groups:
                group.update(g0_norm=g0, g0_measured=True)

def _single_tensor_dadapt_sgd(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                              step_size: Tensor, weight_decay: float, momentum: float, with_stats: bool,
                              dtype: torch.dtype, device: torch.device, finite: Tensor) -> tuple[Tensor, Tensor]:
    """One tensor at a time: s += eta g, x moves; returns sum <g, s_old> and sum ||s_new||^2.

    ``finite`` False (a 0-d bool tensor): the gradient is taken as 0, so s and x (without
    momentum) stay; the momentum average is kept by a select."""
    dots, sqs = [], []
    for x, g, state in zip(xs, grads, states):
        if weight_decay != 0:
            g = g.add(x, alpha=weight_decay)  # coupled weight decay, p.grad untouched
        g = torch.where(finite, g, 0.0)
        s = local_tensor(state["s"])
        eta = coefficient(step_size, s)
        if with_stats:
            dots.append((g * s).sum())
        s.add_(g * eta)
        if with_stats:
            sqs.append(s.pow(2).sum())
        if momentum == 0:
            x.sub_(g * eta)  # = x0 - s
        else:
            ck = 1 - momentum
            z = local_tensor(state["x0"]) - s
            x.copy_(torch.where(finite, x.mul(1 - ck).add_(z, alpha=ck), x))
    return _sum_stacked(dots, dtype, device), _sum_stacked(sqs, dtype, device)


def _multi_tensor_dadapt_sgd(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                             step_size: Tensor, weight_decay: float, momentum: float, with_stats: bool,
                             dtype: torch.dtype, device: torch.device, scratch: Scratch,
                             finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_single_tensor_dadapt_sgd` over all tensors at once (foreach ops, batched sums).

    On the CPU, block by block (cache-sized), the sums through the reused scratch buffer; no
    temporary of the parameters' size, except the coupled-decay gradients (block-sized on CPU).

    ``finite`` False: ``grads`` are zeros (the coupled-decay gradients are zeroed here), so s
    and x (without momentum) stay; the momentum's weight is 0 (``lerp`` by 0, an added 0).
    """
    dot = torch.zeros((), dtype=dtype, device=device)
    sq = torch.zeros((), dtype=dtype, device=device)
    ss = [local_tensor(st["s"]) for st in states]
    x0s = [local_tensor(st["x0"]) for st in states] if momentum != 0 else None
    gates: dict[Any, Tensor] = {}
    for xb, gb, sb, x0b in cache_blocks(xs, grads, ss, x0s):
        cpu = cpu_paths(sb[0].device)
        gb = _coupled(gb, xb, weight_decay, True, finite)
        eta = coefficient(step_size, sb[0])
        if with_stats:
            dot = dot + (flat_dot(gb, sb, scratch, dtype) if cpu else total_dot(gb, sb, dtype, device))
        add_scaled_(sb, gb, eta)
        if with_stats:
            sq = sq + (flat_sum_of_squares(sb, scratch, dtype) if cpu else total_sum_of_squares(sb, dtype, device))
        if momentum == 0:
            add_scaled_(xb, gb, -eta)
        elif finite is None:
            ck = 1 - momentum
            torch._foreach_lerp_(xb, x0b, ck)       # (1-ck) x + ck x0
            torch._foreach_add_(xb, sb, alpha=-ck)  # - ck s
        else:  # the same, ck 0 on a step that is not finite
            ck = _gated(finite, xb[0], 1 - momentum, 0.0, gates)
            torch._foreach_lerp_(xb, x0b, [ck] * len(xb))
            add_scaled_(xb, sb, -ck)
    return dot, sq


# ============================================================================= DAdaptAdam


class DAdaptAdam(_DAdaptBase):
    r"""Adam with D-Adaptation: Adam whose step size :math:`d\cdot\mathrm{lr}` is learned (Defazio & Mishchenko, 2023).

    With :math:`\gamma` the group's ``lr``, :math:`c_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction`` (else 1) and :math:`\eta_k = d_k\,\gamma\,c_k` (published as
    ``effective_lr``), step :math:`k` is

    .. math::
        r_k^{+} &= \eta_k \big\langle g_k,\ s_k / (\sqrt{v_k} + \epsilon)\big\rangle
            \quad\text{(with the previous } s, v) \\
        m_{k+1} &= \beta_1 m_k + (1-\beta_1)\,\eta_k\, g_k, \qquad
        v_{k+1} = \beta_2 v_k + (1-\beta_2)\, g_k^2, \qquad
        s_{k+1} = \sqrt{\beta_2}\, s_k + (1-\sqrt{\beta_2})\,\eta_k\, g_k \\
        r_{k+1} &= \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\, r_k^{+}, \qquad
        \hat d_{k+1} = \frac{r_{k+1}}{(1-\sqrt{\beta_2})\,\|s_{k+1}\|_1}, \qquad
        d_{k+1} = \max\big(d_k,\ \min(\hat d_{k+1},\ \text{growth\_rate}\cdot d_k)\big) \\
        x_{k+1} &= x_k - \eta_k\lambda x_k - m_{k+1} / (\sqrt{v_{k+1}} + \epsilon)

    where the inner products and :math:`\|s\|_1` run over every parameter of every group.
    :math:`\lambda` is the decoupled weight decay (``decouple=True``); with
    ``decouple=False`` (the default, as in the reference) it is coupled instead:
    :math:`g_k \leftarrow g_k + \lambda x_k` everywhere and no decay term. The first moment
    holds the step size (:math:`m` is an average of :math:`\eta g`), so an lr schedule acts
    through it, as in the reference.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size (default 1.0; leave it unless the training is
            unstable). torch lr schedulers drive it; it may differ between param groups.
        betas: Adam's coefficients (default (0.9, 0.999)), the same in every group.
        eps: added to :math:`\sqrt{v}` (default 1e-8), per group.
        weight_decay: :math:`\lambda`, per group (default 0.0).
        decouple: AdamW-style decoupled weight decay (True) or coupled L2 (default False, as in
            the reference), per group.
        use_bias_correction: Adam's bias correction in the step size (default False, as in the
            reference; True is recommended by its authors for some tasks).
        d0: initial estimate of d (default None: 1e-6, the paper's and the reference's value,
            when every parameter is 32- or 64-bit, and 1e-3 when any parameter of the
            optimizer is 16-bit, bfloat16 or float16). The first updates are about d0 times lr per
            coordinate (Adam's normalized step) and d grows only from the distance they travel:
            they must be representable in the parameters' dtype. In bfloat16 (a spacing of
            :math:`2^{-8}` to :math:`2^{-7}` relative to the weight) a 1e-6 update rounds away
            on most weights and d grows late (a bfloat16 MLP's loss ratio after 20 steps: 0.961
            with 1e-6, 0.345 with 1e-3).
            The choice is made once, at construction, from the parameters given then, and
            stored as a number in every param group (``group["d0"]``, saved by ``state_dict``); a
            group added later takes group 0's value. A number is used as given
            (with 32-bit parameters it rarely needs changing).
        growth_rate: the most d may grow per step, a factor >= 1 (default inf: no limit;
            1.02 gives a kind of warm-up).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: one compiled single-pass kernel per group of tensors instead of the vectorized
            chain (default False): 2-3x faster on a CPU, at the cost of compiling it at the
            first step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.DAdaptAdam([x])
        >>> for _ in range(100):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> bool(opt.param_groups[0]["d"] > 1e-3)
        True

    References:
        A. Defazio, K. Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
        arXiv:2301.07733. Reference implementation: ``dadaptation`` 3.2 (``DAdaptAdam``).

    Deliberate differences from ``dadaptation`` 3.2, besides those of the module docstring:

    * The reference's per-group ``layer_scale`` is not kept: give the group its own ``lr``
      (the reference added ``layer_scale`` because it refuses different lrs).
    * ``betas``, ``use_bias_correction``, ``d0`` and ``growth_rate`` must be the same in every
      group (an error otherwise; the reference silently reads group 0's).
    * No early return when :math:`\|s\|_1 = 0`: the step counter of the bias correction always
      advances and decoupled weight decay applies even while every gradient is zero.

    .. warning:: d only grows. If training diverges after d has risen, lower ``lr`` or set
       ``growth_rate``. With gradients much smaller than ``eps`` the steps and the estimate
       stay tiny (as in the reference): d then stays near ``d0``. Coupled weight decay costs
       one gradient-sized temporary per step, as in ``torch.optim.Adam``.
    """

    registry_name = "dadapt_adam"
    learning_rate_free = True
    _SHARED_OPTIONS = ("betas", "use_bias_correction", "d0", "growth_rate")
    _SCALARS = {"d": None, "k": 0.0, "numerator_weighted": 0.0}

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = False,
                 use_bias_correction: bool = False, d0: float | None = None, growth_rate: float = math.inf,
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        decouple=decouple, use_bias_correction=use_bias_correction, d0=d0,
                        growth_rate=growth_rate, foreach=foreach, fused=fused, skip_nonfinite=skip_nonfinite)
        self._check_hyperparameters(owner, defaults)
        super().__init__(params, defaults)
        self._resolve_d0()

    @staticmethod
    def _check_hyperparameters(owner: str, h: dict[str, Any]) -> None:
        _check_common(owner, h)
        v.check_betas(owner, "betas", h["betas"], recommended=(0.9, 0.999))
        v.check_range(owner, "eps", h["eps"], 0.0, None, inclusive="()", recommended=1e-8)
        v.check_bool(owner, "decouple", h["decouple"])
        v.check_bool(owner, "use_bias_correction", h["use_bias_correction"])
        v.check_bool(owner, "fused", h["fused"])

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        """The per-parameter buffers, created at the parameter's first step."""
        state = self.state[p]
        if "s" not in state:
            # s: the exponential moving sum of the weighted gradients, whose l1 norm is d-hat's denominator.
            state["s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Exponential moving average of the gradients times the step size (m).
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Exponential moving average of the squared gradients (v).
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self, loss: Tensor | None) -> None:
        self._check_shared_options()
        dtype, device = self._stat_dtype(), self._stat_device()
        scalars = self._shared_scalars()
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        sqrt_beta2 = beta2 ** 0.5
        k = scalars["k"]  # a 0-d tensor: the bias correction needs no host sync
        bias_correction = ((1 - beta2 ** (k + 1)).sqrt() / (1 - beta1 ** (k + 1))
                           if first["use_bias_correction"] else 1.0)
        d = scalars["d"]
        finite = self._step_finite()  # None: not checked
        numerator = torch.zeros((), dtype=dtype, device=device)
        s_l1 = torch.zeros((), dtype=dtype, device=device)
        moved_here = torch.zeros((), dtype=dtype, device=device)  # some group with lr != 0 has a gradient
        for group in self.param_groups:
            on = not lr_is_zero(group["lr"])  # a tensor lr: on (its step size is 0 when it is 0)
            step_size = d * (group["lr"] * bias_correction)  # eta_k for this group
            self._publish(group, step_size if on else torch.zeros_like(step_size))
            params, grads = self._params_with_grad(group)
            if not on or not params:
                continue  # lr = 0: the group is frozen
            moved_here = torch.maximum(moved_here, lr_moves(group["lr"], moved_here))
            states = [self._init_state(p) for p in params]
            xs = [local_tensor(p) for p in params]
            # A step that is not finite computes from zero gradients (zeroed after the coupled decay)
            # and gates the decay factors and the step (see the implementations).
            if group["fused"]:
                impl, extra = _fused_dadapt_adam, dict(finite=_checked(finite, device))
            elif self._use_foreach(group):
                impl, extra = _multi_tensor_dadapt_adam, dict(scratch=self._scratch(), finite=finite)
                if group["weight_decay"] == 0 or group["decouple"]:
                    grads = self._finite_grads(grads)
            else:
                impl, extra = _single_tensor_dadapt_adam, dict(finite=_checked(finite, device))
            dot, l1 = impl(xs, grads, states, step_size=step_size, beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], decouple=group["decouple"], dtype=dtype, device=device, **extra)
            numerator = numerator + step_size * dot
            s_l1 = s_l1 + l1

        # One reduction per step, always reached (no early return: no hang when sharded); whether
        # anything moved on any rank travels with it.
        numerator, s_l1, moved = self._global_sum(torch.stack([numerator, s_l1, moved_here])).unbind(0)
        r = sqrt_beta2 * scalars["numerator_weighted"] + (1 - sqrt_beta2) * numerator
        d_hat = _ratio(r, (1 - sqrt_beta2) * s_l1)
        # Nothing moved anywhere: d, the numerator and the step counter stay.
        self._store_shared(scalars, dict(d=_grow(d, d_hat, first["growth_rate"]), numerator_weighted=r), moved > 0)


def _single_tensor_dadapt_adam(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                               step_size: Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                               decouple: bool, dtype: torch.dtype, device: torch.device,
                               finite: Tensor) -> tuple[Tensor, Tensor]:
    """One tensor at a time: the moments, s and the step; returns sum <g, s/(sqrt(v)+eps)> and sum ||s||_1.

    ``finite`` False (a 0-d bool tensor): the gradient is taken as 0 and every write keeps the
    old value (a select: with a zero gradient the moments would still decay and x still step)."""
    sqrt_beta2 = beta2 ** 0.5
    dots, l1s = [], []
    for x, g, state in zip(xs, grads, states):
        if weight_decay != 0 and not decouple:
            g = g.add(x, alpha=weight_decay)  # coupled weight decay, p.grad untouched
        g = torch.where(finite, g, 0.0)
        s, m, u = (local_tensor(state[key]) for key in ("s", "exp_avg", "exp_avg_sq"))
        eta = coefficient(step_size, s)
        dots.append((g * s.div(u.sqrt().add(eps))).sum())  # the previous s and v
        m.copy_(torch.where(finite, m.mul(beta1).add_(g * (eta * (1 - beta1))), m))
        u.copy_(torch.where(finite, u.mul(beta2).addcmul_(g, g, value=1 - beta2), u))
        s.copy_(torch.where(finite, s.mul(sqrt_beta2).add_(g * (eta * (1 - sqrt_beta2))), s))
        l1s.append(s.abs().sum())
        new_x = x.mul(1 - weight_decay * eta) if weight_decay != 0 and decouple else x
        x.copy_(torch.where(finite, new_x.addcdiv(m, u.sqrt().add(eps), value=-1), x))
    return _sum_stacked(dots, dtype, device), _sum_stacked(l1s, dtype, device)


def _multi_tensor_dadapt_adam(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                              step_size: Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                              decouple: bool, dtype: torch.dtype, device: torch.device,
                              scratch: Scratch, finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_single_tensor_dadapt_adam` over all tensors at once (foreach ops, batched sums).

    One temporary at a time, the denominator, as in torch's foreach Adam: 1/(sqrt(v)+eps),
    turned into g s/(sqrt(v)+eps) in place and summed for the inner product, then sqrt(v)+eps
    again with the new v for the step. On the CPU it is the reused scratch buffer of one
    cache-sized block, and the sums are one reduction over it; elsewhere a new tensor list.
    Plus the coupled-decay gradients.

    ``finite`` False: ``grads`` are zeros (the coupled-decay gradients are zeroed here), the
    decay factors beta1, beta2, sqrt(beta2) and the decoupled decay's 1 - lambda eta are 1, and
    the step's denominator is sqrt(v) + inf (m / inf = 0): every buffer and x stay, exactly.
    """
    sqrt_beta2 = beta2 ** 0.5
    dot = torch.zeros((), dtype=dtype, device=device)
    l1 = torch.zeros((), dtype=dtype, device=device)
    ss, ms, us = ([local_tensor(st[key]) for st in states] for key in ("s", "exp_avg", "exp_avg_sq"))
    gates: dict[Any, Tensor] = {}
    for xb, gb, sb, mb, ub in cache_blocks(xs, grads, ss, ms, us):
        cpu = cpu_paths(ub[0].device)
        if not decouple:
            gb = _coupled(gb, xb, weight_decay, True, finite)
        eta = coefficient(step_size, sb[0])
        b1, b2, sqrt_b2 = (_gated(finite, mb[0], beta, 1.0, gates) for beta in (beta1, beta2, sqrt_beta2))
        step_eps = _gated(finite, ub[0], eps, math.inf, gates)
        # <g, s / (sqrt(v) + eps)> with the previous s and v.
        if cpu:
            flat, buf = scratch.views(ub)
            torch._foreach_copy_(buf, ub)
            torch._foreach_sqrt_(buf)
        else:
            buf = torch._foreach_sqrt(ub)
        torch._foreach_add_(buf, eps)
        torch._foreach_reciprocal_(buf)
        torch._foreach_mul_(buf, sb)
        if cpu:
            torch._foreach_mul_(buf, gb)
            dot = dot + flat.sum(dtype=dtype)
        else:
            dot = dot + total_dot(gb, buf, dtype, device)
        torch._foreach_mul_(mb, b1)
        add_scaled_(mb, gb, eta * (1 - beta1))
        torch._foreach_mul_(ub, b2)
        torch._foreach_addcmul_(ub, gb, gb, value=1 - beta2)
        torch._foreach_mul_(sb, sqrt_b2)
        add_scaled_(sb, gb, eta * (1 - sqrt_beta2))
        l1 = l1 + (flat_abs_sum(sb, scratch, dtype) if cpu else total_abs_sum(sb, dtype, device))
        # The step, with the new v: the same buffer now holds sqrt(v) + eps.
        torch._foreach_copy_(buf, ub)
        torch._foreach_sqrt_(buf)
        if finite is None:
            torch._foreach_add_(buf, eps)
        else:  # the List overload with 0-d tensors: the Tensor one reads the number on the host
            torch._foreach_add_(buf, [step_eps] * len(buf))
        if weight_decay != 0 and decouple:
            torch._foreach_mul_(xb, gate(finite, 1 - weight_decay * eta, 1.0))
        torch._foreach_addcdiv_(xb, mb, buf, value=-1)
    return dot, l1


def _dadapt_adam_kernel(x: Tensor, g: Tensor, s: Tensor, m: Tensor, v: Tensor, step_size: Tensor, finite: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float, decouple: bool,
                        sum_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One tensor of :func:`_single_tensor_dadapt_adam`, as the fused kernel compiles it (tensors
    whose entries are all 0 stay 0 and add 0 to both sums: the padding is harmless).

    ``finite`` False: the gradient is taken as 0 and every write keeps the old value (a select,
    free in the compiled kernel)."""
    sqrt_beta2 = beta2 ** 0.5
    eta = step_size.to(coefficient_dtype(x))
    if weight_decay != 0 and not decouple:
        g = g + weight_decay * x
    g = torch.where(finite, g, 0.0)
    dot = (g * s / (v.sqrt() + eps)).sum(dtype=sum_dtype)
    # The same in-place ops as before on new tensors (the compiled code is unchanged), then selected.
    m.copy_(torch.where(finite, m.mul(beta1).add_(g * (eta * (1 - beta1))), m))
    v.copy_(torch.where(finite, v.mul(beta2).addcmul_(g, g, value=1 - beta2), v))
    s.copy_(torch.where(finite, s.mul(sqrt_beta2).add_(g * (eta * (1 - sqrt_beta2))), s))
    l1 = s.abs().sum(dtype=sum_dtype)
    new_x = x.mul(1 - weight_decay * eta) if weight_decay != 0 and decouple else x
    x.copy_(torch.where(finite, new_x.addcdiv(m, v.sqrt() + eps, value=-1), x))
    return dot, l1


_DADAPT_ADAM_KERNEL = FusedKernel(_dadapt_adam_kernel, num_tensors=5, num_sums=2)


def _fused_dadapt_adam(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                       step_size: Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                       decouple: bool, dtype: torch.dtype, device: torch.device,
                       finite: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_single_tensor_dadapt_adam` as one compiled kernel per group of tensors (``fused=True``)."""
    ss, ms, us = ([local_tensor(st[key]) for st in states] for key in ("s", "exp_avg", "exp_avg_sq"))
    dot, l1 = _DADAPT_ADAM_KERNEL([xs, grads, ss, ms, us],
                                  (step_size, finite, beta1, beta2, eps, weight_decay, decouple, dtype),
                                  sum_dtype=dtype, device=device)
    return dot, l1


# ============================================================================= DAdaptAdaGrad


class DAdaptAdaGrad(_DAdaptBase):
    r"""AdaGrad with D-Adaptation: dual-averaged AdaGrad whose step size is learned (Defazio & Mishchenko, 2023).

    With :math:`\gamma` the group's ``lr``, :math:`\lambda` its ``weight_decay``,
    :math:`\beta` its ``momentum`` and :math:`\eta_k = d_k\gamma` (published as
    ``effective_lr``), step :math:`k` is

    .. math::
        \tilde g_k &= \nabla f(x_k) + \lambda x_k, \qquad
        \alpha_{k+1} = \alpha_k + \tilde g_k^2, \qquad
        s_{k+1} = s_k + \eta_k\tilde g_k, \qquad
        a_{k+1} = \sqrt{\alpha_{k+1}} + \epsilon \\
        G_{k+1} &= G_k + \eta_k^2 \sum \tilde g_k^2 / a_{k+1}, \qquad
        \hat d_{k+1} = \frac{\sum s_{k+1}^2 / a_{k+1} - G_{k+1}}{\|s_{k+1}\|_1}, \qquad
        d_{k+1} = \max\big(d_k,\ \min(\hat d_{k+1},\ \text{growth\_rate}\cdot d_k)\big) \\
        z_{k+1} &= x_0 - s_{k+1} / a_{k+1}, \qquad x_{k+1} = \beta x_k + (1-\beta) z_{k+1}

    where :math:`\alpha_0 = 10^{-6}` (coordinate-wise), :math:`s_0 = 0`, :math:`G_0 = 0`, and
    the sums and :math:`\|s\|_1` run over every coordinate of every group.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size (default 1.0). torch lr schedulers drive it;
            it may differ between param groups.
        momentum: :math:`\beta`, primal averaging (default 0.0), per group.
        weight_decay: coupled L2 penalty :math:`\lambda`, per group (default 0.0).
        eps: added to :math:`\sqrt{\alpha}` (default 1e-6), per group.
        d0: initial estimate of d (default None: 1e-6, the paper's and the reference's value,
            when every parameter is 32- or 64-bit, and 1e-3 when any parameter of the
            optimizer is 16-bit, bfloat16 or float16). The first updates are about d0 times lr per
            coordinate (:math:`\eta_0 g_0 / a_1 \approx \eta_0`) and d grows only from the
            distance they travel: they must be representable in the parameters' dtype. In
            bfloat16 (a spacing of :math:`2^{-8}` to :math:`2^{-7}` relative to the weight) a 1e-6
            update rounds away, x stays at :math:`x_0` and d does not grow (a bfloat16 MLP's loss
            is unchanged after 20 steps with 1e-6; its ratio is 0.597 with 1e-3).
            The choice is made once, at construction, from the parameters given then, and
            stored as a number in every param group (``group["d0"]``, saved by ``state_dict``); a
            group added later takes group 0's value. A number is used as given
            (raise it when d is slow to grow).
        growth_rate: the most d may grow per step, a factor >= 1 (default inf: no limit).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: one compiled single-pass kernel per group of tensors instead of the vectorized
            chain (default False): faster on a CPU, at the cost of compiling it at the first
            step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    References:
        A. Defazio, K. Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023,
        arXiv:2301.07733. Reference implementation: ``dadaptation`` 3.2 (``DAdaptAdaGrad``).

    Deliberate differences from ``dadaptation`` 3.2, besides those of the module docstring:

    * The sums :math:`\sum s^2/a` and :math:`\|s\|_1` are computed afresh at each step over the
      groups that move (the reference tracks them by increments, which its sparse path needs,
      and counts groups whose lr is 0 in them); the reference reads the lr of group 0 for
      every group.
    * Sparse gradients are refused (the reference has a sparse path; it is not kept).
    * ``momentum`` must be in [0, 1) (the reference accepts any non-negative value).

    .. warning:: The authors recommend D-Adapt Adam or SGD over this variant, which adapts d
       slowly in practice. d only grows. Coupled weight decay costs one gradient-sized
       temporary per step.
    """

    registry_name = "dadapt_adagrad"
    learning_rate_free = True
    _SCALARS = {"d": None, "k": 0.0, "gsq_weighted": 0.0}
    #: The initial value of the accumulator alpha (fixed in the reference).
    INITIAL_ACCUMULATOR = 1e-6

    def __init__(self, params: Any, lr: float = 1.0, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 eps: float = 1e-6, d0: float | None = None, growth_rate: float = math.inf,
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        v.check_bool(type(self).__name__, "skip_nonfinite", skip_nonfinite)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, d0=d0,
                        growth_rate=growth_rate, foreach=foreach, fused=fused, skip_nonfinite=skip_nonfinite)
        self._check_hyperparameters(type(self).__name__, defaults)
        super().__init__(params, defaults)
        self._resolve_d0()

    @staticmethod
    def _check_hyperparameters(owner: str, h: dict[str, Any]) -> None:
        _check_common(owner, h)
        v.check_range(owner, "momentum", h["momentum"], 0.0, 1.0, inclusive="[)", recommended=0.0)
        v.check_range(owner, "eps", h["eps"], 0.0, None, inclusive="()", recommended=1e-6)
        v.check_bool(owner, "fused", h["fused"])

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        """The per-parameter buffers, created at the parameter's first step."""
        state = self.state[p]
        if "s" not in state:
            # alpha: the sum of squared gradients, from INITIAL_ACCUMULATOR.
            state["alpha"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            local_tensor(state["alpha"]).fill_(self.INITIAL_ACCUMULATOR)
            # s: the sum of the weighted gradients, eta_i * g_i.
            state["s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # x0: the dual-averaging origin.
            state["x0"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            local_tensor(state["x0"]).copy_(local_tensor(p))
        return state

    def _update(self, loss: Tensor | None) -> None:
        self._check_shared_options()
        dtype, device = self._stat_dtype(), self._stat_device()
        scalars = self._shared_scalars()
        first = self.param_groups[0]
        d = scalars["d"]
        finite = self._step_finite()  # None: not checked
        # eta^2 sum g^2/a, sum s^2/a, ||s||_1, and whether something moved on this rank
        stats = torch.zeros(4, dtype=dtype, device=device)
        for group in self.param_groups:
            on = not lr_is_zero(group["lr"])  # a tensor lr: on (its step size is 0 when it is 0)
            step_size = d * group["lr"]  # eta_k for this group
            self._publish(group, step_size if on else torch.zeros_like(step_size))
            params, grads = self._params_with_grad(group)
            if not on or not params:
                continue  # lr = 0: the group is frozen
            states = [self._init_state(p) for p in params]
            xs = [local_tensor(p) for p in params]
            # A step that is not finite computes from zero gradients (zeroed after the coupled
            # decay): alpha and s stay; x is kept by a select or a momentum weight of 0.
            if group["fused"]:
                impl, extra = _fused_dadapt_adagrad, dict(finite=_checked(finite, device))
            elif self._use_foreach(group):
                impl, extra = _multi_tensor_dadapt_adagrad, dict(scratch=self._scratch(), finite=finite)
                if group["weight_decay"] == 0:
                    grads = self._finite_grads(grads)
            else:
                impl, extra = _single_tensor_dadapt_adagrad, dict(finite=_checked(finite, device))
            g_sq, s_sq, l1 = impl(xs, grads, states, step_size=step_size, eps=group["eps"],
                                  weight_decay=group["weight_decay"], momentum=group["momentum"],
                                  dtype=dtype, device=device, **extra)
            stats = stats + torch.stack([step_size * step_size * g_sq, s_sq, l1, lr_moves(group["lr"], l1)])

        # One reduction per step, always reached (no early return: no hang when sharded).
        g_sq, s_sq, l1, moved = self._global_sum(stats).unbind(0)
        gsq_weighted = scalars["gsq_weighted"] + g_sq
        d_hat = _ratio(s_sq - gsq_weighted, l1)
        # Nothing moved anywhere: d, the sums and the step counter stay.
        self._store_shared(scalars, dict(d=_grow(d, d_hat, first["growth_rate"]), gsq_weighted=gsq_weighted),
                           moved > 0)


def _single_tensor_dadapt_adagrad(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                                  step_size: Tensor, eps: float, weight_decay: float, momentum: float,
                                  dtype: torch.dtype, device: torch.device,
                                  finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One tensor at a time; returns sum g^2/a, sum s^2/a (new alpha and s) and sum ||s||_1.

    ``finite`` False (a 0-d bool tensor): the gradient is taken as 0, so alpha and s stay, and
    x is kept by a select (x0 - s/a is where it already is, unless it was moved from outside)."""
    g_sqs, s_sqs, l1s = [], [], []
    for x, g, state in zip(xs, grads, states):
        if weight_decay != 0:
            g = g.add(x, alpha=weight_decay)  # coupled weight decay, p.grad untouched
        g = torch.where(finite, g, 0.0)
        alpha, s, x0 = (local_tensor(state[key]) for key in ("alpha", "s", "x0"))
        alpha.addcmul_(g, g)
        denom = alpha.sqrt().add_(eps)
        g_sqs.append((g * g).div(denom).sum())
        s.add_(g * coefficient(step_size, s))
        s_sqs.append((s * s).div(denom).sum())
        l1s.append(s.abs().sum())
        z = x0 - s.div(denom)
        if momentum == 0:
            x.copy_(torch.where(finite, z, x))
        else:
            ck = 1 - momentum
            x.copy_(torch.where(finite, x.mul(1 - ck).add_(z, alpha=ck), x))
    return _sum_stacked(g_sqs, dtype, device), _sum_stacked(s_sqs, dtype, device), _sum_stacked(l1s, dtype, device)


def _multi_tensor_dadapt_adagrad(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                                 step_size: Tensor, eps: float, weight_decay: float, momentum: float,
                                 dtype: torch.dtype, device: torch.device,
                                 scratch: Scratch, finite: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_single_tensor_dadapt_adagrad` over all tensors at once (foreach ops, batched sums).

    Temporaries: the denominator a (reused for s/a) and one for the sums. On the CPU they are
    the two reused scratch buffers of one cache-sized block; elsewhere new tensor lists. Plus
    the coupled-decay gradients.

    ``finite`` False: ``grads`` are zeros (the coupled-decay gradients are zeroed here), so
    alpha and s stay; x moves by ``lerp`` towards x0 with a weight ck that is 0 (without
    momentum, ck = 1 on a finite step: x0 - s/a as before, exactly).
    """
    g_sq = torch.zeros((), dtype=dtype, device=device)
    s_sq = torch.zeros((), dtype=dtype, device=device)
    l1 = torch.zeros((), dtype=dtype, device=device)
    alphas, ss, x0s = ([local_tensor(st[key]) for st in states] for key in ("alpha", "s", "x0"))
    gates: dict[Any, Tensor] = {}
    for xb, gb, ab, sb, x0b in cache_blocks(xs, grads, alphas, ss, x0s):
        cpu = cpu_paths(ab[0].device)
        gb = _coupled(gb, xb, weight_decay, True, finite)
        torch._foreach_addcmul_(ab, gb, gb)
        if cpu:
            buf = scratch.views(ab)[1]
            torch._foreach_copy_(buf, ab)
            torch._foreach_sqrt_(buf)
        else:
            buf = torch._foreach_sqrt(ab)
        torch._foreach_add_(buf, eps)                       # a = sqrt(alpha) + eps
        if cpu:  # sum g^2 / a through the second buffer
            flat, tmp = scratch.views(gb, slot=1)
            torch._foreach_copy_(tmp, gb)
            torch._foreach_div_(tmp, buf)
            torch._foreach_mul_(tmp, gb)
            g_sq = g_sq + flat.sum(dtype=dtype)
        else:
            g_over_a = torch._foreach_div(gb, buf)
            g_sq = g_sq + total_dot(g_over_a, gb, dtype, device)
            del g_over_a
        add_scaled_(sb, gb, coefficient(step_size, sb[0]))
        torch._foreach_reciprocal_(buf)
        torch._foreach_mul_(buf, sb)                        # buf = s / a
        if cpu:
            s_sq = s_sq + flat_dot(sb, buf, scratch, dtype, slot=1)
            l1 = l1 + flat_abs_sum(sb, scratch, dtype, slot=1)
        else:
            s_sq = s_sq + total_dot(sb, buf, dtype, device)
            l1 = l1 + total_abs_sum(sb, dtype, device)
        if finite is None and momentum == 0:
            torch._foreach_copy_(xb, x0b)
            torch._foreach_sub_(xb, buf)                    # x = x0 - s/a
        elif finite is None:
            ck = 1 - momentum
            torch._foreach_lerp_(xb, x0b, ck)               # (1-ck) x + ck x0
            torch._foreach_add_(xb, buf, alpha=-ck)         # - ck s/a
        else:  # the same (lerp by 1: x0), ck 0 on a step that is not finite
            ck = _gated(finite, xb[0], 1 - momentum, 0.0, gates)
            torch._foreach_lerp_(xb, x0b, [ck] * len(xb))
            add_scaled_(xb, buf, -ck)
    return g_sq, s_sq, l1


def _dadapt_adagrad_kernel(x: Tensor, g: Tensor, alpha: Tensor, s: Tensor, x0: Tensor, step_size: Tensor,
                           finite: Tensor, eps: float, weight_decay: float, momentum: float,
                           sum_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """One tensor of :func:`_single_tensor_dadapt_adagrad`, compiled by
    :class:`~tuneless.optim._fused.FusedKernel` (all-zero tensors add 0 to the three sums).

    ``finite`` False: the gradient is taken as 0 (alpha and s stay) and x is kept by a select."""
    if weight_decay != 0:
        g = g + weight_decay * x
    g = torch.where(finite, g, 0.0)
    alpha.addcmul_(g, g)
    denom = alpha.sqrt() + eps
    g_sq = (g * g / denom).sum(dtype=sum_dtype)
    s.add_(g * step_size)
    s_sq = (s * s / denom).sum(dtype=sum_dtype)
    l1 = s.abs().sum(dtype=sum_dtype)
    z = x0 - s / denom
    if momentum == 0:
        x.copy_(torch.where(finite, z, x))
    else:
        ck = 1 - momentum
        x.copy_(torch.where(finite, x.mul(1 - ck).add_(z, alpha=ck), x))
    return g_sq, s_sq, l1


_DADAPT_ADAGRAD_KERNEL = FusedKernel(_dadapt_adagrad_kernel, num_tensors=5, num_sums=3)


def _fused_dadapt_adagrad(xs: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                          step_size: Tensor, eps: float, weight_decay: float, momentum: float,
                          dtype: torch.dtype, device: torch.device, finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_single_tensor_dadapt_adagrad` as one compiled kernel per group of tensors (``fused=True``)."""
    alphas, ss, x0s = ([local_tensor(st[key]) for st in states] for key in ("alpha", "s", "x0"))
    eta = step_size.to(coefficient_dtype(xs[0]))
    g_sq, s_sq, l1 = _DADAPT_ADAGRAD_KERNEL([xs, grads, alphas, ss, x0s],
                                            (eta, finite, eps, weight_decay, momentum, dtype),
                                            sum_dtype=dtype, device=device)
    return g_sq, s_sq, l1
