"""ScheduleFree+ (``sf_plus``): step by step against the algorithm written as a plain loop, and
its behaviour (the Polyak step's positive part, modes, resume, annealing).

There is no released package to compare with. :class:`PaperLoop` is the algorithm as the
reference (``facebookresearch/schedule_free``
``schedulefree/adamc_schedulefree_plus_paper.py``) describes it, written independently of
``tuneless`` in host floats, with the three sequences x, y and z stored explicitly (tuneless
stores z only and recovers x from the parameters). Float64, 200 steps, relative 1e-10.

The model is multinomial logistic regression on separable data (no finite minimum: the
Polyak step stays positive and the iterates travel smoothly).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from tests.separable import SeparableLogistic as _SeparableLogistic

import tuneless
from tuneless import LossRequiredError, ScheduleFreePlus, WrongModeError

STEPS = 200
RTOL = 1e-10
DT = torch.float64


def SeparableLogistic() -> _SeparableLogistic:
    """The shared model of tests/separable.py, weights drawn at 1e-2."""
    return _SeparableLogistic(scale=1e-2)


class PaperLoop:
    """ScheduleFree+ as described: host-float scalars, x, y and z stored, one param group."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.95), sf_beta1=0.9, eps=1e-8, weight_decay=0.0, r=0.0,
                 polyak_beta=0.0, c_warmup=0, sf_beta1_anneal_steps=0, sf_beta1_max=0.965, weight_lr_power=2.0):
        self.params = list(params)
        self.lr, self.betas, self.sf_beta1, self.eps, self.decay = lr, betas, sf_beta1, eps, weight_decay
        self.r, self.polyak_beta, self.c_warmup, self.power = r, polyak_beta, c_warmup, weight_lr_power
        self.anneal_steps, self.sf_beta1_max = sf_beta1_anneal_steps, sf_beta1_max
        self.x = [p.detach().clone() for p in self.params]
        self.y = [p.detach().clone() for p in self.params]
        self.z = [p.detach().clone() for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.k, self.l1_avg, self.lr_max, self.weight_sum = 0, 0.0, eps, 0.0
        self.last_lr = 0.0

    def beta(self) -> float:
        if self.anneal_steps == 0:
            return self.sf_beta1
        t = min(self.k / self.anneal_steps, 1.0)
        return 1 - math.exp(math.log(1 - self.sf_beta1) * (1 - t) + math.log(1 - self.sf_beta1_max) * t)

    @torch.no_grad()
    def step(self, f: float) -> None:
        beta, k = self.beta(), self.k
        grads = [p.grad for p in self.params]
        inner = beta * sum(float((g * (z - x)).sum()) for g, z, x in zip(grads, self.z, self.x))
        l1 = sum(float(g.abs().sum()) for g in grads)
        self.l1_avg = self.polyak_beta * self.l1_avg + (1 - self.polyak_beta) * l1 * math.sqrt(math.pi / 2)
        gamma = max(self.lr, self.eps) * max(0.0, f + inner) / (self.l1_avg / (1 - self.polyak_beta ** (k + 1)))
        self.last_lr = gamma
        self.lr_max = max(gamma, self.lr_max)
        if k < self.c_warmup:
            c = 1.0
        else:
            weight = (k + 1) ** self.r * self.lr_max ** self.power
            self.weight_sum += weight
            c = weight / self.weight_sum
        b1, b2 = self.betas
        for p, g, x, y, z, m, v in zip(self.params, grads, self.x, self.y, self.z, self.m, self.v):
            z.sub_(gamma * gamma * self.decay * y)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            z.sub_(gamma * (m / (1 - b1 ** (k + 1))) / ((v / (1 - b2 ** (k + 1))).sqrt() + self.eps))
            x.mul_(1 - c).add_(c * z)
            y.copy_(beta * x + (1 - beta) * z)
            p.copy_(y)
        self.k += 1


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


CONFIGS = {
    "default": {},
    "adamc_weight_decay": dict(weight_decay=1.0),  # (2.0 diverges here, in the loop as in tuneless)
    "polyak_beta": dict(polyak_beta=0.9),
    "anneal+c_warmup+r": dict(sf_beta1_anneal_steps=100, c_warmup=5, r=1.0),
    "betas+power+lr": dict(betas=(0.8, 0.99), sf_beta1=0.8, weight_lr_power=1.0, lr=0.5, eps=1e-6),
}
CASES = [pytest.param(kw, foreach, id=f"{name}-{'foreach' if foreach else 'loop'}")
         for name, kw in CONFIGS.items() for foreach in (True, False)]


@pytest.mark.parametrize("kwargs, foreach", CASES)
def test_matches_the_algorithm_step_by_step(kwargs, foreach) -> None:
    theirs, ours = SeparableLogistic(), SeparableLogistic()
    loop = PaperLoop(theirs.params, **kwargs)
    opt = ScheduleFreePlus(ours.params, foreach=foreach, **kwargs)
    for k in range(STEPS):
        loop.step(float(theirs.backward()))
        opt.step(loss=ours.backward())
        for a, b in zip(ours.params, theirs.params):  # y, the training point
            assert _close(a.detach(), b.detach()) < RTOL, f"y after step {k + 1}: {_close(a.detach(), b.detach()):.2e}"
        assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(loop.last_lr, rel=RTOL)
    assert loop.last_lr > 0 and float(ours.loss().detach()) < 0.05  # it trained (from log 3 = 1.1)
    with opt.evaluation_point():  # x, the average
        for a, x in zip(ours.params, loop.x):
            assert _close(a.detach(), x) < RTOL
    for p, z in zip(ours.params, loop.z):
        assert _close(opt.state[p]["z"], z) < RTOL


def test_step_is_zero_when_the_polyak_numerator_is_negative() -> None:
    model = SeparableLogistic()
    opt = ScheduleFreePlus(model.params)
    for _ in range(3):
        opt.step(loss=model.backward())
    z_before = [opt.state[p]["z"].clone() for p in model.params]
    model.backward()
    opt.step(loss=-10.0)  # f + beta <g, z - x> < 0
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0
    for p, z in zip(model.params, z_before):
        assert torch.equal(opt.state[p]["z"], z), "z moved with a zero step size"


def test_zero_gradient_and_non_finite_loss_give_a_zero_step() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    opt = ScheduleFreePlus([x])
    x.grad = torch.zeros(2, dtype=DT)
    opt.step(loss=3.0)
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=DT))
    x.grad = torch.ones(2, dtype=DT)
    opt.step(loss=float("inf"))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0
    assert torch.isfinite(x).all()


def test_first_step_is_the_loss_over_the_scaled_l1_norm() -> None:
    model = SeparableLogistic()
    opt = ScheduleFreePlus(model.params)
    loss = model.backward()
    l1 = sum(float(p.grad.abs().sum()) for p in model.params)
    opt.step(loss=loss)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(float(loss) / (math.sqrt(math.pi / 2) * l1),
                                                                       rel=1e-12)


def test_modes_and_the_loss_requirement() -> None:
    model = SeparableLogistic()
    opt = ScheduleFreePlus(model.params)
    assert opt.training
    model.backward()
    with pytest.raises(LossRequiredError, match=r"step\(loss=loss\)"):
        opt.step()
    for _ in range(5):
        opt.step(loss=model.backward())
    y = [p.detach().clone() for p in model.params]
    opt.eval()
    x = [p.detach().clone() for p in model.params]
    for xi, yi, p in zip(x, y, model.params):  # y = beta x + (1 - beta) z
        torch.testing.assert_close(0.9 * xi + 0.1 * opt.state[p]["z"], yi, rtol=1e-12, atol=1e-15)
    model.backward()
    with pytest.raises(WrongModeError, match=r"optimizer.train\(\)"):
        opt.step(loss=1.0)
    assert opt.state_dict()["param_groups"][0]["train_mode"] is False
    opt.train()
    for a, yi in zip(model.params, y):
        torch.testing.assert_close(a.detach(), yi, rtol=1e-12, atol=1e-15)


def test_resume_saved_in_eval_mode_with_annealing_is_exact() -> None:
    kwargs = dict(sf_beta1_anneal_steps=6, polyak_beta=0.5, weight_decay=1.0)
    full = SeparableLogistic()
    opt = ScheduleFreePlus(full.params, **kwargs)
    for _ in range(10):
        opt.step(loss=full.backward())

    part = SeparableLogistic()
    opt = ScheduleFreePlus(part.params, **kwargs)
    for _ in range(4):
        opt.step(loss=part.backward())
    opt.eval()  # saved at x
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in part.params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = SeparableLogistic()
    with torch.no_grad():
        for p, s in zip(resumed.params, saved["model"]):
            p.copy_(s)
    opt = ScheduleFreePlus(resumed.params, **kwargs)
    opt.load_state_dict(saved["optim"])
    assert not opt.training  # the mode comes back with the checkpoint
    opt.train()
    for _ in range(6):
        opt.step(loss=resumed.backward())
    for a, b in zip(resumed.params, full.params):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_annealing_moves_an_idle_parameter_to_the_new_interpolation() -> None:
    """A parameter without a gradient keeps its x and z; its y follows beta_k."""
    used = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    idle = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=DT))
    opt = ScheduleFreePlus([used, idle], sf_beta1_anneal_steps=4)
    for _ in range(3):  # both get gradients
        opt.zero_grad()
        loss = (used ** 2).sum() + ((idle - 3) ** 2).sum()
        loss.backward()
        opt.step(loss=loss)
    with opt.evaluation_point():
        x_idle = idle.detach().clone()
    z_idle = opt.state[idle]["z"].clone()
    opt.zero_grad(set_to_none=True)
    loss = (used ** 2).sum()
    loss.backward()
    opt.step(loss=loss)  # idle has no gradient now
    beta = opt.param_groups[0]["y_beta"]
    assert beta == pytest.approx(1 - math.exp(math.log(0.1) * 0.25 + math.log(0.035) * 0.75))
    assert torch.equal(opt.state[idle]["z"], z_idle)
    torch.testing.assert_close(idle.detach(), beta * x_idle + (1 - beta) * z_idle, rtol=1e-14, atol=1e-15)
    with opt.evaluation_point():
        torch.testing.assert_close(idle.detach(), x_idle, rtol=1e-14, atol=1e-15)


def test_registered_and_learning_rate_free() -> None:
    assert "sf_plus" in tuneless.learning_rate_free()
    assert isinstance(tuneless.create("sf_plus", SeparableLogistic().params), ScheduleFreePlus)


@pytest.mark.parametrize("foreach", [True, False])
def test_float16_zero_gradient_keeps_the_parameters_finite(foreach) -> None:
    """eps = 1e-8 rounds to 0 in float16: Adam's denominator then was 0 + 0 and m / D NaN."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = ScheduleFreePlus([p], foreach=foreach)
    for grad in (0.0, 1.0):
        p.grad = torch.full((3,), grad, dtype=torch.float16)
        opt.step(loss=1.0)
    assert torch.isfinite(p).all() and (p < 1).all()


@pytest.mark.parametrize("foreach", [True, False])
def test_tiny_gradients_do_not_overflow_the_averaging_weights(foreach) -> None:
    """float32, loss 3, gradients 1e-30: the Polyak step is ~1e30 and its square (the averaging
    weight) overflows float32; the weights are summed in float64, as the reference's host doubles."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = ScheduleFreePlus([p], foreach=foreach)
    p.grad = torch.full((2,), 1e-30)
    opt.step(loss=torch.tensor(3.0))
    assert torch.isfinite(p).all() and torch.isfinite(opt.param_groups[0]["weight_sum"])
    assert opt.param_groups[0]["weight_sum"].dtype == torch.float64
