"""The benchmark's scoring: evaluation curves during a run, held-out metrics as the headline,
time to target, the performance profile and its area, hardware in the key, schema 2."""

from __future__ import annotations

import math
import sqlite3
import time

import numpy as np
import pytest
import torch

from tuneless.bench import InlineExecutor, ResultStore, build_suite, compute_results, run_sweep
from tuneless.bench.executors import CACHE_ENV, execute_task
from tuneless.bench.metrics import (Metric, median_time, performance_profile, profile_ratios, profile_score,
                                    time_to_target)
from tuneless.bench.store import _SCHEMA, APPLICATION_ID, SCHEMA_VERSION, RunRecord
from tuneless.bench.suite import PRESETS, BenchInputError, Task
from tuneless.problems.base import Problem, ProblemInstance
from tuneless.report.bench_report import markdown_report, write_html
from tuneless.run import evaluation_steps, run

from tests.bench_util import tiny_suite

INF = math.inf
EVAL_STEPS = [0, 25, 50, 75, 100]


def erec(spec, test_curve, *, role="method", problem="p", seed=0, train_final=None, lr=None, base=None,
         status="ok", steps=100):
    """A hand-made run scored on test_loss, evaluated at EVAL_STEPS (its last value is the final one)."""
    test_curve = np.asarray(test_curve, dtype=float)
    loss = np.linspace(4.0, test_curve[-1] if train_final is None else train_final, steps)
    final = {"loss": float(loss[-1]), "test_loss": float(test_curve[-1])}
    return RunRecord(key=f"{problem}|{spec}|{seed}", problem=problem, kind="learning", spec=spec, role=role,
                     seed=seed, steps=steps, status=status, final=final, steps_done=steps, train_seconds=1.0,
                     wall_seconds=1.0, initial_loss=4.0, loss=loss, step_size=np.full(steps, 0.1), lr=lr, base=base,
                     target_metric="test_loss", target_higher=False, eval_steps=np.array(EVAL_STEPS),
                     eval_curves={"test_loss": test_curve, "loss": np.linspace(4.0, loss[-1], len(EVAL_STEPS))})


# ---------------------------------------------------------------------------- the scoring's definitions


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    metric = Metric("test_loss")
    r = erec("m", [4.0, 2.0, 1.0, 0.9, 1.2])
    assert time_to_target(r, 1.0, metric) == 0.5  # at or below: 1.0 <= 1.0 at step 50 of 100
    assert time_to_target(r, 0.9, metric) == 0.75
    assert time_to_target(r, 0.5, metric) == INF
    assert time_to_target(r, INF, metric) == INF
    old = erec("m", [4.0, 1.0])
    old.eval_steps, old.eval_curves = np.zeros(0, dtype=np.int64), {}  # a schema-1 run: unknown
    assert time_to_target(old, 1.0, metric) is None
    # a higher-is-better metric is scored as an error rate
    acc = erec("m", [4.0, 1.0, 1.0, 1.0, 1.0])
    acc.eval_curves["test_accuracy"] = np.array([0.1, 0.5, 0.8, 0.95, 0.9])
    assert time_to_target(acc, 1 - 0.8, Metric("test_accuracy", True)) == pytest.approx(0.5)


def test_median_over_seeds_counts_a_miss_as_infinite():
    assert median_time([0.25, 0.5, INF]) == 0.5
    assert median_time([0.25, INF, INF]) == INF  # a majority missed
    assert median_time([0.2, 0.4]) == pytest.approx(0.3)
    assert median_time([0.2, INF]) == INF  # even count: a middle value missed
    assert median_time([0.2, None]) is None and median_time([]) is None


def test_profile_ratios_profile_and_area_have_known_values():
    times = {"A": {"p": 0.25, "q": 0.75, "r": INF}, "B": {"p": 0.5, "q": 0.25, "r": INF},
             "C": {"p": INF, "q": None, "r": INF}}
    ratios = profile_ratios(times)
    assert ratios == {"A": {"p": 1.0, "q": 3.0, "r": INF}, "B": {"p": 2.0, "q": 1.0, "r": INF},
                      "C": {"p": INF, "q": INF, "r": INF}}
    taus = [1.0, 1.99, 2.0, 2.5, 3.0, 4.0]
    np.testing.assert_allclose(performance_profile(ratios["A"].values(), taus), [1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(performance_profile(ratios["B"].values(), taus), [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    # area over [1, 4] / 3: A = (1 + 1/3 + 0) / 3, B = (2/3 + 1 + 0) / 3, C = 0
    assert profile_score(ratios["A"].values()) == pytest.approx((1 + 1 / 3) / 3)
    assert profile_score(ratios["B"].values()) == pytest.approx((2 / 3 + 1) / 3)
    assert profile_score(ratios["C"].values()) == 0.0
    assert profile_score([1.0, 1.0]) == 1.0 and profile_score([4.0]) == 0.0 and math.isnan(profile_score([]))
    # the exact area matches a fine numerical integral of rho
    fine = np.linspace(1.0, 4.0, 300_001)
    assert np.trapezoid(performance_profile(ratios["A"].values(), fine), fine) / 3 == pytest.approx(
        profile_score(ratios["A"].values()), abs=1e-4)
    # a target met at the start by the best (time 0): it gets 1, a later method inf
    assert profile_ratios({"A": {"p": 0.0}, "B": {"p": 0.5}}) == {"A": {"p": 1.0}, "B": {"p": INF}}


def _hand_made_store_records():
    """Two problems; the oracle's best lr differs between the held-out and the training loss."""
    out = []
    for problem in ("p", "q"):
        # adam 1e-2 overfits: lowest training loss, worse held-out loss; adam 1e-3 is best held out
        out.append(erec("adam:lr=0.01", [4.0, 2.5, 2.0, 1.6, 1.5], role="oracle", problem=problem, lr=1e-2,
                        base="adam", train_final=0.1))
        out.append(erec("adam:lr=0.001", [4.0, 2.0, 1.5, 1.2, 1.0], role="oracle", problem=problem, lr=1e-3,
                        base="adam", train_final=0.5))
        out.append(erec("adam:lr=0.0001", [4.0, 3.0, 2.5, 2.2, 2.0], role="oracle", problem=problem, lr=1e-4,
                        base="adam", train_final=2.0))
    out += [erec("A", [4.0, 1.0, 0.9, 0.9, 0.9], problem="p"), erec("A", [4.0, 2.0, 1.5, 1.0, 1.0], problem="q"),
            erec("B", [4.0, 2.0, 0.95, 1.0, 1.0], problem="p"), erec("B", [4.0, 0.8, 0.8, 0.8, 0.8], problem="q"),
            erec("C", [4.0, 3.0, 2.0, 1.5, 1.1], problem="p", train_final=0.05),
            erec("C", [4.0, 3.0, 2.0, 1.5, 1.2], problem="q", train_final=0.05)]
    return out


def test_headline_on_the_target_metric_with_time_to_target_and_algoperf_score():
    records = _hand_made_store_records()
    res = compute_results(records, view="target")
    assert [(o.metric.name, o.lr, o.target) for o in res.oracles] == [("test_loss", 1e-3, 1.0)] * 2
    assert res.cell("A", "p").ratio == pytest.approx(0.9) and res.cell("C", "q").ratio == pytest.approx(1.2)
    times = {(m, p): res.cell(m, p).time_to_target for m in "ABC" for p in "pq"}
    assert times == {("A", "p"): 0.25, ("A", "q"): 0.75, ("B", "p"): 0.5, ("B", "q"): 0.25,
                     ("C", "p"): INF, ("C", "q"): INF}
    by = {s.method: s for s in res.summaries}
    assert by["A"].algoperf_score == pytest.approx((1 + 1 / 3) / 2)  # ratios 1 and 3
    assert by["B"].algoperf_score == pytest.approx((2 / 3 + 1) / 2)  # ratios 2 and 1
    assert by["C"].algoperf_score == 0.0 and (by["C"].reached, by["C"].profile_problems) == (0, 2)
    assert res.oracles[0].time_to_target == 1.0
    np.testing.assert_allclose(res.rho("A", [1.0, 2.9, 3.0]), [0.5, 0.5, 1.0])
    # the second view: the training loss picks the overfitting point, and C (lowest training loss) beats it
    train = compute_results(records, view="train")
    assert [(o.metric.name, o.lr) for o in train.oracles] == [("loss", 1e-2)] * 2
    assert train.cell("C", "p").ratio == pytest.approx(0.5)
    text = markdown_report(res, train=train)
    assert "| scored on | test_loss | test_loss |" in text and "| scored on | loss | loss |" in text
    assert text.index("AlgoPerf score") < text.index("### Second view")


def test_runs_of_different_hardware_are_never_compared():
    records = _hand_made_store_records()
    for r in _hand_made_store_records():
        r.device, r.autocast = "cuda", "bfloat16"
        records.append(r)
    res = compute_results(records)
    assert [o.label for o in res.oracles] == ["p", "q", "p [cuda bfloat16]", "q [cuda bfloat16]"]
    assert all(len(o.records) == 1 for o in res.oracles)


# ---------------------------------------------------------------------------- evaluation during a run


class _NoisyInstance(ProblemInstance):
    """Training draws from torch's global RNG; evaluation and its preparation draw from it too."""

    def __init__(self, dtype):
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(6, generator=gen, dtype=dtype).requires_grad_()
        self.m = torch.randn(6, 6, generator=gen, dtype=dtype)
        self.params = [self.w]
        self.prepared = 0
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def loss(self, step):
        out = self.m @ self.w
        self.seen.append((out.dtype, self.w.dtype))
        return ((out.float() - torch.randn(6)) ** 2).mean()

    def prepare_evaluation(self):
        self.prepared += 1
        torch.randn(10)

    def evaluate(self):
        torch.rand(100)
        w = self.w.detach()
        return {"loss": float((self.m @ w).square().mean()), "w_sum": float(w.sum()), "w_norm": float(w.norm())}


class _NoisyProblem(Problem):
    name = "noisy_test_problem"
    kind = "learning"
    default_steps = 25
    last: _NoisyInstance | None = None

    def instantiate(self, seed=0, *, dtype=torch.float32, device="cpu", start=None):
        type(self).last = _NoisyInstance(dtype)
        return type(self).last


@pytest.mark.parametrize("spec", ["sf_adamw", "prodigy"])
def test_evaluation_changes_neither_training_nor_its_random_numbers(spec):
    problem = _NoisyProblem()
    plain = run(problem, spec, steps=25, eval_points=0)
    assert problem.last.prepared == 2  # the start and the end
    evaluated = run(problem, spec, steps=25, eval_points=5)
    assert problem.last.prepared == 6  # 0, 5, 10, 15, 20, 25
    np.testing.assert_array_equal(plain.loss, evaluated.loss)
    np.testing.assert_array_equal(plain.step_size, evaluated.step_size)
    assert plain.final == evaluated.final  # same parameters at the end (w_sum, w_norm)
    assert evaluated.eval_steps.tolist() == [0, 5, 10, 15, 20, 25]
    assert {k: v[-1] for k, v in evaluated.eval_metrics.items()} == evaluated.final


def test_evaluation_steps():
    assert evaluation_steps(100, 20) == list(range(0, 101, 5))
    assert evaluation_steps(30, 20)[:4] == [0, 2, 3, 4] and evaluation_steps(30, 20)[-1] == 30
    assert len(evaluation_steps(30, 20)) == 21
    assert evaluation_steps(3, 20) == [0, 1, 2, 3] and evaluation_steps(7, 0) == [0, 7]
    with pytest.raises(ValueError, match="eval_points = -1 is invalid; allowed: an integer >= 0"):
        evaluation_steps(10, -1)


def test_bfloat16_autocast_on_the_cpu_keeps_float32_parameters():
    problem = _NoisyProblem()
    run(problem, "adam:lr=0.01", steps=5, autocast=torch.bfloat16)
    assert set(problem.last.seen) == {(torch.bfloat16, torch.float32)}
    run(problem, "adam:lr=0.01", steps=5)
    assert set(problem.last.seen) == {(torch.float32, torch.float32)}
    t0 = time.perf_counter()
    task32 = Task("logreg_wine", "adam:lr=0.01@cosine", 0, 40, eval_points=4)
    task16 = Task("logreg_wine", "adam:lr=0.01@cosine", 0, 40, autocast="bfloat16", eval_points=4)
    r32, r16 = execute_task(task32), execute_task(task16)
    assert task16.key == task32.key + "|autocast=bfloat16"
    assert (r16.status, r16.autocast, r16.device, r32.autocast) == ("ok", "bfloat16", "cpu", None)
    assert not np.array_equal(r16.loss, r32.loss)  # bf16 rounding shows
    np.testing.assert_allclose(r16.loss, r32.loss, rtol=0.1)
    assert r16.final["test_loss"] < 0.5 * r16.eval_curves["test_loss"][0]  # it learns
    assert r16.target_metric == "test_loss" and r16.eval_steps.tolist() == [0, 10, 20, 30, 40]
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ValueError, match="autocast"):
        run(problem, "adam", steps=2, autocast=torch.float64)


def test_bad_device_and_dtype_are_refused_early():
    with pytest.raises(BenchInputError, match="device = 'gpu' is invalid"):
        build_suite("quick", problems=["logreg_wine"], optimizers=["polyak"], device="gpu")
    with pytest.raises(BenchInputError, match="autocast = 'int8' is invalid"):
        build_suite("quick", problems=["logreg_wine"], optimizers=["polyak"], autocast="int8")
    suite = build_suite("quick", problems=["logreg_wine"], optimizers=["polyak"], device="cuda", autocast="bfloat16")
    assert all(t.key.endswith("|device=cuda|autocast=bfloat16") for t in suite.method_tasks())


def test_medium_preset_holds_the_heavy_workloads():
    names = [p for p, _ in PRESETS["medium"][0]]
    assert names == ["transformer_lm:size=medium", "resnet_digits:size=medium", "finetune_digits", "mlp_digits_long"]
    suite = build_suite("medium", optimizers=["polyak"])
    assert [p for p, _ in suite.problems] == names
    assert all(n >= 1 for _, n in suite.problems)


# ---------------------------------------------------------------------------- the sweep and the store


def test_the_sweep_gives_every_run_the_store_cache_folder(tmp_path, monkeypatch):
    seen = []

    def fake_run(problem, spec, **kw):
        import os

        seen.append(os.environ.get(CACHE_ENV))
        raise RuntimeError("stop here")

    monkeypatch.setattr("tuneless.run.run", fake_run)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    db = tmp_path / "sub" / "c.sqlite"
    with ResultStore(db) as store:
        stats = run_sweep(tiny_suite(problems=(("logreg_wine", 5),), methods=("polyak",)), store, InlineExecutor())
    assert stats.executed == len(seen) > 1
    assert set(seen) == {str((tmp_path / "sub" / "cache").resolve())}
    import os

    assert CACHE_ENV not in os.environ  # restored after each run


def _v1_store(path):
    """A store as tuneless wrote it at schema version 1, with one run."""
    conn = sqlite3.connect(path)
    for statement in _SCHEMA.split(";\n"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    curve = __import__("tuneless.bench.store", fromlist=["encode_array"]).encode_array(np.linspace(2.0, 0.5, 10))
    for key, role, spec, lr, final in (("a", "oracle", "adam:lr=0.01@cosine", 0.01, 0.5),
                                        ("b", "method", "polyak", None, 0.6)):
        conn.execute(
            "INSERT INTO runs (key, problem, kind, spec, role, base, lr, seed, steps, status, final_loss, initial_loss,"
            " min_value, final_json, error, steps_done, train_seconds, wall_seconds, loss_curve, step_size_curve,"
            " positions, positions_dim, versions_json, created_at) VALUES (?, 'logreg_wine', 'learning', ?, ?, ?, ?,"
            " 0, 10, 'ok', ?, 2.0, NULL, ?, NULL, 10, 0.1, 0.2, ?, ?, NULL, NULL, '{}', 'then')",
            (key, spec, role, "adam" if lr else None, lr, final, f'{{"loss": {final}, "test_loss": {final + 0.1}}}',
             curve, curve))
    conn.commit()
    conn.close()


def test_a_version_1_store_is_migrated_on_open_and_reports(tmp_path):
    path = tmp_path / "v1.sqlite"
    _v1_store(path)
    with ResultStore(path, create=False) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        records = store.records()
        assert "migrated_from_1" in store.meta()
    assert [(r.device, r.autocast, r.target_metric, r.eval_steps.size, r.eval_curves) for r in records] == \
        [("cpu", None, None, 0, {})] * 2
    res = compute_results(records)
    o = res.oracles[0]
    assert o.metric.name == "test_loss" and o.final_value == pytest.approx(0.6)  # the registered target metric
    assert res.cell("polyak", "logreg_wine").ratio == pytest.approx(0.7 / 0.6)
    assert res.cell("polyak", "logreg_wine").time_to_target is None and res.summaries[0].algoperf_score is None
    doc = write_html(res, tmp_path / "v1.html", records=records).read_text()
    assert "<h2>performance profile</h2>" in doc and "no time to target" in doc
    # the migrated store takes new runs with curves, and keeps the old ones
    with ResultStore(path) as store:
        new = erec("polyak", [2.0, 1.0, 0.7, 0.6, 0.5], problem="logreg_wine")
        new.key, new.device = "c", "cuda"
        assert store.write(new)
        back = {r.key: r for r in store.records()}
    assert back["c"].device == "cuda" and back["c"].eval_steps.tolist() == EVAL_STEPS
    np.testing.assert_array_equal(back["c"].eval_curves["test_loss"], [2.0, 1.0, 0.7, 0.6, 0.5])
    assert back["a"].final == {"loss": 0.5, "test_loss": 0.6}
