"""The naive idea, kept as a baseline: a learning rate proportional to the loss.

"Annealing by error" sets the step size in proportion to the current loss, so that it is large
far from the minimum and vanishes as the error does. It fails where it matters: in a flat
valley such as Rosenbrock's banana the error is already small while the minimizer is still far,
so the step size collapses and training stalls. It ignores how steep the function is; Polyak's
step size (:class:`tuneless.Polyak`) divides the same error by the squared gradient norm and
does not stall. ``tuneless race rosenbrock`` shows both.

This is a cautionary example, not a recommendation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from . import _validate as v

__all__ = ["LossProportionalLR"]


class LossProportionalLR(LRScheduler):
    r"""Set each group's learning rate to ``base_lr * loss / reference_loss``.

    .. math:: \eta_t = \eta_0 \cdot \mathrm{clip}\Big(\frac{f(x_t)}{f_{\mathrm{ref}}},\ \text{min\_factor},\ \text{max\_factor}\Big)

    Call ``scheduler.step(loss)`` after each ``optimizer.step()``. The reference loss is the
    first loss given unless set. Reading the loss synchronizes with the device once per step.

    Args:
        optimizer: the wrapped optimizer (any ``torch.optim.Optimizer``).
        reference_loss: the loss at which the factor is 1 (default: the first loss seen).
        min_factor: lower bound of the factor (default 0.0).
        max_factor: upper bound of the factor (default 1.0: never above the base rate).
        last_epoch: as in torch's schedulers.

    .. warning:: The baseline that stalls. See the module docstring.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, reference_loss: float | None = None,
                 min_factor: float = 0.0, max_factor: float = 1.0, last_epoch: int = -1) -> None:
        owner = "LossProportionalLR"
        v.check_optional_range(owner, "reference_loss", reference_loss, 0.0, None, inclusive="()")
        v.check_range(owner, "min_factor", min_factor, 0.0, None, inclusive="[)")
        v.check_range(owner, "max_factor", max_factor, 0.0, math.inf, inclusive="(]")
        if min_factor > max_factor:
            v.fail(owner, "min_factor", min_factor, f"min_factor <= max_factor = {max_factor}")
        self.reference_loss = None if reference_loss is None else float(reference_loss)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.factor = 1.0
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * self.factor for base in self.base_lrs]

    def step(self, loss: Any = None) -> None:  # type: ignore[override]
        """Advance one step; ``loss`` (tensor or number) sets the factor for the next step."""
        if loss is not None:
            value = float(loss)
            if not math.isfinite(value):
                self.factor = self.min_factor
            else:
                if self.reference_loss is None:
                    self.reference_loss = value if value > 0 else 1.0
                self.factor = min(max(value / self.reference_loss, self.min_factor), self.max_factor)
        super().step()
