"""Fitting tuneless into the training frameworks people use.

One small module per framework, each imported only when used (``import
tuneless.integrations.transformers``), each importing its framework only inside itself: the base
install keeps depending on torch and numpy alone. Nothing in the core imports this package.

============================================  ==============================================
module                                         what it gives
============================================  ==============================================
:mod:`tuneless.integrations.transformers`      ``TunelessTrainer`` / ``TunelessTrainerMixin``
:mod:`tuneless.integrations.lightning`         ``TunelessCallback``
:mod:`tuneless.integrations.accelerate`        ``backward(accelerator, loss, optimizer)``
:mod:`tuneless.integrations.timm`              ``register()`` into timm's optimizer factory
:mod:`tuneless.integrations.loggers`           ``write_step_sizes`` (TensorBoard, W&B)
============================================  ==============================================

What they share, defined here (no framework needed):

* :func:`unwrap` finds the tuneless optimizer inside the frameworks' wrappers
  (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).
* :func:`observe_loss` hands a loss to the optimizer's loss channel
  (:meth:`tuneless.TunelessOptimizer.observe_loss`) through those wrappers; it does nothing for
  an optimizer without the channel (a torch optimizer), so integration code needs no case.
* :func:`step_sizes` names every group's learned step size for a log (``effective_lr``, or
  ``effective_lr/<i>`` with several groups): the step size itself, not the ``lr`` multiplier
  that the frameworks log as ``learning_rate`` (1.0 for a learning-rate-free method). Reading
  it synchronizes with the device, so it is called only when a log is written.
* :func:`skipped_steps` names the count of steps skipped because a gradient or the loss was not
  finite (``skipped_steps``: one number, the decision is one per step for every group), so
  that a run that keeps hitting NaN shows it in the same dashboard as its step size.
* :func:`evaluation_mode` holds the point to evaluate or save (Schedule-Free's average).

Caution: ``prodigy-plus-schedule-free`` uses the key ``effective_lr`` for a multiplier (its users
log ``d * effective_lr``); in tuneless ``effective_lr`` is the step size itself.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..optim.base import SKIPPED_STEPS_KEY, STEP_SIZE_KEY, TunelessOptimizer

__all__ = ["unwrap", "observe_loss", "step_sizes", "skipped_steps", "evaluation_mode", "is_schedule_free",
           "STEP_SIZE_KEY", "SKIPPED_STEPS_KEY"]


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside the frameworks' wrappers: Accelerate's ``AcceleratedOptimizer``
    (``.optimizer``) and Lightning's ``LightningOptimizer`` (``._optimizer``), nested or not.

    A tuneless optimizer is returned as it is (a Schedule-Free or Mechanic wrapper is the
    optimizer that steps, not a framework's wrapper).
    """
    seen = set()
    while not isinstance(optimizer, TunelessOptimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if inner is None:
            inner = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def observe_loss(optimizer: Any, loss: Any) -> None:
    """Hand ``loss`` to the next ``step()`` of the (wrapped) optimizer: see
    :meth:`tuneless.TunelessOptimizer.observe_loss`. Nothing happens for an optimizer without a
    loss channel (torch's own), so callers need no special case."""
    inner = unwrap(optimizer)
    if isinstance(inner, TunelessOptimizer):
        inner.observe_loss(loss)


def step_sizes(optimizer: Any, key: str = STEP_SIZE_KEY) -> dict[str, float]:
    """Every group's learned step size, named for a log (synchronizes with the device).

    ``{"effective_lr": value}`` for one group, ``{"effective_lr/0": ..., "effective_lr/1": ...}``
    for several. A tuneless group reports :data:`~tuneless.STEP_SIZE_KEY` (the step size of its
    last step, its ``lr`` multiplier included); before the first step, and for a torch
    optimizer, the group's ``lr``.
    """
    groups = unwrap(optimizer).param_groups
    values = [float(g.get(STEP_SIZE_KEY, g.get("lr", float("nan")))) for g in groups]
    if len(values) == 1:
        return {key: values[0]}
    return {f"{key}/{i}": value for i, value in enumerate(values)}


def skipped_steps(optimizer: Any, key: str = SKIPPED_STEPS_KEY) -> dict[str, float]:
    """``{"skipped_steps": n}``: how many steps the (wrapped) tuneless optimizer skipped because a
    gradient or the loss was not finite (synchronizes). One number: the decision is one per
    step for all groups, so every group's counter holds it. Empty for an optimizer that does not
    count (a torch optimizer, or ``skip_nonfinite=False``) or before its first step."""
    counts = [g[SKIPPED_STEPS_KEY] for g in unwrap(optimizer).param_groups if SKIPPED_STEPS_KEY in g]
    return {key: float(max(int(c) for c in counts))} if counts else {}


def is_schedule_free(optimizer: Any) -> bool:
    """Whether the (wrapped) optimizer has Schedule-Free's train and eval modes."""
    inner = unwrap(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


@contextlib.contextmanager
def evaluation_mode(optimizer: Any) -> Iterator[None]:
    """Context under which the parameters hold the point to evaluate or save.

    For a tuneless optimizer, its :meth:`~tuneless.TunelessOptimizer.evaluation_point` (the
    Schedule-Free average, then back to the mode it was in; nothing for other methods). Another
    optimizer with ``eval()``/``train()`` (the ``schedulefree`` package) is put in eval mode and
    back in train mode on exit.
    """
    inner = unwrap(optimizer)
    if isinstance(inner, TunelessOptimizer):
        with inner.evaluation_point():
            yield
    elif is_schedule_free(inner):
        inner.eval()
        try:
            yield
        finally:
            inner.train()
    else:
        yield
