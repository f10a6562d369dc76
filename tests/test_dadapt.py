"""D-Adaptation: the places where tuneless deliberately differs from ``dadaptation`` 3.2, and edge cases.

Each test names the failure it guards against. Parity on the inputs where the two agree is in
``test_parity_dadapt.py``; the generic contract (resume, syncs, dtypes, ...) in ``test_contract.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

from tuneless import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD, InvalidArgumentError

dadaptation = pytest.importorskip("dadaptation")

CLASSES = [DAdaptSGD, DAdaptAdam, DAdaptAdaGrad]
FOREACH = [True, False]


def quadratic(dtype=torch.float64, seed=0, scale=1.0):
    """Three tensors, f = scale * 0.5 * sum (x - x*)^2 (per-coordinate curvature 1 to 3)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 2)]
    targets = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter((t + 2 * torch.randn(*t.shape, generator=g, dtype=torch.float64)).to(dtype))
              for t in targets]
    curv = [1 + 2 * torch.rand(*s, generator=g, dtype=torch.float64) for s in shapes]

    def loss():
        return scale * sum((0.5 * c.to(dtype) * (p - t.to(dtype)) ** 2).sum() for p, t, c in zip(params, targets, curv))

    return params, loss


def take_step(opt, loss) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    opt.step()
    return value.detach()


def two_groups(params, lr_a=1.0, lr_b=1.0, **b_overrides):
    return [{"params": params[:2], "lr": lr_a}, {"params": params[2:], "lr": lr_b, **b_overrides}]


# ----------------------------------------------------------------------------- per-group lr


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_group_lr_multiplies_the_shared_d(cls, foreach) -> None:
    """Group B with lr=0.1 moves 0.1x as far as with lr=1 at the first step (the reference refuses)."""
    moves = {}
    for lr_b in (1.0, 0.1):
        params, loss = quadratic()
        start = [p.detach().clone() for p in params]
        opt = cls(two_groups(params, 1.0, lr_b), foreach=foreach)
        take_step(opt, loss)
        moves[lr_b] = [p.detach() - s for p, s in zip(params, start)]
        assert torch.equal(opt.param_groups[1]["effective_lr"], lr_b * opt.param_groups[0]["effective_lr"])
    for a, b in zip(moves[1.0][2:], moves[0.1][2:]):
        torch.testing.assert_close(b, 0.1 * a, rtol=1e-9, atol=1e-14)  # moves of ~1e-8 on O(1) parameters
    for a, b in zip(moves[1.0][:2], moves[0.1][:2]):  # group A is not affected by B's lr at the first step
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-14)  # moves of ~1e-8 on O(1) parameters


@pytest.mark.parametrize("name", ["DAdaptSGD", "DAdaptAdam"])
def test_the_reference_refuses_different_group_lrs(name) -> None:
    """Documents why the per-group lr is a deliberate difference (dadaptation 3.2 raises)."""
    params, loss = quadratic()
    opt = getattr(dadaptation, name)(two_groups(params, 1.0, 0.1))
    loss().backward()
    with pytest.raises(RuntimeError, match="different lr"):
        opt.step()


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, dict(momentum=0.9)), (DAdaptAdam, {}), (DAdaptAdaGrad, dict(momentum=0.5))])
@pytest.mark.parametrize("foreach", FOREACH)
def test_a_group_whose_lr_is_set_to_zero_is_frozen(cls, kwargs, foreach) -> None:
    """lr -> 0 mid-training freezes the group: the reference keeps moving it (momentum, stale m)."""
    params, loss = quadratic()
    opt = cls(two_groups(params), foreach=foreach, **kwargs)
    for _ in range(10):
        take_step(opt, loss)
    opt.param_groups[1]["lr"] = 0.0
    frozen = [p.detach().clone() for p in params[2:]]
    frozen_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params[2:]]
    moving = [p.detach().clone() for p in params[:2]]
    for _ in range(5):
        take_step(opt, loss)
    for p, before, st in zip(params[2:], frozen, frozen_state):
        assert torch.equal(p, before)
        for key, value in st.items():
            assert torch.equal(opt.state[p][key], value), f"{key} of a frozen group changed"
    assert not all(torch.equal(p, m) for p, m in zip(params[:2], moving))
    assert float(opt.param_groups[1]["effective_lr"]) == 0.0


@pytest.mark.parametrize("cls", CLASSES)
def test_a_step_with_every_lr_zero_changes_nothing(cls) -> None:
    params, loss = quadratic()
    opt = cls(params)
    for _ in range(3):
        take_step(opt, loss)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    k, d = opt.param_groups[0]["k"], opt.param_groups[0]["d"].clone()
    take_step(opt, loss)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.param_groups[0]["k"] == k and torch.equal(opt.param_groups[0]["d"], d)


def test_sgd_warmup_from_lr_zero_works() -> None:
    """A warm-up that starts at lr = 0: the reference divides by zero; here ||g0|| waits for lr > 0."""
    params, loss = quadratic()
    ref = dadaptation.DAdaptSGD([p.detach().clone().requires_grad_() for p in params], lr=1.0)
    for group in ref.param_groups:
        group["lr"] = 0.0
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ZeroDivisionError):
        ref.step()

    opt = DAdaptSGD(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 5))
    first = loss().item()
    for _ in range(40):
        take_step(opt, loss)
        sched.step()
    assert loss().item() < first
    assert math.isfinite(float(opt.param_groups[0]["g0_norm"])) and float(opt.param_groups[0]["g0_norm"]) > 0
    assert float(opt.param_groups[0]["d"]) > 1e-6


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, {}), (DAdaptAdam, dict(decouple=False)),
                                         (DAdaptAdam, dict(decouple=True)), (DAdaptAdaGrad, {})])
@pytest.mark.parametrize("foreach", FOREACH)
def test_weight_decay_is_per_group(cls, kwargs, foreach) -> None:
    """Group A decays, group B does not (dadaptation's SGD applies group 0's decay to every group)."""

    def first_moves(groups_of):
        params, loss = quadratic()
        start = [p.detach().clone() for p in params]
        opt = cls(groups_of(params), foreach=foreach, **kwargs)
        take_step(opt, loss)
        return [p.detach() - s for p, s in zip(params, start)]

    wd = 10.0  # large, so that even sign-like first steps (Adam, AdaGrad) change with it
    mixed = first_moves(lambda ps: [{"params": ps[:2], "weight_decay": wd}, {"params": ps[2:], "weight_decay": 0.0}])
    none = first_moves(lambda ps: [{"params": ps[:2], "weight_decay": 0.0}, {"params": ps[2:], "weight_decay": 0.0}])
    both = first_moves(lambda ps: [{"params": ps[:2], "weight_decay": wd}, {"params": ps[2:], "weight_decay": wd}])
    for m, n in zip(mixed[2:], none[2:]):
        torch.testing.assert_close(m, n, rtol=1e-9, atol=1e-14)  # moves of ~1e-8 on O(1) parameters
    for m, b in zip(mixed[:2], both[:2]):
        torch.testing.assert_close(m, b, rtol=1e-9, atol=1e-14)  # moves of ~1e-8 on O(1) parameters
    assert not all(torch.allclose(m, n) for m, n in zip(mixed[:2], none[:2])), "the decay had no effect"


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, dict(momentum=0.9)), (DAdaptAdam, dict(decouple=False)),
                                         (DAdaptAdaGrad, {})])
@pytest.mark.parametrize("foreach", FOREACH)
def test_coupled_weight_decay_leaves_p_grad_alone(cls, kwargs, foreach) -> None:
    """dadaptation adds the coupled decay into p.grad in place; tuneless never modifies it."""
    params, loss = quadratic()
    opt = cls(params, weight_decay=0.1, foreach=foreach, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_the_reference_modifies_p_grad() -> None:
    """Documents the reference's behaviour that tuneless fixes."""
    params, loss = quadratic()
    opt = dadaptation.DAdaptAdam(params, weight_decay=0.1)
    loss().backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    assert not all(torch.equal(p.grad, g) for p, g in zip(params, grads))


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_parameter_without_gradient_gets_no_state_and_does_not_move(cls, foreach) -> None:
    params, loss = quadratic()
    idle = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = cls([{"params": params[:2] + [idle]}, {"params": params[2:]}], foreach=foreach)
    for _ in range(5):
        take_step(opt, loss)
    assert torch.equal(idle, torch.ones(3, dtype=torch.float64)) and idle not in opt.state
    assert float(opt.param_groups[0]["d"]) > 1e-6


class CountingSums:
    """Counts the calls of ``_global_sum`` (where sharded training reduces across ranks)."""

    def __init__(self, opt) -> None:
        self.calls = 0
        inner = opt._global_sum

        def counted(partial):
            self.calls += 1
            return inner(partial)

        opt._global_sum = counted


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_every_step_reaches_exactly_one_global_sum(cls, foreach) -> None:
    """No early return: with zero gradients (||s|| = 0, where the reference returns before its
    all-reduce), frozen groups or lr = 0 everywhere, each step makes exactly one global sum."""
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = cls([{"params": [p]}, {"params": [q], "lr": 0.0}], foreach=foreach)
    counter = CountingSums(opt)
    for step in range(4):  # zero gradients
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
        opt.step()
        assert counter.calls == step + 1
    assert torch.equal(p, torch.ones(5, dtype=torch.float64)) and torch.isfinite(opt.param_groups[0]["d"])
    opt.param_groups[0]["lr"] = 0.0  # every group frozen
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert counter.calls == 5
    opt.param_groups[0]["lr"] = 1.0
    for step in range(3):  # normal gradients
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
        assert counter.calls == 6 + step


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_a_negative_estimate_never_lowers_d(cls, foreach) -> None:
    """dadaptation issue #42: d-hat < 0. d = max(d, ...) keeps d, and training goes on."""
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = cls([p], d0=1e-3, foreach=foreach)
    direction = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    for _ in range(5):  # build up s along +direction
        _set_grads([p], [direction])
        opt.step()
    d_before = opt.param_groups[0]["d"].clone()
    for _ in range(20):  # then every gradient opposes s: <g, s> < 0, the estimate turns negative
        s = opt.state[p]["s"]
        _set_grads([p], [-s / s.norm() * direction.norm()])
        before = p.detach().clone()
        opt.step()
        d = opt.param_groups[0]["d"]
        assert torch.isfinite(d) and d >= d_before, f"d went from {float(d_before)} to {float(d)}"
        assert not torch.equal(p, before), "the parameters stopped moving"
        d_before = d.clone()
    assert float(_estimate_numerator(opt, p)) < 0, "the test did not produce a negative estimate"


def _estimate_numerator(opt, p) -> torch.Tensor:
    """The numerator of d-hat (its denominator is a norm, positive)."""
    group = opt.param_groups[0]
    if isinstance(opt, DAdaptAdaGrad):
        state = opt.state[p]
        return (state["s"] ** 2 / (state["alpha"].sqrt() + group["eps"])).sum() - group["gsq_weighted"]
    return group["numerator_weighted"]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_d_never_decreases_with_noisy_gradients(cls, foreach) -> None:
    gen = torch.Generator().manual_seed(1)
    params, loss = quadratic()
    opt = cls(params, foreach=foreach)
    previous = 1e-6
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        for p in params:
            p.grad.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        opt.step()
        d = float(opt.param_groups[0]["d"])
        assert math.isfinite(d) and d >= previous
        previous = d


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_tiny_gradients_in_float32_do_not_underflow_the_estimate(cls, foreach) -> None:
    """Gradients ~1e-30 in float32: no NaN, d finite and >= d0 (the reference's SGD divides by 0)."""
    params, loss = quadratic(torch.float32, scale=1e-30)
    opt = cls(params, foreach=foreach)
    for _ in range(30):
        take_step(opt, loss)
        d = opt.param_groups[0]["d"]
        assert torch.isfinite(d) and d >= torch.tensor(1e-6, dtype=torch.float32)
        assert all(torch.isfinite(p).all() for p in params)
        for state in opt.state.values():
            assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("foreach", FOREACH)
def test_sgd_is_scale_free_even_at_1e_minus_30(foreach) -> None:
    """DAdaptSGD is invariant to the gradients' scale; ||g0|| is summed in float64, so scaling the
    loss by 1e-30 in float32 leaves the trajectory unchanged (the reference raises ZeroDivisionError)."""
    runs = []
    for scale in (1.0, 1e-30):
        params, loss = quadratic(torch.float32, scale=scale)
        opt = DAdaptSGD(params, momentum=0.9, foreach=foreach)
        for _ in range(30):
            take_step(opt, loss)
        runs.append(([p.detach().clone() for p in params], float(opt.param_groups[0]["d"])))
    (xs, d1), (ys, d2) = runs
    assert d1 > 1e-3 and d2 == pytest.approx(d1, rel=1e-4)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)

    params, loss = quadratic(torch.float32, scale=1e-30)
    ref = dadaptation.DAdaptSGD(params)
    loss().backward()
    with pytest.raises(ZeroDivisionError):
        ref.step()


def test_sgd_with_a_zero_first_gradient_does_not_divide_by_zero() -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = DAdaptSGD([p])
    p.grad = torch.zeros_like(p)
    opt.step()
    for _ in range(20):
        p.grad = p.detach().clone()
        opt.step()
    assert torch.isfinite(p).all() and float(p.detach().norm()) < 2.0
    assert float(opt.param_groups[0]["g0_norm"]) == 1.0


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_bfloat16_parameters_train(cls, foreach) -> None:
    params, loss = quadratic(torch.bfloat16)
    opt = cls(params, foreach=foreach)
    first = loss().item()
    for _ in range(160):  # DAdaptAdaGrad is the slowest to adapt
        take_step(opt, loss)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert all(t.dtype == torch.bfloat16 for st in opt.state.values() for t in st.values())
    assert loss().item() < 0.1 * first
    assert float(opt.param_groups[0]["d"]) > 1e-2


def _bf16_quadratic(seed=0):
    """bfloat16 weights in [0.5, 1.5) (none near 0, where tiny updates are representable)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((0.5 + torch.rand(shape, generator=g)).to(torch.bfloat16)) for shape in ((8, 4), (6,))]
    targets = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]

    def loss():
        return sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(params, targets))

    return params, loss


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtypes, expected", [
    ((torch.float32,), 1e-6),
    ((torch.float64,), 1e-6),
    ((torch.float32, torch.float64), 1e-6),
    ((torch.bfloat16,), 1e-3),
    ((torch.float16,), 1e-3),
    ((torch.float32, torch.bfloat16), 1e-3),  # any 16-bit parameter of the optimizer
])
def test_default_d0_follows_the_parameters_dtype(cls, dtypes, expected) -> None:
    params = [torch.nn.Parameter(torch.ones(3, dtype=dt)) for dt in dtypes]
    opt = cls([{"params": [p]} for p in params])  # also across groups
    assert [group["d0"] for group in opt.param_groups] == [expected] * len(params)
    assert all(type(group["d0"]) is float for group in opt.param_groups)
    assert opt.defaults["d0"] is None
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # d starts at the d0 chosen (and grows from it)
    d = opt.param_groups[0]["d"]
    assert d >= torch.tensor(expected, dtype=d.dtype)
    # a number is used as given, whatever the dtype
    assert cls(params, d0=1e-5).param_groups[0]["d0"] == 1e-5
    assert cls(params, d0=1e-6).param_groups[0]["d0"] == 1e-6


@pytest.mark.parametrize("cls", CLASSES)
def test_d0_given_in_one_group_is_everyones_and_later_groups_take_group_0s(cls) -> None:
    name = cls.__name__
    a, b, c = (torch.nn.Parameter(torch.ones(3, dtype=dt)) for dt in (torch.float32, torch.bfloat16, torch.float32))
    opt = cls([{"params": [a]}, {"params": [b], "d0": 1e-4}])  # the other group's None takes it
    assert [group["d0"] for group in opt.param_groups] == [1e-4, 1e-4]
    opt = cls([a])  # float32: 1e-6; a bfloat16 group added later does not change the shared start
    opt.add_param_group({"params": [b]})
    assert [group["d0"] for group in opt.param_groups] == [1e-6, 1e-6]
    with pytest.raises(InvalidArgumentError, match=r"d0 = 0.001 in param group 2 differs from 0.0001 in group 1"):
        cls([{"params": [a]}, {"params": [b], "d0": 1e-4}, {"params": [c], "d0": 1e-3}])
    with pytest.raises(InvalidArgumentError, match=r"d0 = 0.001 in param group 1 differs from 1e-06 in group 0"):
        opt = cls([a])
        opt.add_param_group({"params": [b], "d0": 1e-3})
    with pytest.raises(InvalidArgumentError, match=rf"^{name}: d0 = 0.0 is invalid; allowed: 0 < d0"):
        cls([b], d0=0.0)
    with pytest.raises(InvalidArgumentError, match=rf"^{name}: d0 = -1.0 is invalid"):
        cls([{"params": [a]}, {"params": [b], "d0": -1.0}])


@pytest.mark.parametrize("cls, default_ratio", [(DAdaptSGD, 0.1), (DAdaptAdam, 0.7), (DAdaptAdaGrad, 0.98)])
def test_bfloat16_first_steps_round_away_with_d0_1e6_and_move_sooner_with_the_default(cls, default_ratio) -> None:
    """With d0 = 1e-6 the first update (<= ~3e-6 per coordinate) is below bfloat16's spacing
    (2^-8 relative to the weight): x stays at x0. SGD and Adam then grow d from the sum of the
    gradients and start late; AdaGrad's estimate needs x to move, so x never leaves x0 and the
    loss is exactly unchanged. The default for bfloat16 parameters (1e-3) starts sooner."""
    def run(d0):
        params, loss_fn = _bf16_quadratic()
        start = [p.detach().clone() for p in params]
        opt = cls(params, d0=d0)
        first, moved_at = float(loss_fn().detach()), math.inf
        for k in range(20):
            take_step(opt, loss_fn)
            if moved_at == math.inf and not all(torch.equal(p, s) for p, s in zip(params, start)):
                moved_at = k + 1
        return opt, moved_at, float(loss_fn().detach()) / first

    opt, small_moved_at, small_ratio = run(1e-6)
    assert small_moved_at > 1
    if cls is DAdaptAdaGrad:
        assert small_moved_at == math.inf and small_ratio == 1.0 and float(opt.param_groups[0]["d"]) < 1e-4
    opt, moved_at, ratio = run(None)
    assert opt.param_groups[0]["d0"] == 1e-3
    assert moved_at < small_moved_at and ratio < min(default_ratio, small_ratio)
    assert float(opt.param_groups[0]["d"]) > 1e-2, "d should have grown"


@pytest.mark.parametrize("cls", CLASSES)
def test_the_chosen_d0_round_trips_through_state_dict(cls) -> None:
    """The checkpoint's d0 (a number in the param groups) is the one a resumed run uses, whatever
    the new optimizer chose: the resumed run equals the uninterrupted one."""
    params, loss_fn = _bf16_quadratic()
    opt = cls(params)
    for _ in range(3):
        take_step(opt, loss_fn)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["d0"] == 1e-3
    start = [p.detach().clone() for p in params]
    for _ in range(3):
        take_step(opt, loss_fn)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    resumed = cls(params, d0=1e-6)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["d0"] == 1e-3
    for _ in range(3):
        take_step(resumed, loss_fn)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


# ----------------------------------------------------------------------------- state, step size, options


@pytest.mark.parametrize("cls, kwargs, keys", [
    (DAdaptSGD, {}, {"s"}),
    (DAdaptSGD, dict(momentum=0.9), {"s", "x0"}),
    (DAdaptAdam, {}, {"s", "exp_avg", "exp_avg_sq"}),
    (DAdaptAdaGrad, {}, {"alpha", "s", "x0"}),
])
def test_state_is_no_larger_than_the_reference(cls, kwargs, keys) -> None:
    params, loss = quadratic()
    opt = cls(params, **kwargs)
    take_step(opt, loss)
    for p in params:
        assert set(opt.state[p]) == keys
        assert all(t.shape == p.shape for t in opt.state[p].values())


def test_sgd_momentum_switched_on_later_starts_from_the_right_origin() -> None:
    """x0 is created as x + s when momentum is switched on: z = x0 - s is then the current x."""
    params, loss = quadratic()
    opt = DAdaptSGD(params)
    for _ in range(5):
        take_step(opt, loss)
    opt.param_groups[0]["momentum"] = 0.9
    opt.zero_grad()
    loss().backward()
    xs = [p.detach().clone() for p in params]
    opt.step()
    eta = opt.param_groups[0]["effective_lr"]
    for p, x in zip(params, xs):  # x_new = 0.9 x + 0.1 (x - eta g) = x - 0.1 eta g
        torch.testing.assert_close(p.detach(), x - 0.1 * eta * p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", FOREACH)
def test_published_step_sizes(foreach) -> None:
    params, loss = quadratic()
    sgd = DAdaptSGD(two_groups(params, 1.0, 0.5), foreach=foreach)
    for _ in range(4):
        d, g0 = sgd.param_groups[0].get("d", 1e-6), sgd.param_groups[0].get("g0_norm")
        take_step(sgd, loss)
    assert torch.allclose(sgd.param_groups[1]["effective_lr"], 0.5 * d / g0)

    params, loss = quadratic()
    adam = DAdaptAdam(params, use_bias_correction=True, betas=(0.9, 0.99), foreach=foreach)
    for k in range(4):
        d = adam.param_groups[0].get("d", torch.tensor(1e-6, dtype=torch.float64))
        take_step(adam, loss)
    bias = math.sqrt(1 - 0.99 ** 4) / (1 - 0.9 ** 4)
    assert torch.allclose(adam.param_groups[0]["effective_lr"], d * bias)

    params, loss = quadratic()
    ada = DAdaptAdaGrad(two_groups(params, 1.0, 2.0), foreach=foreach)
    for _ in range(4):
        d = ada.param_groups[0].get("d", torch.tensor(1e-6, dtype=torch.float64))
        take_step(ada, loss)
    assert torch.allclose(ada.param_groups[1]["effective_lr"], 2.0 * d)


def test_shared_options_must_match_across_groups() -> None:
    params, _ = quadratic()
    with pytest.raises(InvalidArgumentError, match=r"betas = \(0.8, 0.999\) in param group 1 differs"):
        DAdaptAdam([{"params": params[:2]}, {"params": params[2:], "betas": (0.8, 0.999)}])
    with pytest.raises(InvalidArgumentError, match=r"d0 = 0.001 in param group 1 differs"):
        DAdaptSGD([{"params": params[:2]}, {"params": params[2:], "d0": 1e-3}], d0=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"DAdaptAdaGrad: eps = -1.0 is invalid"):
        DAdaptAdaGrad([{"params": params[:2]}, {"params": params[2:], "eps": -1.0}])
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = DAdaptAdam(params[:2])
    with pytest.raises(InvalidArgumentError, match=r"growth_rate = 2.0 in param group 1 differs"):
        opt.add_param_group({"params": [p], "growth_rate": 2.0})
    # changed in one group only after construction: the step refuses instead of using group 0's
    params, loss = quadratic()
    opt = DAdaptAdam(two_groups(params))
    opt.param_groups[1]["betas"] = (0.5, 0.999)
    loss().backward()
    with pytest.raises(InvalidArgumentError, match=r"betas = \(0.5, 0.999\) in param group 1 differs"):
        opt.step()


def test_a_group_added_later_shares_d() -> None:
    params, loss = quadratic()
    opt = DAdaptAdam(params[:2])
    for _ in range(5):
        take_step(opt, loss)
    opt.add_param_group({"params": params[2:]})
    assert opt.param_groups[1]["d"] is opt.param_groups[0]["d"]
    take_step(opt, loss)
    assert torch.equal(opt.param_groups[1]["d"], opt.param_groups[0]["d"])
    assert params[2] in opt.state


@pytest.mark.parametrize("cls", CLASSES)
def test_learns_on_a_small_network(cls) -> None:
    """Goes downhill on a (non-convex) two-layer network with default arguments."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = cls(model.parameters(), **({"momentum": 0.9} if cls is DAdaptSGD else {}))

    def loss():
        return ((model(x) - y) ** 2).mean()

    first = loss().item()
    for _ in range(150):
        take_step(opt, loss)
    assert loss().item() < 0.5 * first


def test_constructor_prints_nothing() -> None:
    """Our constructor is silent (the reference prints for decouple=True)."""
    params, _ = quadratic()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        DAdaptAdam(params, decouple=True, weight_decay=0.1)
    assert out.getvalue() == ""


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, dict(momentum=0.9, weight_decay=0.01)), (DAdaptSGD, {}),
                                         (DAdaptAdam, dict(weight_decay=0.01)),
                                         (DAdaptAdam, dict(weight_decay=0.01, decouple=True)),
                                         (DAdaptAdaGrad, dict(momentum=0.5, weight_decay=0.01))])
def test_cpu_blocks_match_the_per_parameter_path(cls, kwargs, monkeypatch) -> None:
    """On CPU the vectorized path works block by block (large tensors cut into flat views, small
    ones grouped); with tiny blocks, and a non-contiguous parameter that is never cut, it still
    matches the per-parameter loop."""
    import tuneless.optim._batched as batched

    def build():
        params, loss = quadratic()
        gen = torch.Generator().manual_seed(3)
        odd = torch.nn.Parameter(torch.randn(3, 5, generator=gen, dtype=torch.float64).t())  # non-contiguous
        assert not odd.is_contiguous()

        def total():
            return loss() + (odd - 0.5).pow(2).sum()

        return params + [odd], total

    monkeypatch.setattr(batched, "CPU_BLOCK_NUMEL", 5)
    runs = []
    for foreach in (True, False):
        params, total = build()
        opt = cls(two_groups(params), foreach=foreach, **kwargs)
        for _ in range(15):
            take_step(opt, total)
        runs.append(([p.detach().clone() for p in params], opt))
    (xs, a), (ys, b) = runs
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.param_groups[0]["d"], b.param_groups[0]["d"], rtol=1e-10, atol=0)
    assert float(a.param_groups[0]["d"]) > 1e-6
    blocks = batched.cache_blocks([p.detach() for p in xs], [p.detach() for p in xs], None)
    assert len(blocks) > len(xs) and all(entry is None for _, _, entry in blocks)
    assert all(sum(t.numel() for t in block[0]) <= 5 for block in blocks if block[0][0].is_contiguous())


def test_sgd_steps_without_any_gradient_do_not_fix_g0() -> None:
    """A step where no parameter has a gradient changes nothing; ||g0|| comes from the first real one."""
    params, loss = quadratic()
    opt = DAdaptSGD(params)
    opt.step()  # no gradients at all
    assert opt.param_groups[0]["k"] == 0
    opt.zero_grad()
    loss().backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    opt.step()
    torch.testing.assert_close(opt.param_groups[0]["g0_norm"], norm, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, dict(momentum=0.9, weight_decay=0.1)),
                                         (DAdaptAdam, dict(use_bias_correction=True, weight_decay=0.1)),
                                         (DAdaptAdaGrad, dict(weight_decay=0.1))])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_no_host_sync_from_the_first_step_on(cls, kwargs, foreach, skip_nonfinite) -> None:
    """The first step too (||g0||, state creation) reads nothing back from the device, except
    DAdaptSGD's step that measures ||g0|| when non-finite steps are skipped: it reads whether
    that step was finite (one read, that step only; see test_a_nonfinite_first_step_is_skipped)."""
    from tests.test_contract import SyncCounter

    params, loss = quadratic()
    opt = cls(two_groups(params, 1.0, 0.5), foreach=foreach, skip_nonfinite=skip_nonfinite, **kwargs)
    for i in range(3):
        opt.zero_grad()
        loss().backward()
        with SyncCounter() as counter:
            opt.step()
        assert counter.count == (1 if i == 0 and cls is DAdaptSGD and skip_nonfinite else 0), counter.sites


@pytest.mark.parametrize("cls, kwargs", [(DAdaptSGD, {}), (DAdaptSGD, dict(momentum=0.9, weight_decay=0.1)),
                                         (DAdaptAdam, dict(use_bias_correction=True, weight_decay=0.1)),
                                         (DAdaptAdam, dict(weight_decay=0.1, decouple=True)),
                                         (DAdaptAdaGrad, {}), (DAdaptAdaGrad, dict(momentum=0.5, weight_decay=0.1))])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("bad_steps", [1, 2])
def test_a_nonfinite_first_step_is_skipped(cls, kwargs, foreach, bad_steps) -> None:
    """NaN gradients at the first steps (before any state exists): the run equals the run that
    starts that many steps later, bit for bit (DAdaptSGD measures ||g0|| at the first finite step,
    as a fresh run does, not at the skipped one)."""
    runs = []
    for skipped in (True, False):
        params, loss = quadratic()
        opt = cls(two_groups(params, 1.0, 0.5), foreach=foreach, **kwargs)
        for i in range(6):
            opt.zero_grad(set_to_none=True)
            loss().backward()
            if i < bad_steps:
                if skipped:
                    continue
                params[0].grad[0, 0] = float("nan")
            opt.step()
        runs.append((params, opt))
    (ref, ref_opt), (params, opt) = runs
    for a, b in zip(ref, params):
        assert torch.equal(a, b)
    assert opt.skipped_steps() == [bad_steps] * 2
    for key in ("d", "k", "effective_lr", *(["g0_norm"] if cls is DAdaptSGD else [])):
        for g_ref, g in zip(ref_opt.param_groups, opt.param_groups):
            assert torch.equal(torch.as_tensor(g_ref[key]), torch.as_tensor(g[key])), key
    for p_ref, p in zip(ref, params):
        for key, value in ref_opt.state[p_ref].items():
            assert torch.equal(value, opt.state[p][key]), key


@pytest.mark.parametrize("cls", CLASSES)
def test_a_checkpoint_with_a_plain_int_step_counter_resumes(cls) -> None:
    """Checkpoints written before k became a 0-d tensor (k a plain int, no ``g0_measured``) resume
    exactly where an uninterrupted run goes."""
    params, loss = quadratic()
    opt = cls(params, **({"use_bias_correction": True} if cls is DAdaptAdam else {}))
    for _ in range(4):
        take_step(opt, loss)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["k"] = int(group["k"])
        group.pop("g0_measured", None)
    expected = [p.detach().clone() for p in params]
    for _ in range(3):
        take_step(opt, loss)
    expected, after = [p.detach().clone() for p in params], expected

    params2, loss2 = quadratic()
    with torch.no_grad():
        for p, a in zip(params2, after):
            p.copy_(a)
    resumed = cls(params2, **({"use_bias_correction": True} if cls is DAdaptAdam else {}))
    resumed.load_state_dict(saved)
    for _ in range(3):
        take_step(resumed, loss2)
    for p, e in zip(params2, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=0)
    assert float(resumed.param_groups[0]["k"]) == 7.0
