r"""MoMo-Adam: Adam's preconditioner with MoMo's step size from the loss.

Paper: F. Schaipp, R. Ohana, M. Eickenberg, A. Defazio, R. M. Gower, "MoMo: Momentum Models for
Adaptive Learning Rates", ICML 2024, arXiv:2305.07583 (MoMo-Adam, the Adam form of the model;
MoMo* for an unknown lower bound). Reference implementation matched: the authors' ``momo-opt``
0.1.0, ``momo.MomoAdam``, step by step to a relative 1e-10 over 200 float64 steps
(``tests/test_parity_momo_adam.py``).

MoMo-Adam is **not learning-rate-free**: its step size is the minimum of a cap
:math:`\eta` (the reference's ``lr``, 1e-2 by default) and the Polyak step of the momentum
model. Here the cap is its own argument, ``cap``, and ``lr`` keeps the tuneless meaning of a
multiplier that lr schedulers drive (1.0): the cap applied is ``lr * cap``, so a schedule on
``lr`` is a schedule on the cap, as the paper's schedules :math:`\alpha_k` are.

Differences from the reference, each deliberate:

* ``lr`` is a multiplier of ``cap`` (the reference's ``lr`` is ``lr * cap`` here).
* No host synchronization: the step size, the loss average and the lower-bound estimate stay
  0-d tensors on the device (the reference calls ``.item()`` up to four times a step).
* Several param groups: the lower-bound estimate is kept per group (the reference keeps one,
  overwritten group after group inside the step, so that the second group's step uses the
  estimate the first group's step just made). With one group, or without
  ``estimate_lower_bound``, the two agree.
* One step count for every bias correction (the reference's statistics use each parameter's
  own count, its update the optimizer's; they differ only for a parameter that had no gradient
  at some steps).
* Edge cases: a zero preconditioned momentum gives a step of 0 (the reference divides by 0).
  A step whose loss or gradients are not all finite is skipped (``skip_nonfinite``, the
  default): the parameters, the moments, the averages, the lower bound and the step count stay
  as they were. With ``skip_nonfinite=False``, a non-finite loss still gives a step of 0 and
  leaves the loss average as it was; a non-finite gradient goes through, as in torch.optim.
* The step count is a 0-d tensor on the device (the reference's is a host number), so that a
  skipped step is not counted without a host sync; the bias corrections are computed from it
  on the device, in float64 (float32 on MPS), as the reference computes them in host doubles.
* Weight decay is the paper's proximal form only (the reference's ``divide=True``, its
  default); its ``divide=False`` (AdamW-style decay with the same step size) is not offered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import cache_blocks, coefficient_dtype, total_dots, total_dot_loop
from .base import STEP_SIZE_KEY, TunelessOptimizer, finite_or_zero, gate, local_tensor, lr_in

__all__ = ["MomoAdam"]

#: the paper's and the reference's default cap eta
DEFAULT_CAP = 1e-2


def representable_eps(eps: float, dtype: torch.dtype) -> float:
    """``eps``, or the smallest positive value of ``dtype`` where ``eps`` would round to 0 in it
    (float16: 1e-8 does; then a zero gradient gave Adam's 0 / (0 + 0) = NaN)."""
    info = torch.finfo(dtype)
    return max(eps, info.tiny * info.eps)


def host_dtype(device: torch.device) -> torch.dtype:
    """The dtype in which coefficients that the host would compute in double (bias corrections
    from a step count kept on the device) are computed on ``device``: float64, float32 on MPS
    (which has no float64). On the CPU the results are those of the host's doubles, bit for bit."""
    return torch.float32 if device.type == "mps" else torch.float64


def as_coefficient(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a 0-d tensor standing for a host double) in the dtype in which a Python number
    would meet ``like``: :func:`~tuneless.optim._batched.coefficient_dtype` of ``like`` (so a
    float64 value with a float32 tensor is rounded to float32 first, as a number would be)."""
    dtype = coefficient_dtype(like)
    return value if value.dtype == dtype else value.to(dtype)


class Coefficients:
    """:func:`as_coefficient` for loops over tensors: each value cast once per dtype (the tensors
    of a loop share a few dtypes). Values must stay alive while it is used (they are keyed by id)."""

    def __init__(self) -> None:
        self._cast: dict[tuple[int, torch.dtype], Tensor] = {}

    def __call__(self, value: Tensor, like: Tensor) -> Tensor:
        dtype = coefficient_dtype(like)
        if value.dtype == dtype:
            return value
        key = (id(value), dtype)
        cast = self._cast.get(key)
        if cast is None:
            cast = self._cast[key] = value.to(dtype)
        return cast


def divided(t: Tensor, host: Tensor, cast: Any = as_coefficient) -> Tensor:
    """``t / host`` in ``t``'s dtype, as with a host number ``host`` (a 0-d tensor standing for a
    host double; a 0-d 16-bit ``t`` divided by the float32 coefficient would be float32).
    ``cast``: :func:`as_coefficient`, or a :class:`Coefficients` in a loop."""
    return (t / cast(host, t)).to(t.dtype)


def foreach_divided(tensors: list[Tensor], host: Tensor) -> list[Tensor]:
    """:func:`divided` over a list of tensors of one dtype, with ``torch._foreach_div``."""
    out = torch._foreach_div(tensors, [as_coefficient(host, tensors[0])] * len(tensors))
    if tensors[0].dtype.itemsize < 4:  # (0-d 16-bit tensors come back in float32)
        out = [o if o.dtype == t.dtype else o.to(t.dtype) for o, t in zip(out, tensors)]
    return out


class MomoAdam(TunelessOptimizer):
    r"""MoMo-Adam: Adam's direction, with the step size of the MoMo model in Adam's norm.

    With :math:`\rho_k = 1 - \beta_1^k` and the running averages (all started at 0)

    .. math::
        m_k &= \beta_1 m_{k-1} + (1-\beta_1) g_k, \qquad
        v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2, \qquad
        D_k = \sqrt{v_k / (1-\beta_2^k)} + \epsilon \\
        \bar f_k &= \beta_1 \bar f_{k-1} + (1-\beta_1) f(x_k), \qquad
        \bar\gamma_k = \beta_1 \bar\gamma_{k-1} + (1-\beta_1) \langle g_k, x_k\rangle \\
        h_k &= (1+\eta\lambda)(\bar f_k - \rho_k \ell_k) + \langle m_k, x_k\rangle - (1+\eta\lambda)\bar\gamma_k \\
        \tau_k &= \min\Big\{\frac{\eta}{\rho_k},\ \frac{(h_k)_+}{\|m_k\|^2_{D_k^{-1}}}\Big\}, \qquad
        x_{k+1} = \frac{x_k - \tau_k\, m_k / D_k}{1 + \eta\lambda}

    where :math:`\|m\|^2_{D^{-1}} = \sum_i m_i^2 / D_i`, :math:`\eta` = ``lr * cap`` and
    :math:`\lambda` = ``weight_decay`` (the proximal form of weight decay). In bias-corrected
    terms the step along Adam's direction :math:`\hat m_k / D_k` is
    :math:`\rho_k\tau_k = \min\{\eta,\ (\hat h_k)_+ / \|\hat m_k\|^2_{D_k^{-1}}\}`, the Polyak
    step of the momentum model capped at :math:`\eta`; it is published as ``effective_lr``.

    The lower bound :math:`\ell` is ``lower_bound`` (0: right for every non-negative loss), or,
    with ``estimate_lower_bound=True`` (MoMo*), learned: before the step, if
    :math:`c_k = (1+\eta\lambda)\bar f_k + \langle m_k, x_k\rangle - (1+\eta\lambda)\bar\gamma_k
    < (1+\eta\lambda)\rho_k\ell_k`, it is reset to :math:`\max(c_k / (2(1+\eta\lambda)\rho_k),\ \ell_0)`;
    after the step, :math:`\ell_{k+1} = \max\big((\bar f_k + \langle m_k, x_k\rangle - \bar\gamma_k
    - \tfrac12\tau_k\|m_k\|^2_{D_k^{-1}}) / \rho_k,\ \ell_0\big)`, with :math:`\ell_0` = ``lower_bound``.

    Args:
        params: parameters or param groups.
        lr: multiplier of the cap, for lr schedulers (default 1.0; the cap applied is ``lr * cap``).
        cap: the largest step size :math:`\eta` along Adam's direction (default 1e-2, the
            paper's and the reference's ``lr``). A tuned constant: MoMo-Adam is not
            learning-rate-free, although the paper reports it robust to this value.
        betas: :math:`(\beta_1, \beta_2)` of Adam's moments; :math:`\beta_1` also averages the
            loss and :math:`\langle g, x\rangle` (default (0.9, 0.999)).
        eps: added to :math:`D_k` (default 1e-8).
        weight_decay: proximal weight decay :math:`\lambda` (default 0).
        lower_bound: a known lower bound of the loss, :math:`\ell_0` (default 0.0).
        estimate_lower_bound: learn the lower bound online (MoMo*; the reference's
            ``use_fstar``; default False).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients or loss are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    Needs the loss at every step: ``opt.step(loss=loss)`` after ``loss.backward()``, or a
    closure. Under data parallelism the ranks' losses are averaged (see
    :mod:`tuneless.distributed`).

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.MomoAdam([x], cap=0.5)   # the default 1e-2 would need 400 steps here
        >>> for _ in range(100):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step(loss=loss)
        >>> bool((x ** 2).sum() < 0.01)   # from 25
        True

    References:
        Schaipp, Ohana, Eickenberg, Defazio, Gower, "MoMo: Momentum Models for Adaptive
        Learning Rates", ICML 2024, arXiv:2305.07583 (matches ``momo-opt`` 0.1.0 ``MomoAdam``;
        see the module docstring for where tuneless differs).

    .. warning:: ``cap`` bounds every step: too small and training crawls, as with Adam's
       learning rate. A wrong ``lower_bound`` (above the loss's minimum) stops training short
       of it; use ``estimate_lower_bound=True`` when it is unknown.
    """

    requires_loss = True
    registry_name = "momo_adam"
    #: the cap is a tuned constant (1e-2 by default), so MoMo-Adam is not learning-rate-free
    learning_rate_free = False
    #: an anchor of the benchmark: run at its defaults next to the learning-rate-free methods
    #: (see ``tuneless.registry.methods_at_defaults``)
    benchmark_anchor = True

    def __init__(self, params: Any, lr: float = 1.0, *, cap: float = DEFAULT_CAP,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lower_bound: float = 0.0, estimate_lower_bound: bool = False,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "cap", cap, 0.0, None, inclusive="()", recommended=DEFAULT_CAP)
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_bool(owner, "estimate_lower_bound", estimate_lower_bound)
        if foreach is not None:
            v.check_bool(owner, "foreach", foreach)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, cap=float(cap), betas=(float(betas[0]), float(betas[1])),
                                      eps=float(eps), weight_decay=float(weight_decay),
                                      lower_bound=float(lower_bound),
                                      estimate_lower_bound=estimate_lower_bound, foreach=foreach,
                                      skip_nonfinite=skip_nonfinite))

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """The scalars, created at the first step, in every param group (where ``state_dict``
        and checkpointing keep them)."""
        for group in self.param_groups:
            if "momo_step" in group:
                if not isinstance(group["momo_step"], Tensor):  # a checkpoint that counted on the host
                    group["momo_step"] = torch.full((), int(group["momo_step"]), dtype=torch.int64,
                                                    device=self._stat_device())
                continue
            # k, the steps taken: on the device (int64), so that a skipped step is not counted
            group["momo_step"] = torch.zeros((), dtype=torch.int64, device=self._stat_device())
            group["loss_avg"] = self._scalar(0.0)                  # \bar f_k (the same in every group)
            group["grad_dot_x_avg"] = self._scalar(0.0)            # this group's part of \bar\gamma_k
            group["f_star_estimate"] = self._scalar(group["lower_bound"])  # \ell_k

    def _buffers(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """This parameter's (local) m and v, created at its first gradient (sharded like it)."""
        state = self.state[p]
        if "exp_avg" not in state:
            # Exponential moving average of the gradients, m_k (biased: started at 0).
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Exponential moving average of the squared gradients, v_k (biased).
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])

    # ------------------------------------------------------------------ the step

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._init_state()
        dtype, device = self._stat_dtype(), self._stat_device()
        steps = self.param_groups[0]["momo_step"]
        k = (steps + 1).to(host_dtype(device))  # this step's k, for the bias corrections
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        # A step that is not finite (finite False) is computed from zero gradients, with the
        # moments' decay 1, the step size 0, no weight decay, and every learned scalar kept.
        finite = self._step_finite()
        if finite is not None:
            zeroed = iter(self._finite_grads([g for _, grads in per_group for g in grads]))
            per_group = [(params, [next(zeroed) for _ in grads]) for params, grads in per_group]

        # 1. Moments, and the sums: each group's <g, x>, then <m, x> and ||m||^2_{D^-1} overall.
        groups_count = len(self.param_groups)
        stats = torch.zeros(groups_count + 2, dtype=dtype, device=device)
        for i, (group, (params, grads)) in enumerate(zip(self.param_groups, per_group)):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            xs = [local_tensor(p) for p in params]
            ms, vs = (list(t) for t in zip(*(self._buffers(p) for p in params)))
            common = dict(beta1=beta1, beta2=beta2, bias_correction2=1.0 - beta2 ** k, eps=group["eps"],
                          finite=finite, dtype=dtype, device=device)
            if self._use_foreach(group):
                part = _multi_tensor_statistics(xs, grads, ms, vs, scratch=self._scratch(), **common)
            else:
                part = _single_tensor_statistics(xs, grads, ms, vs, **common)
            stats[i] += part[0]
            stats[groups_count:] += part[1:]
        stats = self._global_sum(stats)
        g_dot_x, m_dot_x, m_sq = stats[:groups_count], stats[groups_count], stats[groups_count + 1]

        # 2. The scalar averages: each group's part of gamma (its own beta1), the loss (the last
        #    group's beta1, as the reference does).
        ok_loss = torch.isfinite(loss)
        safe_loss = torch.where(ok_loss, loss, torch.zeros_like(loss))
        gamma = torch.zeros((), dtype=dtype, device=device)
        for i, group in enumerate(self.param_groups):
            beta1 = group["betas"][0]
            old = group["grad_dot_x_avg"]
            group["grad_dot_x_avg"] = gate(finite, beta1 * old + (1 - beta1) * g_dot_x[i], old)
            gamma = gamma + group["grad_dot_x_avg"]
        beta1_loss = self.param_groups[-1]["betas"][0]
        old_loss_avg = self.param_groups[0]["loss_avg"]
        loss_avg = torch.where(ok_loss, beta1_loss * old_loss_avg + (1 - beta1_loss) * safe_loss, old_loss_avg)
        loss_avg = gate(finite, loss_avg, old_loss_avg)
        steps = steps + (1 if finite is None else finite.to(steps.dtype))

        # 3. Each group's step size (its cap, weight decay and bound), then its update.
        for group, (params, _) in zip(self.param_groups, per_group):
            group["loss_avg"] = loss_avg
            group["momo_step"] = steps
            tau, scaled, ell = momo_adam_step_size(group, k, loss_avg, gamma, m_dot_x, m_sq, ok_loss)
            group["f_star_estimate"] = gate(finite, ell, group["f_star_estimate"])
            if finite is not None:
                tau = torch.where(finite, tau, torch.zeros_like(tau))
                published = group.get(STEP_SIZE_KEY)
                scaled = gate(finite, scaled, 0.0 if published is None else published)
            self._publish_step_size(group, scaled)
            if not params:
                continue
            xs = [local_tensor(p) for p in params]
            ms, vs = (list(t) for t in zip(*(self._buffers(p) for p in params)))
            eta = lr_in(group["lr"], dtype) * group["cap"]
            shrink = 1.0 + eta * group["weight_decay"]
            if finite is not None and (isinstance(shrink, Tensor) or shrink != 1.0):  # no decay when not finite
                if not isinstance(shrink, Tensor):
                    shrink = torch.full((), shrink, dtype=k.dtype, device=device)
                shrink = gate(finite, shrink, 1.0)
            fn = _multi_tensor_apply if self._use_foreach(group) else _single_tensor_apply
            fn(xs, ms, vs, tau=tau, bias_correction2=1.0 - group["betas"][1] ** k, eps=group["eps"], shrink=shrink)

    @property
    def f_star_estimates(self) -> list[Tensor]:
        """The current lower bound of each param group (0-d tensors, no sync)."""
        return [g.get("f_star_estimate", torch.tensor(g["lower_bound"])) for g in self.param_groups]


def _decays(finite: Tensor, beta1: float, beta2: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """(beta1, beta2) as 0-d tensors in ``like``'s dtype, 1 where the step is not finite."""
    one, two = (gate(finite, torch.full((), b, dtype=like.dtype, device=like.device), 1.0) for b in (beta1, beta2))
    return one, two


def _times(a: float | Tensor, host: Tensor) -> Tensor:
    """``a * host`` as if ``host`` (a 0-d tensor standing for a host double) were a Python
    number: in double with a number ``a``, in ``a``'s dtype with a tensor ``a``."""
    return a * as_coefficient(host, a) if isinstance(a, Tensor) else a * host


def momo_adam_step_size(group: dict[str, Any], k: Tensor, loss_avg: Tensor, gamma: Tensor, m_dot_x: Tensor,
                        m_sq: Tensor, ok_loss: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The group's tau_k (the step along m / D), rho_k tau_k (along m_hat / D, published) and
    its new lower-bound estimate (the one it has, unless it is learned). See :class:`MomoAdam`.

    ``k`` is the step's count, a 0-d tensor in :func:`host_dtype` (kept on the device); the
    coefficients made from it meet the statistics as host numbers would (see :func:`as_coefficient`)."""
    eta = lr_in(group["lr"], gamma.dtype) * group["cap"]
    rho = 1.0 - group["betas"][0] ** k
    scale = 1.0 + eta * group["weight_decay"]
    ell0 = group["lower_bound"]
    ell = group["f_star_estimate"]
    if group["estimate_lower_bound"]:
        model_with_decay = scale * loss_avg + m_dot_x - scale * gamma
        reset = torch.clamp(model_with_decay / as_coefficient(_times(2 * scale, rho), model_with_decay), min=ell0)
        ell = torch.where(model_with_decay < as_coefficient(_times(scale, rho), ell) * ell, reset, ell)
    numerator = scale * (loss_avg - as_coefficient(rho, ell) * ell) + m_dot_x - scale * gamma
    positive = m_sq > 0
    polyak = torch.where(positive, torch.clamp(numerator, min=0.0) / torch.where(positive, m_sq, torch.ones_like(m_sq)),
                         torch.zeros_like(m_sq))
    cap = eta / as_coefficient(rho, eta) if isinstance(eta, Tensor) else torch.full_like(rho, eta) / rho
    tau = finite_or_zero(torch.clamp(polyak, max=as_coefficient(cap, polyak)), loss_avg, numerator, m_sq)
    tau = torch.where(ok_loss, tau, torch.zeros_like(tau))
    if group["estimate_lower_bound"]:
        model = loss_avg + m_dot_x - gamma
        new_ell = torch.clamp((model - 0.5 * tau * m_sq) / as_coefficient(rho, model), min=ell0)
        ell = torch.where(ok_loss & torch.isfinite(new_ell), new_ell, ell)
    return tau, tau * as_coefficient(rho, tau), ell


# ---------------------------------------------------------------------------- per-parameter (the truth)


def _single_tensor_statistics(xs: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], *,
                              beta1: float, beta2: float, bias_correction2: Tensor, eps: float,
                              finite: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Update m and v of each tensor; return this group's (<g, x>, <m, x>, ||m||^2_{D^-1}).

    ``finite`` False (a step that is not finite): the gradients are 0 and the decays 1, so that
    m and v stay; None: the step is not checked."""
    decays = None if finite is None else _decays(finite, beta1, beta2, bias_correction2)
    cast = Coefficients()
    g_dot_x = total_dot_loop(grads, xs, dtype, device)  # at x_k, before anything moves
    m_dot_x = torch.zeros((), dtype=dtype, device=device)
    m_sq = torch.zeros((), dtype=dtype, device=device)
    for x, g, m, v_ in zip(xs, grads, ms, vs):
        g = g.to(m.dtype)
        if decays is None:
            m.mul_(beta1)
            v_.mul_(beta2)
        else:
            m.mul_(cast(decays[0], m))
            v_.mul_(cast(decays[1], v_))
        m.add_(g, alpha=1 - beta1)
        v_.addcmul_(g, g, value=1 - beta2)
        denom = divided(v_, bias_correction2, cast).sqrt_().add_(representable_eps(eps, v_.dtype))
        m_dot_x = m_dot_x + (m.to(dtype) * x.to(dtype)).sum()
        m_sq = m_sq + (m * (m / denom)).to(dtype).sum()
    return torch.stack([g_dot_x, m_dot_x, m_sq])


def _single_tensor_apply(xs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, tau: Tensor,
                         bias_correction2: Tensor, eps: float, shrink: float | Tensor) -> None:
    """x <- (x - tau m / D) / (1 + eta lambda), one tensor at a time."""
    cast = Coefficients()
    for x, m, v_ in zip(xs, ms, vs):
        denom = divided(v_, bias_correction2, cast).sqrt_().add_(representable_eps(eps, v_.dtype))
        x.sub_((m / denom).mul_(tau.to(x.dtype)))
        if isinstance(shrink, Tensor):  # (a tensor lr, or a checked step: never read on the host)
            x.div_(cast(shrink, x))
        elif shrink != 1.0:
            x.div_(shrink)


# ---------------------------------------------------------------------------- vectorized


def _multi_tensor_statistics(xs: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], *,
                             beta1: float, beta2: float, bias_correction2: Tensor, eps: float,
                             finite: Tensor | None, dtype: torch.dtype, device: torch.device,
                             scratch: Any) -> Tensor:
    """:func:`_single_tensor_statistics` with ``torch._foreach_*``, block by block on the CPU
    (cache-sized, so that the passes after the first read from the cache)."""
    decays = None if finite is None else _decays(finite, beta1, beta2, bias_correction2)
    sums = torch.zeros(3, dtype=dtype, device=device)
    for x, g, m, v_ in cache_blocks(xs, grads, ms, vs):
        g_dot_x = total_dots((g, x), ((0, 1),), dtype, device, scratch)
        g = [gi.to(mi.dtype) for gi, mi in zip(g, m)]
        if decays is None:
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v_, beta2)
            torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        elif m[0].dtype.itemsize >= 4:  # the weight 1 - beta1 is 0 on a step that is not finite, beta2 1
            torch._foreach_lerp_(m, g, [as_coefficient(1.0 - decays[0], m[0])] * len(m))
            torch._foreach_mul_(v_, [as_coefficient(decays[1], v_[0])] * len(v_))
            torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        else:  # 16-bit: a lerp would round a tensor weight to 16 bits; the per-parameter path's form
            torch._foreach_mul_(m, [as_coefficient(decays[0], m[0])] * len(m))
            torch._foreach_add_(m, g, alpha=1 - beta1)
            torch._foreach_mul_(v_, [as_coefficient(decays[1], v_[0])] * len(v_))
            torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        denom = foreach_divided(v_, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, representable_eps(eps, v_[0].dtype))
        u = torch._foreach_div(m, denom)  # m / D
        sums = sums + torch.cat([g_dot_x, total_dots((m, x, u), ((0, 1), (0, 2)), dtype, device, scratch)])
    return sums


def _multi_tensor_apply(xs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, tau: Tensor,
                        bias_correction2: Tensor, eps: float, shrink: float | Tensor) -> None:
    """:func:`_single_tensor_apply` with ``torch._foreach_*``, block by block on the CPU."""
    for x, m, v_ in cache_blocks(xs, ms, vs):
        denom = foreach_divided(v_, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, representable_eps(eps, v_[0].dtype))
        u = torch._foreach_div(m, denom)
        torch._foreach_addcmul_(x, u, [-tau.to(x[0].dtype)] * len(x))
        if isinstance(shrink, Tensor):  # (a tensor lr, or a checked step: never read on the host)
            torch._foreach_div_(x, [as_coefficient(shrink, x[0])] * len(x))
        elif shrink != 1.0:
            torch._foreach_div_(x, shrink)
