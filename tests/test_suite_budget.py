"""benchmarks/suite_budget.py: the packing it projects a sweep's time with, and its matching of
a preset's runs to the stored ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("suite_budget", ROOT / "benchmarks" / "suite_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("suite_budget", module)
    spec.loader.exec_module(module)
    return module


def test_longest_first_packing_has_the_known_makespan():
    lpt = _module().lpt_makespan
    assert lpt([3, 3, 2, 2, 2], 2) == 7          # LPT's classic 7/6 case (the best packing is 6)
    assert lpt([5, 1, 1, 1, 1, 1], 2) == 5
    assert lpt([4.0, 4.0], 3) == 4.0
    assert lpt([], 2) == 0.0
    with pytest.raises(ValueError, match="workers = 0"):
        lpt([1.0], 0)


def test_the_full_preset_is_matched_to_the_stored_runs():
    """Every method run of ``full`` is found in the stored default-design/held-out stores except
    the untuned Adam baseline (the catalogue ran it without the cosine schedule), and each
    problem's oracle runs are the stored grid for its seeds and budget."""
    from tuneless.bench.store import ResultStore
    from tuneless.bench.suite import build_suite

    budget = _module()
    records = []
    for name in ("default-design", "default-heldout"):
        records += ResultStore(ROOT / "benchmarks" / "results" / f"{name}.sqlite", create=False).records(curves=False)
    budgets, durations = budget.project("full", records)
    suite = build_suite("full")
    assert {b.problem for b in budgets} == {p for p, _ in suite.problems}
    for b in budgets:
        seeds = suite.seeds_for(b.problem)
        assert b.method_runs == len(suite.methods) * len(seeds)
        assert b.estimated_runs == len(seeds)  # adam@cosine, one per seed
        stored_oracle = [r for r in records if r.role == "oracle" and r.problem == b.problem and r.steps == b.steps
                         and r.seed in seeds and r.status in ("ok", "diverged")]
        assert b.oracle_runs == len(stored_oracle) > 0
    assert len(durations) == sum(b.method_runs + b.oracle_runs for b in budgets)
    assert sum(durations) == pytest.approx(sum(b.seconds for b in budgets))
