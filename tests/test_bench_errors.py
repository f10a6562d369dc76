"""Bad input to the benchmark: clear errors up front, or a recorded failed run; never a crashed sweep."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from tests.bench_util import tiny_suite
from tuneless.bench import BenchInputError, InlineExecutor, ResultStore, build_suite, run_sweep
from tuneless.bench.executors import Executor, Outcome, execute_task
from tuneless.bench.store import SCHEMA_VERSION
from tuneless.bench.suite import Task
from tuneless.cli_bench import main
from tuneless.errors import SpecError, UnknownArgumentError, UnknownNameError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unknown_problem_suggests_close_matches():
    with pytest.raises(UnknownNameError, match=r"unknown problem 'rosenbrok'; did you mean 'rosenbrock'"):
        build_suite("quick", problems=["rosenbrok"])
    with pytest.raises(UnknownNameError, match=r"did you mean 'mlp_digits'"):
        build_suite("quick", problems=["mlp_digit"])


def test_unknown_optimizer_suggests_close_matches():
    with pytest.raises(UnknownNameError, match=r"unknown optimizer 'polyk'; did you mean 'polyak'"):
        build_suite("quick", optimizers=["polyk"])
    with pytest.raises(UnknownNameError, match=r"unknown lr scheduler 'cosin'; did you mean 'cosine'"):
        build_suite("quick", optimizers=["adam@cosin"])


def test_unknown_preset_suggests_close_matches():
    with pytest.raises(UnknownNameError, match=r"unknown suite preset 'quik'; did you mean 'quick'"):
        build_suite("quik")


@pytest.mark.parametrize("spec, error, message", [
    ("polyak:f_star", SpecError, r"bad argument 'f_star' in spec 'polyak:f_star'; expected key=value"),
    ("adam:lr=(1e-3", SpecError, r"unbalanced brackets"),
    ("adam@cosine@cosine", SpecError, r"more than one '@'"),
    ("", SpecError, r"empty spec"),
    ("polyak:fstar=0", UnknownArgumentError, r"in spec 'polyak:fstar=0': .*unknown keyword argument 'fstar'; "
                                              r"did you mean 'f_star'"),
    ("adam:lr=-1", ValueError, r"in spec 'adam:lr=-1': Invalid learning rate: -1"),
])
def test_malformed_or_invalid_specs(spec, error, message):
    with pytest.raises(error, match=message):
        build_suite("quick", optimizers=[spec])


def test_bad_seeds_steps_and_empty_lists():
    with pytest.raises(BenchInputError, match=r"seed = -1 is invalid"):
        build_suite("quick", seeds=[-1])
    with pytest.raises(BenchInputError, match=r"steps = 0 is invalid"):
        build_suite("quick", steps=0)
    with pytest.raises(BenchInputError, match=r"--optimizers is empty"):
        build_suite("quick", optimizers=[])
    with pytest.raises(BenchInputError, match=r"--problems is empty"):
        build_suite("quick", problems=[])


def test_cli_reports_bad_input_as_an_error_not_a_traceback(tmp_path, capsys):
    db = str(tmp_path / "x.sqlite")
    assert main(["bench", "--problems", "rosenbrok", "--db", db, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tuneless bench: error: unknown problem 'rosenbrok'; did you mean 'rosenbrock'" in err
    assert "Traceback" not in err
    assert main(["bench", "--optimizers", "prodigy:d_coef", "--db", db, "--quiet"]) == 2
    assert "bad argument 'd_coef'" in capsys.readouterr().err
    assert main(["bench", "--workers", "0", "--db", db]) == 2
    assert "--workers = 0 is invalid" in capsys.readouterr().err
    assert main(["report", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_cli_refuses_a_store_from_a_newer_schema(tmp_path, capsys):
    db = tmp_path / "newer.sqlite"
    ResultStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    conn.commit()
    conn.close()
    assert main(["bench", "--problems", "rosenbrock", "--optimizers", "polyak", "--steps", "5", "--db", str(db),
                 "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"schema version {SCHEMA_VERSION + 3}, written by a newer tuneless" in err
    assert main(["report", "--db", str(db)]) == 2
    assert "written by a newer tuneless" in capsys.readouterr().err


def test_a_run_that_raises_or_diverges_is_recorded_and_the_sweep_goes_on(tmp_path):
    # LBFGS raises at its first step without a closure; plain SGD at lr=10 diverges on the banana
    suite = tiny_suite(problems=(("rosenbrock", 60),), methods=("torch.optim.LBFGS", "sgd:lr=10", "polyak"))
    with ResultStore(tmp_path / "e.sqlite") as store:
        stats = run_sweep(suite, store, InlineExecutor())
        by_spec = {r.spec: r for r in store.records(role="method")}
    assert set(by_spec) == {"torch.optim.LBFGS", "sgd:lr=10", "polyak"}
    assert by_spec["torch.optim.LBFGS"].status == "failed"
    assert "TypeError" in by_spec["torch.optim.LBFGS"].error
    assert by_spec["sgd:lr=10"].status == "diverged"
    assert by_spec["polyak"].status == "ok"
    assert stats.failed >= 1 and stats.diverged >= 1


def test_an_exception_outside_the_optimizer_is_recorded():
    record = execute_task(Task("no_such_problem", "polyak", 0, 5))
    assert record.status == "failed" and "UnknownNameError" in record.error and "no_such_problem" in record.error


class _CrashingExecutor(Executor):
    """Every run of ``doomed`` dies with its worker; the others run inline."""

    capacity = 1

    def __init__(self, doomed: str) -> None:
        self.doomed, self.queue, self.crashes = doomed, [], 0

    def submit(self, task):
        self.queue.append(task)

    def in_flight(self):
        return len(self.queue)

    def wait(self):
        task = self.queue.pop(0)
        if task.spec == self.doomed:
            self.crashes += 1
            return [Outcome(task, None, crash="worker process died (SIGKILL)")]
        return [Outcome(task, execute_task(task))]


def test_a_dead_worker_is_retried_once_then_recorded_as_failed(tmp_path):
    suite = tiny_suite(problems=(("rosenbrock", 30),), methods=("sps", "polyak"))
    executor = _CrashingExecutor("sps")
    with ResultStore(tmp_path / "k.sqlite") as store:
        stats = run_sweep(suite, store, executor)
        by_spec = {r.spec: r for r in store.records(role="method")}
    assert executor.crashes == 2
    assert by_spec["sps"].status == "failed" and "worker crashed 2 times" in by_spec["sps"].error
    assert by_spec["polyak"].status == "ok"
    assert len(stats.crashes) == 2 and stats.executed == stats.planned
