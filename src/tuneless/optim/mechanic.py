r"""Mechanic: a learned scale for the updates of any optimizer.

Paper: A. Cutkosky, A. Defazio, H. Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023,
arXiv:2306.00144 (Algorithm 1).

Reference implementation matched: ``mechanic-pytorch`` 0.0.1 (``mechanic_pytorch.mechanize``),
with its defaults (``s_decay=0.01``, ``betas=(0.9, 0.99, ..., 0.999999)``, ``s_init=1e-8``,
``eps=1e-8``). With ``store_delta=True`` and ``s_decay=0`` it computes what this class
computes: ``tests/test_parity_mechanic.py`` checks the iterates to relative 1e-10 over 200
steps in float64, over ``torch.optim.SGD`` and ``torch.optim.Adam``, with two param groups.

Mechanic runs the base optimizer as it is, reads the update :math:`u_t` it made, adds it to the
sum :math:`\Delta` of all updates, and places the parameters at :math:`x_{ref} + s\,\Delta`,
where the scale :math:`s` is learned by a parameter-free coin-betting tuner from
:math:`h_t = \langle \Delta_t, g_t\rangle` (how the loss changes along :math:`\Delta`).

What differs from the reference, deliberately:

* **A wrapper instance**, ``Mechanic(torch.optim.SGD(params, lr=1.0))``, not a class factory;
  it is a ``torch.optim.Optimizer`` (a :class:`~tuneless.optim.base.TunelessOptimizer`) whose
  ``param_groups`` *are* the base optimizer's (schedulers and ``zero_grad`` reach the base).
  It can also be built from parameters, with the base named by a spec string
  (``Mechanic(params, base="sgd:lr=1.0")``; the default base is ``"adam:lr=1.0"``), which is
  how ``tuneless.create("mechanic", params)`` builds it.
* **Resumable**: the per-parameter state (:math:`\Delta`) lives in ``self.state`` keyed by
  parameter and the tuner's scalars in ``param_groups``, so ``state_dict()`` /
  ``load_state_dict()`` resume bit-exactly, also through ``torch.distributed.checkpoint``:
  ``state_dict()`` has the standard layout, each parameter's entry holding the base's state
  and Mechanic's ``mechanic_delta``. The reference keys its state by ``Parameter`` objects
  inside a string entry, which ``state_dict`` cannot map, and fails with ``KeyError`` after
  loading.
* **Grad mode is restored** even when the base step raises (the reference turns it off
  globally and leaves it off).
* :math:`\Delta` **is stored, exactly, and** :math:`x_{ref}` **is not**: it is implied by
  :math:`x_t = x_{ref} + S_t\Delta_t`. A step copies :math:`x_t` before the base step moves the
  parameters, reads the base's update :math:`u_t` as the difference between where the base put
  the parameters and that copy, and places the parameters at
  :math:`(x_t - S_t\Delta_t) + S_{t+1}\Delta_{t+1}`. What persists is one buffer per
  parameter, as in the reference's default (``store_delta=False``), which instead stores
  :math:`x_{ref}` and recomputes :math:`\Delta` as :math:`(x - x_{ref}) / (S + \epsilon)`:
  that loses a fraction :math:`\epsilon/(S+\epsilon)` of it each step while :math:`S` is
  small and, in float32, most of its precision. Its exact mode (``store_delta=True``) keeps two
  buffers. The copy's buffer is allocated per step and freed (the default on a GPU), or kept
  in the state and reused (the default on a CPU, where allocating it costs page faults each
  step; it is not saved in ``state_dict``): see ``reuse_buffer``. Peak during a step: two
  buffers over the base's (the reference: four, as it also copies the gradients and makes a
  temporary; measured in ``tests/test_parity_mechanic.py``), and, with the non-finite skip
  over a torch base, a copy of that base's state (not of the parameters: the copy of
  :math:`x_t` serves to put them back). The
  price: the parameters accumulate one rounding per step, as under any optimizer, instead of
  being recomputed from a fixed :math:`x_{ref}`.
* **No host synchronization** in a step (the reference reads the scale with Python's ``max``
  and ``.item()``), and two passes over the parameters: before the base step, one reads the
  four statistics of :math:`h_t` (one batched reduction) and copies :math:`x_t`; after it,
  one updates :math:`\Delta` and :math:`x`.
* **The** :math:`s_{decay}` **term is taken at** :math:`x_t`, as the paper writes it (the
  reference takes its norm and direction at the base's proposal :math:`x_t + u_t`). Every
  statistic of :math:`h_t` is then read before the base step, in the pass that copies
  :math:`x_t`. With ``s_decay=0`` the two compute the same thing
  (``tests/test_parity_mechanic.py``); with the default 0.01 this class is checked against the
  paper's Algorithm 1 written out in float64.
* ``lr = 0`` **freezes a group** (a Python number 0, as lr schedulers set): its parameters do
  not move although :math:`S` keeps changing; so do parameters that have no gradient at a
  step. Their implied reference point absorbs the change of scale,
  :math:`x_{ref} = x - S\Delta`, so that they resume where they are. (In the reference such
  parameters stay put but then jump to the new scale.) Likewise a change made to the
  parameters between two steps (loading weights, say) moves the reference point with them
  instead of being read as part of the next base update.
* A non-finite :math:`h_t` (a NaN or infinite gradient) is taken as 0 by the tuner, so that
  one bad batch does not poison :math:`S` for good (with ``skip_nonfinite=False``; by default
  such a step is skipped altogether).
* **A non-finite step is skipped** (``skip_nonfinite=True``, the default, as in every tuneless
  class): when a gradient, or the loss of a loss-based base, is NaN or infinite, the step leaves
  the parameters, :math:`\Delta`, the tuner's scalars, its counter, the published step size and
  the base optimizer's state exactly as they were (one device flag, no host sync). A tuneless
  base steps under Mechanic's flag and gates itself; a base that tuneless does not own
  (``torch.optim.*``) steps as usual, then its state is put back from a copy taken before its
  step (:class:`~tuneless.optim.base.OptimizerSnapshot`: a copy of the base's state tensors
  and a select per step, only while ``skip_nonfinite`` is on), and Mechanic's update writes
  :math:`x_t` back from the copy it takes anyway (so the parameters are not copied twice).
  Mechanic's setting decides for a tuneless base too, whatever the base's own. Not undone: a
  torch base's state created by a skipped *first* step (``torch.optim.Adam``'s moments made
  from the NaN gradient), which ``OptimizerSnapshot`` keeps.

Kept from the reference although the paper differs (so that parity holds): :math:`\epsilon`
is added to the norm :math:`\|x_t\|` of the ``s_decay`` term, and the running maximum of
:math:`|h|` starts at 1e-6 (the paper: 0).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .. import _validate as v
from ._batched import (Scratch, cpu_paths, add_scaled_, cache_blocks, chunked_dots, coefficient_dtype, flat_dot,
                       flat_sum_of_squares, total_dot_loop, total_dots, total_sum_of_squares_loop)
from ._fused import FusedKernel
from .base import (SKIPPED_STEPS_KEY, STEP_SIZE_KEY, OptimizerSnapshot, TunelessOptimizer, gate, known_finite, local_tensor,
                   lr_moves)

__all__ = ["Mechanic", "DEFAULT_BASE"]

#: The base optimizer built when Mechanic is given parameters rather than an optimizer.
DEFAULT_BASE = "adam:lr=1.0"

#: Initial running maximum of |h| (``max_product`` in mechanic-pytorch; the paper uses 0).
_INITIAL_MAX_PRODUCT = 1e-6

_DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)

# Keys of the tuner's state in every param group (identical copies, replaced together). The
# prefix keeps them apart from the base optimizer's own keys (Adam has "betas" and "eps").
_S, _M, _V, _R, _STEP = "mechanic_s", "mechanic_max_product", "mechanic_sum_sq", "mechanic_reward", "mechanic_step"
# Keys of the per-parameter state; with the prefix, they share a parameter's entry of state_dict
# with the base optimizer's own state (one standard layout, as torch.distributed.checkpoint needs).
_PREFIX = "mechanic_"
_DELTA = "mechanic_delta"
# The reused buffer x_t is copied into (``reuse_buffer``): state, but not in ``state_dict``.
_COPY = "mechanic_copy"
# Written by tuneless before 0.1.0 was released (x_ref, now implied by x - S Delta); dropped on load.
_LEGACY_REF = "mechanic_x_ref"


class Mechanic(TunelessOptimizer):
    r"""Mechanic (Cutkosky, Defazio & Mehta, 2023): learns the scale of any optimizer's updates.

    With the base optimizer's update :math:`u_t` at step :math:`t` (made with its own ``lr``,
    typically 1.0), :math:`n` values :math:`\beta_j`, :math:`\Delta_1 = 0`,
    :math:`s_1 = r_0 = v_0 = 0`, :math:`m_0 = 10^{-6}`, and :math:`S_t = \sum_j s_{t,j}`:

    .. math::
        \Delta_{t+1} &= \Delta_t + u_t \\
        h_t &= \Big\langle \Delta_t,\ g_t + \lambda\, S_t\,
              \frac{\|g_t\|}{\|x_t\| + \epsilon}\,x_t \Big\rangle \\
        m_{t,j} &= \max(\beta_j m_{t-1,j},\ |h_t|), \qquad v_{t,j} = \beta_j^2 v_{t-1,j} + h_t^2 \\
        r_{t,j} &= \max(0,\ \beta_j r_{t-1,j} - s_{t,j} h_t), \qquad
        s_{t+1,j} = \frac{s_{init}\, m_{t,j} / n + r_{t,j}}{\sqrt{v_{t,j}} + \epsilon} \\
        x_{t+1} &= x_{ref} + S_{t+1}\,\Delta_{t+1}

    where :math:`x_{ref}` is the starting point and norms and dot products run over every
    parameter of every group.

    Args:
        params: the base optimizer (a ``torch.optim.Optimizer``, torch's or tuneless), or the
            parameters / param groups from which ``base`` builds one.
        base: spec string of the base optimizer when ``params`` are parameters (default
            ``"adam:lr=1.0"``; e.g. ``"sgd:lr=1.0"``); must be None when an optimizer is given.
        s_decay: :math:`\lambda`, the weight-decay-like term of :math:`h` (default 0.01).
        betas: the :math:`\beta_j` of the tuners whose scales are summed (default
            ``(0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)``).
        s_init: initial scale (default 1e-8; optax uses 1e-6). :math:`s` grows geometrically
            from it, so it matters little.
        eps: added to denominators (default 1e-8).
        reuse_buffer: where the copy of :math:`x_t` goes. True: a buffer per parameter kept in
            ``self.state`` and reused at every step (held between steps; not written to
            ``state_dict``). False: buffers allocated at each step and freed when it ends. None
            (default): reused on a CPU, where glibc's allocator hands a freed model-sized buffer
            back to the kernel and the next step pays page faults for it (about doubling
            Mechanic's own time here); allocated per step elsewhere, where torch's caching
            allocator makes that free and the memory serves the activations between steps. The
            results are the same either way. (On a CPU, an allocator that keeps freed memory in
            the process, such as jemalloc or tcmalloc, makes the per-step buffer cheap too.)
        foreach: vectorized implementation of Mechanic's own passes (None or True) or the
            per-parameter loop (False); the base optimizer keeps its own setting.
        fused: Mechanic's own two passes (the statistics with the copy of :math:`x_t`, then the
            update of :math:`\Delta` and :math:`x`) compiled, one call per group of tensors (default
            False; see :mod:`tuneless.optim._fused`: compiles at the first step); ignores
            ``foreach``. The base optimizer keeps its own setting (e.g. ``torch.optim.Adam(...,
            fused=True)``).
        skip_nonfinite: a step whose gradients are not all finite leaves the parameters and the
            state as they were (default True; see :class:`~tuneless.optim.base.TunelessOptimizer`);
            False lets the NaN through, as torch.optim does. Mechanic's setting decides for the
            base optimizer too: a tuneless base skips (or not) with Mechanic, whatever its own
            ``skip_nonfinite``; a torch base's state is put back from a copy taken before its
            step (memory and time: a copy of its state per step).

    Example:
        >>> import torch, tuneless
        >>> x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
        >>> opt = tuneless.Mechanic(torch.optim.SGD([x], lr=1.0))
        >>> for _ in range(100):
        ...     opt.zero_grad(); loss = (x ** 2).sum(); loss.backward(); _ = opt.step()
        >>> float((x.detach() ** 2).sum()) < 25.0
        True

    References:
        A. Cutkosky, A. Defazio, H. Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023,
        arXiv:2306.00144.

    .. warning:: Load a checkpoint through :meth:`load_state_dict` of the Mechanic (not of its
       base), together with the model: the reference point is implied by the parameters and
       :math:`\Delta` together. A change made to the parameters between two steps moves the
       reference point with them. Bases that keep their own averaged point (Schedule-Free)
       are not supported, nor bases whose ``step`` must re-evaluate a closure several times
       and then leaves the parameters elsewhere than their last evaluation (LBFGS). A group
       ``lr`` given as a tensor is not inspected (that would synchronize), so a tensor ``lr``
       of 0 does not freeze its group. Memory: one buffer per parameter on top of the base's
       (:math:`\Delta`), and a copy of the parameters while a step runs (held between steps
       too where ``reuse_buffer`` is, as on a CPU by default).
    """

    registry_name = "mechanic"
    learning_rate_free = True

    def __init__(self, params: Any, base: str | None = None, *, s_decay: float = 0.01,
                 betas: tuple[float, ...] = _DEFAULT_BETAS, s_init: float = 1e-8, eps: float = 1e-8,
                 reuse_buffer: bool | None = None, foreach: bool | None = None, fused: bool = False,
                 skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        v.check_range(owner, "s_decay", s_decay, 0.0, None, inclusive="[)", recommended=0.01)
        betas = _check_beta_list(owner, betas)
        v.check_range(owner, "s_init", s_init, 0.0, None, inclusive="()", recommended=1e-8)
        v.check_range(owner, "eps", eps, 0.0, None, inclusive="()", recommended=1e-8)
        if foreach is not None:
            v.check_bool(owner, "foreach", foreach)
        v.check_bool(owner, "fused", fused)
        if reuse_buffer is not None:
            v.check_bool(owner, "reuse_buffer", reuse_buffer)
        v.check_bool(owner, "skip_nonfinite", skip_nonfinite)
        if isinstance(params, torch.optim.Optimizer):
            if base is not None:
                v.fail(owner, "base", base, "None when an optimizer is given (that optimizer is the base)")
            base_optimizer = params
        else:
            if base is None:
                base = DEFAULT_BASE
            if not isinstance(base, str):
                v.fail(owner, "base", base, "a spec string such as 'sgd:lr=1.0' (or pass the optimizer itself)",
                       DEFAULT_BASE)
            from ..registry import create  # local import: the registry imports the optimizers

            base_optimizer = create(base, params)
            _counters_on_device(base_optimizer)
        #: the base was built here from a spec: its counters follow the parameters' device
        self._spec_base = not isinstance(params, torch.optim.Optimizer)
        if isinstance(base_optimizer, Mechanic):
            v.fail(owner, "base", type(base_optimizer).__name__, "an optimizer that is not itself a Mechanic")
        self._linked = False
        self.base_optimizer = base_optimizer
        #: True when the base takes its step size from the loss: then so does Mechanic.
        self.requires_loss = bool(getattr(base_optimizer, "requires_loss", False))
        defaults = dict(foreach=foreach, mechanic_fused=fused, mechanic_reuse_buffer=reuse_buffer,
                        mechanic_s_decay=float(s_decay), mechanic_betas=betas, mechanic_s_init=float(s_init),
                        mechanic_eps=float(eps), skip_nonfinite=skip_nonfinite)
        super().__init__(base_optimizer.param_groups, defaults)
        # From here on the groups are the base's own list: whatever changes them (a scheduler,
        # add_param_group, zero_grad) changes them for both.
        self.param_groups = base_optimizer.param_groups
        self._linked = True

    # ------------------------------------------------------------------ groups, copies, checkpoints

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (and so to this one)."""
        if not getattr(self, "_linked", False):  # during __init__: adopt the base's groups
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        self._refuse_complex(param_group["params"])
        own = param_group.pop("skip_nonfinite", None)
        if own is not None and own != self.skip_nonfinite:
            raise ValueError(
                f"{type(self).__name__}: a param group sets skip_nonfinite={own!r}, the optimizer "
                f"{self.skip_nonfinite!r}; allowed: one setting for the whole optimizer "
                f"(one decision per step over every group), given to the constructor")
        self.base_optimizer.add_param_group(param_group)
        for key, value in self.defaults.items():
            if key != "skip_nonfinite":  # one setting for the optimizer, kept in defaults only
                self.param_groups[-1].setdefault(key, value)
        if _S in self.param_groups[0]:
            for key in (_S, _M, _V, _R, _STEP):
                self.param_groups[-1][key] = self.param_groups[0][key]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer
        state["_linked"] = True
        return state

    def state_dict(self) -> dict[str, Any]:
        """The standard layout: per parameter, the base's state and Mechanic's (``mechanic_*`` keys)
        in one entry; the param groups (shared) once, the tuner's scalars included."""
        base_sd = self.base_optimizer.state_dict()
        own = super().state_dict()
        state = {}
        for key in list(base_sd["state"]) + [k for k in own["state"] if k not in base_sd["state"]]:
            mine = {k: value for k, value in own["state"].get(key, {}).items() if k != _COPY}  # rewritten each step
            state[key] = {**base_sd["state"].get(key, {}), **mine}
        sd = dict(base_sd)  # keeps any other entry a tuneless base adds
        sd["state"], sd["param_groups"] = state, own["param_groups"]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a state_dict of the base optimizer alone: Mechanic then
        starts afresh from the current parameters, and the base keeps its state)."""
        own_state: dict[Any, dict[str, Any]] = {}
        base_state: dict[Any, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            own = {k: val for k, val in entry.items() if isinstance(k, str) and k.startswith(_PREFIX)}
            base = {k: val for k, val in entry.items() if k not in own}
            own.pop(_LEGACY_REF, None)  # implied by x - S Delta
            if own:
                own_state[key] = own
            if base:
                base_state[key] = base
        base_sd = dict(state_dict)
        base_sd["state"] = base_state
        self.base_optimizer.load_state_dict(base_sd)
        super().load_state_dict({"state": own_state, "param_groups": state_dict["param_groups"]})
        # Both loads built new group dicts; share the base's again, with Mechanic's keys.
        loaded = self.param_groups
        self.param_groups = self.base_optimizer.param_groups
        for mine, theirs in zip(loaded, self.param_groups):
            for key, value in mine.items():
                if key != "params":
                    theirs[key] = value
        if self.__dict__.get("_spec_base", False):  # a checkpoint from another device: counters follow
            _counters_on_device(self.base_optimizer)

    def _use_foreach(self, group: dict[str, Any]) -> bool:
        # One setting for Mechanic's own passes; group["foreach"] belongs to the base.
        flag = self.defaults.get("foreach")
        return True if flag is None else bool(flag)

    # ------------------------------------------------------------------ stepping

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One step of the base optimizer, rescaled by Mechanic.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; a
                torch base receives it (its first call returns the loss already computed).
            loss: the loss of the current minibatch, passed on to a tuneless base that needs
                it (Polyak-type methods); give either this or a closure.

        Returns:
            The loss (the closure's, or the one passed).
        """
        if closure is not None and loss is not None:
            raise ValueError(f"{type(self).__name__}.step: give either a closure or loss=, not both")
        grad_mode = torch.is_grad_enabled()
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._check_gradients()
            # The loss enters the flag only for a loss-based base (as in TunelessOptimizer.step):
            # the ranks' mean, averaged here and passed to the base, which does not average it
            # again (one collective), so that every rank decides alike, also when one rank's loss
            # is not finite while its gradients are.
            averaged = self._averaged_loss(loss, self.base_optimizer)
            base_loss = loss if averaged is None else averaged
            flag_loss = averaged if self.skip_nonfinite else None
            with self._skipping_nonfinite(flag_loss) as finite:
                tuned = self._prepare()
                # Before the base step: the statistics at x_t, the new scale, a copy of x_t.
                # (Fused, the flag is made there, from the statistics: see _finite_from_step_sums.)
                pending = self._measure(tuned, finite, flag_loss)
                if finite is None:
                    finite = self._step_finite()
                published = [group.get(STEP_SIZE_KEY) for group in self.param_groups]
                # The base runs in the caller's grad mode (as the reference does, for
                # differentiable optimizers); both context managers restore the mode on any exit.
                # If it raises, nothing of Mechanic's has changed.
                with torch.set_grad_enabled(grad_mode):
                    self._base_step(closure, base_loss, finite, pending)
                self._apply(pending, finite, published)
        return loss

    def _update(self, loss: Tensor | None) -> None:  # pragma: no cover - step() is overridden
        raise NotImplementedError("Mechanic.step runs the base optimizer itself")

    def _base_step(self, closure: Callable[[], Any] | None, loss: Any, finite: Tensor | None,
                   pending: _Pending | None) -> None:
        """The base optimizer's step, undone when ``finite`` is False: a tuneless base steps under
        Mechanic's flag (and gates itself); a torch base steps, then its state is put back from a
        snapshot (the tuned parameters, of which Mechanic holds the copy x_t, are put back by
        :meth:`_apply`). With ``finite`` None (Mechanic's ``skip_nonfinite=False``) a tuneless
        base does not skip either: Mechanic's setting decides for both."""
        base = self.base_optimizer
        if isinstance(base, TunelessOptimizer):
            if finite is not None:
                with self._lending_finite(base), self._passing_averaged_loss(base):
                    base.step(loss=loss)
                return
            own = base.defaults.get("skip_nonfinite", True)
            base.defaults["skip_nonfinite"] = False
            try:
                with self._passing_averaged_loss(base):
                    base.step(loss=loss)
            finally:
                base.defaults["skip_nonfinite"] = own
            return
        # (on the CPU paths a step known to be finite needs no snapshot)
        snapshot = None if finite is None or known_finite(finite) else _BaseSnapshot(
            base, pending.tuned if pending is not None else [])
        if closure is not None:
            base.step(_first_call_returns(loss, closure))
        else:
            base.step()
        if snapshot is not None:
            snapshot.restore_unless(finite)

    def _prepare(self) -> list[Tensor] | None:
        """The parameters tuned at this step, or None when every group is frozen (the same on
        every rank: lr is not sharded).

        Tuned: a gradient, in a group whose lr is not the number 0. Delta = 0 is created here for
        every parameter with a gradient, before the base step moves it.
        """
        if _S not in self.param_groups[0]:
            n = len(self.defaults["mechanic_betas"])
            dtype, device = self._stat_dtype(), self._stat_device()
            s = torch.zeros(n, dtype=dtype, device=device)                              # s_t (one per beta)
            m = torch.full((n,), _INITIAL_MAX_PRODUCT, dtype=dtype, device=device)      # running max of |h|
            sq = torch.zeros(n, dtype=dtype, device=device)                             # discounted sum of h^2
            r = torch.zeros(n, dtype=dtype, device=device)                              # reward (wealth won)
            for group in self.param_groups:
                group[_S], group[_M], group[_V], group[_R], group[_STEP] = s, m, sq, r, 0
        tuned = []
        all_frozen = True
        for group in self.param_groups:
            lr = group.get("lr", 1.0)
            group_frozen = isinstance(lr, (int, float)) and lr == 0
            all_frozen = all_frozen and group_frozen
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if _DELTA not in state:
                    # Delta: the sum of the base optimizer's updates since Mechanic met the parameter.
                    state[_DELTA] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not group_frozen:
                    tuned.append(p)
        return None if all_frozen else tuned

    def _copy_buffers(self, tuned: list[Tensor]) -> list[Tensor]:
        """Where x_t is copied at this step: each parameter's reused buffer, or a new one (see
        ``reuse_buffer``)."""
        reuse = self.defaults.get("mechanic_reuse_buffer")
        out = []
        for p in tuned:
            state = self.state[p]
            if reuse or (reuse is None and cpu_paths(p.device)):
                if _COPY not in state:
                    state[_COPY] = torch.empty_like(p, memory_format=torch.preserve_format)
                out.append(local_tensor(state[_COPY]))
            else:  # (the default off the CPU: untested there, no GPU here; tested with reuse_buffer=False)
                state.pop(_COPY, None)
                out.append(torch.empty_like(local_tensor(p)))  # freed with the step
        return out

    def _finite_from_step_sums(self, loss: Tensor | None) -> bool:
        """Fused, with no group frozen by an lr of the number 0 (whose gradients the statistics
        do not read): the statistics kernel, read only over every gradient before anything
        changes, decides (<Delta, g>: 0 * inf is NaN, so a zero Delta does not hide a bad entry;
        all-reduced with the statistics), together with the loss of a loss-based base."""
        if not self.defaults.get("mechanic_fused", False):
            return False
        return not any(isinstance(g.get("lr", 1.0), (int, float)) and g.get("lr", 1.0) == 0 for g in self.param_groups)

    def _measure(self, tuned: list[Tensor] | None, finite: Tensor | None,
                 flag_loss: Tensor | None = None) -> _Pending | None:
        """Before the base step: h_t's statistics at x_t (one reduction, entered even by a rank
        with no gradient at all), the tuner's next state, and a copy of x_t (the base's update
        is read against it). Nothing else is stored yet.

        A step that is not finite (``finite`` False): the tuner's next state is its current one,
        and both scales of the update are 0, so that x = x_t - 0 Delta + 0 Delta = x_t and
        Delta += u_t = 0 (the base did not move: it was skipped or put back). The statistics are
        read from the gradients as they are: whatever they hold is discarded by the selects."""
        if tuned is None:  # nothing is tuned on any rank: no statistics, the scale stays, nothing moves
            return None
        dtype, device = self._stat_dtype(), self._stat_device()
        first = self.param_groups[0]
        xs = [local_tensor(p) for p in tuned]
        gs = [local_tensor(p.grad) for p in tuned]
        deltas = [local_tensor(self.state[p][_DELTA]) for p in tuned]
        starts = self._copy_buffers(tuned)
        fused = bool(self.defaults.get("mechanic_fused", False))
        if fused:
            local = _fused_statistics(deltas, gs, xs, starts, dtype, device)
        elif self._use_foreach(first):
            local = _multi_tensor_statistics(deltas, gs, xs, starts, self._scratch(), dtype, device)
        else:
            local = _single_tensor_statistics(deltas, gs, xs, starts, dtype, device)
        delta_g, delta_x, x_sq, g_sq = self._global_sum(local).unbind(0)
        if self._deciding_finite():  # (fused: no read of the gradients of its own)
            ok = torch.isfinite(delta_g)
            if flag_loss is not None:
                ok = ok & torch.isfinite(flag_loss).to(ok.device)
            finite = self._settle_finite(ok)
        # The tuner.
        s_decay, eps = self.defaults["mechanic_s_decay"], self.defaults["mechanic_eps"]
        s_init = self.defaults["mechanic_s_init"]
        betas = self._betas_tensor(dtype, device)
        s, m, sum_sq, reward = first[_S], first[_M], first[_V], first[_R]
        scale = s.sum()
        h = delta_g + s_decay * scale * torch.sqrt(g_sq) / (torch.sqrt(x_sq) + eps) * delta_x
        h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
        m = torch.maximum(betas * m, h.abs())
        sum_sq = betas * betas * sum_sq + h * h
        reward = torch.clamp(betas * reward - s * h, min=0.0)
        s = (s_init * m / len(betas) + reward) / (torch.sqrt(sum_sq) + eps)
        tensor_lrs = [g["lr"] for g in self.param_groups if isinstance(g.get("lr"), Tensor)]
        if len(tensor_lrs) == len(self.param_groups):  # every lr a tensor (never read on the host):
            # when all are 0 the tuner keeps its state and the scale, as with number lrs of 0
            moving = torch.stack([lr_moves(lr, s) for lr in tensor_lrs]).amax() > 0
            old = (first[_S], first[_M], first[_V], first[_R])
            s, m, sum_sq, reward = (torch.where(moving, new, prev) for new, prev in zip((s, m, sum_sq, reward), old))
        new_scale = torch.clamp(s.sum(), min=0.0)
        if finite is not None:  # a step that is not finite: the tuner keeps its state, nothing moves
            old = (first[_S], first[_M], first[_V], first[_R])
            s, m, sum_sq, reward = (torch.where(finite, new, prev) for new, prev in zip((s, m, sum_sq, reward), old))
            return _Pending(tuned, deltas, starts, (s, m, sum_sq, reward), gate(finite, scale, 0.0),
                            gate(finite, new_scale, 0.0))
        return _Pending(tuned, deltas, starts, (s, m, sum_sq, reward), scale, new_scale)

    def _apply(self, pending: _Pending | None, finite: Tensor | None, published: list[Any]) -> None:
        """After the base step: the tuner's state stored, Delta += u_t and x = x_ref + S_{t+1} Delta
        for the tuned parameters (the frozen ones stay where they are: their implied reference
        point x - S Delta absorbs the change of scale). On a step that is not finite the counter
        and the published step sizes keep their values (``published``: those before the step)."""
        first = self.param_groups[0]
        if pending is None:
            self._publish(first[_S].sum(), finite, published)
            return
        s, m, sum_sq, reward = pending.tuner
        # The counter: a Python int with skip_nonfinite=False, else a 0-d tensor that counts the
        # finite steps (no host read).
        step = first[_STEP] + 1 if finite is None else first[_STEP] + finite.to(torch.int64)
        for group in self.param_groups:
            group[_S], group[_M], group[_V], group[_R], group[_STEP] = s, m, sum_sq, reward, step
        xs = [local_tensor(p) for p in pending.tuned]  # again: where the base left them
        if self.defaults.get("mechanic_fused", False):
            fn = _fused_mechanic
        else:
            fn = _multi_tensor_mechanic if self._use_foreach(first) else _single_tensor_mechanic
        undo = finite  # zero u_t on a step that is not finite
        if fn is _multi_tensor_mechanic and isinstance(self.base_optimizer, TunelessOptimizer):
            undo = None  # a tuneless base skipped the step itself: u_t is exactly 0, no pass to zero it
        elif fn is _fused_mechanic and finite is None:
            undo = torch.ones((), dtype=torch.bool, device=pending.scale.device)
        fn(xs, pending.starts, pending.deltas, pending.scale, pending.new_scale, undo)
        self._publish(pending.new_scale, finite, published)

    def _betas_tensor(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The betas as a tensor on the device, made once (a copy from the host would synchronize)."""
        cached = self.__dict__.get("_betas_cache")
        if cached is None or cached.dtype != dtype or cached.device != device:
            cached = torch.tensor(self.defaults["mechanic_betas"], dtype=dtype, device=device)
            self._betas_cache = cached
        return cached

    def _publish(self, scale: Tensor, finite: Tensor | None, published: list[Any]) -> None:
        """effective_lr = S x the base's step size (its published one, or its lr); on a step that
        is not finite, the value published before the step (the groups are the base's: a gated
        tuneless base kept Mechanic's product there, which must not be scaled twice)."""
        tuneless_base = isinstance(self.base_optimizer, TunelessOptimizer)
        for group, before in zip(self.param_groups, published):
            base_size = group[STEP_SIZE_KEY] if tuneless_base and STEP_SIZE_KEY in group else group.get("lr", 1.0)
            value = scale * base_size
            if finite is not None and isinstance(before, Tensor):
                value = torch.where(finite, value, before)
            self._publish_step_size(group, value)


class _Pending(NamedTuple):
    """What a step measured before the base step, for after it."""

    tuned: list[Tensor]                           # the parameters tuned at this step
    deltas: list[Tensor]                          # their Delta_t (local tensors)
    starts: list[Tensor]                          # copies of x_t (local tensors)
    tuner: tuple[Tensor, Tensor, Tensor, Tensor]  # s_{t+1}, m_t, v_t, r_t
    scale: Tensor                                 # S_t
    new_scale: Tensor                             # S_{t+1}


def _single_tensor_statistics(deltas: list[Tensor], gs: list[Tensor], xs: list[Tensor], starts: list[Tensor],
                              dtype: torch.dtype, device: torch.device) -> Tensor:
    """<Delta, g>, <Delta, x>, ||x||^2, ||g||^2 at x_t, and the copy of x_t, one tensor at a time
    (the readable truth)."""
    for start, x in zip(starts, xs):
        start.copy_(x)
    return torch.stack([total_dot_loop(deltas, gs, dtype, device), total_dot_loop(deltas, xs, dtype, device),
                        total_sum_of_squares_loop(xs, dtype, device), total_sum_of_squares_loop(gs, dtype, device)])


def _single_tensor_mechanic(xs: list[Tensor], starts: list[Tensor], deltas: list[Tensor], scale: Tensor,
                            new_scale: Tensor, finite: Tensor | None) -> None:
    """One tensor at a time (the readable truth): x holds x_t + u_t (the base's proposal).

    A step that is not finite (``finite`` False) comes with both scales 0: u_t is taken as 0
    (a torch base's proposal may hold the NaN), so Delta stays and x = x_t - 0 Delta + 0 Delta."""
    for x, start, delta in zip(xs, starts, deltas):
        s_old, s_new = scale.to(x.dtype), new_scale.to(x.dtype)
        u = x - start                    # the base's update u_t
        if finite is not None:
            u = torch.where(finite, u, 0.0)
        x_ref = start - s_old * delta    # x_t = x_ref + S_t Delta_t
        delta.add_(u)                    # Delta_{t+1} = Delta_t + u_t
        x.copy_(x_ref + s_new * delta)   # x_{t+1} = x_ref + S_{t+1} Delta_{t+1}


def _multi_tensor_statistics(deltas: list[Tensor], gs: list[Tensor], xs: list[Tensor], starts: list[Tensor],
                             scratch: Scratch, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The same over all tensors at once: one multi-tensor copy (in the cache blocks below, it
    ran slower), then on the CPU one BLAS dot per sum and cache-sized chunk (tensors in the sum
    dtype) or block by block each sum one reduction over the reused scratch buffer (others),
    elsewhere batched multi-tensor reductions."""
    if not deltas:
        return torch.zeros(4, dtype=dtype, device=device)
    torch._foreach_copy_(starts, xs)
    lists, pairs = (deltas, gs, xs), ((0, 1), (0, 2), (2, 2), (1, 1))
    if not cpu_paths(deltas[0].device):
        return total_dots(lists, pairs, dtype, device, scratch)
    dots = chunked_dots(lists, pairs, dtype, scratch)
    if dots is not None:
        return dots
    parts = []
    for db, gb, xb in cache_blocks(deltas, gs, xs):
        parts.append(torch.stack([flat_dot(db, gb, scratch, dtype), flat_dot(db, xb, scratch, dtype),
                                  flat_sum_of_squares(xb, scratch, dtype), flat_sum_of_squares(gb, scratch, dtype)]))
    return torch.stack(parts).sum(0)


def _multi_tensor_mechanic(xs: list[Tensor], starts: list[Tensor], deltas: list[Tensor], scale: Tensor,
                           new_scale: Tensor, finite: Tensor | None) -> None:
    """The same over all tensors at once, in place (x holds u_t and the copy of x_t becomes x_ref
    for a moment); on the CPU block by block, so that the five passes reuse the cache. ``finite``
    (given over a torch base, whose proposal may hold the NaN): u_t is zeroed where it is False
    (one more pass; a tuneless base's u_t is already 0 on such a step)."""
    skipped = None if finite is None else ~finite
    for x, start, delta in cache_blocks(xs, starts, deltas):
        dt = x[0].dtype
        torch._foreach_sub_(x, start)
        if skipped is not None:
            for u in x:
                u.masked_fill_(skipped, 0.0)
        add_scaled_(start, delta, (-scale).to(dt))
        torch._foreach_add_(delta, x)
        torch._foreach_copy_(x, start)
        add_scaled_(x, delta, new_scale.to(dt))


def _counters_on_device(optimizer: torch.optim.Optimizer) -> None:
    """A torch optimizer that Mechanic builds from a spec (its default base, ``adam:lr=1.0``)
    keeps its step counters on the parameters' GPU (``capturable=True``, which torch's Adam and
    AdamW read per step) instead of on the CPU, so that undoing a step that is not finite
    (:class:`~tuneless.optim.base.OptimizerSnapshot`) reads nothing on the host; on the CPU,
    where torch's capturable path does not run, ``capturable=False``. Called again after a
    checkpoint is loaded (it may come from the other kind of device), it moves the counters
    with the setting. An optimizer the caller built is left as it was."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return
    for group in optimizer.param_groups:
        if "capturable" not in group or group.get("fused") or not group["params"]:
            continue
        on_gpu = all(p.device.type == "cuda" for p in group["params"])
        group["capturable"] = on_gpu
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor):
                optimizer.state[p]["step"] = step.to(p.device if on_gpu else "cpu")


# ----------------------------------------------------------------------------- fused (compiled)


def _statistics_kernel(delta: Tensor, g: Tensor, x: Tensor, sum_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """One tensor's share of <Delta, g>, <Delta, x>, ||x||^2, ||g||^2, compiled by
    :class:`~tuneless.optim._fused.FusedKernel` (read only; zero padding adds 0)."""
    d, gw, xw = delta.to(sum_dtype), g.to(sum_dtype), x.to(sum_dtype)
    return (d * gw).sum(), (d * xw).sum(), (xw * xw).sum(), (gw * gw).sum()


def _update_kernel(x: Tensor, start: Tensor, delta: Tensor, scale: Tensor, new_scale: Tensor,
                   finite: Tensor) -> tuple[()]:
    """One tensor of :func:`_single_tensor_mechanic`, compiled: u_t = x - x_t (0 where ``finite``
    is False), x_ref = x_t - S_t Delta_t, Delta += u_t, x = x_ref + S_{t+1} Delta (zero padding
    stays 0)."""
    u = torch.where(finite, x - start, 0.0)
    x_ref = start - scale * delta
    delta.add_(u)
    x.copy_(x_ref + new_scale * delta)
    return ()


_STATISTICS_KERNEL = FusedKernel(_statistics_kernel, num_tensors=3, num_sums=4)
_UPDATE_KERNEL = FusedKernel(_update_kernel, num_tensors=3, num_sums=0)


def _fused_statistics(deltas: list[Tensor], gs: list[Tensor], xs: list[Tensor], starts: list[Tensor],
                      dtype: torch.dtype, device: torch.device) -> Tensor:
    """The four statistics as one compiled read-only pass (``fused=True``), and the copy of x_t
    (a plain multi-tensor copy: compiled into the same kernel, it ran as a second loop anyway,
    and slower)."""
    if not deltas:
        return torch.zeros(4, dtype=dtype, device=device)
    torch._foreach_copy_(starts, xs)
    return torch.stack(_STATISTICS_KERNEL([deltas, gs, xs], (dtype,), sum_dtype=dtype, device=device))


def _fused_mechanic(xs: list[Tensor], starts: list[Tensor], deltas: list[Tensor], scale: Tensor,
                    new_scale: Tensor, finite: Tensor) -> None:
    """:func:`_single_tensor_mechanic` as one compiled pass (``fused=True``)."""
    if xs:
        cd = coefficient_dtype(xs[0])
        _UPDATE_KERNEL([xs, starts, deltas], (scale.to(cd), new_scale.to(cd), finite), sum_dtype=scale.dtype,
                       device=scale.device)


class _BaseSnapshot(OptimizerSnapshot):
    """:class:`~tuneless.optim.base.OptimizerSnapshot` of a base that tuneless does not own, less
    what Mechanic puts back itself or the base does not touch: the parameters tuned at this step
    (``held``: their copy x_t is taken anyway, and on a step that is not finite the update writes
    x_t back), the parameters without a gradient (torch.optim's optimizers skip them) and
    Mechanic's own param-group entries. So the skip costs a copy of the base's state, and of the
    parameters of frozen groups (lr = 0: torch's SGD writes 0 x NaN into them), not of every
    parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer, held: list[Tensor]) -> None:
        held_ids = {id(p) for p in held}
        self.entries = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in held_ids:
                    self.entries.append((None, None, local_tensor(p), local_tensor(p).detach().clone()))
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, Tensor):
                        self.entries.append((optimizer.state[p], key, value, value.detach().clone()))
            for key, value in group.items():
                if key != "params" and isinstance(value, Tensor) and not _mechanics_own(key):
                    self.entries.append((group, key, value, value.detach().clone()))
        self.states = {p: set(optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]}
        self.optimizer = optimizer


def _mechanics_own(key: Any) -> bool:
    """Whether a param-group key is Mechanic's (the tuner, the published step size, the counter)."""
    return isinstance(key, str) and (key.startswith(_PREFIX) or key in (STEP_SIZE_KEY, SKIPPED_STEPS_KEY))


def _first_call_returns(loss: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
    """A closure whose first call returns ``loss`` (already computed) and later calls re-evaluate."""
    calls = 0

    def wrapped() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return wrapped


def _check_beta_list(owner: str, betas: Any) -> tuple[float, ...]:
    allowed = "a non-empty tuple of numbers in [0, 1)"
    if not isinstance(betas, (tuple, list)) or len(betas) == 0:
        v.fail(owner, "betas", betas, allowed, _DEFAULT_BETAS)
    for i, b in enumerate(betas):
        v.check_range(owner, f"betas[{i}]", b, 0.0, 1.0, inclusive="[)")
    return tuple(float(b) for b in betas)
