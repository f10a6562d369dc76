"""Write the learned step sizes to TensorBoard or Weights & Biases.

::

    from torch.utils.tensorboard import SummaryWriter
    from tuneless.integrations.loggers import write_step_sizes

    writer = SummaryWriter("runs/x")              # or: run = wandb.init(...)
    for step in range(steps):
        ...
        opt.step(loss=loss)
        if step % 50 == 0:
            write_step_sizes(writer, opt, step)    # or: write_step_sizes(run, opt, step)

The step sizes (:data:`tuneless.STEP_SIZE_KEY`, ``effective_lr``: the step size itself, not the
``lr`` multiplier) are 0-d tensors on the device; they are read, which synchronizes, only here,
when they are written (TensorBoard's ``add_scalar`` would take the tensor and sync anyway).
"""

from __future__ import annotations

from typing import Any

from . import STEP_SIZE_KEY, skipped_steps, step_sizes

__all__ = ["write_step_sizes"]


def write_step_sizes(writer: Any, optimizer: Any, step: int, *, key: str = STEP_SIZE_KEY) -> dict[str, float]:
    """Write every group's learned step size at ``step``, and the count of skipped non-finite
    steps (``skipped_steps``, when the optimizer counts them); returns what was written.

    Args:
        writer: a TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``),
            or a W&B run or the ``wandb`` module (anything with ``log(dict, step=...)``).
        optimizer: the optimizer, or a framework's wrapper around it.
        step: the global step.
        key: the name: ``effective_lr`` for one group, ``effective_lr/<i>`` for several.
    """
    values = {**step_sizes(optimizer, key), **skipped_steps(optimizer)}
    if callable(getattr(writer, "add_scalar", None)):
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    elif callable(getattr(writer, "log", None)):
        writer.log(dict(values), step=step)
    else:
        raise TypeError(
            f"write_step_sizes: writer must have add_scalar(tag, value, step) (TensorBoard's SummaryWriter) or "
            f"log(dict, step=...) (a W&B run); got {type(writer).__name__}")
    return values
