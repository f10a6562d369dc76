"""Hugging Face ``Trainer`` with a tuneless optimizer (transformers 5.x).

Use :class:`TunelessTrainer` in place of ``Trainer``, and give it the optimizer::

    from transformers import TrainingArguments
    import tuneless
    from tuneless.integrations.transformers import TunelessTrainer

    opt = tuneless.create("tuneless", model.parameters())
    args = TrainingArguments(output_dir="out", max_steps=1000, lr_scheduler_type="constant")
    trainer = TunelessTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()

What it adds to ``Trainer`` (read from transformers 5.x ``Trainer._inner_training_loop``, which
calls ``optimizer.step()`` with no argument):

* **The loss reaches the optimizer.** ``training_step`` returns the loss it back-propagated
  (divided by the number of accumulated micro-batches when the gradients are); each one is
  handed to the loss channel (:meth:`tuneless.TunelessOptimizer.observe_loss`), so the step
  gets the loss of the accumulated gradient, and loss-based methods (Tuneless, MoMo, Polyak,
  SPS) work. A loss left over by a step that the gradient scaler skipped is dropped after
  ``optimizer.step()`` (``on_optimizer_step``), since the Trainer zeroes the gradients through
  the model, not the optimizer.
* **The learned step size in the logs.** Every training log gets each group's ``effective_lr``
  (the step size, not the multiplier that ``learning_rate`` shows), through ``Trainer.log``, so
  ``log_history``, TensorBoard and W&B get it. Read only when a log is written.
* **Schedule-Free checkpoints hold the average.** The model (and optimizer) are saved under
  :func:`tuneless.integrations.evaluation_mode` (``save_model`` and checkpoints); the Trainer
  itself calls ``optimizer.eval()``/``train()`` around evaluation.
* **Warnings** when the lr scheduler is not ``constant`` (or ``constant_with_warmup``): the
  default ``linear`` decays the multiplier to 0 over the run, on top of a learning-rate-free
  method, and double-schedules Schedule-Free. Also when a learning-rate-free optimizer's ``lr``
  is not 1.0 (``optimizer_cls_and_kwargs`` passes ``learning_rate``, 5e-5 by default).

For a Trainer subclass of your own, mix in :class:`TunelessTrainerMixin` first:
``class MyTrainer(TunelessTrainerMixin, Trainer)``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from . import evaluation_mode, observe_loss, skipped_steps, step_sizes, unwrap
from ..optim.base import TunelessOptimizer

__all__ = ["TunelessTrainer", "TunelessTrainerMixin", "NON_DECAYING_SCHEDULERS"]

#: The ``lr_scheduler_type`` values that leave the multiplier alone after warmup.
NON_DECAYING_SCHEDULERS = ("constant", "constant_with_warmup")


class _DropLeftoverLoss(TrainerCallback):
    """After ``optimizer.step()``: drop a loss that a skipped step (inf/NaN gradients under a
    gradient scaler) left observed, so that the next step never adds it to its own."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        inner = unwrap(self.trainer.optimizer)
        if isinstance(inner, TunelessOptimizer):
            inner.zero_grad(set_to_none=True)  # the Trainer's model.zero_grad() follows anyway


class TunelessTrainerMixin:
    """The tuneless additions to a ``transformers.Trainer`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_DropLeftoverLoss(self))  # type: ignore[attr-defined]

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        observe_loss(self.optimizer, loss)  # type: ignore[attr-defined]
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "learning_rate" in logs and getattr(self, "optimizer", None) is not None:  # a training log
            logs.update(step_sizes(self.optimizer))  # type: ignore[attr-defined]
            logs.update(skipped_steps(self.optimizer))  # type: ignore[attr-defined]
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        building = getattr(self, "lr_scheduler", None) is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        inner = unwrap(optimizer if optimizer is not None else self.optimizer)  # type: ignore[attr-defined]
        if isinstance(inner, TunelessOptimizer):
            self._warn_about_schedule(inner, building)
        return scheduler

    def _warn_about_schedule(self, optimizer: TunelessOptimizer, built_here: bool) -> None:
        name = type(optimizer).__name__
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)  # type: ignore[attr-defined]
        if built_here and kind not in NON_DECAYING_SCHEDULERS:
            warnings.warn(
                f"TunelessTrainer: lr_scheduler_type={kind!r} scales the lr multiplier of {name} over the run "
                f"(the default 'linear' decays it to 0), on top of a step size the optimizer learns (or, for "
                f"Schedule-Free, on top of its own averaging); pass lr_scheduler_type='constant' in "
                f"TrainingArguments unless you mean it",
                UserWarning, stacklevel=3)
        if getattr(optimizer, "learning_rate_free", False):
            lrs = sorted({float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups})  # before warmup
            if lrs != [1.0]:
                warnings.warn(
                    f"TunelessTrainer: {name}'s lr is a multiplier of the step size it learns (1.0 unless you "
                    f"mean to scale it), and it is {lrs}; with optimizer_cls_and_kwargs the Trainer passes "
                    f"TrainingArguments.learning_rate (5e-5 by default): build the optimizer yourself and pass "
                    f"optimizers=(opt, None), or set learning_rate=1.0",
                    UserWarning, stacklevel=3)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        with evaluation_mode(self.optimizer) if getattr(self, "optimizer", None) is not None \
                else contextlib.nullcontext():
            super().save_model(*args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        with evaluation_mode(self.optimizer):  # type: ignore[attr-defined]
            super()._save_checkpoint(*args, **kwargs)  # type: ignore[misc]


class TunelessTrainer(TunelessTrainerMixin, Trainer):
    """``transformers.Trainer`` that passes the loss to a tuneless optimizer, logs its learned
    step sizes, saves Schedule-Free's average, and warns about decaying schedulers."""

