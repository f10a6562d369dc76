"""The one interface every problem implements, shared by the race and the benchmark.

A :class:`Problem` describes what to optimize (its name, step budget and, where known, its
minimum); :meth:`Problem.instantiate` builds a seeded, deterministic :class:`ProblemInstance`
holding the parameters, the training loss of each step (a minibatch where the task has data)
and an evaluation (full loss, error to the known minimum, held-out metrics).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Problem", "ProblemInstance"]


class ProblemInstance(ABC):
    """A built problem: parameters, a training loss per step, and an evaluation."""

    #: the tensors (or param groups) an optimizer is given
    params: list[Tensor]

    @abstractmethod
    def loss(self, step: int) -> Tensor:
        """The training loss at ``step`` (a minibatch where the task has data), with grad."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics at the current parameters: at least ``loss``; ``error`` where the minimum is known."""

    def position(self) -> Tensor | None:
        """The current point, for trajectories (analytic functions), else None."""
        return None

    def prepare_evaluation(self) -> None:
        """Called at the evaluation point just before :meth:`evaluate` (inside the optimizer's
        ``evaluation_point()``): models with BatchNorm recompute their running statistics there,
        for every method alike. The default does nothing."""


class Problem(ABC):
    """A named problem with a step budget; see the module docstring."""

    #: registry name
    name: ClassVar[str]
    #: one-line description
    description: ClassVar[str] = ""
    #: default number of steps (the fixed budget of the benchmark)
    default_steps: ClassVar[int] = 1000
    #: "analytic" or "learning"
    kind: ClassVar[str] = "analytic"
    #: False for problems that only wrap others (``transformed``): the ``full`` preset skips them
    in_presets: ClassVar[bool] = True

    #: the minimum value of the training objective, when known (else None)
    min_value: float | None = None

    #: the key of :meth:`ProblemInstance.evaluate` that scores this problem in the benchmark's
    #: headline: the held-out loss for learning problems, the objective for analytic functions
    target_metric: ClassVar[str] = "loss"
    #: True when a larger ``target_metric`` is better (accuracy), False when smaller is (a loss)
    target_higher_is_better: ClassVar[bool] = False

    @abstractmethod
    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> ProblemInstance:
        """Build a fresh instance (same seed, same instance)."""

    def spec(self) -> str:
        """The spec string that rebuilds this problem."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"
