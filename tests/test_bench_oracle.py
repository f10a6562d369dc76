"""The oracle's learning-rate grid: widening until the best point is inside, reuse of stored runs."""

from __future__ import annotations

import math

import pytest

from tests.bench_util import tiny_suite
from tuneless.bench import InlineExecutor, ResultStore, compute_results, run_sweep
from tuneless.bench.oracle import BASES, GridConfig, OracleBase, initial_grid, lr_value, oracle_spec, widen

CFG = GridConfig(points_per_decade=2, widen_by=2, limits=(-4.0, 1.0))


def test_interior_best_needs_no_widening():
    assert widen([-4, -3, -2], {-4: 3.0, -3: 1.0, -2: 2.0}, CFG) == []


def test_best_at_high_end_widens_upwards():
    assert widen([-4, -3, -2], {-4: 3.0, -3: 2.0, -2: 1.0}, CFG) == [-1, 0]


def test_best_at_low_end_widens_downwards():
    assert widen([-4, -3, -2], {-4: 1.0, -3: 2.0, -2: 3.0}, CFG) == [-6, -5]


def test_diverged_points_never_win_and_all_diverged_widens_down():
    assert widen([-2, -1, 0], {-2: 5.0, -1: math.inf, 0: math.inf}, CFG) == [-4, -3]
    assert widen([-2, -1, 0], {}, CFG) == [-4, -3]


def test_widening_stops_at_the_limits():
    assert widen([0, 1, 2], {0: 3.0, 1: 2.0, 2: 1.0}, CFG) == []  # 10^(2/2) = 10 is the upper limit
    assert widen([-8, -7], {-8: 1.0, -7: 2.0}, CFG) == []
    assert widen([1], {1: 1.0}, CFG) == [-1, 0, 2]  # a single point widens both ways, within limits


def test_grid_values_are_shared_between_densities():
    assert lr_value(-6, 2) == lr_value(-9, 3) == 1e-3
    assert lr_value(-7, 2) == 0.000316
    assert initial_grid(BASES[0], GridConfig(points_per_decade=2)) == list(range(-8, -1))
    assert oracle_spec(BASES[1], 0.0316) == "sgd:lr=0.0316,momentum=0.9@cosine"


def test_bad_grid_config():
    with pytest.raises(ValueError, match="points_per_decade"):
        GridConfig(points_per_decade=0)
    with pytest.raises(ValueError, match="limits"):
        GridConfig(limits=(1.0, -1.0))


def test_sweep_widens_a_grid_whose_best_is_at_its_end(tmp_path):
    """Adam on logistic regression with an initial grid of tiny learning rates: the sweep must widen
    it upwards until the best point is inside, store every point, and reuse them next time."""
    narrow = (OracleBase("adam", "adam:lr={lr}@cosine", -4.0, -3.0),)
    suite = tiny_suite(problems=(("logreg_wine", 40),), methods=("polyak",), bases=narrow,
                       grid=GridConfig(points_per_decade=1, widen_by=1))
    db = tmp_path / "w.sqlite"
    with ResultStore(db) as store:
        stats = run_sweep(suite, store, InlineExecutor())
        records = store.records()
    assert stats.widened >= 2
    lrs = sorted(r.lr for r in records if r.role == "oracle")
    assert lrs[0] == 1e-4 and lrs[-1] >= 1e-1, lrs
    results = compute_results(records)
    oracle = results.oracles[0]
    assert oracle.at_edge == []
    best = oracle.lr
    assert lrs[0] < best < lrs[-1], "after widening, the best point is inside the grid"
    assert stats.executed == len(records)
    # the widened grid is reused: a second sweep runs nothing
    with ResultStore(db) as store:
        again = run_sweep(suite, store, InlineExecutor())
    assert again.executed == 0 and again.skipped == len(records) and again.widened == stats.widened


def test_analytic_problems_run_one_seed_learning_problems_all():
    suite = tiny_suite(problems=(("rosenbrock", 5), ("logreg_wine", 5)), methods=("polyak",), seeds=(0, 1, 2))
    seeds = {(t.problem, t.seed) for t in suite.method_tasks()}
    assert seeds == {("rosenbrock", 0), ("logreg_wine", 0), ("logreg_wine", 1), ("logreg_wine", 2)}
