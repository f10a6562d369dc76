r"""``Tuneless``: the default optimizer, an Adam direction whose step size comes from the error
and is capped by a learned distance.

Design (each ingredient was chosen by the ablation of ``benchmarks/default_ablation.py``; the
split of problems, the table and its reading are in ``docs/default.md``):

* **Direction**: Adam's, bias-corrected, :math:`u_k = \hat m_k / (\sqrt{\hat v_k} + \epsilon)`.
* **Step size from the error** (MoMo-Adam's model, Schaipp et al., ICML 2024): with the
  bias-corrected averages :math:`\hat f_k` of the loss and :math:`\hat\gamma_k` of
  :math:`\langle g_k, x_k\rangle` (weight :math:`\beta_1`, as :math:`\hat m_k`), the momentum
  model at :math:`x_k` is :math:`h_k = \hat f_k + \langle \hat m_k, x_k\rangle - \hat\gamma_k`,
  and its Polyak step in the preconditioner's norm is

  .. math:: \tau_k = \frac{(h_k - \ell)_+}{\|\hat m_k\|^2_{D_k^{-1}}},
            \qquad \|\hat m\|^2_{D^{-1}} = \sum_i \hat m_i^2 / D_i,\ D = \sqrt{\hat v} + \epsilon,

  with :math:`\ell` a known lower bound of the loss (``lower_bound``, 0 by default).
* **A cap that is not a hyperparameter**: Prodigy's distance estimate (Mishchenko & Defazio,
  ICML 2024), :math:`r_{k} = \sqrt{\beta_2} r_{k-1} + (1-\sqrt{\beta_2}) d_k^2 \langle g_k, x_0 - x_k\rangle`,
  :math:`s_k = \sqrt{\beta_2} s_{k-1} + (1-\sqrt{\beta_2}) d_k^2 g_k`,
  :math:`d_{k+1} = \max(d_k, r_k / \|s_k\|_1)`. For a convex loss it stays below
  :math:`\|x_0 - x^*\|_\infty`, the largest per-coordinate step worth taking.
* **The two combined** softly, as in NGN (Orvieto & Xiao, 2024): :math:`\eta_k = \mathrm{lr} /
  (1/\tau_k + 1/d_k)`, which is :math:`\tau_k` where the error is small (the Polyak step, which
  reaches a minimum of 0 fast) and :math:`d_k` where it is large or the loss is shifted (no
  divergence when the lower bound is wrong).
* **Start-up without a crawl**: the distance estimate starts at the first step's Polyak step
  :math:`\tau_1 = f(x_1) / \|g_1\|_1` (Adam's first direction is the sign of the gradient),
  which for a convex loss with minimum 0 is itself a lower bound of
  :math:`\|x_1 - x^*\|_\infty` since :math:`f(x_1) \le \langle g_1, x_1 - x^*\rangle`; Prodigy
  starts at 1e-6 and needs tens of steps to grow out of it.
* **Weight decay** is decoupled and scaled by the step size (AdamW's form).

Update: :math:`x_{k+1} = x_k - \eta_k (u_k + \lambda x_k)`. The step size :math:`\eta_k` is
published as ``effective_lr``. One step is one pass of statistics (five sums over the
parameters, reduced in one collective when sharded) and one update; no host synchronization.

State per parameter: :math:`v` (Adam's second moment), :math:`s` (Prodigy's weighted gradient
sum), :math:`x_0` (the starting point) and Schedule-Free's :math:`z`: 16 bytes per float32
parameter, Schedule-Free Prodigy's footprint (:class:`TunelessStep` alone with
:math:`\beta_1 > 0` adds Adam's :math:`m`).

:class:`TunelessVariant` exposes the ingredients as switches for the ablation only; it is not
registered and its switches are not part of the public interface.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import coefficient_dtype, total_abs_sum, total_abs_sum_loop, total_dot, total_dot_loop
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, local_tensor
from .schedule_free import ScheduleFree, _count_on

__all__ = ["Tuneless", "TunelessStep", "TunelessVariant", "TunelessScheduleFreeVariant"]

#: the step rules of the ablation: the error-driven step, the distance estimate, or both
STEP_RULES = ("both", "polyak", "distance")
#: how the two are combined: the soft minimum 1/(1/a + 1/b) or the hard minimum
COMBINES = ("soft", "hard")
#: where the distance estimate starts: the first Polyak step, or Prodigy's 1e-6
STARTS = ("polyak", "tiny")
#: Prodigy's starting distance
TINY_D0 = 1e-6


class _Plan(NamedTuple):
    """What :class:`TunelessStep` knows of a step before its statistics (see ``TunelessStep._plan``)."""

    dtype: torch.dtype
    device: torch.device
    beta1: float
    beta2: float
    eps: float
    count: Any          # the steps counted so far (a host int, or a 0-d int64 tensor)
    on_device: bool     # the counter lives on the device
    bc1: Any
    bc2: Any
    starting: Any       # this is the first step (a bool, or a 0-d bool tensor)
    weight: Tensor      # d_k^2, the gradient sums' weight (1 at the first step)


class TunelessStep(TunelessOptimizer):
    r"""The step of :class:`Tuneless` without its averaging: Adam's direction, a Polyak step
    from the error, capped by Prodigy's distance estimate (see the module docstring).
    Not registered: :class:`Tuneless` wraps it in Schedule-Free averaging.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size, for schedulers (default 1.0; keep it).
        betas: the averaging weights of Adam's two moments (default (0.9, 0.999)); the loss
            and :math:`\langle g, x\rangle` averages use the first.
        weight_decay: decoupled weight decay :math:`\lambda`, scaled by the step size (default 0).
        lower_bound: a known lower bound of the loss (default 0.0, right for every
            non-negative loss); a wrong one slows the end of training but cannot make it
            diverge, since the distance estimate caps the step.
        eps: Adam's :math:`\epsilon` (default 1e-8).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients or loss are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    Needs the loss at every step: ``opt.step(loss=loss)`` or a closure.

    References:
        Schaipp, Ohana, Eickenberg, Defazio, Gower, "MoMo: Momentum Models for Adaptive
        Learning Rates", ICML 2024 (the model and its Polyak step, MoMo-Adam);
        Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
        ICML 2024 (the distance estimate); Orvieto & Xiao, "An Adaptive Stochastic Gradient
        Method with Non-negative Gauss-Newton Stepsizes", 2024 (the soft minimum);
        Kingma & Ba, ICLR 2015 (the direction).
    """

    requires_loss = True
    registry_name = ""
    learning_rate_free = True

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, lower_bound: float = 0.0, eps: float = 1e-8,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        self._init(params, lr, betas, weight_decay, lower_bound, eps, foreach, "both", "soft", "polyak", skip_nonfinite)

    def _init(self, params: Any, lr: float, betas: Any, weight_decay: float, lower_bound: float, eps: float,
              foreach: bool | None, step_rule: str, combine: str, start: str, skip_nonfinite: bool) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        for name, value, allowed in (("step_rule", step_rule, STEP_RULES), ("combine", combine, COMBINES),
                                     ("start", start, STARTS)):
            if value not in allowed:
                v.fail(owner, name, value, " or ".join(repr(a) for a in allowed), allowed[0])
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, betas=(float(betas[0]), float(betas[1])),
                                      weight_decay=float(weight_decay), lower_bound=float(lower_bound),
                                      eps=float(eps), foreach=foreach, skip_nonfinite=skip_nonfinite))
        self._step_rule, self._combine, self._start = step_rule, combine, start

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # torch's keeps defaults, state and param_groups only
        state.update(_step_rule=self._step_rule, _combine=self._combine, _start=self._start)
        return state

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """The learned scalars, shared by every group (each group holds the same tensors' copy,
        so that ``state_dict`` and checkpointing keep them)."""
        first = self.param_groups[0]
        if "tuneless_step" in first:
            return
        shared = {
            "tuneless_step": 0,
            "distance": self._scalar(0.0),             # d_k (0 until the first step sets it)
            "distance_numerator": self._scalar(0.0),   # r_k
            "loss_avg": self._scalar(0.0),             # EMA of f (biased)
            "grad_dot_x_avg": self._scalar(0.0),       # EMA of <g, x> (biased)
        }
        for group in self.param_groups:
            for key, value in shared.items():
                group[key] = value.clone() if isinstance(value, Tensor) else value

    def _buffers(self, p: Tensor, first_moment: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """The local parts of p's buffers (kept as p is, a DTensor when p is one, so that sharded
        checkpoints see the real layout): m (None when beta1 = 0: m is the gradient itself, as
        inside :class:`Tuneless`), v, s and x0."""
        state = self.state[p]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["x0"] = p.detach().clone(memory_format=torch.preserve_format)
        if first_moment and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m = local_tensor(state["exp_avg"]) if first_moment else None
        return m, local_tensor(state["exp_avg_sq"]), local_tensor(state["grad_sum"]), local_tensor(state["x0"])

    # ------------------------------------------------------------------ the step

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        finite = self._step_finite()
        plan = self._plan(checked=finite is not None)
        beta1, beta2, eps = plan.beta1, plan.beta2, plan.eps
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        if finite is not None:  # zeros on a step that is not finite (one call: the buffers are shared)
            flat = self._finite_grads([g for _, grads in per_group for g in grads])
            ends = list(itertools.accumulate(len(grads) for _, grads in per_group))
            per_group = [(params, flat[end - len(grads):end]) for (params, grads), end in zip(per_group, ends)]

        # Each group's local tensors and buffers, gathered once for both passes (m is None when
        # beta1 = 0: the gradient itself).
        tensors = []
        for params, grads in per_group:
            bufs = [self._buffers(p, beta1 > 0) for p in params]
            ms, vs, ss, x0s = (list(t) for t in zip(*bufs)) if bufs else ([], [], [], [])
            tensors.append(([local_tensor(p) for p in params], grads, ms if beta1 > 0 else None, vs, ss, x0s))

        # 1. Moments, the weighted gradient sum, and the five sums:
        #    <g, x>, <g, x0 - x>, <m_hat, x>, ||m_hat||^2_{D^-1}, ||s||_1 (before rescaling).
        stats = torch.zeros(5, dtype=plan.dtype, device=plan.device)
        denoms: list[list[Tensor] | None] = [None] * len(tensors)  # the vectorized sqrt(v_hat) + eps, reused below
        for i, (group, (xs, grads, ms, vs, ss, x0s)) in enumerate(zip(self.param_groups, tensors)):
            if not xs:
                continue
            fn = _multi_tensor_statistics if self._use_foreach(group) else _single_tensor_statistics
            sums, denoms[i] = fn(xs, grads, ms, vs, ss, x0s, beta1=beta1, beta2=beta2, bc1=plan.bc1, bc2=plan.bc2,
                                 eps=eps, weight=plan.weight, dtype=plan.dtype, device=plan.device, finite=finite)
            stats = stats + sums

        # 2. The scalars: the model h_k, the Polyak step, the distance, the step size.
        etas, rescale = self._learn(loss, self._global_sum(stats), plan, finite)

        # 3. The update.
        for i, (group, eta, (xs, grads, ms, vs, ss, _)) in enumerate(zip(self.param_groups, etas, tensors)):
            if not xs:
                continue
            ms = ms if ms is not None else [g.to(x.dtype) for g, x in zip(grads, xs)]
            fn = _multi_tensor_apply if self._use_foreach(group) else _single_tensor_apply
            fn(xs, ms, vs, ss, eta=eta, rescale=rescale, bc1=plan.bc1, bc2=plan.bc2, eps=eps,
               weight_decay=group["weight_decay"], denoms=denoms[i])

    def _plan(self, checked: bool) -> "_Plan":
        """What a step knows before its statistics: the constants, the counter, the bias
        corrections and the weight d_k^2 of the gradient sums (``checked``: the step is under a
        non-finite flag, so the counter lives on the device)."""
        self._init_state()
        dtype, device = self._stat_dtype(), self._stat_device()
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        count = first["tuneless_step"]
        # A checked step (the default) counts on the device, in finite steps only (the host cannot
        # know whether a step counted): the bias corrections and the first step's start of d come
        # from that counter, and the first step's rescaling of s is a multiplication by 1 on the
        # other steps. Unchecked (skip_nonfinite=False), the counter is a host int, as it was.
        on_device = checked or isinstance(count, Tensor)
        if on_device:
            count = _count_on(count, device)
            k1 = (count + 1).to(torch.float32 if device.type == "mps" else torch.float64)
            # (the host's double arithmetic, rounded to the statistics dtype where it is used,
            # as a Python number is)
            bc1, bc2 = (1.0 - torch.pow(beta1, k1)).to(dtype), (1.0 - torch.pow(beta2, k1)).to(dtype)
            starting: Any = count == 0
        else:
            k = count + 1
            bc1, bc2 = 1.0 - beta1 ** k, 1.0 - beta2 ** k
            starting = k == 1
        d = first["distance"]
        weight = torch.where(d > 0, d * d, torch.ones_like(d))  # d_k^2 (1 at the first step, rescaled below)
        return _Plan(dtype, device, beta1, beta2, first["eps"], count, on_device, bc1, bc2, starting, weight)

    def _learn(self, loss: Tensor, sums: Tensor, plan: "_Plan", finite: Tensor | None) -> tuple[list[Tensor], Any]:
        """The step's scalars from its five (globally summed) sums: the model h_k, the Polyak
        step, the distance d and each group's step size. Stores the learned scalars and the
        counter in the groups and publishes each group's step size (as they were on a step that
        is not finite). Returns each group's step size (0 where nothing may move) and the factor
        s is rescaled by (d_1^2 at the first step; None or 1 on the others)."""
        first = self.param_groups[0]
        beta1, beta2 = plan.beta1, plan.beta2
        g_dot_x, g_dot_x0_minus_x, m_dot_x, m_sq, s_l1 = sums.unbind(0)
        ok_loss = torch.isfinite(loss)
        keep = ok_loss if finite is None else ok_loss & finite  # the learned scalars move
        d = d_before = first["distance"]
        weight = plan.weight
        if plan.on_device:
            next_count: Any = plan.count + (finite if finite is not None else 1)
        else:
            next_count = plan.count + 1
        safe_loss = torch.where(ok_loss, loss, torch.zeros_like(loss))
        loss_avg = beta1 * first["loss_avg"] + (1 - beta1) * safe_loss
        gx_avg = beta1 * first["grad_dot_x_avg"] + (1 - beta1) * g_dot_x
        model = loss_avg / plan.bc1 + m_dot_x - gx_avg / plan.bc1
        safe_m_sq = torch.where(m_sq > 0, m_sq, torch.ones_like(m_sq))
        sqrt_b2 = math.sqrt(beta2)
        numerator = sqrt_b2 * first["distance_numerator"] + (1 - sqrt_b2) * weight * g_dot_x0_minus_x
        if plan.on_device or plan.starting:
            # d_1 from the first Polyak step (or Prodigy's 1e-6): the sums above used weight 1,
            # so the numerator is rescaled to d_1^2 (s is rescaled the same way in step 3).
            tau1 = torch.clamp(model - first["lower_bound"], min=0.0) / safe_m_sq
            tau1 = torch.where(torch.isfinite(tau1) & (tau1 > 0), tau1, torch.full_like(tau1, TINY_D0))
            d = tau1 if self._start == "polyak" else torch.full_like(tau1, TINY_D0)
            if plan.on_device:  # the first finite step is known on the device only: 1 on the others (exact)
                d = torch.where(plan.starting, d, d_before)
                rescale = torch.where(plan.starting & keep, d * d, 1.0)
            else:
                rescale = d * d
            numerator = numerator * rescale
            s_l1 = s_l1 * rescale
        else:
            rescale = None
        d_hat = torch.where(s_l1 > 0, numerator / torch.where(s_l1 > 0, s_l1, torch.ones_like(s_l1)),
                            torch.zeros_like(s_l1))
        new_d = torch.maximum(d, torch.where(torch.isfinite(d_hat), d_hat, torch.zeros_like(d_hat)))

        etas = []
        for group in self.param_groups:
            tau = torch.where(m_sq > 0, torch.clamp(model - group["lower_bound"], min=0.0) / safe_m_sq,
                              torch.zeros_like(m_sq))
            if self._step_rule == "polyak":
                base = tau
            elif self._step_rule == "distance":
                base = new_d
            elif self._combine == "soft":
                base = torch.where((tau > 0) & (new_d > 0), tau * new_d / (tau + new_d), torch.zeros_like(tau))
            else:
                base = torch.minimum(tau, new_d)
            ok = keep & torch.isfinite(base) & torch.isfinite(m_sq)
            eta = torch.where(ok, group["lr"] * base, torch.zeros_like(base))  # the step applied (0: none)
            published = group.get(STEP_SIZE_KEY)  # kept by a step that is not finite
            self._publish_step_size(group, gate(finite, eta, eta.new_zeros(()) if published is None else published))
            group["tuneless_step"] = next_count
            # (not finite: d as it was, also at a first step; unchecked, as before: the d started)
            group["distance"] = torch.where(keep, new_d, d if finite is None else d_before)
            group["distance_numerator"] = torch.where(keep, numerator, group["distance_numerator"])
            group["loss_avg"] = torch.where(keep, loss_avg, group["loss_avg"])
            group["grad_dot_x_avg"] = torch.where(keep, gx_avg, group["grad_dot_x_avg"])
            etas.append(eta)
        return etas, rescale

    @property
    def distances(self) -> list[Tensor]:
        """The distance estimate d of each param group (0-d tensors, no sync)."""
        return [g.get("distance", torch.tensor(0.0)) for g in self.param_groups]


class TunelessVariant(TunelessStep):
    """:class:`TunelessStep` (no averaging) with its ingredients as switches, for
    ``benchmarks/default_ablation.py`` only.

    Args (beyond :class:`TunelessStep`'s):
        step_rule: ``"both"`` (the default's), ``"polyak"`` (the error-driven step alone, no cap)
            or ``"distance"`` (Prodigy's estimate alone).
        combine: ``"soft"`` (1/(1/tau + 1/d), the default's) or ``"hard"`` (min).
        start: ``"polyak"`` (the default's: d starts at the first Polyak step) or ``"tiny"``
            (Prodigy's 1e-6).
    """

    registry_name = ""

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, lower_bound: float = 0.0, eps: float = 1e-8,
                 foreach: bool | None = None, step_rule: str = "both", combine: str = "soft",
                 start: str = "polyak", skip_nonfinite: bool = True) -> None:
        self._init(params, lr, betas, weight_decay, lower_bound, eps, foreach, step_rule, combine, start,
                   skip_nonfinite)


class Tuneless(ScheduleFree):
    r"""The default learning-rate-free optimizer: no learning rate, no schedule.

    Schedule-Free averaging (Defazio et al., NeurIPS 2024) around :class:`TunelessStep`, whose
    step on :math:`z` takes Adam's direction (no first moment: the interpolation plays its
    part) with the step size :math:`\eta_t = 1 / (1/\tau_t + 1/d_t)`, the soft minimum of the
    Polyak step :math:`\tau_t` in Adam's norm and Prodigy's distance estimate :math:`d_t`
    (started at the first Polyak step). The gradient is taken at
    :math:`y = (1-\beta) z + \beta x`, and :math:`x` averages the :math:`z`'s with weights
    :math:`(t+1)^8 \eta_{\max,t}^2`, so that it follows the last ninth of the run: the last
    iterate's fast convergence where there is no noise (a minimum of 0 is reached to 1e-10),
    an annealed average where there is. Evaluate at :math:`x`: ``with opt.evaluation_point():``
    (or ``opt.eval()`` / ``opt.train()``), and recompute BatchNorm statistics there
    (:func:`~tuneless.recompute_batchnorm_statistics`). See the module docstring for the math
    and ``docs/default.md`` for the ablation that chose each part.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size, for schedulers (default 1.0; keep it).
        weight_decay: weight decay computed at :math:`y` and applied to :math:`z` with the
            step size (Schedule-Free AdamW's form; default 0).
        lower_bound: a known lower bound of the loss (default 0.0, right for every
            non-negative loss); a wrong one slows the end of training but cannot make it
            diverge, since the distance estimate caps the step.
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        skip_nonfinite: a step whose gradients or loss are not all finite leaves the parameters
            and the state as they were (default True; see
            :class:`~tuneless.optim.base.TunelessOptimizer`); False lets the NaN through, as
            torch.optim does.

    Needs the loss at every step: ``opt.step(loss=loss)`` or a closure.

    Example:
        >>> import torch, tuneless
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = tuneless.Tuneless([w])
        >>> for _ in range(200):
        ...     opt.zero_grad(); loss = ((w - torch.tensor([1.0, -2.0, 3.0])) ** 2).sum()
        ...     loss.backward(); _ = opt.step(loss=loss)
        >>> with opt.evaluation_point():
        ...     bool(((w - torch.tensor([1.0, -2.0, 3.0])) ** 2).sum() < 1e-6)
        True
    """

    registry_name = "tuneless"
    learning_rate_free = True
    requires_loss = True

    #: the design's constants (docs/default.md): Schedule-Free's interpolation weight, the
    #: averaging's polynomial power and step-size power, Adam's second-moment decay and epsilon
    MOMENTUM, AVERAGE_POWER, WEIGHT_LR_POWER, BETA2, EPS = 0.9, 8.0, 2.0, 0.999, 1e-8

    def __init__(self, params: Any, lr: float = 1.0, *, weight_decay: float = 0.0, lower_bound: float = 0.0,
                 foreach: bool | None = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        base = TunelessStep(params, lr=lr, betas=(0.0, self.BETA2), lower_bound=lower_bound, eps=self.EPS,
                            foreach=foreach, skip_nonfinite=skip_nonfinite)
        super().__init__(base, momentum=self.MOMENTUM, weight_decay_at_y=float(weight_decay), r=self.AVERAGE_POWER,
                         weight_lr_power=self.WEIGHT_LR_POWER, foreach=foreach, skip_nonfinite=skip_nonfinite)
        self.requires_loss = True

    @property
    def distances(self) -> list[Tensor]:
        """The distance estimate d of each param group (0-d tensors, no sync)."""
        return self.base.distances

    def __repr__(self) -> str:
        return TunelessOptimizer.__repr__(self)


class TunelessScheduleFreeVariant(ScheduleFree):
    """Schedule-Free averaging around :class:`TunelessVariant`, for the ablation only (not registered).

    The base's first beta is 0 by default: the interpolation of Schedule-Free replaces momentum
    (as in Schedule-Free AdamW), so the Polyak step is taken on the last loss and gradient.

    Args:
        params: parameters or param groups.
        beta1: the base's first beta (default 0.0).
        momentum: Schedule-Free's interpolation weight (default 0.9).
        r, weight_lr_power: the averaging weights (t+1)^r * gamma_max^weight_lr_power (defaults 0, 2).
        step_rule, combine, start: as :class:`TunelessVariant`.
        skip_nonfinite: as :class:`Tuneless`.
    """

    registry_name = ""

    def __init__(self, params: Any, *, beta1: float = 0.0, momentum: float = 0.9, r: float = 0.0,
                 weight_lr_power: float = 2.0, step_rule: str = "both", combine: str = "soft",
                 start: str = "polyak", skip_nonfinite: bool = True) -> None:
        base = TunelessVariant(params, betas=(beta1, 0.999), step_rule=step_rule, combine=combine, start=start,
                               skip_nonfinite=skip_nonfinite)
        super().__init__(base, momentum=momentum, r=r, weight_lr_power=weight_lr_power, skip_nonfinite=skip_nonfinite)


# ---------------------------------------------------------------------------- per-parameter (the truth)


def _decays(finite: Tensor | None, like: Tensor, *factors: float) -> list[Any]:
    """The moments' decay factors: as they are (numbers) when the step is not checked, else 0-d
    tensors that are 1 on a step that is not finite (then, with zero gradients, m, v and s are
    multiplied by 1 and added 0: kept bit for bit)."""
    if finite is None:
        return list(factors)
    return [torch.where(finite, torch.full((), f, dtype=like.dtype, device=like.device), 1.0) for f in factors]


def _single_tensor_statistics(xs, grads, ms, vs, ss, x0s, *, beta1, beta2, bc1, bc2, eps, weight, dtype,
                              device, finite=None) -> tuple[Tensor, None]:
    """Update m, v and s of each tensor; return this part's five sums (see ``TunelessStep._update``),
    and None (the update recomputes each denominator). ``ms`` is None when beta1 = 0 (m is the gradient).
    ``finite``: the step's flag (the gradients are zeros when it is False), or None."""
    sqrt_b2 = math.sqrt(beta2)
    sums = torch.zeros(5, dtype=dtype, device=device)
    decay1, decay2, decay_s = _decays(finite, weight, beta1, beta2, sqrt_b2)
    for i, (x, g, v_, s, x0) in enumerate(zip(xs, grads, vs, ss, x0s)):
        g = g.to(v_.dtype)
        if ms is None:
            m = g
        else:
            m = ms[i]
            m.mul_(decay1).add_(g, alpha=1 - beta1)
        v_.mul_(decay2).addcmul_(g, g, value=1 - beta2)
        s.mul_(decay_s).add_(g * (1 - sqrt_b2) * weight.to(s.dtype))
        m_hat = m / bc1
        denom = (v_ / bc2).sqrt_().add_(eps)
        g64, x64, m64 = g.to(dtype), x.to(dtype), m_hat.to(dtype)
        sums = sums + torch.stack([
            (g64 * x64).sum(),
            (g64 * (x0.to(dtype) - x64)).sum(),
            (m64 * x64).sum(),
            (m64 * m64 / denom.to(dtype)).sum(),
            s.to(dtype).abs().sum(),
        ])
    return sums, None


def _single_tensor_apply(xs, ms, vs, ss, *, eta, rescale, bc1, bc2, eps, weight_decay, denoms=None) -> None:
    """x <- x - eta (m_hat / (sqrt(v_hat) + eps) + wd x); at the first step s is rescaled to d_1^2."""
    for x, m, v_, s in zip(xs, ms, vs, ss):
        if rescale is not None:
            s.mul_(rescale.to(s.dtype))
        denom = (v_ / bc2).sqrt_().add_(eps)
        e = eta.to(x.dtype)
        if weight_decay:
            x.mul_(1 - e * weight_decay)
        x.addcdiv_(m / bc1 * -e, denom)


# ---------------------------------------------------------------------------- vectorized


def _multi_tensor_statistics(xs, grads, ms, vs, ss, x0s, *, beta1, beta2, bc1, bc2, eps, weight, dtype,
                             device, finite=None) -> tuple[Tensor, list[Tensor]]:
    """:func:`_single_tensor_statistics` with ``torch._foreach_*`` (same dtype per call site); also
    returns the denominators sqrt(v_hat) + eps, which the update reuses (v does not change between)."""
    sqrt_b2 = math.sqrt(beta2)
    grads = [g.to(v.dtype) for g, v in zip(grads, vs)]
    decay2, decay_s = _decays(finite, weight, beta2, sqrt_b2)
    if ms is None:
        ms = grads
    elif finite is None:
        torch._foreach_lerp_(ms, grads, 1 - beta1)
    else:  # weight 0 on a step that is not finite: m kept
        step1 = torch.where(finite, torch.full((), 1 - beta1, dtype=weight.dtype, device=weight.device), 0.0)
        torch._foreach_lerp_(ms, grads, [step1.to(m.dtype if m.dtype.itemsize >= 4 else torch.float32) for m in ms])
    torch._foreach_mul_(vs, decay2 if finite is None else decay2.to(coefficient_dtype(vs[0])))
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    torch._foreach_mul_(ss, decay_s if finite is None else decay_s.to(coefficient_dtype(ss[0])))
    torch._foreach_addcmul_(ss, grads, [(weight * (1 - sqrt_b2)).to(s.dtype) for s in ss])
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    m_hat = torch._foreach_div(ms, bc1)
    u = torch._foreach_div(m_hat, denom)
    diff = torch._foreach_sub(x0s, xs)
    return torch.stack([
        total_dot(grads, xs, dtype, device),
        total_dot(grads, diff, dtype, device),
        total_dot(m_hat, xs, dtype, device),
        total_dot(m_hat, u, dtype, device),
        total_abs_sum(ss, dtype, device),
    ]), denom


def _multi_tensor_apply(xs, ms, vs, ss, *, eta, rescale, bc1, bc2, eps, weight_decay, denoms) -> None:
    """:func:`_single_tensor_apply` with ``torch._foreach_*``, with the statistics pass's denominators."""
    if rescale is not None:
        torch._foreach_mul_(ss, rescale.to(ss[0].dtype))
    denom = denoms
    e = eta.to(xs[0].dtype)
    if weight_decay:
        torch._foreach_mul_(xs, 1 - e * weight_decay)
    u = torch._foreach_div(ms, denom)
    torch._foreach_addcmul_(xs, u, [-e / bc1] * len(xs))
