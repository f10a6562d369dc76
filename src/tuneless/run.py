"""Running one optimizer spec on one problem: the loop shared by the race and the benchmark.

This module only runs and records; it neither stores nor plots. A run gives a :class:`Trace`:
the training loss and the step size at every step, the trajectory for analytic functions,
the final metrics (at the optimizer's evaluation point) and whether it diverged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .optim.base import STEP_SIZE_KEY, TunelessOptimizer
from .problems import Problem, get_problem
from .registry import create, create_scheduler
from .spec import RunSpec, parse_run_spec

__all__ = ["Trace", "run", "optimizer_step", "step_size_of", "evaluation_point"]

#: a loss this many times the first one counts as divergence
DIVERGENCE_FACTOR = 1e8


@dataclass
class Trace:
    """What one run recorded (arrays indexed by step; positions include the start)."""

    spec: str
    problem: str
    steps: int
    seed: int
    loss: np.ndarray
    step_size: np.ndarray
    positions: np.ndarray | None
    final: dict[str, float]
    diverged: bool = False
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def steps_to(self, threshold: float, key: str = "error") -> int | None:
        """First step after which ``key`` (``error``: loss minus the known minimum) is <= threshold."""
        series = self.series(key)
        hits = np.nonzero(series <= threshold)[0]
        return int(hits[0]) if hits.size else None

    def series(self, key: str = "error") -> np.ndarray:
        if key == "loss":
            return self.loss
        if key == "error":
            return self.loss - self.extra.get("min_value", 0.0)
        raise KeyError(key)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """Step any optimizer: tuneless ones get the loss (for those that need it), torch's do not."""
    if isinstance(optimizer, TunelessOptimizer):
        optimizer.step(loss=loss)
    else:
        optimizer.step()


def step_size_of(optimizer: torch.optim.Optimizer) -> Any:
    """The first group's step size (a 0-d tensor or a float; not synchronized)."""
    group = optimizer.param_groups[0]
    return group.get(STEP_SIZE_KEY, group["lr"])


def evaluation_point(optimizer: torch.optim.Optimizer):
    """The optimizer's evaluation-point context (a no-op for torch's optimizers)."""
    hook = getattr(optimizer, "evaluation_point", None)
    if hook is None:
        import contextlib

        return contextlib.nullcontext()
    return hook()


def _as_float_array(values: list[Any]) -> np.ndarray:
    if not values:
        return np.zeros(0)
    tensors = [v.detach().reshape(()).to(torch.float64).cpu() if isinstance(v, Tensor)
               else torch.tensor(float(v), dtype=torch.float64) for v in values]
    return torch.stack(tensors).numpy()


def run(problem: Problem | str, spec: RunSpec | str, *, steps: int | None = None, seed: int = 0,
        start: Any = None, dtype: torch.dtype = torch.float32, check_every: int = 50,
        progress: Callable[[int, int], None] | None = None) -> Trace:
    """Run ``spec`` on ``problem`` for ``steps`` steps (default: the problem's budget).

    Divergence (a non-finite loss, or one :data:`DIVERGENCE_FACTOR` times the first) stops the
    run early and is recorded; an exception raised by the optimizer is recorded, not re-raised.
    The loss is read back from the device only every ``check_every`` steps.
    """
    problem = get_problem(problem) if isinstance(problem, str) else problem
    spec = parse_run_spec(spec) if isinstance(spec, str) else spec
    steps = problem.default_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps = {steps} is invalid; allowed: steps >= 1")
    torch.manual_seed(seed)
    instance = problem.instantiate(seed, dtype=dtype, start=start)
    optimizer = create(spec.optimizer, instance.params)
    scheduler, sched_entry = (None, None)
    if spec.scheduler is not None:
        scheduler, sched_entry = create_scheduler(spec.scheduler, optimizer, total_steps=steps)
    track = instance.position() is not None
    losses: list[Tensor] = []
    step_sizes: list[Any] = []
    positions = [instance.position()] if track else []
    diverged, error = False, None
    first_loss = None
    t0 = time.perf_counter()
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = instance.loss(t)
        loss.backward()
        try:
            optimizer_step(optimizer, loss)
        except Exception as exc:  # recorded, so that a sweep never crashes on one method
            error = f"{type(exc).__name__}: {exc}"
            break
        if scheduler is not None:
            if sched_entry.takes_loss:
                scheduler.step(loss.detach())
            else:
                scheduler.step()
        losses.append(loss.detach())
        step_sizes.append(step_size_of(optimizer))
        if track:
            positions.append(instance.position())
        if (t + 1) % check_every == 0 or t + 1 == steps:
            value = float(loss.detach())
            if first_loss is None:
                first_loss = float(losses[0])
            if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * max(abs(first_loss), 1.0):
                diverged = True
                break
            if progress is not None:
                progress(t + 1, steps)
    seconds = time.perf_counter() - t0
    with evaluation_point(optimizer):
        final = instance.evaluate()
    if not all(math.isfinite(v) for v in final.values()):
        diverged = True
    loss_arr = _as_float_array(losses)
    if loss_arr.size and not np.all(np.isfinite(loss_arr)):
        diverged = True
    trace = Trace(
        spec=str(spec), problem=problem.spec(), steps=steps, seed=seed, loss=loss_arr,
        step_size=_as_float_array(step_sizes),
        positions=torch.stack(positions).to(torch.float64).numpy() if track else None,
        final=final, diverged=diverged, error=error, seconds=seconds,
    )
    if problem.min_value is not None:
        trace.extra["min_value"] = float(problem.min_value)
    return trace
