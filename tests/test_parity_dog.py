"""Parity with the authors' packages: dog-optimizer 1.0.3 (DoG, LDoG, PolynomialDecayAverager)
and dowgopt 0.13 (DoWG).

Same arguments, 200 steps, float64, a smooth model of four tensors in two param groups;
the parameters are compared after every step, to a relative 1e-10 (max |ours - theirs| over a
tensor, relative to max |theirs|). The deliberate differences (frozen parameters, lr times
init_eta, p.grad left alone, ...) are tested in tests/test_dog.py; here both sides get inputs on
which they agree.

Why 1e-10 and not 1e-15: tuneless accumulates the displacement x_t - x_0 from its own updates,
while the reference recomputes it from the rounded weights. In the first steps the distance is
~1e-6 of the weights (reps_rel), so the weights' rounding (1e-16 of their size) is ~1e-10 of the
distance; the parameters then agree to ~1e-11.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import tuneless
from tuneless.averaging import PolynomialDecayAverager

dog = pytest.importorskip("dog", reason="dog-optimizer (test dependency) is not installed")
dowg = pytest.importorskip("dowg", reason="dowgopt (test dependency) is not installed")

STEPS = 200
RTOL = 1e-10


class Model:
    """Multinomial logistic regression with a tanh side branch: smooth, four tensors, two groups."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        f64 = torch.float64
        self.A = torch.nn.Parameter(0.3 * torch.randn(4, 6, generator=g, dtype=f64))
        self.a = torch.nn.Parameter(torch.zeros(4, dtype=f64))
        self.B = torch.nn.Parameter(0.3 * torch.randn(4, 3, generator=g, dtype=f64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(4, generator=g, dtype=f64))
        d = torch.Generator().manual_seed(1)
        self.X = torch.randn(64, 6, generator=d, dtype=f64)
        self.Z = torch.randn(64, 3, generator=d, dtype=f64)
        self.y = torch.randint(0, 4, (64,), generator=d)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.A, self.a, self.B, self.b]

    def groups(self, lr_b: float | None = None) -> list[dict]:
        second = {"params": [self.B, self.b]}
        if lr_b is not None:
            second["lr"] = lr_b
        return [{"params": [self.A, self.a]}, second]

    def loss(self) -> torch.Tensor:
        logits = self.X @ self.A.T + self.a + torch.tanh(self.Z @ self.B.T + self.b)
        return torch.nn.functional.cross_entropy(logits, self.y)


def _step(opt: torch.optim.Optimizer, model: Model) -> None:
    opt.zero_grad(set_to_none=True)
    model.loss().backward()
    opt.step()


def assert_relatively_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = theirs.detach().abs().max()
    err = (ours.detach() - theirs.detach()).abs().max()
    assert err <= RTOL * scale, f"{what}: max difference {float(err):.3e} > {RTOL:g} x {float(scale):.3e}"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _race(ours_cls, theirs_cls, kwargs: dict, lr_b: float | None = None, steps: int = STEPS) -> Model:
    ours_model, theirs_model = Model(), Model()
    ours = ours_cls(ours_model.groups(lr_b), **kwargs)
    theirs = theirs_cls(theirs_model.groups(lr_b), **kwargs)
    for t in range(steps):
        _step(ours, ours_model)
        _step(theirs, theirs_model)
        for name, p, q in zip("AaBb", ours_model.params, theirs_model.params):
            assert_relatively_close(p, q, f"{ours_cls.__name__}{kwargs} step {t + 1}, tensor {name}")
    return ours_model


DOG_CASES = [
    pytest.param({}, None, id="defaults"),
    pytest.param({"weight_decay": 1e-2}, None, id="weight_decay"),
    pytest.param({"init_eta": 1e-3}, None, id="init_eta"),
    pytest.param({"reps_rel": 1e-4, "eps": 1e-6}, 0.5, id="reps_rel-eps-group_lr"),
]


@pytest.mark.parametrize("kwargs, lr_b", DOG_CASES)
def test_dog_matches_the_reference(kwargs, lr_b) -> None:
    model = _race(tuneless.DoG, dog.DoG, kwargs, lr_b)
    assert model.loss() < 1.2  # it trained (the start is ~1.6)


LDOG_CASES = [
    pytest.param({}, None, id="defaults"),
    pytest.param({"weight_decay": 1e-2, "reps_rel": 1e-4}, 0.5, id="weight_decay-reps_rel-group_lr"),
    pytest.param({"init_eta": 1e-3}, None, id="init_eta"),
]


@pytest.mark.parametrize("kwargs, lr_b", LDOG_CASES)
def test_ldog_matches_the_reference(kwargs, lr_b) -> None:
    model = _race(tuneless.LDoG, dog.LDoG, kwargs, lr_b)
    assert model.loss() < 1.2


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="defaults"), pytest.param({"eps": 1e-6}, id="eps")])
def test_dowg_matches_the_reference(kwargs) -> None:
    # The reference builds its scalars with torch.Tensor([...]), i.e. in the default dtype; run it
    # with float64 as the default so that it computes in float64 like the parameters.
    with default_dtype(torch.float64):
        model = _race(tuneless.DoWG, dowg.DoWG, kwargs)
    assert model.loss() < 1.2


def test_dog_learned_step_size_matches_the_reference_eta() -> None:
    ours_model, theirs_model = Model(), Model()
    ours = tuneless.DoG(ours_model.groups(lr_b=0.5))
    theirs = dog.DoG(theirs_model.groups(lr_b=0.5))
    for t in range(20):
        _step(ours, ours_model)
        _step(theirs, theirs_model)
        for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
            assert_relatively_close(g_ours["effective_lr"], g_theirs["eta"][0], f"eta at step {t + 1}")
            assert_relatively_close(g_ours["grad_sq_sum"], g_theirs["G"], f"G at step {t + 1}")


# ----------------------------------------------------------------------------- the averager


class Net(torch.nn.Module):
    """Several tensors and batch-norm buffers (floating running statistics, an integer counter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                                        torch.nn.Linear(5, 4)).double()


@pytest.mark.parametrize("gamma", [8.0, 2.5])
def test_polynomial_decay_averager_matches_the_reference(gamma) -> None:
    net = Net()
    data = torch.Generator().manual_seed(3)
    X = torch.randn(32, 6, generator=data, dtype=torch.float64)
    Y = torch.randn(32, 4, generator=data, dtype=torch.float64)
    theirs = dog.PolynomialDecayAverager(net, gamma=gamma)  # keeps a deepcopy of the module
    ours = PolynomialDecayAverager(net, gamma=gamma)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)  # any optimizer: here torch's own
    for t in range(STEPS):
        opt.zero_grad()
        ((net.body(X) - Y) ** 2).mean().backward()
        opt.step()
        theirs.step()
        ours.update()
        reference = theirs.averaged_model.state_dict()
        for name, avg in zip(ours.names, ours.averages):
            assert_relatively_close(avg, reference[name], f"average of {name} after update {t + 1}")
    assert ours.t == theirs.t
    # Evaluating at the average gives the reference's averaged model's output.
    net.eval()
    theirs.averaged_model.eval()
    with torch.no_grad(), ours.average_parameters():
        assert_relatively_close(net.body(X), theirs.averaged_model.body(X), "output at the average")
