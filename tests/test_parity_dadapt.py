"""Step-by-step parity of DAdaptSGD / DAdaptAdam / DAdaptAdaGrad with the authors' ``dadaptation`` 3.2.

Same arguments on both sides, 200 steps in float64, a smooth convex model of four tensors in
two param groups (equal lr, as the reference requires); the parameters and d are compared
after every step to a relative 1e-10 (of each tensor's largest entry).

The model starts every coordinate far from its optimum, so that the trajectories do not
enter a chaotic regime where the last-bit rounding differences of two correct
implementations would be amplified (D-Adapt SGD without momentum sits at the edge of
stability on quadratics, hence lr=0.5 for that case). Inputs where tuneless deliberately
differs (unequal lrs, lr = 0, per-group weight decay, ...) are covered in ``test_dadapt.py``.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

dadaptation = pytest.importorskip("dadaptation")  # a pinned test dependency (requirements-dev.txt)

from tuneless import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD  # noqa: E402

STEPS = 200
RTOL = 1e-10


def make_model(seed: int = 0):
    """Four tensors, a smooth convex loss (quadratics, log-cosh, softplus, a coupling term)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64

    def far(*shape):  # offsets of magnitude 1 to 2, random signs
        return torch.sign(torch.randn(*shape, generator=g, dtype=dt)) * (1 + torch.rand(*shape, generator=g, dtype=dt))

    w_star = torch.randn(4, 3, generator=g, dtype=dt)
    b_star = torch.randn(4, generator=g, dtype=dt)
    v_star = torch.randn(3, 3, generator=g, dtype=dt)
    u_star = torch.randn(5, generator=g, dtype=dt)
    w = torch.nn.Parameter(w_star + far(4, 3))
    b = torch.nn.Parameter(b_star + far(4))
    v = torch.nn.Parameter(v_star + far(3, 3))
    u = torch.nn.Parameter(u_star + far(5))
    # Well-conditioned couplings (diagonally dominant): no coordinate starts with a tiny gradient.
    bw = 0.1 * torch.randn(3, 3, generator=g, dtype=dt)
    bw = bw @ bw.T + torch.diag(torch.tensor([1.0, 1.5, 2.0], dtype=dt))
    av = 0.1 * torch.randn(3, 3, generator=g, dtype=dt)
    av = av @ av.T + torch.diag(torch.tensor([0.5, 1.0, 1.5], dtype=dt))

    def loss():
        dw, db, dv, du = w - w_star, b - b_star, v - v_star, u - u_star
        return (0.5 * ((dw @ bw) * dw).sum()
                + torch.log(torch.cosh(db)).sum() + 0.1 * db.pow(2).sum()
                + 0.5 * (dv * (av @ dv)).sum()
                + torch.nn.functional.softplus(du).sum() + 0.25 * du.pow(2).sum()
                + 0.05 * (dw.sum() + db.sum()) ** 2)

    return [w, b, v, u], loss


def trajectory(cls, kwargs, *, schedule=None, steps=STEPS, seed=0):
    params, loss = make_model(seed)
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints a line for decouple=True
        opt = cls(groups, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule is not None else None
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if sched is not None:
            sched.step()
        out.append(([p.detach().clone() for p in params], float(opt.param_groups[0]["d"])))
    return out


def assert_same_trajectory(ours, theirs) -> None:
    assert len(ours) == len(theirs) == STEPS
    for k, ((xs, d), (ys, d_ref)) in enumerate(zip(ours, theirs)):
        assert abs(d - d_ref) <= RTOL * abs(d_ref), f"step {k}: d = {d} vs the reference's {d_ref}"
        for i, (x, y) in enumerate(zip(xs, ys)):
            err = (x - y).abs().max().item()
            scale = y.abs().max().item()
            assert err <= RTOL * scale, f"step {k}, tensor {i}: max |ours - reference| = {err:.3e} (scale {scale:.3e})"


def _cosine(t: int) -> float:
    import math

    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / STEPS))


CASES = [
    # (ours, reference, arguments, lr schedule or None)
    (DAdaptSGD, "DAdaptSGD", dict(lr=0.5), None),
    (DAdaptSGD, "DAdaptSGD", dict(momentum=0.9), None),
    (DAdaptSGD, "DAdaptSGD", dict(momentum=0.5, weight_decay=0.01), None),
    (DAdaptSGD, "DAdaptSGD", dict(lr=0.5, weight_decay=0.01, growth_rate=1.1, d0=1e-5), None),
    (DAdaptSGD, "DAdaptSGD", dict(momentum=0.9), _cosine),
    (DAdaptAdam, "DAdaptAdam", dict(), None),
    (DAdaptAdam, "DAdaptAdam", dict(weight_decay=0.01), None),  # coupled (the default)
    (DAdaptAdam, "DAdaptAdam", dict(weight_decay=0.05, decouple=True), None),
    (DAdaptAdam, "DAdaptAdam", dict(use_bias_correction=True, betas=(0.8, 0.99), eps=1e-6), None),
    (DAdaptAdam, "DAdaptAdam", dict(growth_rate=1.05, d0=1e-5), None),
    (DAdaptAdam, "DAdaptAdam", dict(), _cosine),
    (DAdaptAdaGrad, "DAdaptAdaGrad", dict(), None),
    (DAdaptAdaGrad, "DAdaptAdaGrad", dict(momentum=0.5), None),
    (DAdaptAdaGrad, "DAdaptAdaGrad", dict(weight_decay=0.01, eps=1e-4), None),
    (DAdaptAdaGrad, "DAdaptAdaGrad", dict(growth_rate=1.2), _cosine),
]


def _id(case) -> str:
    cls, _, kwargs, schedule = case
    args = ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
    return f"{cls.__name__}[{args}]" + ("-cosine" if schedule else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_the_reference_step_by_step(case) -> None:
    cls, ref_name, kwargs, schedule = case
    theirs = trajectory(getattr(dadaptation, ref_name), kwargs, schedule=schedule)
    ours = trajectory(cls, kwargs, schedule=schedule)  # the vectorized path (the default)
    assert_same_trajectory(ours, theirs)
    # the comparison covers the adaptation itself: d rose by four orders of magnitude or more
    assert ours[-1][1] > 1e-2, "d did not adapt"


@pytest.mark.parametrize("cls", [DAdaptSGD, DAdaptAdam, DAdaptAdaGrad])
def test_per_parameter_path_matches_the_reference_too(cls) -> None:
    kwargs = dict(lr=0.5, weight_decay=0.01) if cls is DAdaptSGD else dict(weight_decay=0.01)
    theirs = trajectory(getattr(dadaptation, cls.__name__), kwargs)
    ours = trajectory(cls, dict(kwargs, foreach=False))
    assert_same_trajectory(ours, theirs)
