"""The oracle baseline: Adam and SGD with momentum, cosine-annealed to 0, over a learning-rate grid.

For each problem the oracle runs both bases over a log-spaced grid of learning rates
(``points_per_decade`` points per decade, the initial ranges in :data:`BASES`) and keeps the
best final training loss: the learning rate an oracle would have picked. The grid is **widened**
automatically: while the best point of a base sits at an end of its grid, ``widen_by`` more
points are added beyond that end (up to ``limits``), so that the optimum found is never an
artefact of where the grid stopped. With several seeds a grid point's score is the geometric
mean over seeds (a diverged seed makes it infinite).

Learning rates are ``10 ** (k / points_per_decade)`` for integer ``k``, rounded to three
significant digits, so that grids of different densities share their points and each point
has one spec string (its key in the store): quick and full sweeps reuse each other's runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..spec import parse_run_spec

__all__ = ["OracleBase", "GridConfig", "BASES", "lr_value", "initial_grid", "widen", "oracle_spec"]


@dataclass(frozen=True)
class OracleBase:
    """One tuned baseline: a spec template with ``{lr}``, and its initial grid in decades."""

    name: str
    template: str
    low: float
    high: float


#: the two bases of the oracle, each cosine-annealed to 0 over the budget
BASES: tuple[OracleBase, ...] = (
    OracleBase("adam", "adam:lr={lr}@cosine", -4.0, -1.0),
    OracleBase("sgd", "sgd:lr={lr},momentum=0.9@cosine", -3.0, 0.0),
)


@dataclass(frozen=True)
class GridConfig:
    """Density of the grid, how far one widening goes, and where widening stops (in decades)."""

    points_per_decade: int = 2
    widen_by: int = 2
    limits: tuple[float, float] = (-8.0, 3.0)

    def __post_init__(self) -> None:
        if int(self.points_per_decade) != self.points_per_decade or self.points_per_decade < 1:
            raise ValueError(f"points_per_decade = {self.points_per_decade!r} is invalid; allowed: an integer >= 1")
        if int(self.widen_by) != self.widen_by or self.widen_by < 1:
            raise ValueError(f"widen_by = {self.widen_by!r} is invalid; allowed: an integer >= 1")
        if not self.limits[0] < self.limits[1]:
            raise ValueError(f"limits = {self.limits!r} is invalid; allowed: (low, high) with low < high")


def lr_value(k: int, points_per_decade: int) -> float:
    """The learning rate of grid index ``k``: 10^(k / points_per_decade), three significant digits."""
    return float(f"{10.0 ** (k / points_per_decade):.3g}")


def initial_grid(base: OracleBase, config: GridConfig) -> list[int]:
    """Grid indices of ``base``'s initial range."""
    ppd = config.points_per_decade
    return list(range(math.floor(base.low * ppd + 1e-9), math.ceil(base.high * ppd - 1e-9) + 1))


def oracle_spec(base: OracleBase, lr: float) -> str:
    """The canonical run spec of ``base`` at ``lr`` (its key in the store)."""
    return str(parse_run_spec(base.template.format(lr=repr(float(lr)))))


def widen(grid: Sequence[int], scores: Mapping[int, float], config: GridConfig) -> list[int]:
    """Grid indices to add, or [] when the best point is inside the grid (or a limit is reached).

    ``scores[k]`` is the score of index ``k`` (lower is better; ``inf`` for diverged or failed
    runs). When no point has a finite score the grid widens towards smaller learning rates.
    """
    ks = sorted(grid)
    if not ks:
        raise ValueError("empty grid")
    ppd = config.points_per_decade
    lo_limit = math.floor(config.limits[0] * ppd + 1e-9)
    hi_limit = math.ceil(config.limits[1] * ppd - 1e-9)
    values = [scores.get(k, math.inf) for k in ks]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        side = "low"
    else:
        best = min(finite)
        best_index = values.index(best)
        if len(ks) == 1:
            side = "both"
        elif best_index == 0:
            side = "low"
        elif best_index == len(ks) - 1:
            side = "high"
        else:
            return []
    new: list[int] = []
    if side in ("low", "both"):
        new += [ks[0] - i for i in range(1, config.widen_by + 1) if ks[0] - i >= lo_limit]
    if side in ("high", "both"):
        new += [ks[-1] + i for i in range(1, config.widen_by + 1) if ks[-1] + i <= hi_limit]
    return sorted(new)
