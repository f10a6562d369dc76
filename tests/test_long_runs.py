"""Long runs: learned scalars stay finite and keep working after very many steps.

Two tests (issue 16, item 6; ``docs/robustness.md`` says how each learned scalar is stored):

* **A step from a state as after 10^7 steps**, for every row of ``tests/optim_db.OPTIM_DB``: the
  row runs a few steps, then its step counters and running sums are set to the values they
  would have after 10^7 steps (counters 10^7, sums 10^7 times a typical increment), and one more
  step must keep every parameter, state tensor and param-group tensor finite and still move the
  parameters. For each family one learned scalar's next value is computed by hand in float64
  from the formula in the optimizer's docstring and compared.
* **A real run** on a tiny model (a realizable least-squares problem in 3 float32 parameters,
  minibatches of 4 of 8 rows) for one method of each family: learned scalars finite, and the
  loss at the end no worse than at a tenth of the run. ``LONG_RUN_STEPS`` steps (3000 by
  default: 0.5-1.7 ms a step on a shared 2-core CPU, about 30 s for the ten; set the environment
  variable ``TUNELESS_LONG_RUN_STEPS=100000`` for the 10^5-step run of the issue, about 2 minutes
  per method there).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import tuneless
from tests.optim_db import OPTIM_DB, OptimizerInfo
from tests.test_contract import Model, step

LONG_RUN_STEPS = int(os.environ.get("TUNELESS_LONG_RUN_STEPS", "3000"))
AGE = 10**7  # the number of steps the aged state pretends to have taken


# ----------------------------------------------------------------------------- (b) real runs


class LeastSquares:
    """min_w mean((X w - y)^2) with y = X w*: 3 parameters, 8 rows, minibatches of 4 in turn.
    Realizable (the minimum is 0 at w*, so f* = 0 is right for Polyak-type methods)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.w = torch.nn.Parameter(torch.zeros(3))

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(0, 4) if i % 2 == 0 else slice(4, 8)
        return self.x[rows], self.y[rows]

    def set_grad(self, i: int) -> torch.Tensor:
        """The minibatch loss, with its gradient (by hand: no autograd in the loop) in ``w.grad``."""
        x, y = self.batch(i)
        with torch.no_grad():
            residual = x @ self.w - y
            self.w.grad = (2.0 / len(y)) * (x.T @ residual)
            return (residual * residual).mean()

    @torch.no_grad()
    def full_loss(self) -> float:
        return float(((self.x @ self.w - self.y) ** 2).mean())


#: one method per family; the Schedule-Free and hypergradient methods are not learning-rate-free
#: and get a learning rate that suits the problem
FAMILIES = {
    "polyak": ("polyak", {}),
    "momo": ("momo", {}),
    "dadaptation": ("dadapt_adam", {}),
    "prodigy": ("prodigy", {}),
    "dog": ("dog", {}),
    "cocob": ("cocob", {}),
    "schedule_free": ("sf_sgd", {"lr": 0.1}),
    "mechanic": ("mechanic", {}),
    "hypergradient": ("sgd_hd", {}),
    "tuneless": ("tuneless", {}),
}


def group_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"group{i}/{k}": v for i, g in enumerate(opt.param_groups) for k, v in g.items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_long_run_keeps_learning(family: str) -> None:
    name, kwargs = FAMILIES[family]
    problem = LeastSquares()
    opt = tuneless.create(name, [problem.w], **kwargs)
    checkpoint = LONG_RUN_STEPS // 10
    loss_at_checkpoint = None
    for i in range(LONG_RUN_STEPS):
        opt.zero_grad(set_to_none=False)
        loss = problem.set_grad(i)
        opt.step(loss=loss)
        if i + 1 == checkpoint:
            with opt.evaluation_point():
                loss_at_checkpoint = problem.full_loss()
    with opt.evaluation_point():
        loss_at_end = problem.full_loss()
    for key, value in group_tensors(opt).items():
        assert torch.isfinite(value).all(), f"{name}: {key} = {value} after {LONG_RUN_STEPS} steps"
    assert torch.isfinite(problem.w).all()
    assert loss_at_end <= loss_at_checkpoint * (1 + 1e-6) + 1e-12, (
        f"{name}: loss {loss_at_checkpoint:.3e} at step {checkpoint}, {loss_at_end:.3e} at step {LONG_RUN_STEPS}")


# ----------------------------------------------------------------------------- (a) aged state

#: step counters in the param groups (ints, or 0-d tensors: D-Adaptation's ``k`` is one)
COUNTERS = ("k", "hd_step", "mechanic_step", "momo_step", "sf_k", "tuneless_step")
#: running sums that grow with every step: in the param groups, and per parameter in the state
#: (D-Adaptation's Adam/Prodigy numerators, Mechanic's sums and MoMo's averages are moving
#: averages that do not grow: they are left as they are, and only the counters age)
GROUP_SUMS = ("grad_sq_sum", "v", "gsq_weighted", "weight_sum", "sf_weight_sum")
STATE_SUMS = ("neg_grad_sum", "abs_grad_sum", "alpha")
WARMUP = 3  # steps taken before aging: sums are scaled by AGE / WARMUP


def _age_value(value, factor):
    return value * factor  # a 0-d tensor keeps its dtype, a Python float stays one


def age(opt: torch.optim.Optimizer) -> dict[str, object]:
    """Set counters to AGE and scale sums by AGE / WARMUP; return what was aged, as it now is."""
    aged = {}
    for i, group in enumerate(opt.param_groups):
        for key in COUNTERS:
            if key in group:
                value = group[key]
                group[key] = torch.full_like(value, AGE) if isinstance(value, torch.Tensor) else AGE
                aged[f"group{i}/{key}"] = group[key]
        for key in GROUP_SUMS:
            if key in group and group[key] is not None:
                group[key] = _age_value(group[key], AGE / WARMUP)
                aged[f"group{i}/{key}"] = group[key]
        for j, p in enumerate(group["params"]):
            state = opt.state.get(p, {})
            for key in STATE_SUMS:
                if key in state and not (key == "alpha" and type(opt).__name__ != "DAdaptAdaGrad"):
                    state[key].mul_(AGE / WARMUP)
                    aged[f"group{i}/param{j}/{key}"] = state[key]
    return aged


def _as64(value) -> torch.Tensor:
    return value.detach().to(torch.float64).clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)


def expected_increments(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The increment each hand-checked sum should get from the step just taken, in float64, from
    the formulas in the optimizers' docstrings and the gradients the step used."""
    out = {}
    name = type(opt).__name__
    for i, group in enumerate(opt.param_groups):
        grads = [p.grad.detach().to(torch.float64) for p in group["params"] if p.grad is not None]
        if name == "DoG":  # G_t = G_{t-1} + ||g_t||^2
            out[f"group{i}/grad_sq_sum"] = sum((g * g).sum() for g in grads)
        if name == "LDoG":  # per tensor
            out[f"group{i}/grad_sq_sum"] = torch.stack([(g * g).sum() for g in grads])
        if name == "COCOB":  # L_t = L_{t-1} + |g_t|, theta_t = theta_{t-1} - g_t
            for j, g in enumerate(grads):
                out[f"group{i}/param{j}/abs_grad_sum"] = g.abs()
                out[f"group{i}/param{j}/neg_grad_sum"] = -g
        if name in ("ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreePlus") and group.get("r", 0.0) == 0.0:
            # weight lr_max^power (r = 0)
            out[f"group{i}/weight_sum"] = _as64(group["lr_max"]) ** group["weight_lr_power"]
        if "sf_weight_sum" in group and group.get("sf_r", 0.0) == 0.0:
            out[f"group{i}/sf_weight_sum"] = _as64(group["sf_lr_max"]) ** group["sf_weight_lr_power"]
    return out


#: rows whose aged step loses what the math says today, and why (``docs/robustness.md``)
_F32_SUM = ("{where} is a float32 sum: at 10^7 steps it is ~10^7 times its increment, whose spacing there "
            "(ulp ~ 1e-7 x the sum) is as large as the increment itself; measured: {numbers}. Fix: keep the sum in "
            "float64 (free for DoG's 0-d sums, twice the memory of COCOB's two buffers) or Kahan-compensate it")
AGED_FAILURES: dict[str, str] = {
    # DoG and L-DoG pass since their grad_sq_sum is float64 (as float32, G ~1.2e8 grew by 8.0
    # instead of 11.65: the increment was rounded to the sum's ulp)
}


def _aged_rows() -> list:
    out = []
    for info in OPTIM_DB:
        reason = AGED_FAILURES.get(info.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(info, id=info.name, marks=marks))
    return out


@pytest.mark.parametrize("info", _aged_rows())
def test_a_step_after_ten_million_steps(info: OptimizerInfo) -> None:
    model = Model(torch.float32)
    opt = info.build(model.params)
    for _ in range(WARMUP):
        step(opt, model)
    aged = age(opt)
    before = {key: _as64(value) for key, value in aged.items()}
    params_before = model.snapshot()
    step(opt, model)

    # nothing non-finite
    for i, p in enumerate(model.params):
        assert torch.isfinite(p).all(), f"{info.name}: parameter {i} not finite after the aged step"
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), f"{info.name}: state {key} of parameter {i} not finite"
    for key, value in group_tensors(opt).items():
        assert torch.isfinite(value).all(), f"{info.name}: {key} = {value} not finite after the aged step"
    # the parameters still move
    assert any(not torch.equal(a, b) for a, b in zip(params_before, model.snapshot())), (
        f"{info.name}: the aged step moved no parameter")
    # counters count on
    now = {}
    for i, group in enumerate(opt.param_groups):
        for key in COUNTERS:
            if f"group{i}/{key}" in aged:
                assert float(group[key]) == AGE + 1, f"{info.name}: {key} = {float(group[key])} after {AGE} + 1 steps"
        for key in GROUP_SUMS:
            if f"group{i}/{key}" in aged:
                now[f"group{i}/{key}"] = _as64(group[key])
        for j, p in enumerate(group["params"]):
            for key in STATE_SUMS:
                if f"group{i}/param{j}/{key}" in aged:
                    now[f"group{i}/param{j}/{key}"] = _as64(opt.state[p][key])
    # the hand-checked sums grew by what the formula says, to 1e-3 of the increment
    for key, expected in expected_increments(opt).items():
        assert key in now, f"{info.name}: {key} was not aged"
        got = now[key] - before[key]
        scale = before[key].abs().max().item()
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-30), (
            f"{info.name}: {key} (about {scale:.3g}) grew by {got.flatten()[:4].tolist()} instead of "
            f"{expected.flatten()[:4].tolist()}: the increment is {'lost' if (got == 0).all() else 'rounded'} "
            f"in {aged[key].dtype if isinstance(aged[key], torch.Tensor) else 'float'}")
