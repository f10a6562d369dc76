r"""Prodigy: Adam with a step size learned from an estimate of the distance to the solution.

Paper: K. Mishchenko and A. Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
Learner", ICML 2024, arXiv:2306.06101 (the Adam version of the method).

Reference implementation matched: ``prodigyopt`` 1.1.2 (``prodigyopt.Prodigy``, the authors'
package): same arguments and defaults (but ``d0`` with 16-bit parameters), same update,
parameter for parameter to a relative 1e-10 over hundreds of steps in float64
(``tests/test_parity_prodigy.py``) wherever the reference accepts the inputs. Where tuneless
differs on purpose, the class docstring says so and ``tests/test_prodigy.py`` covers the
difference.

No host synchronization happens in a step: d and the other shared scalars are 0-d tensors on
the parameters' device, and the two global sums of a step (the numerator and
:math:`\|s\|_1`) travel in one :meth:`~tuneless.optim.base.TunelessOptimizer._global_sum`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _validate as v
from ..errors import InvalidArgumentError
from ._batched import (Scratch, _sum_stacked, add_scaled_, coefficient, coefficient_dtype, cpu_paths, total_abs_sum,
                       total_dot)
from ._fused import FusedKernel
from .base import STEP_SIZE_KEY, TunelessOptimizer, gate, local_tensor, lr_in, lr_is_zero

__all__ = ["Prodigy"]

#: Hyperparameters of the shared estimate of d: identical in every param group.
_SHARED = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "safeguard_warmup")
#: Elements per chunk of the vectorized path on the CPU (see :meth:`_Buffers.chunks`).
_CPU_CHUNK = 1 << 18
#: Scalars shared by the whole optimizer, stored (the same values) in every param group.
_SCALARS = ("d", "d_max", "d_numerator", "d_hat", "moment_scale")


class Prodigy(TunelessOptimizer):
    r"""Prodigy: Adam whose step size :math:`d\cdot\mathrm{lr}` is learned (Mishchenko & Defazio, 2024).

    With :math:`\gamma` the group's ``lr``, :math:`\beta_3` (default :math:`\sqrt{\beta_2}`),
    :math:`c_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})` with ``use_bias_correction``
    (else 1) and :math:`\eta_k = d_k\,\gamma\,c_k` (the step size applied, published as
    ``group["effective_lr"]``), step :math:`k` is

    .. math::
        m_k &= \beta_1 m_{k-1} + (1-\beta_1)\, d_k\, g_k, \qquad
        v_k = \beta_2 v_{k-1} + (1-\beta_2)\, d_k^2\, g_k^2 \\
        r_k &= \beta_3 r_{k-1} + \tfrac{d_k}{d_0}\,\eta_k\,\langle g_k,\ x_0 - x_k\rangle, \qquad
        s_k = \beta_3 s_{k-1} + \tfrac{d_k}{d_0}\,\omega_k\, g_k,
        \quad \omega_k = \begin{cases} d_k & \text{safeguard\_warmup} \\ \eta_k & \text{otherwise}\end{cases} \\
        \hat d_{k} &= d_{\mathrm{coef}}\, r_k / \|s_k\|_1, \qquad
        \bar d_k = \max(\bar d_{k-1}, \hat d_k), \qquad
        d_{k+1} = \min\big(\bar d_k,\ \mathrm{growth\_rate}\cdot d_k'\big) \\
        x_{k+1} &= x_k - \eta_k\,\lambda\,x_k - \eta_k\, \frac{m_k}{\sqrt{v_k} + d_{k+1}\,\epsilon}

    where :math:`d_0` is ``d0``, :math:`d_k' = \max(d_k, \hat d_k)` while :math:`d_k = d_0`
    (the first rise is not capped by the growth rate) and :math:`d_k` after, and the inner
    products and :math:`\|s\|_1` run over every parameter of every group (on every
    ``slice_p``-th coordinate of each tensor when ``slice_p > 1``). :math:`\lambda` is the
    decoupled weight decay; with ``decouple=False`` it is coupled instead
    (:math:`g_k \leftarrow g_k + \lambda x_k` everywhere, no decay term). With ``betas[0] = 0``
    the step uses :math:`d_{k+1} g_k` in place of :math:`m_k`, as the reference does.

    Args:
        params: parameters or param groups.
        lr: multiplier of the learned step size (default 1.0; leave it unless the training is
            unstable, then try 0.5). It is what torch lr schedulers drive (cosine decay is the
            usual companion), and it may differ between param groups.
        betas: Adam's coefficients (default (0.9, 0.999)). ``betas[0] = 0`` drops the first
            moment buffer.
        beta3: decay of the estimate's running sums (default None: :math:`\sqrt{\beta_2}`).
        eps: added to the denominator, times d (default 1e-8).
        weight_decay: :math:`\lambda`, per param group (default 0.0).
        decouple: AdamW-style decoupled weight decay (default True) or coupled L2 (False).
        use_bias_correction: Adam's bias correction in the step size (default False).
        safeguard_warmup: leave the lr out of the denominator's sum :math:`s`, which keeps a
            warm-up (small lr) from inflating d (default False; recommended with lr warm-up).
        d0: initial estimate of d (default None: 1e-6, the paper's and the reference's value,
            when every parameter is 32- or 64-bit, and 1e-3 when any parameter of the
            optimizer is 16-bit, bfloat16 or float16). The first updates are about d0 per
            coordinate and d grows only from the distance they travel: they must be
            representable in the parameters' dtype. In bfloat16 (a spacing of :math:`2^{-8}` to
            :math:`2^{-7}` relative to the weight: 0.008 for a weight in [1, 2)) an update of 1e-6 rounds
            away, x never leaves :math:`x_0`, the numerator stays 0 and d never grows (the loss
            stays exactly where it was); 1e-3 moves the weights from the first step. The
            choice is made once, at construction, from the parameters given then, and stored
            as a number in every param group (``group["d0"]``, saved by ``state_dict``); a group
            added later takes group 0's value. A number is used as given (raise it, e.g. to
            1e-5 or 1e-4, when d is slow to grow).
        d_coef: multiplier of the estimate (default 1.0): the preferred way to adjust the
            method; 0.5 to 2.0 usually work.
        growth_rate: cap on the factor by which d may grow in a step, after its first rise
            (default inf; e.g. 1.02 for a warm-up effect).
        slice_p: estimate d on every ``slice_p``-th coordinate of each tensor (default 1: all).
            The two estimation buffers (:math:`s`, :math:`x_0`) then hold only those
            coordinates, dividing their memory by ``slice_p``; the reference suggests ~11.
        foreach: vectorized implementation (None or True) or the per-parameter loop (False).
        fused: compiled single-pass kernels, one call per group of tensors, instead of the
            vectorized chain (default False): about 2x faster on a CPU, at the cost of compiling
            them at the first step (see :mod:`tuneless.optim._fused`); ignores ``foreach``.
            Groups with ``slice_p > 1`` keep the vectorized path.
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does.

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.Prodigy([x])
        >>> for _ in range(3):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> float(opt.param_groups[0]["d"]) > 1e-6    # d has grown from d0
        True

    References:
        K. Mishchenko, A. Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
        Learner", ICML 2024, arXiv:2306.06101. Reference implementation: ``prodigyopt``
        1.1.2 (https://github.com/konstmish/prodigy).

    Deliberate differences from ``prodigyopt`` 1.1.2 (the math is otherwise the same):

    * **Per-group lr.** A group's ``lr`` multiplies the shared d: that group uses
      :math:`\eta_k = d_k\gamma_g c_k` in its step and in its terms of :math:`r` and :math:`s`.
      The reference refuses groups with different lrs (other than 0). A group with lr = 0 does
      not move but, like in ``torch.optim.Adam``, its moments keep following the gradients
      (the reference freezes them and drops the group's :math:`s` from :math:`\|s\|_1`, so d
      jumps when a group's lr reaches 0).
    * **Per-group weight decay and eps**, and ``decouple`` per group; the hyperparameters of
      the shared estimate (betas, beta3, d0, d_coef, growth_rate, use_bias_correction,
      safeguard_warmup) must be the same in every group (an error otherwise, where the
      reference silently reads group 0's).
    * **d0 for 16-bit parameters**: by default (``d0=None``) 1e-3 when any parameter is bfloat16 or
      float16, where the reference's 1e-6 leaves them exactly where they were (every first update
      rounds away, so d never grows); 1e-6, as in the reference, otherwise.
    * ``p.grad`` is never modified (the reference adds the coupled weight decay into it).
    * **No early return**: the reference returns before the step (and before its
      all-reduce, unless it detected FSDP) when :math:`\|s\|_1 = 0`; here every step reaches
      the one global sum, so sharded training cannot hang, and then leaves d unchanged.
    * **d never decreases and never becomes NaN**: an estimate that is not finite (0/0 when
      :math:`\|s\|_1` underflows to 0 with tiny gradients, or a NaN gradient) is ignored, and
      ``growth_rate`` must be at least 1.
    * **Stored moments are divided by d**: the buffers hold :math:`m_k/d_k` and
      :math:`v_k/d_k^2` (rescaled when d changes, including for parameters that got no
      gradient), the same algorithm in units that need no scalar read from the device and
      do not underflow when :math:`d_k^2 g^2` would. The state keys are therefore
      ``grad_avg`` / ``grad_sq_avg`` rather than the reference's ``exp_avg`` / ``exp_avg_sq``.
    * **Zero host syncs** per step (the reference reads 2 scalars per tensor; the step counter
      ``k`` is a 0-d tensor on the device too, which a skipped step does not advance), and sharded
      parameters (FSDP2 DTensors) are handled by the base class; there is no
      ``fsdp_in_use`` argument. Under FSDP2 the estimate uses the same coordinates as in one
      process, and with ``slice_p > 1`` each shard keeps only its own sliced coordinates: the
      two buffers are (shards, width) DTensors, one zero-padded row per shard (so a checkpoint
      of them resumes on the same number of shards).

    Implementation notes. :math:`\langle g, x_0 - x\rangle` is computed through the
    difference :math:`x_0 - x`, as the reference does, and not as
    :math:`\langle g, x_0\rangle - \langle g, x\rangle`: early on :math:`x - x_0` is ~1e-6 of
    :math:`x`, and that cancellation changed d by 4-13% in float32 on a 400k-parameter
    quadratic (0.6% with the difference). On the CPU the vectorized path works on chunks of
    ~262k elements (large tensors cut into flat pieces) so that each chunk's buffers stay in
    cache from one operation to the next, as the reference's per-tensor loop does; the
    difference, :math:`|s|` and the denominator are written into one flat buffer of a chunk's
    size, reused from step to step (not state, never saved). On other devices the whole lists
    go at once: the difference and the denominator are temporaries of the (sliced)
    parameters' size, never alive together.

    .. warning:: d only grows. If training diverges after d has risen, lower ``d_coef`` or
       ``lr``, or use ``growth_rate`` / ``safeguard_warmup``; a larger ``d0`` shortens the
       initial phase where steps are tiny. Coupled weight decay (``decouple=False``) costs one
       gradient-sized temporary per step, as in ``torch.optim.Adam``, since ``p.grad`` is
       left as it is.
    """

    registry_name = "prodigy"
    learning_rate_free = True

    def __init__(self, params: Any, lr: float = 1.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 decouple: bool = True, use_bias_correction: bool = False, safeguard_warmup: bool = False,
                 d0: float | None = None, d_coef: float = 1.0, growth_rate: float = math.inf, slice_p: int = 1,
                 foreach: bool | None = None, fused: bool = False, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        betas = v.check_betas(owner, "betas", betas, recommended=(0.9, 0.999))
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        v.check_optional_range(owner, "beta3", beta3, 0.0, 1.0, inclusive="[)")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas),
                        beta3=math.sqrt(betas[1]) if beta3 is None else float(beta3),
                        eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup,
                        d0=d0, d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p, foreach=foreach,
                        fused=fused)
        _check_hyperparameters(owner, defaults)
        defaults["slice_p"] = int(slice_p)
        super().__init__(params, {**defaults, "skip_nonfinite": skip_nonfinite})
        # d0 = None (in the defaults or in a group): chosen now from the parameters' dtypes. The
        # groups then hold a number; the defaults keep None, so that a group added later takes
        # group 0's value (see add_param_group).
        given = [(i, g["d0"]) for i, g in enumerate(self.param_groups) if g["d0"] is not None]
        for i, value in given:
            if value != given[0][1]:
                _shared_mismatch(owner, "d0", value, i, *given[0])
        d0 = given[0][1] if given else _default_d0(p for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            group["d0"] = d0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values are checked, and the shared ones must match group 0's."""
        super().add_param_group(param_group)
        owner = type(self).__name__
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        if group["beta3"] is None:
            v.check_betas(owner, "betas", group["betas"], recommended=(0.9, 0.999))
            group["beta3"] = math.sqrt(group["betas"][1])
        _check_hyperparameters(owner, group)
        first = self.param_groups[0]
        if group["d0"] is None and first["d0"] is not None:
            group["d0"] = first["d0"]  # a group added after the construction: the d0 chosen then
        for key in _SHARED:
            if key == "d0" and None in (group[key], first[key]):
                continue  # under construction: checked (and chosen) once every group is in
            if group[key] != first[key]:
                _shared_mismatch(owner, key, group[key], len(self.param_groups) - 1, 0, first[key])
        group["slice_p"] = int(group["slice_p"])

    # ------------------------------------------------------------------ state

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The per-parameter buffers, created at the parameter's first gradient."""
        state = self.state[p]
        if "grad_sq_avg" in state:
            return state
        slice_p = group["slice_p"]
        x = local_tensor(p)
        sharded = x is not p  # a DTensor shard (FSDP2): its state must be a DTensor too
        if slice_p > 1 and sharded:
            # s and x0 on this shard's every-slice_p-th coordinates, as a (shards, width) DTensor
            # sharded along dim 0 on the parameter's mesh: one zero-padded row per shard.
            start = _slice_start(p, slice_p)
            sliced = x.detach().reshape(-1)[start::slice_p]
            state["s"] = _sharded_rows(p, slice_p, None)
            state["x0"] = _sharded_rows(p, slice_p, sliced)
        elif slice_p > 1:
            sliced = x.detach().reshape(-1)[::slice_p]
            # s: the weighted sum of gradients whose l1 norm is the denominator of d-hat, and x0:
            # the initial point, both on every slice_p-th coordinate only (1/slice_p of the memory).
            state["s"] = torch.zeros(sliced.shape, dtype=p.dtype, device=x.device)
            state["x0"] = (sliced.clone(memory_format=torch.contiguous_format) if bool(sliced.any())
                           else torch.zeros((), dtype=p.dtype, device=x.device))
        else:
            state["s"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            # (a 0-d zero when the parameter starts at 0, as in the reference; not for shards,
            # where deciding it would need a collective)
            state["x0"] = (p.detach().clone(memory_format=torch.contiguous_format) if sharded or bool(p.any())
                           else torch.zeros((), dtype=p.dtype, device=x.device))
        if group["betas"][0] > 0:
            # First moment divided by d: m_k / d_k.
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Second moment divided by d^2: v_k / d_k^2.
        state["grad_sq_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _estimate_views(p: Tensor, g: Tensor, state: dict[str, Any], slice_p: int) -> tuple[Tensor, ...]:
        """(g, x, s, x0) on the coordinates d is estimated on: all of them, or every
        ``slice_p``-th coordinate of the flattened parameter (views, no copies)."""
        x, s, x0 = local_tensor(p), local_tensor(state["s"]), local_tensor(state["x0"])
        if slice_p == 1 and x.dim() == 0:
            # A 0-d parameter's views are 1-element vectors: a 0-d x0 marks "started at 0" only
            # for the others (the 0-d x0 of a 0-d parameter is its starting value).
            return g.reshape(1), x.reshape(1), s.reshape(1), x0.reshape(1)
        if slice_p == 1:
            return g, x, s, x0
        start = _slice_start(p, slice_p)
        full = x
        g, x = g.reshape(-1)[start::slice_p], x.reshape(-1)[start::slice_p]
        if s.shape == full.shape and s.numel() > x.numel():
            # full-size buffers of a shard (a checkpoint of an earlier version): slice them too
            s, x0 = s.reshape(-1)[start::slice_p], x0.reshape(-1)[start::slice_p]
        elif s.shape != x.shape:  # a shard's row of the (shards, width) layout: its first entries
            n = x.numel()
            s, x0 = s.reshape(-1)[:n], x0.reshape(-1)[:n]
        return g, x, s, x0

    def _shared_scalars(self) -> tuple[dict[str, Tensor], Tensor]:
        """d and the other shared scalars (0-d tensors on the parameters' device), and the step
        counter k (a 0-d int64 tensor there: a skipped step does not count, without a host read)."""
        dtype, device = self._stat_dtype(), self._stat_device()
        first = self.param_groups[0]
        if "d" not in first:
            d0 = first["d0"]
            first.update(d=d0, d_max=d0, d_numerator=0.0, d_hat=0.0, moment_scale=d0, k=0)
        out = {}
        for key in _SCALARS:
            value = first[key]
            if isinstance(value, Tensor):  # also moves scalars loaded from a checkpoint on another device
                out[key] = value.to(device=device, dtype=dtype)
            else:
                out[key] = torch.tensor(float(value), dtype=dtype, device=device)
        k = first["k"]  # a number: the first step, or a checkpoint of an earlier version
        k = k.to(device=device, dtype=torch.int64) if isinstance(k, Tensor) else torch.tensor(
            int(k), dtype=torch.int64, device=device)
        return out, k

    # ------------------------------------------------------------------ the step

    def _update(self, loss: Tensor | None) -> None:
        dtype, device = self._stat_dtype(), self._stat_device()
        scalars, k = self._shared_scalars()
        # A step that is not finite (finite False) computes with zero gradients (zeroed copies, or
        # inside the fused kernel) and keeps everything as it was: the decays of the moments and
        # of s are 1, the step size 0, d and the other shared scalars their old values, k does not
        # count it. None: the step is not checked (skip_nonfinite=False), the operations as ever,
        # or (every group fused) not decided yet: then the estimate's sums decide, below.
        finite = self._step_finite()
        deciding = self._deciding_finite()
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3, d0 = first["beta3"], first["d0"]
        bias_correction: float | Tensor = 1.0
        if first["use_bias_correction"]:  # k is on the device: so is the bias correction (float64 where it can be)
            steps = (k + 1).to(torch.float32 if device.type == "mps" else torch.float64)
            bias_correction = (1 - beta2 ** steps).sqrt() / (1 - beta1 ** steps)
        d = scalars["d"]
        # The moment buffers are stored divided by the d of their last update: re-express them in d.
        moment_ratio = scalars["moment_scale"] / d
        m_coef, v_coef = beta1 * moment_ratio, beta2 * moment_ratio * moment_ratio
        d_ratio = d / d0  # the reference's d/d0 factor, which keeps r and s away from underflow
        s_decay: float | Tensor = beta3
        if finite is not None:
            moment_ratio, m_coef, v_coef = (gate(finite, c, 1.0) for c in (moment_ratio, m_coef, v_coef))
            s_decay = gate(finite, torch.full((), beta3, dtype=dtype, device=device), 1.0)

        # The gradients of each group (plus the coupled weight decay); on a step that is not
        # finite, zeros for the paths that are not fused, made in one call over all the groups
        # (the copies' buffers are kept by position).
        gathered = []
        for group in self.param_groups:
            params, grads = self._params_with_grad(group)
            if params and group["weight_decay"] != 0 and not group["decouple"]:  # p.grad is left as it is
                grads = _coupled_gradients(grads, [local_tensor(p) for p in params], group["weight_decay"],
                                           self._use_foreach(group))
            gathered.append((params, grads))
        if finite is not None:
            plain = [i for i, group in enumerate(self.param_groups) if not self._fused(group)]
            zeroed = iter(self._finite_grads([g for i in plain for g in gathered[i][1]]))
            for i in plain:
                gathered[i] = (gathered[i][0], [next(zeroed) for _ in gathered[i][1]])

        partials, work = [], []
        for group, (params, grads) in zip(self.param_groups, gathered):
            if not deciding:  # (else once the flag is made)
                self._rescale_idle_moments(group, moment_ratio)
            lr = lr_in(group["lr"], dtype)  # a tensor lr in the statistics' dtype: rounded as a number is
            step_size = d * _lr_times(lr, bias_correction, dtype)  # eta_k for this group
            if not params:
                work.append((group, None, step_size, None))
                continue
            states = [self._init_state(p, group) for p in params]
            xs = [local_tensor(p) for p in params]
            buffers = _Buffers(
                xs, grads,
                [local_tensor(st["grad_avg"]) for st in states] if beta1 > 0 else None,
                [local_tensor(st["grad_sq_avg"]) for st in states],
                *zip(*(self._estimate_views(p, g, st, group["slice_p"]) for p, g, st in zip(params, grads, states))),
            )
            s_weight = d_ratio * (d if group["safeguard_warmup"] else step_size)
            first_pass = _multi_tensor_prodigy_estimate if self._use_foreach(group) else _single_tensor_prodigy_estimate
            extra = dict(scratch=self._scratch()) if self._use_foreach(group) else {}
            decay_of_s = s_decay
            if self._fused(group):  # read only: its sums, not finite on such a step, go into gated scalars
                first_pass, extra, decay_of_s = _fused_prodigy_estimate, {}, beta3
            dot, l1 = first_pass(buffers, beta3=decay_of_s, m_coef=m_coef, one_minus_beta1=1 - beta1, v_coef=v_coef,
                                 one_minus_beta2=1 - beta2, s_weight=s_weight, with_numerator=not lr_is_zero(lr),
                                 dtype=dtype, device=device, **extra)
            partials.append(torch.stack([(d_ratio * step_size) * dot, l1]))
            work.append((group, buffers, step_size, s_weight))

        # One reduction per step, always reached (no early return: no hang when sharded).
        local = torch.stack(partials).sum(0) if partials else torch.zeros(2, dtype=dtype, device=device)
        numerator, s_l1 = self._global_sum(local).unbind(0)
        if deciding:
            # Every group fused: the estimate kernels read every gradient, read only, and
            # ||s_new||_1 = sum |beta3 s + w g| (w finite, 0 * inf = NaN) is not finite exactly when
            # some gradient entry is not (or the sum overflows float32, as the scope's own sum
            # would); all-reduced above when sharded. No read of the gradients of its own.
            finite = self._settle_finite(torch.isfinite(s_l1))
            moment_ratio, m_coef, v_coef = (gate(finite, c, 1.0) for c in (moment_ratio, m_coef, v_coef))
            for group in self.param_groups:
                self._rescale_idle_moments(group, moment_ratio)
        r = beta3 * scalars["d_numerator"] + numerator
        positive = s_l1 > 0
        d_hat = first["d_coef"] * r / torch.where(positive, s_l1, torch.ones_like(s_l1))
        # An estimate that is not finite (||s||_1 = 0, NaN gradients) is ignored: d never drops.
        d_hat = torch.where(positive & torch.isfinite(d_hat), d_hat, torch.zeros_like(d_hat))
        d_raised = torch.where(d == d0, torch.maximum(d, d_hat), d)  # the first rise is not capped
        d_max = torch.maximum(scalars["d_max"], d_hat)
        d_next = torch.minimum(d_max, d_raised * first["growth_rate"])
        new = dict(d=d_next, d_max=d_max, d_numerator=r, d_hat=d_hat, moment_scale=d)
        if finite is not None:
            new = {key: gate(finite, value, scalars[key]) for key, value in new.items()}
        d_next = new["d"]

        growth = d_next / d  # d_{k+1} / d_k, for the eps term and the beta1 = 0 step
        finite_flag = finite if finite is not None else torch.ones((), dtype=torch.bool, device=device)
        for group, buffers, step_size, s_weight in work:
            if finite is None:
                self._publish_step_size(group, step_size)
            else:
                old = group.get(STEP_SIZE_KEY)
                old = old.to(step_size) if isinstance(old, Tensor) else 0.0  # nothing applied yet: 0
                self._publish_step_size(group, gate(finite, step_size, old))
                step_size = gate(finite, step_size, 0.0)  # x moves by exactly 0
            decay = group["weight_decay"] if group["decouple"] else 0.0
            if buffers is not None and self._fused(group):  # s, the moments, then the step (lr = 0: no step)
                _fused_prodigy_step(buffers, s_weight=s_weight, beta3=beta3, step_size=step_size,
                                    growth=growth, eps=group["eps"], decay=decay, m_coef=m_coef,
                                    one_minus_beta1=1 - beta1, v_coef=v_coef, one_minus_beta2=1 - beta2,
                                    finite=finite_flag, move=not lr_is_zero(group["lr"]))
                continue
            if lr_is_zero(group["lr"]) or buffers is None:
                continue  # lr = 0: the group does not move (a tensor lr: a step of size 0)
            second_pass = _multi_tensor_prodigy_step if self._use_foreach(group) else _single_tensor_prodigy_step
            extra = dict(scratch=self._scratch()) if self._use_foreach(group) else {}
            second_pass(buffers, step_size=step_size, growth=growth, eps=group["eps"], decay=decay, **extra)

        new["k"] = k + (1 if finite is None else finite)  # a skipped step does not count
        for group in self.param_groups:
            group.update(new)

    def _finite_from_step_sums(self, loss: Tensor | None) -> bool:
        """Every group with parameters fused: the read-only estimate kernels' sums decide (see
        :meth:`_update`), so the check costs no read of the gradients."""
        groups = [group for group in self.param_groups if group["params"]]
        return bool(groups) and all(self._fused(group) for group in groups)

    @staticmethod
    def _fused(group: dict[str, Any]) -> bool:
        """The compiled kernels run when ``fused`` (with ``slice_p = 1``: a sliced estimate is
        strided, and keeps the vectorized path)."""
        return bool(group.get("fused", False)) and group["slice_p"] == 1

    def _rescale_idle_moments(self, group: dict[str, Any], moment_ratio: Tensor) -> None:
        """Keep m and v unchanged for parameters with state but no gradient this step.

        Their buffers are stored divided by d (resp. d^2); when d changes they are re-expressed
        in the new d, so that, as in the reference, a step without gradient leaves m and v as
        they were. (Usually there is no such parameter: frozen ones never get state.)
        """
        for p in group["params"]:
            if p.grad is None and p in self.state and "grad_sq_avg" in self.state[p]:
                state = self.state[p]
                if "grad_avg" in state:
                    m = local_tensor(state["grad_avg"])
                    m.mul_(coefficient(moment_ratio, m))
                u = local_tensor(state["grad_sq_avg"])
                u.mul_(coefficient(moment_ratio * moment_ratio, u))


def _check_hyperparameters(owner: str, h: dict[str, Any]) -> None:
    h["lr"] = v.check_lr(owner, h["lr"], recommended=1.0)
    v.check_betas(owner, "betas", h["betas"], recommended=(0.9, 0.999))
    v.check_range(owner, "beta3", h["beta3"], 0.0, 1.0, inclusive="[)")
    v.check_range(owner, "eps", h["eps"], 0.0, None, inclusive="()", recommended=1e-8)
    v.check_range(owner, "weight_decay", h["weight_decay"], 0.0, None, inclusive="[)", recommended=0.0)
    v.check_bool(owner, "decouple", h["decouple"])
    v.check_bool(owner, "use_bias_correction", h["use_bias_correction"])
    v.check_bool(owner, "safeguard_warmup", h["safeguard_warmup"])
    v.check_optional_range(owner, "d0", h["d0"], 0.0, None, inclusive="()", recommended=1e-6)
    v.check_range(owner, "d_coef", h["d_coef"], 0.0, None, inclusive="()", recommended=1.0)
    rate = h["growth_rate"]
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 1):  # NaN fails too
        v.fail(owner, "growth_rate", rate, "1 <= growth_rate (inf: no limit)", math.inf)
    v.check_range(owner, "slice_p", h["slice_p"], 1, None, inclusive="[)", recommended=1, integer=True)
    v.check_bool(owner, "fused", h.get("fused", False))


def _shared_mismatch(owner: str, key: str, value: Any, index: int, first_index: int, first: Any) -> None:
    raise InvalidArgumentError(
        f"{owner}: {key} = {value!r} in param group {index} differs from {first!r} in group {first_index}; the "
        f"estimate of d is shared, so {key} must be the same in every group")


#: d0 = None: the paper's start, and the one for 16-bit parameters, whose first updates (~d0 per
#: coordinate) must not round away (bfloat16's spacing is 2^-8 relative to the weight).
_D0_DEFAULT, _D0_LOW_PRECISION = 1e-6, 1e-3
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _default_d0(params: Any) -> float:
    """d0 for ``d0=None``: 1e-3 when any parameter is 16-bit (bfloat16/float16), else 1e-6."""
    return _D0_LOW_PRECISION if any(p.dtype in _LOW_PRECISION for p in params) else _D0_DEFAULT


# ----------------------------------------------------------------------------- helpers


def _lr_times(lr: Any, bias_correction: float | Tensor, dtype: torch.dtype) -> Any:
    """``lr * bias_correction``, rounded as with numbers: a number (both numbers), else a 0-d
    tensor in ``dtype`` (a float64 bias correction times a number lr, then rounded: what
    ``d * (lr * c)`` does with a float c; a tensor lr times the correction rounded to its dtype)."""
    if not isinstance(bias_correction, Tensor):
        return lr * bias_correction
    if isinstance(lr, Tensor):
        return lr * bias_correction.to(lr.dtype)
    return (lr * bias_correction).to(dtype)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> for one tensor pair, with the kernel of :func:`~tuneless.optim._batched.total_dot`."""
    return torch.mm(a.reshape(1, -1), b.reshape(-1, 1)).reshape(())


def _slice_start(p: Tensor, slice_p: int) -> int:
    """Where the every-``slice_p``-th pattern of the flattened parameter starts in this process's part.

    0 for a plain tensor. For a DTensor shard along dim 0 (FSDP2), the offset that keeps the
    pattern the one of the whole parameter, so that the estimate equals the one-process one.
    """
    placements = getattr(p, "placements", None)
    if placements is None:
        return 0
    if any(pl.is_shard() and getattr(pl, "dim", 0) != 0 for pl in placements):  # pragma: no cover - untested
        raise NotImplementedError("Prodigy: slice_p > 1 needs parameters sharded along dimension 0 (as FSDP2 does)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    return (-(offset[0] if offset else 0) * math.prod(p.shape[1:])) % slice_p


def _shard_layout(p: Tensor) -> tuple[int, int]:
    """(the mesh dimension p's dim 0 is sharded over, the number of shards along it)."""
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if len(dims) != 1 or getattr(p.placements[dims[0]], "dim", 0) != 0:  # pragma: no cover - untested
        raise NotImplementedError("Prodigy: slice_p > 1 needs parameters sharded along dimension 0 over one "
                                  f"mesh dimension (as FSDP2 and HSDP do); got placements {p.placements}")
    return dims[0], p.device_mesh.size(dims[0])


def _sliced_width(p: Tensor, slice_p: int) -> int:
    """The most every-``slice_p``-th coordinates any shard of ``p`` holds (shards as torch.chunk cuts
    dim 0, FSDP2's layout), computed from the global shape alone: the same on every rank."""
    _, shards = _shard_layout(p)
    rows, inner = p.shape[0], math.prod(p.shape[1:])
    per_shard = -(-rows // shards)  # ceil
    width = 0
    for i in range(shards):
        first, last = min(i * per_shard, rows), min((i + 1) * per_shard, rows)
        offset, count = first * inner, (last - first) * inner
        start = (-offset) % slice_p
        width = max(width, -(-(count - start) // slice_p) if count > start else 0)
    return max(width, 1)


def _sharded_rows(p: Tensor, slice_p: int, values: Tensor | None) -> Tensor:
    """A (shards, width) DTensor on ``p``'s mesh, sharded along dim 0 where ``p`` is, replicated
    elsewhere; this rank's row holds ``values`` (zeros when None), zero-padded to the width.

    Every shard has the same (padded) row, so the layout is an even DTensor that
    ``torch.distributed.checkpoint`` saves and loads like any other; resuming needs the same
    number of shards.
    """
    from torch.distributed.tensor import DTensor

    mesh_dim, shards = _shard_layout(p)
    width = _sliced_width(p, slice_p)
    x = local_tensor(p)
    row = torch.zeros((1, width), dtype=p.dtype, device=x.device)
    if values is not None:
        row[0, : values.numel()].copy_(values)
    return DTensor.from_local(row, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size((shards, width)), stride=(width, 1))


class _Buffers(NamedTuple):
    """The tensors of a step, parallel lists over the parameters of a group that have a gradient."""

    x: list[Tensor]                   # parameters (local parts)
    g: list[Tensor]                   # gradients (plus the coupled weight decay)
    m: list[Tensor] | None            # first moments / d, None when beta1 = 0
    u: list[Tensor]                   # second moments / d^2
    g_est: tuple[Tensor, ...]         # g, x, s and x0 on the estimate's coordinates (views);
    x_est: tuple[Tensor, ...]         # x0 is a 0-d zero for a parameter that started at 0
    s_est: tuple[Tensor, ...]
    x0_est: tuple[Tensor, ...]

    def chunks(self, limit: int) -> list[_Buffers]:
        """On the CPU, these lists cut into chunks of about ``limit`` elements, large contiguous
        tensors split into flat pieces, so that a chunk's buffers stay in cache from one
        foreach op to the next (the per-tensor loop of the reference has that locality, foreach
        ops over a whole model do not). On other devices, one chunk: the whole lists."""
        if not self.x or not cpu_paths(self.x[0].device):
            return [self]
        out: list[_Buffers] = []
        first, size = 0, 0  # the chunk of whole tensors being gathered: [first, i)
        for i, x in enumerate(self.x):
            n = x.numel()
            if n > limit and self._splittable(i, n):
                if i > first:
                    out.append(self._take(first, i))
                out.extend(self._pieces(i, n, limit))
                first, size = i + 1, 0
                continue
            if size + n > limit and i > first:
                out.append(self._take(first, i))
                first, size = i, 0
            size += n
        if len(self.x) > first:
            out.append(self._take(first, len(self.x)))
        return out

    def _take(self, start: int, stop: int) -> _Buffers:
        return _Buffers(*(None if f is None else list(f[start:stop]) for f in self))

    def _splittable(self, i: int, n: int) -> bool:
        """Whether tensor ``i`` can be cut into flat pieces: its full-size buffers contiguous, and
        its estimate tensors either those same tensors or every p-th coordinate from the first."""
        full = [f[i] for f in self[:4] if f is not None]
        if not all(t.numel() == n and t.is_contiguous() for t in full):
            return False
        g, g_est = self.g[i], self.g_est[i]
        if g_est.numel() == n:  # the estimate uses every coordinate
            return all(f[i].dim() == 0 or (f[i].numel() == n and f[i].is_contiguous()) for f in self[4:])
        step = g_est.stride(0) if g_est.dim() == 1 else 0
        m = g_est.numel()
        return (step > 1 and (m - 1) * step < n <= m * step and g_est.storage_offset() == g.storage_offset()
                and all(f[i].dim() == 0 or (f[i].dim() == 1 and f[i].numel() == m) for f in self[4:]))

    def _pieces(self, i: int, n: int, limit: int) -> list[_Buffers]:
        """Tensor ``i`` cut into flat pieces of about ``limit`` coordinates (a multiple of the
        slice step, so that each piece's estimate coordinates are a contiguous range)."""
        step = self.g_est[i].stride(0) if self.g_est[i].numel() != n else 1
        size = max(step, limit // step * step)
        full = [None if f is None else f[i].view(-1) for f in self[:4]]
        est = [f[i] if step > 1 else (f[i] if f[i].dim() == 0 else f[i].view(-1)) for f in self[4:]]
        pieces = []
        for a in range(0, n, size):
            b = min(a + size, n)
            j0, j1 = a // step, -(-b // step)
            pieces.append(_Buffers(*([None if t is None else [t[a:b]] for t in full]
                                     + [[t if t.dim() == 0 else t[j0:j1]] for t in est])))
        return pieces

    def by_dtype(self) -> list[_Buffers]:
        """The same lists split by parameter dtype (a foreach op needs one dtype)."""
        dtypes = dict.fromkeys(t.dtype for t in self.x)  # in order of appearance: a deterministic order of sums
        if len(dtypes) <= 1:
            return [self]
        out = []
        for dt in dtypes:
            keep = [i for i, t in enumerate(self.x) if t.dtype == dt]
            out.append(_Buffers(*(None if lst is None else [lst[i] for i in keep] for lst in self)))
        return out


def _coupled_gradients(grads: list[Tensor], xs: list[Tensor], wd: float, foreach: bool) -> list[Tensor]:
    """g + wd * x, in new tensors (p.grad is never modified)."""
    if foreach:
        return list(torch._foreach_add(grads, xs, alpha=wd))
    return [g + wd * x for g, x in zip(grads, xs)]


# ----------------------------------------------------------------------------- per parameter (the truth)


def _single_tensor_prodigy_estimate(b: _Buffers, *, beta3: float | Tensor, m_coef: Tensor, one_minus_beta1: float,
                                    v_coef: Tensor, one_minus_beta2: float, s_weight: Tensor,
                                    with_numerator: bool, dtype: torch.dtype,
                                    device: torch.device) -> tuple[Tensor, Tensor]:
    """Update the moments and s of each tensor; return sum <g, x0 - x> (before the step) and sum ||s||_1.

    The moments are stored divided by d: with ``m_coef`` = beta1 d_prev/d and ``v_coef`` =
    beta2 (d_prev/d)^2, m/d <- m_coef m/d + (1 - beta1) g and v/d^2 <- v_coef v/d^2 + (1 - beta2) g^2.
    On the estimate's coordinates, s <- beta3 s + s_weight g. (``beta3`` is a 0-d tensor on a
    checked step: 1 when the step is not finite, where the gradients are zeros.)
    """
    dots, l1s = [], []
    for i, (g, u) in enumerate(zip(b.g, b.u)):
        g_est, x_est, s, x0 = b.g_est[i], b.x_est[i], b.s_est[i], b.x0_est[i]
        if with_numerator:
            # <g, x0 - x> through the difference (exact while x is near x0), not <g, x0> - <g, x>:
            # that cancellation loses the early estimates to rounding (x0 = 0 needs no difference).
            dots.append(-_dot(g_est, x_est) if x0.dim() == 0 else _dot(g_est, x0 - x_est))
        if b.m is not None:
            b.m[i].mul_(coefficient(m_coef, u)).add_(g, alpha=one_minus_beta1)
        u.mul_(coefficient(v_coef, u)).addcmul_(g, g, value=one_minus_beta2)
        s_decay = beta3 if not isinstance(beta3, Tensor) else coefficient(beta3, s)
        s.mul_(s_decay).addcmul_(g_est, coefficient(s_weight, s))
        l1s.append(s.abs().sum())
    return _sum_stacked(dots, dtype, device), _sum_stacked(l1s, dtype, device)


def _single_tensor_prodigy_step(b: _Buffers, *, step_size: Tensor, growth: Tensor, eps: float, decay: float) -> None:
    """x <- x - eta lambda x - eta m / (sqrt(v) + d_{k+1} eps), written with the stored m/d, v/d^2.

    With m = d_k (m/d) and v = d_k^2 (v/d^2): eta m / (sqrt(v) + d_{k+1} eps)
    = eta (m/d) / (sqrt(v/d^2) + growth eps), where growth = d_{k+1} / d_k. Without a first
    moment (beta1 = 0) the reference steps along d_{k+1} g: eta growth g / (sqrt(v/d^2) + growth eps).
    """
    for i, (x, g, u) in enumerate(zip(b.x, b.g, b.u)):
        if decay != 0:
            x.addcmul_(x, coefficient(-decay * step_size, x))
        denom = u.sqrt().add_(coefficient(growth * eps, u))
        if b.m is not None:
            direction, scale = b.m[i], step_size
        else:
            direction, scale = g, step_size * growth
        x.addcdiv_(direction, denom.div_(coefficient(-scale, denom)))


# ----------------------------------------------------------------------------- vectorized


def _multi_tensor_prodigy_estimate(buffers: _Buffers, *, beta3: float | Tensor, m_coef: Tensor, one_minus_beta1: float,
                                   v_coef: Tensor, one_minus_beta2: float, s_weight: Tensor,
                                   with_numerator: bool, dtype: torch.dtype, device: torch.device,
                                   scratch: Scratch) -> tuple[Tensor, Tensor]:
    """:func:`_single_tensor_prodigy_estimate` over all tensors at once (foreach ops, batched sums)."""
    dots, l1s = [], []
    for b in (c for bd in buffers.by_dtype() for c in bd.chunks(_CPU_CHUNK)):
        like = b.u[0]
        flat = scratch.views(b.g_est) if cpu_paths(like.device) else None
        if with_numerator:
            dots.append(_chunk_numerator(b, flat, dtype, device))
        if b.m is not None:
            torch._foreach_mul_(b.m, coefficient(m_coef, like))
            torch._foreach_add_(b.m, b.g, alpha=one_minus_beta1)
        torch._foreach_mul_(b.u, coefficient(v_coef, like))
        torch._foreach_addcmul_(b.u, b.g, b.g, value=one_minus_beta2)
        s_est = list(b.s_est)
        torch._foreach_mul_(s_est, beta3 if not isinstance(beta3, Tensor) else coefficient(beta3, like))
        add_scaled_(s_est, b.g_est, coefficient(s_weight, like))
        if flat is None:
            l1s.append(total_abs_sum(s_est, dtype, device))
        else:  # |s| summed in one pass over a flat copy (in cache)
            torch._foreach_copy_(flat[1], s_est)
            l1s.append(flat[0].abs_().sum(dtype=dtype))
    return _sum_stacked(dots, dtype, device), _sum_stacked(l1s, dtype, device)


def _chunk_numerator(b: _Buffers, flat: tuple[Tensor, list[Tensor]] | None, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """sum <g, x0 - x> over a chunk, through the difference x0 - x (see the per-parameter path).

    On the CPU the differences and products are written into one flat scratch buffer (in
    cache) and summed at once; elsewhere the difference is one temporary and the dots go
    through :func:`~tuneless.optim._batched.total_dot`. A parameter that started at 0 (a 0-d
    x0) contributes -<g, x>.
    """
    full = [i for i, x0 in enumerate(b.x0_est) if x0.dim() > 0]
    zero = [i for i, x0 in enumerate(b.x0_est) if x0.dim() == 0]
    g_full, g_zero = [b.g_est[i] for i in full], [b.g_est[i] for i in zero]
    x_full, x_zero = [b.x_est[i] for i in full], [b.x_est[i] for i in zero]
    if flat is None:
        dot = torch.zeros((), dtype=dtype, device=device)
        if full:
            diffs = torch._foreach_sub([b.x0_est[i] for i in full], x_full)
            dot = dot + total_dot(g_full, diffs, dtype, device)
            del diffs
        if zero:
            dot = dot - total_dot(g_zero, x_zero, dtype, device)
        return dot
    buffer, views = flat
    v_full, v_zero = [views[i] for i in full], [views[i] for i in zero]
    if full:
        torch._foreach_copy_(v_full, [b.x0_est[i] for i in full])
        torch._foreach_sub_(v_full, x_full)
    if zero:
        torch._foreach_copy_(v_zero, x_zero)
        torch._foreach_neg_(v_zero)
    torch._foreach_mul_(views, b.g_est)
    return buffer.sum(dtype=dtype)


def _multi_tensor_prodigy_step(buffers: _Buffers, *, step_size: Tensor, growth: Tensor, eps: float,
                               decay: float, scratch: Scratch) -> None:
    """:func:`_single_tensor_prodigy_step` over all tensors at once. The denominator is the one
    temporary: on the CPU written into the reused flat buffer, elsewhere a new tensor list."""
    for b in (c for bd in buffers.by_dtype() for c in bd.chunks(_CPU_CHUNK)):
        like = b.x[0]
        if decay != 0:
            add_scaled_(b.x, b.x, coefficient(-decay * step_size, like))
        if cpu_paths(like.device):
            denom = scratch.views(b.u)[1]
            torch._foreach_copy_(denom, b.u)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(b.u)
        torch._foreach_add_(denom, coefficient(growth * eps, like), alpha=1.0)  # alpha=: the Tensor overload (a 0-d
        # tensor given to the Scalar one is read on the host: a device sync)
        if b.m is not None:
            directions, scale = b.m, step_size
        else:
            directions, scale = b.g, step_size * growth
        torch._foreach_div_(denom, coefficient(-scale, like))
        torch._foreach_addcdiv_(b.x, directions, denom)


# ----------------------------------------------------------------------------- fused (compiled)


def _prodigy_estimate_kernel(*args: Any) -> tuple[Tensor, Tensor]:
    """The sums of :func:`_single_tensor_prodigy_estimate` for one tensor (``slice_p = 1``),
    compiled by :class:`~tuneless.optim._fused.FusedKernel`: <g, x0 - x> and the l1 norm of the
    new s, which is *not* stored here (a kernel that reduces and stores is split by Inductor into
    two loops that both read the buffers). The tensors are x, g, s, [x0] (x0 unless the
    parameter started at 0), then the scalars. Read only: 16 bytes per parameter. All-zero
    tensors add 0 to both sums (the padding is harmless)."""
    *tensors, s_weight, beta3, with_numerator, has_x0, sum_dtype = args
    x, g, s = tensors[0], tensors[1], tensors[2]
    x0 = tensors[3] if has_x0 else None
    dot = torch.zeros((), dtype=sum_dtype, device=x.device)
    if with_numerator:
        dot = (g * (x0 - x)).sum(dtype=sum_dtype) if x0 is not None else -(g * x).sum(dtype=sum_dtype)
    return dot, torch.addcmul(s * beta3, g, s_weight).abs().sum(dtype=sum_dtype)


def _prodigy_step_kernel(*args: Any) -> tuple[()]:
    """The updates of :func:`_single_tensor_prodigy_estimate` (s and the moments, which do not
    depend on the new d) and :func:`_single_tensor_prodigy_step` for one tensor, compiled, in one
    pass: the tensors are x, g, s, [m], v (m without ``beta1 = 0``; the step then goes along g).
    s gets the same value the estimate kernel summed. With ``move`` False (a group with
    lr = 0) x does not change. All-zero tensors stay 0.

    ``finite`` False (a step whose gradients are not all finite): the gradient is taken as 0 and s
    keeps its value; the caller gives m_coef = v_coef = 1 and step_size = 0, so that nothing changes."""
    (*tensors, s_weight, beta3, m_coef, one_minus_beta1, v_coef, one_minus_beta2, step_size, growth, eps, decay,
     finite, has_m, move) = args
    x, g, s = tensors[0], tensors[1], tensors[2]
    m = tensors[3] if has_m else None
    u = tensors[3 + has_m]
    g = torch.where(finite, g, 0.0)
    s.copy_(torch.where(finite, torch.addcmul(s * beta3, g, s_weight), s))
    if m is not None:
        m.mul_(m_coef).add_(g, alpha=one_minus_beta1)
    u.mul_(v_coef).addcmul_(g, g, value=one_minus_beta2)
    if not move:
        return ()
    if decay != 0:
        x.addcmul_(x, -decay * step_size)
    denom = u.sqrt() + growth * eps
    direction, scale = (m, step_size) if m is not None else (g, step_size * growth)
    x.addcdiv_(direction, denom / (-scale))
    return ()


_ESTIMATE_KERNELS = {has_x0: FusedKernel(_prodigy_estimate_kernel, num_tensors=3 + has_x0, num_sums=2)
                     for has_x0 in (True, False)}
_STEP_KERNELS = {has_m: FusedKernel(_prodigy_step_kernel, num_tensors=4 + has_m, num_sums=0)
                 for has_m in (True, False)}


def _fused_prodigy_estimate(b: _Buffers, *, beta3: float, m_coef: Tensor, one_minus_beta1: float, v_coef: Tensor,
                            one_minus_beta2: float, s_weight: Tensor, with_numerator: bool, dtype: torch.dtype,
                            device: torch.device) -> tuple[Tensor, Tensor]:
    """The two sums of the estimate as compiled read-only kernels (``fused=True``): one kernel for
    the parameters that started at 0 (a 0-d x0) and one for the others. s and the moments are
    updated by :func:`_fused_prodigy_step`."""
    dot = torch.zeros((), dtype=dtype, device=device)
    l1 = torch.zeros((), dtype=dtype, device=device)
    if not b.x:
        return dot, l1
    cd = coefficient_dtype(b.u[0])
    for has_x0 in (True, False):
        rows = [i for i, x0 in enumerate(b.x0_est) if (x0.dim() > 0) == has_x0]
        if not rows:
            continue
        lists = [[b.x[i] for i in rows], [b.g[i] for i in rows], [b.s_est[i] for i in rows]]
        if has_x0:
            lists.append([b.x0_est[i] for i in rows])
        d_part, l_part = _ESTIMATE_KERNELS[has_x0](lists, (s_weight.to(cd), beta3, with_numerator, has_x0, dtype),
                                                    sum_dtype=dtype, device=device)
        dot, l1 = dot + d_part, l1 + l_part
    return dot, l1


def _fused_prodigy_step(b: _Buffers, *, s_weight: Tensor, beta3: float, step_size: Tensor, growth: Tensor, eps: float,
                        decay: float, m_coef: Tensor, one_minus_beta1: float, v_coef: Tensor, one_minus_beta2: float,
                        finite: Tensor, move: bool) -> None:
    """s, the moments and the step as one compiled kernel per group of tensors (``fused=True``)."""
    if not b.x:
        return
    cd = coefficient_dtype(b.u[0])
    has_m = b.m is not None
    lists = [b.x, b.g, list(b.s_est), b.m, b.u] if has_m else [b.x, b.g, list(b.s_est), b.u]
    _STEP_KERNELS[has_m](lists, (s_weight.to(cd), beta3, m_coef.to(cd), one_minus_beta1, v_coef.to(cd),
                                 one_minus_beta2, step_size.to(cd), growth.to(cd), eps, decay, finite, has_m, move),
                         sum_dtype=step_size.dtype, device=step_size.device)
