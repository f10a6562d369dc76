"""The learning problems: registered, offline, seeded and deterministic, with minibatch noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneless.problems import PROBLEMS, available_problems, get_problem
from tuneless.problems.learning import LEARNING_PROBLEMS, Batches
from tuneless.run import run

LEARNING = [cls.name for cls in LEARNING_PROBLEMS]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in the benchmark's workers (and no oversubscription on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registered_as_learning_problems():
    assert set(LEARNING) <= set(available_problems("learning"))
    for name in LEARNING:
        assert PROBLEMS[name].kind == "learning"
        assert PROBLEMS[name].default_steps >= 100


@pytest.mark.parametrize("name", LEARNING)
def test_deterministic_per_seed(name):
    problem = get_problem(name)
    dtype = problem.bench_dtype
    a = run(problem, "adam:lr=1e-2", steps=12, seed=3, dtype=dtype)
    b = run(problem, "adam:lr=1e-2", steps=12, seed=3, dtype=dtype)
    c = run(problem, "adam:lr=1e-2", steps=12, seed=4, dtype=dtype)
    assert a.error is None and not a.diverged
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.final == b.final
    assert not np.array_equal(a.loss, c.loss), "another seed must change the initialization or the batches"
    assert "loss" in a.final and "test_loss" in a.final
    start = problem.instantiate(3, dtype=dtype).evaluate()["loss"]
    assert a.final["loss"] < start, "12 Adam steps should lower the training loss"


@pytest.mark.parametrize("name", ["logreg_digits", "mlp_wine", "cnn_digits", "char_lm"])
def test_classifiers_report_accuracy(name):
    inst = get_problem(name).instantiate(0)
    metrics = inst.evaluate()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert 0.0 <= metrics["train_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["logreg_wine", "least_squares", "matrix_factorization", "char_lm"])
def test_minibatch_noise(name):
    """Different steps see different minibatches: the loss at fixed parameters changes with the step."""
    inst = get_problem(name).instantiate(0)
    with torch.no_grad():
        values = {float(inst.loss(t)) for t in range(5)}
    assert len(values) > 1


def test_batches_are_a_function_of_the_step():
    b1, b2 = Batches(100, 32, seed=1), Batches(100, 32, seed=1)
    later = [b1(t).tolist() for t in (7, 0, 3)]
    assert later == [b2(t).tolist() for t in (7, 0, 3)]
    epoch = torch.cat([b1(t) for t in range(3)])
    assert len(set(epoch.tolist())) == 96, "one epoch visits each example at most once"


def test_min_zero_problems_reach_small_error():
    problem = get_problem("least_squares")
    assert problem.min_value == 0.0
    trace = run(problem, "sgd:lr=0.3,momentum=0.9", steps=300, seed=0, dtype=torch.float64)
    assert trace.final["loss"] < 1e-3 * trace.loss[0]


def test_batch_size_spec_round_trips():
    p = get_problem("mlp_wine:batch_size=8")
    assert p.batch_size == 8 and p.spec() == "mlp_wine:batch_size=8"
    assert get_problem(p.spec()).spec() == p.spec()
    assert get_problem("mlp_wine").spec() == "mlp_wine"


def test_bundled_datasets_read_without_sklearn_import():
    from tuneless.problems.learning import _raw_dataset

    for name, shape, classes in (("digits", (1797, 64), 10), ("wine", (178, 13), 3), ("breast_cancer", (569, 30), 2)):
        x, y = _raw_dataset(name)
        assert tuple(x.shape) == shape
        assert sorted(set(y.tolist())) == list(range(classes))
    x, _ = _raw_dataset("digits")
    assert float(x.max()) == 16.0 and float(x.min()) == 0.0
