"""Tuneless, the default optimizer: its math at the first steps, the promises the README makes
for it (no learning rate, no crawl at the start, progress in bfloat16, invariance to the
loss's scale, no divergence when the loss is shifted) and its ablation variants."""

from __future__ import annotations

import contextlib
import copy

import math

import pytest
import torch

import tuneless
from tuneless.optim.default import TunelessScheduleFreeVariant, TunelessVariant


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=g)
    w = torch.randn(20, 5, generator=g)
    return x, (x @ w).argmax(1)


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 5)).to(dtype)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, *, scale: float = 1.0,
           shift: float = 0.0) -> list[float]:
    """Train on the optimizer's view of the loss (scale * loss + shift); return the true losses."""
    x, y = _data()
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        seen = scale * loss + shift
        seen.backward()
        opt.step(loss=seen)
        losses.append(float(loss.detach()))
    return losses


def test_first_step_is_half_the_polyak_step_along_the_sign_of_the_gradient():
    # At step 1, m_hat = g and D = |g| + eps, so tau_1 = f / sum(g^2 / (|g| + eps)) and the
    # distance starts at d_1 = tau_1: the soft minimum is tau_1 / 2.
    # (Tuneless's first step: Schedule-Free's first average is z_1 itself, so x_1 = y_1 = z_1.)
    x = torch.nn.Parameter(torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64))
    opt = tuneless.Tuneless([x])
    loss = 0.5 * (x ** 2).sum()
    loss.backward()
    g = x.grad.clone()
    start = x.detach().clone()
    opt.step(loss=loss)
    tau = float(loss.detach()) / float((g * g / (g.abs() + 1e-8)).sum())
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(tau / 2, rel=1e-12)
    assert float(opt.distances[0]) == pytest.approx(tau, rel=1e-12)
    expected = start - tau / 2 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=0)


def test_the_step_size_is_the_soft_minimum_of_the_polyak_step_and_the_distance():
    # At every step, eta = 1 / (1/tau + 1/d) with tau = f / sum(g^2 / (sqrt(v_hat) + eps)) (inside
    # Tuneless the base has beta1 = 0, so the model is the loss itself and m_hat = g), and d, the
    # distance estimate, never decreases. The hard-minimum variant publishes min(tau, d).
    target = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    for hard in (False, True):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        opt = (TunelessScheduleFreeVariant([p], r=8.0, combine="hard") if hard else tuneless.Tuneless([p]))
        before_d = None
        for k in range(1, 11):
            opt.zero_grad()
            loss = ((p - target) ** 2).sum() + 0.1
            loss.backward()
            g = p.grad.detach().clone()
            opt.step(loss=loss)
            v = opt.base.state[p]["exp_avg_sq"]
            tau = float(loss.detach()) / float((g * g / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8)).sum())
            d = float(opt.base.distances[0])
            eta = float(opt.param_groups[0]["effective_lr"])
            expected = min(tau, d) if hard else tau * d / (tau + d)
            assert eta == pytest.approx(expected, rel=1e-10), (k, hard)
            if before_d is not None:
                assert d >= before_d  # the distance estimate never decreases
            before_d = d


def test_bfloat16_parameters_make_progress_within_ten_steps():
    model = _mlp(torch.bfloat16)
    losses = _train(model, tuneless.Tuneless(model.parameters()), 10)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    # Prodigy, started at d0 = 1e-6, leaves the same bfloat16 model almost where it was (its default
    # start is 1e-3 for 16-bit parameters since commit 031e4de: the Polyak start needs no such rule)
    model = _mlp(torch.bfloat16)
    prodigy = _train(model, tuneless.Prodigy(model.parameters(), d0=1e-6), 10)
    assert prodigy[-1] > 0.99 * prodigy[0]


def test_scaling_the_loss_barely_changes_the_run():
    # Adam's direction and both step sizes are invariant to the loss's scale (up to eps).
    runs = {}
    for scale in (1e-3, 1.0, 1e3):
        model = _mlp(torch.float64)
        runs[scale] = _train(model, tuneless.Tuneless(model.parameters()), 30, scale=scale)
    for scale in (1e-3, 1e3):
        assert runs[scale][-1] == pytest.approx(runs[1.0][-1], rel=1e-3)


def test_a_shifted_loss_does_not_diverge_and_still_trains():
    # loss + 1: the Polyak step first aims 1 below the minimum; the distance cap keeps the run
    # stable while the capped level climbs towards the minimum.
    model = _mlp(torch.float64)
    losses = _train(model, tuneless.Tuneless(model.parameters()), 60, shift=1.0)
    assert all(math.isfinite(v) for v in losses)
    assert max(losses) < 2 * losses[0]
    assert losses[-1] < 0.3 * losses[0]


def test_a_minimum_of_zero_is_reached_to_high_precision():
    # the Polyak part: on a consistent least-squares problem the error goes to ~0
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 10, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 10, dtype=torch.float64)
    b = a @ torch.randn(10, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = tuneless.Tuneless([w])
    start = float(0.5 * (b ** 2).mean())
    for _ in range(400):
        opt.zero_grad()
        loss = 0.5 * ((a @ w - b) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    assert float(loss.detach()) < 1e-10 * start  # Adam at a fixed rate stalls far above this


@pytest.mark.parametrize("kwargs", [dict(step_rule="polyak"), dict(step_rule="distance"), dict(combine="hard"),
                                    dict(start="tiny"), dict(bound="momo_star"), dict(bound="fixed")])
def test_ablation_variants_train_and_the_per_parameter_path_agrees(kwargs):
    results = []
    for foreach in (True, False):
        model = _mlp(torch.float64)
        opt = TunelessVariant(model.parameters(), foreach=foreach, **kwargs)
        results.append(_train(model, opt, 15))
    assert results[0] == pytest.approx(results[1], rel=1e-9)
    if kwargs.get("start") != "tiny":
        assert results[0][-1] < results[0][0]


def test_the_learned_lower_bound_follows_momo_stars_rule():
    """The ablation's ``bound="momo_star"``: after each step the level is the model's minimum
    along the step taken, h - eta ||u||^2 / 2 (never below lower_bound), and the Polyak step aims
    at it; reset to max(h / 2, lower_bound) when the loss falls below it. Checked by hand from
    the published step sizes on a quadratic f(x) = ||x||^2 (beta1 = 0: h is the loss)."""
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64))
    opt = TunelessVariant([x], betas=(0.0, 0.999), bound="momo_star")
    group = opt.param_groups[0]
    level = 0.0
    for step in range(1, 8):
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        g = x.grad.detach().clone()
        v = (1 - 0.999) * g * g if step == 1 else 0.999 * opt.state[x]["exp_avg_sq"] + (1 - 0.999) * g * g
        u_sq = float((g * g / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)).sum())
        f = float(loss.detach())
        if f < level:
            level = max(f / 2, 0.0)
        opt.step(loss=loss.detach())
        eta = float(group[tuneless.STEP_SIZE_KEY])
        if step > 1:  # (the first step's distance starts at the Polyak step: eta = tau / 2)
            tau, d = (f - level) / u_sq, float(group["distance"])
            assert eta == pytest.approx(tau * d / (tau + d), rel=1e-9)
        level = max(f - 0.5 * eta * u_sq, 0.0)
        assert float(group["lower_bound_estimate"]) == pytest.approx(level, rel=1e-9)
    # the default aims at its capped level: no MoMo* estimate in its state
    w = torch.nn.Parameter(torch.ones(3))
    default = tuneless.Tuneless([w])
    (w ** 2).sum().backward()
    default.step(loss=(w ** 2).sum().detach())
    group = default.base.param_groups[0]
    assert "lower_bound_estimate" not in group and "level_aimed" in group and "distance" in group


@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("bound", ["target_level", "capped_level"])
def test_the_target_level_follows_its_rule(bound, shift):
    """The target level: it starts at the bound (gap = h_1 - bound), the record is the lowest loss
    seen, the gap grows by 1.1 when the last level was reached and shrinks by 0.99 when not (at
    most the record's height above the bound), and the Polyak step aims at max(bound, record -
    gap). The capped level (the default's, ``Tuneless`` itself here) shrinks the gap on a miss
    only while the Polyak step aimed at the bound, h / ||g||^2_D, is longer than the distance
    estimate d; the ablation's ``bound="target_level"`` on every miss. Checked by hand from the
    published step sizes on f(x) = ||x||^2 + shift (beta1 = 0: h is the loss, up to rounding);
    shift 1 is a minimum above the bound, where the level must rise."""
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64))
    if bound == "capped_level":
        opt = tuneless.Tuneless([x])
        assert opt.base._bound == "capped_level"
    else:
        opt = TunelessScheduleFreeVariant([x], r=8.0, bound=bound)
    group = opt.base.param_groups[0]
    record, gap, aimed = math.inf, 0.0, math.inf
    shrunk = held = 0
    for step in range(1, 60):
        opt.zero_grad()
        loss = (x ** 2).sum() + shift
        loss.backward()
        g = x.grad.detach().clone()
        f = float(loss.detach())
        state = opt.base.state.get(x, {})
        v = (1 - 0.999) * g * g if step == 1 else 0.999 * state["exp_avg_sq"] + (1 - 0.999) * g * g
        u_sq = float((g * g / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)).sum())
        opt.step(loss=loss.detach())
        d = float(group["distance"])  # this step's distance estimate (the cap of its step)
        if step == 1:
            gap = f
        elif f <= aimed:
            gap *= 1.1
        elif bound == "target_level" or f / u_sq > d:
            gap, shrunk = gap * 0.99, shrunk + 1
        else:
            held += 1
        record = min(record, f)
        gap = max(min(gap, record), 0.0)
        aimed = max(record - gap, 0.0)
        eta = float(group[tuneless.STEP_SIZE_KEY])
        # (the code's h is f + <g, x> - <g, x>, f within rounding of <g, x>: hence the tolerances)
        if step > 1:  # (the first step's distance starts at the Polyak step: eta = tau / 2)
            tau = (f - aimed) / u_sq
            assert eta == pytest.approx(tau * d / (tau + d), rel=1e-6)
        for key, value in (("level_aimed", aimed), ("level_record", record), ("level_gap", gap)):
            assert float(group[key]) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    if shift:  # a minimum above the bound: the level has left the bound, and stays below the minimum
        assert 0.2 < aimed < 1.0 and shrunk > 0
    if bound == "capped_level" and not shift:  # the minimum is the bound: the gate held the level on a miss
        assert held > 0


def test_ablation_switches_are_checked_and_not_on_the_default():
    with pytest.raises(tuneless.InvalidArgumentError, match=r"step_rule = 'both_' is invalid"):
        TunelessVariant([torch.nn.Parameter(torch.zeros(1))], step_rule="both_")
    for knob in (dict(step_rule="polyak"), dict(betas=(0.9, 0.999)), dict(r=2.0)):
        with pytest.raises(tuneless.UnknownArgumentError):
            tuneless.Tuneless([torch.nn.Parameter(torch.zeros(1))], **knob)
    assert tuneless.create("tuneless", [torch.nn.Parameter(torch.zeros(1))]).__class__ is tuneless.Tuneless


@pytest.mark.slow
def test_the_fused_step_is_the_unfused_step_in_every_kind_of_group():
    """``fused=True`` (two compiled passes: the statistics, then v, s, z, x and y at once) against
    the unfused path over three groups at once: a plain one, one frozen by lr = 0 (its moments
    still move, its parameters do not), and one with decay at y (the kernels' other variant);
    float64, so that the two paths' roundings stay far below the tolerance. Checks every
    parameter, the average x, each buffer, the learned scalars and the checkpoints' keys."""
    tests = pytest.importorskip("tests.optim_db")
    tests.require_working_compiler()
    runs = {}
    for fused in (False, True):
        model = _mlp(torch.float64)
        first, second = model[0], model[2]
        groups = [{"params": [first.weight]}, {"params": [first.bias], "lr": 0.0},
                  {"params": list(second.parameters()), "sf_weight_decay_at_y": 0.05}]
        opt = tuneless.Tuneless(groups, fused=fused)
        _train(model, opt, 25)
        with opt.evaluation_point():
            x = [p.detach().clone() for p in model.parameters()]
        runs[fused] = ([p.detach().clone() for p in model.parameters()], x, opt.state_dict())
    (y0, x0, sd0), (y1, x1, sd1) = runs[False], runs[True]
    assert torch.equal(y1[1], _mlp(torch.float64)[0].bias), "the frozen group moved"
    for a, b in zip(y0 + x0, y1 + x1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert sd0["state"].keys() == sd1["state"].keys()
    for i, state in sd0["state"].items():
        assert state.keys() == sd1["state"][i].keys()
        for key, value in state.items():
            torch.testing.assert_close(sd1["state"][i][key], value, rtol=1e-9, atol=1e-12, msg=key)
    for g0, g1 in zip(sd0["param_groups"], sd1["param_groups"]):
        assert g0.keys() - {"sf_fused"} == g1.keys() - {"sf_fused"} and g1["sf_fused"] and not g0["sf_fused"]
        learned = [k for k, value in g0.items() if isinstance(value, torch.Tensor)]
        assert {"distance", "effective_lr", "tuneless_step", "sf_k"} <= set(learned)
        for key in learned:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-9, atol=0, msg=key)


@pytest.mark.parametrize("paths", ["cpu", "other devices'"])
def test_the_two_sweep_vectorized_step_is_the_per_parameter_step_in_every_kind_of_group(paths):
    """``Tuneless._vectorized_step`` (the base's statistics, then one sweep that steps z and moves
    y, the wrapper's swap folded in) against the per-parameter path (``foreach=False``: the
    wrapper's passes around :class:`TunelessStep`), float64, over a plain group, one frozen by
    lr = 0, one with decay at y and a parameter without a gradient, through a step whose gradient
    is NaN (skipped: nothing moves) and a resume from a checkpoint; on the CPU's paths and on the
    paths written for other devices (the finiteness flag never read on the host)."""
    from tuneless.optim import _batched as batched

    context = batched.device_paths_on_cpu if paths != "cpu" else contextlib.nullcontext
    x, y = _data()
    runs = {}
    for foreach in (True, False):
        with context():
            model = _mlp(torch.float64)
            first, second = model[0], model[2]
            idle = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # never has a gradient
            groups = [{"params": [first.weight]}, {"params": [first.bias], "lr": 0.0},
                      {"params": list(second.parameters()) + [idle], "sf_weight_decay_at_y": 0.05}]
            opt = tuneless.Tuneless(groups, foreach=foreach)
            for step in range(30):
                if step == 12:  # a checkpoint taken and loaded into a new optimizer
                    state = copy.deepcopy(opt.state_dict())
                    opt = tuneless.Tuneless(groups, foreach=foreach)
                    opt.load_state_dict(state)
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x.double()), y)
                loss.backward()
                if step == 7:
                    first.weight.grad[0, 0] = float("nan")
                before = [p.detach().clone() for p in model.parameters()]
                opt.step(loss=loss)
                if step == 7:
                    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a skipped step moved"
            with opt.evaluation_point():
                averaged = [p.detach().clone() for p in model.parameters()]
        runs[foreach] = ([p.detach().clone() for p in model.parameters()], averaged, opt.state_dict(),
                         opt.skipped_steps())
    (y0, x0, sd0, skipped0), (y1, x1, sd1, skipped1) = runs[False], runs[True]
    assert skipped0 == skipped1 == [1, 1, 1]
    assert torch.equal(y1[1], _mlp(torch.float64)[0].bias), "the frozen group moved"
    for a, b in zip(y0 + x0, y1 + x1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert sd0["state"].keys() == sd1["state"].keys()
    for i, state in sd0["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(sd1["state"][i][key], value, rtol=1e-9, atol=1e-12, msg=key)
    for g0, g1 in zip(sd0["param_groups"], sd1["param_groups"]):
        for key in [k for k, value in g0.items() if isinstance(value, torch.Tensor)]:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-9, atol=0, msg=key)


def test_momo_stars_level_overshoots_on_rosenbrock_where_the_given_bound_converges():
    """docs/default.md's reading of the learned lower bound (``benchmarks/shifted_rosenbrock.py``):
    on Rosenbrock from (-1.2, 1), whose minimum is 0, MoMo*'s level climbs above the minimum and
    the run stalls at it, while the fixed level and the default's capped level stay at
    lower_bound = 0 and converge far below it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shifted_rosenbrock.py"
    spec = importlib.util.spec_from_file_location("shifted_rosenbrock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def final(bound):
        lines = module.run(bound, 0.0, 1000)
        error = float(lines[-2].split("error at the average")[1].split(",")[0])
        level = float(lines[-1].split(":")[1].split("(")[0])
        return error, level

    error, level = final("momo_star")
    assert level > 1e-3 and error > 1e-3 and error == pytest.approx(level, rel=0.05)
    error, level = final("fixed")
    assert level == 0.0 and error < 1e-9
    error, level = final("default")  # the capped level: at most a hair above the bound, which is the minimum
    assert 0.0 <= level < 1e-12 and error < 1e-9


def test_the_target_level_solves_the_shifted_rosenbrock_where_the_fixed_level_does_not():
    """docs/default.md's reading of the target level (``benchmarks/shifted_rosenbrock.py``): with
    the loss shifted by +1 (an unknown minimum of 1 above the bound 0), the target level and the
    default's capped level climb to the minimum from below and the average reaches it; the fixed
    level (the default until 2026-12-04), which aims at the bound, ends far above the solved
    floor. As is, all three converge."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shifted_rosenbrock.py"
    spec = importlib.util.spec_from_file_location("shifted_rosenbrock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def final(bound, shift):
        lines = module.run(bound, shift, 3000)
        error = float(lines[-2].split("error at the average")[1].split(",")[0])
        level = float(lines[-1].split(":")[1].split("(")[0])
        return error, level

    for bound in ("target_level", "default"):  # the default: the capped level
        error, level = final(bound, 1.0)
        assert error < 1e-9 and 0.999 < level <= 1.0, bound
    error, level = final("fixed", 1.0)
    assert error > 1e-5 and level == 0.0
    for bound in ("target_level", "fixed", "default"):
        assert final(bound, 0.0)[0] < 1e-9


def test_a_checkpoint_without_the_target_level_resumes_with_the_level_at_the_bound():
    """A state_dict without the target level's keys (saved with another bound) loads into the
    ablation's target-level variant, which keeps its switch, and the next step starts the level at
    the bound: gap = h - bound, record = h, level = bound."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))

    def build():
        return TunelessScheduleFreeVariant([w], r=8.0, bound="target_level")

    opt = build()
    for _ in range(3):
        opt.zero_grad()
        loss = ((w - 1) ** 2).sum() + 0.5
        loss.backward()
        opt.step(loss=loss)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("level_record", "level_gap", "level_aimed"):
            del group[key]
    resumed = build()
    resumed.load_state_dict(old)
    resumed.zero_grad()
    loss = ((w - 1) ** 2).sum() + 0.5
    loss.backward()
    resumed.step(loss=loss)
    group = resumed.base.param_groups[0]
    assert resumed.base._bound == "target_level"
    assert float(group["level_aimed"]) == 0.0
    assert float(group["level_record"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(group["level_gap"]) == pytest.approx(float(loss), rel=1e-6)


def test_the_capped_levels_gap_cannot_round_to_zero_and_freeze():
    """A long run of misses shrinks the gap by 0.99 each; at 0 it could never grow back (1.1 x 0),
    and a deterministic run sitting at its record would aim at the record and stand still for good.
    The gap is floored at the dtype's smallest normal number: from a state whose gap is 0 at a
    record above the bound, the level comes off the record again and the run moves."""
    x = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    opt = tuneless.Tuneless([x])

    def loss_fn():
        return ((x - 1.0) ** 2).sum() + 1.0  # minimum 1, above the bound 0

    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss=loss.detach())
    sd = opt.state_dict()
    opt.zero_grad()
    record = float(loss_fn().detach())
    for group in sd["param_groups"]:
        group["level_gap"] = torch.zeros_like(group["level_gap"])
        group["level_record"] = torch.full_like(group["level_record"], record)
        group["level_aimed"] = torch.full_like(group["level_aimed"], record)
    opt.load_state_dict(sd)
    start = x.detach().clone()
    for _ in range(400):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss=loss.detach())
    group = opt.base.param_groups[0]
    assert float(group["level_gap"]) >= torch.finfo(torch.float32).tiny
    assert not torch.equal(x.detach(), start)
    assert float(loss_fn()) < record


def test_param_groups_with_different_lower_bounds_are_refused():
    """The loss is one number, and the level it aims at is shared by every group: a group with
    another lower_bound (for example added by add_param_group) is refused at the step, by name,
    not silently given the first group's."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = tuneless.Tuneless([{"params": [a]}, {"params": [b], "lower_bound": 0.5}])
    loss = (a ** 2).sum() + (b ** 2).sum()
    loss.backward()
    with pytest.raises(tuneless.InvalidArgumentError,
                       match=r"^Tuneless: lower_bound = \[0\.0, 0\.5\] is invalid; allowed: one value for every param group"):
        opt.step(loss=loss.detach())
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.ones(2))
    same = tuneless.Tuneless([{"params": [a]}, {"params": [b], "lower_bound": 0.0}])
    same.step(loss=loss.detach())
