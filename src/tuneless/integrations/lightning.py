"""Lightning (``pytorch_lightning`` 2.6) with a tuneless optimizer: one callback.

::

    import pytorch_lightning as pl
    from tuneless.integrations.lightning import TunelessCallback

    class Model(pl.LightningModule):
        ...
        def configure_optimizers(self):
            return tuneless.create("tuneless", self.parameters())

    pl.Trainer(callbacks=[TunelessCallback()], precision="32-true").fit(Model(), data)

What it does (read from lightning 2.6 ``core/optimizer.py`` and ``plugins/precision/amp.py``):

* **The loss.** In 32-bit and bf16-mixed precision Lightning calls ``optimizer.step(closure)``:
  a tuneless optimizer takes the loss from the closure, and the callback has nothing to do. In
  16-mixed precision the plugin runs the closure itself and calls ``scaler.step(optimizer)``
  with no argument; there the callback hands each back-propagated loss to the loss channel
  (:meth:`tuneless.TunelessOptimizer.observe_loss`) from ``on_before_backward``, *unscaled*
  (that hook sees the loss times the scaler's scale; dividing by ``scaler.scale(1)`` is exact,
  the scale being a power of two, and needs no sync). Automatic optimization only: under manual
  optimization call ``opt.step(loss=...)`` yourself.
* **Gradient accumulation** (``accumulate_grad_batches > 1``) with a method that takes the loss
  works in 16-mixed (every micro-batch's loss is observed, and they add up like the gradients),
  and is refused at fit start otherwise: there the closure returns only the last micro-batch's
  loss, which is not the loss of the accumulated gradient.
* **Schedule-Free modes.** ``optimizer.train()`` at the start of training and of each training
  epoch (also after a checkpoint restored an optimizer saved in eval mode), ``eval()`` for
  validation and back to ``train()`` after it; checkpoints hold the averaged point: the model's
  and the optimizer's state in the checkpoint are taken in eval mode.
* **The learned step sizes in the logs.** Every group's ``effective_lr`` (``effective_lr/<i>``
  with several groups), written to every logger of the Trainer when Lightning writes its own
  logs (every ``log_every_n_steps``), and only then read. :attr:`TunelessCallback.history`
  keeps what was written. Lightning's ``LearningRateMonitor`` shows ``lr``, the multiplier.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytorch_lightning as pl
import torch

from . import evaluation_mode, is_schedule_free, skipped_steps, step_sizes, unwrap
from ..optim.base import TunelessOptimizer

__all__ = ["TunelessCallback"]


class TunelessCallback(pl.Callback):
    """Loss channel under 16-mixed, Schedule-Free modes, and learned step sizes in the logs.

    Args:
        log_step_sizes: write every group's learned step size, and the count of skipped non-finite
            steps (``skipped_steps``), to the Trainer's loggers.
        key: the name they are logged under (``effective_lr``).
    """

    def __init__(self, *, log_step_sizes: bool = True, key: str = "effective_lr") -> None:
        super().__init__()
        self.log_step_sizes = bool(log_step_sizes)
        self.key = key
        #: what was written: one ``{"step": global_step, key: value, ...}`` per write
        self.history: list[dict[str, float]] = []
        self._validating_in_fit = False

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _optimizers(trainer: "pl.Trainer") -> list[Any]:
        return [unwrap(opt) for opt in trainer.optimizers]

    @staticmethod
    def _scaler(trainer: "pl.Trainer") -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def _train_mode(self, trainer: "pl.Trainer") -> None:
        for opt in self._optimizers(trainer):
            if is_schedule_free(opt):
                opt.train()

    # ------------------------------------------------------------------ fit

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization or self._scaler(trainer) is not None:
            return
        if trainer.accumulate_grad_batches > 1:
            for opt in self._optimizers(trainer):
                if getattr(opt, "requires_loss", False):
                    raise ValueError(
                        f"TunelessCallback: {type(opt).__name__} computes its step size from the loss, and with "
                        f"accumulate_grad_batches={trainer.accumulate_grad_batches} in precision "
                        f"{trainer.precision!r} Lightning's closure returns only the last micro-batch's loss, not "
                        f"the loss of the accumulated gradient; use accumulate_grad_batches=1, or a method that "
                        f"does not take the loss (e.g. 'prodigy')")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._train_mode(trainer)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._train_mode(trainer)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        scaler = self._scaler(trainer)
        if scaler is None or not pl_module.automatic_optimization:
            return  # the optimizer gets Lightning's closure, whose return value is the loss
        unscaled = loss.detach() / scaler.scale(torch.ones((), device=loss.device))
        for opt in self._optimizers(trainer):
            if isinstance(opt, TunelessOptimizer):
                opt.observe_loss(unscaled)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.log_step_sizes or not trainer.loggers or not _should_update_logs(trainer):
            return
        values: dict[str, float] = {}
        optimizers = trainer.optimizers
        for i, opt in enumerate(optimizers):
            for name, value in {**step_sizes(opt, self.key), **skipped_steps(opt)}.items():
                values[name if len(optimizers) == 1 else f"{name}/optimizer{i}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **values})

    # ------------------------------------------------------------------ validation

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validating_in_fit = trainer.training or trainer.state.fn == "fit"
        for opt in self._optimizers(trainer):
            if is_schedule_free(opt):
                opt.eval()

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._validating_in_fit:
            self._train_mode(trainer)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        optimizers = self._optimizers(trainer)
        if not any(is_schedule_free(opt) for opt in optimizers):
            return
        # The checkpoint was taken in train mode (parameters at y): take the model's and the
        # optimizers' state again at the averaged point x, in eval mode (copies: the parameters
        # go back to y on exit).
        # (The optimizers' state tensors do not change in eval mode; only the mode flags in the
        # param groups do, and state_dict() copies those.)
        with contextlib.ExitStack() as stack:
            for opt in trainer.optimizers:
                stack.enter_context(evaluation_mode(opt))
            checkpoint["state_dict"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in trainer.strategy.lightning_module_state_dict().items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(opt) for opt in trainer.optimizers]



def _should_update_logs(trainer: "pl.Trainer") -> bool:
    """Whether Lightning writes its own logs at this step (its logger connector decides; private in 2.6)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
