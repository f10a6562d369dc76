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
* Edge cases: a zero gradient, or a non-finite loss or gradient norm, gives a step of 0 (the
  reference divides by 0); a non-finite norm is kept out of its running average.
* With ``sf_beta1`` annealed, a parameter that has no gradient at a step is moved to the new
  interpolation :math:`y = \beta_k x + (1-\beta_k) z` with its :math:`x` and :math:`z`
  unchanged (the reference leaves its :math:`y` as formed with the previous :math:`\beta`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import cache_blocks, total_abs_sum, total_abs_sum_loop, total_dot, total_dot_loop
from .base import finite_or_zero, local_tensor, lr_in, lr_is_zero, lr_moves
from .momo_adam import representable_eps
from .schedule_free import MODE_KEY, _ScheduleFreeBase

__all__ = ["ScheduleFreePlus"]

#: sqrt(pi/2): the expected ratio of the L1 to the L2 norm of a Gaussian vector, per coordinate
#: (E|g_i| = sqrt(2/pi) sigma), which turns the L1 norm into the scale of Adam's normalized step
L1_TO_L2 = math.sqrt(math.pi / 2)


def annealed_sf_beta1(sf_beta1: float, sf_beta1_max: float, anneal_steps: int, k: int) -> float:
    """The interpolation weight at step ``k`` (0-based): ``sf_beta1``, or with ``anneal_steps`` > 0
    the log-space interpolation of 1 - beta from 1 - ``sf_beta1`` to 1 - ``sf_beta1_max``."""
    if anneal_steps <= 0:
        return sf_beta1
    progress = min(k / anneal_steps, 1.0)
    return 1.0 - math.exp(math.log(1.0 - sf_beta1) * (1.0 - progress) + math.log(1.0 - sf_beta1_max) * progress)


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
                 sf_beta1_max: float = 0.965, weight_lr_power: float = 2.0, foreach: bool | None = None) -> None:
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
        super().__init__(params, dict(
            lr=lr, betas=(float(betas[0]), float(betas[1])), sf_beta1=float(sf_beta1), eps=float(eps),
            weight_decay=float(weight_decay), r=float(r), polyak_beta=float(polyak_beta), c_warmup=int(c_warmup),
            sf_beta1_anneal_steps=int(sf_beta1_anneal_steps), sf_beta1_max=float(sf_beta1_max),
            weight_lr_power=float(weight_lr_power), foreach=foreach,
            k=0,                                 # steps taken (host)
            y_beta=float(sf_beta1),              # the beta that formed the parameters' y (host)
            **{MODE_KEY: True}))

    def _momentum(self, group: dict[str, Any]) -> float:
        """The beta with which the parameters' y was formed (y = beta x + (1 - beta) z)."""
        return group["y_beta"]

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """The learned scalars, created at the first step in every group (0-d tensors)."""
        for group in self.param_groups:
            if "lr_max" not in group:
                group["lr_max"] = self._scalar(group["eps"])  # the largest step so far (floored at eps)
                # the sum of the averaging weights, in float64 (float32 on MPS, which has none): with
                # tiny gradients the step is ~1e30 and its square overflows float32 (the reference
                # sums host doubles)
                device = self._stat_device()
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
        beta = annealed_sf_beta1(first["sf_beta1"], first["sf_beta1_max"], first["sf_beta1_anneal_steps"], first["k"])
        per_group = [self._params_with_grad(g) for g in self.param_groups]

        # 1. The sums: ||g||_1 and beta <g, z - x> = (beta / y_beta) <g, z - y> (each group's y
        #    was formed with its y_beta).
        stats = torch.zeros(2, dtype=dtype, device=device)
        for group, (params, grads) in zip(self.param_groups, per_group):
            if not params:
                continue
            ys = [local_tensor(p) for p in params]
            zs = [self._buffers(p)[0] for p in params]
            fn = _multi_tensor_statistics if self._use_foreach(group) else _single_tensor_statistics
            stats = stats + fn(ys, grads, zs, beta / group["y_beta"], dtype, device)
        grad_l1, inner = self._global_sum(stats).unbind(0)

        # 2. The Polyak step (global), from the bias-corrected running L1 norm.
        polyak_beta, k0 = first["polyak_beta"], first["k"]
        ok_norm = torch.isfinite(grad_l1)
        l1_ema = polyak_beta * first["grad_l1_ema"] + (1 - polyak_beta) * L1_TO_L2 * grad_l1
        l1_ema = torch.where(ok_norm, l1_ema, first["grad_l1_ema"])
        denominator = l1_ema / (1 - polyak_beta ** (k0 + 1))
        numerator = loss + inner
        positive = denominator > 0
        polyak = torch.where(positive, torch.clamp(numerator, min=0.0)
                             / torch.where(positive, denominator, torch.ones_like(denominator)),
                             torch.zeros_like(denominator))
        polyak = finite_or_zero(polyak, loss, numerator, grad_l1)

        # 3. Each group: its step size, the averaging weight, then the update of z, x and y.
        for group, (params, grads) in zip(self.param_groups, per_group):
            group["grad_l1_ema"] = l1_ema
            k = group["k"]
            group["k"] = k + 1
            if lr_is_zero(group["lr"]):  # lr = 0 freezes the group: neither z nor the average x moves
                self._publish_step_size(group, torch.zeros_like(polyak))
                continue
            if isinstance(group["lr"], Tensor):  # never read on the host; a tensor lr of 0: step 0, weight 0
                moves = lr_moves(group["lr"], polyak)
                step_size = torch.clamp(lr_in(group["lr"], polyak.dtype), min=group["eps"]) * polyak * moves
            else:
                moves, step_size = None, max(group["lr"], group["eps"]) * polyak
            self._publish_step_size(group, step_size)
            lr_max = group["lr_max"] = torch.maximum(step_size, group["lr_max"])
            if k < group["c_warmup"]:
                average_weight: Tensor | float = 1.0
            else:
                weight_sum = group["weight_sum"]
                weight = (k + 1) ** group["r"] * lr_max.to(weight_sum.dtype) ** group["weight_lr_power"]
                if moves is not None:
                    weight = weight * moves.to(weight.dtype)
                weight_sum = group["weight_sum"] = weight_sum + weight
                average_weight = torch.where(weight_sum > 0, weight / torch.where(weight_sum > 0, weight_sum,
                                                                                  torch.ones_like(weight_sum)),
                                             torch.zeros_like(weight_sum)).to(step_size.dtype)
            y_beta = group["y_beta"]
            group["y_beta"] = beta
            beta1, beta2 = group["betas"]
            if params:
                ys = [local_tensor(p) for p in params]
                zs, ms, vs = (list(t) for t in zip(*(self._buffers(p) for p in params)))
                fn = _multi_tensor_apply if self._use_foreach(group) else _single_tensor_apply
                fn(ys, grads, zs, ms, vs, step_size=step_size, average_weight=average_weight, y_beta=y_beta,
                   beta=beta, decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                   bias_correction1=1 - beta1 ** (k + 1), bias_correction2=1 - beta2 ** (k + 1), eps=group["eps"])
            if beta != y_beta:  # parameters without a gradient now: y moves to the new interpolation
                stepped = {id(p) for p in params}
                idle = [p for p in group["params"] if id(p) not in stepped and "z" in self.state.get(p, {})]
                for p in idle:
                    y, z = local_tensor(p), local_tensor(self.state[p]["z"])
                    y.copy_(torch.lerp(z, torch.lerp(y, z, 1.0 - 1.0 / y_beta), beta))


# ---------------------------------------------------------------------------- per-parameter (the truth)


def _single_tensor_statistics(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], inner_scale: float,
                              dtype: torch.dtype, device: torch.device) -> Tensor:
    """(||g||_1, inner_scale <g, z - y>) over these tensors."""
    diffs = [z - y for y, z in zip(ys, zs)]
    return torch.stack([total_abs_sum_loop(grads, dtype, device),
                        inner_scale * total_dot_loop(grads, diffs, dtype, device)])


def _single_tensor_apply(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], ms: list[Tensor],
                         vs: list[Tensor], *, step_size: Tensor, average_weight: Tensor | float, y_beta: float,
                         beta: float, decay: float, beta1: float, beta2: float, bias_correction1: float,
                         bias_correction2: float, eps: float) -> None:
    """One step of every tensor (see :class:`ScheduleFreePlus`): x from y and z, AdamC decay,
    Adam's step on z, the average x, and the new y, one tensor at a time."""
    for y, g, z, m, v_ in zip(ys, grads, zs, ms, vs):
        g = g.to(m.dtype)
        gamma = step_size.to(y.dtype)
        c = average_weight.to(y.dtype) if isinstance(average_weight, Tensor) else average_weight
        x = torch.lerp(y, z, 1.0 - 1.0 / y_beta)  # x = (y - (1 - y_beta) z) / y_beta
        if decay != 0.0:
            z.sub_(y * (gamma * gamma * decay))
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v_ / bias_correction2).sqrt_().add_(representable_eps(eps, v_.dtype))
        z.sub_((m / denom).mul_(gamma / bias_correction1))
        x.mul_(1 - c).add_(z * c)  # the average: x <- (1 - c) x + c z
        y.copy_(torch.lerp(z, x, beta))  # y = beta x + (1 - beta) z


# ---------------------------------------------------------------------------- vectorized


def _multi_tensor_statistics(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], inner_scale: float,
                             dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`_single_tensor_statistics` with ``torch._foreach_*``, block by block on the CPU."""
    l1 = torch.zeros((), dtype=dtype, device=device)
    inner = torch.zeros((), dtype=dtype, device=device)
    for y, g, z in cache_blocks(ys, grads, zs):
        diffs = torch._foreach_sub(z, y)
        l1 = l1 + total_abs_sum(g, dtype, device)
        inner = inner + total_dot(g, diffs, dtype, device)
    return torch.stack([l1, inner_scale * inner])


def _multi_tensor_apply(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], ms: list[Tensor],
                        vs: list[Tensor], *, step_size: Tensor, average_weight: Tensor | float, y_beta: float,
                        beta: float, decay: float, beta1: float, beta2: float, bias_correction1: float,
                        bias_correction2: float, eps: float) -> None:
    """:func:`_single_tensor_apply` with ``torch._foreach_*``, block by block on the CPU (the
    block's x and Adam's denominator are the only temporaries)."""
    for y, g, z, m, v_ in cache_blocks(ys, grads, zs, ms, vs):
        like = y[0]
        gamma = step_size.to(like.dtype)
        c = average_weight.to(like.dtype) if isinstance(average_weight, Tensor) else average_weight
        g = [gi.to(mi.dtype) for gi, mi in zip(g, m)]
        x = torch._foreach_lerp(y, z, 1.0 - 1.0 / y_beta)
        if decay != 0.0:
            torch._foreach_addcmul_(z, y, [-(gamma * gamma * decay)] * len(z))
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_mul_(v_, beta2)
        torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        denom = torch._foreach_div(v_, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, representable_eps(eps, v_[0].dtype))
        u = torch._foreach_div(m, denom)
        torch._foreach_addcmul_(z, u, [-(gamma / bias_correction1)] * len(z))
        torch._foreach_mul_(x, 1 - c)  # x <- (1 - c) x + c z (a lerp with a tensor weight would sync)
        if isinstance(c, Tensor):
            torch._foreach_addcmul_(x, z, [c] * len(x))
        else:
            torch._foreach_add_(x, z, alpha=c)
        torch._foreach_copy_(y, z)
        torch._foreach_lerp_(y, x, beta)
