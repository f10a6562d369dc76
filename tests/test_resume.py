"""Resume is bit for bit: a run saved, loaded into fresh objects and continued equals the run never stopped.

For every row of the contract table (``tests/optim_db.py``, every configuration), every name in the
registry (with its defaults, so that a registered optimizer without a row is covered too), and
Mechanic and the Schedule-Free wrapper over several bases: train ``BEFORE`` steps, save the model's
weights and ``optimizer.state_dict()`` with ``torch.save`` to memory, load them with
``torch.load(weights_only=True)`` into a freshly built model (initialised differently, so that
everything must come from the checkpoint) and optimizer, train ``AFTER`` more steps, and compare
with the uninterrupted run with ``torch.equal``, in float32.

Schedule-Free optimizers are saved in both modes: in train mode, and in eval mode (the mode users
save in: the weights are then the average x), after which the resumed run calls ``train()``. The
uninterrupted run never switches modes, so an eval/train round trip that is off by rounding fails.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import pytest
import torch

import tuneless
from tests.device import TEST_DEVICE
from tests.optim_db import OPTIM_DB

BEFORE, AFTER = 5, 5
DTYPE = torch.float32


class Tiny:
    """A layer and a separate matrix, in two param groups."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter((0.5 * torch.randn(4, 3, generator=g, dtype=DTYPE)).to(TEST_DEVICE))
        self.b = torch.nn.Parameter((0.1 * torch.randn(4, generator=g, dtype=DTYPE)).to(TEST_DEVICE))
        self.v = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=DTYPE).to(TEST_DEVICE))
        data = torch.Generator().manual_seed(1)
        x = torch.randn(16, 3, generator=data, dtype=DTYPE)
        self.x = x.to(TEST_DEVICE)
        self.y = torch.tanh(x @ torch.randn(3, 4, generator=data, dtype=DTYPE) + 0.1).to(TEST_DEVICE)
        self.v_target = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=DTYPE, device=TEST_DEVICE)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.w, self.b, self.v]

    @property
    def groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.w, self.b]}, {"params": [self.v]}]

    def loss(self, step: int) -> torch.Tensor:
        rows = torch.randperm(16, generator=torch.Generator().manual_seed(step))[:8].to(TEST_DEVICE)  # a minibatch a step
        pred = torch.tanh(self.x[rows] @ self.w.T + self.b)
        return ((pred - self.y[rows]) ** 2).mean() + 0.5 * ((self.v - self.v_target) ** 2).sum()


def train(opt: torch.optim.Optimizer, model: Tiny, steps: range) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(step)
        loss.backward()
        if isinstance(opt, tuneless.TunelessOptimizer):
            opt.step(loss=loss)
        else:
            opt.step()


Build = Callable[[Any], torch.optim.Optimizer]


def check_resume(build: Build, mode: str, name: str) -> None:
    """Save after BEFORE steps (in ``mode``), resume in fresh objects, compare after AFTER more."""
    full = Tiny()
    full_opt = build(full.groups)
    train(full_opt, full, range(BEFORE + AFTER))

    model = Tiny()
    opt = build(model.groups)
    train(opt, model, range(BEFORE))
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in model.params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = Tiny(seed=7)  # different weights: everything must come from the checkpoint
    with torch.no_grad():
        for p, s in zip(resumed.params, saved["model"]):
            p.copy_(s)
    opt2 = build(resumed.groups)
    opt2.load_state_dict(saved["optim"])
    if mode == "eval":
        assert not opt2.training, f"{name}: the checkpoint was saved in eval mode; loading must restore it"
        opt2.train()
    train(opt2, resumed, range(BEFORE, BEFORE + AFTER))

    for i, (a, b) in enumerate(zip(full.params, resumed.params)):
        assert torch.isfinite(a).all(), f"{name}: the uninterrupted run is not finite (choose other settings)"
        assert torch.equal(a, b), (f"{name}, saved in {mode} mode: parameter {i} differs from the uninterrupted "
                                   f"run by up to {float((a - b).abs().max().detach()):.3g}")
    assert_same_state(full_opt.state_dict(), opt2.state_dict(), f"{name}, saved in {mode} mode")


def assert_same_state(a: Any, b: Any, where: str) -> None:
    """The learned state (buffers and param-group scalars) is identical, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def modes(build: Build) -> list[str]:
    """Both modes for a Schedule-Free optimizer, train mode for the others."""
    return ["train", "eval"] if hasattr(build(Tiny().params), "eval") else ["train"]


def _row_builder(info: Any, kwargs: dict[str, Any]) -> Build:
    return lambda params: info.build(params, **kwargs)


def _registry_builder(name: str) -> Build:
    return lambda params: tuneless.create(name, params)


ROW_CASES = [
    pytest.param(_row_builder(info, kw), mode, f"{info.name}{kw}", id=f"{info.name}-{i}-{mode}")
    for info in OPTIM_DB
    for i, kw in enumerate([info.kwargs] + info.extra_kwargs)
    for mode in modes(_row_builder(info, kw))
]
REGISTRY_CASES = [
    pytest.param(_registry_builder(name), mode, name, id=f"{name}-{mode}")
    for name in tuneless.available(source="tuneless")
    for mode in modes(_registry_builder(name))
]

BASES: dict[str, Build] = {
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Polyak": lambda p: tuneless.Polyak(p, max_step=1.0),
    "MomoStar": lambda p: tuneless.MomoStar(p),
    "Prodigy": lambda p: tuneless.Prodigy(p),
    "DAdaptAdam": lambda p: tuneless.DAdaptAdam(p),
    "DoG": lambda p: tuneless.DoG(p),
    "COCOB": lambda p: tuneless.COCOB(p),
}
WRAPPED_CASES = [
    pytest.param(lambda p, b=base: tuneless.Mechanic(b(p)), "train", f"Mechanic({name})", id=f"Mechanic({name})")
    for name, base in BASES.items()
] + [
    pytest.param(lambda p, b=base: tuneless.ScheduleFree(b(p)), mode, f"ScheduleFree({name})",
                 id=f"ScheduleFree({name})-{mode}")
    for name, base in BASES.items()
    for mode in ("train", "eval")
] + [
    pytest.param(lambda p: tuneless.ScheduleFree(tuneless.Mechanic(torch.optim.SGD(p, lr=1.0))), mode,
                 "ScheduleFree(Mechanic(SGD))", id=f"ScheduleFree(Mechanic(SGD))-{mode}")
    for mode in ("train", "eval")
]


@pytest.mark.parametrize("build, mode, name", ROW_CASES)
def test_every_row_resumes_bit_for_bit(build, mode, name) -> None:
    check_resume(build, mode, name)


@pytest.mark.parametrize("build, mode, name", REGISTRY_CASES)
def test_every_registered_optimizer_resumes_bit_for_bit_with_its_defaults(build, mode, name) -> None:
    check_resume(build, mode, name)


@pytest.mark.parametrize("build, mode, name", WRAPPED_CASES)
def test_wrappers_over_other_bases_resume_bit_for_bit(build, mode, name) -> None:
    check_resume(build, mode, name)


@pytest.mark.parametrize("build", [pytest.param(lambda p: tuneless.ScheduleFreeSGD(p, lr=0.5), id="sf_sgd"),
                                   pytest.param(lambda p: tuneless.ScheduleFree(torch.optim.SGD(p, lr=0.1)),
                                                id="ScheduleFree(SGD)")])
def test_train_after_eval_puts_y_back_exactly_unless_the_weights_were_changed_in_eval_mode(build) -> None:
    model = Tiny()
    opt = build(model.params)
    train(opt, model, range(BEFORE))
    y = [p.detach().clone() for p in model.params]
    with opt.evaluation_point():
        x = [p.detach().clone() for p in model.params]
    for a, b in zip(model.params, y):
        assert torch.equal(a, b), "the eval/train round trip did not give y back exactly"
    assert all(opt._y_key not in opt.state[p] for p in model.params), "train() left the copy of y in the state"
    # A weight changed in eval mode is not overwritten by the kept y: train() takes the formula.
    opt.eval()
    with torch.no_grad():
        model.w.add_(1.0)
    opt.train()
    beta = opt._momentum(opt.param_groups[0])
    expected_w = torch.lerp(x[0] + 1.0, opt.state[model.w][opt._z_key], 1.0 - beta)
    assert torch.equal(model.w.detach(), expected_w), "train() dropped a change made in eval mode"
    for a, b in zip(model.params[1:], y[1:]):
        assert torch.equal(a, b), "an unchanged weight did not get y back exactly"
