r"""DoG, L-DoG and DoWG: step sizes from the distance travelled over the gradients seen.

These methods set the step size of plain (stochastic) gradient descent from two running
quantities: how far the iterates have moved from the starting point, and how large the
gradients have been. No learning rate is chosen; ``lr`` is only a multiplier (1.0) that torch's
lr schedulers drive.

Papers and references matched:

* M. Ivgi, O. Hinder, Y. Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step
  Size Schedule", ICML 2023, arXiv:2302.12022: DoG and its layer-wise variant L-DoG.
  Reference implementation matched: ``dog-optimizer`` 1.0.3 (import ``dog``; ``DoG``,
  ``LDoG``), same defaults (``reps_rel=1e-6`` for 32- and 64-bit parameters, ``eps=1e-8``,
  ``init_eta=None``, coupled weight decay).
* A. Khaled, K. Mishchenko, C. Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
  Gradient Descent Method", NeurIPS 2023, arXiv:2305.16284: DoWG (distance over weighted
  gradients). Reference implementation matched: ``dowgopt`` 0.13 (import ``dowg``; ``DoWG``),
  same default (``eps=1e-4``, also the initial squared distance).

The DoG paper stresses that these step sizes are meant to be used with iterate averaging;
:class:`tuneless.averaging.PolynomialDecayAverager` provides it (for any optimizer).

How param groups interact:

* :class:`DoG` and :class:`LDoG` keep the reference's semantics: every param group is an
  independent problem with its own distance, gradient sum and step size (one per group for
  DoG, one per tensor for L-DoG).
* :class:`DoWG` is global, as in the reference: one distance and one weighted gradient sum
  over all parameters of all groups; each group's ``lr`` multiplies the shared step size.

Every cross-parameter sum of a step (of all groups) goes through one call of
:meth:`~tuneless.optim.base.TunelessOptimizer._global_sum`, so the methods are right under
sharded training (the references are right only for replicated parameters).

Cost of a step (vectorized path, no temporaries of model size): one multi-tensor reduction
reads g and :math:`\delta` (:math:`\|g\|^2`, :math:`\|\delta\|^2`), then
:math:`\delta \mathrel{+}= -s g` and :math:`x \mathrel{+}= -s g` read g, :math:`\delta`, x and write
:math:`\delta`, x: 32 bytes per float32 parameter (the one-pass bound is 20); one state buffer
per parameter, as in the references.

Deliberate differences from the references (each documented in the class and tested):

* A parameter without a gradient is skipped and left untouched (both references crash:
  ``AttributeError`` / ``TypeError``). Its state is created the first time it has one.
* The distance is kept as a per-parameter *displacement* buffer
  :math:`\delta = x_t - x_0`, in ``self.state[p]["displacement"]``, updated with the
  optimizer's own step (the references keep :math:`x_0` and recompute :math:`x_t - x_0`;
  DoG keeps it in ``param_groups``). Mathematically the same; it needs no temporary of model
  size and no cancellation-prone expansion to get :math:`\|x_t - x_0\|`, ``state_dict`` is
  plain torch and resumes bit-exactly, and it makes bfloat16 work: the first steps (about
  ``reps_rel`` of the weights' scale) are far below a bfloat16 ulp, so bfloat16 weights do not
  move at first; a distance re-read from the weights would stay 0 and the step size would only
  shrink, while the displacement accumulates the steps taken and lets the step size grow.
  Consequence: changes made to the parameters *outside* ``step()`` (projections, clamping,
  loading weights) do not count in the distance. :math:`x_0` is ``p - state[p]["displacement"]``.
  Against the references in float64 the parameters agree to ~1e-11 relative rather than
  ~1e-15: their distance includes the weights' rounding, about 1e-10 of the tiny first distances.
* Global scalars are kept in the statistics dtype (float32 for bfloat16 parameters), so
  bfloat16 works; state per parameter stays in the parameter's dtype. The sums that grow with
  every step, DoG's and L-DoG's ``grad_sq_sum`` (G) and DoWG's ``v``, are kept in float64
  whatever the parameters' dtype (float32 on MPS, which has none): 0-d or one entry per tensor,
  so free. In float32, after ~10^7 steps G is ~10^7 times its increment and its spacing is as
  large as the increment, which was then rounded to a multiple of it (``tests/test_long_runs.py``:
  G ~1.2e8 grew by 8.0 instead of 11.65).
  The step size computed from them is cast to the statistics dtype. (The references keep them
  in the parameters' dtype, DoWG's in the default dtype.)
* ``reps_rel=None`` (the default) is 1e-6, the reference's value, when the group's parameters
  are 32- or 64-bit, and 1e-3 when any of them is 16-bit (bfloat16, float16): a first step of
  1e-6 of the weights is below their spacing (2^-8 relative in bfloat16), so the weights do not
  move, and the distance grows only as the rounded-away steps accumulate in the displacement:
  no measurable progress in the first tens of steps. With 1e-3 the first step is representable.
* No host synchronization in a step (the DoG reference asserts ``G > 0`` and uses a 0-d
  tensor as ``alpha``, which synchronizes once per tensor); a division by ``G = 0`` (only
  possible with ``eps=0`` and a zero gradient) gives a zero step instead of NaN.
* ``lr`` multiplies every step, ``init_eta`` included (the reference uses ``init_eta`` as is
  on the first step); ``lr = 0`` is allowed (a scheduler may drive it there); DoWG gets the
  ``lr`` multiplier and the coupled ``weight_decay`` that DoG has (0 by default, as the
  reference has none). ``p.grad`` is never modified (the DoG reference adds the weight decay
  into ``p.grad`` in place).
* With ``init_eta``, a group (DoG) or tensor (L-DoG) that has not moved yet keeps taking
  ``init_eta`` (the reference would divide a zero distance and never move if the first
  gradient was zero, and it gives later-added parameters a zero step).
* ``DoWG.step()`` accepts a closure and ``loss=`` like every tuneless optimizer (the
  reference's ``step()`` takes no argument).
* A step whose gradients are not all finite is skipped (``skip_nonfinite=True``, the default):
  it computes with zero gradients, keeps the distance, the gradient sums and the step sizes as
  they were and moves nothing (the references let the NaN into the weights). One exception, which
  changes no later step: a tensor stepped for the first time at a skipped step has its
  :math:`r_\epsilon` (a function of :math:`x_0` alone) taken into :math:`\bar r` then, since its
  state (the displacement) now exists and the next step will not see it as new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _validate as v
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, local_tensor
from ._batched import foreach_mm

__all__ = ["DoG", "LDoG", "DoWG"]

_DISPLACEMENT = "displacement"
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types that are their own local tensor (not DTensor)


# ----------------------------------------------------------------------------- what a step touches


@dataclass
class _GroupPlan:
    """The tensors of one param group that a step touches (host-side bookkeeping, no math)."""

    n: int  # number of parameters in the group
    positions: list[int] = field(default_factory=list)  # indices (in the group) of params with a gradient
    xs: list[Tensor] = field(default_factory=list)  # their local tensors
    grads: list[Tensor] = field(default_factory=list)  # their local gradients
    disps: list[Tensor] = field(default_factory=list)  # their local displacements
    state_positions: list[int] = field(default_factory=list)  # indices of params that have state
    state_disps: list[Tensor] = field(default_factory=list)  # their local displacements
    new_positions: list[int] = field(default_factory=list)  # params whose state was created now
    new_xs: list[Tensor] = field(default_factory=list)  # their local tensors (= x_0)


def _scatter(values: Tensor, positions: list[int], n: int, zero: Tensor) -> Tensor:
    """A length-``n`` vector holding ``values`` at ``positions`` and 0 elsewhere.

    Only list assembly on the host (``unbind`` gives views) and one ``stack``: no per-tensor math.
    """
    if len(positions) == n:  # positions are always increasing, so this is range(n)
        return values
    if not positions:
        return zero.expand(n)
    out = [zero] * n
    for value, i in zip(values.unbind(0), positions):
        out[i] = value
    return torch.stack(out)


# ----------------------------------------------------------------------------- statistics


def _stack(values: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=dtype, device=device)


def _single_tensor_statistics(plan: _GroupPlan, weight_decay: float, dtype: torch.dtype,
                              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-tensor :math:`\|g + \lambda x\|^2`, :math:`\|x_t - x_0\|^2` and :math:`\|x_0\|^2`, one tensor at a time.

    The readable ground truth of :func:`_multi_tensor_statistics`. Returns three vectors, over
    ``plan.positions``, ``plan.state_positions`` and ``plan.new_positions`` respectively.
    """
    grad_sq, dist_sq, init_sq = [], [], []
    for x, g in zip(plan.xs, plan.grads):
        g_eff = g.to(dtype) + weight_decay * x.to(dtype) if weight_decay != 0 else g.to(dtype)
        grad_sq.append((g_eff * g_eff).sum())
    for d in plan.state_disps:
        dd = d.to(dtype)
        dist_sq.append((dd * dd).sum())
    for x in plan.new_xs:
        xx = x.to(dtype)
        init_sq.append((xx * xx).sum())
    return _stack(grad_sq, dtype, device), _stack(dist_sq, dtype, device), _stack(init_sq, dtype, device)


def _multi_tensor_statistics(plan: _GroupPlan, weight_decay: float, dtype: torch.dtype,
                             device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    r"""The same three vectors, with batched multi-tensor reductions and no temporaries.

    All squared norms come from one ``torch._foreach_powsum`` (gradients, displacements, and
    the weights where needed). With coupled weight decay the gradient norm is expanded,
    :math:`\|g + \lambda x\|^2 = \|g\|^2 + 2\lambda\langle g, x\rangle + \lambda^2\|x\|^2`
    (batched dot products, clamped at 0), instead of materializing :math:`g + \lambda x`.
    The expansion loses accuracy only relative to :math:`\|g\|^2 + \lambda^2\|x\|^2` when its
    terms cancel, and G is a running sum, so G stays accurate to rounding level; in bfloat16
    the dot product is rounded to bfloat16 (relative 0.4%).
    """
    k, m = len(plan.grads), len(plan.state_disps)
    weights = plan.xs if weight_decay != 0 else []
    tensors = plan.grads + plan.state_disps + weights + plan.new_xs
    sums = torch._foreach_powsum(tensors, 2, dtype=dtype) if tensors else []
    stacked = _stack(sums, dtype, device)
    grad_sq, dist_sq = stacked[:k], stacked[k:k + m]
    x_sq, init_sq = stacked[k + m:k + m + len(weights)], stacked[k + m + len(weights):]
    if weights:
        rows = [g.reshape(1, -1) for g in plan.grads]
        cols = [x.reshape(1, -1).t() for x in plan.xs]  # (n, 1) as a transposed row: BLAS dot, 1.4x faster on CPU
        dots = torch.stack(foreach_mm(rows, cols)).reshape(-1).to(dtype)
        grad_sq = torch.clamp(grad_sq + (2.0 * weight_decay) * dots + (weight_decay * weight_decay) * x_sq, min=0.0)
    return grad_sq, dist_sq, init_sq


# ----------------------------------------------------------------------------- the SGD step


def _single_tensor_step(plan: _GroupPlan, steps: list[Tensor], weight_decay: float) -> None:
    r"""x <- x - s (g + wd x) and delta <- delta - s (g + wd x), one tensor at a time (the truth)."""
    for x, g, d, s in zip(plan.xs, plan.grads, plan.disps, steps):
        g_eff = g + weight_decay * x if weight_decay != 0 else g
        update = g_eff.to(x.dtype) * s.to(x.dtype)
        d.sub_(update.to(d.dtype))
        x.sub_(update)


def _multi_tensor_step(plan: _GroupPlan, neg_steps: list[Tensor], decays: list[Tensor] | None,
                       keeps: list[Tensor] | None) -> None:
    r"""The same update over all tensors at once, in place, without temporaries.

    ``neg_steps`` are 0-d tensors :math:`-s_i`, in each parameter's dtype; with weight decay,
    ``decays`` are :math:`-s_i\lambda` and ``keeps`` :math:`1 - s_i\lambda`. Then
    :math:`\delta \mathrel{+}= -s\lambda x`, :math:`x \mathrel{*}= 1 - s\lambda`, and
    :math:`\delta \mathrel{+}= -s g`, :math:`x \mathrel{+}= -s g` in one multi-tensor call over
    the interleaved list :math:`(\delta_n, x_n, \delta_{n-1}, x_{n-1}, \dots)`: each gradient is
    read twice in a row (the second time from cache), and in the reverse order of the
    reduction that came just before, whose last tensors are still in cache.
    (On CUDA the 0-d broadcast takes torch's per-tensor path: correct, untested for speed.)
    """
    if decays is not None and keeps is not None:
        torch._foreach_addcmul_(plan.disps, plan.xs, decays)
        torch._foreach_mul_(plan.xs, keeps)
    targets = [t for pair in zip(reversed(plan.disps), reversed(plan.xs)) for t in pair]
    sources = [g for g in reversed(plan.grads) for _ in (0, 1)]
    scales = [s for s in reversed(neg_steps) for _ in (0, 1)]
    torch._foreach_addcmul_(targets, sources, scales)


def _in_param_dtypes(values: Tensor, positions: list[int], xs: list[Tensor]) -> list[Tensor]:
    """``values[positions[i]]`` as 0-d tensors in the dtype of ``xs[i]`` (one cast per dtype, views)."""
    first = xs[0].dtype
    if len(positions) == values.numel() and all(x.dtype == first for x in xs):
        return list(values.to(first).unbind(0))  # the common case: every tensor, one dtype
    by_dtype: dict[torch.dtype, tuple[Tensor, ...]] = {}
    out = []
    for i, x in zip(positions, xs):
        if x.dtype not in by_dtype:
            by_dtype[x.dtype] = values.to(x.dtype).unbind(0)
        out.append(by_dtype[x.dtype][i])
    return out


# ----------------------------------------------------------------------------- shared machinery


class _DistanceBase(TunelessOptimizer):
    """What DoG, L-DoG and DoWG share: the displacement state, the step plan, checkpoints."""

    #: keys of param_groups that hold 0-d / 1-D tensors of optimizer state
    _GROUP_TENSOR_KEYS: ClassVar[tuple[str, ...]] = ()

    def _plan(self, group: dict[str, Any]) -> _GroupPlan:
        """Which tensors this step touches; creates the state of parameters seen for the first time.

        Runs once per tensor per step, so it is kept lean: plain tensors skip the DTensor lookup,
        and a parameter that never had a gradient gets no (empty) state entry.
        """
        params, states = group["params"], self.state
        grads = [p.grad for p in params]
        if all(g is not None and type(g) in _PLAIN for g in grads) and all(type(p) in _PLAIN for p in params):
            found = [states.get(p) for p in params]
            if all(st is not None and _DISPLACEMENT in st for st in found):
                # the common case: every parameter has a gradient and state (plain tensors)
                disps = [st[_DISPLACEMENT] for st in found]
                everyone = list(range(len(params)))
                return _GroupPlan(len(params), everyone, list(params), grads, disps, everyone, disps)
        plan = _GroupPlan(n=len(params))
        for i, p in enumerate(params):
            grad = p.grad
            state = states.get(p)
            if grad is not None:
                x = p if type(p) in _PLAIN else local_tensor(p)
                if state is None or _DISPLACEMENT not in state:
                    state = states[p]
                    # x_t - x_0: how far this parameter has moved since it was first stepped
                    # (parameter dtype; a DTensor under FSDP2, like the parameter).
                    state[_DISPLACEMENT] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    plan.new_positions.append(i)
                    plan.new_xs.append(x)
                disp = state[_DISPLACEMENT]
                d = disp if type(disp) in _PLAIN else local_tensor(disp)
                plan.positions.append(i)
                plan.xs.append(x)
                plan.grads.append(grad if type(grad) in _PLAIN else local_tensor(grad))
                plan.disps.append(d)
                plan.state_positions.append(i)
                plan.state_disps.append(d)
            elif state is not None and _DISPLACEMENT in state:
                disp = state[_DISPLACEMENT]
                plan.state_positions.append(i)
                plan.state_disps.append(disp if type(disp) in _PLAIN else local_tensor(disp))
        return plan

    def _finite_plans(self, plans: list[_GroupPlan]) -> None:
        """On a checked step, the plans' gradients become :meth:`_finite_grads`'s copies (zeros
        when the step is not finite), made in one call over every group (the copies' buffers are
        kept by position, so one call per group would share them between groups)."""
        if self._step_finite() is None:
            return
        zeroed = iter(self._finite_grads([g for plan in plans for g in plan.grads]))
        for plan in plans:
            plan.grads = [next(zeroed) for _ in plan.grads]

    def _statistics(self, group: dict[str, Any], plan: _GroupPlan, dtype: torch.dtype,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        compute = _multi_tensor_statistics if self._use_foreach(group) else _single_tensor_statistics
        return compute(plan, group["weight_decay"], dtype, device)

    def _apply_steps(self, group: dict[str, Any], plan: _GroupPlan, steps: Tensor) -> None:
        """Move the group's parameters with a gradient by ``-steps * g`` (0-d, or one per group tensor)."""
        if not plan.xs:
            return
        wd = group["weight_decay"]
        if not self._use_foreach(group):
            per_tensor = [steps] * len(plan.xs) if steps.dim() == 0 else [steps[i] for i in plan.positions]
            _single_tensor_step(plan, per_tensor, wd)
            return
        # the scalars of the update, computed once (0-d, or as vectors for L-DoG), then handed
        # out per tensor in the tensor's dtype
        neg = -steps
        scalars = [neg, neg * wd, 1.0 + neg * wd] if wd != 0 else [neg]
        if steps.dim() == 0:
            per_dtype = {dt: [t.to(dt) for t in scalars] for dt in {x.dtype for x in plan.xs}}
            lists = [[per_dtype[x.dtype][k] for x in plan.xs] for k in range(len(scalars))]
        else:
            lists = [_in_param_dtypes(t, plan.positions, plan.xs) for t in scalars]
        if wd != 0:
            _multi_tensor_step(plan, lists[0], lists[1], lists[2])
        else:
            _multi_tensor_step(plan, lists[0], None, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then move the group scalars to the parameters' device.

        torch casts ``state`` to each parameter's device but copies ``param_groups`` values as
        they are; a checkpoint loaded with ``map_location="cpu"`` would leave them on the CPU.
        Their dtype is kept (the statistics dtype).
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if not group["params"]:
                continue
            device = local_tensor(group["params"][0]).device
            for key in self._GROUP_TENSOR_KEYS:
                value = group.get(key)
                if isinstance(value, Tensor) and value.device != device:
                    group[key] = value.to(device)


def _check_common(owner: str, lr: Any, weight_decay: Any) -> Any:
    """Check lr and weight_decay; returns lr (a one-element tensor as a 0-d view)."""
    lr = v.check_lr(owner, lr, recommended=1.0)
    v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
    return lr


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sums that grow with every step: float64 (float32 on MPS, which has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


#: ``reps_rel=None``: the reference's 1e-6 for 32- and 64-bit parameters; 1e-3 when a parameter
#: of the group is 16-bit, where a first step of 1e-6 of the weights rounds away
_REPS_REL_DEFAULT, _REPS_REL_LOW_PRECISION = 1e-6, 1e-3


def _reps_rel(group: dict[str, Any]) -> float:
    """The group's ``reps_rel``: as given, or, if None, the default for its parameters' dtypes."""
    value = group["reps_rel"]
    if value is not None:
        return value
    for p in group["params"]:
        if p.dtype.itemsize <= 2:  # bfloat16, float16 (and narrower)
            return _REPS_REL_LOW_PRECISION
    return _REPS_REL_DEFAULT


def _safe_rsqrt_times(numerator: Tensor, denominator_sq: Tensor) -> Tensor:
    """numerator / sqrt(denominator_sq), and 0 where denominator_sq is 0 (no NaN, no sync)."""
    positive = denominator_sq > 0
    safe = torch.where(positive, denominator_sq, torch.ones_like(denominator_sq))
    return torch.where(positive, numerator / torch.sqrt(safe), torch.zeros_like(numerator))


# ----------------------------------------------------------------------------- DoG and L-DoG


class DoG(_DistanceBase):
    r"""DoG (Distance over Gradients): SGD whose step size is the distance travelled over the gradient norms.

    For each param group, with :math:`x` all the group's parameters as one vector,

    .. math::
        \bar r_t &= \max\big(r_\epsilon,\ \max_{i \le t} \|x_i - x_0\|\big), \qquad
            r_\epsilon = \mathrm{reps\_rel}\cdot(1 + \|x_0\|) \\
        G_t &= \epsilon + \sum_{i \le t} \|g_i\|^2, \qquad g_i = \nabla f(x_i) + \lambda x_i \\
        \eta_t &= \frac{\bar r_t}{\sqrt{G_t}}, \qquad
        x_{t+1} = x_t - \mathrm{lr}\cdot\eta_t\, g_t

    The first step moves by about :math:`r_\epsilon` (a tiny fraction of the weights); the step
    size then grows as the iterates move away from :math:`x_0`, and shrinks as gradients accumulate.
    Param groups are independent (one :math:`\eta` each), as in the reference. The published step
    size (``group["effective_lr"]``) is :math:`\mathrm{lr}\cdot\eta_t`; ``group["rbar"]``,
    ``group["grad_sq_sum"]`` (G) and ``group["eta"]`` (:math:`\mathrm{lr}\cdot\eta_t`) are 0-d
    tensors on the parameters' device, G in float64 (it grows with every step; float32 would
    lose its increments after ~10^7 steps), the others in the statistics dtype.

    Args:
        params: parameters or param groups.
        lr: multiplier of the step size, for schedulers (default 1.0; the paper's c, which it
            recommends leaving at 1).
        reps_rel: relative size of the first step, :math:`r_\epsilon = \mathrm{reps\_rel}(1+\|x_0\|)`.
            None (the default) means 1e-6 (the paper's and the reference's value) when the group's
            parameters are 32- or 64-bit, and 1e-3 when any of them is 16-bit (bfloat16, float16):
            the first step must be representable, and 1e-6 of the weights is far below their
            spacing in bfloat16 (2^-8 relative), so the weights would not move and the distance
            would grow only slowly (no measurable progress in 20 steps; 1e-3 trains as float32
            does). A number is used as given, at any precision (1e-4 for models with batch
            normalization, as the paper suggests).
        weight_decay: coupled L2 penalty :math:`\lambda` added to the gradient (default 0.0).
        eps: added to the gradient sum G (default 1e-8).
        init_eta: if given, the first step size (times lr), replacing ``reps_rel``: the distance
            then starts at 0, and until the group has moved its step size stays ``init_eta``.
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> from tuneless.averaging import PolynomialDecayAverager
        >>> w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.DoG([w])
        >>> avg = PolynomialDecayAverager([w], gamma=8)
        >>> for _ in range(200):
        ...     opt.zero_grad(); ((w - 1.0) ** 2).sum().backward(); _ = opt.step(); avg.update()
        >>> with torch.no_grad(), avg.average_parameters():   # evaluate at the averaged point
        ...     bool(((w - 1.0) ** 2).sum() < 1e-3)
        True

    References:
        Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
        Schedule", ICML 2023, arXiv:2302.12022. Matches ``dog-optimizer`` 1.0.3 ``dog.DoG``.

    .. warning:: The paper's results rely on iterate averaging: evaluate at the average kept by
       :class:`tuneless.averaging.PolynomialDecayAverager` (``gamma=8``), not at the last iterate.

    .. note:: Differences from the reference (see the module docstring): parameters without a
       gradient are skipped; the distance is accumulated in a displacement buffer (changes made to
       the parameters outside ``step()`` do not count); ``lr`` also multiplies ``init_eta`` and may
       be 0; ``p.grad`` is not modified; no host synchronization.
    """

    registry_name = "dog"
    _layer_wise: ClassVar[bool] = False
    _GROUP_TENSOR_KEYS = ("rbar", "grad_sq_sum", "eta")

    def __init__(self, params: Any, *, lr: float = 1.0, reps_rel: float | None = None, weight_decay: float = 0.0,
                 eps: float = 1e-8, init_eta: float | None = None, foreach: bool | None = None,
                 skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = _check_common(owner, lr, weight_decay)
        v.check_optional_range(owner, "reps_rel", reps_rel, 0.0, None, inclusive="()", recommended=1e-6)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="[)", recommended=1e-8)
        v.check_optional_range(owner, "init_eta", init_eta, 0.0, None, inclusive="()")
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, reps_rel=None if reps_rel is None else float(reps_rel),
                                      weight_decay=float(weight_decay),
                                      eps=float(eps), init_eta=None if init_eta is None else float(init_eta),
                                      foreach=foreach, skip_nonfinite=skip_nonfinite))

    def _update(self, loss: Tensor | None) -> None:
        dtype, device = self._stat_dtype(), self._stat_device()
        zero = torch.zeros((), dtype=dtype, device=device)
        # 1. Per group, partial sums of ||g||^2, ||x - x_0||^2 and ||x_0||^2 (tensors stepped for
        #    the first time): over the group (DoG, 3 numbers) or per tensor (L-DoG, 3 per tensor).
        #    The layout depends only on the param groups, never on which gradients exist, so that
        #    every process of a sharded run reduces the same vector (tuneless.distributed).
        plans = [self._plan(group) for group in self.param_groups]
        self._finite_plans(plans)
        partials = []
        for group, plan in zip(self.param_groups, plans):
            grad_sq, dist_sq, init_sq = self._statistics(group, plan, dtype, device)
            if self._layer_wise:
                partials.append(torch.cat([_scatter(grad_sq, plan.positions, plan.n, zero),
                                           _scatter(dist_sq, plan.state_positions, plan.n, zero),
                                           _scatter(init_sq, plan.new_positions, plan.n, zero)]))
            else:
                partials.append(torch.stack([grad_sq.sum(), dist_sq.sum(), init_sq.sum()]))
        # 2. All the step's sums over parameters, in one reduction (sharded training adds up here).
        totals = self._global_sum(torch.cat(partials)).split([t.numel() for t in partials])
        # 3. Per group: distance, gradient sum, step size; then the SGD step. The state of a group
        #    (or tensor) without gradients is updated too, harmlessly (G += 0, r̄ unchanged).
        for group, plan, total in zip(self.param_groups, plans, totals):
            grad_sq, dist_sq, init_sq = total.view(3, plan.n).unbind(0) if self._layer_wise else total.unbind(0)
            steps = self._step_sizes(group, plan, grad_sq, dist_sq, init_sq)
            self._apply_steps(group, plan, steps)

    def _step_sizes(self, group: dict[str, Any], plan: _GroupPlan, grad_sq: Tensor, dist_sq: Tensor,
                    init_sq: Tensor) -> Tensor:
        """Update the group's r̄ and G; return lr·η (0-d for DoG, one per group tensor for L-DoG),
        the step to apply (0 on a step that is not finite)."""
        wide = _sum_dtype(grad_sq.device)
        if "rbar" not in group:
            # the largest distance so far (0 until r_eps is set), in the statistics dtype, and the
            # gradient sum G, in float64 (it grows forever): 0-d (DoG) or one entry per tensor (L-DoG)
            group["rbar"] = torch.zeros_like(grad_sq)
            group["grad_sq_sum"] = torch.full_like(grad_sq, group["eps"], dtype=wide)
        init_eta = group["init_eta"]
        # (.to: a float32 G from an older checkpoint)
        old_rbar, old_sum = group["rbar"], group["grad_sq_sum"].to(wide)
        rbar = torch.maximum(old_rbar, torch.sqrt(dist_sq))
        r_eps = None
        if init_eta is None:
            # r_eps = reps_rel (1 + ||x_0||) for tensors stepped for the first time; for the
            # others init_sq is 0 and reps_rel is below their r̄ already
            r_eps = _reps_rel(group) * (1.0 + torch.sqrt(init_sq))
            rbar = torch.maximum(rbar, r_eps)
        grad_sum = old_sum + grad_sq.to(wide)
        eta = _safe_rsqrt_times(rbar.to(wide), grad_sum).to(rbar.dtype)
        if init_eta is not None:  # until it has moved, a group (tensor) takes init_eta
            eta = torch.where(rbar > 0, eta, torch.full_like(eta, init_eta))
        steps = group["lr"] * eta
        if steps.dim() == 0:
            published = steps
        else:  # L-DoG: ||update|| / ||g||, the step size of the SGD step that moves as far
            published = _safe_rsqrt_times(torch.sqrt((steps * steps * grad_sq).sum()), grad_sq.sum())
        finite = self._step_finite()
        if finite is not None:
            # Not finite: G, eta and the published step size keep their values (0 before the
            # first step), the step is 0. r̄ keeps its value too, except where a tensor was stepped
            # for the first time (init_sq > 0: x_0 is known, and the next step will not see the
            # tensor as new): there it takes r_eps, which the next step would take anyway.
            kept_rbar = old_rbar if r_eps is None else torch.where(init_sq > 0, torch.maximum(old_rbar, r_eps),
                                                                   old_rbar)
            rbar, grad_sum = gate(finite, rbar, kept_rbar), gate(finite, grad_sum, old_sum)
            old_eta, old_published = group.get("eta"), group.get(STEP_SIZE_KEY)
            published = gate(finite, published, 0.0 if old_published is None else old_published)
            eta_kept = gate(finite, steps, 0.0 if old_eta is None else old_eta)
            group["rbar"], group["grad_sq_sum"], group["eta"] = rbar, grad_sum, eta_kept
            self._publish_step_size(group, published)
            return gate(finite, steps, 0.0)
        # new tensors each step (never in place): a state_dict taken earlier keeps its values
        group["rbar"], group["grad_sq_sum"], group["eta"] = rbar, grad_sum, steps
        self._publish_step_size(group, published)
        return steps


class LDoG(DoG):
    r"""L-DoG (layer-wise DoG): the DoG step size computed separately for each parameter tensor.

    For each tensor :math:`x^{(l)}` (a "layer"),

    .. math::
        \bar r^{(l)}_t = \max\big(r^{(l)}_\epsilon,\ \max_{i\le t}\|x^{(l)}_i - x^{(l)}_0\|\big),\quad
        G^{(l)}_t = \epsilon + \sum_{i\le t}\|g^{(l)}_i\|^2,\quad
        x^{(l)}_{t+1} = x^{(l)}_t - \mathrm{lr}\cdot\frac{\bar r^{(l)}_t}{\sqrt{G^{(l)}_t}}\, g^{(l)}_t

    with :math:`r^{(l)}_\epsilon = \mathrm{reps\_rel}(1 + \|x^{(l)}_0\|)`. The arguments are
    :class:`DoG`'s (``reps_rel=None``: 1e-6, or 1e-3 for every tensor of a group that has a
    16-bit parameter). ``group["rbar"]``, ``group["grad_sq_sum"]`` (float64) and ``group["eta"]``
    are vectors with one entry per tensor of the group (in ``group["params"]`` order). The
    published step size (``group["effective_lr"]``) is the step size of the plain SGD step that
    would move as far, :math:`\|\Delta x\| / \|g\| = \big(\sum_l (\mathrm{lr}\,\eta^{(l)})^2 \|g^{(l)}\|^2 /
    \sum_l \|g^{(l)}\|^2\big)^{1/2}` (0 when the group has no gradient).

    References:
        Ivgi, Hinder, Carmon, ICML 2023, arXiv:2302.12022 (L-DoG). Matches ``dog-optimizer``
        1.0.3 ``dog.LDoG``, with the differences listed in :class:`DoG`.

    .. warning:: Use it with iterate averaging (:class:`tuneless.averaging.PolynomialDecayAverager`).
    """

    registry_name = "ldog"
    _layer_wise = True

    def __init__(self, params: Any, *, lr: float = 1.0, reps_rel: float | None = None, weight_decay: float = 0.0,
                 eps: float = 1e-8, init_eta: float | None = None, foreach: bool | None = None,
                 skip_nonfinite: bool = True) -> None:
        super().__init__(params, lr=lr, reps_rel=reps_rel, weight_decay=weight_decay, eps=eps,
                         init_eta=init_eta, foreach=foreach, skip_nonfinite=skip_nonfinite)


# ----------------------------------------------------------------------------- DoWG


class DoWG(_DistanceBase):
    r"""DoWG (Distance over Weighted Gradients): a universal, parameter-free gradient descent.

    Over all parameters of all groups (one global state, as in the reference),

    .. math::
        \bar r_t^2 &= \max\big(\bar r_{t-1}^2,\ \|x_t - x_0\|^2\big), \qquad \bar r_0^2 = \epsilon \\
        v_t &= v_{t-1} + \bar r_t^2\,\|g_t\|^2, \qquad g_t = \nabla f(x_t) + \lambda x_t \\
        x_{t+1} &= x_t - \mathrm{lr}\cdot\frac{\bar r_t^2}{\sqrt{v_t} + \epsilon}\, g_t

    The gradients are weighted by the squared distance, so the early (small-distance) gradients
    count less in :math:`v_t`; the method adapts to smooth and non-smooth problems alike. Each
    group's ``lr`` multiplies the shared step size, which is published as
    :math:`\mathrm{lr}\cdot\bar r_t^2/(\sqrt{v_t}+\epsilon)`; ``group["rbar_sq"]`` and
    ``group["v"]`` (identical in every group) are 0-d tensors on the parameters' device,
    :math:`v_t` in float64 (it grows with every step), :math:`\bar r_t^2` in the statistics dtype.

    Args:
        params: parameters or param groups.
        lr: multiplier of the step size, for schedulers (default 1.0; the reference has none).
        eps: the initial squared distance :math:`\bar r_0^2` and the term added to
            :math:`\sqrt{v_t}` (default 1e-4, the reference's). The initial distance is absolute:
            for weights far from unit scale, set it to about (1e-3·‖x₀‖)². Being absolute, the
            first step (distance 1e-2) needs no low-precision default (DoG's ``reps_rel``): it is
            representable for weights of about unit scale in bfloat16 too.
        weight_decay: coupled L2 penalty :math:`\lambda` added to the gradient (default 0.0; the
            reference has none).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    References:
        Khaled, Mishchenko, Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free Gradient
        Descent Method", NeurIPS 2023, arXiv:2305.16284. Matches ``dowgopt`` 0.13 ``dowg.DoWG``.

    .. note:: Differences from the reference: parameters without a gradient are skipped (the
       reference raises ``TypeError``); ``step()`` takes a closure or ``loss=``; the state is kept
       per parameter (a displacement buffer, see the module docstring) and in ``param_groups``
       instead of integer keys in ``state``; ``lr`` and ``weight_decay`` are added; the reference
       builds its scalars with ``torch.Tensor([...])`` (the default dtype, float32 even for
       float64 parameters), here they are in the statistics dtype (float64 for float64 parameters).
    """

    registry_name = "dowg"
    _GROUP_TENSOR_KEYS = ("rbar_sq", "v")

    def __init__(self, params: Any, *, lr: float = 1.0, eps: float = 1e-4, weight_decay: float = 0.0,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = _check_common(owner, lr, weight_decay)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-4)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, eps=float(eps), weight_decay=float(weight_decay), foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))

    def _update(self, loss: Tensor | None) -> None:
        dtype, device = self._stat_dtype(), self._stat_device()
        wide = _sum_dtype(device)
        plans = [self._plan(group) for group in self.param_groups]
        self._finite_plans(plans)
        # 1. ||g||^2 and ||x - x_0||^2 over all groups, in one reduction (always the same two
        #    numbers, whichever gradients exist: see tuneless.distributed).
        partials = []
        for group, plan in zip(self.param_groups, plans):
            grad_sq, dist_sq, _ = self._statistics(group, plan, dtype, device)
            partials.append(torch.stack([grad_sq.sum(), dist_sq.sum()]))
        grad_sq, dist_sq = self._global_sum(torch.stack(partials).sum(0)).unbind(0)
        # 2. The shared distance and weighted gradient sum (identical copies in every group).
        state_group = next((g for g in self.param_groups if "rbar_sq" in g), None)
        if state_group is None:
            # squared distance so far, starting at eps (0-d, statistics dtype), and the weighted
            # sum v of squared gradient norms (0-d, float64: it grows forever)
            rbar_sq = torch.full((), self.defaults["eps"], dtype=dtype, device=device)
            v_sum = torch.zeros((), dtype=wide, device=device)
        else:
            # (.to: a float32 v from an older checkpoint)
            rbar_sq, v_sum = state_group["rbar_sq"], state_group["v"].to(wide)
        old_rbar_sq, old_v = rbar_sq, v_sum
        rbar_sq = torch.maximum(rbar_sq, dist_sq)
        wide_rbar_sq = rbar_sq.to(wide)
        v_sum = v_sum + wide_rbar_sq * grad_sq.to(wide)
        root_v = torch.sqrt(v_sum)
        # Not finite: r̄², v and the published step size keep their values (eps, 0 and 0 before
        # the first step), the step is 0.
        finite = self._step_finite()
        rbar_sq_kept, v_kept = gate(finite, rbar_sq, old_rbar_sq), gate(finite, v_sum, old_v)
        # 3. Each group's step: lr * r̄² / (sqrt(v) + eps).
        for group, plan in zip(self.param_groups, plans):
            old_published = group.get(STEP_SIZE_KEY)
            group["rbar_sq"], group["v"] = rbar_sq_kept, v_kept
            step = group["lr"] * (wide_rbar_sq / (root_v + group["eps"])).to(dtype)
            if finite is not None:
                self._publish_step_size(group, gate(finite, step, 0.0 if old_published is None else old_published))
                step = gate(finite, step, 0.0)
            else:
                self._publish_step_size(group, step)
            self._apply_steps(group, plan, step)
