"""Parity of tuneless.MomoAdam with the authors' package, momo-opt 0.1.0 (``momo.MomoAdam``).

Same arguments (the reference's ``lr`` is tuneless's ``cap``, with ``lr`` = 1, and its
``use_fstar`` / ``lb`` are ``estimate_lower_bound`` / ``lower_bound``), float64, one param group
of three tensors (the reference keeps one lower bound for all groups and overwrites it group
after group), parameters compared after every step for 200 steps.

The reference keeps the running average of <g, x> in a float32 scalar (``torch.tensor(0.)``)
whatever the parameters' dtype; that alone puts it 1e-12 away after one step and, with the
learned lower bound, 1e-8 after three (the bound feeds back into every step). The test gives
the reference's state a float64 scalar before its first step (the only change to it); all
other state is what it creates itself.

The model is multinomial logistic regression on linearly separable data (no finite minimum,
so the iterates travel instead of hovering where rounding is amplified chaotically), started
small. Each configuration below was checked to keep the Polyak step in charge for part of the
run (``cap`` large) or the whole of it (a lower bound), except ``default``, whose cap binds.
"""

from __future__ import annotations

import pytest
import torch

momo = pytest.importorskip("momo", reason="test-only dependency momo-opt==0.1.0")

from tests.separable import SeparableLogistic  # noqa: E402
from tuneless import MomoAdam  # noqa: E402

STEPS = 200
RTOL = 1e-10
DT = torch.float64


def reference(params: list[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """``momo.MomoAdam`` with its <g, x> average in float64 (see the module docstring)."""
    opt = momo.MomoAdam(params, **kwargs)
    for p in params:
        opt.state[p].update(step=0, grad_avg=torch.zeros_like(p), grad_avg_sq=torch.zeros_like(p),
                            grad_dot_w=torch.zeros((), dtype=DT))
    return opt


#: name: (reference kwargs, tuneless kwargs)
CONFIGS = {
    "default": ({}, {}),
    "cap=1": (dict(lr=1.0), dict(cap=1.0)),
    "weight_decay": (dict(lr=0.3, weight_decay=0.01), dict(cap=0.3, weight_decay=0.01)),
    "lower_bound": (dict(lr=1.0, lb=0.01), dict(cap=1.0, lower_bound=0.01)),
    "use_fstar": (dict(lr=1.0, use_fstar=True), dict(cap=1.0, estimate_lower_bound=True)),
    "use_fstar+lb+weight_decay+betas": (
        dict(lr=1.0, lb=-0.5, use_fstar=True, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6),
        dict(cap=1.0, lower_bound=-0.5, estimate_lower_bound=True, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)),
}
CASES = [pytest.param(ref, ours, foreach, id=f"{name}-{'foreach' if foreach else 'loop'}")
         for name, (ref, ours) in CONFIGS.items() for foreach in (True, False)]


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over one tensor (the norm-wise relative error)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("ref_kwargs, kwargs, foreach", CASES)
def test_matches_momo_opt_step_by_step(ref_kwargs, kwargs, foreach) -> None:
    theirs, ours = SeparableLogistic(), SeparableLogistic()
    ref = reference(theirs.params, **ref_kwargs)
    opt = MomoAdam(ours.params, foreach=foreach, **kwargs)
    below_cap = 0
    for k in range(STEPS):
        for model, o in ((theirs, ref), (ours, opt)):
            o.zero_grad()
            loss = model.loss()
            loss.backward()
            o.step(loss=loss)
        for a, b in zip(ours.params, theirs.params):
            assert _close(a.detach(), b.detach()) < RTOL, f"step {k + 1}: {_close(a.detach(), b.detach()):.2e}"
        below_cap += float(opt.param_groups[0]["effective_lr"]) < 0.999 * opt.param_groups[0]["cap"]
    if kwargs.get("estimate_lower_bound"):
        assert float(opt.f_star_estimates[0]) == pytest.approx(ref.lb, rel=1e-9, abs=1e-12)
    if kwargs:  # the configurations meant to exercise the Polyak step did
        assert below_cap >= 40, f"the Polyak step was below the cap at only {below_cap} steps"


def test_lr_multiplies_the_cap() -> None:
    """lr = 0.5 with cap = 0.02 is the reference's lr = 0.01 (and the cap binds at the first step)."""
    theirs, ours = SeparableLogistic(), SeparableLogistic()
    ref = reference(theirs.params, lr=0.01)
    opt = MomoAdam(ours.params, lr=0.5, cap=0.02)
    for model, o in ((theirs, ref), (ours, opt)):
        loss = model.loss()
        loss.backward()
        o.step(loss=loss)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(0.01, rel=1e-12)
    for a, b in zip(ours.params, theirs.params):
        assert _close(a.detach(), b.detach()) < 1e-14


def test_published_step_is_the_step_along_the_bias_corrected_direction() -> None:
    """effective_lr = rho_k tau_k: the first step moves each coordinate by at most effective_lr
    (Adam's first direction is the sign of the gradient, up to eps)."""
    model = SeparableLogistic()
    start = [p.detach().clone() for p in model.params]
    opt = MomoAdam(model.params, cap=1.0)
    loss = model.loss()
    loss.backward()
    opt.step(loss=loss)
    eta = float(opt.param_groups[0]["effective_lr"])
    assert 0 < eta < 1.0  # the Polyak step: f / ||g||_1 on the first step, below the cap
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(model.params, start))
    assert moved == pytest.approx(eta, rel=1e-6)
    l1 = sum(p.grad.abs().sum() for p in model.params)
    assert eta == pytest.approx(float(loss.detach() / l1), rel=1e-6)


def test_zero_gradient_and_non_finite_loss_give_a_zero_step() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    opt = MomoAdam([x], cap=1.0)
    x.grad = torch.zeros(2, dtype=DT)
    opt.step(loss=torch.tensor(3.0, dtype=DT))
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=DT))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0
    x.grad = torch.ones(2, dtype=DT)
    avg = opt.param_groups[0]["loss_avg"].clone()
    opt.step(loss=torch.tensor(float("nan"), dtype=DT))
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=DT))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0
    assert torch.equal(opt.param_groups[0]["loss_avg"], avg)


def test_not_learning_rate_free_but_in_the_benchmark_default_set() -> None:
    import tuneless
    from tuneless.bench.suite import default_methods

    assert "momo_adam" not in tuneless.learning_rate_free()
    assert "momo_adam" in tuneless.registry.methods_at_defaults()
    assert "momo_adam" in default_methods()
    assert isinstance(tuneless.create("momo_adam", SeparableLogistic().params), MomoAdam)


@pytest.mark.parametrize("foreach", [True, False])
def test_float16_zero_gradient_keeps_the_parameters_finite(foreach) -> None:
    """eps = 1e-8 rounds to 0 in float16: Adam's denominator then was 0 + 0 and m / D NaN."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = MomoAdam([p], foreach=foreach)
    for grad in (0.0, 1.0):
        p.grad = torch.full((3,), grad, dtype=torch.float16)
        opt.step(loss=1.0)
    assert torch.isfinite(p).all() and (p < 1).all()
