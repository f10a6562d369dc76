"""The shared base of every tuneless optimizer.

What every tuneless optimizer gets from :class:`TunelessOptimizer`:

* **Arguments.** Unknown keyword arguments are refused with the closest valid name
  (``Prodigy(p, wieght_decay=0.1)`` raises ``UnknownArgumentError: ... did you mean
  'weight_decay'?``). Values are checked by :mod:`tuneless._validate`, one message format.
* **The loss.** ``step(closure=None, *, loss=None)``: a method whose step size needs the loss
  (Polyak, SPS, MoMo) takes it from either and raises :class:`~tuneless.errors.LossRequiredError`
  when it has neither. Every optimizer accepts both, so training loops need no special case.
  Loops that call ``step()`` with no argument (HF Trainer, Accelerate, ``GradScaler.step``)
  hand it over first with :meth:`TunelessOptimizer.observe_loss` (the *loss channel*).
* **The learned step size**, published for logging in every param group under the one name
  :data:`STEP_SIZE_KEY` (``group["effective_lr"]``): a 0-d tensor kept on the parameters'
  device, so that stepping never synchronizes with the host; reading it (``float(...)`` or
  :meth:`TunelessOptimizer.effective_lrs`) is what synchronizes.
* **``lr`` is a multiplier** (1.0 by default for learning-rate-free methods) that torch's lr
  schedulers drive as usual; the learned quantity is stored under its own keys.
* **Parameters without a gradient are skipped**, ``p.grad`` is never modified, and sparse
  gradients are refused with :class:`~tuneless.errors.SparseGradientError`.
* **Two implementations, chosen in one place.** Each optimizer writes a readable
  per-parameter function (the ground truth) and a vectorized one (``torch._foreach_*`` with
  batched reductions). :meth:`TunelessOptimizer._use_foreach` chooses, from the group's
  ``foreach`` flag (``None`` means vectorized).
* **One place for global reductions.** Every sum over all parameters (norms, dot products)
  goes through :meth:`TunelessOptimizer._global_sum`, which is where sharded and
  multi-process training is handled.
* **Distributed checkpoints.** ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
  ``set_state_dict`` give a fresh optimizer its state by calling ``step()`` with lr = 0 and zero
  gradients; every tuneless ``step`` (wrappers' included) recognizes that call and creates the
  full state layout without moving anything (:meth:`TunelessOptimizer._initializing_state`).
* **A non-finite step is skipped** (``skip_nonfinite=True``, the default of every class):
  when a gradient, or the loss of a method that takes one, is NaN or infinite, the step leaves
  every parameter and all learned state exactly as they were, and adds 1 to the group's
  :data:`SKIPPED_STEPS_KEY` counter. The decision is a 0-d device tensor (no host sync), the
  same on every rank (see :meth:`TunelessOptimizer._skipping_nonfinite`); ``skip_nonfinite=False``
  keeps torch.optim's behaviour (the NaN propagates).
* **One evaluation hook.** :meth:`TunelessOptimizer.evaluation_point` is a context manager
  under which the parameters hold the point that should be evaluated (the averaged point for
  Schedule-Free); for most methods it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import Tensor

from .._validate import refuse_unknown_kwargs
from ..errors import ComplexParameterError, LossRequiredError, SparseGradientError

__all__ = ["TunelessOptimizer", "STEP_SIZE_KEY", "SKIPPED_STEPS_KEY", "gate", "zeros_unless", "OptimizerSnapshot", "local_tensor", "effective_lrs", "lr_is_zero", "lr_moves", "lr_in"]

#: The key under which every tuneless optimizer publishes, in each param group, the step size
#: it applied at its last step (the group's ``lr`` multiplier included), as a 0-d tensor on the
#: parameters' device. For per-coordinate methods (Adam-like) it is the scalar in front of the
#: normalized direction.
STEP_SIZE_KEY = "effective_lr"

#: The key under which every tuneless optimizer counts, in each param group, the steps it
#: skipped because a gradient (or the loss it takes) was not finite: a 0-d int64 tensor on the
#: parameters' device, created at the first step when ``skip_nonfinite`` is on.
SKIPPED_STEPS_KEY = "skipped_steps"


def local_tensor(t: Tensor) -> Tensor:
    """The local part of ``t``: a DTensor's shard on this rank, or ``t`` itself."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def lr_is_zero(lr: Any) -> bool:
    """Whether a group's ``lr`` is the number 0, known on the host without reading a tensor.

    A tensor lr (``lr=torch.tensor(...)``, filled in place by schedulers) is never read in a
    step: its group steps with a step size ``lr * ...`` that is exactly 0 when the lr is 0, so
    its parameters stay where they are, while its per-parameter statistics (moments) advance as
    torch.optim's do with lr = 0. Where a method skips a group with lr = 0 entirely, a number
    lr keeps that (its statistics stay too); the cross-group flags that depend on it are made
    on the device with :func:`lr_moves`.
    """
    return not isinstance(lr, Tensor) and lr == 0


def lr_moves(lr: Any, like: Tensor) -> Tensor:
    """1 where the group's ``lr`` is not 0, else 0: a 0-d tensor like ``like`` (on its device,
    in its dtype), made without a host read (a CPU tensor lr enters as a CPU scalar: no copy)."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    if isinstance(lr, Tensor):
        return one * (lr != 0).reshape(())
    return one if lr != 0 else torch.zeros_like(one)


def lr_in(lr: Any, dtype: torch.dtype) -> Any:
    """A group's ``lr`` for arithmetic in ``dtype``: a number as it is; a tensor lr in ``dtype``,
    where it is (no copy to another device, no read), so that ``0.01 * lr`` is rounded as with a
    number (a float32 tensor would round it to float32)."""
    return lr.to(dtype) if isinstance(lr, Tensor) else lr


def effective_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The step size of each param group, for logging (synchronizes with the device).

    Works for any optimizer: tuneless ones report :data:`STEP_SIZE_KEY`, others their ``lr``.
    """
    out = []
    for group in optimizer.param_groups:
        value = group.get(STEP_SIZE_KEY, group.get("lr", float("nan")))
        out.append(float(value))
    return out


#: Where :meth:`TunelessOptimizer.observe_loss` keeps the loss for the next step (an instance
#: attribute: never in ``state_dict``, never pickled), and the flag set while a step runs.
_OBSERVED_LOSS = "_tuneless_observed_loss"
_STEPPING = "_tuneless_stepping"
#: Where the current step's finiteness flag lives while the step runs (see
#: :meth:`TunelessOptimizer._skipping_nonfinite`).
_STEP_FINITE = "_tuneless_step_finite"
_FINITE_LENT = "_tuneless_finite_lent"
#: set on an inner optimizer while its wrapper passes it a loss already averaged over the ranks
_LOSS_AVERAGED = "_tuneless_loss_averaged"
_FINITE_NEXT = "_tuneless_finite_next"
_FINITE_DEFERRED = "_tuneless_finite_deferred"


def _takes_observed_loss(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``step`` so that a loss handed over by ``observe_loss`` is used by this step, as
    ``step(loss=...)`` (so the two paths are one: same checks, same averaging over ranks), and
    then dropped. Applied to every ``step`` (wrappers' included) by ``__init_subclass__``."""
    if getattr(step, "__tuneless_observes__", False):
        return step

    @functools.wraps(step)
    def wrapper(self: "TunelessOptimizer", closure: Callable[[], Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        observed = self.__dict__.pop(_OBSERVED_LOSS, None)
        if observed is not None and (closure is not None or args or kwargs.get("loss") is not None):
            raise ValueError(
                f"{type(self).__name__}.step: a loss was handed over with observe_loss() and this step was "
                f"also given {'a closure' if closure is not None else 'loss='}: give the loss one way only"
            )
        outermost = not self.__dict__.get(_STEPPING, False)
        self.__dict__[_STEPPING] = True
        try:
            if observed is not None:
                step(self, loss=observed)
                return observed
            return step(self, closure, *args, **kwargs)
        finally:
            if outermost:
                self.__dict__[_STEPPING] = False

    wrapper.__tuneless_observes__ = True  # type: ignore[attr-defined]
    return wrapper


def _drops_observed_loss(zero_grad: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's own ``zero_grad`` so that it drops an observed loss with the gradients."""
    if getattr(zero_grad, "__tuneless_observes__", False):
        return zero_grad

    @functools.wraps(zero_grad)
    def wrapper(self: "TunelessOptimizer", *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop(_OBSERVED_LOSS, None)
        return zero_grad(self, *args, **kwargs)

    wrapper.__tuneless_observes__ = True  # type: ignore[attr-defined]
    return wrapper


def _initializes_checkpoint_state(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``step`` so that ``torch.distributed.checkpoint``'s state initialization (a call of
    ``step()`` with every lr 0 and zero gradients on a fresh optimizer) creates the state a real
    step creates, moves nothing, and needs no loss (see ``TunelessOptimizer._initializing_state``)."""
    if getattr(step, "__tuneless_checkpoint_aware__", False):
        return step

    @functools.wraps(step)
    def wrapper(self: "TunelessOptimizer", closure: Callable[[], Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        if closure is None and not args and kwargs.get("loss") is None and self._is_state_initialization():
            with self._initializing_state():
                return step(self, loss=0.0)
        return step(self, closure, *args, **kwargs)

    wrapper.__tuneless_checkpoint_aware__ = True  # type: ignore[attr-defined]
    return wrapper


class TunelessOptimizer(torch.optim.Optimizer):
    """Base class of every tuneless optimizer (see the module docstring for the contract)."""

    #: True when the step size is computed from the loss (a closure or ``loss=`` is required).
    requires_loss: ClassVar[bool] = False
    #: the name under which :func:`tuneless.create` finds the class
    registry_name: ClassVar[str] = ""
    #: True when the class trains complex parameters as torch.optim does (as their real view,
    #: ``torch.view_as_real``); False: a complex parameter is refused at construction
    supports_complex: ClassVar[bool] = False
    #: True when the defaults need no learning rate (``lr`` is only a multiplier, 1.0)
    learning_rate_free: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__tuneless_checked__", False):
            cls.__init__ = refuse_unknown_kwargs(init)  # type: ignore[method-assign]
        step = cls.__dict__.get("step")
        if step is not None:  # wrappers (Mechanic, ScheduleFree) define their own step
            cls.step = _takes_observed_loss(_initializes_checkpoint_state(step))  # type: ignore[method-assign]
        zero_grad = cls.__dict__.get("zero_grad")
        if zero_grad is not None:  # the Schedule-Free wrapper defines its own zero_grad
            cls.zero_grad = _drops_observed_loss(zero_grad)  # type: ignore[method-assign]

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults = dict(defaults)
        defaults.setdefault("foreach", None)
        skip = defaults.setdefault("skip_nonfinite", True)
        if not isinstance(skip, bool):
            from .._validate import fail

            fail(type(self).__name__, "skip_nonfinite", skip, "True or False")
        super().__init__(params, defaults)

    @property
    def skip_nonfinite(self) -> bool:
        """Skip a step whose gradients (or loss) are not finite (see :meth:`_skipping_nonfinite`).

        One setting for the whole optimizer, kept in ``defaults`` (so it survives pickling): the
        decision is one flag over every group, so groups do not carry their own."""
        return bool(self.defaults.get("skip_nonfinite", True))

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        if not isinstance(value, bool):
            from .._validate import fail

            fail(type(self).__name__, "skip_nonfinite", value, "True or False")
        self.defaults["skip_nonfinite"] = value

    #: per-parameter state kept in float64 whatever the parameter's dtype (sums that grow for as
    #: long as training runs). torch's ``load_state_dict`` casts state to the parameter's dtype;
    #: :meth:`load_state_dict` puts these back from the checkpoint's own float64 values.
    _float64_state: ClassVar[tuple[str, ...]] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping the float64 state of :attr:`_float64_state` in float64
        (torch would round it to the parameter's dtype: a resumed run would then differ)."""
        keys = type(self)._float64_state
        kept: list[tuple[Tensor, str, Tensor]] = []
        if keys:
            saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            for i, p in zip(saved_ids, params):
                entry = state_dict["state"].get(i, {})
                kept += [(p, k, entry[k]) for k in keys if isinstance(entry.get(k), Tensor)]
        super().load_state_dict(state_dict)
        for p, key, value in kept:
            self.state[p][key] = value.to(device=p.device, dtype=torch.float64, copy=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing complex parameters first (see :attr:`supports_complex`)."""
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        self._refuse_complex(param_group["params"])
        own = param_group.pop("skip_nonfinite", None)
        if own is not None and own != self.defaults.get("skip_nonfinite", True):
            raise ValueError(
                f"{type(self).__name__}: a param group sets skip_nonfinite={own!r}, the optimizer "
                f"{self.defaults.get('skip_nonfinite', True)!r}; allowed: one setting for the whole optimizer "
                f"(one decision per step over every group), given to the constructor")
        super().add_param_group(param_group)
        param_group.pop("skip_nonfinite", None)

    def _refuse_complex(self, params: list[Any], before: int | None = None) -> None:
        """Raise :class:`~tuneless.errors.ComplexParameterError` for a complex parameter, naming it
        (its index among all the optimizer's parameters: ``before`` + its position, ``before``
        defaulting to the parameters already in the groups), unless the class trains complex
        parameters (:attr:`supports_complex`)."""
        if type(self).supports_complex:
            return
        if before is None:
            before = sum(len(g["params"]) for g in self.param_groups)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and p.is_complex():
                owner = type(self).__name__
                raise ComplexParameterError(
                    f"{owner}: parameter {before + i} (shape {tuple(p.shape)}, dtype {p.dtype}) is complex; allowed: "
                    f"real floating-point parameters ({owner}'s step takes norms and dot products over real "
                    f"numbers, untested on complex ones). Train its real view instead, a real parameter of shape "
                    f"{tuple(p.shape) + (2,)} used through torch.view_as_complex, or use ScheduleFreeSGD, which trains "
                    f"complex parameters as their real view (as torch.optim does)")

    # ------------------------------------------------------------------ stepping

    @_takes_observed_loss
    @_initializes_checkpoint_state
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model (running ``backward``)
                and returns the loss.
            loss: the loss of the current minibatch, already back-propagated; a tensor (kept
                on its device, no synchronization) or a number. Give either this or a closure.
                Methods that take their step size from it use the mean over the data-parallel
                ranks (see :mod:`tuneless.distributed`).

        Returns:
            The loss (the closure's, or the one passed), as given.
        """
        if closure is not None and loss is not None:
            raise ValueError(f"{type(self).__name__}.step: give either a closure or loss=, not both")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_tensor = None
        if loss is not None:
            loss_tensor = self._as_loss_tensor(loss)
            if self.requires_loss and not self.__dict__.get(_LOSS_AVERAGED, False):
                # each data-parallel rank has its own loss: use their mean (a wrapper that
                # averaged it already, for its own decisions, says so: one collective per step)
                from .. import distributed as _dist

                loss_tensor = _dist.average_loss(self, loss_tensor)
        elif self.requires_loss:
            raise LossRequiredError(
                f"{type(self).__name__} computes its step size from the loss: call "
                f"optimizer.step(loss=loss) after loss.backward(), or optimizer.step(closure), or "
                f"optimizer.observe_loss(loss) before a step() that gets no argument"
            )
        self._check_gradients()
        with self._skipping_nonfinite(loss_tensor):
            self._update(loss_tensor)
        return loss

    def observe_loss(self, loss: Any) -> None:
        """Hand over the loss for the next ``step()``, for loops that call ``step()`` with no argument.

        The loss channel: HF ``Trainer``, Accelerate's ``AcceleratedOptimizer``, ``GradScaler.step``
        and timm's train script call ``optimizer.step()`` without a loss; call this after
        ``loss.backward()`` and before that ``step()``::

            loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            opt.observe_loss(loss)   # the unscaled loss: what was back-propagated, before scaling
            scaler.step(opt)         # calls opt.step(): it uses the loss observed, then drops it
            scaler.update()

        Rules:

        * **No host sync**: the loss (a tensor, or a number) is detached and kept on the
          parameters' device; the step uses it exactly as ``step(loss=...)`` would, averaged over
          the data-parallel ranks for the methods that take a loss (:mod:`tuneless.distributed`).
        * **Used by the next step only**: that step drops it; so does ``zero_grad()`` (the loss
          goes with the gradients it belongs to, e.g. after a step the scaler skipped). A step
          with nothing observed and no loss raises :class:`~tuneless.errors.LossRequiredError`
          for the methods that need the loss, as before; a step given a closure or ``loss=``
          while a loss is observed raises ``ValueError`` (never a silent choice).
        * **Losses add up until the step, like gradients**: under gradient accumulation observe
          each micro-batch's loss as it was back-propagated (divided by the number of
          micro-batches when the gradients are), so the step gets the loss of its gradient.
        * Called from a closure that ``step`` is running, it raises ``RuntimeError``: there the
          closure's return value is the loss.
        * Not part of ``state_dict``: an observed loss never outlives a checkpoint.
        """
        if self.__dict__.get(_STEPPING, False):
            raise RuntimeError(
                f"{type(self).__name__}.observe_loss was called while step() runs (from its closure): the "
                f"closure's return value is the loss; observe_loss is for loops that call step() with no argument"
            )
        loss_tensor = self._as_loss_tensor(loss)
        pending = self.__dict__.get(_OBSERVED_LOSS)
        self.__dict__[_OBSERVED_LOSS] = loss_tensor if pending is None else pending + loss_tensor

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also drops a loss observed with :meth:`observe_loss`."""
        self.__dict__.pop(_OBSERVED_LOSS, None)
        super().zero_grad(set_to_none=set_to_none)

    def _is_state_initialization(self) -> bool:
        """Whether this call of ``step()`` (no closure, no loss) is a checkpoint's state initialization.

        ``get_state_dict`` / ``set_state_dict`` of ``torch.distributed.checkpoint.state_dict``
        give a fresh optimizer (empty ``state``) its state, the layout a checkpoint is loaded
        into, by calling ``step()`` with every ``lr`` set to 0, zero gradients and no loss.
        Checked with the state first: reading a tensor lr, or the gradients, synchronizes, and
        happens only while the state is empty (then every lr is read, and the gradients when
        every lr is 0).
        """
        if self.state:
            return False
        for group in self.param_groups:
            lr = group.get("lr")
            if not isinstance(lr, (int, float, Tensor)) or float(lr) != 0:
                return False
        grads = [local_tensor(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not any(bool(torch.any(g != 0)) for g in grads)

    @contextlib.contextmanager
    def _initializing_state(self) -> Iterator[None]:
        """Run a step that creates every buffer and param-group scalar a real step creates, and
        leaves the parameters and the param-group values that existed before as they were.

        A group with lr = 0 creates no state in most methods (it must not move), so the step
        runs with every lr set to 1 (the gradients are 0); afterwards the parameters, the lrs
        and every param-group value that existed before are restored (tensors in place, so
        tensors shared between groups stay shared). What is new stays: the layout a checkpoint
        is loaded into. Its values do not matter; the checkpoint overwrites them.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        saved_params = [local_tensor(p).detach().clone() for p in params]
        saved_groups = [{k: (v, v.detach().clone() if isinstance(v, Tensor) else None)
                         for k, v in group.items() if k != "params"} for group in self.param_groups]
        for group in self.param_groups:
            lr = group["lr"]
            group["lr"] = torch.ones_like(lr) if isinstance(lr, Tensor) else 1.0
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, saved_params):
                    local_tensor(p).copy_(saved)
                for group, entries in zip(self.param_groups, saved_groups):
                    for key, (value, copy) in entries.items():
                        if copy is not None:
                            value.copy_(copy)
                        group[key] = value

    # ------------------------------------------------------------------ non-finite steps

    @contextlib.contextmanager
    def _skipping_nonfinite(self, loss: Tensor | None, *, finite: Tensor | None = None,
                            count: bool = True) -> Iterator[Tensor | None]:
        """The scope of one step's non-finite check: yields the step's flag, ``finite``.

        ``finite`` is a 0-d bool tensor on the parameters' device, True when every gradient of
        every group, and ``loss`` when this method takes one (:attr:`requires_loss`), is finite;
        None when ``skip_nonfinite`` is off. Within the scope :meth:`_step_finite` returns it,
        and the step must leave every parameter and all learned state exactly as they were when
        it is False (see :func:`gate`, :func:`zeros_unless`). After the step, each group's
        :data:`SKIPPED_STEPS_KEY` counter grows by one when it was False (``count=False``: a
        wrapper's inner optimizer whose groups the wrapper counts).

        How the flag is made, without a host sync: one sum per gradient tensor (one read of the
        gradients; NaN and infinities survive a sum), stacked and summed; under sharding
        (FSDP2), one all-reduce of one int32 number makes it the same on every rank
        (:func:`tuneless.distributed.any_rank_nonfinite`). Under DDP the
        gradients, and the losses of loss-based methods, are already the ranks' average, so
        every rank decides alike with no collective. A wrapper that has made the flag passes it
        to its inner optimizer with :meth:`_lending_finite`; a nested scope reuses the flag it
        finds.
        """
        outer = self.__dict__.get(_STEP_FINITE)
        lent = self.__dict__.get(_FINITE_LENT, False)
        if outer is None and not self.skip_nonfinite:
            yield None
            return
        deferred = finite is None and outer is None and self._finite_from_step_sums(loss)
        if finite is None and not deferred:
            finite = outer if outer is not None else self._finite_flag(loss)
        if outer is None or lent:
            self.__dict__[_FINITE_NEXT] = 0  # the copies of _finite_grads, numbered from 0 each step
        self.__dict__[_STEP_FINITE] = finite
        self.__dict__[_FINITE_DEFERRED] = deferred
        try:
            yield finite
            if deferred:
                finite = self.__dict__.get(_STEP_FINITE)
                if finite is None:
                    raise RuntimeError(f"{type(self).__name__}: a step that decides finiteness from its own "
                                       f"sums (_finite_from_step_sums) ended without _settle_finite")
        finally:
            self.__dict__.pop(_FINITE_DEFERRED, None)
            if outer is None:
                self.__dict__.pop(_STEP_FINITE, None)
            else:
                self.__dict__[_STEP_FINITE] = outer
        if count and not lent:
            self._count_skipped(finite)

    def _finite_from_step_sums(self, loss: Tensor | None) -> bool:
        """Whether this step decides finiteness from sums it takes anyway (default False).

        A method may say True for a step whose first pass is read only and sums a finite
        multiple of every gradient entry (NaN and infinities survive such a sum; ``0 * inf`` is
        NaN), all-reduced with the step's own reduction: then the scope reads no gradient of its
        own, :meth:`_step_finite` is None until the step calls :meth:`_settle_finite` with the
        flag made from those sums, and nothing may change before it does (the issue's "ride on
        sums every method already takes": Prodigy's fused estimate, see ``docs/robustness.md``)."""
        return False

    def _deciding_finite(self) -> bool:
        """True within a step whose flag the step itself makes (:meth:`_finite_from_step_sums`)
        and has not settled yet."""
        return bool(self.__dict__.get(_FINITE_DEFERRED)) and self.__dict__.get(_STEP_FINITE) is None

    def _settle_finite(self, finite: Tensor) -> Tensor:
        """Set the flag of a step that decides finiteness itself; returns it."""
        if not self._deciding_finite():
            raise RuntimeError(f"{type(self).__name__}: _settle_finite outside a step that decides finiteness itself")
        self.__dict__[_STEP_FINITE] = finite
        return finite

    @contextlib.contextmanager
    def _lending_finite(self, inner: torch.optim.Optimizer) -> Iterator[None]:
        """Within it, ``inner`` (a wrapper's base optimizer, when it is a tuneless one) steps
        under this step's flag: no second read of the gradients, no second collective, and its
        groups' skips are not counted by it (the wrapper counts). The wrapper's
        ``skip_nonfinite`` decides for both. Does nothing outside a checked step."""
        finite = self._step_finite()
        if finite is None or not isinstance(inner, TunelessOptimizer) or inner is self:
            yield
            return
        with _attributes_set(inner, {_STEP_FINITE: finite, _FINITE_LENT: True}):
            yield

    def _averaged_loss(self, loss: Any, inner: torch.optim.Optimizer) -> Tensor | None:
        """A wrapper's loss for its own decisions and for ``inner`` (its base): the ranks' mean
        (:func:`tuneless.distributed.average_loss` over ``inner``'s loss group), so that the
        non-finite decision made from it is the same on every rank even when only one rank's
        loss is not finite while its gradients are. None when ``loss`` is None or the wrapper
        does not take the loss. Pass it on under :meth:`_passing_averaged_loss`."""
        if loss is None or not self.requires_loss:
            return None
        from .. import distributed as _dist

        return _dist.average_loss(inner, self._as_loss_tensor(loss))

    @contextlib.contextmanager
    def _passing_averaged_loss(self, inner: torch.optim.Optimizer) -> Iterator[None]:
        """Within it, ``inner`` (a tuneless base) uses the loss it is given as the ranks' mean
        (no second all-reduce)."""
        if not isinstance(inner, TunelessOptimizer) or inner is self:
            yield
            return
        with _attributes_set(inner, {_LOSS_AVERAGED: True}):
            yield

    def _step_finite(self) -> Tensor | None:
        """The current step's finiteness flag (a 0-d bool tensor), or None when the step is not
        checked (``skip_nonfinite=False``, or called outside a step)."""
        return self.__dict__.get(_STEP_FINITE)

    def _finite_flag(self, loss: Tensor | None) -> Tensor:
        """True (a 0-d bool tensor) when every gradient, and the loss of a loss-based method, is finite."""
        from ._batched import nonfinite_count

        grads = [local_tensor(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad = nonfinite_count(grads, self._stat_dtype(), self._stat_device())
        if loss is not None and self.requires_loss:
            bad = bad + (~torch.isfinite(loss)).to(bad.dtype)
        from .. import distributed as _dist

        return _dist.any_rank_nonfinite(self, bad) == 0  # sharded: each rank holds other gradients

    def _count_skipped(self, finite: Tensor) -> None:
        skipped = (~finite).to(torch.int64)
        for group in self.param_groups:
            counter = group.get(SKIPPED_STEPS_KEY)
            if isinstance(counter, Tensor):
                counter.add_(skipped.to(counter.device))
            else:
                group[SKIPPED_STEPS_KEY] = skipped.clone()

    def skipped_steps(self) -> list[int]:
        """How many steps each param group skipped because a gradient or the loss was not finite
        (synchronizes; 0 for a group that has not stepped or when ``skip_nonfinite`` is off)."""
        return [int(group.get(SKIPPED_STEPS_KEY, 0)) for group in self.param_groups]

    def _finite_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """What a checked step computes with: ``grads`` when the step is finite, zeros when it
        is not (copies made with ``torch.where``, no host sync; ``grads`` itself when the step
        is not checked).

        The recipe every method follows: compute the step from these, so that no NaN can reach
        the state (NaN * 0 is NaN: a zero coefficient alone would not stop it), then :func:`gate`
        whatever a step with zero gradients would still change (momentum decay, counters,
        learned scalars, weight decay, the step size), so that a step that is not finite is an
        exact no-op. Fused kernels do the same inside the kernel, at no extra memory traffic.
        The copies live in buffers reused from step to step (not state): one more gradient's
        worth of memory, one read and one write of the gradients per step."""
        finite = self._step_finite()
        if finite is None or known_finite(finite):
            return grads  # (on the CPU paths, a finite step: the gradients themselves, no copy)
        # numbered across the calls of one step, so that copies taken for several groups (or
        # twice) never share a buffer, and each step reuses the previous step's buffers
        first = self.__dict__.get(_FINITE_NEXT, 0)
        self.__dict__[_FINITE_NEXT] = first + len(grads)
        return zeros_unless(finite, grads, self.__dict__.setdefault("_tuneless_finite_buffers", {}), first=first)

    def _update(self, loss: Tensor | None) -> None:  # pragma: no cover - abstract
        """Apply one update; ``loss`` is a 0-d tensor (statistics dtype) or None."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses

    def _check_gradients(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and g.is_sparse:
                    raise SparseGradientError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter of shape {tuple(p.shape)}); use dense gradients or torch.optim.SparseAdam"
                    )

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters of ``group`` that have a gradient, and their gradients (local shards)."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(local_tensor(p.grad))
        return params, grads

    def _use_foreach(self, group: dict[str, Any]) -> bool:
        """The one place where the implementation is chosen: vectorized unless ``foreach=False``."""
        flag = group.get("foreach")
        return True if flag is None else bool(flag)

    def _scratch(self) -> Any:
        """The vectorized path's reusable flat buffers (CPU; see :class:`~tuneless.optim._batched.Scratch`),
        created on first use; not state, never saved."""
        scratch = self.__dict__.get("_tuneless_scratch")
        if scratch is None:
            from ._batched import Scratch

            scratch = self.__dict__["_tuneless_scratch"] = Scratch()
        return scratch

    def _first_param(self) -> Tensor:
        for group in self.param_groups:
            for p in group["params"]:
                return p
        raise ValueError(f"{type(self).__name__} has no parameters")

    def _stat_dtype(self) -> torch.dtype:
        """The dtype of global statistics: float64 if any parameter is float64, else float32."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.float64:
                    return torch.float64
        return torch.float32

    def _stat_device(self) -> torch.device:
        return local_tensor(self._first_param()).device

    def _scalar(self, value: float) -> Tensor:
        """A fresh 0-d tensor for optimizer scalars, on the parameters' device."""
        return torch.tensor(value, dtype=self._stat_dtype(), device=self._stat_device())

    def _as_loss_tensor(self, loss: Any) -> Tensor:
        dtype, device = self._stat_dtype(), self._stat_device()
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"{type(self).__name__}.step: loss must be a scalar (one element); got shape {tuple(loss.shape)}"
                )
            return loss.detach().reshape(()).to(device=device, dtype=dtype)
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), dtype=dtype, device=device)
        raise TypeError(
            f"{type(self).__name__}.step: loss must be a tensor or a number; got {type(loss).__name__}"
        )

    def _global_sum(self, partial_sums: Tensor) -> Tensor:
        """Sum per-process partial sums over every process that holds a part of the parameters.

        ``partial_sums`` is a 1-D tensor of statistics summed over this process's (local) part
        of the parameters; all of a step's statistics travel in one collective. In one process,
        or under DDP (replicated parameters, already averaged gradients), it is returned as is.
        """
        from .. import distributed as _dist  # local import: torch.distributed is optional

        return _dist.global_sum(self, partial_sums)

    def _publish_step_size(self, group: dict[str, Any], value: Tensor) -> None:
        """Publish the step size this group applied, under :data:`STEP_SIZE_KEY`."""
        group[STEP_SIZE_KEY] = value.detach()

    # ------------------------------------------------------------------ user-facing extras

    def effective_lrs(self) -> list[float]:
        """The step size each param group applied at its last step (synchronizes)."""
        return effective_lrs(self)

    @contextlib.contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """Context under which the parameters hold the point to evaluate.

        For most methods that is the current iterate and this does nothing; averaging methods
        (Schedule-Free) swap in their averaged point and swap back on exit.
        """
        yield

    def __repr__(self) -> str:  # shorter than torch's multi-line repr, same information
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            keys = sorted(k for k in group if k != "params" and not isinstance(group[k], Tensor))
            items = ", ".join(f"{k}={group[k]!r}" for k in keys)
            lines.append(f"  group {i}: {len(group['params'])} tensors, {items}")
        lines.append(")")
        return "\n".join(lines)


@contextlib.contextmanager
def _attributes_set(obj: Any, values: dict[str, Any]) -> Iterator[None]:
    """Within it, ``obj``'s instance attributes ``values`` are set; afterwards each is as it was
    (removed if it was absent). How a wrapper tells its inner optimizer about the current step."""
    saved = {key: obj.__dict__.get(key) for key in values}
    obj.__dict__.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                obj.__dict__.pop(key, None)
            else:
                obj.__dict__[key] = value


def gate(finite: Tensor | None, new: Tensor, old: Any) -> Tensor:
    """``new`` where the step is finite, else ``old`` (a tensor or a number): how a step keeps a
    learned scalar, a counter or a coefficient as it was on a skipped step. ``finite`` None
    (the step is not checked) returns ``new``."""
    if finite is None:
        return new
    if not isinstance(old, Tensor):
        old = torch.full((), old, dtype=new.dtype, device=new.device)
    return torch.where(finite, new, old)


def known_finite(finite: Tensor | None) -> bool:
    """True when ``finite`` is a flag on the CPU paths that says the step is finite.

    A CPU tensor's value is in host memory: reading it waits for no device. So on the CPU
    paths the usual, finite step computes from the gradients themselves, with no
    zero-or-gradient copy (:meth:`TunelessOptimizer._finite_grads`) and no snapshot of a
    foreign base (:class:`OptimizerSnapshot`); a step that is not finite takes them as ever.
    On a GPU (and on the device paths forced on the CPU by the tests) the flag is never read:
    False. The read is :func:`known_true`'s."""
    return known_true(finite)


def known_true(flag: Tensor | None) -> bool:
    """True when ``flag`` (a 0-d bool tensor) lies on the CPU paths and is True; False on a GPU
    (and on the device paths forced on the CPU by the tests), where it is never read, and for
    None. A CPU tensor's value is in host memory: reading it waits for no device, so the CPU
    paths may skip work that a flag on the host says is not needed (:func:`known_finite`; the
    first step's rescaling of Tuneless's s). :class:`~tuneless._host_reads.HostReadCounter`
    exempts this one read by name."""
    if flag is None:
        return False
    from ._batched import cpu_paths

    return cpu_paths(flag.device) and bool(flag)


def zeros_unless(finite: Tensor, tensors: Sequence[Tensor], buffers: dict[Any, Tensor] | None = None,
                 first: int = 0) -> list[Tensor]:
    """``tensors`` where the step is finite, else tensors of zeros: copies, ``torch.where``.

    A step computed from all-zero gradients cannot pick up a NaN, and is easy to make an exact
    no-op (see :meth:`TunelessOptimizer._finite_grads`). ``buffers`` (a dict kept by the caller)
    holds the copies from step to step, keyed by position (counted from ``first``), shape,
    dtype and device, so that a warm step allocates nothing."""
    out = []
    for i, t in enumerate(tensors, start=first):
        if buffers is None:
            out.append(torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device)))
            continue
        key = (i, t.shape, t.dtype, t.device)
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = torch.empty_like(t, memory_format=torch.contiguous_format)
        out.append(torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device), out=buf))
    return out


class OptimizerSnapshot:
    """Copies of an optimizer's parameters and every tensor of its state and param groups, put
    back with :meth:`restore_unless` when a step turned out not to be finite.

    For wrappers over an optimizer that tuneless does not own (``torch.optim.Adam`` inside
    Mechanic or the Schedule-Free wrapper): its step cannot be gated from inside, so it runs
    and is undone. Costs a copy of the parameters and the state per step (a read and a write
    of each, then a select); tuneless's own methods gate their updates instead, at no copy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.entries: list[tuple[Any, Any, Tensor, Tensor]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.entries.append((None, None, local_tensor(p), local_tensor(p).detach().clone()))
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, Tensor):
                        self.entries.append((optimizer.state[p], key, value, value.detach().clone()))
            for key, value in group.items():
                if key != "params" and isinstance(value, Tensor):
                    self.entries.append((group, key, value, value.detach().clone()))
        self.states = {p: set(optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]}
        self.optimizer = optimizer

    @torch.no_grad()
    def restore_unless(self, finite: Tensor) -> None:
        """Where ``finite`` is False, put every copied tensor back (in place when the step
        updated it in place, else by reassigning the entry).

        State the step created (a first step) holds values computed from the non-finite
        gradients: on a step that is not finite its floating-point tensors are set to 0, which is
        what torch's Adam, AdamW, Adagrad, RMSprop and SGD (without dampening) hold before their
        first update, so their next step is again a first step; a state whose start is not 0
        (NAdam's ``mu_product``, SGD with dampening) is not exactly restored (documented).
        State tensors kept on the CPU while the flag is on a GPU (the step counters of torch's
        Adam and AdamW on CUDA unless ``capturable`` or ``fused``) are selected with the flag
        copied to the CPU: one host sync per step (found on an H200, docs/gpu.md). Mechanic's
        default base keeps its counters on the GPU to avoid it."""
        flags = {finite.device: finite}

        def flag_on(device: torch.device) -> Tensor:
            if device not in flags:
                flags[device] = finite.to(device)
            return flags[device]

        for container, key, before, saved in self.entries:
            if container is None:
                torch.where(flag_on(before.device), before, saved, out=before)
                continue
            now = container.get(key)
            if now is before:
                torch.where(flag_on(before.device), before, saved, out=before)
            elif isinstance(now, Tensor):
                container[key] = torch.where(flag_on(now.device), now, saved.to(now.dtype))
        for p, before_keys in self.states.items():
            state = self.optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if key not in before_keys and isinstance(value, Tensor) and (value.is_floating_point() or key == "step"):
                    zero = torch.zeros((), dtype=value.dtype, device=value.device)
                    torch.where(flag_on(value.device), value, zero, out=value)


def finite_or_zero(step: Tensor, *values: Tensor) -> Tensor:
    """``step`` where ``step`` and every value are finite, else 0 (no host sync)."""
    ok = torch.isfinite(step)
    for v in values:
        ok = ok & torch.isfinite(v)
    return torch.where(ok, step, torch.zeros_like(step))


def is_nonnegative_finite(x: float) -> bool:
    return math.isfinite(x) and x >= 0
