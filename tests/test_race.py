"""The seed's story, asserted on the race's own results, and the race's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneless.race import BASELINE_SPECS, default_specs, run_race
from tuneless.report.race import plot_race, race_rows, race_table
from tuneless.registry import learning_rate_free


@pytest.fixture(scope="module")
def race():
    return run_race("rosenbrock", ["sgd@loss_proportional", "polyak", "adam"], steps=1500)


def test_loss_proportional_annealing_stalls_while_polyak_finishes(race) -> None:
    rows = {r["method"]: r for r in race_rows(race)}
    naive, polyak = rows["sgd@loss_proportional"], rows["polyak"]
    assert naive["distance"] > 0.1, "the naive loss-proportional schedule should stall far from (1, 1)"
    assert polyak["final_error"] < 1e-6
    assert polyak["steps_to_threshold"] is not None and polyak["steps_to_threshold"] < 1500
    assert naive["steps_to_threshold"] is None
    # the naive step size collapsed with the loss: it ends far below where it started
    naive_trace = next(t for t in race.traces if t.spec == "sgd@loss_proportional")
    assert naive_trace.step_size[-1] < 0.2 * naive_trace.step_size[0]


def test_traces_hold_trajectories_and_curves(race) -> None:
    for tr in race.traces:
        assert tr.positions.shape == (1501, 2)
        np.testing.assert_allclose(tr.positions[0], [-1.2, 1.0])
        assert tr.loss.shape == (1500,) and tr.step_size.shape == (1500,)
        assert not tr.diverged and tr.error is None


def test_table_and_picture(race, tmp_path) -> None:
    table = race_table(race)
    lines = table.splitlines()
    assert lines[0].startswith("| method | final error | distance to minimizer | steps to error <= 1e-06")
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| polyak |"), "the table is sorted best first"
    path = plot_race(race, tmp_path / "sub" / "race.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_default_race_has_the_baselines_and_every_learning_rate_free_method() -> None:
    specs = default_specs()
    assert specs[: len(BASELINE_SPECS)] == list(BASELINE_SPECS)
    assert set(learning_rate_free()) <= set(specs)
    assert "sgd@loss_proportional" in specs and "adam@cosine" in specs


def test_start_and_steps_options_and_nd_functions(tmp_path) -> None:
    r = run_race("rosenbrock_nd:dim=4", ["polyak", "adam:lr=0.01@cosine"], steps=50, start=[0.0, 0.0, 0.0, 0.0])
    assert r.start == [0.0, 0.0, 0.0, 0.0] and r.steps == 50
    for tr in r.traces:
        np.testing.assert_allclose(tr.positions[0], 0.0)
        assert math.isfinite(tr.final["error"])
    assert plot_race(r, tmp_path / "nd.png").exists()  # curves only, no contour for 4-D


def test_bad_race_input() -> None:
    from tuneless import SpecError, UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown problem 'rosenbrok'; did you mean 'rosenbrock'"):
        run_race("rosenbrok", ["polyak"], steps=5)
    with pytest.raises(UnknownNameError, match="unknown optimizer 'polyakk'; did you mean 'polyak'"):
        run_race("rosenbrock", ["polyakk"], steps=5)
    with pytest.raises(UnknownNameError, match="unknown lr scheduler 'cosin'; did you mean 'cosine'"):
        run_race("rosenbrock", ["adam@cosin"], steps=5)
    with pytest.raises(SpecError, match="expected key=value"):
        run_race("rosenbrock", ["adam:lr"], steps=5)
    with pytest.raises(ValueError, match="start has 3 coordinates"):
        run_race("rosenbrock", ["adam"], steps=5, start=[1, 2, 3])
    with pytest.raises(ValueError, match="no optimizer specs"):
        run_race("rosenbrock", [], steps=5)
