r"""Schedule-Free optimization: no learning-rate schedule, and with a learned step size no learning rate.

Schedule-Free keeps three sequences: the base optimizer's iterate :math:`z`, its weighted
average :math:`x` (the point to evaluate), and their interpolation :math:`y` (where the
gradient is taken):

.. math::
    y_t = (1-\beta)\,z_t + \beta\,x_t, \qquad
    z_{t+1} = z_t - \gamma_t\,u_t\big(\nabla f(y_t)\big), \qquad
    x_{t+1} = (1-c_{t+1})\,x_t + c_{t+1}\,z_{t+1},

with :math:`u` the base direction (the gradient for SGD, the gradient over
:math:`\sqrt{\hat v}+\epsilon` for AdamW, any optimizer's step for the wrapper) and the
averaging weights :math:`c_{t+1} = w_t / \sum_{i \le t} w_i`,
:math:`w_t = (t+1)^r\,\gamma_{\max,t}^{\,p}` (``r``, ``weight_lr_power`` :math:`p`). The
averaging replaces the schedule; when :math:`\gamma_t` is learned (Prodigy's :math:`d`), the
learning rate goes too (:class:`ScheduleFreeProdigy`).

Paper: A. Defazio, X. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
Scheduled", NeurIPS 2024, arXiv:2405.15682. Reference implementation matched:
``schedulefree`` 1.4.1 (``SGDScheduleFree``, ``AdamWScheduleFree``, ``ScheduleFreeWrapper``),
step by step at both the training point ``y`` and the evaluation point ``x``
(``tests/test_parity_schedule_free.py``).

Differences from the reference, each deliberate and tested (``tests/test_schedule_free.py``):

* **y's rounding error goes into z** (SGD and AdamW): the average x is stored only through y
  and z, and late in a run y's update rounds away while z moves on, so x drifted linearly
  (``docs/robustness.md``, "Long runs"). Each step moves z by ``-r / (1 - beta)`` too, where
  ``r`` is what rounding y lost: x stays exact; float64 parity is unchanged.
* **The mode is state.** ``train_mode`` is stored in every param group, hence in
  ``state_dict()``: a checkpoint saved in either mode resumes exactly and loading restores the
  mode it was saved in (the parameters saved with it hold the matching point). The reference
  keeps the mode out of the wrapper's checkpoint and needs "save in eval mode, call train()
  after loading".
* **Optimizers start in train mode** (the reference starts in eval mode and raises at the
  first step unless ``train()`` was called).
* ``step()`` in eval mode raises :class:`~tuneless.errors.WrongModeError`, which says to call
  ``optimizer.train()`` (the reference raises a bare ``Exception``).
* :meth:`~tuneless.optim.base.TunelessOptimizer.evaluation_point` swaps the parameters to
  ``x`` and back, so the race and the benchmark report ``x`` with no special case;
  :func:`recompute_batchnorm_statistics` recomputes BatchNorm statistics at ``x``.
* ``p.grad`` is never modified (the reference normalizes it in place).
* A step whose gradients (or, for a base that takes it, loss) are not all finite is skipped
  (``skip_nonfinite=True``, the default): parameters, z, x, the weights and the counters stay
  exactly as they were, decided on the device (the step counters are then 0-d device tensors
  that count the finite steps). The reference lets the NaN into every iterate.
* A step with ``lr == 0`` leaves its group exactly as it is (the reference keeps moving
  ``x`` towards ``z``, and ``y`` with it, at the weight of the largest lr seen), so that an lr
  scheduler can freeze a group; the averaging weights of such steps are not accumulated.
* The wrapper is a :class:`torch.optim.Optimizer` (frameworks and lr schedulers recognize
  it), keeps its own state apart from the base optimizer's (the reference stores ``z`` in the
  base's state, which breaks ``torch.optim.Adam`` and any base that initializes its state on
  ``len(state) == 0``: ``KeyError: 'exp_avg'``), and reads a learned step size either from a
  learned ``group['d']`` (as the reference does) or from a tuneless base's published
  ``effective_lr``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from .. import _validate as v
from ..errors import LossRequiredError, WrongModeError
from ._batched import cache_blocks, coefficient, coefficient_dtype, host_coefficients
from ._fused import FusedKernel
from .base import (STEP_SIZE_KEY, OptimizerSnapshot, TunelessOptimizer, gate, known_finite, local_tensor, lr_in,
                   lr_is_zero, lr_moves)

__all__ = ["ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFree", "ScheduleFreeProdigy",
           "recompute_batchnorm_statistics"]

#: The param-group key holding the mode: True in train mode (parameters hold y), False in eval
#: mode (parameters hold x). Stored in every group, so that ``state_dict`` carries it.
MODE_KEY = "train_mode"


def _group_by_device_and_dtype(tensor_lists: list[list[Tensor]]) -> list[tuple[list[list[Tensor]], list[int]]]:
    """Split parallel lists of tensors into runs of one device and dtype (for ``torch._foreach_*``).

    Returns ``(lists, indices)`` per run: the run's tensors and their positions in the input.
    """
    if not tensor_lists[0]:
        return []
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)  # type: ignore[arg-type]
    return [([list(t) for t in lists], list(indices)) for (lists, indices) in grouped.values()]


def _weight_dtype(t: Tensor) -> torch.dtype:
    """The dtype in which a 0-d interpolation weight is applied to tensors like ``t``."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _schedule_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a checked step's schedule on the device (counters made float, lr, weights):
    float64, the host's double (float32 on MPS, which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _on(value: Any, like: Tensor) -> Tensor:
    """``value`` (a number, or a 0-d tensor anywhere) as a 0-d tensor like ``like`` (its dtype and
    device): a fill or a copy to the device, never a read on the host."""
    if isinstance(value, Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _count_on(value: Any, device: torch.device) -> Tensor:
    """A step counter (a host int, or a 0-d tensor from a checked step) as a 0-d int64 tensor on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.int64)
    return torch.full((), int(value), dtype=torch.int64, device=device)


def _second_moment_decay(finite: Tensor, beta2: float, like: Tensor) -> Tensor:
    """beta2 where the step is finite, else 1 (v * 1 + (1 - beta2) * 0 ^ 2 = v exactly): a 0-d
    tensor in ``like``'s dtype, on its device."""
    return torch.where(finite, _on(beta2, like), 1.0)


# =============================================================================================
# The mode (train: parameters hold y; eval: parameters hold x), shared by every class here.
# =============================================================================================


class _ScheduleFreeBase(TunelessOptimizer):
    """Train/eval mode, the evaluation point, and the mode check of ``step``."""

    #: the ``self.state[p]`` key of the base iterate z
    _z_key = "z"
    #: the ``self.state[p]`` key of y, kept in eval mode so that ``train()`` puts it back exactly
    _y_key = "y"

    def _momentum(self, group: dict[str, Any]) -> float:
        """The interpolation weight beta of ``group`` (y = (1 - beta) z + beta x)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ mode

    @property
    def training(self) -> bool:
        """True in train mode (parameters hold y), False in eval mode (parameters hold x)."""
        return all(g.get(MODE_KEY, True) for g in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Switch to eval mode: the parameters now hold the averaged point x (the one to evaluate).

        x = (y - (1 - beta) z) / beta, computed in place as ``p.lerp_(z, 1 - 1/beta)``.
        Parameters that were never stepped (no z yet) hold x already and are left as they are.
        y itself is kept in the state until :meth:`train` (one more copy of the stepped
        parameters, in ``state_dict`` too): the switch back is exact, so a run that goes through
        eval mode, or is saved in it and resumed, continues bit for bit as if it had not.
        """
        for group in self.param_groups:
            if group.get(MODE_KEY, True):
                self._keep_y(group)
                self._lerp_params_towards_z(group, 1.0 - 1.0 / self._momentum(group))
                group[MODE_KEY] = False

    @torch.no_grad()
    def train(self) -> None:
        """Switch to train mode: the parameters now hold y, where gradients are taken.

        y = (1 - beta) z + beta x, computed in place as ``p.lerp_(z, 1 - beta)``; where a
        parameter still holds the x that :meth:`eval` computed from the y it kept, that y is put
        back exactly instead (the formula is off by rounding). A parameter changed in eval mode
        (loaded weights, edits) takes the formula. The check is on the device: no host sync.
        """
        for group in self.param_groups:
            if not group.get(MODE_KEY, True):
                kept = self._kept_y(group)
                self._lerp_params_towards_z(group, 1.0 - self._momentum(group))
                for p, y, unchanged in kept:
                    p.copy_(torch.where(unchanged, y, p))
                group[MODE_KEY] = True

    def _keep_y(self, group: dict[str, Any]) -> None:
        """Keep a copy of y (the parameters, in train mode) for :meth:`train`."""
        for p in group["params"]:
            state = self.state.get(p, {})
            if self._z_key in state:
                state[self._y_key] = torch.clone(p, memory_format=torch.preserve_format).detach()

    def _kept_y(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Take the kept y out of the state: (parameter, y, whether the parameter still holds the x
        eval() made from y, a 0-d bool on the device), read before the parameters move."""
        weight = 1.0 - 1.0 / self._momentum(group)
        kept = []
        for p in group["params"]:
            state = self.state.get(p, {})
            y = state.pop(self._y_key, None)
            if y is None or self._z_key not in state:
                continue
            x, y = local_tensor(p), local_tensor(y)
            unchanged = torch.eq(torch.lerp(y, local_tensor(state[self._z_key]), weight), x).all()
            kept.append((x, y, unchanged))
        return kept

    def _lerp_params_towards_z(self, group: dict[str, Any], weight: float) -> None:
        params = [p for p in group["params"] if self._z_key in self.state.get(p, {})]
        if not params:
            return
        ps = [local_tensor(p) for p in params]
        zs = [local_tensor(self.state[p][self._z_key]) for p in params]
        if self._use_foreach(group):
            for (p_run, z_run), _ in _group_by_device_and_dtype([ps, zs]):
                torch._foreach_lerp_(p_run, z_run, weight)
        else:
            for p, z in zip(ps, zs):
                p.lerp_(z, weight)

    @contextlib.contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """Context under which the parameters hold x; back to the previous mode on exit.

        In eval mode already, nothing changes. y comes back exactly (see :meth:`train`), unlike
        the reference's ``eval()``/``train()``, whose two ``lerp``s are off by rounding.
        """
        was_training = self.training
        if was_training:
            self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimization step, in train mode only (see :class:`TunelessOptimizer.step`).

        Raises:
            WrongModeError: in eval mode (call ``optimizer.train()`` first).
        """
        self._require_train_mode()
        return super().step(closure, loss=loss)

    def _require_train_mode(self) -> None:
        if not self.training:
            raise WrongModeError(
                f"{type(self).__name__}.step() was called in eval mode (the parameters hold the averaged "
                f"point x, for evaluation): call optimizer.train() before training steps"
            )

    # ------------------------------------------------------------------ groups and checkpoints

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it joins in the optimizer's current mode."""
        mode = self.training if self.param_groups else True
        super().add_param_group(param_group)
        self.param_groups[-1][MODE_KEY] = mode

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault(MODE_KEY, True)  # checkpoints without a mode were taken in train mode


# =============================================================================================
# Schedule-Free SGD and AdamW.
# =============================================================================================


def _single_tensor_schedule_free(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], exp_avg_sqs: list[Tensor] | None, *,
    lr: float, ckp1: float, beta: float, weight_decay: float, beta2: float, bias_correction2: float, eps: float,
    finite: Tensor | None = None,
) -> None:
    """One Schedule-Free step, one tensor at a time (the readable truth).

    u = g (SGD) or g / (sqrt(v / bc2) + eps) (AdamW), plus weight_decay * y; then
    y <- y + inc with inc = c (z - y) + lr (beta (1 - c) - 1) u (which is
    y_{t+1} = (1-beta) z_{t+1} + beta x_{t+1} without forming x) and
    z <- z - lr u - r / (1 - beta), where r = inc - (y_{t+1} - y_t) is what rounding y to its
    dtype lost (0 in exact arithmetic). The average x = (y - (1 - beta) z) / beta is stored
    only through y and z; the feedback of r into z keeps it exact where y's update is too
    small to change y, as it becomes late in a run (see the comment below).

    A checked step (``finite`` given) gets zero gradients and lr = c = 0 when it is not finite
    (see ``_ScheduleFreeOptimizer._update``); then only v's decay would change something, and it
    is 1: y, z and v keep their values exactly.
    """
    a = lr * (beta * (1.0 - ckp1) - 1.0)
    feedback = 1.0 / (1.0 - beta)
    decay2 = beta2 if finite is None else _second_moment_decay(finite, beta2, lr)
    for i, (y, g, z) in enumerate(zip(ys, grads, zs)):
        if exp_avg_sqs is not None:
            v_ = exp_avg_sqs[i]
            # (tensor factors in v's dtype: a float64 one takes a slow casting loop)
            v_.mul_(coefficient(decay2, v_) if isinstance(decay2, Tensor) else decay2).addcmul_(g, g, value=1.0 - beta2)
            bc2 = coefficient(bias_correction2, v_) if isinstance(bias_correction2, Tensor) else bias_correction2
            u = g / (v_ / bc2).sqrt_().add_(eps)
        else:
            u = g
        if weight_decay != 0.0:
            u = u.add(y, alpha=weight_decay)  # decay computed at y (a new tensor: g is never modified)
        cd = coefficient_dtype(y)  # (16-bit y and z: the arithmetic in float32)
        # a tensor lr: lr, c and a are 0-d tensors, never read on the host
        c_, a_, lr_ = (t.to(cd) for t in (ckp1, a, lr)) if isinstance(lr, Tensor) else (ckp1, a, lr)
        old = y.to(cd, copy=True)
        u = u.to(cd)
        inc = (z.to(cd) - old).mul_(c_).add_(u * a_)   # the change of y the recursion asks for
        y.copy_(old + inc)                             # rounded to y's dtype
        lost = inc.sub_(y.to(cd) - old)                # r: what the rounding lost
        z.copy_(z.to(cd) - (u * lr_ + lost * feedback))


# Why z takes y's rounding error (``docs/robustness.md``, "Long runs"). Only y and z are
# stored; the average is implicit, x = (y - (1 - beta) z) / beta. Late in a run the averaging
# weight c ~ 1/t is so small that y's update is below half a unit in the last place and rounds
# away, while z keeps moving by lr g (the gradient at the stuck y is small, not 0): x then
# drifts linearly in t, away from the minimum (float32 least squares, lr 0.1: loss 3e-8 at
# step 10^4, 3e-6 at 10^5, as in ``schedulefree`` 1.4.1, whose arithmetic this was). Moving z
# by -r / (1 - beta) keeps x what the recursion says whatever y's rounding did.


def _schedule_free_kernel(*args: Any) -> tuple[()]:
    """One tensor of :func:`_single_tensor_schedule_free`, compiled by
    :class:`~tuneless.optim._fused.FusedKernel`: tensors y, g, z[, v] (v for AdamW), then the
    step's coefficients as 1-element tensors (c, a = lr (beta (1 - c) - 1), lr, bias
    correction), whether the step is finite (a bool) and the constants. No sums: the padding's
    values are discarded."""
    *tensors, ckp1, a, lr, bias_correction2, finite, weight_decay, beta2, eps, feedback, adaptive = args
    y, g, z = tensors[0], tensors[1], tensors[2]
    cd = ckp1.dtype
    # A step that is not finite: the gradient is taken as 0 and v kept (c, a and lr are 0 then,
    # so y and z keep their values: the change of y is 0, and so what its rounding lost).
    g = torch.where(finite, g, 0.0)
    if adaptive:
        v_ = tensors[3]
        new_v = torch.addcmul(v_ * beta2, g, g, value=1.0 - beta2)
        v_.copy_(torch.where(finite, new_v, v_))
        u = g / ((new_v / bias_correction2).sqrt() + eps)
    else:
        u = g
    if weight_decay != 0.0:
        u = u + weight_decay * y
    u = u.to(cd)
    old = y.to(cd)
    inc = (z.to(cd) - old) * ckp1 + u * a
    new = (old + inc).to(y.dtype)
    lost = inc - (new.to(cd) - old)  # r, as in the per-parameter step
    y.copy_(new)
    z.copy_(z.to(cd) - (u * lr + lost * feedback))
    return ()


_SF_KERNELS = {adaptive: FusedKernel(_schedule_free_kernel, num_tensors=3 + adaptive, num_sums=0)
               for adaptive in (False, True)}


def _fused_schedule_free(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], exp_avg_sqs: list[Tensor] | None, *,
    lr: float, ckp1: float, beta: float, weight_decay: float, beta2: float, bias_correction2: float, eps: float,
    finite: Tensor | None = None,
) -> None:
    """:func:`_single_tensor_schedule_free` as one compiled kernel per group of tensors (``fused=True``).

    The coefficients that change every step are computed on the host in double precision, as
    in the per-parameter path, and passed as tensors (filled, not copied: no sync)."""
    if not ys:
        return
    like = ys[0]
    cd = coefficient_dtype(like)
    a = lr * (beta * (1.0 - ckp1) - 1.0)
    coefs = (host_coefficients(like, ckp1, a, lr, bias_correction2) if not isinstance(lr, Tensor) else
             [torch.zeros(1, dtype=cd, device=like.device).add_(c) for c in (ckp1, a, lr, bias_correction2)])
    adaptive = exp_avg_sqs is not None
    lists = [ys, grads, zs] + ([exp_avg_sqs] if adaptive else [])
    if finite is None:
        finite = torch.ones((), dtype=torch.bool, device=like.device)
    _SF_KERNELS[adaptive](lists, (*coefs, finite, weight_decay, beta2, eps, 1.0 / (1.0 - beta), adaptive),
                          sum_dtype=cd, device=like.device)


def _multi_tensor_schedule_free(
    ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], exp_avg_sqs: list[Tensor] | None, *,
    lr: float, ckp1: float, beta: float, weight_decay: float, beta2: float, bias_correction2: float, eps: float,
    finite: Tensor | None = None,
) -> None:
    """The same step over all tensors at once, on the CPU block by block (cache-sized), so that
    the passes after the first read the block from the cache; the temporaries (y's change, the
    new y, AdamW's denominator) are block-sized on the CPU.

    lr, c and a are numbers or (a checked step's, a tensor lr's) 0-d tensors, never read on the host.
    """
    lists = [ys, grads, zs] + ([exp_avg_sqs] if exp_avg_sqs is not None else [])
    a = lr * (beta * (1.0 - ckp1) - 1.0)
    decay2 = None if finite is None or exp_avg_sqs is None else _second_moment_decay(finite, beta2, lr)
    feedback = 1.0 / (1.0 - beta)
    for y, g, z, *rest in cache_blocks(*lists):
        if isinstance(lr, Tensor):  # 0-d tensors enter as tensor operands, not as alpha= numbers
            cd = coefficient_dtype(y[0])
            c_, a_, lr_ = (t.to(cd) for t in (ckp1, a, -lr))
        else:
            c_, a_, lr_ = ckp1, a, -lr
        if rest:
            u = torch._foreach_div(g, _multi_tensor_second_moment_(rest[0], g, beta2, bias_correction2, eps, decay2))
        else:
            u = list(g)
        if weight_decay != 0.0:
            u = torch._foreach_add(u, y, alpha=weight_decay)  # decay at y (new tensors)
        inc = torch._foreach_sub(z, y)
        torch._foreach_mul_(inc, c_)
        torch._foreach_add_(inc, torch._foreach_mul(u, a_))   # inc: the change of y the recursion asks for
        new = torch._foreach_add(y, inc)                      # the new y, rounded
        torch._foreach_sub_(y, new)                           # y <- old - new
        torch._foreach_add_(inc, y)                           # inc <- r, what the rounding lost
        torch._foreach_copy_(y, new)
        torch._foreach_add_(z, torch._foreach_mul(u, lr_))
        torch._foreach_add_(z, inc, alpha=-feedback)


def _multi_tensor_second_moment_(exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float,
                                 bias_correction2: float | Tensor, eps: float,
                                 decay2: Tensor | None = None) -> list[Tensor]:
    """v <- beta2 v + (1 - beta2) g^2 in place; returns the new list sqrt(v / bias_correction2) + eps.

    ``decay2``: the factor v is multiplied by, when it is not ``beta2`` (a checked step: 1 when
    the step is not finite, see :func:`_second_moment_decay`)."""
    torch._foreach_mul_(exp_avg_sqs, beta2 if decay2 is None else coefficient(decay2, exp_avg_sqs[0]))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    if isinstance(bias_correction2, Tensor):  # (in the tensors' dtype: a float64 divisor takes a slow casting loop)
        bias_correction2 = coefficient(bias_correction2, exp_avg_sqs[0])
    denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    return denom


class _ScheduleFreeOptimizer(_ScheduleFreeBase):
    """Shared step of Schedule-Free SGD and AdamW: host-side schedule, then the tensor update."""

    #: True for AdamW (a second-moment buffer)
    _adaptive = False

    def _update(self, loss: Tensor | None) -> None:
        dtype, device = self._stat_dtype(), self._stat_device()
        finite = self._step_finite()
        for group in self.param_groups:
            params, grads = self._params_with_grad(group)
            if finite is not None or isinstance(group["k"], Tensor):
                self._checked_update(group, params, grads, finite, dtype, device)
                continue
            # The schedule is known on the host (no device value is read): warmup, averaging weight.
            k = group["k"]
            warmup = group["warmup_steps"]
            # A tensor lr (never read on the host) takes the same arithmetic in float64 tensors
            # where it is (the CPU for torch.tensor(...)); its lr = 0 gives c = 0: frozen too.
            lr = lr_in(group["lr"], torch.float64) * ((k + 1) / warmup if k < warmup else 1.0)
            group["k"] = k + 1
            group["scheduled_lr"] = lr
            self._publish_step_size(group, torch.zeros((), dtype=dtype, device=device).add_(lr) if
                                    isinstance(lr, Tensor) else torch.full((), lr, dtype=dtype, device=device))
            if lr_is_zero(lr):
                continue  # lr = 0 freezes the group: neither z nor the average x moves
            if isinstance(lr, Tensor):
                lr_max = group["lr_max"] = torch.maximum(lr, torch.as_tensor(group["lr_max"], dtype=lr.dtype))
                weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"]) * lr_moves(lr, lr)
                weight_sum = group["weight_sum"] = group["weight_sum"] + weight
                ckp1 = torch.where(weight_sum != 0, weight / torch.where(weight_sum != 0, weight_sum, 1.0), 0.0)
            else:
                lr_max = group["lr_max"] = max(lr, group["lr_max"])
                weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
                weight_sum = group["weight_sum"] = group["weight_sum"] + weight
                ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
            if not params:
                continue
            zs, vs = self._init_state(params)
            beta2 = group["betas"][1] if self._adaptive else 0.0
            fn = _multi_tensor_schedule_free if self._use_foreach(group) else _single_tensor_schedule_free
            if group.get("fused", False):
                fn = _fused_schedule_free
            fn([local_tensor(p) for p in params], grads, zs, vs,
               lr=lr, ckp1=ckp1, beta=self._momentum(group), weight_decay=group["weight_decay"],
               beta2=beta2, bias_correction2=1.0 - beta2 ** (k + 1), eps=group.get("eps", 0.0))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with ``skip_nonfinite`` on, its schedule state is made device tensors
        right away (see :meth:`_checked_update`), so that a fresh optimizer has the layout of a
        checkpoint (``torch.distributed.checkpoint`` loads into the layout a fresh optimizer's
        first step leaves, restoring the values that existed before it)."""
        super().add_param_group(param_group)
        if self.skip_nonfinite:
            group = self.param_groups[-1]
            device = local_tensor(group["params"][0]).device if group["params"] else self._stat_device()
            sched = _schedule_dtype(device)
            group["k"] = _count_on(group["k"], device)
            for key in ("lr_max", "weight_sum", "scheduled_lr"):
                if not isinstance(group[key], Tensor):
                    group[key] = torch.full((), float(group[key]), dtype=sched, device=device)

    def _checked_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                        finite: Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        """One group's step when it is checked for non-finite values (``finite``, a 0-d bool on
        the device; the default): the same schedule, computed on the device, so that a step that
        is not finite can leave it as it was without a host sync.

        The counter ``k`` is then a 0-d int64 tensor that counts finite steps only; lr, its
        running maximum, the weight sum and the bias correction are float64 0-d tensors (the
        host's double arithmetic, done on the device). A step that is not finite computes from
        zero gradients with lr = c = 0 and v's decay 1, so y, z and v keep their values bit for
        bit, and keeps ``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr`` and the published
        step size as they were. (Also taken with ``finite`` None when ``k`` is already a tensor,
        e.g. a checkpoint of a checked run loaded with ``skip_nonfinite=False``.)
        """
        sched = _schedule_dtype(device)
        count = _count_on(group["k"], device)
        k1 = (count + 1).to(sched)  # k + 1, as the host computes it in double
        warmup = group["warmup_steps"]
        lr = lr_in(group["lr"], sched)
        lr = lr * (torch.where(count < warmup, k1 / warmup, 1.0) if warmup > 0 else torch.ones_like(k1))
        group["k"] = count + (finite if finite is not None else 1)
        group["scheduled_lr"] = gate(finite, lr, _on(group["scheduled_lr"], lr))
        published = lr.to(dtype)
        self._publish_step_size(group, gate(finite, published, _on(group.get(STEP_SIZE_KEY, 0.0), published)))
        if lr_is_zero(group["lr"]):
            return  # lr = 0 freezes the group: neither z nor the average x moves
        lr_max_before, weight_sum_before = _on(group["lr_max"], lr), _on(group["weight_sum"], lr)
        lr_max = torch.maximum(lr, lr_max_before)
        weight = torch.pow(k1, group["r"]) * torch.pow(lr_max, group["weight_lr_power"])
        if isinstance(group["lr"], Tensor):  # a tensor lr of 0: c = 0, its weight is not accumulated
            weight = weight * lr_moves(group["lr"], weight)
        weight_sum = weight_sum_before + weight
        group["lr_max"] = gate(finite, lr_max, lr_max_before)
        group["weight_sum"] = gate(finite, weight_sum, weight_sum_before)
        ckp1 = torch.where(weight_sum != 0, weight / torch.where(weight_sum != 0, weight_sum, 1.0), 0.0)
        if finite is not None:  # (then a = lr (beta (1 - c) - 1) = 0 too)
            lr, ckp1 = torch.where(finite, lr, 0.0), torch.where(finite, ckp1, 0.0)
        if not params:
            return
        zs, vs = self._init_state(params)
        beta2 = group["betas"][1] if self._adaptive else 0.0
        fn = _multi_tensor_schedule_free if self._use_foreach(group) else _single_tensor_schedule_free
        if group.get("fused", False):
            fn = _fused_schedule_free
        else:
            grads = self._finite_grads(grads)  # (the kernel zeroes them itself)
        fn([local_tensor(p) for p in params], grads, zs, vs,
           lr=lr, ckp1=ckp1, beta=self._momentum(group), weight_decay=group["weight_decay"],
           beta2=beta2, bias_correction2=1.0 - torch.pow(beta2, k1), eps=group.get("eps", 0.0), finite=finite)

    def _init_state(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor] | None]:
        zs, vs = [], []
        for p in params:
            state = self.state[p]
            if "z" not in state:
                # The base iterate z (starts at the initial point, where x = y = z).
                state["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
                if self._adaptive:
                    # Exponential moving average of squared gradients (AdamW's second moment).
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            zs.append(local_tensor(state["z"]))
            if self._adaptive:
                vs.append(local_tensor(state["exp_avg_sq"]))
        return zs, (vs if self._adaptive else None)


def _check_betas(owner: str, betas: Any, recommended: tuple[float, float]) -> tuple:
    """Two betas in [0, 1), the first in (0, 1) (the interpolation weight: 0 would leave x
    behind). betas[0] is checked first, so that its message states the range it must be in."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        v.check_range(owner, "betas[0]", betas[0], 0.0, 1.0, inclusive="()", recommended=recommended[0])
    return v.check_betas(owner, "betas", betas, recommended=recommended)


def _check_schedule(owner: str, warmup_steps: Any, r: Any, weight_lr_power: Any, foreach: Any) -> None:
    v.check_range(owner, "warmup_steps", warmup_steps, 0, None, integer=True, recommended=0)
    v.check_range(owner, "r", r, 0.0, None, recommended=0.0)
    v.check_range(owner, "weight_lr_power", weight_lr_power, 0.0, None, recommended=2.0)
    if foreach is not None:
        v.check_bool(owner, "foreach", foreach)


class ScheduleFreeSGD(_ScheduleFreeOptimizer):
    r"""Schedule-Free SGD: momentum by interpolation, averaging instead of a schedule.

    With :math:`\gamma_t = \mathrm{lr}\cdot\min(1, (t+1)/\mathrm{warmup})`:

    .. math::
        g_t &= \nabla f(y_t) + \lambda y_t \\
        z_{t+1} &= z_t - \gamma_t g_t, \qquad
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \qquad
        y_{t+1} = (1-\beta) z_{t+1} + \beta x_{t+1} \\
        c_{t+1} &= \frac{w_t}{\sum_{i\le t} w_i}, \qquad
        w_t = (t+1)^r \big(\max_{i\le t}\gamma_i\big)^{p}

    The parameters hold :math:`y` in train mode and :math:`x` in eval mode; only :math:`z` is
    stored (one buffer per parameter). Evaluate at :math:`x`: call ``optimizer.eval()`` (and
    ``optimizer.train()`` before training again), or use ``with optimizer.evaluation_point():``.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1.0, the reference's; it needs tuning like SGD's, typically
            1x-10x larger than for SGD with a schedule). Multiplied by torch lr schedulers as usual.
        momentum: interpolation weight :math:`\beta`, in (0, 1) (default 0.9).
        weight_decay: L2 penalty :math:`\lambda`, computed at :math:`y` (default 0).
        warmup_steps: linear warmup of the lr over this many steps (default 0).
        r: polynomial weighting power of the average (default 0: uniform after warmup).
        weight_lr_power: averaging weights proportional to the largest lr so far to this power
            (default 2.0), which discounts the iterates of the warmup.
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: one compiled single-pass kernel per group of tensors instead of the vectorized
            chain (default False): faster on a CPU, at the cost of compiling it at the first
            step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.ScheduleFreeSGD([x], lr=0.1)
        >>> for _ in range(100):
        ...     opt.zero_grad(); (x ** 2).sum().backward(); _ = opt.step()
        >>> with opt.evaluation_point():   # the average x: from 25 to about 0.011
        ...     bool((x ** 2).sum() < 0.02)
        True

    References:
        Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled",
        NeurIPS 2024, arXiv:2405.15682 (matches ``schedulefree.SGDScheduleFree`` 1.4.1).

    .. warning:: Evaluate (and save for inference) at :math:`x`, not at the training point
       :math:`y`. Models with BatchNorm need their running statistics recomputed at
       :math:`x`: :func:`recompute_batchnorm_statistics`.
    """

    registry_name = "sf_sgd"
    #: elementwise (no norm, no dot product): a complex parameter trains as its real view
    supports_complex = True
    learning_rate_free = False

    def __init__(self, params: Any, lr: float = 1.0, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_range(owner, "momentum", momentum, 0.0, 1.0, inclusive="()", recommended=0.9)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
        _check_schedule(owner, warmup_steps, r, weight_lr_power, foreach)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(
            lr=lr, momentum=float(momentum), weight_decay=float(weight_decay), warmup_steps=int(warmup_steps),
            r=float(r), weight_lr_power=float(weight_lr_power), foreach=foreach, fused=fused,
            skip_nonfinite=skip_nonfinite,
            # schedule state, identical in form to the reference's (host numbers, no device reads;
            # 0-d device tensors when skip_nonfinite is on: see _checked_update)
            k=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, **{MODE_KEY: True}))

    def _momentum(self, group: dict[str, Any]) -> float:
        return group["momentum"]


class ScheduleFreeAdamW(_ScheduleFreeOptimizer):
    r"""Schedule-Free AdamW: Adam's per-coordinate scaling, no first moment, no schedule.

    As :class:`ScheduleFreeSGD` with the direction normalized by the second moment and the
    decay computed at :math:`y`:

    .. math::
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        u_t = \frac{g_t}{\sqrt{v_t / (1-\beta_2^{t+1})} + \epsilon} + \lambda y_t \\
        z_{t+1} &= z_t - \gamma_t u_t, \qquad
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \qquad
        y_{t+1} = (1-\beta_1) z_{t+1} + \beta_1 x_{t+1}

    with :math:`g_t = \nabla f(y_t)` and :math:`c_{t+1}` as in :class:`ScheduleFreeSGD`.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.0025, the reference's; typically 1x-10x AdamW's).
        betas: :math:`(\beta_1, \beta_2)`: the interpolation weight, in (0, 1), and the second
            moment's decay (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decay :math:`\lambda`, computed at :math:`y` (default 0).
        warmup_steps: linear warmup of the lr over this many steps (default 0; the paper warms up).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: averaging weights proportional to the largest lr so far to this power
            (default 2.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: one compiled single-pass kernel per group of tensors instead of the vectorized
            chain (default False): faster on a CPU, at the cost of compiling it at the first
            step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682 (matches
        ``schedulefree.AdamWScheduleFree`` 1.4.1).

    .. warning:: Evaluate at :math:`x` (``optimizer.eval()`` or ``evaluation_point()``); see
       :class:`ScheduleFreeSGD`.
    """

    registry_name = "sf_adamw"
    learning_rate_free = False
    _adaptive = True

    def __init__(self, params: Any, lr: float = 0.0025, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: bool | None = None, fused: bool = False,
                 skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=0.0025)
        betas = _check_betas(owner, betas, recommended=(0.9, 0.999))
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
        _check_schedule(owner, warmup_steps, r, weight_lr_power, foreach)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        super().__init__(params, dict(
            lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps), weight_decay=float(weight_decay),
            warmup_steps=int(warmup_steps), r=float(r), weight_lr_power=float(weight_lr_power), foreach=foreach, fused=fused,
            skip_nonfinite=skip_nonfinite,
            k=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, **{MODE_KEY: True}))

    def _momentum(self, group: dict[str, Any]) -> float:
        return group["betas"][0]


# =============================================================================================
# The wrapper: Schedule-Free around any optimizer instance.
# =============================================================================================

#: Keys the wrapper adds to the base optimizer's param groups (prefixed: no clash with the base's).
_WRAP_KEYS = ("sf_momentum", "sf_weight_decay_at_y", "sf_r", "sf_weight_lr_power", "sf_foreach", "sf_fused")


class ScheduleFree(_ScheduleFreeBase):
    r"""Schedule-Free around any torch or tuneless optimizer instance.

    The base optimizer steps on :math:`z` with the gradient taken at :math:`y`; the wrapper
    keeps :math:`z` and moves the parameters between :math:`y` and :math:`x`:

    .. math::
        z_t &\leftarrow z_t - \gamma_{t-1} \lambda_y\, y_t \quad\text{(decay at } y\text{, optional)} \\
        z_{t+1} &= \mathrm{base.step}\big(z_t;\ \nabla f(y_t)\big), \qquad
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \qquad
        y_{t+1} = (1-\beta) z_{t+1} + \beta x_{t+1}

    with :math:`c_{t+1} = w_t / \sum_{i \le t} w_i`, :math:`w_t = (t+1)^r \gamma_{\max,t}^{\,p}`
    and :math:`\gamma_t` the base's step size after its step t: ``lr * group['d']`` when the
    group has a learned ``'d'`` (the reference's rule; tuneless and the authors' D-Adaptation
    and Prodigy), else the ``effective_lr`` a tuneless base publishes (DoG, Polyak, ...), else
    ``lr``. With a learned step size no learning rate is left to choose:
    :class:`ScheduleFreeProdigy`.

    It is a :class:`torch.optim.Optimizer` whose ``param_groups`` are the base's (lr schedulers
    drive the base through it), with one ``state_dict`` holding the base's state, the wrapper's
    ``sf_z`` buffers and the mode.

    Args:
        base: the optimizer instance to wrap (its momentum may be turned off: the interpolation
            provides it).
        momentum: interpolation weight :math:`\beta`, in (0, 1) (default 0.9).
        weight_decay_at_y: decay :math:`\lambda_y` computed at :math:`y` and applied to
            :math:`z` with the base's current step size :math:`\gamma_{t-1}` (the same rule as
            for the weights: ``lr * d`` before the step, else a tuneless base's last published
            step size, 0 before its first step, else ``lr``; the reference uses ``lr`` even when
            the base learns ``d``, which with ``lr = 1`` decays by :math:`\lambda_y` a step)
            (default 0). Decay set on the base itself is computed at :math:`z`.
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: averaging weights proportional to the largest step size so far to this
            power (default 2.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False) of
            the wrapper's own work (the base keeps its own setting).
        fused: the wrapper's own two passes (before and after the base's step) as compiled
            single-pass kernels, one call per group of tensors (default False; see
            :mod:`tuneless.optim._fused`: compiles at the first step); ignores ``foreach``.
        skip_nonfinite: a step whose gradients (or loss, for a base that takes it) are not all
            finite leaves the parameters, the wrapper's state and the base's as they were
            (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`): a tuneless base
            steps under the wrapper's decision (its own setting is not used then), another
            optimizer is put back from a copy of its state taken before its step (one copy of
            the parameters and its state per step). False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.ScheduleFree(torch.optim.SGD([x], lr=0.1), momentum=0.9)
        >>> for _ in range(100):
        ...     opt.zero_grad(); (x ** 2).sum().backward(); _ = opt.step()
        >>> with opt.evaluation_point():   # the average x: from 25 to about 0.011
        ...     bool((x ** 2).sum() < 0.02)
        True

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682 (matches
        ``schedulefree.ScheduleFreeWrapper`` 1.4.1 on the bases it supports).

    .. note:: During ``step`` the wrapper holds one transient copy of the parameters (the
       average x; with ``fused=True`` none: x is kept in z's buffer while the base steps, and
       if the base's step raises, the parameters go back to y around the z the base left)
       so that z is exchanged exactly, without the reference's three byte-wise XOR
       passes. A closure is evaluated once, at y, before the base steps; bases that need to
       re-evaluate it (L-BFGS) are not supported.
    """

    registry_name = ""  # built around an optimizer instance, not from parameters: not in the registry
    _z_key = "sf_z"
    _y_key = "sf_y"

    def __init__(self, base: torch.optim.Optimizer, *, momentum: float = 0.9, weight_decay_at_y: float = 0.0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"{owner}: base must be a torch.optim.Optimizer instance; got {type(base).__name__}")
        if isinstance(base, _ScheduleFreeBase):
            raise TypeError(f"{owner}: base {type(base).__name__} is already schedule-free; wrap a plain optimizer")
        v.check_range(owner, "momentum", momentum, 0.0, 1.0, inclusive="()", recommended=0.9)
        v.check_range(owner, "weight_decay_at_y", weight_decay_at_y, 0.0, None, inclusive="[)")
        _check_schedule(owner, 0, r, weight_lr_power, foreach)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        # Set up the torch.optim.Optimizer machinery without creating param groups of our own:
        # the groups are the base's (see the param_groups property).
        for i, group in enumerate(base.param_groups):
            self._refuse_complex(group["params"], before=sum(len(g["params"]) for g in base.param_groups[:i]))
        self.base = base
        #: True when the base takes its step size from the loss: then so does the wrapper.
        self.requires_loss = bool(getattr(base, "requires_loss", False))
        self.defaults = dict(sf_momentum=float(momentum), sf_weight_decay_at_y=float(weight_decay_at_y),
                             sf_r=float(r), sf_weight_lr_power=float(weight_lr_power), sf_foreach=foreach,
                             sf_fused=fused, skip_nonfinite=skip_nonfinite)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.state = defaultdict(dict)
        self._warned_capturable_if_run_uncaptured = True
        for group in self.param_groups:
            self._init_group(group, mode=True)

    def _init_group(self, group: dict[str, Any], mode: bool) -> None:
        for key in _WRAP_KEYS:
            group.setdefault(key, self.defaults[key])
        if "sf_k" not in group:  # checked steps count on the device (see _back_to_y): a tensor from the start
            group["sf_k"] = (_count_on(0, local_tensor(group["params"][0]).device)
                             if self.skip_nonfinite and group["params"] else 0)
        group.setdefault(MODE_KEY, mode)

    # ------------------------------------------------------------------ the base's groups

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's param groups (one list, shared: lr schedulers see the base's lr)."""
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        mode = self.training
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        self._refuse_complex(param_group["params"])
        self.base.add_param_group(param_group)
        self._init_group(self.param_groups[-1], mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _use_foreach(self, group: dict[str, Any]) -> bool:
        flag = group.get("sf_foreach")
        return True if flag is None else bool(flag)

    def _momentum(self, group: dict[str, Any]) -> float:
        return group["sf_momentum"]

    # ------------------------------------------------------------------ stepping

    def _base_step_size(self, group: dict[str, Any]) -> Tensor | float:
        """The base's step size: lr * group['d'] where the group has a learned d (the reference's
        rule: D-Adaptation, Prodigy), else a tuneless base's published effective_lr (0 before
        its first step), else lr."""
        lr = lr_in(group["lr"], self._stat_dtype())  # a tensor lr: rounded as a number is
        if "d" in group:
            return lr * group["d"]
        if isinstance(self.base, TunelessOptimizer):
            return group.get(STEP_SIZE_KEY, 0.0)
        return lr

    @staticmethod
    def _frozen(group: dict[str, Any]) -> bool:
        lr = group["lr"]
        return not isinstance(lr, Tensor) and lr == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One step: y -> z, the base's step on z with the gradient taken at y, then average and back to y.

        Args:
            closure: optional callable that re-evaluates the model at y and returns the loss
                (evaluated once, before the base steps).
            loss: the loss at y, passed to a tuneless base that needs it (Polyak, MoMo).
        """
        self._require_train_mode()
        if closure is not None and loss is not None:
            raise ValueError(f"{type(self).__name__}.step: give either a closure or loss=, not both")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None and getattr(self.base, "requires_loss", False):
            raise LossRequiredError(
                f"{type(self).__name__}: its base {type(self.base).__name__} computes its step size from the "
                f"loss: call optimizer.step(loss=loss) after loss.backward(), or optimizer.step(closure)"
            )
        self._check_gradients()
        # The loss joins the check when the base takes it: the ranks' mean, averaged here (the
        # base is told, and does not average it again), so that every rank decides alike.
        loss_tensor = self._averaged_loss(loss, self.base)
        with self._skipping_nonfinite(loss_tensor) as finite:
            self._step_with(loss if loss_tensor is None else loss_tensor, finite)
        return loss

    def _step_with(self, loss: Any, finite: Tensor | None) -> None:
        """The step, under the flag ``finite`` (None: not checked).

        A step that is not finite leaves everything as it was: the decay at y is taken with a
        step size of 0, the parameters keep y while the base "steps" (instead of z: the wrapper
        keeps no copy of y, and rebuilding y from z and x is off by rounding), the base's step
        is a no-op (a tuneless base steps under this flag; another optimizer is put back from a
        snapshot), and the pass back keeps z and y, and the weights, counter and published step
        size. A tuneless base's state created at a first step sees y = z (both start at the
        parameters)."""
        work = [self._to_base_iterate(group, finite) for group in self.param_groups]
        snapshot = None
        if finite is not None and not isinstance(self.base, TunelessOptimizer) and not known_finite(finite):
            # after the first pass: the point the base steps from (on the CPU paths, only for a
            # step known not to be finite)
            snapshot = OptimizerSnapshot(self.base)
        try:
            with self._lending_finite(self.base), self._passing_averaged_loss(self.base):
                if isinstance(self.base, TunelessOptimizer):
                    self.base.step(loss=loss)
                else:
                    self.base.step()
        except BaseException:
            if snapshot is not None:
                snapshot.restore_unless(finite)
            for group, (ys, zs, xs) in zip(self.param_groups, work):  # put y back from x and the stored z
                beta = group["sf_momentum"]
                if xs is zs:  # fused or vectorized: z's buffers hold x, the parameters z (as the base left it)
                    for y, x in zip(ys, xs):  # (not finite: the parameters hold y, z's buffers z)
                        z = y.clone() if finite is None else torch.where(finite, y, x)
                        y.copy_(torch.lerp(z, x, beta) if finite is None else torch.where(finite, torch.lerp(y, x, beta), y))
                        x.copy_(z)
                    continue
                for y, z, x in zip(ys, zs, xs):
                    y.copy_(torch.lerp(z, x, beta) if finite is None else torch.where(finite, torch.lerp(z, x, beta), y))
            raise
        if snapshot is not None:
            snapshot.restore_unless(finite)
        for group, (ys, zs, xs) in zip(self.param_groups, work):
            self._back_to_y(group, ys, zs, xs, finite)

    def _to_base_iterate(self, group: dict[str, Any],
                         finite: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Decay at y, then x into a transient buffer and z into the parameters; returns (y, z, x) lists.

        A group with lr = 0 is left as it is (empty lists): the base does not move it either.
        A step that is not finite (``finite`` False) decays by 0 and leaves y in the parameters.
        """
        params = [] if self._frozen(group) else [p for p in group["params"] if p.grad is not None]
        if not params:
            return [], [], []
        ys = [local_tensor(p) for p in params]
        zs = self._z_tensors(params)
        beta, wd = group["sf_momentum"], group["sf_weight_decay_at_y"]
        gamma = self._decay_step_size(group)
        fn = _multi_tensor_to_base_iterate if self._use_foreach(group) else _single_tensor_to_base_iterate
        if group.get("sf_fused", False):
            fn = _fused_to_base_iterate
        return ys, zs, fn(ys, zs, beta, wd, gamma, finite)

    def _z_tensors(self, params: list[Tensor]) -> list[Tensor]:
        """The local parts of the base iterates z of ``params``, each created at the parameter
        where it has none yet (the initial point, where x = y = z)."""
        for p in params:
            state = self.state[p]
            if self._z_key not in state:
                state[self._z_key] = torch.clone(p, memory_format=torch.preserve_format).detach()
        return [local_tensor(self.state[p][self._z_key]) for p in params]

    def _decay_step_size(self, group: dict[str, Any]) -> Tensor | float:
        """The step size the decay at y is applied with (before the base steps): the base's
        current step size (see :meth:`_base_step_size`), 0 when there is no decay at y."""
        if group["sf_weight_decay_at_y"] == 0:
            return 0.0
        gamma = self._base_step_size(group)
        count = group.get("sf_k")
        if (isinstance(self.base, TunelessOptimizer) and isinstance(gamma, Tensor) and isinstance(count, Tensor)
                and "d" not in group):
            # A tuneless base's published step size is 0 before the first step that counted: a
            # skipped first step may have published one (COCOB publishes its lr), a clean run has none.
            gamma = torch.where(count.to(gamma.device) > 0, gamma, 0.0)
        return gamma

    def _back_to_y(self, group: dict[str, Any], ys: list[Tensor], zs: list[Tensor], xs: list[Tensor],
                   finite: Tensor | None = None) -> None:
        """After the base step (parameters hold the new z): average x towards it, store z, put y back.

        A checked step (``finite`` given) counts ``sf_k`` on the device, in finite steps; one
        that is not finite keeps the counter, the weights and the published step size, and the
        parameters (y) and z as they are (x is a transient: it takes y, so that y's lerp
        towards it gives y bit for bit)."""
        ckp1 = self._averaging_weight(group, finite)
        if ckp1 is not None and ys:
            fn = _multi_tensor_back_to_y if self._use_foreach(group) else _single_tensor_back_to_y
            if group.get("sf_fused", False):
                fn = _fused_back_to_y
            fn(ys, zs, xs, ckp1, group["sf_momentum"], finite)

    def _averaging_weight(self, group: dict[str, Any], finite: Tensor | None = None) -> Tensor | None:
        """The bookkeeping of :meth:`_back_to_y` after the base's step: counts the step, updates
        the largest step size and the weight sum, publishes the step size of a base that does not,
        and returns the weight c_{t+1} of the new z in the average x (1 on a step that is not
        finite), or None for a group frozen by an lr of 0 (nothing moves)."""
        dtype, device = self._stat_dtype(), self._stat_device()
        # Averaging weights in float64 (float32 on MPS, which has no float64), on the device.
        avg_dtype = torch.float32 if device.type == "mps" else torch.float64
        k = group["sf_k"]
        if finite is None and not isinstance(k, Tensor):
            group["sf_k"] = k + 1
            k1: Any = k + 1
        else:  # a counter on the device (the host cannot know whether a step counted)
            count = _count_on(k, device)
            group["sf_k"] = count + (finite if finite is not None else 1)
            k1 = (count + 1).to(avg_dtype)
        publish = not isinstance(self.base, TunelessOptimizer)  # a tuneless base publishes its own
        if self._frozen(group):
            if publish:
                zero = torch.zeros((), dtype=dtype, device=device)
                self._publish_step_size(group, gate(finite, zero, _on(group.get(STEP_SIZE_KEY, 0.0), zero)))
            return None
        gamma = self._base_step_size(group)
        gamma = (gamma.detach().to(device=device, dtype=avg_dtype) if isinstance(gamma, Tensor)
                 else torch.full((), float(gamma), dtype=avg_dtype, device=device))
        if publish:
            published = gamma.to(dtype)
            self._publish_step_size(group, gate(finite, published, _on(group.get(STEP_SIZE_KEY, 0.0), published)))
        lr_max_before = group.get("sf_lr_max")
        lr_max = gamma if lr_max_before is None else torch.maximum(lr_max_before.to(gamma), gamma)
        power = k1 ** group["sf_r"] if not isinstance(k1, Tensor) else torch.pow(k1, group["sf_r"])
        weight = power * lr_max ** group["sf_weight_lr_power"]
        if isinstance(group["lr"], Tensor):  # a tensor lr of 0 freezes the group, as lr = 0 does: c = 0
            weight = weight * lr_moves(group["lr"], weight)
        weight_sum_before = group.get("sf_weight_sum")
        weight_sum = weight if weight_sum_before is None else weight_sum_before.to(weight) + weight
        if finite is not None:  # (before a first step: 0, which max(0, gamma) and 0 + w leave exact)
            lr_max = gate(finite, lr_max, 0.0 if lr_max_before is None else lr_max_before.to(lr_max))
            weight_sum = gate(finite, weight_sum, 0.0 if weight_sum_before is None else weight_sum_before.to(weight_sum))
        group["sf_lr_max"], group["sf_weight_sum"] = lr_max, weight_sum
        positive = weight_sum > 0
        ckp1 = torch.where(positive, weight / torch.where(positive, weight_sum, torch.ones_like(weight_sum)),
                           torch.zeros_like(weight_sum))
        if finite is not None:
            ckp1 = torch.where(finite, ckp1, 1.0)  # x <- y: then lerp(y, x, beta) = y exactly
        return ckp1

    # ------------------------------------------------------------------ checkpoints and copies

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict, with the wrapper's ``sf_z`` added to each parameter's state.

        The param groups (the base's) carry the wrapper's keys and the mode.
        """
        own = torch.optim.Optimizer.state_dict(self)  # the wrapper's state, packed by parameter index
        out = self.base.state_dict()
        merged: dict[Any, Any] = {k: dict(s) for k, s in out["state"].items()}
        for k, s in own["state"].items():
            merged.setdefault(k, {}).update(s)
        out["state"] = merged
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: the base's part into the base; ``sf_z``, ``sf_y`` and the mode here."""
        base_state, own_state = {}, {}
        for k, s in state_dict["state"].items():
            s = dict(s)
            own = {key: s.pop(key) for key in (self._z_key, self._y_key) if key in s}
            if own:
                own_state[k] = own
            if s:
                base_state[k] = s
        self.base.load_state_dict({**state_dict, "state": base_state})
        torch.optim.Optimizer.load_state_dict(self, {"state": own_state, "param_groups": state_dict["param_groups"]})
        self.__dict__.pop("param_groups", None)  # torch's loader also stores the groups; ours are the base's
        for group in self.param_groups:
            self._init_group(group, mode=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "state": self.state, "base": self.base}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("param_groups", None)
        torch.optim.Optimizer.__setstate__(self, state)
        self.__dict__.pop("param_groups", None)
        for group in self.param_groups:
            group.setdefault(MODE_KEY, True)

    def __repr__(self) -> str:
        return f"ScheduleFree(momentum={self.defaults['sf_momentum']}, base={self.base!r})"


def _decay_step(gamma: Tensor | float, wd: float, finite: Tensor | None) -> Tensor | float:
    """The decay at y's step size gamma * wd; 0 (a tensor) where the step is not finite."""
    step = gamma * wd
    if finite is None:
        return step
    if not isinstance(step, Tensor):
        step = torch.full((), step, dtype=torch.float32 if finite.device.type == "mps" else torch.float64,
                          device=finite.device)
    return torch.where(finite, step, 0.0)


def _single_tensor_to_base_iterate(ys: list[Tensor], zs: list[Tensor], beta: float, wd: float,
                                   gamma: Tensor | float, finite: Tensor | None = None) -> list[Tensor]:
    """(parameters hold y, z stored) -> (parameters hold z, x returned), one tensor at a time.

    A step that is not finite (``finite`` False) decays by 0 and leaves y in the parameters."""
    xs = []
    step = _decay_step(gamma, wd, finite) if wd != 0 else 0.0
    for y, z in zip(ys, zs):
        if wd != 0:
            s = step.to(_weight_dtype(y)) if isinstance(step, Tensor) else step
            z.sub_(y * s)                    # decay of z computed at y
            y.mul_(1 - s * (1 - beta))       # y = (1 - beta) z + beta x follows z
        xs.append(torch.lerp(y, z, 1.0 - 1.0 / beta))  # x = (y - (1 - beta) z) / beta
        y.copy_(z if finite is None else torch.where(finite, z, y))  # the base optimizer steps on z
    return xs


def decay_at_y_(ys: list[Tensor], zs: list[Tensor], beta: float, step: Tensor | float) -> None:
    """The decay at y on one block (lists of one dtype), in place: z <- z - step y and
    y <- y (1 - step (1 - beta)), so that y = (1 - beta) z + beta x still holds."""
    if isinstance(step, Tensor):
        s = step.to(_weight_dtype(ys[0]))
        torch._foreach_addcmul_(zs, ys, [-s] * len(ys))
        torch._foreach_mul_(ys, 1 - s * (1 - beta))
    else:
        torch._foreach_add_(zs, ys, alpha=-step)
        torch._foreach_mul_(ys, 1 - step * (1 - beta))


def _multi_tensor_to_base_iterate(ys: list[Tensor], zs: list[Tensor], beta: float, wd: float,
                                  gamma: Tensor | float, finite: Tensor | None = None) -> list[Tensor]:
    """The same over all tensors at once, on the CPU block by block (cache-sized) so that the
    passes after the first read the block from the cache. It swaps, as the fused kernel does,
    instead of keeping x in a transient of the model's size (allocated at every step: page
    faults): the parameters get z and z's buffers get x, and ``zs`` is returned as the x list;
    :func:`_multi_tensor_back_to_y` puts z back. The temporary is a block's.

    Where ``finite`` is given, each move is a lerp with weight 1 (the new value exactly) or 0
    (the old one kept): not finite, the parameters keep y and z's buffers z. A flag the CPU
    paths know to be True (:func:`~tuneless.optim.base.known_finite`) moves by copies, which
    give the same values and cost less than the lerps."""
    by_copy = finite is None or known_finite(finite)
    step = _decay_step(gamma, wd, finite) if wd != 0 else 0.0
    for y, z in cache_blocks(ys, zs):
        if wd != 0:
            decay_at_y_(y, z, beta, step)
        x = torch._foreach_lerp(y, z, 1.0 - 1.0 / beta)
        if by_copy:
            torch._foreach_copy_(y, z)
            torch._foreach_copy_(z, x)
        else:
            weight = [finite.to(_weight_dtype(y[0]))] * len(y)  # type: ignore[union-attr]
            torch._foreach_lerp_(y, z, weight)
            torch._foreach_lerp_(z, x, weight)
    return zs


def _single_tensor_back_to_y(ys: list[Tensor], zs: list[Tensor], xs: list[Tensor], ckp1: Tensor, beta: float,
                             finite: Tensor | None = None) -> None:
    """Parameters hold the new z: x <- lerp(x, z, c); store z; parameters <- (1 - beta) z + beta x.

    A step that is not finite: the parameters hold y and c is 1, so x <- y and y <- lerp(y, y,
    beta) = y; z is kept."""
    for y, z, x in zip(ys, zs, xs):
        x.lerp_(y, ckp1.to(_weight_dtype(x)))
        z.copy_(y if finite is None else torch.where(finite, y, z))
        y.lerp_(x, beta)


def _multi_tensor_back_to_y(ys: list[Tensor], zs: list[Tensor], xs: list[Tensor], ckp1: Tensor, beta: float,
                            finite: Tensor | None = None) -> None:
    """The same over all tensors at once, on the CPU block by block (cache-sized), after
    :func:`_multi_tensor_to_base_iterate`: z's buffers hold x (``xs`` is ``zs``) and the
    parameters the new z; z's buffers get z back and the parameters y. Not finite (the
    parameters hold y, z's buffers z, c = 1): x = y, so the parameters keep y and z's buffers z.
    A flag known to be True on the CPU paths moves z by a copy (the same values)."""
    by_copy = finite is None or known_finite(finite)
    for y, z in cache_blocks(ys, zs):
        # the weight as a list of tensors: a 0-d tensor weight would take the Scalar overload (read on
        # the host); in place on a copy for 16-bit tensors (out of place, a float32 weight would
        # promote the result to float32)
        weight = [ckp1.to(_weight_dtype(z[0]))] * len(z)
        if weight[0].dtype == z[0].dtype:
            x = torch._foreach_lerp(z, y, weight)
        else:
            x = [t.clone() for t in z]
            torch._foreach_lerp_(x, y, weight)
        if by_copy:
            torch._foreach_copy_(z, y)
        else:  # weight 1: y exactly; 0: z kept
            torch._foreach_lerp_(z, y, [finite.to(_weight_dtype(z[0]))] * len(z))  # type: ignore[union-attr]
        torch._foreach_lerp_(y, x, beta)


def _to_base_iterate_kernel(y: Tensor, s: Tensor, step: Tensor, finite: Tensor, beta: float,
                            with_decay: bool) -> tuple[()]:
    """One tensor of :func:`_single_tensor_to_base_iterate`, compiled by
    :class:`~tuneless.optim._fused.FusedKernel`, with x kept in z's buffer ``s`` instead of a
    transient: the parameter gets z, ``s`` gets x (``step`` = gamma * weight decay, a 1-element
    tensor). One pass, read y, s and write y, s; zero padding stays 0. A step that is not
    finite (``step`` 0) writes nothing back: the parameter keeps y and ``s`` keeps z.

    (The ``+ 0.0`` keeps the copy an expression: a plain copy of an input that the same graph
    mutates afterwards came out wrong from torch 2.13's Inductor, which wrote the new value:
    pytorch/pytorch#198131.)"""
    z = s - y * step if with_decay else s
    y_now = y * (1 - step * (1 - beta)) if with_decay else y
    x = torch.lerp(y_now, z, 1.0 - 1.0 / beta)
    y.copy_(torch.where(finite, z + 0.0, y))
    s.copy_(torch.where(finite, x, s))
    return ()


def _back_to_y_kernel(y: Tensor, s: Tensor, ckp1: Tensor, finite: Tensor, beta: float) -> tuple[()]:
    """One tensor of :func:`_single_tensor_back_to_y`, compiled, after
    :func:`_to_base_iterate_kernel`: ``s`` holds x and the parameter the new z; ``s`` gets z back
    and the parameter y. One pass, read y, s and write y, s; zero padding stays 0. A step that
    is not finite (the parameter holds y, ``s`` z, c = 1): x = y, so the parameter keeps y, and
    ``s`` keeps z."""
    y_c = y.to(ckp1.dtype)  # (16-bit tensors interpolated in ckp1's dtype, as a tensor weight requires)
    x = torch.lerp(s.to(ckp1.dtype), y_c, ckp1)
    s.copy_(torch.where(finite, y + 0.0, s))
    y.copy_(torch.lerp(y_c, x, beta))
    return ()


_TO_BASE_KERNEL = FusedKernel(_to_base_iterate_kernel, num_tensors=2, num_sums=0)
_BACK_TO_Y_KERNEL = FusedKernel(_back_to_y_kernel, num_tensors=2, num_sums=0)


def _always(like: Tensor) -> Tensor:
    """The flag of a step that is not checked (a kernel takes the flag either way)."""
    return torch.ones((), dtype=torch.bool, device=like.device)


def _fused_to_base_iterate(ys: list[Tensor], zs: list[Tensor], beta: float, wd: float,
                           gamma: Tensor | float, finite: Tensor | None = None) -> list[Tensor]:
    """:func:`_single_tensor_to_base_iterate` as one compiled pass (``fused=True``) that swaps
    instead of copying: the parameters get z and z's buffers get x, which is returned (the same
    list as ``zs``; no transient buffer). Not finite: nothing moves (see the kernel)."""
    if ys:
        cd = coefficient_dtype(ys[0])
        step = _decay_step(gamma, wd, finite)
        step = step.to(cd) if isinstance(step, Tensor) else host_coefficients(ys[0], step)[0]
        _TO_BASE_KERNEL([ys, zs], (step, finite if finite is not None else _always(ys[0]), beta, wd != 0),
                        sum_dtype=cd, device=ys[0].device)
    return zs


def _fused_back_to_y(ys: list[Tensor], zs: list[Tensor], xs: list[Tensor], ckp1: Tensor, beta: float,
                     finite: Tensor | None = None) -> None:
    """:func:`_single_tensor_back_to_y` as one compiled pass (``fused=True``), ``zs`` holding x."""
    cd = coefficient_dtype(ys[0])
    _BACK_TO_Y_KERNEL([ys, zs], (ckp1.to(cd), finite if finite is not None else _always(ys[0]), beta),
                      sum_dtype=cd, device=ys[0].device)


# =============================================================================================
# The fully learning-rate-free combination.
# =============================================================================================


class ScheduleFreeProdigy(ScheduleFree):
    r"""Schedule-Free averaging driven by Prodigy's learned step size: no learning rate, no schedule.

    :class:`ScheduleFree` around :class:`~tuneless.Prodigy` with Prodigy's first moment turned
    off (the interpolation :math:`\beta_1` plays its part): the base's step on :math:`z` is
    :math:`d_t\,g_t/(\sqrt{v_t}+d_t\epsilon)` with Prodigy's estimate :math:`d_t` of the
    distance to the solution, and the averaging weights are :math:`c_{t+1} \propto
    (d_t\,\mathrm{lr})^{p}`, so the iterates taken while :math:`d` was still growing count little.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size (default 1.0), for lr schedulers.
        betas: :math:`(\beta_1, \beta_2)`: the interpolation weight, in (0, 1), and Prodigy's
            second-moment decay (default (0.9, 0.99), as in prodigy-plus-schedule-free: with
            0.999, Prodigy's :math:`d` overshoots on the Rosenbrock race, measured: error 36 after
            5000 steps from 24 at the start, against 0.25 with 0.99; on logistic regression and
            an MLP on ``load_digits`` 0.99 is also the better of the two).
        eps: Prodigy's denominator term (default 1e-8).
        weight_decay: decay computed at :math:`y`, applied with the step size :math:`d\cdot\mathrm{lr}`
            (default 0).
        d0: Prodigy's initial estimate (default None: Prodigy's choice, 1e-6, or 1e-3 when a
            parameter is bfloat16 or float16, so that the first updates are representable).
        d_coef: Prodigy's multiplier of the estimate (default 1.0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: averaging weights proportional to (largest :math:`d\cdot\mathrm{lr}`)
            to this power (default 2.0).
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: compiled kernels, for Prodigy's step and for the wrapper's own passes (default
            False; see :mod:`tuneless.optim._fused`: compiles at the first step).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state (Prodigy's included) as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682 (their
        wrapper reads a learned ``group['d']`` the same way); Mishchenko & Defazio, "Prodigy",
        ICML 2024, arXiv:2306.06101.
    """

    registry_name = "sf_prodigy"
    learning_rate_free = True

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, d0: float | None = None, d_coef: float = 1.0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        lr = v.check_lr(owner, lr, recommended=1.0)
        v.check_bool(owner, "fused", fused)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        betas = _check_betas(owner, betas, recommended=(0.9, 0.99))
        v.check_range(owner, "weight_decay", weight_decay, 0.0, None, inclusive="[)")
        from .prodigy import Prodigy  # the base; imported here to keep module imports one-way

        base = Prodigy(params, lr=lr, betas=(0.0, float(betas[1])), eps=eps, d0=d0, d_coef=d_coef, foreach=foreach,
                       fused=fused)
        base.skip_nonfinite = skip_nonfinite  # it steps under the wrapper's flag; off, neither checks
        super().__init__(base, momentum=float(betas[0]), weight_decay_at_y=float(weight_decay), r=r,
                         weight_lr_power=weight_lr_power, foreach=foreach, fused=fused, skip_nonfinite=skip_nonfinite)

    def __repr__(self) -> str:
        return TunelessOptimizer.__repr__(self)


# =============================================================================================
# BatchNorm statistics at the evaluation point.
# =============================================================================================


@torch.no_grad()
def recompute_batchnorm_statistics(model: torch.nn.Module, batches: Iterable[Any],
                                   optimizer: torch.optim.Optimizer | None = None, *,
                                   forward: Callable[[torch.nn.Module, Any], Any] | None = None,
                                   num_batches: int | None = None) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` at the evaluation point.

    Schedule-Free trains at y but evaluates at x, so the running means and variances collected
    during training belong to the wrong point. This resets them and averages them afresh
    (cumulative average, ``momentum=None``) over ``batches``, with the parameters at
    ``optimizer``'s evaluation point (given an optimizer; else at the current parameters). The
    parameters and the optimizer's mode, each layer's ``momentum`` and the model's
    train/eval flags are restored on return; the new statistics stay.

    Use it right before evaluating, e.g.::

        recompute_batchnorm_statistics(model, itertools.islice(train_loader, 50), optimizer)
        model.eval()
        with optimizer.evaluation_point():
            evaluate(model)

    Args:
        model: the model.
        batches: an iterable of inputs; a list or tuple is taken as ``(inputs, ...)`` and
            ``model(batch[0])`` is called (as ``torch.optim.swa_utils.update_bn`` does).
        optimizer: the optimizer whose evaluation point is used (any object with
            ``evaluation_point()``; None: the current parameters).
        forward: ``forward(model, batch)`` to call instead of ``model(inputs)`` (e.g. to move
            the batch to a device).
        num_batches: stop after this many batches (default: all of ``batches``).

    Returns:
        The number of batches used (0 when the model has no BatchNorm layer: nothing is run).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    if not layers:
        return 0
    hook = getattr(optimizer, "evaluation_point", None) if optimizer is not None else None
    context = hook() if hook is not None else contextlib.nullcontext()
    momenta = [m.momentum for m in layers]
    was_training = {m: m.training for m in model.modules()}
    count = 0
    try:
        with context:
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the batches
            model.train()
            for batch in batches:
                if num_batches is not None and count >= num_batches:
                    break
                if forward is not None:
                    forward(model, batch)
                else:
                    model(batch[0] if isinstance(batch, (list, tuple)) else batch)
                count += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, flag in was_training.items():
            m.training = flag
    return count
