"""The Polyak family: exact step sizes, edge cases, MoMo parity and the unknown-f* variant."""

from __future__ import annotations

import math

import pytest
import torch

import tuneless
from tuneless import SPS, Momo, MomoStar, Polyak, SPSMax


def _quadratic_step(opt_cls, x0, **kw):
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = opt_cls([x], **kw)
    loss = (x**2).sum()
    loss.backward()
    opt.step(loss=loss)
    return x, opt


def test_polyak_step_is_excess_error_over_squared_gradient_norm() -> None:
    # f = |x|^2 at (3, -4): f = 25, g = (6, -8), |g|^2 = 100 -> step 0.25, x -> (1.5, -2)
    x, opt = _quadratic_step(Polyak, [3.0, -4.0])
    assert float(opt.param_groups[0]["effective_lr"]) == 0.25
    assert torch.equal(x.detach(), torch.tensor([1.5, -2.0], dtype=torch.float64))


def test_polyak_with_f_star_and_lr_multiplier() -> None:
    x, opt = _quadratic_step(Polyak, [3.0, -4.0], f_star=5.0, lr=0.5)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(0.5 * 20 / 100)


def test_sps_and_sps_max() -> None:
    _, opt = _quadratic_step(SPS, [3.0, -4.0], c=0.5)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(25 / (0.5 * 100))
    _, opt = _quadratic_step(SPSMax, [3.0, -4.0], c=0.5, max_step=0.1)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(0.1)
    assert SPS([torch.nn.Parameter(torch.ones(1))]).param_groups[0]["max_step"] is None


@pytest.mark.parametrize("cls", [Polyak, SPS, Momo, MomoStar])
def test_zero_gradient_gives_zero_step(cls) -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = cls([x])
    x.grad = torch.zeros(2, dtype=torch.float64)
    opt.step(loss=torch.tensor(3.0, dtype=torch.float64))
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0


@pytest.mark.parametrize("cls", [Polyak, SPS])
def test_loss_below_f_star_gives_zero_step(cls) -> None:
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = cls([x], f_star=10.0)
    (x**2).sum().backward()
    opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(x.detach(), torch.tensor([1.0], dtype=torch.float64))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0


def test_momo_star_lowers_its_estimate_when_the_loss_is_below_it() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = MomoStar([x], lower_bound=0.0, beta=0.0)
    opt.param_groups[0]["f_star_estimate"] = torch.tensor(50.0, dtype=torch.float64)
    opt.param_groups[0]["loss_avg"] = torch.tensor(0.0, dtype=torch.float64)
    opt.param_groups[0]["grad_dot_x_avg"] = torch.tensor(0.0, dtype=torch.float64)
    opt.param_groups[0]["momo_step"] = 1
    opt.state[x]["grad_avg"] = torch.zeros(2, dtype=torch.float64)
    loss = (x**2).sum()  # 2, far below the estimate 50
    loss.backward()
    opt.step(loss=loss)
    assert float(opt.param_groups[0]["f_star_estimate"]) < 2.0
    assert not torch.equal(x.detach(), torch.ones(2, dtype=torch.float64))  # a reset lets it move


@pytest.mark.parametrize("cls", [Polyak, SPS, SPSMax, Momo, MomoStar])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_non_finite_loss_skips_the_step(cls, bad, skip_nonfinite) -> None:
    """Skipping (the default): the published step size keeps the last step's value and the skip
    is counted; opted out: the step size is 0 (published as 0). Either way nothing moves."""
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = cls([x], skip_nonfinite=skip_nonfinite)
    for loss_value in (None, bad):
        opt.zero_grad()
        loss = (x**4).sum()
        loss.backward()
        before = x.detach().clone()
        published = opt.param_groups[0].get("effective_lr")
        opt.step(loss=loss if loss_value is None else torch.tensor(loss_value, dtype=torch.float64))
    assert torch.equal(x.detach(), before), "a non-finite loss must not move the parameters"
    if skip_nonfinite:
        assert float(published) > 0.0
        assert torch.equal(opt.param_groups[0]["effective_lr"], published)
        assert opt.skipped_steps() == [1]
    else:
        assert float(opt.param_groups[0]["effective_lr"]) == 0.0
        assert opt.skipped_steps() == [0]
    # training continues normally afterwards
    opt.zero_grad()
    loss = (x**4).sum()
    loss.backward()
    opt.step(loss=loss)
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), before)


def test_loss_as_a_python_number_and_bad_loss_types() -> None:
    x = torch.nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    opt = Polyak([x])
    (x**2).sum().backward()
    opt.step(loss=25.0)
    assert float(opt.param_groups[0]["effective_lr"]) == 0.25
    with pytest.raises(TypeError, match="loss must be a tensor or a number"):
        opt.step(loss="25")
    with pytest.raises(ValueError, match="loss must be a scalar"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(ValueError, match="either a closure or loss="):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


# ------------------------------------------------------------------------------- MoMo parity


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    w_true = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = x @ w_true + 0.3 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(0.1 * torch.randn(5, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    return x, y, w, b


@pytest.mark.parametrize("kwargs", [dict(), dict(use_fstar=True), dict(weight_decay=0.01), dict(beta=0.5, use_fstar=True, lr=0.3)])
def test_momo_matches_the_authors_package(kwargs) -> None:
    momo = pytest.importorskip("momo", reason="test-only dependency momo-opt (requirements-dev.txt)")
    ours_kw = {k: v for k, v in kwargs.items() if k != "use_fstar"}
    ours_kw["estimate_lower_bound"] = kwargs.get("use_fstar", False)
    x, y, w1, b1 = _regression()
    _, _, w2, b2 = _regression()
    ours = Momo([w1, b1], **ours_kw)
    ref = momo.Momo([w2, b2], **kwargs)
    for t in range(200):
        for opt, w, b in ((ours, w1, b1), (ref, w2, b2)):
            opt.zero_grad()
            loss = torch.tanh(((x @ w + b - y) ** 2).mean())  # smooth, non-quadratic
            loss.backward()
            opt.step(loss=loss)
        torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-14, msg=f"diverged from momo-opt at step {t}")
        torch.testing.assert_close(b1, b2, rtol=1e-10, atol=1e-14)
    if kwargs.get("use_fstar"):
        assert float(ours.param_groups[0]["f_star_estimate"]) == pytest.approx(ref.state["fstar"], rel=1e-10, abs=1e-14)


def _momo_star_bounds(order: tuple[str, ...], cls=MomoStar) -> dict[str, float]:
    """MoMo*'s bound per group after 20 steps, with the groups given in ``order``: w at lr 1, b
    at lr 0.005, a cap low enough to cut b's step (so its bound follows a path of its own)."""
    x, y, w, b = _regression()
    groups = {"w": {"params": [w]}, "b": {"params": [b], "lr": 0.005}}
    opt = cls([groups[k] for k in order])
    for _ in range(20):
        opt.zero_grad()
        loss = ((x @ w + b - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    return dict(zip(order, (float(e) for e in opt.f_star_estimates)))


def test_momo_keeps_one_bound_per_group_where_the_reference_overwrites_it() -> None:
    """The reference updates one bound group after group, so group 2 sees group 1's update.
    tuneless keeps one estimate per group: the two groups' bounds differ (a shared estimate
    would make them equal), and neither depends on the order of the groups (an overwritten one
    would). With one group the two agree (test above)."""
    bounds = _momo_star_bounds(("w", "b"))
    assert all(math.isfinite(e) and e >= 0 for e in bounds.values())
    assert bounds["w"] != pytest.approx(bounds["b"], rel=1e-4)
    assert _momo_star_bounds(("b", "w")) == pytest.approx(bounds, rel=1e-10)


# ------------------------------------------------------------------------------- unknown f*


def test_unknown_f_star_converges_without_being_told() -> None:
    """Noisy least squares: the minimum is > 0 and unknown to the optimizer.

    Polyak told the wrong f* = 0 keeps overshooting; MoMo* learns f* and converges.
    """
    g = torch.Generator().manual_seed(0)
    n, d = 200, 10
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = a @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    f_star = float(((a @ w_star - y) ** 2).mean() / 2)
    assert f_star > 0.1

    def train(opt_cls, **kw):
        w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        opt = opt_cls([w], **kw)
        for _ in range(2000):
            opt.zero_grad()
            loss = ((a @ w - y) ** 2).mean() / 2
            loss.backward()
            opt.step(loss=loss)
        with torch.no_grad():
            return float(((a @ w - y) ** 2).mean() / 2) - f_star, opt

    err_star, opt = train(MomoStar)
    assert err_star < 1e-8
    assert float(opt.param_groups[0]["f_star_estimate"]) == pytest.approx(f_star, rel=1e-6)
    err_wrong, _ = train(Polyak, f_star=0.0)
    assert err_wrong > 1e-3, "Polyak with the wrong f* should not converge here"


def test_registry_finds_the_polyak_family() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    assert isinstance(tuneless.create("polyak:f_star=0", [p]), Polyak)
    assert isinstance(tuneless.create("SPS_MAX", [p]), SPSMax)
    assert isinstance(tuneless.create("momo_star", [p]), MomoStar)
    assert {"polyak", "sps", "momo", "momo_star"} <= set(tuneless.learning_rate_free())
    assert "sps_max" not in tuneless.learning_rate_free()
