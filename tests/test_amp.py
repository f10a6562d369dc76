"""Every optimizer of the contract table under automatic mixed precision, on the CPU.

* bf16 autocast (no scaler): trains.
* fp16 autocast with ``torch.amp.GradScaler("cpu")``: trains, with the loss passed both ways a
  loop without closure can pass it: ``scaler.step(opt, loss=loss)`` (GradScaler forwards keyword
  arguments to ``opt.step``) and the loss channel (``opt.observe_loss(loss)`` then
  ``scaler.step(opt)``). The two runs are the same run, bit for bit, and the loss the optimizer
  gets is the unscaled one (recorded where every loss-based step takes it,
  :func:`tuneless.distributed.average_loss`).
* A step the scaler skips (an inf gradient) leaves the optimizer's state and the parameters
  untouched, bit for bit, and drops the loss observed for it: the next step gets its own loss.

A tiny model (49 parameters), few steps: the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.optim_db import OPTIM_DB, OptimizerInfo

ROWS = [pytest.param(info, id=info.name) for info in OPTIM_DB]
LOSS_ROWS = [pytest.param(info, id=info.name) for info in OPTIM_DB if info.requires_loss]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return x, torch.tanh(x @ torch.tensor([1.0, -2.0, 0.5, 1.5])).unsqueeze(-1)


X, Y = _data()


def _loss(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast("cpu", dtype=dtype):
        out = model(X)
    return torch.nn.functional.mse_loss(out.float(), Y)


def _full_loss(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(X), Y))


def _scaled_run(info: OptimizerInfo, steps: int, how: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    """``steps`` steps under fp16 autocast and a GradScaler; the loss ``how``: "kwarg" or "channel".
    Returns the model, the optimizer, and the (unscaled) losses of the steps taken (the scaler skips
    a step whose gradients overflowed in fp16)."""
    model = _model()
    opt = info.build(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, torch.float16)
        scaler.scale(loss).backward()
        if how == "kwarg":
            scaler.step(opt, loss=loss.detach())
        else:
            opt.observe_loss(loss)
            scaler.step(opt)
        scale = scaler.get_scale()
        scaler.update()
        if scaler.get_scale() >= scale:  # the step was taken (a skipped one halves the scale)
            losses.append(float(loss.detach()))
    return model, opt, losses


@pytest.mark.parametrize("info", ROWS)
def test_trains_under_bf16_autocast(info: OptimizerInfo) -> None:
    model = _model()
    opt = info.build(model.parameters())
    start, history = _full_loss(model), []
    for _ in range(info.downhill_steps):
        opt.zero_grad()
        loss = _loss(model, torch.bfloat16)
        loss.backward()
        opt.step(loss=loss.detach())
        history.append(_full_loss(model))
    assert all(map(math.isfinite, history)) and min(history) < start  # (D-Adapt Adam overshoots later, in fp32 too)


@pytest.mark.parametrize("info", ROWS)
def test_trains_under_fp16_grad_scaler_both_loss_paths_alike(info: OptimizerInfo, received: list[float]) -> None:
    model_kwarg, _, losses = _scaled_run(info, info.downhill_steps, "kwarg")
    by_kwarg = list(received)
    received.clear()
    model_channel, _, _ = _scaled_run(info, info.downhill_steps, "channel")
    assert all(map(math.isfinite, losses)) and min(losses[1:] + [_full_loss(model_channel)]) < losses[0]
    for a, b in zip(model_kwarg.parameters(), model_channel.parameters()):
        assert torch.equal(a, b)
    if info.requires_loss:  # the unscaled loss (the scale starts at 65536), once a step, both ways
        assert by_kwarg == pytest.approx(losses, rel=1e-6)
        assert received == by_kwarg
    else:
        assert by_kwarg == received == []


def _snapshot(opt: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[Any, list[torch.Tensor]]:
    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v) for v in value]
        return value

    return copy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]


def _assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


@pytest.mark.parametrize("how", ["kwarg", "channel"])
@pytest.mark.parametrize("info", ROWS)
def test_skipped_step_leaves_state_and_parameters_untouched(info: OptimizerInfo, how: str,
                                                            received: list[float]) -> None:
    model, opt, _ = _scaled_run(info, 3, how)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = _snapshot(opt, model)
    opt.zero_grad()
    loss = _loss(model, torch.float16)
    scaler.scale(loss).backward()
    next(iter(model.parameters())).grad[0, 0] = float("inf")
    received.clear()
    if how == "kwarg":
        scaler.step(opt, loss=loss.detach())
    else:
        opt.observe_loss(loss)
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7  # the scaler saw the inf and skipped the step
    assert received == []
    _assert_identical(_snapshot(opt, model), before)
    # The next step gets its own loss, never the skipped step's added to it.
    opt.zero_grad()
    loss = _loss(model, torch.float16)
    scaler.scale(loss).backward()
    opt.observe_loss(loss)
    scaler.step(opt)
    assert received == ([pytest.approx(float(loss.detach()), rel=1e-6)] if info.requires_loss else [])
