"""From stored runs to the benchmark's numbers: the oracle of each problem, the gap of each method.

Definitions (each computed per problem and budget, then per method):

* **Score** of a run: its final training loss at the evaluation point, minus the known
  minimum where there is one (the *error*). An error a million times (:data:`SOLVED`) smaller
  than the starting error counts as solved: scores are floored there, so that reaching 1e-9
  rather than 1e-12 on a problem that starts at 10 is a tie, not a thousandfold gap. A diverged
  or failed run is scored as if it had made no progress: the score of its starting loss.
* **Oracle**: the (base, learning rate) with the best score, the geometric mean over seeds;
  a grid point with a diverged seed never wins.
* **Gap** of a method: its score over the oracle's (geometric means over seeds). 1.0 matches
  the oracle, 2.0 is twice its loss, below 1.0 beats it. For problems whose minimum is known
  (0 for the analytic functions, least squares and matrix factorization), errors span many
  orders of magnitude, so the report shows ``log10`` of the gap: +2 is a hundred times the
  oracle's error.
* **Steps to 1.1x**: the first step at which the method's training curve (a trailing mean over
  ``steps/50`` steps for minibatch losses; the raw loss for analytic functions) is within 1.1x
  of the oracle's curve at its last step, same seed; the median over seeds.
* Per method: the **geometric-mean gap** over problems, the problems **within 1.1x** and
  **within 2x** of the oracle, **divergences** and **failures** (runs), the mean training time
  of a run, and how many runs the oracle needed for each problem and seed where the method
  needed one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .store import RunRecord

__all__ = ["SOLVED", "FLOOR", "floor_of", "run_score", "seed_score", "smooth", "ProblemOracle", "Cell", "MethodSummary", "BenchResults",
           "compute_results", "STATUS_ORDER"]

#: an error this many times smaller than the starting error counts as solved (problems whose
#: minimum is known): below it, differences are rounding and luck, not optimization
SOLVED = 1e-6
#: the smallest score at all (when no starting error is known)
FLOOR = 1e-300
#: a trailing mean over steps/SMOOTH_DIVISOR steps smooths minibatch curves
SMOOTH_DIVISOR = 50
STATUS_ORDER = ("ok", "diverged", "failed", "missing")


def _start(record: RunRecord, start: float | None = None) -> float | None:
    if record.initial_loss is not None and math.isfinite(record.initial_loss):
        return record.initial_loss
    return start


def floor_of(record: RunRecord, start: float | None = None) -> float:
    """The score below which ``record``'s problem counts as solved: SOLVED x its starting error."""
    if record.min_value is None:
        return FLOOR
    s = _start(record, start)
    if s is None or not math.isfinite(s) or s - record.min_value <= 0:
        return FLOOR
    return SOLVED * (s - record.min_value)


def _quantity(loss: float | None, min_value: float | None, floor: float) -> float:
    if loss is None or not math.isfinite(loss):
        return math.inf
    if min_value is not None:
        return max(loss - min_value, floor)
    return max(loss, floor)


def run_score(record: RunRecord, *, penalize: bool = False, start: float | None = None) -> float:
    """The score of one run; ``inf`` if it did not finish cleanly, unless ``penalize`` (then its start)."""
    floor = floor_of(record, start)
    if record.status == "ok":
        value = _quantity(record.final_loss, record.min_value, floor)
        if math.isfinite(value):
            return value
    if not penalize:
        return math.inf
    value = _quantity(_start(record, start), record.min_value, floor)
    return value if math.isfinite(value) else math.inf


def _geomean(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf
    if len(values) == 1:
        return float(values[0])
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def seed_score(records: Sequence[RunRecord]) -> float:
    """Geometric mean of the runs' scores over seeds (inf if any did not finish cleanly)."""
    return _geomean([run_score(r) for r in records])


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (the first steps average what there is)."""
    curve = np.asarray(curve, dtype=np.float64)
    if window <= 1 or curve.size == 0:
        return curve
    finite = np.where(np.isfinite(curve), curve, np.inf)
    if not np.all(np.isfinite(finite)):
        out = np.empty_like(curve)
        for i in range(curve.size):
            out[i] = finite[max(0, i - window + 1):i + 1].mean()
        return out
    c = np.concatenate([[0.0], np.cumsum(finite)])
    idx = np.arange(1, curve.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def score_curve(record: RunRecord) -> np.ndarray:
    """The run's per-step score: smoothed training loss minus the known minimum."""
    window = 1 if record.kind == "analytic" else max(1, record.steps // SMOOTH_DIVISOR)
    curve = smooth(record.loss, window)
    if record.min_value is not None:
        curve = curve - record.min_value
    return curve


def steps_to(record: RunRecord, target: float) -> int | None:
    """The first step (1-based) at which the run's score curve is <= target; None if never."""
    if not math.isfinite(target):
        return None
    curve = score_curve(record)
    hits = np.nonzero(curve <= target)[0]
    return int(hits[0]) + 1 if hits.size else None


@dataclass
class ProblemOracle:
    """The oracle of one problem and budget."""

    problem: str
    steps: int
    label: str
    kind: str
    min_known: bool
    seeds: list[int]
    #: the winning spec, base and lr (None if every oracle run failed)
    spec: str | None = None
    base: str | None = None
    lr: float | None = None
    score: float = math.nan
    final_loss: float = math.nan
    #: oracle runs per seed (grid points of both bases), and in all
    runs_per_seed: float = 0.0
    total_runs: int = 0
    #: base -> sorted [(lr, score)]
    grids: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: bases whose best point is still at an end of their grid (the widening hit its limit)
    at_edge: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the winning runs, one per seed
    records: list[RunRecord] = field(default_factory=list)
    #: seed -> the oracle's smoothed score at its last step (the steps-to target / 1.1)
    final_curve: dict[int, float] = field(default_factory=dict)
    steps_to: int | None = None
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class Cell:
    """One method on one problem (aggregated over seeds)."""

    method: str
    problem: str
    status: str  # worst over seeds: "ok" < "diverged" < "failed"; "missing" if no run
    score: float = math.nan
    final_loss: float = math.nan
    ratio: float | None = None
    log_gap: float | None = None
    steps_to: int | None = None
    diverged: int = 0
    failed: int = 0
    seeds: int = 0
    train_seconds: float = math.nan
    errors: list[str] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    records: list[RunRecord] = field(default_factory=list)


@dataclass
class MethodSummary:
    method: str
    problems: int
    geo_gap: float
    within_1_1: int
    within_2: int
    diverged: int
    failed: int
    oracle_runs: float
    train_seconds: float
    median_steps_fraction: float | None


@dataclass
class BenchResults:
    oracles: list[ProblemOracle]
    methods: list[str]
    cells: dict[tuple[str, str], Cell]
    summaries: list[MethodSummary]

    def cell(self, method: str, label: str) -> Cell:
        return self.cells.get((method, label)) or Cell(method, label, "missing")


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def _test_means(records: Sequence[RunRecord]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r.final if k != "loss"})
    return {k: _mean(r.final.get(k, math.nan) for r in records if r.status == "ok") for k in keys}


def compute_results(records: Iterable[RunRecord], *, methods: Sequence[str] | None = None) -> BenchResults:
    """Everything the report shows, from the store's records (with curves, for steps-to)."""
    records = list(records)
    budgets: dict[str, set[int]] = {}
    for r in records:
        budgets.setdefault(r.problem, set()).add(r.steps)

    def label_of(problem: str, steps: int) -> str:
        name = _short_name(problem)
        return name if len(budgets[problem]) == 1 else f"{name} ({steps} steps)"

    order: list[tuple[str, int]] = []
    by_problem: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        key = (r.problem, r.steps)
        if key not in by_problem:
            order.append(key)
            by_problem[key] = []
        by_problem[key].append(r)

    method_list = list(methods) if methods is not None else []
    if methods is None:
        for r in records:
            if r.role == "method" and r.spec not in method_list:
                method_list.append(r.spec)

    oracles: list[ProblemOracle] = []
    cells: dict[tuple[str, str], Cell] = {}
    for problem, steps in order:
        group = by_problem[(problem, steps)]
        label = label_of(problem, steps)
        kinds = [r.kind for r in group if r.kind != "unknown"]
        kind = kinds[0] if kinds else "unknown"
        min_known = any(r.min_value is not None for r in group)
        starts: dict[int, float] = {}
        for r in group:
            if r.initial_loss is not None and math.isfinite(r.initial_loss):
                starts.setdefault(r.seed, r.initial_loss)
        oracle = _oracle(problem, steps, label, kind, min_known, [r for r in group if r.role == "oracle"])
        oracles.append(oracle)
        for method in method_list:
            runs = sorted((r for r in group if r.role == "method" and r.spec == method), key=lambda r: r.seed)
            if not runs:
                continue
            cells[(method, label)] = _cell(method, label, runs, oracle, starts)

    summaries = [_summary(m, [cells[(m, o.label)] for o in oracles if (m, o.label) in cells], oracles)
                 for m in method_list]
    return BenchResults(oracles, method_list, cells, summaries)


def _short_name(problem: str) -> str:
    """``quadratic`` for ``quadratic:dim=10,condition=1000,...`` when those are its defaults."""
    name = problem.split(":", 1)[0]
    if name == problem:
        return problem
    try:
        from ..problems import get_problem

        return name if get_problem(name).spec() == problem else problem
    except Exception:  # a problem this tuneless does not know: keep the stored spec
        return problem


def _oracle(problem: str, steps: int, label: str, kind: str, min_known: bool,
            runs: list[RunRecord]) -> ProblemOracle:
    seeds = sorted({r.seed for r in runs})
    o = ProblemOracle(problem, steps, label, kind, min_known, seeds)
    if not runs:
        return o
    by_spec: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_spec.setdefault(r.spec, []).append(r)
    o.total_runs = len(runs)
    o.runs_per_seed = len(runs) / max(1, len(seeds))
    o.seconds = sum(r.train_seconds for r in runs)
    best_spec, best, best_key = None, math.inf, (math.inf, math.inf)
    per_base: dict[str, list[tuple[float, float, str]]] = {}
    for spec, rs in by_spec.items():
        score = seed_score(rs) if len(rs) == len(seeds) else math.inf  # a point missing seeds cannot win
        per_base.setdefault(rs[0].base or "?", []).append((rs[0].lr or math.nan, score, spec))
        # ties (several points solved the problem) go to the lowest unfloored loss
        raw = _geomean([_quantity(r.final_loss, r.min_value, FLOOR) if r.status == "ok" else math.inf for r in rs])
        if math.isfinite(score) and (score, raw) < best_key:
            best_spec, best, best_key = spec, score, (score, raw)
    for base, pts in per_base.items():
        pts.sort()
        o.grids[base] = [(lr, s) for lr, s, _ in pts]
        finite = [s for _, s, _ in pts if math.isfinite(s)]
        if len(pts) > 1 and finite:
            i = [s for _, s, _ in pts].index(min(finite))
            if i in (0, len(pts) - 1):
                o.at_edge.append(base)
    if best_spec is None:
        return o
    win = sorted(by_spec[best_spec], key=lambda r: r.seed)
    o.spec, o.base, o.lr, o.score, o.records = best_spec, win[0].base, win[0].lr, best, win
    o.final_loss = _mean(r.final_loss for r in win)
    o.test = _test_means(win)
    for r in win:
        curve = score_curve(r)
        o.final_curve[r.seed] = max(float(curve[-1]), floor_of(r)) if curve.size else math.nan
    hits = [steps_to(r, 1.1 * o.final_curve[r.seed]) for r in win]
    o.steps_to = _median_steps(hits)
    return o


def _median_steps(hits: list[int | None]) -> int | None:
    if not hits or sum(h is None for h in hits) * 2 > len(hits):
        return None
    vals = sorted(math.inf if h is None else h for h in hits)
    med = statistics.median_low(vals)
    return None if not math.isfinite(med) else int(med)


_WORST = {"ok": 0, "diverged": 1, "failed": 2}


def _cell(method: str, label: str, runs: list[RunRecord], oracle: ProblemOracle, starts: dict[int, float]) -> Cell:
    status = max((r.status for r in runs), key=lambda s: _WORST.get(s, 3))
    c = Cell(method, label, status, records=runs, seeds=len(runs))
    c.diverged = sum(r.status == "diverged" for r in runs)
    c.failed = sum(r.status == "failed" for r in runs)
    c.errors = [r.error for r in runs if r.error]
    c.score = _geomean([run_score(r, penalize=True, start=starts.get(r.seed)) for r in runs])
    c.final_loss = _mean(r.final_loss for r in runs if r.status == "ok")
    c.train_seconds = _mean(r.train_seconds for r in runs)
    c.test = _test_means(runs)
    if oracle.spec is not None and math.isfinite(oracle.score) and oracle.score > 0 and math.isfinite(c.score):
        c.ratio = c.score / oracle.score
        c.log_gap = math.log10(c.ratio)
    hits = [steps_to(r, 1.1 * oracle.final_curve[r.seed]) if r.seed in oracle.final_curve and r.status == "ok"
            else None for r in runs]
    c.steps_to = _median_steps(hits)
    return c


def _summary(method: str, cells: list[Cell], oracles: list[ProblemOracle]) -> MethodSummary:
    ratios = [c.ratio for c in cells if c.ratio is not None]
    geo = _geomean(ratios) if ratios else math.nan
    labels = {c.problem for c in cells}
    runs = [o.runs_per_seed for o in oracles if o.label in labels and o.total_runs]
    fractions = []
    steps_of = {o.label: o.steps for o in oracles}
    for c in cells:
        if c.steps_to is not None:
            fractions.append(c.steps_to / steps_of[c.problem])
    return MethodSummary(
        method=method, problems=len(cells), geo_gap=geo,
        within_1_1=sum(1 for r in ratios if r <= 1.1), within_2=sum(1 for r in ratios if r <= 2.0),
        diverged=sum(c.diverged for c in cells), failed=sum(c.failed for c in cells),
        oracle_runs=_mean(runs), train_seconds=_mean(c.train_seconds for c in cells),
        median_steps_fraction=statistics.median(fractions) if fractions else None,
    )
