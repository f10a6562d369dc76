r"""Hypergradient descent: the learning rate learned by gradient descent on itself.

Paper: A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood, "Online Learning Rate
Adaptation with Hypergradient Descent", ICLR 2018, arXiv:1703.04782 (SGD-HD, SGDN-HD, Adam-HD).

The loss after a step, :math:`f(x_{t-1} - \alpha\, d_{t-1})`, depends on the learning rate
:math:`\alpha` through the step just taken; its derivative, evaluated with the gradient that
the next step computes anyway, is :math:`-\langle g_t, d_{t-1}\rangle`. One step of gradient
descent on :math:`\alpha` with rate :math:`\beta` (``hypergrad_lr``) before each step gives

.. math:: \alpha_t = \alpha_{t-1} + \beta\,\langle g_t, d_{t-1}\rangle

(the step grows while consecutive directions agree, shrinks when they disagree), at the cost
of one dot product per step and, for SGD, a copy of the previous direction.

Reference read (not installed; GitHub only): ``gbaydin/hypergradient-descent``,
``hypergrad/sgd_hd.py`` and ``hypergrad/adam_hd.py``. What differs from it, deliberately:

* **one learning rate per param group, updated once per step** from the dot product summed
  over the group's parameters (batched, one reduction for all groups). The reference's SGDHD
  refuses several groups; its AdamHD updates the rate inside the per-parameter loop, so that
  each tensor of a step sees a different rate (their issue #9).
* **the rate is kept non-negative** (clamped at 0, from where it can grow back): the
  reference's can go negative and then climb the loss (their issue #4).
* the rate is a 0-d tensor on the parameters' device (no host synchronization), published as
  ``group["effective_lr"]``, while ``group["lr"]`` stays a multiplier (default 1.0) that lr
  schedulers drive; the initial rate is ``init_lr``. The hypergradient is taken with respect
  to the learned rate *with* the multiplier applied, so a group scheduled to ``lr=0`` neither
  moves nor changes its rate.
* Adam-HD uses Adam's usual form (as ``torch.optim.Adam``): :math:`\epsilon` is added to
  :math:`\sqrt{\hat v}`, after bias correction; the reference adds it before.
* ``p.grad`` is never modified (the reference's SGDHD writes the weight decay into it).
* A step whose gradients are not all finite is skipped (``skip_nonfinite=True``, the default):
  the rate, the step count, the moments and the parameters stay as they were (the reference
  lets the NaN into all of them). So that this needs no host sync, the step count
  ``group["hd_step"]`` is a 0-d int64 tensor on the parameters' device (it was a Python int), the
  bias corrections are computed there (in float64, float32 on MPS), and ``group["hd_prev_lr"]``
  is a 0-d tensor (float64 for a number lr; a tensor lr's copy, in the statistics dtype).

With ``hypergrad_lr=0`` the classes are exactly ``torch.optim.SGD`` (momentum, Nesterov, L2
weight decay) and ``torch.optim.Adam`` at ``lr = init_lr`` (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import add_scaled_, coefficient_dtype, indices_by_dtype, total_dot, total_dot_loop
from ._fused import FusedKernel
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, local_tensor

__all__ = ["SGDHD", "AdamHD"]


class _HypergradientBase(TunelessOptimizer):
    """The shared step: per-group dot products, one reduction, per-group rate, then the update."""

    learning_rate_free = False  # the initial rate init_lr matters (the method adapts it)

    def _update(self, loss: Tensor | None) -> None:
        dtype, device = self._stat_dtype(), self._stat_device()
        # A step that is not finite (finite False) computes with zero gradients (zeroed copies
        # after the weight decay is added, or inside the fused kernels) and keeps the rate, the
        # step count, the lr of the last step and the published step size as they were; the
        # step is 0 and the state buffers are kept (decays 1, or their writes gated). None: the
        # step is not checked (skip_nonfinite=False).
        finite = self._step_finite()
        deciding = self._deciding_finite()  # every group fused and stepped: h decides, below
        gathered = []
        for group in self.param_groups:
            stepped = "learned_lr" in group  # known on the host: whether the group has state
            if not stepped:
                # The learned rate alpha_t of the group (0-d tensor, statistics dtype).
                group["learned_lr"] = self._scalar(group["init_lr"])
                # Steps taken by the group (for Adam's bias correction; a 0-d int64 tensor, so
                # that a skipped step does not count, without a host read), and the lr
                # multiplier of the last step (the hypergradient is taken through it).
                group["hd_step"] = torch.zeros((), dtype=torch.int64, device=device)
                group["hd_prev_lr"] = 0.0
            elif not isinstance(group["hd_step"], Tensor):  # a checkpoint of an earlier version: a number
                group["hd_step"] = torch.full((), int(group["hd_step"]), dtype=torch.int64, device=device)
            params, grads = self._params_with_grad(group)
            xs = [local_tensor(p) for p in params]
            if group["weight_decay"] != 0 and params:
                # Coupled L2: the gradient of f + wd/2 ||x||^2 (a new list; p.grad is untouched).
                grads = [g.to(x.dtype) + group["weight_decay"] * x for g, x in zip(grads, xs)] \
                    if not self._use_foreach(group) else torch._foreach_add(grads, xs, alpha=group["weight_decay"])
            gathered.append((params, xs, grads, stepped))
        if finite is not None:
            # zeros on a step that is not finite, in one call over the groups (the copies'
            # buffers are kept by position); the fused kernels zero the gradients themselves
            plain = [i for i, group in enumerate(self.param_groups) if not group.get("fused", False)]
            zeroed = iter(self._finite_grads([g for i in plain for g in gathered[i][2]]))
            for i in plain:
                params, xs, grads, stepped = gathered[i]
                gathered[i] = (params, xs, [next(zeroed) for _ in grads], stepped)
        per_group, partials = [], []
        for group, (params, xs, grads, stepped) in zip(self.param_groups, gathered):
            scratch = None
            if params and stepped:
                dot, scratch = self._hypergradient(group, params, grads, dtype, device)
                partials.append(dot)
            else:
                partials.append(torch.zeros((), dtype=dtype, device=device))
            per_group.append((params, xs, grads, scratch))
        h = self._global_sum(torch.stack(partials))
        if deciding:
            # The fused dot kernels read every gradient, read only: <g, m / (sqrt(v) + eps)> is
            # not finite exactly when some gradient entry is not (0 * inf is NaN); all-reduced
            # above when sharded. No read of the gradients of its own.
            finite = self._settle_finite(torch.isfinite(h).all())
        for i, (group, (params, xs, grads, scratch)) in enumerate(zip(self.param_groups, per_group)):
            # The rate and the step count are updated even where this process holds no gradient
            # of the group (h is global): every rank of a sharded run keeps the same values.
            coefficient = group["hypergrad_lr"] * group["hd_prev_lr"]
            if isinstance(coefficient, Tensor):  # rounded as the product of two numbers would be
                coefficient = coefficient.to(h.dtype)
            old_rate = group["learned_lr"]
            alpha = gate(finite, torch.clamp(old_rate + coefficient * h[i], min=0.0), old_rate)
            group["learned_lr"] = alpha
            group["hd_step"] = group["hd_step"] + (1 if finite is None else finite.to(torch.int64))
            lr = group["lr"]
            # a copy (schedulers fill_ tensor lrs), in the statistics dtype: hypergrad_lr * lr is
            # then rounded as with a float lr (a float32 lr would round it to float32), no sync;
            # a number lr as a float64 0-d tensor (a fill): the product is the one of two numbers
            prev_lr = lr.to(dtype, copy=True) if isinstance(lr, Tensor) else torch.full(
                (), lr, dtype=_exact_dtype(device), device=device)
            group["hd_prev_lr"] = gate(finite, prev_lr, group["hd_prev_lr"])
            step = alpha * group["lr"]
            if finite is not None:
                old_published = group.get(STEP_SIZE_KEY)
                self._publish_step_size(group, gate(finite, step, 0.0 if old_published is None else old_published))
                step = gate(finite, step, 0.0)
            else:
                self._publish_step_size(group, step)
            if params:
                self._direction_step(group, params, xs, grads, step, scratch)

    def _hypergradient(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                       dtype: torch.dtype, device: torch.device
                       ) -> tuple[Tensor, list[Tensor] | None]:  # pragma: no cover - abstract
        """<g_t, d_{t-1}> summed over the group's parameters (before the state is updated), and
        any temporaries the update may reuse (or None)."""
        raise NotImplementedError

    def _direction_step(self, group: dict[str, Any], params: list[Tensor], xs: list[Tensor], grads: list[Tensor],
                        step: Tensor, scratch: list[Tensor] | None) -> None:  # pragma: no cover - abstract
        """Update the state and apply x <- x - step * d_t."""
        raise NotImplementedError


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64, where the device has it (MPS has not): the dtype of the bias corrections and of a
    number lr kept on the device, so that they are the numbers the host would compute."""
    return torch.float32 if device.type == "mps" else torch.float64


def _bias_corrections(step: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """1 - beta1^t and sqrt(1 - beta2^t) for the step count t (a 0-d tensor on the device), as
    0-d tensors there in :func:`_exact_dtype` (no host read). t = 0 happens only at a step that is
    not finite and follows no finite one: its moments are 0 and its update is gated; t = 1 is
    taken there, so that nothing divides by 0."""
    t = torch.clamp(step, min=1).to(_exact_dtype(step.device))
    return 1 - torch.pow(beta1, t), torch.sqrt(1 - torch.pow(beta2, t))


def _check_hd(owner: str, lr: Any, init_lr: Any, hypergrad_lr: Any, weight_decay: Any,
              init_rec: float, beta_rec: float) -> Any:
    """Check the arguments; returns lr (a one-element tensor as a 0-d view)."""
    lr = v.check_lr(owner, lr, recommended=1.0)
    v.check_range(owner, "init_lr", init_lr, 0.0, None, inclusive="[)", recommended=init_rec)
    v.check_range(owner, "hypergrad_lr", hypergrad_lr, 0.0, None, inclusive="[)", recommended=beta_rec)
    v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
    return lr


# ============================================================================ SGD-HD


class SGDHD(_HypergradientBase):
    r"""SGD with hypergradient descent on the learning rate (SGD-HD; SGDN-HD with momentum).

    With the direction :math:`d_t` of SGD (:math:`g_t`), heavy-ball momentum
    (:math:`m_t = \mu m_{t-1} + g_t`, :math:`d_t = m_t`) or Nesterov momentum
    (:math:`d_t = g_t + \mu m_t`), as in ``torch.optim.SGD``, and per param group:

    .. math::
        \alpha_t &= \max\big(0,\ \alpha_{t-1} + \beta\,\mathrm{lr}_{t-1}\,\langle g_t, d_{t-1}\rangle\big),
        \qquad \alpha_0 = \texttt{init\_lr},\ d_0 = 0 \\
        x_{t+1} &= x_t - \mathrm{lr}_t\,\alpha_t\, d_t

    where :math:`g_t` includes the L2 term ``weight_decay`` :math:`\cdot x_t` and the dot product
    runs over the group's parameters.

    Args:
        params: parameters or param groups (each group learns its own rate).
        lr: multiplier of the learned rate, for schedulers (default 1.0).
        init_lr: the initial learning rate :math:`\alpha_0` (default 1e-3, the paper's).
        hypergrad_lr: the hypergradient rate :math:`\beta` (default 1e-3, the paper's value for
            SGD-HD and SGDN-HD; the reference package defaults to 1e-6). Its scale is that of
            :math:`\alpha / \|g\|^2`.
        momentum: heavy-ball momentum :math:`\mu` (default 0.0; 0.9 gives SGDN-HD's setting).
        nesterov: Nesterov momentum (default False; needs ``momentum > 0``).
        weight_decay: coupled L2 penalty (default 0.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.SGDHD([x], init_lr=0.01, hypergrad_lr=0.001)
        >>> for _ in range(3):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> float(opt.param_groups[0]["effective_lr"]) > 0.01   # consecutive gradients agree
        True

    References:
        Baydin, Cornish, Martinez Rubio, Schmidt, Wood, "Online Learning Rate Adaptation with
        Hypergradient Descent", ICLR 2018, arXiv:1703.04782.

    .. warning:: ``hypergrad_lr`` has units: too large and the rate oscillates (it is clamped
       at 0 from below, not bounded above). The paper reports robustness over several orders
       of magnitude of ``init_lr``, not of ``hypergrad_lr``.
    """

    registry_name = "sgd_hd"

    def __init__(self, params: Any, lr: float = 1.0, *, init_lr: float = 1e-3, hypergrad_lr: float = 1e-3,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = _check_hd(owner, lr, init_lr, hypergrad_lr, weight_decay, 1e-3, 1e-3)
        v.check_range(owner, "momentum", momentum, 0.0, 1.0, inclusive="[)", recommended=0.9)
        v.check_bool(owner, "nesterov", nesterov)
        if nesterov and momentum == 0:
            v.fail(owner, "nesterov", nesterov, "False when momentum = 0 (Nesterov needs momentum > 0)")
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, init_lr=float(init_lr), hypergrad_lr=float(hypergrad_lr),
                                      momentum=float(momentum), nesterov=nesterov,
                                      weight_decay=float(weight_decay), foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            if group["momentum"] != 0:
                # Momentum buffer m_t (with heavy-ball momentum it is also the direction d_t).
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["momentum"] == 0 or group["nesterov"]:
                # The previous direction d_{t-1}, for the hypergradient <g_t, d_{t-1}>.
                state["prev_direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _prev_directions(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        key = "momentum_buffer" if group["momentum"] != 0 and not group["nesterov"] else "prev_direction"
        return [local_tensor(self._state_of(p, group)[key]) for p in params]

    def _hypergradient(self, group, params, grads, dtype, device):
        dot = total_dot if self._use_foreach(group) else total_dot_loop
        return dot(grads, self._prev_directions(group, params), dtype, device), None

    def _direction_step(self, group, params, xs, grads, step, scratch):
        mu, nesterov = group["momentum"], group["nesterov"]
        states = [self._state_of(p, group) for p in params]
        bufs = [local_tensor(s["momentum_buffer"]) for s in states] if mu != 0 else []
        prevs = [local_tensor(s["prev_direction"]) for s in states] if (mu == 0 or nesterov) else []
        finite = self._step_finite()
        if self._use_foreach(group):
            _multi_tensor_sgd_hd(xs, grads, bufs, prevs, step, mu, nesterov, finite)
        else:
            _single_tensor_sgd_hd(xs, grads, bufs, prevs, step, mu, nesterov, finite)


def _single_tensor_sgd_hd(xs, grads, bufs, prevs, step, mu, nesterov, finite=None) -> None:
    """d_t from the gradient (and momentum); x <- x - step * d_t; keep d_t. One tensor at a time.

    ``finite`` False (``grads`` are zeros, ``step`` is 0): the momentum decays by 1 and the
    previous direction is kept (written where ``finite``)."""
    for i, (x, g) in enumerate(zip(xs, grads)):
        g = g.to(x.dtype)
        if mu != 0:
            buf = bufs[i]
            buf.mul_(mu if finite is None else gate(finite, _coefficient(mu, buf), 1.0)).add_(g)
            d = g + mu * buf if nesterov else buf
        else:
            d = g
        if prevs:
            prevs[i].copy_(d if finite is None else torch.where(finite, d, prevs[i]))
        x.sub_(d * step.to(x.dtype))


def _multi_tensor_sgd_hd(xs, grads, bufs, prevs, step, mu, nesterov, finite=None) -> None:
    """The same over all tensors at once (in place; d_t is written into its buffer).

    ``finite`` given (a checked step): the momentum decays by ``mu`` (1 when not finite) and d_t
    is written into the previous direction's buffer as ``prev * keep + d_t`` with ``keep`` 0
    (1 when not finite: ``grads`` are zeros and Nesterov's ``mu * buf`` is taken with 0); the
    same numbers as the copy on a finite step (``prev`` is finite, so ``prev * 0`` is 0)."""
    for dt, idx in indices_by_dtype(xs).items():
        x = [xs[i] for i in idx]
        g = [grads[i] if grads[i].dtype == dt else grads[i].to(dt) for i in idx]
        s = (-step).to(dt)
        keep = None if finite is None else (~finite).to(coefficient_dtype(x[0]))
        if mu != 0:
            buf = [bufs[i] for i in idx]
            torch._foreach_mul_(buf, mu if finite is None else gate(finite, _coefficient(mu, x[0]), 1.0))
            torch._foreach_add_(buf, g)
            if nesterov:
                prev = [prevs[i] for i in idx]
                if finite is None:
                    torch._foreach_copy_(prev, g)
                    torch._foreach_add_(prev, buf, alpha=mu)
                else:
                    torch._foreach_mul_(prev, keep)
                    torch._foreach_add_(prev, g)
                    torch._foreach_addcmul_(prev, buf, [gate(finite, _coefficient(mu, x[0]), 0.0)] * len(prev))
                add_scaled_(x, prev, s)
            else:
                add_scaled_(x, buf, s)
        else:
            prev = [prevs[i] for i in idx]
            if finite is None:
                torch._foreach_copy_(prev, g)
            else:
                torch._foreach_mul_(prev, keep)
                torch._foreach_add_(prev, g)
            add_scaled_(x, prev, s)


def _coefficient(value: float, like: Tensor) -> Tensor:
    """A number as a 0-d tensor in :func:`~tuneless.optim._batched.coefficient_dtype` of ``like``,
    on its device (a fill, no copy): the same number as ``value`` given to an in-place op."""
    return torch.full((), value, dtype=coefficient_dtype(like), device=like.device)


# ============================================================================ Adam-HD


class AdamHD(_HypergradientBase):
    r"""Adam with hypergradient descent on the learning rate (Adam-HD).

    With Adam's moments (:math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`), its direction
    :math:`d_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)` with
    :math:`\hat m_t = m_t/(1-\beta_1^t)`, :math:`\hat v_t = v_t/(1-\beta_2^t)`, and per param
    group:

    .. math::
        \alpha_t &= \max\big(0,\ \alpha_{t-1} + \beta\,\mathrm{lr}_{t-1}\,\langle g_t, d_{t-1}\rangle\big),
        \qquad \alpha_0 = \texttt{init\_lr},\ d_0 = 0 \\
        x_{t+1} &= x_t - \mathrm{lr}_t\,\alpha_t\, d_t

    :math:`d_{t-1}` is recomputed from the stored moments (no third buffer).

    Args:
        params: parameters or param groups (each group learns its own rate).
        lr: multiplier of the learned rate, for schedulers (default 1.0).
        init_lr: the initial learning rate :math:`\alpha_0` (default 1e-3, Adam's usual value).
        hypergrad_lr: the hypergradient rate :math:`\beta` (default 1e-7, the paper's value for
            Adam-HD on logistic regression and MLPs; 1e-8 in its VGG runs and in the reference
            package).
        betas: Adam's :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        eps: added to :math:`\sqrt{\hat v}` (default 1e-8).
        weight_decay: coupled L2 penalty, as ``torch.optim.Adam`` (default 0.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: compiled single-pass kernels (the hypergradient, then the step), one call per
            group of tensors, instead of the vectorized chain (default False): faster on a
            CPU, at the cost of compiling them at the first step (see
            :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    References:
        Baydin, Cornish, Martinez Rubio, Schmidt, Wood, ICLR 2018, arXiv:1703.04782;
        Kingma & Ba, "Adam", ICLR 2015, arXiv:1412.6980.

    .. note:: The step count used in the bias corrections is kept per param group and counts
       every step of the optimizer (a parameter that joins a group late, or misses steps, uses
       the group's count), so that it is the same on every rank of a sharded run.
    """

    registry_name = "adam_hd"

    def __init__(self, params: Any, lr: float = 1.0, *, init_lr: float = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = _check_hd(owner, lr, init_lr, hypergrad_lr, weight_decay, 1e-3, 1e-7)
        v.check_bool(owner, "fused", fused)
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, init_lr=float(init_lr), hypergrad_lr=float(hypergrad_lr),
                                      betas=tuple(float(b) for b in betas), eps=float(eps),
                                      weight_decay=float(weight_decay), foreach=foreach, fused=fused,
                                      skip_nonfinite=skip_nonfinite))

    def _moments(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        ms, vs = [], []
        for p in params:
            state = self.state[p]
            if not state:
                # Exponential moving average of the gradients, m_t.
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # Exponential moving average of the squared gradients, v_t.
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms.append(local_tensor(state["exp_avg"]))
            vs.append(local_tensor(state["exp_avg_sq"]))
        return ms, vs

    def _finite_from_step_sums(self, loss: Tensor | None) -> bool:
        """Every group with parameters fused and past its first step: the fused dot kernels
        (read only, over every gradient) decide (see ``_update``); a first step reads the
        gradients for the flag, as the other paths do."""
        groups = [group for group in self.param_groups if group["params"]]
        return bool(groups) and all(group.get("fused", False) and "learned_lr" in group for group in groups)

    def _hypergradient(self, group, params, grads, dtype, device):
        # <g_t, d_{t-1}>, with d_{t-1} rebuilt from the moments of the previous step.
        beta1, beta2 = group["betas"]
        bc1, sqrt_bc2 = _bias_corrections(group["hd_step"], beta1, beta2)  # t - 1: not counted yet
        bc1 = bc1.to(dtype)  # the statistics' dtype, as a number dividing them is rounded
        ms, vs = self._moments(params)
        if group.get("fused", False):
            finite = self._step_finite()
            if finite is None:
                finite = torch.ones((), dtype=torch.bool, device=device)
            return _fused_adam_hd_dot(grads, ms, vs, bc1, sqrt_bc2, group["eps"], finite, dtype, device), None
        if self._use_foreach(group):
            # one temporary per tensor, reused by the update as its denominator
            dirs = torch._foreach_sqrt(vs)
            torch._foreach_mul_(dirs, (1 / sqrt_bc2).to(coefficient_dtype(dirs[0])))
            torch._foreach_add_(dirs, group["eps"])
            torch._foreach_reciprocal_(dirs)
            torch._foreach_mul_(dirs, ms)
            return total_dot(grads, dirs, dtype, device) / bc1, dirs
        dirs = [m / ((w.sqrt() / sqrt_bc2.to(coefficient_dtype(w))) + group["eps"]) for m, w in zip(ms, vs)]
        return total_dot_loop(grads, dirs, dtype, device) / bc1, None

    def _direction_step(self, group, params, xs, grads, step, scratch):
        beta1, beta2 = group["betas"]
        bc1, sqrt_bc2 = _bias_corrections(group["hd_step"], beta1, beta2)  # already counts this step
        ms, vs = self._moments(params)
        finite = self._step_finite()
        if group.get("fused", False):
            if finite is None:
                finite = torch.ones((), dtype=torch.bool, device=step.device)
            _fused_adam_hd_step(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, group["eps"], finite)
        elif self._use_foreach(group):
            _multi_tensor_adam_hd(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, group["eps"], scratch,
                                  finite)
        else:
            _single_tensor_adam_hd(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, group["eps"], finite)


def _adam_decays(finite: Tensor | None, beta1: float, beta2: float, like: Tensor) -> tuple[Any, Any]:
    """The weight of the gradient in m's lerp and v's decay: ``1 - beta1`` and ``beta2`` (numbers)
    on an unchecked step; on a checked one 0-d tensors in :func:`coefficient_dtype` of ``like``
    (the same numbers), 0 and 1 when the step is not finite (m and v are then kept exactly)."""
    if finite is None:
        return 1 - beta1, beta2
    return gate(finite, _coefficient(1 - beta1, like), 0.0), gate(finite, _coefficient(beta2, like), 1.0)


def _single_tensor_adam_hd(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, eps, finite=None) -> None:
    """Adam's moments and step x <- x - step * m_hat / (sqrt(v_hat) + eps), one tensor at a time.

    ``bc1`` and ``sqrt_bc2`` are 0-d tensors (:func:`_bias_corrections`). ``finite`` False
    (``grads`` are zeros, ``step`` is 0): m and v are kept (lerp weight 0, decay 1)."""
    for x, g, m, w in zip(xs, grads, ms, vs):
        g = g.to(x.dtype)
        weight, decay = _adam_decays(finite, beta1, beta2, x)
        dtype = coefficient_dtype(x)
        m.lerp_(g, weight)
        w.mul_(decay).addcmul_(g, g, value=1 - beta2)
        d = (m / bc1.to(dtype)) / (w.sqrt() / sqrt_bc2.to(dtype) + eps)
        x.sub_(d * step.to(x.dtype))


def _multi_tensor_adam_hd(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, eps, scratch=None,
                          finite=None) -> None:
    """The same over all tensors at once; ``scratch`` (same shapes) is reused for the denominator."""
    for dt, idx in indices_by_dtype(xs).items():
        x = [xs[i] for i in idx]
        g = [grads[i] if grads[i].dtype == dt else grads[i].to(dt) for i in idx]
        m = [ms[i] for i in idx]
        w = [vs[i] for i in idx]
        weight, decay = _adam_decays(finite, beta1, beta2, x[0])
        torch._foreach_lerp_(m, g, weight if finite is None else [weight] * len(m))
        torch._foreach_mul_(w, decay)
        torch._foreach_addcmul_(w, g, g, value=1 - beta2)
        if scratch is None:
            den = torch._foreach_sqrt(w)
        else:
            den = [scratch[i] for i in idx]
            torch._foreach_copy_(den, w)
            torch._foreach_sqrt_(den)
        torch._foreach_mul_(den, (1 / sqrt_bc2).to(coefficient_dtype(x[0])))
        torch._foreach_add_(den, eps)
        # x <- x + m / (den / s) with s = -step / bc1: the 0-d tensor s divides (no host read);
        # s = 0 (lr = 0, or a step that is not finite) gives den / s = -inf and a zero update.
        torch._foreach_div_(den, (-step / bc1.to(step.dtype)).to(dt))
        torch._foreach_addcdiv_(x, m, den)


def _adam_hd_dot_kernel(g: Tensor, m: Tensor, w: Tensor, sqrt_bc2: Tensor, finite: Tensor, eps: float,
                        sum_dtype: torch.dtype) -> tuple[Tensor]:
    """<g, m / (sqrt(v) / sqrt(bc2) + eps)> of one tensor (compiled; zeros add 0). ``finite``
    False: the gradient is taken as 0 (the sum is then 0, and the rate is kept anyway)."""
    g = torch.where(finite, g, 0.0)
    return ((g * (m / (w.sqrt() / sqrt_bc2 + eps))).sum(dtype=sum_dtype),)


def _adam_hd_step_kernel(x: Tensor, g: Tensor, m: Tensor, w: Tensor, step: Tensor, bc1: Tensor, sqrt_bc2: Tensor,
                         finite: Tensor, beta1: float, beta2: float, eps: float) -> tuple[()]:
    """One tensor of :func:`_single_tensor_adam_hd` (compiled; zeros stay 0). ``finite`` False:
    x, m and v keep their values (their writes are gated: what is computed from a NaN gradient
    is discarded, inside the kernel, at no extra memory traffic). Written so that, compiled, a
    finite step is bit for bit the in-place chain it replaced (checked on the CPU)."""
    g = g.to(x.dtype)
    m_new = m.lerp(g, 1 - beta1)
    w_new = w.mul(beta2).addcmul_(g, g, value=1 - beta2)
    x_new = x.sub((m_new / bc1) / (w_new.sqrt() / sqrt_bc2 + eps) * step)
    m.copy_(torch.where(finite, m_new, m))
    w.copy_(torch.where(finite, w_new, w))
    x.copy_(torch.where(finite, x_new, x))
    return ()


_ADAM_HD_DOT = FusedKernel(_adam_hd_dot_kernel, num_tensors=3, num_sums=1)
_ADAM_HD_STEP = FusedKernel(_adam_hd_step_kernel, num_tensors=4, num_sums=0)


def _fused_adam_hd_dot(grads, ms, vs, bc1, sqrt_bc2, eps, finite, dtype, device) -> Tensor:
    """<g_t, d_{t-1}> over the group as one compiled kernel per group of tensors (``fused=True``)."""
    (dot,) = _ADAM_HD_DOT([grads, ms, vs], (sqrt_bc2.to(coefficient_dtype(ms[0])), finite, eps, dtype),
                          sum_dtype=dtype, device=device)
    return dot / bc1


def _fused_adam_hd_step(xs, grads, ms, vs, step, beta1, beta2, bc1, sqrt_bc2, eps, finite) -> None:
    """:func:`_single_tensor_adam_hd` as one compiled kernel per group of tensors (``fused=True``)."""
    dtype = coefficient_dtype(xs[0])
    step = step.to(dtype)
    _ADAM_HD_STEP([xs, grads, ms, vs], (step, bc1.to(dtype), sqrt_bc2.to(dtype), finite, beta1, beta2, eps),
                  sum_dtype=step.dtype, device=step.device)
