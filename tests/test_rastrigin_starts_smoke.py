"""benchmarks/rastrigin_starts.py: the oracle it runs is the benchmark's (the full suite's grid,
widened by the benchmark's rule), and the default's run from the standard start ends in the local
minimum at (2, 2) that docs/default.md reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rastrigin_starts  # noqa: E402


def test_the_oracle_is_the_full_suites_grid_widened_as_the_benchmark_widens_it(monkeypatch):
    from tuneless.bench.oracle import BASES, initial_grid, lr_value, oracle_spec
    from tuneless.bench.suite import PRESETS

    ran = []

    def lr_of(spec):
        return float(spec.split("lr=")[1].split(",")[0].split("@")[0])

    def fake(spec, start):  # the lowest learning rate of each base wins: the grid widens downwards
        ran.append(spec)
        return lr_of(spec)

    monkeypatch.setattr(rastrigin_starts, "final_loss", fake)
    best, spec, runs = rastrigin_starts.oracle((2.2, 2.2))
    config = PRESETS["full"][2]
    assert config.points_per_decade == 3
    for base in BASES:
        for k in initial_grid(base, config):
            assert oracle_spec(base, lr_value(k, 3)) in ran
    assert runs == len(ran) == len(set(ran)) > sum(len(initial_grid(b, config)) for b in BASES)
    assert best == min(lr_of(s) for s in ran) == 1e-8 and spec.startswith("adam:")  # down to the grid's limit


def test_the_default_stops_in_the_local_minimum_next_to_the_standard_start():
    assert rastrigin_starts.final_loss("tuneless", (2.2, 2.2)) == pytest.approx(7.9597, abs=1e-3)


def test_the_table_is_written(monkeypatch, tmp_path):
    monkeypatch.setattr(rastrigin_starts, "STARTS", ((2.2, 2.2), (0.0, 0.0)))
    monkeypatch.setattr(rastrigin_starts, "METHODS", {"tuneless (default)": "tuneless"})
    monkeypatch.setattr(rastrigin_starts, "oracle", lambda start: (sum(start), "sgd:lr=0.1", 1))
    monkeypatch.setattr(rastrigin_starts, "final_loss", lambda spec, start: 7.96 if start[0] else 0.0)
    out = tmp_path / "t.md"
    assert rastrigin_starts.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "| (2.2, 2.2) | 4.4 | `sgd:lr=0.1` | 7.96 |" in text
    assert "oracle 1/2, tuneless (default) 1/2" in text
