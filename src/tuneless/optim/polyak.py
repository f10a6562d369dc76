r"""The Polyak family: the error-driven step size, done right.

The naive idea, a step size proportional to the loss, ignores how steep the function is and
stalls in flat valleys. Polyak's step size divides the *excess* error by the squared gradient
norm, which is the step that would reach the minimum value if the function were linear:

.. math::  \gamma_k = \frac{f(x_k) - f^*}{\|\nabla f(x_k)\|^2}, \qquad x_{k+1} = x_k - \gamma_k \nabla f(x_k).

Papers and references matched:

* B. T. Polyak, *Introduction to Optimization*, 1987, Sec. 5.3 (the step size with known f*).
* N. Loizou, S. Vaswani, I. Laradji, S. Lacoste-Julien, "Stochastic Polyak Step-size for SGD:
  An Adaptive Learning Rate for Fast Convergence", AISTATS 2021, arXiv:2002.10542: SPS and
  SPS_max, :math:`\gamma_k = \min\{(f_i(x_k) - f_i^*) / (c\|\nabla f_i(x_k)\|^2), \gamma_b\}`.
  Reference read: ``IssamLaradji/sps`` (``adapt_flag='constant'`` is SPS_max). We use the
  positive part of the numerator, as in the SPS+ form of Garrigos, Gower & Schaipp (2023).
* F. Schaipp, R. Ohana, M. Eickenberg, A. Defazio, R. M. Gower, "MoMo: Momentum Models for
  Adaptive Learning Rates", ICML 2024, arXiv:2305.07583: model-based momentum with the
  Polyak-type step, and its online estimate of the unknown lower bound f* (their
  ``use_fstar=True``, reference package ``fabian-sp/MoMo``, class ``Momo``), matched here.

Edge cases, identical in every class of this module and tested:

* zero gradient: the step size is 0 (no division by zero, no NaN);
* loss below f* (or below the current estimate): the positive part makes the step 0; MoMo's
  estimate is then lowered (its reset rule);
* non-finite loss or gradient (``skip_nonfinite=True``, the default): the step is skipped, as
  everywhere in tuneless: the parameters, MoMo's averages, its step counter, its lower-bound
  estimate and the published step size are left exactly as they were, and the group's
  ``skipped_steps`` counter grows by one (see :class:`~tuneless.optim.base.TunelessOptimizer`);
  a step skipped at the very start leaves the next step a first step. With
  ``skip_nonfinite=False`` a non-finite loss still gives a step size of 0 (published as 0) and
  leaves MoMo's averages as they were, while a non-finite *gradient* reaches the parameters, as
  in torch.optim.

Data-parallel training: the loss every class here uses is the mean of the ranks' losses
(``TunelessOptimizer.step`` averages it with :func:`tuneless.distributed.average_loss`, with
nothing to set up under DDP or FSDP2), so every replica takes the same step as one process
would; :func:`tuneless.distributed.set_loss_group` ``(opt, None)`` uses the given loss as it is.

No host synchronization happens in a step: the step size is a 0-d tensor on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import add_scaled_, total_dot_loop, total_dots, total_sum_of_squares, total_sum_of_squares_loop
from .base import STEP_SIZE_KEY, TunelessOptimizer, finite_or_zero, gate, local_tensor, lr_in

__all__ = ["Polyak", "SPS", "SPSMax", "Momo", "MomoStar"]


def polyak_step_size(loss: Tensor, f_star: float, sq_grad_norm: Tensor, c: float, max_step: float | None) -> Tensor:
    """(f - f*)_+ / (c ||g||^2), capped at ``max_step``; 0 for a zero gradient or a non-finite input."""
    excess = torch.clamp(loss - f_star, min=0.0)
    safe_norm = torch.where(sq_grad_norm > 0, sq_grad_norm, torch.ones_like(sq_grad_norm))
    step = torch.where(sq_grad_norm > 0, excess / (c * safe_norm), torch.zeros_like(excess))
    if max_step is not None:
        step = torch.clamp(step, max=max_step)
    return finite_or_zero(step, loss, sq_grad_norm)


class _PolyakBase(TunelessOptimizer):
    """Shared step of Polyak, SPS and SPS_max: one global ||g||^2, a per-group step size."""

    requires_loss = True

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        dtype, device = self._stat_dtype(), self._stat_device()
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        # A step that is not finite: the vectorized groups compute with zeros (one call over
        # every group: the copies live in buffers keyed by position), the per-parameter loop
        # zeroes each gradient as it uses it; the step size is gated to 0 and the published
        # one keeps its value.
        finite = self._step_finite()
        if finite is not None:
            vectorized = [i for i, group in enumerate(self.param_groups) if self._use_foreach(group) and per_group[i][1]]
            zeroed = iter(self._finite_grads([g for i in vectorized for g in per_group[i][1]]))
            for i in vectorized:
                params, grads = per_group[i]
                per_group[i] = (params, [next(zeroed) for _ in grads])
        partial = torch.zeros((), dtype=dtype, device=device)
        for group, (_, grads) in zip(self.param_groups, per_group):
            reduce = total_sum_of_squares if self._use_foreach(group) else total_sum_of_squares_loop
            partial = partial + reduce(grads, dtype, device)
        sq_grad_norm = self._global_sum(partial.reshape(1))[0]
        for group, (params, grads) in zip(self.param_groups, per_group):
            step = group["lr"] * polyak_step_size(loss, group["f_star"], sq_grad_norm, group["c"], group["max_step"])
            if finite is not None:
                self._publish_step_size(group, gate(finite, step, group.get(STEP_SIZE_KEY, 0.0)))
                step = gate(finite, step, 0.0)
            else:
                self._publish_step_size(group, step)
            if not params:
                continue
            if self._use_foreach(group):
                _multi_tensor_sgd_step(params, grads, step)
            else:
                _single_tensor_sgd_step(params, grads, step, finite)


def momo_star_reset(model: Tensor, level: Tensor, lower_bound: float, scale: Any = 1.0) -> Tensor:
    """MoMo*'s reset of the learned lower bound (Schaipp et al., ICML 2024): where the model's
    value (times ``scale``, MoMo's weight-decay factor 1 + lr * wd) falls below the level, the
    level becomes max(model / 2, lower_bound); elsewhere it is kept."""
    return torch.where(model < scale * level, torch.clamp(model / (2 * scale), min=lower_bound), level)


def momo_star_level(model: Tensor, step: Tensor, sq_norm: Tensor, lower_bound: float) -> Tensor:
    """MoMo*'s level after a step: the model's minimum along the step taken,
    max(h - step * ||d||^2 / 2, lower_bound)."""
    return torch.clamp(model - 0.5 * step * sq_norm, min=lower_bound)


def _single_tensor_sgd_step(params: list[Tensor], grads: list[Tensor], step: Tensor,
                            finite: Tensor | None = None) -> None:
    """x <- x - step * g, one tensor at a time (the readable truth); ``g`` is taken as 0 where
    ``finite`` is False (then ``step`` is 0 too, and x - 0 * 0 is x)."""
    for p, g in zip(params, grads):
        x = local_tensor(p)
        g = g.to(x.dtype)
        if finite is not None:
            g = torch.where(finite, g, 0.0)
        x.sub_(g * step.to(x.dtype))


def _multi_tensor_sgd_step(params: list[Tensor], grads: list[Tensor], step: Tensor) -> None:
    """x <- x - step * g over all tensors at once (grouped by dtype, no temporaries)."""
    locals_ = [local_tensor(p) for p in params]
    by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for p, g in zip(locals_, grads):
        ps, gs = by_dtype.setdefault(p.dtype, ([], []))
        ps.append(p)
        gs.append(g)
    for dt, (ps, gs) in by_dtype.items():
        add_scaled_(ps, gs, (-step).to(dt))


def _single_tensor_ema_(avgs: list[Tensor], values: list[Tensor], keep: Tensor) -> None:
    """avg <- keep * avg + (1 - keep) * value, one tensor at a time."""
    for a, x in zip(avgs, values):
        a.mul_(keep.to(a.dtype)).add_(x.to(a.dtype) * (1 - keep).to(a.dtype))


def _multi_tensor_ema_(avgs: list[Tensor], values: list[Tensor], keep: Tensor) -> None:
    """avg <- keep * avg + (1 - keep) * value over all tensors, without temporaries."""
    if not avgs:
        return
    torch._foreach_mul_(avgs, keep.to(avgs[0].dtype))
    add_scaled_(avgs, values, (1 - keep).to(avgs[0].dtype))


def _check_common(owner: str, lr: Any, f_star: Any, max_step: Any, skip_nonfinite: Any) -> Any:
    """Check lr, f_star, max_step and skip_nonfinite; returns lr (a one-element tensor as a 0-d view)."""
    lr = v.check_lr(owner, lr, recommended=1.0)
    v.check_range(owner, "f_star", f_star, recommended=0.0)
    v.check_optional_range(owner, "max_step", max_step, 0.0, None, inclusive="()")
    v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
    return lr


class Polyak(_PolyakBase):
    r"""Polyak's step size with a known optimal value f*.

    .. math::
        \gamma_k = \mathrm{lr}\cdot\min\Big\{\frac{(f(x_k) - f^*)_+}{\|\nabla f(x_k)\|^2},\ \gamma_{\max}\Big\},
        \qquad x_{k+1} = x_k - \gamma_k \nabla f(x_k)

    with :math:`\|\cdot\|` over every parameter of every group.

    Args:
        params: parameters or param groups.
        lr: multiplier of the step size, for schedulers (default 1.0, the Polyak step itself).
        f_star: the optimal (or a lower-bound) value of the loss (default 0.0, right for
            non-negative losses that can be driven to 0, e.g. interpolating models).
        max_step: optional cap on the step size (default None, no cap).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients, or loss, are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.Polyak([x], f_star=0.0)
        >>> loss = (x ** 2).sum(); loss.backward(); _ = opt.step(loss=loss)
        >>> float(opt.param_groups[0]["effective_lr"])   # 25 / 100
        0.25

    References:
        B. T. Polyak, Introduction to Optimization, 1987, Sec. 5.3.

    .. warning:: A wrong f* is the one way to break it: too high and it stops short of the
       minimum, too low and it keeps oscillating around it. When f* is unknown, use
       :class:`Momo` with ``estimate_lower_bound=True``.
    """

    registry_name = "polyak"

    def __init__(self, params: Any, lr: float = 1.0, *, f_star: float = 0.0, max_step: float | None = None,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        lr = _check_common("Polyak", lr, f_star, max_step, skip_nonfinite)
        super().__init__(params, dict(lr=lr, f_star=float(f_star), c=1.0, max_step=max_step, foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))


class SPS(_PolyakBase):
    r"""Stochastic Polyak step size (SPS) of Loizou et al. (2021), positive-part form.

    .. math::
        \gamma_k = \mathrm{lr}\cdot\min\Big\{\frac{(f_i(x_k) - f_i^*)_+}{c\,\|\nabla f_i(x_k)\|^2},\ \gamma_b\Big\}

    where :math:`f_i` is the minibatch loss and :math:`f_i^*` its optimal value (0 for
    interpolating models). Without ``max_step`` this is SPS; with it, SPS_max.

    Args:
        params: parameters or param groups.
        lr: multiplier of the step size (default 1.0).
        c: the constant of the denominator (default 0.5, the paper's theory and experiments).
        f_star: the minibatch losses' optimal value (default 0.0).
        max_step: the upper bound :math:`\gamma_b` (default None: SPS; a number: SPS_max).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients, or loss, are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    References:
        Loizou, Vaswani, Laradji, Lacoste-Julien, AISTATS 2021, arXiv:2002.10542.
    """

    registry_name = "sps"

    def __init__(self, params: Any, lr: float = 1.0, *, c: float = 0.5, f_star: float = 0.0,
                 max_step: float | None = None, foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = _check_common(owner, lr, f_star, max_step, skip_nonfinite)
        v.check_range(owner, "c", c, 0.0, None, inclusive="()", recommended=0.5)
        super().__init__(params, dict(lr=lr, f_star=float(f_star), c=float(c), max_step=max_step, foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))


class SPSMax(SPS):
    r"""SPS_max: SPS with the upper bound :math:`\gamma_b` on the step size (default 10.0).

    The bound keeps the first steps, where the minibatch gradient can be tiny while the loss is
    not, from jumping far. See :class:`SPS` for the rule and the other arguments.
    """

    registry_name = "sps_max"
    learning_rate_free = False  # the bound gamma_b is a tuned quantity

    def __init__(self, params: Any, lr: float = 1.0, *, c: float = 0.5, f_star: float = 0.0,
                 max_step: float = 10.0, foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        if max_step is None:
            v.fail("SPSMax", "max_step", max_step, "0 < max_step (use SPS for no bound)", 10.0)
        super().__init__(params, lr, c=c, f_star=f_star, max_step=max_step, foreach=foreach,
                         skip_nonfinite=skip_nonfinite)


class Momo(TunelessOptimizer):
    r"""MoMo: momentum with a Polyak-type step, optionally estimating the unknown f* online.

    With averages of the loss, the gradient and :math:`\langle g, x\rangle` (all with weight
    :math:`\beta`, initialized at the first step's values),

    .. math::
        \bar f_k &= \beta \bar f_{k-1} + (1-\beta) f(x_k), \quad
        d_k = \beta d_{k-1} + (1-\beta) g_k, \quad
        \bar\gamma_k = \beta\bar\gamma_{k-1} + (1-\beta)\langle g_k, x_k\rangle \\
        h_k &= \bar f_k + \langle d_k, x_k\rangle - \bar\gamma_k \qquad\text{(the momentum model at } x_k) \\
        \tau_k &= \min\Big\{\mathrm{lr},\ \frac{(h_k - \ell_k)_+}{\|d_k\|^2}\Big\}, \qquad
        x_{k+1} = x_k - \tau_k d_k

    and, with ``estimate_lower_bound=True`` (MoMo*), the lower bound :math:`\ell` is learned:
    if :math:`h_k < \ell_k` it is reset to :math:`\max(h_k/2, \ell_0)` before the step, and
    after it :math:`\ell_{k+1} = \max(h_k - \tfrac12\tau_k\|d_k\|^2,\ \ell_0)`, the minimum of
    the model along the step. :math:`\ell_0` (``lower_bound``) is a known lower bound of the
    loss (0 for non-negative losses); with ``estimate_lower_bound=False`` it is used as f*.

    With ``beta=0`` and a fixed bound this is Polyak's step capped at ``lr``. Weight decay
    follows the paper's proximal form (the bound terms are scaled by 1 + lr·λ and the iterate
    divided by it).

    Args:
        params: parameters or param groups.
        lr: the cap on the step size (default 1.0, the paper's choice for MoMo).
        beta: momentum (default 0.9).
        lower_bound: a known lower bound of the loss, :math:`\ell_0` (default 0.0).
        estimate_lower_bound: learn f* online (MoMo*, default False).
        weight_decay: decoupled-proximal weight decay λ (default 0.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients, or loss, are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    References:
        Schaipp, Ohana, Eickenberg, Defazio, Gower, "MoMo: Momentum Models for Adaptive
        Learning Rates", ICML 2024, arXiv:2305.07583 (matches ``fabian-sp/MoMo`` ``Momo``,
        ``bias_correction=False``; here the bound is kept per param group rather than
        overwritten group after group).
    """

    requires_loss = True
    registry_name = "momo"

    def __init__(self, params: Any, lr: float = 1.0, *, beta: float = 0.9, lower_bound: float = 0.0,
                 estimate_lower_bound: bool = False, weight_decay: float = 0.0,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "beta", beta, 0.0, 1.0, inclusive="[)", recommended=0.9)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_bool(owner, "estimate_lower_bound", estimate_lower_bound)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, beta=float(beta), lower_bound=float(lower_bound),
                                      estimate_lower_bound=estimate_lower_bound,
                                      weight_decay=float(weight_decay), foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))

    def _init_state(self) -> None:
        for group in self.param_groups:
            if "loss_avg" not in group:
                # Running averages shared by all groups (each group holds its own copy so that
                # the state lives in param_groups, where state_dict and checkpointing keep it).
                group["loss_avg"] = self._scalar(0.0)        # \bar f_k
                group["grad_dot_x_avg"] = self._scalar(0.0)  # \bar\gamma_k
                group["f_star_estimate"] = self._scalar(group["lower_bound"])  # \ell_k
                group["momo_step"] = 0
            # The steps taken, a 0-d int64 tensor on the parameters' device: a skipped step does
            # not count, and whether a step is the first is decided there (no host read). A
            # Python int (a checkpoint from before, a test) is taken over as it is.
            step, device = group["momo_step"], self._stat_device()
            if not isinstance(step, Tensor):
                group["momo_step"] = torch.full((), int(step), dtype=torch.int64, device=device)
            elif step.device != device:  # a checkpoint loaded on another device
                group["momo_step"] = step.to(device)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._init_state()
        dtype, device = self._stat_dtype(), self._stat_device()
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        first = self.param_groups[0]["momo_step"] == 0
        ok_loss = torch.isfinite(loss)
        # A step that is not finite (``finite`` False): computed from zero gradients with the
        # weight of the past at 1 (the averages d_k keep their values); the scalar averages,
        # the bound, the counter and the published step size keep theirs (gated), the step
        # size applied is 0 and the weight-decay division is by 1.
        finite = self._step_finite()
        ok = ok_loss if finite is None else ok_loss & finite
        one = torch.ones((), dtype=dtype, device=device)
        zero = torch.zeros((), dtype=dtype, device=device)
        # 1. Update the gradient averages d_k and gather <g, x>, <d, x> and ||d||^2.
        stats = torch.zeros(3, dtype=dtype, device=device)
        keeps = []
        for group, (params, grads) in zip(self.param_groups, per_group):
            # Weight of the past: beta, 0 at the first step (averages start at the first
            # values), 1 when the loss is not finite (the step is skipped).
            keep = torch.where(ok, torch.where(first, zero, torch.full((), group["beta"], dtype=dtype, device=device)), one)
            keeps.append(keep)
            xs = [local_tensor(p) for p in params]
            ds = [local_tensor(self._grad_avg(p)) for p in params]
            if self._use_foreach(group):
                # zeros on a step that is not finite; the buffers are reused by the next group,
                # whose gradients are taken only once this group's are used
                grads = self._finite_grads(grads)
                g_dot_x = total_dots((grads, xs), ((0, 1),), dtype, device, self._scratch())
                _multi_tensor_ema_(ds, grads, keep)
                stats = stats + torch.cat([g_dot_x, total_dots((ds, xs), ((0, 1), (0, 0)), dtype, device,
                                                               self._scratch())])
            else:
                if finite is not None:
                    grads = [torch.where(finite, g, 0.0) for g in grads]
                g_dot_x = total_dot_loop(grads, xs, dtype, device)
                _single_tensor_ema_(ds, grads, keep)
                stats = stats + torch.stack([g_dot_x, total_dot_loop(ds, xs, dtype, device),
                                             total_sum_of_squares_loop(ds, dtype, device)])
        g_dot_x, d_dot_x, d_sq = self._global_sum(stats).unbind(0)
        # 2. Scalar averages, the model value h_k, the step size and the bound; then the step.
        safe_loss = torch.where(ok_loss, loss, torch.zeros_like(loss))
        for group, keep, (params, _) in zip(self.param_groups, keeps, per_group):
            old_loss_avg, old_gx_avg, old_ell = group["loss_avg"], group["grad_dot_x_avg"], group["f_star_estimate"]
            loss_avg = keep * old_loss_avg + (1 - keep) * safe_loss
            gx_avg = keep * old_gx_avg + (1 - keep) * g_dot_x
            lr, wd, lb0 = lr_in(group["lr"], dtype), group["weight_decay"], group["lower_bound"]
            scale = 1.0 + lr * wd
            ell = old_ell
            if group["estimate_lower_bound"]:
                cap = scale * loss_avg + d_dot_x - scale * gx_avg
                ell = momo_star_reset(cap, ell, lb0, scale)
            numerator = scale * (loss_avg - ell) + d_dot_x - scale * gx_avg
            safe_sq = torch.where(d_sq > 0, d_sq, torch.ones_like(d_sq))
            t1 = torch.where(d_sq > 0, torch.clamp(numerator, min=0.0) / safe_sq, torch.zeros_like(d_sq))
            # (a tensor lr: torch.minimum, which takes a 0-d CPU lr beside CUDA tensors; clamp does not)
            capped = torch.minimum(t1, lr) if isinstance(lr, Tensor) else torch.clamp(t1, max=lr)
            tau = finite_or_zero(capped, loss, d_sq, numerator)
            if group["estimate_lower_bound"]:
                h = loss_avg + d_dot_x - gx_avg  # the model's value at x_k
                new_ell = momo_star_level(h, tau, d_sq, lb0)
                ell = torch.where(ok_loss & torch.isfinite(new_ell), new_ell, ell)
            group["loss_avg"] = gate(finite, loss_avg, old_loss_avg)
            group["grad_dot_x_avg"] = gate(finite, gx_avg, old_gx_avg)
            group["f_star_estimate"] = gate(finite, ell, old_ell)
            group["momo_step"] = group["momo_step"] + (1 if finite is None else finite)
            self._publish_step_size(group, gate(finite, tau, group.get(STEP_SIZE_KEY, 0.0)))
            if finite is not None:
                tau = gate(finite, tau, 0.0)
                if wd > 0:  # divide by exactly 1 on a skipped step (a 0-d divisor in the statistics
                    # dtype: on the CPU the quotients are those of the number, checked bit for bit)
                    scale = gate(finite, scale if isinstance(scale, Tensor) else
                                 torch.full((), scale, dtype=dtype, device=device), 1.0)
            avgs = [local_tensor(self.state[p]["grad_avg"]) for p in params]
            xs = [local_tensor(p) for p in params]
            if self._use_foreach(group):
                _multi_tensor_sgd_step(params, avgs, tau)
                if wd > 0 and xs:
                    torch._foreach_div_(xs, scale)
            else:
                _single_tensor_sgd_step(params, avgs, tau)
                if wd > 0:
                    for x in xs:
                        x.div_(scale)

    def _grad_avg(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "grad_avg" not in state:
            # Exponential moving average of the gradients, d_k (set to g_1 at the first step).
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["grad_avg"]

    @property
    def f_star_estimates(self) -> list[Tensor]:
        """The current lower-bound estimate of each param group (0-d tensors, no sync)."""
        return [g.get("f_star_estimate", torch.tensor(g["lower_bound"])) for g in self.param_groups]


class MomoStar(Momo):
    r"""MoMo*: :class:`Momo` that learns the unknown optimal value f* online (``estimate_lower_bound=True``).

    The variant for losses whose minimum is unknown and not 0 (noisy regression, label
    noise). ``lower_bound`` must still be a true lower bound of the loss (0 for non-negative
    losses): the estimate is reset towards it by halving, as in the paper.

    .. warning:: The estimate is a heuristic, not a certified bound: on ill-conditioned problems
       it can overshoot f* for a while, and the step then shrinks until a reset lowers it again.
    """

    registry_name = "momo_star"

    def __init__(self, params: Any, lr: float = 1.0, *, beta: float = 0.9, lower_bound: float = 0.0,
                 weight_decay: float = 0.0, foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        super().__init__(params, lr, beta=beta, lower_bound=lower_bound, estimate_lower_bound=True,
                         weight_decay=weight_decay, foreach=foreach, skip_nonfinite=skip_nonfinite)
