"""A problem whose loss, as the optimizer sees it, is transformed: ``scale * loss + shift``.

The robustness check of the default optimizer (``docs/default.md``): a method whose step size
reads the loss (Polyak, MoMo, Tuneless) should not care whether the loss is written in other
units (``scale``) or carries a constant (``shift``, e.g. an unknown positive minimum). The
optimizer gets the transformed loss and its gradient (``scale`` times the original); the
evaluation (held-out metrics, the objective of an analytic function, the error to a known
minimum) is the inner problem's, unchanged, so runs are scored exactly as on the inner problem.

    tuneless bench --problems "transformed:problem='mlp_digits',scale=1000.0"

It is not part of any preset: ``full`` runs the registered problems themselves.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as v
from .base import Problem, ProblemInstance

__all__ = ["Transformed"]


class _TransformedInstance(ProblemInstance):
    def __init__(self, inner: ProblemInstance, scale: float, shift: float) -> None:
        self.inner = inner
        self.params = inner.params
        self.scale, self.shift = scale, shift

    def loss(self, step: int) -> Tensor:
        return self.inner.loss(step) * self.scale + self.shift

    def evaluate(self) -> dict[str, float]:
        return self.inner.evaluate()

    def position(self) -> Tensor | None:
        return self.inner.position()

    def prepare_evaluation(self) -> None:
        self.inner.prepare_evaluation()

    def __getattr__(self, name: str) -> Any:  # what else the inner instance offers (e.g. autocast hooks)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Transformed(Problem):
    """The loss seen by the optimizer is ``scale * loss + shift``; the evaluation is the inner problem's."""

    name = "transformed"
    description = "another problem whose loss, as the optimizer sees it, is scale * loss + shift (robustness checks)"
    #: not in any preset (``full`` runs the registered problems themselves)
    in_presets = False
    #: neither analytic nor learning until built: an instance takes its inner problem's kind
    kind = "wrapper"

    def __init__(self, problem: str = "rosenbrock", scale: float = 1.0, shift: float = 0.0) -> None:
        from . import get_problem

        if not isinstance(problem, str) or problem.split(":")[0].lower() == self.name:
            v.fail("problem 'transformed'", "problem", problem, "the spec of another registered problem")
        v.check_range("problem 'transformed'", "scale", scale, 0.0, None, inclusive="()", recommended=1.0)
        v.check_range("problem 'transformed'", "shift", shift, recommended=0.0)
        self.inner = get_problem(problem)
        self.scale, self.shift = float(scale), float(shift)
        # the inner problem's scoring and budget, so that runs are scored as on it
        self.kind = self.inner.kind
        self.default_steps = self.inner.default_steps
        self.min_value = self.inner.min_value
        self.target_metric = self.inner.target_metric
        self.target_higher_is_better = self.inner.target_higher_is_better
        for attr in ("bench_dtype",):
            if hasattr(self.inner, attr):
                setattr(self, attr, getattr(self.inner, attr))

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> ProblemInstance:
        inner = self.inner.instantiate(seed, dtype=dtype, device=device, start=start)
        return _TransformedInstance(inner, self.scale, self.shift)

    def spec(self) -> str:
        def num(x: float) -> str:
            return repr(float(x)) if math.isfinite(x) else str(x)

        return f"transformed:problem={self.inner.spec()!r},scale={num(self.scale)},shift={num(self.shift)}"
