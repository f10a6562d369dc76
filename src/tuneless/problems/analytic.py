"""Analytic test functions with known minimum value and minimizer.

* ``rosenbrock``: Rosenbrock's banana, (1 - x)^2 + 100 (y - x^2)^2, minimum 0 at (1, 1),
  standard start (-1.2, 1) (H. H. Rosenbrock, The Computer Journal 3(3), 1960).
* ``rosenbrock_nd``: its chained N-D form, sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2,
  minimum 0 at (1, ..., 1), start (-1.2, 1, -1.2, 1, ...) (Moré, Garbow & Hillstrom 1981).
* ``beale``: (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2, minimum 0 at
  (3, 0.5), start (1, 1.5).
* ``quadratic``: 1/2 (x - 1)^T A (x - 1) + offset with eigenvalues log-spaced in
  [1, condition] and a fixed random rotation; minimum ``offset`` at (1, ..., 1), start 0.
* ``rastrigin``: 10 n + sum_i (x_i^2 - 10 cos(2 pi x_i)), many local minima, minimum 0 at 0,
  start (2.2, 2.2, ...).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from .. import _validate as v
from .base import Problem, ProblemInstance

__all__ = ["AnalyticFunction", "Rosenbrock", "RosenbrockND", "Beale", "Quadratic", "Rastrigin"]


class AnalyticFunction(Problem):
    """A deterministic function of one parameter vector with a known minimum."""

    kind = "analytic"
    #: plotting window for 2-D functions: ((xmin, xmax), (ymin, ymax))
    bounds: ClassVar[tuple[tuple[float, float], tuple[float, float]]] = ((-2.0, 2.0), (-2.0, 2.0))

    def __init__(self, dim: int = 2) -> None:
        self.dim = dim

    def value(self, x: Tensor) -> Tensor:
        """f(x) for x of shape (..., dim): batched, so that contour grids evaluate at once."""
        raise NotImplementedError

    def minimizer(self) -> list[float]:
        raise NotImplementedError

    def standard_start(self) -> list[float]:
        raise NotImplementedError

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> "AnalyticInstance":
        x0 = self.standard_start() if start is None else [float(s) for s in start]
        if len(x0) != self.dim:
            raise ValueError(f"{self.name}: start has {len(x0)} coordinates; the function has dim = {self.dim}")
        return AnalyticInstance(self, torch.tensor(x0, dtype=dtype, device=device))


class AnalyticInstance(ProblemInstance):
    def __init__(self, function: AnalyticFunction, x0: Tensor) -> None:
        self.function = function
        self.x = torch.nn.Parameter(x0.clone())
        self.params = [self.x]
        self._x_star = torch.tensor(function.minimizer(), dtype=torch.float64)

    def loss(self, step: int) -> Tensor:
        return self.function.value(self.x)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        x = self.x.detach().to(torch.float64)
        f = float(self.function.value(x))
        return {
            "loss": f,
            "error": f - float(self.function.min_value),
            "distance": float(torch.linalg.vector_norm(x - self._x_star)),
        }

    def position(self) -> Tensor:
        return self.x.detach().clone()


class Rosenbrock(AnalyticFunction):
    name = "rosenbrock"
    description = "Rosenbrock's banana in 2-D: a curved flat valley, minimum 0 at (1, 1)"
    default_steps = 5000
    min_value = 0.0
    bounds = ((-2.0, 2.0), (-1.0, 3.0))

    def __init__(self) -> None:
        super().__init__(2)

    def value(self, x: Tensor) -> Tensor:
        a, b = x[..., 0], x[..., 1]
        return (1 - a) ** 2 + 100 * (b - a**2) ** 2

    def minimizer(self) -> list[float]:
        return [1.0, 1.0]

    def standard_start(self) -> list[float]:
        return [-1.2, 1.0]


class RosenbrockND(AnalyticFunction):
    name = "rosenbrock_nd"
    description = "chained Rosenbrock in N dimensions, minimum 0 at (1, ..., 1)"
    default_steps = 5000
    min_value = 0.0

    def __init__(self, dim: int = 10) -> None:
        v.check_range("rosenbrock_nd", "dim", dim, 2, None, integer=True)
        super().__init__(int(dim))

    def value(self, x: Tensor) -> Tensor:
        head, tail = x[..., :-1], x[..., 1:]
        return (100 * (tail - head**2) ** 2 + (1 - head) ** 2).sum(-1)

    def minimizer(self) -> list[float]:
        return [1.0] * self.dim

    def standard_start(self) -> list[float]:
        return [-1.2 if i % 2 == 0 else 1.0 for i in range(self.dim)]

    def spec(self) -> str:
        return f"{self.name}:dim={self.dim}"


class Beale(AnalyticFunction):
    name = "beale"
    description = "Beale's function: flat plateaus and steep walls, minimum 0 at (3, 0.5)"
    default_steps = 5000
    min_value = 0.0
    bounds = ((-4.5, 4.5), (-4.5, 4.5))

    def __init__(self) -> None:
        super().__init__(2)

    def value(self, x: Tensor) -> Tensor:
        a, b = x[..., 0], x[..., 1]
        return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2

    def minimizer(self) -> list[float]:
        return [3.0, 0.5]

    def standard_start(self) -> list[float]:
        return [1.0, 1.5]


class Quadratic(AnalyticFunction):
    name = "quadratic"
    description = "rotated quadratic of a chosen condition number, minimum `offset` at (1, ..., 1)"
    default_steps = 2000
    bounds = ((-1.0, 3.0), (-1.0, 3.0))

    def __init__(self, dim: int = 10, condition: float = 1000.0, offset: float = 0.0, rotate: bool = True) -> None:
        v.check_range("quadratic", "dim", dim, 1, None, integer=True)
        v.check_range("quadratic", "condition", condition, 1.0, None)
        v.check_range("quadratic", "offset", offset)
        v.check_bool("quadratic", "rotate", rotate)
        super().__init__(int(dim))
        self.condition, self.offset, self.rotate = float(condition), float(offset), rotate
        self.min_value = self.offset
        eig = torch.logspace(0, math.log10(self.condition), self.dim, dtype=torch.float64)
        if rotate and self.dim > 1:
            gen = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen, dtype=torch.float64))
        else:
            q = torch.eye(self.dim, dtype=torch.float64)
        self.matrix = q @ torch.diag(eig) @ q.T

    def value(self, x: Tensor) -> Tensor:
        a = self.matrix.to(dtype=x.dtype, device=x.device)
        e = x - 1.0
        return 0.5 * ((e @ a) * e).sum(-1) + self.offset

    def minimizer(self) -> list[float]:
        return [1.0] * self.dim

    def standard_start(self) -> list[float]:
        return [0.0] * self.dim

    def spec(self) -> str:
        return f"{self.name}:dim={self.dim},condition={self.condition:g},offset={self.offset:g},rotate={self.rotate}"


class Rastrigin(AnalyticFunction):
    name = "rastrigin"
    description = "Rastrigin's function: a bowl covered in local minima, minimum 0 at 0"
    default_steps = 2000
    min_value = 0.0
    bounds = ((-5.12, 5.12), (-5.12, 5.12))

    def __init__(self, dim: int = 2) -> None:
        v.check_range("rastrigin", "dim", dim, 1, None, integer=True)
        super().__init__(int(dim))

    def value(self, x: Tensor) -> Tensor:
        return 10.0 * self.dim + (x**2 - 10.0 * torch.cos(2 * math.pi * x)).sum(-1)

    def minimizer(self) -> list[float]:
        return [0.0] * self.dim

    def standard_start(self) -> list[float]:
        return [2.2] * self.dim

    def spec(self) -> str:
        return self.name if self.dim == 2 else f"{self.name}:dim={self.dim}"
