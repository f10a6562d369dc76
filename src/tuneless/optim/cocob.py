r"""COCOB-Backprop: training by coin betting, with no step size at all.

Paper: F. Orabona and T. Tommasi, "Training Deep Networks without Learning Rates Through Coin
Betting", NeurIPS 2017, arXiv:1705.07795 (Algorithm 2, COCOB-Backprop).

Reference implementation matched: F. Orabona's ``parameterfree`` package, version 0.0.1
(``parameterfree.COCOB``): same defaults (``alpha=100``, the initial scale ``L_0 = eps = 1e-8``,
coupled L2 weight decay) and, at ``lr=1``, the same iterates (checked to relative 1e-10 over
200 steps in float64 by ``tests/test_parity_cocob.py``).

Each coordinate is a separate gambler: it bets a fraction of its wealth (the initial
endowment :math:`L` plus what it has won so far) on the sign of the sum of the negative
gradients seen so far. There is nothing to tune; ``alpha`` only damps the first ~``alpha``
steps, like a warm-up.

What differs from the reference, deliberately:

* ``lr`` is a multiplier that schedulers drive (default 1.0, the paper's algorithm). It scales
  each step's change of the bet, so that with a constant ``lr`` the iterate is
  :math:`x_1 + \mathrm{lr}\cdot\text{bet}`, and ``lr=0`` freezes the parameters where they are
  (multiplying the bet itself would send them back to :math:`x_1`).
* The bet is stored instead of the starting point :math:`x_1` (same memory: five buffers per
  parameter), so the betting itself does not depend on ``lr``.
* A vectorized implementation (``torch._foreach_*``) besides the per-parameter loop; no host
  synchronization in a step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import add_scaled_, coefficient_dtype, indices_by_dtype
from ._fused import FusedKernel
from .base import TunelessOptimizer, gate, local_tensor

__all__ = ["COCOB"]


class COCOB(TunelessOptimizer):
    r"""COCOB-Backprop (Orabona & Tommasi, 2017): per-coordinate coin betting.

    For every coordinate :math:`i`, with the gradient :math:`g_t` (plus ``weight_decay``
    :math:`\cdot x_t`) at step :math:`t`, and :math:`L_0 = \epsilon`,
    :math:`G_0 = R_0 = \theta_0 = b_1 = 0`:

    .. math::
        L_t &= \max(L_{t-1}, |g_t|)                    &&\text{(largest gradient seen)}\\
        G_t &= G_{t-1} + |g_t|                         &&\text{(sum of absolute gradients)}\\
        R_t &= \max(R_{t-1} - g_t\, b_t,\ 0)           &&\text{(reward: what the bets won)}\\
        \theta_t &= \theta_{t-1} - g_t                 &&\text{(sum of negative gradients)}\\
        b_{t+1} &= \frac{\theta_t}{L_t\,\max(G_t + L_t,\ \alpha L_t)}\,(L_t + R_t)
                                                         &&\text{(the bet: a fraction of the wealth)}\\
        x_{t+1} &= x_t + \mathrm{lr}_t\,(b_{t+1} - b_t)

    so that with ``lr=1`` (the paper), :math:`x_{t+1} = x_1 + b_{t+1}`.

    Args:
        params: parameters or param groups (each group is independent: the method is
            per-coordinate).
        lr: multiplier of the bet, for schedulers (default 1.0, the paper's algorithm; 0
            freezes a group).
        alpha: warm-up damping, roughly the number of steps over which the first bets are
            reduced (default 100, the paper's and the reference's value).
        eps: the initial scale :math:`L_0`, which keeps the first division finite (default
            1e-8, as the reference).
        weight_decay: coupled L2 penalty added to the gradient (default 0.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: one compiled single-pass kernel per group of tensors instead of the vectorized
            chain (default False): several times faster on a CPU, at the cost of compiling it at
            the first step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.COCOB([x])
        >>> for _ in range(200):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> bool((x.detach().abs() < 1.0).all())
        True

    References:
        F. Orabona, T. Tommasi, "Training Deep Networks without Learning Rates Through Coin
        Betting", NeurIPS 2017, arXiv:1705.07795.

    .. note:: The published step size (``group["effective_lr"]``) is the group's ``lr``: the
       method has no global step size, each coordinate bets its own fraction.

    .. warning:: Memory: five buffers per parameter (the reference keeps five too), the two
       growing sums in float64 (so that they keep their increments over very long runs): 28
       bytes per float32 parameter. Betting
       assumes bounded gradients; a single huge gradient raises :math:`L` for good and makes
       that coordinate cautious afterwards (gradient clipping helps with spikes).
    """

    registry_name = "cocob"
    _float64_state = ("neg_grad_sum", "abs_grad_sum")

    def __init__(self, params: Any, lr: float = 1.0, *, alpha: float = 100.0, eps: float = 1e-8,
                 weight_decay: float = 0.0, foreach: bool | None = None, fused: bool = False,
                 skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "alpha", alpha, 0.0, None, inclusive="()", recommended=100.0)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
        if foreach is not None:
            v.check_bool(owner, "foreach", foreach)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, alpha=float(alpha), eps=float(eps), weight_decay=float(weight_decay),
                                      foreach=foreach, fused=fused, skip_nonfinite=skip_nonfinite))

    def _state_of(self, p: Tensor, eps: float) -> dict[str, Tensor]:
        state = self.state[p]
        if "bet" not in state:
            # Sum of the negative gradients, theta_t, and of their absolute values, G_t: float64,
            # whatever the parameters' dtype. They grow for as long as training runs; in float32
            # an increment is lost once the sum is ~10^7 times larger (about 10^7 steps), in
            # bfloat16 after ~256 steps (docs/robustness.md, "Long runs").
            state["neg_grad_sum"] = torch.zeros_like(p, dtype=torch.float64, memory_format=torch.preserve_format)
            state["abs_grad_sum"] = torch.zeros_like(p, dtype=torch.float64, memory_format=torch.preserve_format)
            # Largest absolute gradient seen so far, L_t (starts at eps).
            state["max_abs_grad"] = torch.full_like(p, eps, memory_format=torch.preserve_format)
            # Reward (wealth won by the bets so far), R_t >= 0.
            state["reward"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # The current bet b_t, the offset of the iterate from its start at lr = 1.
            state["bet"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self, loss: Tensor | None) -> None:
        for group in self.param_groups:
            params, grads = self._params_with_grad(group)
            lr = group["lr"]
            if not isinstance(lr, Tensor):  # a fill, not a host-to-device copy
                lr = torch.full((), lr, dtype=self._stat_dtype(), device=self._stat_device())
            self._publish_step_size(group, lr)
            if not params:
                continue
            states = [self._state_of(p, group["eps"]) for p in params]
            buffers = {k: [local_tensor(s[k]) for s in states]
                       for k in ("neg_grad_sum", "abs_grad_sum", "max_abs_grad", "reward", "bet")}
            xs = [local_tensor(p) for p in params]
            # A step that is not finite: the per-parameter function and the kernel zero the
            # gradient inside; the vectorized chain gets zeros (its lr and weight decay gated).
            finite = self._step_finite()
            fn = _multi_tensor_cocob if self._use_foreach(group) else _single_tensor_cocob
            if group.get("fused", False):
                fn = _fused_cocob
            if fn is _multi_tensor_cocob:
                grads = self._finite_grads(grads)
            elif finite is None:
                finite = torch.ones((), dtype=torch.bool, device=lr.device)
            fn(xs, grads, lr=lr, alpha=group["alpha"], weight_decay=group["weight_decay"], finite=finite, **buffers)


def _single_tensor_cocob(xs: list[Tensor], grads: list[Tensor], *, neg_grad_sum: list[Tensor],
                         abs_grad_sum: list[Tensor], max_abs_grad: list[Tensor], reward: list[Tensor],
                         bet: list[Tensor], lr: Tensor, alpha: float, weight_decay: float, finite: Tensor) -> None:
    """One COCOB-Backprop step, one tensor at a time (the readable truth: :func:`_cocob_kernel`)."""
    for x, g, theta, G, L, R, b in zip(xs, grads, neg_grad_sum, abs_grad_sum, max_abs_grad, reward, bet):
        _cocob_kernel(x, g, theta, G, L, R, b, lr.to(x.dtype), finite, alpha, weight_decay)


def _multi_tensor_cocob(xs: list[Tensor], grads: list[Tensor], *, neg_grad_sum: list[Tensor],
                        abs_grad_sum: list[Tensor], max_abs_grad: list[Tensor], reward: list[Tensor],
                        bet: list[Tensor], lr: Tensor, alpha: float, weight_decay: float,
                        finite: Tensor | None) -> None:
    """The same step over all tensors at once: one temporary (|g|), reused as the denominator.

    ``grads`` are zeros on a step that is not finite (``finite`` False): then the weight decay
    and the lr are gated to 0, and every buffer keeps its value (the new bet, computed from
    unchanged sums, is the old one)."""
    for dt, idx in indices_by_dtype(xs).items():
        x = [xs[i] for i in idx]
        g = [grads[i] if grads[i].dtype == dt else grads[i].to(dt) for i in idx]
        theta, G, L, R, b = ([t[i] for i in idx] for t in (neg_grad_sum, abs_grad_sum, max_abs_grad, reward, bet))
        step = lr.to(dt) if finite is None else gate(finite, lr, 0.0).to(dt)
        if weight_decay != 0:
            if finite is None:
                g = torch._foreach_add(g, x, alpha=weight_decay)
            else:
                g = torch._foreach_add(g, torch._foreach_mul(x, gate(finite, lr.new_tensor(weight_decay, dtype=dt), 0.0)))
        # The reward of the bet just played; the two sums (float64); the largest gradient.
        torch._foreach_addcmul_(R, g, b, value=-1.0)
        torch._foreach_clamp_min_(R, 0.0)
        torch._foreach_sub_(theta, g)
        scratch = torch._foreach_abs(g)
        torch._foreach_maximum_(L, scratch)
        torch._foreach_add_(G, scratch)
        # den <- L * max(G + L, alpha * L), in float64 (G is), with the scratch as alpha * L
        den = torch._foreach_add(G, L)
        torch._foreach_copy_(scratch, L)
        torch._foreach_mul_(scratch, alpha)
        torch._foreach_maximum_(den, scratch)
        torch._foreach_mul_(den, L)
        # the new bet theta * (L + R) / den (float64, like the kernel's); x <- x + lr * (b_{t+1} - b_t)
        torch._foreach_copy_(scratch, L)
        torch._foreach_add_(scratch, R)
        new_bet = torch._foreach_mul(theta, scratch)
        torch._foreach_div_(new_bet, den)
        change = torch._foreach_sub(new_bet, b)
        add_scaled_(x, change, step)
        torch._foreach_copy_(b, new_bet)


def _cocob_kernel(x: Tensor, g: Tensor, theta: Tensor, G: Tensor, L: Tensor, R: Tensor, b: Tensor, lr: Tensor,
                  finite: Tensor, alpha: float, weight_decay: float) -> tuple[()]:
    """One COCOB-Backprop step of one tensor: the per-parameter path runs it as is, and
    :class:`~tuneless.optim._fused.FusedKernel` compiles it for ``fused=True`` (no sums: the
    padding's values, 0/0 included, are discarded).

    ``finite`` False (a step whose gradients are not all finite): the gradient is taken as 0,
    so the sums keep their values and the new bet is the old one, and the lr is taken as 0, so
    x does not move (the float64 bet differs from the stored one by its rounding)."""
    g = g.to(x.dtype)
    if weight_decay != 0:
        g = g + weight_decay * x
    g = torch.where(finite, g, 0.0)
    abs_g = g.abs()
    L.copy_(torch.maximum(L, abs_g))
    G.add_(abs_g)
    R.copy_(torch.clamp(R - g * b, min=0.0))  # the reward of the bet b_t just played
    theta.sub_(g)
    new_bet = theta * (L + R) / (L * torch.maximum(G + L, alpha * L))
    x.add_((new_bet - b) * torch.where(finite, lr, 0.0))
    b.copy_(new_bet)
    return ()


_COCOB_KERNEL = FusedKernel(_cocob_kernel, num_tensors=7, num_sums=0)


def _fused_cocob(xs: list[Tensor], grads: list[Tensor], *, neg_grad_sum: list[Tensor], abs_grad_sum: list[Tensor],
                 max_abs_grad: list[Tensor], reward: list[Tensor], bet: list[Tensor], lr: Tensor, alpha: float,
                 weight_decay: float, finite: Tensor) -> None:
    """:func:`_single_tensor_cocob` as one compiled single-pass kernel per group of tensors (``fused=True``)."""
    if xs:
        _COCOB_KERNEL([xs, grads, neg_grad_sum, abs_grad_sum, max_abs_grad, reward, bet],
                      (lr.to(coefficient_dtype(xs[0])), finite, alpha, weight_decay),
                      sum_dtype=lr.dtype, device=xs[0].device)
