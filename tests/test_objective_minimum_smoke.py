"""benchmarks/objective_minimum.py: the minimum it reports is one (a gradient below the tolerance,
an objective no higher than a real optimizer's), and bad input is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import objective_minimum  # noqa: E402

from tuneless.run import run  # noqa: E402


def test_the_minimum_is_a_minimum_of_the_training_objective():
    m = objective_minimum.minimize("logreg_wine", 0, tolerance=1e-8)
    assert m.grad_norm <= 1e-8
    # the default's last full-batch training objective, after its 500 steps, is not below it
    trace = run("logreg_wine", "tuneless", seed=0, eval_points=0)
    assert m.objective <= trace.final["loss"] + 1e-12
    # convex: the same minimum from another start, and the same held-out loss there
    other = objective_minimum.minimize("logreg_wine", 1, tolerance=1e-8)
    assert other.objective == pytest.approx(m.objective, rel=1e-9)
    assert other.held_out_loss == pytest.approx(m.held_out_loss, rel=1e-5)


def test_the_table_reads_the_oracle_from_the_stores():
    scores = objective_minimum.stored_scores(objective_minimum.RESULTS / "default-design.sqlite",
                                             objective_minimum.RESULTS / "default-heldout.sqlite")
    oracle, default = scores["logreg_wine"]
    assert 0 < oracle < default  # the default misses the oracle there (docs/default.md)
    row = objective_minimum.table([objective_minimum.Minimum("logreg_wine", 0, 0.02, 1e-9, 2 * oracle, 10)], scores)
    assert "| logreg_wine | design | 0 |" in row and "| 2.00 |" in row


def test_bad_input_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        objective_minimum.main(["--problems", "rosenbrock"])
    assert exc.value.code == 2
    assert "--problems rosenbrock is invalid; allowed: logreg_digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        objective_minimum.main(["--tolerance", "0"])
    assert "--tolerance = 0.0 is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        objective_minimum.main(["--design-db", "nowhere.sqlite"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="problem = 'rosenbrock' is invalid"):
        objective_minimum.minimize("rosenbrock", 0)
