r"""ScheduleFree+: Schedule-Free AdamC whose step size is a Polyak step.

Source: A. Defazio, 2026, the reference ("research") implementation
``facebookresearch/schedule_free`` ``schedulefree/adamc_schedulefree_plus_paper.py``, class
``AdamCScheduleFreePlusPaper``, read for the details and rewritten here from its description
(no PyPI release has it). Built on Schedule-Free (Defazio, Yang, Mehta, Mishchenko, Khaled,
Cutkosky, "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682), AdamC's weight decay
(Defazio, "Why Gradients Rapidly Increase Near the End of Training", arXiv:2506.02285) and the
Schedule-Free Polyak numerator (also in Oikonomou, Buchholz, Pun, Gower, Loizou, 2025). Tested
step by step against a plain loop written from the description, with the three sequences
stored explicitly (``tests/test_sf_plus.py``).

Differences from the reference, each deliberate and tested:

* **No host synchronization.** The reference reads the gradient's L1 norm, the
  inner-product term and the loss on the host at every step; here they stay 0-d tensors on
  the device, and so do the step size, its running maximum and the averaging weights.
* **The loss** comes through ``step(loss=...)`` or a closure (the reference's ``step_func(f)``);
  without it, :class:`~tuneless.errors.LossRequiredError`. Under data parallelism the ranks'
  losses are averaged, as for every loss-based tuneless method (:mod:`tuneless.distributed`);
  the reference uses each rank's own loss under DDP, so its replicas' step sizes differ.
* **Memory**: only :math:`z` and Adam's two moments are stored; the parameters hold
  :math:`y` in train mode and :math:`x` in eval mode, and :math:`x` is recovered from them when
  needed (the reference stores :math:`x`, :math:`y` and :math:`z` besides the parameters).
* **Modes** as every tuneless Schedule-Free optimizer: it starts in train mode, the mode is
  saved in ``state_dict``, ``step`` in eval mode raises
  :class:`~tuneless.errors.WrongModeError`, and ``evaluation_point()`` swaps :math:`x` in.
* **lr = 0 freezes the group** (the reference floors ``lr`` at ``eps`` and keeps moving);
  for 0 < lr < eps the floor is kept.
* Edge cases: a zero gradient gives a step of 0 (the reference divides by 0). A step whose
  loss or gradients are not all finite is skipped (``skip_nonfinite``, the default): y, z,
  Adam's moments, the running norm, the largest step, the averaging weights, :math:`\beta` and
  the step count stay as they were. With ``skip_nonfinite=False``, a non-finite loss or
  gradient norm gives a step of 0 and a non-finite norm is kept out of its running average, as
  before; a non-finite gradient reaches the moments, as in torch.optim.
* **The step count is a 0-d tensor on the device** (the reference's is a host number), so that
  a skipped step is not counted without a host sync; the bias corrections, the averaging
  weights' :math:`(k+1)^r` and the annealed :math:`\beta` are computed from it on the device in
  float64 (float32 on MPS), the reference's host doubles. With annealing, the :math:`\beta`
  that formed :math:`y` is a 0-d tensor too.
* With ``sf_beta1`` annealed, a parameter that has no gradient at a step is moved to the new
  interpolation :math:`y = \beta_k x + (1-\beta_k) z` with its :math:`x` and :math:`z`
  unchanged (the reference leaves its :math:`y` as formed with the previous :math:`\beta`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import cache_blocks, coefficient_dtype, total_abs_sum, total_abs_sum_loop, total_dot, total_dot_loop
from .base import STEP_SIZE_KEY, finite_or_zero, gate, local_tensor, lr_in, lr_is_zero, lr_moves
from .momo_adam import Coefficients, as_coefficient, divided, foreach_divided, host_dtype, representable_eps
from .schedule_free import MODE_KEY, _ScheduleFreeBase

__all__ = ["ScheduleFreePlus"]

#: sqrt(pi/2): the expected ratio of the L1 to the L2 norm of a Gaussian vector, per coordinate
#: (E|g_i| = sqrt(2/pi) sigma), which turns the L1 norm into the scale of Adam's normalized step
L1_TO_L2 = math.sqrt(math.pi / 2)


def annealed_sf_beta1(sf_beta1: float, sf_beta1_max: float, anneal_steps: int, k: int | Tensor) -> float | Tensor:
    """The interpolation weight at step ``k`` (0-based): ``sf_beta1``, or with ``anneal_steps`` > 0
    the log-space interpolation of 1 - beta from 1 - ``sf_beta1`` to 1 - ``sf_beta1_max``.

    ``k`` a 0-d floating tensor (the count kept on the device): the same formula on the device, a
    0-d tensor in ``k``'s dtype (in float64 on the CPU, bit for bit the host's result)."""
    if anneal_steps <= 0:
        return sf_beta1
    if isinstance(k, Tensor):
        progress_t = torch.clamp(k / anneal_steps, max=1.0)
        return 1.0 - torch.exp(math.log(1.0 - sf_beta1) * (1.0 - progress_t)
                               + math.log(1.0 - sf_beta1_max) * progress_t)
    progress = min(k / anneal_steps, 1.0)
    return 1.0 - math.exp(math.log(1.0 - sf_beta1) * (1.0 - progress) + math.log(1.0 - sf_beta1_max) * progress)


def _lerp(start: Tensor, end: Tensor, weight: float | Tensor) -> Tensor:
    """``torch.lerp(start, end, weight)``, also for a 0-d tensor ``weight`` (an annealed beta, on
    the device) with the result of a number ``weight``: a tensor weight must have the tensors'
    dtype, so 16-bit tensors are interpolated in float32, as torch does with a number."""
    if not isinstance(weight, Tensor):
        return torch.lerp(start, end, weight)
    dtype = coefficient_dtype(start)
    if dtype == start.dtype:
        return torch.lerp(start, end, weight.to(dtype))
    return torch.lerp(start.to(dtype), end.to(dtype), weight.to(dtype)).to(start.dtype)


def _lerp_into(out: list[Tensor], start: list[Tensor], end: list[Tensor], weight: float | Tensor) -> None:
    """``out <- lerp(start, end, weight)`` over lists (``out`` may be ``start``), with
    ``torch._foreach_*``; a 0-d tensor ``weight`` as in :func:`_lerp`."""
    dtype = coefficient_dtype(start[0])
    if isinstance(weight, Tensor) and dtype != start[0].dtype:  # 16-bit: in float32
        new = torch._foreach_lerp([t.to(dtype) for t in start], [t.to(dtype) for t in end],
                                  [weight.to(dtype)] * len(out))
        torch._foreach_copy_(out, new)
        return
    if out is not start:
        torch._foreach_copy_(out, start)
    torch._foreach_lerp_(out, end, [weight.to(dtype)] * len(out) if isinstance(weight, Tensor) else weight)


class ScheduleFreePlus(_ScheduleFreeBase):
    r"""ScheduleFree+: Schedule-Free AdamW with a Polyak step size and AdamC weight decay.

    The three sequences of Schedule-Free: :math:`z` (Adam's iterate), :math:`x` (its weighted
    average, the point to evaluate) and :math:`y = \beta_k x + (1-\beta_k) z` (where the
    gradient :math:`g_k = \nabla f(y_k)` and the loss :math:`f(y_k)` are taken). At step
    :math:`k` (counted from 0):

    .. math::
        \ell_k &= \beta_p \ell_{k-1} + (1-\beta_p)\sqrt{\pi/2}\,\|g_k\|_1, \qquad
        \hat\ell_k = \ell_k / (1-\beta_p^{k+1}) \\
        \gamma_k &= \mathrm{lr}\cdot\frac{\big(f(y_k) + \beta_k\langle g_k, z_k - x_k\rangle\big)_+}{\hat\ell_k}
        \qquad\text{(the Polyak step, } f^* = 0\text{)} \\
        z &\leftarrow z_k - \gamma_k^2 \lambda\, y_k \qquad\text{(AdamC: decay at } y\text{, scaled by } \gamma_k^2) \\
        m_k &= \beta_1 m_{k-1} + (1-\beta_1) g_k, \quad v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2, \quad
        z_{k+1} = z - \gamma_k \frac{m_k / (1-\beta_1^{k+1})}{\sqrt{v_k / (1-\beta_2^{k+1})} + \epsilon} \\
        x_{k+1} &= (1-c_{k+1})\,x_k + c_{k+1}\, z_{k+1}, \qquad
        y_{k+1} = \beta_k x_{k+1} + (1-\beta_k) z_{k+1}

    with the averaging weights :math:`c_{k+1} = w_k / \sum_{i \le k} w_i`,
    :math:`w_k = (k+1)^r\,\gamma_{\max,k}^{\,p}`, :math:`\gamma_{\max,k} = \max(\epsilon,
    \gamma_0, \dots, \gamma_k)` (:math:`c = 1` during the first ``c_warmup`` steps, whose
    weights are not counted). The numerator is the loss linearized at :math:`z`:
    :math:`f(y) + \langle g, z - y\rangle`, since :math:`z - y = \beta (z - x)`. The
    interpolation weight :math:`\beta_k` is ``sf_beta1``, or, with ``sf_beta1_anneal_steps``
    :math:`T > 0`, :math:`1 - \beta_k = (1-\beta_{\text{start}})^{1-t}(1-\beta_{\max})^{t}`,
    :math:`t = \min(k/T, 1)`. :math:`\gamma_k` is published as ``effective_lr``.

    Args:
        params: parameters or param groups.
        lr: multiplier of the Polyak step, for lr schedulers (default 1.0; keep it).
        betas: :math:`(\beta_1, \beta_2)` of Adam's moments (default (0.9, 0.95), the reference's).
        sf_beta1: Schedule-Free's interpolation weight :math:`\beta`, in (0, 1) (default 0.9).
        eps: added to Adam's denominator, and the floor of the step's running maximum (default 1e-8).
        weight_decay: AdamC's decoupled decay :math:`\lambda`, applied to :math:`z` at
            :math:`y` with the factor :math:`\gamma_k^2`; values like 20-50, not AdamW's 0.1
            (default 0).
        r: polynomial weighting power of the average (default 0; the reference suggests
            trying 2 on long runs).
        polyak_beta: running average :math:`\beta_p` of the gradient's L1 norm, bias-corrected
            (default 0: the current norm).
        c_warmup: steps during which :math:`x` follows :math:`z` (:math:`c = 1`; default 0).
        sf_beta1_anneal_steps: anneal :math:`\beta` from ``sf_beta1`` to ``sf_beta1_max`` over
            this many steps, in log space on :math:`1-\beta` (default 0: no annealing).
        sf_beta1_max: the annealed :math:`\beta`'s final value (default 0.965).
        weight_lr_power: the power :math:`p` of the averaging weights (default 2.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients or loss are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    ``sf_beta1``, ``sf_beta1_max``, ``sf_beta1_anneal_steps`` and ``polyak_beta`` are global: the
    first param group's are used, as in the reference.

    Needs the loss at every step: ``opt.step(loss=loss)`` after ``loss.backward()``, or a closure.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.ScheduleFreePlus([x])
        >>> for _ in range(200):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step(loss=loss)
        >>> with opt.evaluation_point():   # the average x
        ...     bool((x ** 2).sum() < 0.1)
        True

    References:
        Defazio, 2026, ``facebookresearch/schedule_free``
        ``schedulefree/adamc_schedulefree_plus_paper.py`` (``AdamCScheduleFreePlusPaper``; see
        the module docstring for where tuneless differs); Defazio et al., "The Road Less
        Scheduled", NeurIPS 2024, arXiv:2405.15682.

    .. warning:: The Polyak step assumes the loss's minimum is 0 (f* = 0); with a loss whose
       minimum is well above 0 (label smoothing, an L2 term in the loss) the step stays large
       near the minimum. Evaluate at :math:`x` (``optimizer.eval()`` or ``evaluation_point()``);
       models with BatchNorm need :func:`~tuneless.optim.schedule_free.recompute_batchnorm_statistics`.
    """

    requires_loss = True
    registry_name = "sf_plus"
    learning_rate_free = True

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.95),
                 sf_beta1: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0, r: float = 0.0,
                 polyak_beta: float = 0.0, c_warmup: int = 0, sf_beta1_anneal_steps: int = 0,
                 sf_beta1_max: float = 0.965, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.95))
        v.check_range(owner, "sf_beta1", sf_beta1, 0.0, 1.0, inclusive="()", recommended=0.9)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "r", r, 0.0, None, recommended=0.0)
        v.check_range(owner, "polyak_beta", polyak_beta, 0.0, 1.0, inclusive="[)", recommended=0.0)
        v.check_range(owner, "c_warmup", c_warmup, 0, None, integer=True, recommended=0)
        v.check_range(owner, "sf_beta1_anneal_steps", sf_beta1_anneal_steps, 0, None, integer=True, recommended=0)
        v.check_range(owner, "sf_beta1_max", sf_beta1_max, 0.0, 1.0, inclusive="()", recommended=0.965)
        v.check_range(owner, "weight_lr_power", weight_lr_power, 0.0, None, recommended=2.0)
        if foreach is not None:
            v.check_bool(owner, "foreach", foreach)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(
            lr=lr, betas=(float(betas[0]), float(betas[1])), sf_beta1=float(sf_beta1), eps=float(eps),
            weight_decay=float(weight_decay), r=float(r), polyak_beta=float(polyak_beta), c_warmup=int(c_warmup),
            sf_beta1_anneal_steps=int(sf_beta1_anneal_steps), sf_beta1_max=float(sf_beta1_max),
            weight_lr_power=float(weight_lr_power), foreach=foreach, skip_nonfinite=skip_nonfinite,
            **{MODE_KEY: True}))

    def _momentum(self, group: dict[str, Any]) -> float | Tensor:
        """The beta with which the parameters' y was formed (y = beta x + (1 - beta) z): a number,
        or with annealing (from the first step on) a 0-d tensor, which the mode switches below
        apply without reading it. Before the first step, x = y = z: ``sf_beta1``."""
        return group.get("y_beta", group["sf_beta1"])

    # ------------------------------------------------------------------ mode (an annealed beta)

    def _lerp_params_towards_z(self, group: dict[str, Any], weight: float | Tensor) -> None:
        """The mode switches' ``p.lerp_(z, weight)``, also for a 0-d tensor ``weight`` (an annealed
        beta, on the device: applied in the parameters' dtype, no host read)."""
        if not isinstance(weight, Tensor):
            super()._lerp_params_towards_z(group, weight)
            return
        params = [p for p in group["params"] if self._z_key in self.state.get(p, {})]
        ps = [local_tensor(p) for p in params]
        zs = [local_tensor(self.state[p][self._z_key]) for p in params]
        if self._use_foreach(group):
            for p_run, z_run in cache_blocks(ps, zs):
                _lerp_into(p_run, p_run, z_run, weight)
        else:
            for p, z in zip(ps, zs):
                p.copy_(_lerp(p, z, weight))

    def _kept_y(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """See :meth:`~tuneless.optim.schedule_free._ScheduleFreeBase._kept_y`; also for a 0-d
        tensor beta (annealing), compared on the device."""
        beta = self._momentum(group)
        if not isinstance(beta, Tensor):
            return super()._kept_y(group)
        weight = 1.0 - 1.0 / beta
        kept = []
        for p in group["params"]:
            state = self.state.get(p, {})
            y = state.pop(self._y_key, None)
            if y is None or self._z_key not in state:
                continue
            x, y = local_tensor(p), local_tensor(y)
            unchanged = torch.eq(_lerp(y, local_tensor(state[self._z_key]), weight), x).all()
            kept.append((x, y, unchanged))
        return kept

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """The learned scalars, created at the first step in every group (0-d tensors), with the
        step count ``k`` (a 0-d int64 tensor, so that a skipped step is not counted without a
        host sync) and ``y_beta``, the beta that formed the parameters' y (a number, a 0-d tensor
        with annealing). A checkpoint that kept ``k`` or ``y_beta`` on the host is converted."""
        device = self._stat_device()
        annealing = self.param_groups[0]["sf_beta1_anneal_steps"] > 0
        for group in self.param_groups:
            k = group.get("k", 0)
            if not isinstance(k, Tensor):
                group["k"] = torch.full((), int(k), dtype=torch.int64, device=device)
            y_beta = group.setdefault("y_beta", group["sf_beta1"])
            if annealing and not isinstance(y_beta, Tensor):
                group["y_beta"] = torch.full((), float(y_beta), dtype=host_dtype(device), device=device)
            if "lr_max" not in group:
                group["lr_max"] = self._scalar(group["eps"])  # the largest step so far (floored at eps)
                # the sum of the averaging weights, in float64 (float32 on MPS, which has none): with
                # tiny gradients the step is ~1e30 and its square overflows float32 (the reference
                # sums host doubles)
                group["weight_sum"] = torch.zeros((), device=device,
                                                  dtype=torch.float32 if device.type == "mps" else torch.float64)
                group["grad_l1_ema"] = self._scalar(0.0)       # the running average of sqrt(pi/2) ||g||_1 (biased)

    def _buffers(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This parameter's (local) z, m and v, created at its first gradient (sharded like it)."""
        state = self.state[p]
        if "z" not in state:
            # The base iterate z (starts at the initial point, where x = y = z).
            state["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
            # Exponential moving average of the gradients, m (Adam's first moment, biased).
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Exponential moving average of the squared gradients, v (biased).
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return local_tensor(state["z"]), local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])

    # ------------------------------------------------------------------ the step

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._init_state()
        dtype, device = self._stat_dtype(), self._stat_device()
        first = self.param_groups[0]
        k0 = first["k"].to(host_dtype(device))  # the steps taken, for the global coefficients
        beta = annealed_sf_beta1(first["sf_beta1"], first["sf_beta1_max"], first["sf_beta1_anneal_steps"], k0)
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        # A step that is not finite (finite False) is computed from zero gradients, with the step
        # size 0, Adam's decays 1, y kept, and every learned scalar and count kept.
        finite = self._step_finite()
        if finite is not None:
            zeroed = iter(self._finite_grads([g for _, grads in per_group for g in grads]))
            per_group = [(params, [next(zeroed) for _ in grads]) for params, grads in per_group]

        # 1. The sums: ||g||_1 and beta <g, z - x> = (beta / y_beta) <g, z - y> (each group's y
        #    was formed with its y_beta).
        stats = torch.zeros(2, dtype=dtype, device=device)
        for group, (params, grads) in zip(self.param_groups, per_group):
            if not params:
                continue
            ys = [local_tensor(p) for p in params]
            zs = [self._buffers(p)[0] for p in params]
            fn = _multi_tensor_statistics if self._use_foreach(group) else _single_tensor_statistics
            stats = stats + fn(ys, grads, zs, _ratio(beta, group["y_beta"]), dtype, device)
        grad_l1, inner = self._global_sum(stats).unbind(0)

        # 2. The Polyak step (global), from the bias-corrected running L1 norm.
        polyak_beta, old_ema = first["polyak_beta"], first["grad_l1_ema"]
        ok_norm = torch.isfinite(grad_l1)
        l1_ema = polyak_beta * old_ema + (1 - polyak_beta) * L1_TO_L2 * grad_l1
        l1_ema = gate(finite, torch.where(ok_norm, l1_ema, old_ema), old_ema)
        denominator = l1_ema / as_coefficient(1.0 - polyak_beta ** (k0 + 1), l1_ema)
        numerator = loss + inner
        positive = denominator > 0
        polyak = torch.where(positive, torch.clamp(numerator, min=0.0)
                             / torch.where(positive, denominator, torch.ones_like(denominator)),
                             torch.zeros_like(denominator))
        polyak = finite_or_zero(polyak, loss, numerator, grad_l1)
        if finite is not None:
            polyak = torch.where(finite, polyak, torch.zeros_like(polyak))

        # 3. Each group: its step size, the averaging weight, then the update of z, x and y.
        for group, (params, grads) in zip(self.param_groups, per_group):
            group["grad_l1_ema"] = l1_ema
            k = group["k"]
            group["k"] = k + (1 if finite is None else finite.to(k.dtype))
            k = k.to(host_dtype(device))
            published = group.get(STEP_SIZE_KEY)
            if lr_is_zero(group["lr"]):  # lr = 0 freezes the group: neither z nor the average x moves
                self._publish_step_size(group, _kept(finite, torch.zeros_like(polyak), published))
                continue
            if isinstance(group["lr"], Tensor):  # never read on the host; a tensor lr of 0: step 0, weight 0
                moves = lr_moves(group["lr"], polyak)
                step_size = torch.clamp(lr_in(group["lr"], polyak.dtype), min=group["eps"]) * polyak * moves
            else:
                moves, step_size = None, max(group["lr"], group["eps"]) * polyak
            self._publish_step_size(group, _kept(finite, step_size, published))
            lr_max = group["lr_max"] = torch.maximum(step_size, group["lr_max"])  # (a step of 0: lr_max >= eps stays)
            weight_sum = group["weight_sum"]
            weight = (k + 1) ** group["r"] * lr_max.to(weight_sum.dtype) ** group["weight_lr_power"]
            if moves is not None:
                weight = weight * moves.to(weight.dtype)
            weight = gate(finite, weight, 0.0)
            if group["c_warmup"] > 0:  # the first c_warmup steps: c = 1, their weights not counted
                warming = k < group["c_warmup"]
                weight = torch.where(warming, torch.zeros_like(weight), weight)
            weight_sum = group["weight_sum"] = weight_sum + weight
            average_weight = torch.where(weight_sum > 0, weight / torch.where(weight_sum > 0, weight_sum,
                                                                              torch.ones_like(weight_sum)),
                                         torch.zeros_like(weight_sum)).to(step_size.dtype)
            if group["c_warmup"] > 0:
                average_weight = torch.where(warming, torch.ones_like(average_weight), average_weight)
            y_beta = group["y_beta"]
            group["y_beta"] = _kept(finite, beta, y_beta) if isinstance(beta, Tensor) else beta
            beta1, beta2 = group["betas"]
            if params:
                ys = [local_tensor(p) for p in params]
                zs, ms, vs = (list(t) for t in zip(*(self._buffers(p) for p in params)))
                fn = _multi_tensor_apply if self._use_foreach(group) else _single_tensor_apply
                fn(ys, grads, zs, ms, vs, step_size=step_size, average_weight=average_weight, y_beta=y_beta,
                   beta=beta, decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                   bias_correction1=1.0 - beta1 ** (k + 1), bias_correction2=1.0 - beta2 ** (k + 1),
                   eps=group["eps"], finite=finite)
            self._move_idle(group, params, y_beta, beta, finite)

    def _move_idle(self, group: dict[str, Any], stepped: list[Tensor], y_beta: float | Tensor, beta: float | Tensor,
                   finite: Tensor | None) -> None:
        """Parameters without a gradient at this step: when beta changed (annealing), y moves to
        the new interpolation (x and z unchanged); on the device, where beta is a tensor (and not
        at a step that is not finite)."""
        if not isinstance(beta, Tensor) and not isinstance(y_beta, Tensor):
            if beta == y_beta:
                return
            move = None
        else:
            move = torch.as_tensor(beta != y_beta)
            if finite is not None:
                move = move & finite
        ids = {id(p) for p in stepped}
        for p in group["params"]:
            if id(p) in ids or "z" not in self.state.get(p, {}):
                continue
            y, z = local_tensor(p), local_tensor(self.state[p]["z"])
            moved = _lerp(z, _lerp(y, z, 1.0 - 1.0 / y_beta), beta)
            y.copy_(moved if move is None else torch.where(move, moved, y))


def _ratio(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    """``a / b`` as host numbers would give it (a 0-d tensor in float64 when either is one)."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return a / b
    like = a if isinstance(a, Tensor) else b
    return torch.as_tensor(a, dtype=like.dtype, device=like.device) / torch.as_tensor(b, dtype=like.dtype,
                                                                                        device=like.device)


def _kept(finite: Tensor | None, new: Tensor, old: Tensor | float | None) -> Tensor:
    """``new``, or ``old`` (when there is one) where the step is not finite."""
    return new if old is None else gate(finite, new, old)


# ---------------------------------------------------------------------------- per-parameter (the truth)


def _single_tensor_statistics(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], inner_scale: float | Tensor,
                              dtype: torch.dtype, device: torch.device) -> Tensor:
    """(||g||_1, inner_scale <g, z - y>) over these tensors."""
    diffs = [z - y for y, z in zip(ys, zs)]
    inner = total_dot_loop(grads, diffs, dtype, device)
    return torch.stack([total_abs_sum_loop(grads, dtype, device), _scaled(inner_scale, inner)])


def _scaled(scale: float | Tensor, value: Tensor) -> Tensor:
    """``scale * value``, a tensor ``scale`` (a host double on the device) rounded as a number would be."""
    return (as_coefficient(scale, value) if isinstance(scale, Tensor) else scale) * value


class _Checked(NamedTuple):
    """A checked step's coefficients for the update (0-d tensors in host_dtype): where the step
    is not finite, the decays of m and v are 1, and y stays (the weights of y <- z and of y <- x, 1
    and beta where it is finite, are 0)."""

    decay1: Tensor
    decay2: Tensor
    keep: Tensor
    beta: Tensor


def _checked(finite: Tensor, beta: float | Tensor, beta1: float, beta2: float, dtype: torch.dtype) -> _Checked:
    def full(value: float | Tensor) -> Tensor:  # (a fill, not a copy from the host)
        if isinstance(value, Tensor):
            return value.to(dtype)
        return torch.full((), value, dtype=dtype, device=finite.device)

    return _Checked(gate(finite, full(beta1), 1.0), gate(finite, full(beta2), 1.0), finite.to(dtype),
                    gate(finite, full(beta), 0.0))


def _quotient(value: Tensor, host: Tensor) -> Tensor:
    """``value / host`` in ``value``'s dtype, as with a host number ``host`` (a 0-d tensor in
    double): computed in :func:`~tuneless.optim._batched.coefficient_dtype`, then rounded."""
    return (value.to(as_coefficient(host, value).dtype) / as_coefficient(host, value)).to(value.dtype)


def _single_tensor_apply(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], ms: list[Tensor],
                         vs: list[Tensor], *, step_size: Tensor, average_weight: Tensor, y_beta: float | Tensor,
                         beta: float | Tensor, decay: float, beta1: float, beta2: float, bias_correction1: Tensor,
                         bias_correction2: Tensor, eps: float, finite: Tensor | None) -> None:
    """One step of every tensor (see :class:`ScheduleFreePlus`): x from y and z, AdamC decay,
    Adam's step on z, the average x, and the new y, one tensor at a time.

    ``finite`` False (a step that is not finite): the gradients are 0, ``step_size`` is 0 and
    the moments' decays are 1, so that z, m and v keep their values; y keeps its own (a new y
    made from the x recovered from it would differ by rounding)."""
    checked = None if finite is None else _checked(finite, beta, beta1, beta2, bias_correction1.dtype)
    cast = Coefficients()
    quotients: dict[torch.dtype, Tensor] = {}
    for y, g, z, m, v_ in zip(ys, grads, zs, ms, vs):
        g = g.to(m.dtype)
        gamma = step_size.to(y.dtype)
        c = average_weight.to(y.dtype)
        if y.dtype not in quotients:
            quotients[y.dtype] = _quotient(gamma, bias_correction1)
        x = _lerp(y, z, 1.0 - 1.0 / y_beta)  # x = (y - (1 - y_beta) z) / y_beta
        if decay != 0.0:
            z.sub_(y * (gamma * gamma * decay))
        m.mul_(beta1 if checked is None else cast(checked.decay1, m)).add_(g, alpha=1 - beta1)
        v_.mul_(beta2 if checked is None else cast(checked.decay2, v_)).addcmul_(g, g, value=1 - beta2)
        denom = divided(v_, bias_correction2, cast).sqrt_().add_(representable_eps(eps, v_.dtype))
        z.sub_((m / denom).mul_(quotients[y.dtype]))
        x.mul_(1 - c).add_(z * c)  # the average: x <- (1 - c) x + c z
        if checked is None:
            y.copy_(_lerp(z, x, beta))  # y = beta x + (1 - beta) z
        elif coefficient_dtype(y) == y.dtype:  # y <- z (a weight of 1: exactly), then towards x by beta
            y.lerp_(z, cast(checked.keep, y)).lerp_(x, cast(checked.beta, y))  # (weights 0 if not finite)
        else:  # 16-bit: interpolated in float32, kept where the step is finite
            y.copy_(torch.where(finite, _lerp(z, x, beta), y))


# ---------------------------------------------------------------------------- vectorized


def _multi_tensor_statistics(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], inner_scale: float | Tensor,
                             dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`_single_tensor_statistics` with ``torch._foreach_*``, block by block on the CPU."""
    l1 = torch.zeros((), dtype=dtype, device=device)
    inner = torch.zeros((), dtype=dtype, device=device)
    for y, g, z in cache_blocks(ys, grads, zs):
        diffs = torch._foreach_sub(z, y)
        l1 = l1 + total_abs_sum(g, dtype, device)
        inner = inner + total_dot(g, diffs, dtype, device)
    return torch.stack([l1, _scaled(inner_scale, inner)])


def _multi_tensor_apply(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], ms: list[Tensor],
                        vs: list[Tensor], *, step_size: Tensor, average_weight: Tensor, y_beta: float | Tensor,
                        beta: float | Tensor, decay: float, beta1: float, beta2: float, bias_correction1: Tensor,
                        bias_correction2: Tensor, eps: float, finite: Tensor | None) -> None:
    """:func:`_single_tensor_apply` with ``torch._foreach_*``, block by block on the CPU (the
    block's x and Adam's denominator are the only temporaries). A checked step moves y to z, then
    towards x by beta, with weights 0 where the step is not finite (y stays); 16-bit tensors make
    the new y in the buffer of m / D instead, kept where the step is finite."""
    checked = None if finite is None else _checked(finite, beta, beta1, beta2, bias_correction1.dtype)
    for y, g, z, m, v_ in cache_blocks(ys, grads, zs, ms, vs):
        like = y[0]
        n = len(y)
        gamma = step_size.to(like.dtype)
        c = average_weight.to(like.dtype)
        g = [gi.to(mi.dtype) for gi, mi in zip(g, m)]
        if isinstance(y_beta, Tensor):  # (annealing: a weight on the device)
            x = [t.clone() for t in y]
            _lerp_into(x, x, z, 1.0 - 1.0 / y_beta)
        else:
            x = torch._foreach_lerp(y, z, 1.0 - 1.0 / y_beta)
        if decay != 0.0:
            torch._foreach_addcmul_(z, y, [-(gamma * gamma * decay)] * n)
        if checked is None:
            torch._foreach_mul_(m, beta1)
            torch._foreach_mul_(v_, beta2)
        else:  # 1 where the step is not finite (its gradients are 0): m and v stay
            torch._foreach_mul_(m, [as_coefficient(checked.decay1, m[0])] * n)
            torch._foreach_mul_(v_, [as_coefficient(checked.decay2, v_[0])] * n)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        denom = foreach_divided(v_, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, representable_eps(eps, v_[0].dtype))
        u = torch._foreach_div(m, denom)
        torch._foreach_addcmul_(z, u, [-_quotient(gamma, bias_correction1)] * n)
        torch._foreach_mul_(x, 1 - c)  # x <- (1 - c) x + c z (a lerp with a tensor weight would sync)
        torch._foreach_addcmul_(x, z, [c] * n)
        if checked is None:
            _lerp_into(y, z, x, beta)
        elif coefficient_dtype(like) == like.dtype:  # y <- z (a weight of 1: exactly), then towards x by
            torch._foreach_lerp_(y, z, [as_coefficient(checked.keep, like)] * n)  # beta; 0 and 0 if not finite
            torch._foreach_lerp_(y, x, [as_coefficient(checked.beta, like)] * n)
        else:  # 16-bit: the new y (in float32) in u's buffer, then y <- lerp(y, new y, 1 or 0): one or the other
            _lerp_into(u, z, x, beta)
            torch._foreach_lerp_(y, u, [finite.to(like.dtype)] * n)
