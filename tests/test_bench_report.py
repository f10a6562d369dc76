"""The metrics on hand-made runs, and the report rendered from a store (terminal table, HTML, export)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

from tests.bench_util import tiny_suite
from tuneless.bench import InlineExecutor, ResultStore, compute_results, run_sweep
from tuneless.bench.metrics import SOLVED, smooth
from tuneless.bench.store import RunRecord
from tuneless.cli_bench import main
from tuneless.report.bench_report import markdown_report, write_html


def rec(spec, role="method", final=1.0, status="ok", seed=0, loss=None, min_value=None, lr=None, base=None,
        problem="p", kind="learning", steps=100):
    loss = np.linspace(4.0, final, steps) if loss is None else np.asarray(loss, dtype=float)
    return RunRecord(key=f"{problem}|{spec}|{seed}", problem=problem, kind=kind, spec=spec, role=role, seed=seed,
                     steps=steps, status=status, final={"loss": final if status == "ok" else math.nan},
                     steps_done=len(loss), train_seconds=1.0, wall_seconds=1.0, initial_loss=float(loss[0]),
                     min_value=min_value, loss=loss, step_size=np.full(len(loss), 0.1), lr=lr, base=base)


def oracle_runs(problem="p", kind="learning", min_value=None, best=1.0):
    """Adam at 1e-3, 1e-2 (the best), 1e-1 (diverged); SGD at 1e-2, 1e-1."""
    out = []
    for base, lr, final, status in (("adam", 1e-3, 2 * best, "ok"), ("adam", 1e-2, best, "ok"),
                                    ("adam", 1e-1, 0.0, "diverged"), ("sgd", 1e-2, 3 * best, "ok"),
                                    ("sgd", 1e-1, 1.5 * best, "ok")):
        out.append(rec(f"{base}:lr={lr}", "oracle", final, status, lr=lr, base=base, problem=problem, kind=kind,
                       min_value=min_value))
    return out


def test_gap_ratio_counts_and_oracle_choice():
    records = oracle_runs() + [rec("good", final=1.05), rec("ok2x", final=1.8), rec("bad", final=3.0),
                               rec("div", status="diverged")]
    res = compute_results(records)
    o = res.oracles[0]
    assert (o.base, o.lr, o.score) == ("adam", 1e-2, 1.0)
    assert o.runs_per_seed == 5 and o.at_edge == ["sgd"]  # SGD's best is its last point
    assert res.cell("good", "p").ratio == pytest.approx(1.05)
    assert res.cell("bad", "p").ratio == pytest.approx(3.0)
    # a diverged run is scored at its start (4.0): no progress
    assert res.cell("div", "p").ratio == pytest.approx(4.0) and res.cell("div", "p").diverged == 1
    by = {s.method: s for s in res.summaries}
    assert (by["good"].within_1_1, by["good"].within_2) == (1, 1)
    assert (by["ok2x"].within_1_1, by["ok2x"].within_2) == (0, 1)
    assert by["div"].diverged == 1 and by["good"].oracle_runs == 5


def test_geometric_mean_over_problems_and_log_gap_for_min_zero():
    records = (oracle_runs("a") + oracle_runs("b", kind="analytic", min_value=0.0, best=1e-4)
               + [rec("m", final=2.0, problem="a"), rec("m", final=1e-2, problem="b", kind="analytic", min_value=0.0)])
    res = compute_results(records)
    cell_b = res.cell("m", "b")
    assert cell_b.log_gap == pytest.approx(2.0)
    assert res.summaries[0].geo_gap == pytest.approx(math.sqrt(2.0 * 100.0))
    # errors a million times below the start (4.0) count as solved: ties, not huge gaps
    res0 = compute_results(oracle_runs("c", min_value=0.0, best=1e-12) + [rec("z", final=1e-9, problem="c", min_value=0.0),
                                                                           rec("y", final=4e-5, problem="c", min_value=0.0)])
    assert res0.oracles[0].score == pytest.approx(4.0 * SOLVED)
    assert res0.cell("z", "c").ratio == 1.0
    assert res0.cell("y", "c").log_gap == pytest.approx(1.0)


def test_steps_to_within_1_1_of_the_oracle():
    steps = 100
    oracle = oracle_runs(kind="analytic")
    fast = rec("fast", final=1.0, loss=np.r_[4.0, np.full(steps - 1, 1.0)], kind="analytic")
    slow = rec("slow", final=1.0, kind="analytic")  # linear from 4 to 1: reaches 1.1 near the end
    never = rec("never", final=2.0, kind="analytic")
    res = compute_results(oracle + [fast, slow, never])
    assert res.cell("fast", "p").steps_to == 2
    assert 95 <= res.cell("slow", "p").steps_to <= 100
    assert res.cell("never", "p").steps_to is None


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_array_equal(smooth(np.array([1.0, 2.0]), 1), [1.0, 2.0])


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    before = torch.get_num_threads()
    db = tmp_path_factory.mktemp("report") / "r.sqlite"
    with ResultStore(db) as store:
        run_sweep(tiny_suite(problems=(("rosenbrock", 60), ("logreg_wine", 30)),
                             methods=("polyak", "sps", "sgd:lr=10")), store, InlineExecutor())
    torch.set_num_threads(before)
    return db


def store_records(path):
    with ResultStore(path) as store:
        return store.records()


def test_markdown_report_from_a_store(store_path):
    with ResultStore(store_path) as store:
        res = compute_results(store.records())
    text = markdown_report(res)
    header = ("| method | AlgoPerf score | reached target | gap (geo-mean) | within 1.1x | within 2x | diverged "
              "| failed | steps to 1.1x | s/run |")
    assert header in text
    assert "| scored on | loss | test_loss |" in text  # rosenbrock on its objective, logreg_wine held out
    train = markdown_report(res, train=compute_results(store_records(store_path), view="train"))
    assert "### Second view: the final training loss" in train and "| scored on | loss | loss |" in train
    assert "| method | rosenbrock † | logreg_wine |" in text
    for method in ("polyak", "sps", "sgd:lr=10"):
        assert re.search(rf"^\| {re.escape(method)} \| ", text, re.M), method
    assert "| oracle (base, lr) |" in text
    assert re.search(r"^\| sgd:lr=10 \| .*div", text, re.M), "the diverged method is marked"


def test_html_report_is_self_contained(store_path, tmp_path):
    with ResultStore(store_path) as store:
        records = store.records()
    out = write_html(compute_results(records), tmp_path / "r.html", store_path=store_path, records=records)
    doc = out.read_text()
    assert doc.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', doc)
    assert "gap heat-map" in images and "oracle grids" in images
    assert "trajectories rosenbrock" in images and "curves rosenbrock" in images and "curves logreg_wine" in images
    assert "<h2>performance profile</h2>" in doc and "performance profile" in images
    assert not re.search(r'(src|href)="(https?:)?//', doc), "nothing fetched from elsewhere"
    assert "<script" not in doc


def test_report_command_prints_writes_and_exports(store_path, tmp_path, capsys):
    html_path, csv_path, json_path = tmp_path / "o.html", tmp_path / "o.csv", tmp_path / "o.json"
    assert main(["report", "--db", str(store_path), "--out", str(html_path), "--csv", str(csv_path),
                 "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "| polyak |" in out and f"report written to {html_path.resolve()}" in out
    assert html_path.exists()
    with ResultStore(store_path) as store:
        n = store.count()
    assert len(list(csv.DictReader(open(csv_path)))) == n
    assert len(json.load(open(json_path))["runs"]) == n
