r"""Iterate averaging for any optimizer: the polynomial-decay average DoG relies on.

Methods without a decaying step size (DoG, L-DoG, DoWG, and plain SGD with a constant step)
reach their best point *on average*: the last iterate keeps bouncing. The DoG paper evaluates
at a polynomial-decay average of the iterates (Shamir & Zhang, 2013),

.. math::
    \bar x_t = \Big(1 - \frac{\gamma + 1}{t + \gamma}\Big)\,\bar x_{t-1}
               + \frac{\gamma + 1}{t + \gamma}\, x_t, \qquad t = 1, 2, \dots

so :math:`\bar x_1 = x_1`; :math:`\gamma = 0` gives the uniform average of all iterates, and a
larger :math:`\gamma` forgets the early iterates faster (weights grow like :math:`t^\gamma`).
The paper uses :math:`\gamma = 8`.

:class:`PolynomialDecayAverager` works with any optimizer (tuneless or torch's) and any set of
tensors::

    averager = PolynomialDecayAverager(model, gamma=8)     # or a list of parameters
    for batch in data:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        averager.update()                                  # after each step
    with averager.average_parameters():                    # the model holds the average here
        evaluate(model)                                    # ... and gets its own weights back after

It keeps one buffer per averaged tensor and nothing else (the reference,
``dog.PolynomialDecayAverager`` of ``dog-optimizer`` 1.0.3, keeps a ``deepcopy`` of the whole
module). Swapping the average in and out is exact (a bitwise XOR swap in place: no
temporary, no rounding), so training resumes on exactly the same weights. ``update()`` uses
multi-tensor ops and never synchronizes with the device (the weight is computed on the host
from the step count).

References:
    O. Shamir, T. Zhang, "Stochastic Gradient Descent for Non-smooth Optimization: Convergence
    Results and Optimal Averaging Schemes", ICML 2013 (polynomial-decay averaging).
    M. Ivgi, O. Hinder, Y. Carmon, "DoG is SGD's Best Friend", ICML 2023, arXiv:2302.12022
    (its use with DoG, gamma = 8). Matches ``dog.PolynomialDecayAverager`` (dog-optimizer 1.0.3).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from . import _validate as v
from .optim.base import local_tensor

__all__ = ["PolynomialDecayAverager"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _swap_(a: Tensor, b: Tensor) -> None:
    """Exchange the contents of ``a`` and ``b`` in place, bit for bit, without a temporary."""
    ia, ib = a.view(_INT_VIEW[a.element_size()]), b.view(_INT_VIEW[b.element_size()])
    ia.bitwise_xor_(ib)
    ib.bitwise_xor_(ia)
    ia.bitwise_xor_(ib)


class PolynomialDecayAverager:
    r"""Polynomial-decay average of parameters (and floating-point buffers), for any optimizer.

    .. math::
        \bar x_t = (1 - w_t)\,\bar x_{t-1} + w_t\, x_t, \qquad w_t = \frac{\gamma + 1}{t + \gamma}

    Args:
        params_or_module: an ``nn.Module`` (its parameters that require grad, and with
            ``buffers=True`` its floating-point buffers such as batch-norm statistics), or an
            iterable of tensors or of param-group dicts (as given to an optimizer).
        gamma: the decay exponent :math:`\gamma \ge 0` (default 8.0, the DoG paper's; 0 is the
            uniform average).
        buffers: for a module, also average its floating-point buffers (default True, as the
            reference does; integer buffers such as ``num_batches_tracked`` are left as they are).
        foreach: multi-tensor update (None or True) or a per-tensor loop (False).

    Attributes:
        t: the index of the next update (1 before the first one, as in the reference).

    Example:
        >>> import torch
        >>> from tuneless.averaging import PolynomialDecayAverager
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> avg = PolynomialDecayAverager([w], gamma=0.0)      # uniform average
        >>> for value in (1.0, 2.0, 3.0):
        ...     with torch.no_grad(): _ = w.fill_(value)
        ...     avg.update()
        >>> with avg.average_parameters():
        ...     w.tolist()
        [2.0, 2.0]
        >>> w.tolist()
        [3.0, 3.0]

    .. note:: Parameters that do not require grad when the averager is built (frozen ones) are
       not averaged (they do not change); build the averager after freezing. Do not step the
       optimizer inside :meth:`average_parameters`.
    """

    def __init__(self, params_or_module: nn.Module | Iterable[Any], gamma: float = 8.0, *,
                 buffers: bool = True, foreach: bool | None = None) -> None:
        owner = type(self).__name__
        v.check_range(owner, "gamma", gamma, 0.0, None, inclusive="[)", recommended=8.0)
        v.check_bool(owner, "buffers", buffers)
        if foreach is not None:
            v.check_bool(owner, "foreach", foreach)
        self.gamma = float(gamma)
        self.foreach = foreach
        self.t = 1
        names, tensors = [], []
        if isinstance(params_or_module, nn.Module):
            for name, p in params_or_module.named_parameters():
                if p.requires_grad:
                    names.append(name)
                    tensors.append(p)
            if buffers:
                for name, b in params_or_module.named_buffers():
                    if b.is_floating_point():
                        names.append(name)
                        tensors.append(b)
        else:
            for item in params_or_module:
                group = item["params"] if isinstance(item, dict) else [item]
                for p in ([group] if isinstance(group, Tensor) else group):
                    if not isinstance(p, Tensor):
                        raise TypeError(f"{owner}: expected tensors or param groups; got {type(p).__name__}")
                    names.append(str(len(names)))
                    tensors.append(p)
        for name, p in zip(names, tensors):
            if not p.is_floating_point():
                v.fail(owner, f"tensor {name!r}", p.dtype, "floating-point tensors")
        if not tensors:
            raise ValueError(f"{owner}: nothing to average (no tensor requires grad)")
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError(f"{owner}: a tensor appears twice")
        self._names: list[str] = names
        self._tensors: list[Tensor] = tensors
        #: the averages, one per tracked tensor (same dtype, device and placement), made at the first update
        self._averages: list[Tensor] | None = None
        #: True inside average_parameters(): the tensors hold the average and _averages their own values
        self._swapped = False

    # ------------------------------------------------------------------ averaging

    @property
    def weight(self) -> float:
        """The weight :math:`w_t` the next :meth:`update` gives the current values."""
        return (self.gamma + 1.0) / (self.t + self.gamma)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current values into the average (call once after each optimizer step)."""
        self._refuse_when_swapped("update()")
        w = self.weight
        current = [local_tensor(p.detach()) for p in self._tensors]
        if self._averages is None:
            # the average of each tensor: a copy at the first update (w = 1)
            self._averages = [p.detach().clone(memory_format=torch.preserve_format) for p in self._tensors]
            self.t += 1
            return
        averages = [local_tensor(a) for a in self._averages]
        if w >= 1.0:
            if self._use_foreach():
                torch._foreach_copy_(averages, current)
            else:
                for a, x in zip(averages, current):
                    a.copy_(x)
        elif self._use_foreach():
            torch._foreach_lerp_(averages, current, w)
        else:
            for a, x in zip(averages, current):
                a.lerp_(x, w)
        self.t += 1

    step = update  # the reference's name (dog.PolynomialDecayAverager.step)

    def reset(self) -> None:
        """Restart the average: the next :meth:`update` replaces it with the current values."""
        self.t = 1

    def _use_foreach(self) -> bool:
        return True if self.foreach is None else self.foreach

    @property
    def averages(self) -> list[Tensor]:
        """The averaged tensors, in the order of :attr:`names` (raises before the first update and
        inside :meth:`average_parameters`, where the tracked tensors themselves hold the average)."""
        return self._checked_averages()

    @property
    def names(self) -> list[str]:
        """The names of the averaged tensors (module names, or "0", "1", ... for a list)."""
        return list(self._names)

    def _refuse_when_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"{type(self).__name__}: {what} inside average_parameters(), where the tensors hold the average "
                f"and the averager holds their own values; call it outside the with-block"
            )

    def _checked_averages(self, what: str = "averages") -> list[Tensor]:
        self._refuse_when_swapped(what)
        if self._averages is None:
            raise RuntimeError(f"{type(self).__name__}: no average yet; call update() after an optimizer step first")
        return self._averages

    # ------------------------------------------------------------------ evaluating at the average

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Context under which the tracked tensors hold the average; their own values come back after.

        The exchange is an exact in-place swap (no copy of the model, no rounding), done again
        on exit even if the body raises.
        """
        averages = self._checked_averages("average_parameters()")
        self._swap_all(averages)
        self._swapped = True
        try:
            yield
        finally:
            self._swap_all(averages)
            self._swapped = False

    @torch.no_grad()
    def _swap_all(self, averages: list[Tensor]) -> None:
        for p, a in zip(self._tensors, averages):
            _swap_(local_tensor(p.detach()), local_tensor(a))

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the tracked tensors with the average, for good (e.g. at the end of training)."""
        for p, a in zip(self._tensors, self._checked_averages("copy_to()")):
            local_tensor(p.detach()).copy_(local_tensor(a))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``{"t", "gamma", "averages": {name: tensor}}`` (loadable with ``weights_only=True``)."""
        self._refuse_when_swapped("state_dict()")
        averages = {} if self._averages is None else dict(zip(self._names, self._averages))
        return {"t": self.t, "gamma": self.gamma, "averages": averages}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors are copied to each tracked tensor's device)."""
        self._refuse_when_swapped("load_state_dict()")
        saved = state_dict["averages"]
        if saved:
            missing = [n for n in self._names if n not in saved]
            extra = [n for n in saved if n not in self._names]
            if missing or extra:
                raise KeyError(f"{type(self).__name__}.load_state_dict: missing {missing}, unexpected {extra}")
            if self._averages is None:
                self._averages = [p.detach().clone(memory_format=torch.preserve_format) for p in self._tensors]
            for name, a in zip(self._names, self._averages):
                local_tensor(a).copy_(local_tensor(saved[name]))
        else:
            self._averages = None
        self.t = int(state_dict["t"])
        self.gamma = float(state_dict.get("gamma", self.gamma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma}, tensors={len(self._tensors)}, t={self.t})"
