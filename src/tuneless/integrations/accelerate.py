"""Accelerate (1.x) with a tuneless optimizer: the loss through ``AcceleratedOptimizer``.

``AcceleratedOptimizer.step(closure=None)`` forwards no keyword argument, so ``step(loss=...)``
cannot pass; with a gradient scaler it calls ``scaler.step(optimizer, closure)``. A method that
takes the loss (Tuneless, MoMo, Polyak, SPS) gets it through the loss channel instead
(:meth:`tuneless.TunelessOptimizer.observe_loss`). The recipe: replace
``accelerator.backward(loss)`` by :func:`backward`::

    from tuneless.integrations.accelerate import backward

    model, optimizer, data = accelerator.prepare(model, tuneless.create("tuneless", model.parameters()), data)
    for x, y in data:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            backward(accelerator, loss, optimizer)   # accelerator.backward + the loss channel
            optimizer.step()                          # AcceleratedOptimizer: step() with no argument
            optimizer.zero_grad()

It observes what ``accelerator.backward`` back-propagates, ``loss / gradient_accumulation_steps``
(unscaled: the scaler multiplies only the copy it back-propagates), so under gradient
accumulation the losses of the micro-batches add up, like their gradients, to the loss of the
step; ``AcceleratedOptimizer`` skips ``step()`` and ``zero_grad()`` until the last micro-batch.
After a step that the scaler skipped, ``zero_grad()`` drops the leftover loss. Under DDP the
optimizer averages the ranks' losses, as for ``step(loss=...)``.

Schedule-Free: ``AcceleratedOptimizer.train()``/``eval()`` reach the tuneless optimizer; call them
around evaluation (they do not reach through DeepSpeed), or use
:func:`tuneless.integrations.evaluation_mode`.
"""

from __future__ import annotations

from typing import Any

from . import observe_loss, step_sizes, unwrap

__all__ = ["backward", "step_sizes", "unwrap"]


def backward(accelerator: Any, loss: Any, optimizer: Any, **kwargs: Any) -> None:
    """``accelerator.backward(loss, **kwargs)``, then hand the loss it back-propagated (divided by
    the number of accumulation steps, as Accelerate divides it) to ``optimizer``'s next step.

    ``optimizer`` is the ``AcceleratedOptimizer`` that ``prepare`` returned, or the tuneless
    optimizer itself; for an optimizer without a loss channel (torch's own) this is
    ``accelerator.backward``.
    """
    accelerator.backward(loss, **kwargs)
    observe_loss(optimizer, loss.detach() / accelerator.gradient_accumulation_steps)
