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
* **A level for an unknown minimum** (Polyak's target level, Brännlund 1995; Nedić & Bertsekas
  2001, gated): the step aims at :math:`\ell_k = \max(\ell, f^{rec}_k - \delta_k)`, with
  :math:`f^{rec}` the lowest :math:`h` seen and :math:`\delta_1 = h_1 - \ell` (the first steps
  aim at :math:`\ell`), :math:`\delta` times 1.1 when the last level was reached, times 0.99 when
  it was missed *while the Polyak step aimed at* :math:`\ell` *is longer than the distance
  estimate* (the cap decides, so :math:`\ell` may be below the minimum), unchanged otherwise, and
  never above :math:`f^{rec} - \ell`. Where the minimum is :math:`\ell` the level stays there;
  where it is above (a loss shifted by + 1), the level climbs to it.
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
from ._batched import (CPU_BLOCK_NUMEL, cache_blocks, coefficient_dtype, cpu_paths, flat_abs_sum, total_abs_sum,
                       total_abs_sum_loop, total_dot_loop, total_dots)
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, known_finite, known_true, local_tensor
from ._fused import FusedKernel
from .polyak import momo_star_level, momo_star_reset
from .schedule_free import ScheduleFree, _count_on, _decay_step, decay_at_y_

__all__ = ["Tuneless", "TunelessStep", "TunelessVariant", "TunelessScheduleFreeVariant"]

#: the step rules of the ablation: the error-driven step, the distance estimate, or both
STEP_RULES = ("both", "polyak", "distance")
#: how the two are combined: the soft minimum 1/(1/a + 1/b) or the hard minimum
COMBINES = ("soft", "hard")
#: where the distance estimate starts: the first Polyak step, or Prodigy's 1e-6
STARTS = ("polyak", "tiny")
#: the level the Polyak step aims at: the given bound, a target level that starts there and rises towards
#: the best loss seen when it is not reached, the same level rising only while the cap decides the step
#: (the default's), or a level learned online (MoMo*'s rule)
BOUNDS = ("fixed", "target_level", "capped_level", "momo_star")
#: the bounds that aim at a target level (record - gap)
LEVELS = ("target_level", "capped_level")
#: Prodigy's starting distance
TINY_D0 = 1e-6

#: the target level's gap: times this when the last level was reached, else times the other
LEVEL_GROW, LEVEL_SHRINK = 1.1, 0.99


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
            non-negative loss). The Polyak step aims at a level that starts there and rises
            towards the lowest loss seen while the step is capped and the level is missed, so a
            loss whose minimum is above it (a shifted loss, label smoothing, an L2 term) is
            still reached; it cannot make the step diverge, since the distance estimate caps it.
            One value for every param group: the loss is one number.
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
        self._init(params, lr, betas, weight_decay, lower_bound, eps, foreach, "both", "soft", "polyak", skip_nonfinite,
                   "capped_level")

    def _init(self, params: Any, lr: float, betas: Any, weight_decay: float, lower_bound: float, eps: float,
              foreach: bool | None, step_rule: str, combine: str, start: str, skip_nonfinite: bool,
              bound: str = "fixed", level_factors: tuple[float, float] = (LEVEL_GROW, LEVEL_SHRINK)) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        for name, value, allowed in (("step_rule", step_rule, STEP_RULES), ("combine", combine, COMBINES),
                                     ("start", start, STARTS), ("bound", bound, BOUNDS)):
            if value not in allowed:
                v.fail(owner, name, value, " or ".join(repr(a) for a in allowed), allowed[0])
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(lr=lr, betas=(float(betas[0]), float(betas[1])),
                                      weight_decay=float(weight_decay), lower_bound=float(lower_bound),
                                      eps=float(eps), foreach=foreach, skip_nonfinite=skip_nonfinite))
        grow, shrink = (float(f) for f in level_factors)
        if not (grow >= 1.0 and 0.0 < shrink < 1.0):
            v.fail(owner, "level_factors", level_factors, "(grow >= 1, 0 < shrink < 1)", (LEVEL_GROW, LEVEL_SHRINK))
        self._step_rule, self._combine, self._start, self._bound = step_rule, combine, start, bound
        self._level_factors = (grow, shrink)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # torch's keeps defaults, state and param_groups only
        state.update(_step_rule=self._step_rule, _combine=self._combine, _start=self._start, _bound=self._bound,
                     _level_factors=self._level_factors)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Defaults for a pickle from before these switches.
        # torch's load_state_dict calls this too, with the state and the groups only: then the
        # switches this object was built with stay as they are.
        for key, value in (("_bound", "fixed"), ("_level_factors", (LEVEL_GROW, LEVEL_SHRINK))):
            if key not in state and key not in self.__dict__:
                state[key] = value
        super().__setstate__(state)

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """The learned scalars, shared by every group (each group holds the same tensors' copy,
        so that ``state_dict`` and checkpointing keep them)."""
        first = self.param_groups[0]
        if "tuneless_step" in first:
            if self._bound in LEVELS and "level_record" not in first:
                # a state from before the target level (or from another bound): the level starts
                # again at the bound at the next step
                for group in self.param_groups:
                    group.update(self._unset_level())
            return
        shared = {
            "tuneless_step": 0,
            "distance": self._scalar(0.0),             # d_k (0 until the first step sets it)
            "distance_numerator": self._scalar(0.0),   # r_k
            "loss_avg": self._scalar(0.0),             # EMA of f (biased)
            "grad_dot_x_avg": self._scalar(0.0),       # EMA of <g, x> (biased)
        }
        if self._bound == "momo_star":  # l_k, learned from the given lower bound
            shared["lower_bound_estimate"] = self._scalar(first["lower_bound"])
        if self._bound in LEVELS:
            shared.update(self._unset_level())
        for group in self.param_groups:
            for key, value in shared.items():
                group[key] = value.clone() if isinstance(value, Tensor) else value

    def _unset_level(self) -> dict[str, Tensor]:
        """The target level's scalars before its first step: the record, the gap below it and
        the level last aimed at. An infinite record marks the level unset: the next step starts
        it at the bound."""
        return {"level_record": self._scalar(math.inf), "level_gap": self._scalar(0.0),
                "level_aimed": self._scalar(math.inf)}

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
        for group, (xs, grads, ms, vs, ss, x0s) in zip(self.param_groups, tensors):
            if not xs:
                continue
            fn = _multi_tensor_statistics if self._use_foreach(group) else _single_tensor_statistics
            extra = dict(scratch=self._scratch()) if fn is _multi_tensor_statistics else {}
            stats = stats + fn(xs, grads, ms, vs, ss, x0s, beta1=beta1, beta2=beta2, bc1=plan.bc1, bc2=plan.bc2,
                               eps=eps, weight=plan.weight, dtype=plan.dtype, device=plan.device, finite=finite,
                               **extra)

        # 2. The scalars: the model h_k, the Polyak step, the distance, the step size.
        etas, rescale = self._learn(loss, self._global_sum(stats), plan, finite)

        # 3. The update.
        for group, eta, (xs, grads, ms, vs, ss, _) in zip(self.param_groups, etas, tensors):
            if not xs:
                continue
            ms = ms if ms is not None else [g.to(x.dtype) for g, x in zip(grads, xs)]
            fn = _multi_tensor_apply if self._use_foreach(group) else _single_tensor_apply
            fn(xs, ms, vs, ss, eta=eta, rescale=rescale, bc1=plan.bc1, bc2=plan.bc2, eps=eps,
               weight_decay=group["weight_decay"])

    def _plan(self, checked: bool) -> "_Plan":
        """What a step knows before its statistics: the constants, the counter, the bias
        corrections and the weight d_k^2 of the gradient sums (``checked``: the step is under a
        non-finite flag, so the counter lives on the device)."""
        bounds = sorted({float(g["lower_bound"]) for g in self.param_groups})
        if len(bounds) > 1:  # the loss is one number: so is its bound (a group added later could differ)
            v.fail(getattr(self, "_owner", type(self).__name__), "lower_bound", bounds, "one value for every param group (the loss's lower "
                   "bound, which all groups share)", self.param_groups[0]["lower_bound"])
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
        height = torch.clamp(model - first["lower_bound"], min=0.0)  # above the given bound
        tau_bound = height / safe_m_sq  # the Polyak step aimed at the given bound
        sqrt_b2 = math.sqrt(beta2)
        numerator = sqrt_b2 * first["distance_numerator"] + (1 - sqrt_b2) * weight * g_dot_x0_minus_x
        if plan.on_device or plan.starting:
            # d_1 from the first Polyak step (or Prodigy's 1e-6): the sums above used weight 1,
            # so the numerator is rescaled to d_1^2 (s is rescaled the same way in step 3).
            tau1 = torch.where(torch.isfinite(tau_bound) & (tau_bound > 0), tau_bound,
                               torch.full_like(tau_bound, TINY_D0))
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

        if self._bound in LEVELS:
            # The target level of Polyak's method with an unknown minimum (Brannlund 1995;
            # Nedic & Bertsekas 2001): aim at the record minus a gap, never below the given
            # bound; the gap grows when the last level was reached and shrinks when it was not.
            # It starts at the whole gap to the bound, so the first steps aim at the bound: at the
            # first step that counts, and after a state without a level (its record is infinite).
            starting = ~torch.isfinite(first["level_record"])
            reached = model <= first["level_aimed"]
            shrink = torch.full_like(model, self._level_factors[1])
            if self._bound == "capped_level":
                # the gap shrinks (the level rises) only while the Polyak step aimed at the given
                # bound is longer than the distance estimate: the cap decides the step, so the
                # bound may be too low; while the Polyak step decides, the level stays
                shrink = torch.where(tau_bound > new_d, shrink, torch.ones_like(shrink))
            new_gap = torch.where(starting, height,
                                  first["level_gap"] * torch.where(reached, torch.full_like(model, self._level_factors[0]),
                                                                   shrink))
            new_record = torch.where(starting, model, torch.minimum(first["level_record"], model))
            # (a gap wider than the record's height above the bound aims at the bound all the
            # same: kept at most that, so that it stays finite over any run; and at least the
            # dtype's smallest normal number, so that a long run of misses cannot round it to 0,
            # where growing by a factor could never bring it back)
            tiny = torch.finfo(new_gap.dtype).tiny
            new_gap = torch.clamp(torch.minimum(torch.clamp(new_gap, min=tiny), new_record - first["lower_bound"]),
                                  min=0.0)
            target = torch.clamp(new_record - new_gap, min=first["lower_bound"])
        etas = []
        for group in self.param_groups:
            level: Any = group["lower_bound"]
            if self._bound in LEVELS:
                level = target
            if self._bound == "momo_star":
                # MoMo*'s estimate (Schaipp et al. 2024, Alg. 3): reset to max(h/2, l_0) when the
                # model falls below it; after the step, the model's minimum along the step taken.
                level = momo_star_reset(model, group["lower_bound_estimate"], group["lower_bound"])
            tau = torch.where(m_sq > 0, torch.clamp(model - level, min=0.0) / safe_m_sq,
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
            if self._bound in LEVELS:
                group["level_aimed"] = torch.where(ok, target, group["level_aimed"])
                group["level_record"] = torch.where(ok, new_record, group["level_record"])
                group["level_gap"] = torch.where(ok, new_gap, group["level_gap"])
            if self._bound == "momo_star":
                learned = momo_star_level(model, eta, torch.where(torch.isfinite(m_sq), m_sq, 0.0),
                                          group["lower_bound"])
                group["lower_bound_estimate"] = torch.where(ok, learned, group["lower_bound_estimate"])
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
        bound: ``"fixed"`` (the default's: the Polyak step aims at ``lower_bound``),
            ``"target_level"`` (the level adjustment of Polyak's method for an unknown minimum,
            Brännlund 1995, Nedić & Bertsekas 2001: the level max(lower_bound, record - gap),
            the record the lowest loss seen, the gap starting at h_1 - lower_bound, times 1.1
            when the last level was reached and 0.99 when not, at most record - lower_bound;
            measured and not kept, docs/default.md), ``"capped_level"`` (the same, but the gap
            shrinks on a miss only while the Polyak step aimed at ``lower_bound`` is longer than
            the distance estimate, so that the level rises only while the cap decides the step)
            or ``"momo_star"`` (the level learned
            online from it, MoMo*'s rule: reset to max(h/2, lower_bound) when the model falls
            below it, then the model's minimum along the step taken, h - eta ||u||^2 / 2).
        level_factors: the target level's (grow, shrink) factors of its gap (default (1.1, 0.99)).
    """

    registry_name = ""

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, lower_bound: float = 0.0, eps: float = 1e-8,
                 foreach: bool | None = None, step_rule: str = "both", combine: str = "soft",
                 start: str = "polyak", skip_nonfinite: bool = True, bound: str = "fixed",
                 level_factors: tuple[float, float] = (LEVEL_GROW, LEVEL_SHRINK)) -> None:
        self._init(params, lr, betas, weight_decay, lower_bound, eps, foreach, step_rule, combine, start,
                   skip_nonfinite, bound, level_factors)


class Tuneless(ScheduleFree):
    r"""The default learning-rate-free optimizer: no learning rate, no schedule.

    Schedule-Free averaging (Defazio et al., NeurIPS 2024) around :class:`TunelessStep`, whose
    step on :math:`z` takes Adam's direction (no first moment: the interpolation plays its
    part) with the step size :math:`\eta_t = 1 / (1/\tau_t + 1/d_t)`, the soft minimum of the
    Polyak step :math:`\tau_t` in Adam's norm and Prodigy's distance estimate :math:`d_t`
    (started at the first Polyak step). The Polyak step aims at a level that starts at
    ``lower_bound`` and rises towards the lowest loss seen only while the distance estimate caps
    the step (the capped level), so that a minimum above the bound is still reached. The gradient is taken at
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
            non-negative loss). The Polyak step aims at a level that starts there and rises
            towards the lowest loss seen while the step is capped and the level is missed, so a
            loss whose minimum is above it (a shifted loss, label smoothing, an L2 term) is
            still reached; it cannot make the step diverge, since the distance estimate caps it.
            One value for every param group: the loss is one number.
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: the whole step as two compiled passes per group of tensors (default False; see
            :mod:`tuneless.optim._fused`: compiles at the first step, then runs near the
            memory-bandwidth bound; same state, same math, rounded once per stored value).
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
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)", recommended=0.0)
        v.check_range(owner, "lower_bound", lower_bound, recommended=0.0)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        base = TunelessStep(params, lr=lr, betas=(0.0, self.BETA2), lower_bound=lower_bound, eps=self.EPS,
                            foreach=foreach, skip_nonfinite=skip_nonfinite)
        base._owner = owner  # errors at the step name the class the user built
        super().__init__(base, momentum=self.MOMENTUM, weight_decay_at_y=float(weight_decay), r=self.AVERAGE_POWER,
                         weight_lr_power=self.WEIGHT_LR_POWER, foreach=foreach, fused=fused,
                         skip_nonfinite=skip_nonfinite)
        self.requires_loss = True

    # ------------------------------------------------------------------ the fused step

    def _fused_everywhere(self) -> bool:
        return bool(self.param_groups) and all(g.get("sf_fused", False) for g in self.param_groups)

    def _finite_from_step_sums(self, loss: Tensor | None) -> bool:
        """Fused: the statistics kernel reads every gradient before anything changes and sums
        them (in float64: a sum of finite float32 numbers cannot overflow there), all-reduced with
        the statistics; with the loss (averaged over the ranks first), that decides."""
        return self._fused_everywhere()

    def _step_with(self, loss: Any, finite: Tensor | None) -> None:
        if self._fused_everywhere():
            self._fused_step(loss, finite)
        elif self.param_groups and all(self._use_foreach(g) and not g.get("sf_fused", False)
                                       for g in self.param_groups):
            self._vectorized_step(loss, finite)
        else:  # the per-parameter truth: the wrapper's passes around the base's step
            super()._step_with(loss, finite)

    def _group_tensors(self, group: dict[str, Any]) -> tuple[bool, list[Tensor], list[Tensor], list[Tensor],
                                                             list[Tensor], list[Tensor], list[Tensor]]:
        """What the vectorized and the fused step read of one group: (frozen, g, y, z, v, s, x0),
        the local parts of the parameters that have a gradient and of their buffers (created at
        the first step). A group frozen by lr = 0 has no z list: the base sees y there, and only
        its moments move, as on the per-parameter path."""
        base = self.base
        params, grads = base._params_with_grad(group)
        bufs = [base._buffers(p, False) for p in params]
        vs, ss, x0s = ([b[i] for b in bufs] for i in (1, 2, 3))
        frozen = self._frozen(group)
        zs = [] if frozen else self._z_tensors(params)
        return frozen, grads, [local_tensor(p) for p in params], zs, vs, ss, x0s

    def _vectorized_step(self, loss: Any, finite: Tensor | None) -> None:
        """The whole step with ``torch._foreach_*`` in two sweeps over the tensors (block by
        block on the CPU, so that each sweep's passes after the first read from the cache): the
        base's statistics at z (which also update v and s, as :class:`TunelessStep`'s do), then
        one sweep that steps z and moves y. The wrapper's swap of y and z around the base's step
        (two more sweeps over y and z) is folded into the second sweep by the recursion's algebra:
        with x = (y - (1 - beta) z) / beta, z' = z - eta u, x' = lerp(x, z', c) and
        y' = lerp(z', x', beta),

            y' = lerp(y, z, c) - (1 - beta (1 - c)) eta u,

        so x is never formed. The same math as :class:`TunelessStep` on z inside
        :class:`~tuneless.optim.schedule_free.ScheduleFree` (the per-parameter path, ``foreach=False``),
        rounded in another order; the same state, so checkpoints move between the paths.

        A step that is not finite (``finite`` False: the gradients are zeros here, the decays 1,
        the step size and the decay at y 0) moves nothing: c is taken as 0 there, so y' = y."""
        base = self.base
        loss_t = base._as_loss_tensor(loss)  # (step averaged it over the ranks)
        plan = base._plan(checked=finite is not None)
        work = []
        stats = torch.zeros(5, dtype=plan.dtype, device=plan.device)
        scratch = base._scratch()
        for group in self.param_groups:
            frozen, grads, ys, zs, vs, ss, x0s = self._group_tensors(group)
            if not ys:
                work.append(None)
                continue
            grads = self._finite_grads(grads)
            if frozen:  # the base sees y
                zs = ys
            else:
                wd = group["sf_weight_decay_at_y"]
                if wd != 0:  # the decay at y, as the wrapper's first pass takes it (a sweep of its own)
                    step = _decay_step(self._decay_step_size(group), wd, finite)
                    for y, z in cache_blocks(ys, zs):
                        decay_at_y_(y, z, group["sf_momentum"], step)
            work.append((ys, zs, grads, vs, ss, frozen))
            stats = stats + _multi_tensor_statistics(
                zs, grads, None, vs, ss, x0s, beta1=0.0, beta2=plan.beta2, bc1=plan.bc1, bc2=plan.bc2, eps=plan.eps,
                weight=plan.weight, dtype=plan.dtype, device=plan.device, finite=finite, scratch=scratch, lean=True)
        etas, rescale = base._learn(loss_t, base._global_sum(stats), plan, finite)
        for group, eta, item in zip(self.param_groups, etas, work):
            ckp1 = self._averaging_weight(group, finite)
            if item is None:
                continue
            ys, zs, grads, vs, ss, frozen = item
            # d_1^2 at the first step; 1 on the others of a checked step, where the CPU paths,
            # which know it on the host, skip the pass over s
            if rescale is not None and not known_true(rescale == 1):
                torch._foreach_mul_(ss, rescale.to(coefficient_dtype(ss[0])))
            if frozen:
                continue
            if finite is not None and not known_finite(finite):
                ckp1 = torch.where(finite, ckp1, 0.0)  # (c = 0: y' = y exactly)
            _multi_tensor_schedule_free_step(ys, zs, grads, vs, eta=eta, ckp1=ckp1, beta=group["sf_momentum"],
                                             bc2=plan.bc2, eps=plan.eps)

    def _fused_step(self, loss: Any, finite: Tensor | None) -> None:
        """The whole step, the wrapper's passes and the base's, in two compiled passes per group
        of tensors (``fused=True``): the statistics, read only (z, g, v, s, x0; y with weight
        decay), then one pass that updates v and s, steps z and moves x and y (read y, z, g, v, s;
        write them but g). The same math as the unfused path (:class:`TunelessStep` on z inside
        :class:`~tuneless.optim.schedule_free.ScheduleFree`), rounded once per stored value; the
        state is the same, so checkpoints move between the paths.

        The non-finite flag (when the step is checked) is made from the statistics kernel's sum
        of the gradients and the averaged loss: no read of its own. A step that is not finite
        writes nothing; its scalars are kept by the base's and the wrapper's own selects."""
        base = self.base
        loss_t = base._as_loss_tensor(loss)  # (step averaged it over the ranks)
        plan = base._plan(checked=finite is not None or self._deciding_finite())
        sum_dtype = torch.float32 if plan.device.type == "mps" else torch.float64
        sqrt_b2 = math.sqrt(plan.beta2)
        s_weight = plan.weight * (1 - sqrt_b2)
        work = []
        partial = torch.zeros(5, dtype=sum_dtype, device=plan.device)
        for group in self.param_groups:
            frozen, grads, ys, zs, vs, ss, x0s = self._group_tensors(group)
            gamma: Any = 0.0 if frozen else self._decay_step_size(group)
            wd = 0.0 if frozen else group["sf_weight_decay_at_y"]
            work.append((group, ys, zs, grads, vs, ss, gamma, wd))
            if ys:
                partial = partial + _fused_statistics(
                    ys, zs, grads, vs, ss, x0s, decay=_decay_step(gamma, wd, None) if wd != 0 else None,
                    beta2=plan.beta2, sqrt_beta2=sqrt_b2, s_weight=s_weight, bc2=plan.bc2, eps=plan.eps,
                    sum_dtype=sum_dtype, device=plan.device)
        sums = base._global_sum(partial)
        if self._deciding_finite():
            finite = self._settle_finite(torch.isfinite(sums[4]) & torch.isfinite(loss_t))
        g_dot_x, g_dot_x0_minus_x, g_sq, s_l1 = sums[:4].to(plan.dtype).unbind(0)
        # (beta1 = 0: m is g, so <m, x> is <g, x>; the base's model is the loss)
        etas, rescale = base._learn(loss_t, torch.stack([g_dot_x, g_dot_x0_minus_x, g_dot_x, g_sq, s_l1]), plan, finite)
        rescale = rescale if rescale is not None else torch.ones((), dtype=plan.dtype, device=plan.device)
        flag = finite if finite is not None else torch.ones((), dtype=torch.bool, device=plan.device)
        for (group, ys, zs, grads, vs, ss, gamma, wd), eta in zip(work, etas):
            ckp1 = self._averaging_weight(group, finite)
            if not ys:
                continue
            _fused_update(ys, zs, grads, vs, ss, decay=_decay_step(gamma, wd, finite) if wd != 0 else None,
                          beta=group["sf_momentum"], beta2=plan.beta2, sqrt_beta2=sqrt_b2, s_weight=s_weight,
                          rescale=rescale, bc2=plan.bc2, eps=plan.eps, eta=eta,
                          ckp1=ckp1, finite=flag)

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
        step_rule, combine, start, bound: as :class:`TunelessVariant`.
        skip_nonfinite: as :class:`Tuneless`.
    """

    registry_name = ""

    def __init__(self, params: Any, *, beta1: float = 0.0, momentum: float = 0.9, r: float = 0.0,
                 weight_lr_power: float = 2.0, step_rule: str = "both", combine: str = "soft",
                 start: str = "polyak", skip_nonfinite: bool = True, bound: str = "fixed",
                 level_factors: tuple[float, float] = (LEVEL_GROW, LEVEL_SHRINK)) -> None:
        base = TunelessVariant(params, betas=(beta1, 0.999), step_rule=step_rule, combine=combine, start=start,
                               skip_nonfinite=skip_nonfinite, bound=bound, level_factors=level_factors)
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
                              device, finite=None) -> Tensor:
    """Update m, v and s of each tensor; return this part's five sums (see ``TunelessStep._update``;
    the update recomputes each denominator). ``ms`` is None when beta1 = 0 (m is the gradient).
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
    return sums


def _single_tensor_apply(xs, ms, vs, ss, *, eta, rescale, bc1, bc2, eps, weight_decay) -> None:
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
                             device, finite=None, scratch=None, lean=False) -> Tensor:
    """:func:`_single_tensor_statistics` with ``torch._foreach_*`` (same dtype per call site),
    block by block on the CPU: cache-sized blocks, so that the passes after the first read from
    the cache and the temporaries (the denominators, the direction, x0 - x) are a block's, not
    the model's (model-sized temporaries cost page faults at every step), and the dots are BLAS
    dots over the blocks (:func:`~tuneless.optim._batched.total_dots`). With beta1 = 0 (the
    default) m_hat is the gradient itself: no copy, and <m_hat, x> is <g, x>.

    ``lean`` (:meth:`Tuneless._vectorized_step`'s): the bias corrections are applied to the
    sums, not to each entry: with D' = sqrt(v) + eps sqrt(bc2) = sqrt(bc2) D
    (:func:`_scaled_denominators`), ||m_hat||^2_{D^-1} = sqrt(bc2) / bc1^2 sum m^2 / D' and
    <m_hat, x> = <m, x> / bc1, two passes per block fewer than dividing v and m; and ||s||_1 is
    summed through the scratch buffer (:func:`_abs_sum`). The same numbers, rounded in another
    order: off (the default), the sums are rounded as they always were, so that the ablation's
    variants and the other optimizers built on this function reproduce their stored runs."""
    sqrt_b2 = math.sqrt(beta2)
    if known_finite(finite):  # the decays as numbers, as unchecked: the same values, rounded where used
        finite = None
    decay2, decay_s = _decays(finite, weight, beta2, sqrt_b2)
    if finite is not None:
        decay2, decay_s = decay2.to(coefficient_dtype(vs[0])), decay_s.to(coefficient_dtype(ss[0]))
    s_weight = [(weight * (1 - sqrt_b2)).to(ss[0].dtype)]
    sums = torch.zeros(5, dtype=dtype, device=device)
    blocks = []
    for x, g, m, v_, s, x0 in cache_blocks(xs, grads, ms, vs, ss, x0s):
        g = [gi.to(vi.dtype) for gi, vi in zip(g, v_)]
        if m is None:
            m = g
        elif finite is None:
            torch._foreach_lerp_(m, g, 1 - beta1)
        else:  # weight 0 on a step that is not finite: m kept
            step1 = torch.where(finite, torch.full((), 1 - beta1, dtype=weight.dtype, device=weight.device), 0.0)
            torch._foreach_lerp_(m, g, [step1.to(mi.dtype if mi.dtype.itemsize >= 4 else torch.float32) for mi in m])
        torch._foreach_mul_(v_, decay2)
        torch._foreach_addcmul_(v_, g, g, value=1 - beta2)
        torch._foreach_mul_(s, decay_s)
        torch._foreach_addcmul_(s, g, s_weight * len(s))
        if lean:
            m_hat = m  # (m / D': the bias corrections are applied to the sums below)
            u = torch._foreach_div(m, _scaled_denominators(v_, bc2, eps))
        else:
            m_hat = m if ms is None else torch._foreach_div(m, bc1)
            u = torch._foreach_div(m_hat, _denominators(v_, bc2, eps))
        diff = torch._foreach_sub(x0, x)
        if ms is None:  # m_hat = g: <m_hat, x> = <g, x>
            dots = total_dots((g, x, diff, u), ((0, 1), (0, 2), (0, 3)), dtype, device, scratch)
            dots = torch.stack([dots[0], dots[1], dots[0], dots[2]])
        else:
            dots = total_dots((g, x, diff, m_hat, u), ((0, 1), (0, 2), (3, 1), (3, 4)), dtype, device, scratch)
        if not lean:
            sums = sums + torch.cat([dots, total_abs_sum(s, dtype, device).reshape(1)])
            continue
        blocks.append(torch.cat([dots, _abs_sum(s, dtype, device, scratch).reshape(1)]))
    if not lean:
        return sums
    if not blocks:
        return torch.zeros(5, dtype=dtype, device=device)
    g_dot_x, g_dot_diff, m_dot_x, m_sq, s_l1 = torch.stack(blocks).sum(0).unbind(0)
    root_bc2 = math.sqrt(bc2) if not isinstance(bc2, Tensor) else torch.sqrt(bc2.to(dtype))
    if ms is None:
        m_sq = m_sq * root_bc2
    else:
        m_dot_x, m_sq = m_dot_x / bc1, m_sq * (root_bc2 / (bc1 * bc1))
    return torch.stack([g_dot_x, g_dot_diff, m_dot_x, m_sq, s_l1])


#: the scratch slot of :func:`_abs_sum` (after the slots :func:`~tuneless.optim._batched.chunked_dots` packs into)
_ABS_SLOT = 8


def _abs_sum(tensors: list[Tensor], dtype: torch.dtype, device: torch.device, scratch: Any) -> Tensor:
    """sum_i ||t_i||_1 over one block: on the CPU, the absolute values into the scratch buffer
    and one sum (in cache, about 4x faster there than ``torch._foreach_norm(ord=1)``, torch
    2.13); elsewhere :func:`~tuneless.optim._batched.total_abs_sum`."""
    first = tensors[0]
    if (scratch is None or not cpu_paths(first.device) or first.dtype != coefficient_dtype(first)
            or sum(t.numel() for t in tensors) > CPU_BLOCK_NUMEL):
        return total_abs_sum(tensors, dtype, device)
    return flat_abs_sum(tensors, scratch, dtype, slot=_ABS_SLOT)


def _denominators(vs: list[Tensor], bc2: Any, eps: float) -> list[Tensor]:
    """sqrt(v / bc2) + eps, a new list (Adam's denominator, as the per-parameter path writes it)."""
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    return denom


def _scaled_denominators(vs: list[Tensor], bc2: Any, eps: float) -> list[Tensor]:
    """D' = sqrt(v) + eps sqrt(bc2) = sqrt(bc2) (sqrt(v / bc2) + eps), a new list: Adam's
    denominator times sqrt(bc2), in two passes (no division of v); the callers fold sqrt(bc2)
    into their scalars."""
    denom = torch._foreach_sqrt(vs)
    if isinstance(bc2, Tensor):
        torch._foreach_add_(denom, [(eps * torch.sqrt(bc2)).to(coefficient_dtype(vs[0]))] * len(denom))
    else:
        torch._foreach_add_(denom, eps * math.sqrt(bc2))
    return denom


def _multi_tensor_apply(xs, ms, vs, ss, *, eta, rescale, bc1, bc2, eps, weight_decay) -> None:
    """:func:`_single_tensor_apply` with ``torch._foreach_*``, block by block on the CPU (the
    denominators recomputed there, in the cache, rather than kept from the statistics pass at the
    model's size)."""
    if rescale is not None:
        torch._foreach_mul_(ss, rescale.to(ss[0].dtype))
    e = eta.to(xs[0].dtype)
    for x, m, v_ in cache_blocks(xs, ms, vs):
        if weight_decay:
            torch._foreach_mul_(x, 1 - e * weight_decay)
        u = torch._foreach_div(m, _denominators(v_, bc2, eps))
        torch._foreach_addcmul_(x, u, [-e / bc1] * len(x))


def _multi_tensor_schedule_free_step(ys: list[Tensor], zs: list[Tensor], grads: list[Tensor], vs: list[Tensor], *,
                                     eta: Tensor, ckp1: Tensor, beta: float, bc2: Any, eps: float) -> None:
    """The second sweep of :meth:`Tuneless._vectorized_step`, block by block: u = g / D (D
    recomputed from v, as the statistics computed it), y <- lerp(y, z, c) - (1 - beta (1 - c)) eta u,
    z <- z - eta u."""
    cd = coefficient_dtype(ys[0])
    c = ckp1.to(cd)
    # u = g / D = sqrt(bc2) g / D' (:func:`_scaled_denominators`): sqrt(bc2) goes into the step
    step_z = -(eta.to(cd) * (math.sqrt(bc2) if not isinstance(bc2, Tensor) else torch.sqrt(bc2.to(cd))))
    step_y = step_z * (1 - beta * (1 - c))
    for y, z, g, v_ in cache_blocks(ys, zs, grads, vs):
        g = [gi.to(vi.dtype) for gi, vi in zip(g, v_)]
        u = torch._foreach_div(g, _scaled_denominators(v_, bc2, eps))
        torch._foreach_lerp_(y, z, [c] * len(y))
        torch._foreach_addcmul_(y, u, [step_y] * len(y))
        torch._foreach_addcmul_(z, u, [step_z] * len(z))


# ---------------------------------------------------------------------------- fused (compiled)


def _new_moments(gf: Tensor, v_: Tensor, s: Tensor, beta2: float, sqrt_beta2: float, s_weight: Tensor,
                 cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """v' = beta2 v + (1 - beta2) g^2 and s' = sqrt(beta2) s + w g in ``cd``, as every kernel below
    computes them (the statistics kernel sums them, the others store them)."""
    return v_.to(cd) * beta2 + gf * gf * (1 - beta2), s.to(cd) * sqrt_beta2 + gf * s_weight


def _tuneless_statistics_kernel(*args: Any) -> tuple[Tensor, ...]:
    """The statistics of one tensor of :class:`Tuneless`'s step, compiled by
    :class:`~tuneless.optim._fused.FusedKernel`; read only (a kernel that reduces and stores is
    split by Inductor into two loops that both read the buffers). The tensors are the point the
    base steps from (z; y for a group frozen by lr = 0), g, v, s, x0, and y when there is decay
    at y (then the point is z - decay * y, as the unfused wrapper's first pass leaves it). With
    v' = beta2 v + (1 - beta2) g^2, D = sqrt(v' / bc2) + eps and s' = sqrt(beta2) s + w g, the
    sums are <g, x>, <g, x0 - x>, sum g^2 / D, ||s'||_1, each accumulated in ``stat_dtype`` (the
    compute dtype: float32 for float32 parameters, as the unfused path's dots), and sum g, the
    non-finite flag's, in ``sum_dtype`` (float64, where finite float32 numbers cannot add up to
    an infinity). Only the flag's sum is in float64: with all five there, the fused step took
    about 1.4x as long on the CPU (``benchmarks/fused_sum_dtype.py``). All-zero tensors add 0 to
    every sum (the padding is harmless)."""
    x, g, v_, s, x0, *rest = args[:-10]
    decay, beta2, sqrt_beta2, s_weight, bc2, eps, stat_dtype, sum_dtype, with_decay, cd = args[-10:]
    gf, xf = g.to(cd), x.to(cd)
    if with_decay:
        xf = xf - rest[0].to(cd) * decay
    v_new, s_new = _new_moments(gf, v_, s, beta2, sqrt_beta2, s_weight, cd)
    denom = (v_new / bc2).sqrt() + eps
    return ((gf * xf).sum(dtype=stat_dtype), (gf * (x0.to(cd) - xf)).sum(dtype=stat_dtype),
            (gf * gf / denom).sum(dtype=stat_dtype), s_new.abs().sum(dtype=stat_dtype), g.sum(dtype=sum_dtype))


def _tuneless_update_kernel(*args: Any) -> tuple[()]:
    """The rest of one tensor's step, compiled, in one pass: v and s as the statistics kernel
    computed them (s times ``rescale``: d_1^2 at the first step), then the wrapper's first pass
    (decay at y, x from y and z), the base's step on z along g / D with step size ``eta``, and the
    wrapper's second pass (x towards the new z with weight ``ckp1``, y between them). The
    tensors are y (the parameter), z, g, v, s. ``finite`` False: nothing is written (each store
    selects the old value). All-zero tensors stay 0."""
    y, z, g, v_, s = args[:5]
    decay, beta, beta2, sqrt_beta2, s_weight, rescale, bc2, eps, eta, ckp1, finite, with_decay, cd = args[5:]
    gf = g.to(cd)
    v_new, s_new = _new_moments(gf, v_, s, beta2, sqrt_beta2, s_weight, cd)
    denom = (v_new / bc2).sqrt() + eps
    s_new = s_new * rescale
    yf, zf = y.to(cd), z.to(cd)
    if with_decay:
        zf = zf - yf * decay
        yf = yf * (1 - decay * (1 - beta))
    x = torch.lerp(yf, zf, 1.0 - 1.0 / beta)
    z_new = zf - gf / denom * eta
    x_new = torch.lerp(x, z_new, ckp1)
    y_new = torch.lerp(z_new, x_new, beta)
    v_.copy_(torch.where(finite, v_new, v_.to(cd)))
    s.copy_(torch.where(finite, s_new, s.to(cd)))
    z.copy_(torch.where(finite, z_new, z.to(cd)))
    y.copy_(torch.where(finite, y_new, y.to(cd)))
    return ()


def _tuneless_moments_kernel(*args: Any) -> tuple[()]:
    """A group frozen by lr = 0: only v and s move (as in the unfused path, where the base still
    takes its statistics); the tensors are g, v, s."""
    g, v_, s, beta2, sqrt_beta2, s_weight, rescale, finite, cd = args
    v_new, s_new = _new_moments(g.to(cd), v_, s, beta2, sqrt_beta2, s_weight, cd)
    v_.copy_(torch.where(finite, v_new, v_.to(cd)))
    s.copy_(torch.where(finite, s_new * rescale, s.to(cd)))
    return ()


_STATISTICS_KERNELS = {with_decay: FusedKernel(_tuneless_statistics_kernel, num_tensors=5 + with_decay, num_sums=5)
                       for with_decay in (False, True)}
_UPDATE_KERNEL = FusedKernel(_tuneless_update_kernel, num_tensors=5, num_sums=0)
_MOMENTS_KERNEL = FusedKernel(_tuneless_moments_kernel, num_tensors=3, num_sums=0)


def _fused_statistics(ys, zs, grads, vs, ss, x0s, *, decay, beta2, sqrt_beta2, s_weight, bc2, eps, sum_dtype,
                      device, stat_dtype=None) -> Tensor:
    """The five sums of :func:`_tuneless_statistics_kernel` over a group (``zs`` empty: a frozen
    group, whose point is y), as a 1-D tensor in ``sum_dtype``. ``stat_dtype``: what the four
    statistics are accumulated in (default: the compute dtype; ``benchmarks/fused_sum_dtype.py``
    times float64)."""
    cd, dev = coefficient_dtype(vs[0]), vs[0].device
    points = zs if zs else ys
    lists = [points, grads, vs, ss, x0s] + ([ys] if decay is not None else [])
    scalars = (_as_coefficient(decay, cd, dev), beta2, sqrt_beta2, s_weight.to(cd), _as_coefficient(bc2, cd, dev), eps,
               cd if stat_dtype is None else stat_dtype, sum_dtype, decay is not None, cd)
    return torch.stack(_STATISTICS_KERNELS[decay is not None](lists, scalars, sum_dtype=sum_dtype, device=device))


def _fused_update(ys, zs, grads, vs, ss, *, decay, beta, beta2, sqrt_beta2, s_weight, rescale, bc2, eps, eta, ckp1,
                  finite) -> None:
    """:func:`_tuneless_update_kernel` over a group, or :func:`_tuneless_moments_kernel` for a
    group frozen by lr = 0 (``zs`` empty)."""
    cd, dev = coefficient_dtype(vs[0]), vs[0].device
    if not zs:
        _MOMENTS_KERNEL([grads, vs, ss], (beta2, sqrt_beta2, s_weight.to(cd), rescale.to(cd), finite, cd),
                        sum_dtype=cd, device=dev)
        return
    scalars = (_as_coefficient(decay, cd, dev), beta, beta2, sqrt_beta2, s_weight.to(cd), rescale.to(cd),
               _as_coefficient(bc2, cd, dev), eps, eta.to(cd), ckp1.to(cd), finite, decay is not None, cd)
    _UPDATE_KERNEL([ys, zs, grads, vs, ss], scalars, sum_dtype=cd, device=dev)


def _as_coefficient(value: Any, cd: torch.dtype, device: torch.device) -> Tensor:
    """A per-step value for a kernel as a tensor in ``cd`` (a number would be compiled in as a
    constant: a new variant at every value); None (no decay) is 0."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=cd)
    return torch.full((), 0.0 if value is None else float(value), dtype=cd, device=device)
