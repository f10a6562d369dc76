"""The Rosenbrock race: every method from the same start, side by side.

The seed's story in one command (``tuneless race rosenbrock``): SGD whose learning rate is
proportional to the loss stalls in the banana's flat valley, while the per-parameter adaptive
methods and the learning-rate-free ones do not. This module runs the race; the table and the
picture are made by :mod:`tuneless.report.race`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .problems import AnalyticFunction, get_problem
from .registry import learning_rate_free
from .run import Trace, run
from .spec import parse_run_spec

__all__ = ["BASELINE_SPECS", "default_specs", "RaceResult", "run_race", "THRESHOLD"]

#: the baselines every race starts with: the naive idea, then torch's optimizers at their defaults
BASELINE_SPECS: tuple[str, ...] = (
    "sgd@loss_proportional",
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "adam@cosine",
)

#: the error below which a method counts as having reached the minimum
THRESHOLD = 1e-6


def default_specs() -> list[str]:
    """The baselines, then every learning-rate-free optimizer in the registry."""
    return list(BASELINE_SPECS) + learning_rate_free()


@dataclass
class RaceResult:
    function: AnalyticFunction
    steps: int
    start: list[float]
    traces: list[Trace]


def run_race(function: str = "rosenbrock", specs: Sequence[str] | None = None, *, steps: int | None = None,
             start: Sequence[float] | None = None,
             progress: Callable[[int, int, str, int, int], None] | None = None) -> RaceResult:
    """Run every spec on ``function`` from the same start.

    ``progress(i, n, spec, step, steps)`` is called as each run advances. Specs are checked
    before anything runs, so that a typo fails at once rather than after the first runs.
    """
    problem = get_problem(function)
    if not isinstance(problem, AnalyticFunction):
        raise ValueError(f"the race runs on analytic functions; {problem.name!r} is a {problem.kind} problem")
    specs = default_specs() if specs is None else list(specs)
    if not specs:
        raise ValueError("no optimizer specs to race")
    parsed = [parse_run_spec(s) for s in specs]
    from .registry import entry, scheduler_entry  # validate names up front

    for p in parsed:
        entry(p.optimizer.name)
        if p.scheduler is not None:
            scheduler_entry(p.scheduler.name)
    steps = problem.default_steps if steps is None else int(steps)
    start_point = list(problem.standard_start() if start is None else start)
    traces = []
    for i, spec in enumerate(parsed):
        cb = None if progress is None else (lambda t, n, i=i, s=str(spec): progress(i, len(parsed), s, t, n))
        traces.append(run(problem, spec, steps=steps, start=start_point, progress=cb, dtype=_dtype()))
    return RaceResult(problem, steps, start_point, traces)


def _dtype() -> Any:
    import torch

    return torch.float64  # analytic functions in float64: the race is about the methods, not rounding
