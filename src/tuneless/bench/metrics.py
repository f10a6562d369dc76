"""From stored runs to the benchmark's numbers: the oracle of each problem, the gap of each
method, its time to the oracle's target and the performance profile over problems.

Two **views** score the same runs. The headline (``view="target"``) scores each problem by its
target metric (:attr:`Problem.target_metric`, stored with each run): the held-out loss for
learning problems, the objective for analytic functions and for the two learning problems
whose minimum is known (least squares, matrix factorization). The second view
(``view="train"``) scores every problem by its final training loss. Each view picks its own
oracle. Definitions (per problem, budget and hardware, then per method):

* **Score** of a run: its final value of the view's metric at the evaluation point; for the
  training loss of a problem whose minimum is known, minus that minimum (the *error*); for a
  metric where higher is better (an accuracy in [0, 1]), one minus it (the error rate). An
  error a million times (:data:`SOLVED`) smaller than the starting error counts as solved:
  scores are floored there, so that reaching 1e-9 rather than 1e-12 on a problem that starts
  at 10 is a tie, not a thousandfold gap. A diverged or failed run is scored as if it had made
  no progress: the score at its start (the evaluation at step 0; the first training loss when
  a run has no evaluation curve, as runs stored by schema version 1).
* **Oracle**: the (base, learning rate) with the best score, the geometric mean over seeds;
  a grid point with a diverged seed never wins.
* **Gap** of a method: its score over the oracle's (geometric means over seeds). 1.0 matches
  the oracle, 2.0 is twice its loss, below 1.0 beats it. For the error of a problem whose
  minimum is known, errors span many orders of magnitude, so the report shows ``log10`` of the
  gap: +2 is a hundred times the oracle's error.
* **Target** of a problem: the oracle's score (the geometric mean over seeds of its final
  values, so one target per problem, as AlgoPerf's per-workload targets).
* **Time to target** of a run: the fraction of the budget (in steps) at the first evaluation
  point (:func:`tuneless.run.evaluation_steps`: the start, 20 evenly spaced steps, the last)
  whose score is at or below the target; infinite if none is. Of a method on a problem: the
  median over seeds with a miss counted as infinite (AlgoPerf's rule: infinite when a majority
  of the seeds miss; with an even number of seeds, when one of the two middle ones does).
* **Performance profile** (the methods compared, the oracle excluded): on each problem the
  ratio r of a method's time to the best method's time (1 for the fastest; infinite for a
  miss, and for every method when none reaches the target). rho_m(tau) is the fraction of
  problems with r <= tau, for tau in [1, :data:`R_MAX` = 4]. The **AlgoPerf score** is its area
  normalised to [0, 1]: (1/(R_MAX - 1)) * integral of rho_m over [1, R_MAX], computed exactly
  (each problem adds (R_MAX - r)/(R_MAX - 1) when r <= R_MAX): 1 is the fastest to the target
  everywhere, 0 never reaches it (or only beyond 4 times the best).
* **Steps to 1.1x**: the first step at which the method's training curve (a trailing mean over
  ``steps/50`` steps for minibatch losses; the raw loss for analytic functions) is within 1.1x
  of the oracle's curve at its last step, same seed; the median over seeds.
* Per method: the **geometric-mean gap** over problems, the problems **within 1.1x** and
  **within 2x** of the oracle, the problems where it **reached the target**, its AlgoPerf score,
  **divergences** and **failures** (runs), the mean training time of a run, and how many runs
  the oracle needed for each problem and seed where the method needed one.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from .store import RunRecord

__all__ = ["SOLVED", "FLOOR", "R_MAX", "VIEWS", "Metric", "TRAIN_LOSS", "metric_of", "floor_of", "run_score",
           "seed_score", "smooth", "time_to_target", "median_time", "profile_ratios", "performance_profile",
           "profile_score", "ProblemOracle", "Cell", "MethodSummary", "BenchResults", "compute_results",
           "STATUS_ORDER"]

#: an error this many times smaller than the starting error counts as solved (problems whose
#: minimum is known): below it, differences are rounding and luck, not optimization
SOLVED = 1e-6
#: the smallest score at all (when no starting error is known)
FLOOR = 1e-300
#: a trailing mean over steps/SMOOTH_DIVISOR steps smooths minibatch curves
SMOOTH_DIVISOR = 50
#: the performance profile runs over tau in [1, R_MAX] (AlgoPerf's r_max)
R_MAX = 4.0
#: "target": each problem's target metric (the headline); "train": the final training loss
VIEWS = ("target", "train")
STATUS_ORDER = ("ok", "diverged", "failed", "missing")


@dataclass(frozen=True)
class Metric:
    """A key of a run's final metrics, and whether larger is better (then scored as 1 - value)."""

    name: str
    higher_is_better: bool = False

    def raw(self, value: float | None, min_value: float | None) -> float:
        """The unfloored score of ``value``: an error where it can be (inf if not finite)."""
        if value is None or not math.isfinite(value):
            return math.inf
        if self.higher_is_better:
            return 1.0 - value
        if self.name == "loss" and min_value is not None:
            return value - min_value
        return value

    def uses_minimum(self, min_value: float | None) -> bool:
        """True when the score is an error to a known minimum (floored at SOLVED, shown as log10)."""
        return self.name == "loss" and min_value is not None and not self.higher_is_better

    def __str__(self) -> str:
        return self.name + (" (1 - it)" if self.higher_is_better else "")


#: the second view's metric
TRAIN_LOSS = Metric("loss")


@functools.lru_cache(maxsize=None)
def _registered_target(problem: str) -> Metric:
    try:
        from ..problems import get_problem

        p = get_problem(problem)
        return Metric(p.target_metric, bool(p.target_higher_is_better))
    except Exception:  # a problem this tuneless does not know: its objective
        return TRAIN_LOSS


def metric_of(record: RunRecord, view: str = "target") -> Metric:
    """The metric that scores ``record`` in ``view``: the stored target metric (runs of schema
    version 1 have none: the registered problem's, else the training loss), or the training loss."""
    if view == "train":
        return TRAIN_LOSS
    if view != "target":
        raise ValueError(f"view = {view!r} is invalid; allowed: one of {VIEWS}")
    if record.target_metric is not None:
        return Metric(record.target_metric, bool(record.target_higher))
    return _registered_target(record.problem)


def _eval_start(record: RunRecord, metric: Metric) -> float | None:
    """The metric at step 0 from the evaluation curve, else None."""
    curve = record.eval_curves.get(metric.name)
    if curve is not None and curve.size and record.eval_steps.size and int(record.eval_steps[0]) == 0:
        return float(curve[0])
    return None


def start_value(record: RunRecord, metric: Metric = TRAIN_LOSS) -> float | None:
    """The run's value of ``metric`` at its start: the first training loss for the training loss
    (as in schema version 1), the evaluation at step 0 for other metrics (else the first training
    loss, an approximation for a held-out loss)."""
    if metric.name != "loss":
        value = _eval_start(record, metric)
        if value is not None and math.isfinite(value):
            return value
        if metric.higher_is_better:
            return None
    if record.initial_loss is not None and math.isfinite(record.initial_loss):
        return record.initial_loss
    return None


def floor_of(record: RunRecord, start: float | None = None, metric: Metric = TRAIN_LOSS) -> float:
    """The score below which ``record``'s problem counts as solved: SOLVED x its starting error
    (an error to a known minimum, or an error rate); :data:`FLOOR` for other metrics.
    ``start`` stands in for the run's own start when it has none (a failed run)."""
    if not (metric.uses_minimum(record.min_value) or metric.higher_is_better):
        return FLOOR
    s = start_value(record, metric)
    s = start if s is None else s
    error = metric.raw(s, record.min_value)
    if not math.isfinite(error) or error <= 0:
        return FLOOR
    return SOLVED * error


def _quantity(value: float | None, min_value: float | None, floor: float, metric: Metric = TRAIN_LOSS) -> float:
    return max(metric.raw(value, min_value), floor)


def run_score(record: RunRecord, *, penalize: bool = False, start: float | None = None,
              metric: Metric = TRAIN_LOSS) -> float:
    """The score of one run on ``metric``; ``inf`` if it did not finish cleanly, unless ``penalize``
    (then the score of its start; ``start`` stands in when the run has none)."""
    floor = floor_of(record, start, metric)
    if record.status == "ok":
        value = _quantity(record.final.get(metric.name), record.min_value, floor, metric)
        if math.isfinite(value):
            return value
    if not penalize:
        return math.inf
    s = start_value(record, metric)
    value = _quantity(start if s is None else s, record.min_value, floor, metric)
    return value if math.isfinite(value) else math.inf


def _geomean(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf
    if len(values) == 1:
        return float(values[0])
    if any(v <= 0 for v in values):
        return 0.0
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def seed_score(records: Sequence[RunRecord], metric: Metric = TRAIN_LOSS) -> float:
    """Geometric mean of the runs' scores over seeds (inf if any did not finish cleanly)."""
    return _geomean([run_score(r, metric=metric) for r in records])


def time_to_target(record: RunRecord, target: float, metric: Metric, *, start: float | None = None) -> float | None:
    """The fraction of the budget at the run's first evaluation whose score is <= ``target``:
    ``inf`` if none is, None when the run has no evaluation curve of ``metric`` (schema version 1)."""
    curve = record.eval_curves.get(metric.name)
    if curve is None or not curve.size or record.eval_steps.size != curve.size:
        return None
    if not math.isfinite(target):
        return math.inf
    floor = floor_of(record, start, metric)
    for step, value in zip(record.eval_steps, curve):
        if _quantity(float(value), record.min_value, floor, metric) <= target:
            return int(step) / record.steps
    return math.inf


def median_time(times: Sequence[float | None]) -> float | None:
    """The median time over seeds, a miss counting as infinite (AlgoPerf); None if any is unknown."""
    if not times or any(t is None for t in times):
        return None
    return float(np.median(np.asarray(times, dtype=np.float64)))


def profile_ratios(times: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float]]:
    """method -> problem -> its time over the best method's time on that problem.

    ``times[method][problem]`` is a time to target (inf: missed; None or absent: unknown, the
    problem then counts as missed for that method). Problems where no method has a known time
    are left out. The fastest gets 1; a miss, or any method where none reaches the target, inf.
    """
    problems = list(dict.fromkeys(p for t in times.values() for p, v in t.items() if v is not None))
    out: dict[str, dict[str, float]] = {m: {} for m in times}
    for p in problems:
        known = {m: t.get(p) for m, t in times.items()}
        finite = [v for v in known.values() if v is not None and math.isfinite(v)]
        best = min(finite) if finite else math.inf
        for m, v in known.items():
            if v is None or not math.isfinite(v) or not math.isfinite(best):
                out[m][p] = math.inf
            elif v == best:
                out[m][p] = 1.0
            else:
                out[m][p] = v / best if best > 0 else math.inf
    return out


def performance_profile(ratios: Sequence[float], taus: Sequence[float] | np.ndarray) -> np.ndarray:
    """rho(tau): the fraction of the problems whose ratio is <= tau, at each tau."""
    r = np.asarray(list(ratios), dtype=np.float64)
    taus = np.asarray(taus, dtype=np.float64)
    if r.size == 0:
        return np.full(taus.shape, np.nan)
    return (r[None, :] <= taus[:, None]).mean(axis=1)


def profile_score(ratios: Sequence[float], r_max: float = R_MAX) -> float:
    """The area under rho over [1, r_max] over (r_max - 1), exactly: the mean over problems of
    (r_max - r) / (r_max - 1) for r <= r_max, else 0. NaN when there are no problems."""
    r = [float(x) for x in ratios]
    if not r:
        return math.nan
    return sum((r_max - x) / (r_max - 1.0) for x in r if x <= r_max) / len(r)


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
    #: the metric that scores this problem in this view
    metric: Metric = TRAIN_LOSS
    #: the hardware of its runs ("cpu", "cuda bfloat16"...)
    hardware: str = "cpu"
    #: the winning spec, base and lr (None if every oracle run failed)
    spec: str | None = None
    base: str | None = None
    lr: float | None = None
    score: float = math.nan
    final_loss: float = math.nan
    #: the mean over seeds of the winner's final value of the metric
    final_value: float = math.nan
    #: the target of the time to target: the oracle's score (geometric mean over seeds)
    target: float = math.nan
    #: the oracle's own time to its target (median over seeds)
    time_to_target: float | None = None
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
    #: the mean over seeds of the final value of the view's metric
    final_value: float = math.nan
    #: fraction of the budget to reach the oracle's target: per seed, and the median (inf: missed,
    #: None: unknown, runs with no evaluation curve)
    times: list[float | None] = field(default_factory=list)
    time_to_target: float | None = None
    #: its time over the best method's on this problem (inf: missed); None when not in the profile
    profile_ratio: float | None = None
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
    oracle_runs: float = math.nan
    train_seconds: float = math.nan
    median_steps_fraction: float | None = None
    #: problems where it reached the oracle's target, of those in the profile
    reached: int = 0
    profile_problems: int = 0
    #: the normalised area under its performance profile (None: no problem has evaluation curves)
    algoperf_score: float | None = None


@dataclass
class BenchResults:
    oracles: list[ProblemOracle]
    methods: list[str]
    cells: dict[tuple[str, str], Cell]
    summaries: list[MethodSummary]
    #: "target" (each problem's target metric) or "train" (the training loss)
    view: str = "target"
    #: method -> problem label -> its time over the best method's (the performance profile's input)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)

    def rho(self, method: str, taus: Sequence[float] | np.ndarray) -> np.ndarray:
        """The method's performance profile at each tau."""
        return performance_profile(list(self.profile.get(method, {}).values()), taus)

    def cell(self, method: str, label: str) -> Cell:
        return self.cells.get((method, label)) or Cell(method, label, "missing")


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def _test_means(records: Sequence[RunRecord]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r.final if k != "loss"})
    return {k: _mean(r.final.get(k, math.nan) for r in records if r.status == "ok") for k in keys}


def compute_results(records: Iterable[RunRecord], *, methods: Sequence[str] | None = None,
                    view: str = "target") -> BenchResults:
    """Everything the report shows in ``view`` ("target": each problem's target metric, the
    headline; "train": the final training loss), from the store's records (with curves, for the
    steps to 1.1x and the times to target). Runs of different hardware are different problems."""
    if view not in VIEWS:
        raise ValueError(f"view = {view!r} is invalid; allowed: one of {VIEWS}")
    records = list(records)
    budgets: dict[tuple[str, str], set[int]] = {}
    for r in records:
        budgets.setdefault((r.problem, r.hardware), set()).add(r.steps)

    def label_of(problem: str, steps: int, hardware: str) -> str:
        name = _short_name(problem)
        name = name if len(budgets[(problem, hardware)]) == 1 else f"{name} ({steps} steps)"
        return name if hardware == "cpu" else f"{name} [{hardware}]"

    order: list[tuple[str, int, str]] = []
    by_problem: dict[tuple[str, int, str], list[RunRecord]] = {}
    for r in records:
        key = (r.problem, r.steps, r.hardware)
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
    for problem, steps, hardware in order:
        group = by_problem[(problem, steps, hardware)]
        label = label_of(problem, steps, hardware)
        kinds = [r.kind for r in group if r.kind != "unknown"]
        kind = kinds[0] if kinds else "unknown"
        known = [r for r in group if r.target_metric is not None] or group
        metric = metric_of(known[0], view)
        min_known = metric.uses_minimum(next((r.min_value for r in group if r.min_value is not None), None))
        starts: dict[int, float] = {}
        for r in group:
            value = start_value(r, metric)
            if value is not None:
                starts.setdefault(r.seed, value)
        oracle = _oracle(problem, steps, label, kind, min_known, [r for r in group if r.role == "oracle"], metric,
                         hardware)
        oracles.append(oracle)
        for method in method_list:
            runs = sorted((r for r in group if r.role == "method" and r.spec == method), key=lambda r: r.seed)
            if not runs:
                continue
            cells[(method, label)] = _cell(method, label, runs, oracle, starts, metric)

    times = {m: {o.label: cells[(m, o.label)].time_to_target if (m, o.label) in cells else None
                 for o in oracles if math.isfinite(o.target)} for m in method_list}
    profile = profile_ratios(times)
    for m, ratios in profile.items():
        for label, ratio in ratios.items():
            if (m, label) in cells:
                cells[(m, label)].profile_ratio = ratio
    summaries = [_summary(m, [cells[(m, o.label)] for o in oracles if (m, o.label) in cells], oracles, profile[m])
                 for m in method_list]
    return BenchResults(oracles, method_list, cells, summaries, view, profile)


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
            runs: list[RunRecord], metric: Metric = TRAIN_LOSS, hardware: str = "cpu") -> ProblemOracle:
    seeds = sorted({r.seed for r in runs})
    o = ProblemOracle(problem, steps, label, kind, min_known, seeds, metric=metric, hardware=hardware)
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
        score = seed_score(rs, metric) if len(rs) == len(seeds) else math.inf  # a point missing seeds cannot win
        per_base.setdefault(rs[0].base or "?", []).append((rs[0].lr or math.nan, score, spec))
        # ties (several points solved the problem) go to the lowest unfloored value
        raw = _geomean([_quantity(r.final.get(metric.name), r.min_value, FLOOR, metric) if r.status == "ok"
                        else math.inf for r in rs])
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
    o.final_value = _mean(r.final.get(metric.name, math.nan) for r in win)
    o.target = best
    o.time_to_target = median_time([time_to_target(r, o.target, metric) for r in win])
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


def _cell(method: str, label: str, runs: list[RunRecord], oracle: ProblemOracle, starts: dict[int, float],
          metric: Metric = TRAIN_LOSS) -> Cell:
    status = max((r.status for r in runs), key=lambda s: _WORST.get(s, 3))
    c = Cell(method, label, status, records=runs, seeds=len(runs))
    c.diverged = sum(r.status == "diverged" for r in runs)
    c.failed = sum(r.status == "failed" for r in runs)
    c.errors = [r.error for r in runs if r.error]
    c.score = _geomean([run_score(r, penalize=True, start=starts.get(r.seed), metric=metric) for r in runs])
    c.final_loss = _mean(r.final_loss for r in runs if r.status == "ok")
    c.final_value = _mean(r.final.get(metric.name, math.nan) for r in runs if r.status == "ok")
    c.train_seconds = _mean(r.train_seconds for r in runs)
    c.test = _test_means(runs)
    if oracle.spec is not None and math.isfinite(oracle.score) and oracle.score > 0 and math.isfinite(c.score):
        c.ratio = c.score / oracle.score
        c.log_gap = math.log10(c.ratio)
    if math.isfinite(oracle.target):
        c.times = [time_to_target(r, oracle.target, metric, start=starts.get(r.seed)) for r in runs]
        c.time_to_target = median_time(c.times)
    hits = [steps_to(r, 1.1 * oracle.final_curve[r.seed]) if r.seed in oracle.final_curve and r.status == "ok"
            else None for r in runs]
    c.steps_to = _median_steps(hits)
    return c


def _summary(method: str, cells: list[Cell], oracles: list[ProblemOracle],
             ratios_by_problem: Mapping[str, float] | None = None) -> MethodSummary:
    ratios = [c.ratio for c in cells if c.ratio is not None]
    geo = _geomean(ratios) if ratios else math.nan
    labels = {c.problem for c in cells}
    runs = [o.runs_per_seed for o in oracles if o.label in labels and o.total_runs]
    fractions = []
    steps_of = {o.label: o.steps for o in oracles}
    for c in cells:
        if c.steps_to is not None:
            fractions.append(c.steps_to / steps_of[c.problem])
    profile = list((ratios_by_problem or {}).values())
    return MethodSummary(
        method=method, problems=len(cells), geo_gap=geo,
        within_1_1=sum(1 for r in ratios if r <= 1.1), within_2=sum(1 for r in ratios if r <= 2.0),
        diverged=sum(c.diverged for c in cells), failed=sum(c.failed for c in cells),
        oracle_runs=_mean(runs), train_seconds=_mean(c.train_seconds for c in cells),
        median_steps_fraction=statistics.median(fractions) if fractions else None,
        reached=sum(1 for c in cells if c.time_to_target is not None and math.isfinite(c.time_to_target)),
        profile_problems=len(profile),
        algoperf_score=profile_score(profile) if profile else None,
    )
