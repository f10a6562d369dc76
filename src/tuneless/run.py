"""Running one optimizer spec on one problem: the loop shared by the race and the benchmark.

This module only runs and records; it neither stores nor plots. A run gives a :class:`Trace`:
the training loss and the step size at every step, the trajectory for analytic functions,
the evaluation curves (every metric of ``evaluate()`` at a few fixed steps), the final metrics
and whether it diverged.

Evaluations happen at the optimizer's evaluation point (``evaluation_point()``: the averaged x
of Schedule-Free methods) after ``instance.prepare_evaluation()`` (BatchNorm statistics
recomputed there), under ``torch.random.fork_rng``: evaluating never changes training, neither
its parameters nor the random numbers it draws. The evaluation steps are :func:`evaluation_steps`:
the start (step 0), ``eval_points`` evenly spaced steps, and the last.
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

__all__ = ["Trace", "run", "optimizer_step", "step_size_of", "evaluation_point", "evaluation_steps",
           "EVAL_POINTS", "AUTOCAST_DTYPES"]

#: a loss this many times the first one counts as divergence
DIVERGENCE_FACTOR = 1e8
#: evenly spaced evaluation points of a run (besides the start)
EVAL_POINTS = 20
#: the dtypes the forward pass may be autocast to (parameters keep theirs)
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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
    #: the steps after which the run was evaluated (0 = the start), and each metric there
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eval_metrics: dict[str, np.ndarray] = field(default_factory=dict)

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


def evaluation_steps(steps: int, eval_points: int = EVAL_POINTS) -> list[int]:
    """The steps after which a run of ``steps`` steps is evaluated: 0 (the start), ``eval_points``
    evenly spaced steps ``round(k * steps / eval_points)``, and ``steps`` (duplicates removed)."""
    if isinstance(eval_points, bool) or not isinstance(eval_points, int) or eval_points < 0:
        raise ValueError(f"eval_points = {eval_points!r} is invalid; allowed: an integer >= 0")
    points = {0, int(steps)} | {int(round(k * steps / eval_points)) for k in range(1, eval_points + 1)}
    return sorted(p for p in points if 0 <= p <= steps)


def _evaluate(instance: Any, optimizer: torch.optim.Optimizer, device: torch.device,
              autocast: torch.dtype | None) -> dict[str, float]:
    """Every metric at the optimizer's evaluation point, leaving training's RNG untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), evaluation_point(optimizer), _autocast(device, autocast):
        instance.prepare_evaluation()
        return {k: float(v) for k, v in instance.evaluate().items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_float_array(values: list[Any]) -> np.ndarray:
    if not values:
        return np.zeros(0)
    tensors = [v.detach().reshape(()).to(torch.float64).cpu() if isinstance(v, Tensor)
               else torch.tensor(float(v), dtype=torch.float64) for v in values]
    return torch.stack(tensors).numpy()


def run(problem: Problem | str, spec: RunSpec | str, *, steps: int | None = None, seed: int = 0,
        start: Any = None, dtype: torch.dtype = torch.float32, check_every: int = 50,
        progress: Callable[[int, int], None] | None = None, eval_points: int = EVAL_POINTS,
        device: str | torch.device = "cpu", autocast: torch.dtype | None = None) -> Trace:
    """Run ``spec`` on ``problem`` for ``steps`` steps (default: the problem's budget).

    Divergence (a non-finite loss, or one :data:`DIVERGENCE_FACTOR` times the first) stops the
    run early and is recorded; an exception raised by the optimizer is recorded, not re-raised.
    The loss is read back from the device only every ``check_every`` steps.

    The run is evaluated at :func:`evaluation_steps` ``(steps, eval_points)`` (``eval_points=0``:
    at the start and the end only); the final metrics are those of the last evaluation. The
    problem is built on ``device`` with parameters in ``dtype``; ``autocast`` (e.g.
    ``torch.bfloat16``) runs the forward passes under ``torch.autocast``.
    """
    problem = get_problem(problem) if isinstance(problem, str) else problem
    spec = parse_run_spec(spec) if isinstance(spec, str) else spec
    steps = problem.default_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps = {steps} is invalid; allowed: steps >= 1")
    if autocast is not None and autocast not in AUTOCAST_DTYPES.values():
        raise ValueError(f"autocast = {autocast!r} is invalid; allowed: None or one of "
                         f"{', '.join('torch.' + k for k in AUTOCAST_DTYPES)}")
    device = torch.device(device)
    eval_at = set(evaluation_steps(steps, eval_points))
    torch.manual_seed(seed)
    instance = problem.instantiate(seed, dtype=dtype, device=device, start=start)
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
    eval_steps: list[int] = []
    evaluations: list[dict[str, float]] = []
    eval_seconds = 0.0

    def evaluate_now(t: int) -> None:
        nonlocal eval_seconds
        t_eval = time.perf_counter()
        eval_steps.append(t)
        evaluations.append(_evaluate(instance, optimizer, device, autocast))
        eval_seconds += time.perf_counter() - t_eval

    t0 = time.perf_counter()
    evaluate_now(0)
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast):
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
        if t + 1 in eval_at and t + 1 < steps:
            evaluate_now(t + 1)
        if (t + 1) % check_every == 0 or t + 1 == steps:
            value = float(loss.detach())
            if first_loss is None:
                first_loss = float(losses[0])
            if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * max(abs(first_loss), 1.0):
                diverged = True
                break
            if progress is not None:
                progress(t + 1, steps)
    seconds = time.perf_counter() - t0 - eval_seconds
    done = len(losses)
    if eval_steps[-1] != done:  # the final evaluation (after a stop, too)
        evaluate_now(done)
    final = dict(evaluations[-1])
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
        eval_steps=np.asarray(eval_steps, dtype=np.int64),
        eval_metrics={k: np.array([e.get(k, math.nan) for e in evaluations], dtype=np.float64)
                      for k in dict.fromkeys(k for e in evaluations for k in e)},
    )
    if problem.min_value is not None:
        trace.extra["min_value"] = float(problem.min_value)
    return trace
