"""COCOB-specific behaviour (the generic contract is in test_contract.py)."""

from __future__ import annotations

import torch

import tuneless
from tuneless import COCOB


def quadratic_params():
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))]


def quadratic_loss(ps):
    scales = torch.linspace(0.5, 4.0, 6, dtype=torch.float64)
    return 0.5 * (scales * (ps[0] - 1.0) ** 2).sum() + 0.5 * ((ps[1] + 0.5) ** 2).sum()


def step(opt, ps, loss_fn=quadratic_loss):
    opt.zero_grad()
    loss = loss_fn(ps)
    loss.backward()
    opt.step()
    return loss.detach()


def test_converges_on_a_quadratic_without_any_step_size() -> None:
    ps = quadratic_params()
    opt = COCOB(ps)
    first = quadratic_loss(ps).item()
    for _ in range(300):
        step(opt, ps)
    assert quadratic_loss(ps).item() < 1e-3 * first


def test_constant_lr_scales_the_bet() -> None:
    """With a constant lr, x_t = x_1 + lr * bet_t at every step (the betting itself is lr-free)."""
    for foreach in (True, False):
        ps = quadratic_params()
        start = [p.detach().clone() for p in ps]
        opt = COCOB(ps, lr=0.3, foreach=foreach)
        for _ in range(40):
            step(opt, ps)
            for p, x1 in zip(ps, start):
                torch.testing.assert_close(p.detach() - x1, 0.3 * opt.state[p]["bet"], rtol=1e-12, atol=1e-14)


def test_lr_zero_freezes_and_lr_back_resumes_without_a_jump() -> None:
    """lr scales each change of the bet: a pause neither sends x back to x_1 nor jumps on resume."""
    ps = quadratic_params()
    opt = COCOB(ps)
    for _ in range(10):
        step(opt, ps)
    paused = [p.detach().clone() for p in ps]
    bets = [opt.state[p]["bet"].clone() for p in ps]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for _ in range(5):
        step(opt, ps)
    for p, x in zip(ps, paused):
        assert torch.equal(p.detach(), x)
    bets_before_resume = [opt.state[p]["bet"].clone() for p in ps]
    assert any(not torch.equal(a, b) for a, b in zip(bets, bets_before_resume))  # betting went on
    for group in opt.param_groups:
        group["lr"] = 1.0
    step(opt, ps)
    for p, x, b in zip(ps, paused, bets_before_resume):
        torch.testing.assert_close(p.detach() - x, opt.state[p]["bet"] - b, rtol=1e-12, atol=1e-14)


def test_weight_decay_is_the_l2_gradient() -> None:
    wd = 0.1
    a, b = quadratic_params(), quadratic_params()
    oa, ob = COCOB(a, weight_decay=wd), COCOB(b)

    def with_l2(ps):
        return quadratic_loss(ps) + 0.5 * wd * sum((p ** 2).sum() for p in ps)

    for _ in range(30):
        step(oa, a)
        step(ob, b, with_l2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_zero_gradient_coordinates_stay_put_and_rewards_stay_nonnegative() -> None:
    x = torch.nn.Parameter(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    opt = COCOB([x], foreach=True)
    for t in range(60):
        opt.zero_grad()
        # the last coordinate never has a gradient; the first sees a sign-flipping one
        ((x[0] - (1.0 if t % 2 else -1.0)) ** 2 + (x[1] - 3.0) ** 2).backward()
        opt.step()
        state = opt.state[x]
        assert (state["reward"] >= 0).all()
        assert torch.isfinite(x).all()
    assert x[2].item() == 0.5
    assert (opt.state[x]["max_abs_grad"][2] == 1e-8).item()


def test_registry_builds_it() -> None:
    ps = quadratic_params()
    opt = tuneless.create("cocob:alpha=50", ps)
    assert isinstance(opt, COCOB) and opt.param_groups[0]["alpha"] == 50.0
    assert "cocob" in tuneless.learning_rate_free()
