"""The ``transformed`` problem: the optimizer sees scale * loss + shift, the evaluation is unchanged."""

from __future__ import annotations

import pytest
import torch

from tuneless import InvalidArgumentError
from tuneless.bench.suite import build_suite
from tuneless.problems import get_problem


@pytest.mark.parametrize("inner", ["rosenbrock", "logreg_wine"])
def test_loss_is_transformed_and_evaluation_is_not(inner):
    plain = get_problem(inner).instantiate(0)
    t = get_problem(f"transformed:problem={inner!r},scale=1000.0,shift=2.5")
    moved = t.instantiate(0)
    assert float(moved.loss(3).detach()) == pytest.approx(1000.0 * float(plain.loss(3).detach()) + 2.5, rel=1e-6)
    # gradients are scale times the inner ones
    g_plain = torch.autograd.grad(plain.loss(1), plain.params[0])[0]
    g_moved = torch.autograd.grad(moved.loss(1), moved.params[0])[0]
    torch.testing.assert_close(g_moved, 1000.0 * g_plain, rtol=1e-5, atol=0)
    assert moved.evaluate() == plain.evaluate()
    p = get_problem(inner)
    assert (t.target_metric, t.min_value, t.default_steps, t.kind) == (p.target_metric, p.min_value, p.default_steps,
                                                                       p.kind)


def test_spec_round_trips_and_is_outside_the_presets():
    t = get_problem("transformed:problem='mlp_digits',shift=1.0")
    assert get_problem(t.spec()).spec() == t.spec()
    assert "shift=1.0" in t.spec() and "mlp_digits" in t.spec()
    full = build_suite("full", seeds=[0])
    assert not any(spec.startswith("transformed") for spec, _ in full.problems)


@pytest.mark.parametrize("kwargs, match", [
    ("problem='mlp_digits',scale=0.0", r"scale = 0.0 is invalid; allowed: 0 < scale"),
    ("problem='transformed'", r"problem = 'transformed' is invalid"),
])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        get_problem(f"transformed:{kwargs}")
