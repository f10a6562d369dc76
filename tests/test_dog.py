"""DoG, L-DoG, DoWG and the polynomial-decay averager: the deliberate fixes and the edge cases.

Each fix over the authors' packages (dog-optimizer 1.0.3, dowgopt 0.13) has a test here; where
the reference's behaviour is what is fixed, the test shows it too.
"""

from __future__ import annotations

import io

import pytest
import torch

import tuneless
from tests.test_contract import SyncCounter
from tuneless import DoG, DoWG, LDoG
from tuneless.averaging import PolynomialDecayAverager

ALL = [DoG, LDoG, DoWG]
F64 = torch.float64


class Quad:
    """Three tensors, a smooth non-convex loss with minimum 0 (the contract suite's model, simplified)."""

    def __init__(self, dtype=F64, seed=0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter((0.5 * torch.randn(4, 3, generator=g, dtype=F64)).to(dtype))
        self.b = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
        self.v = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=F64).to(dtype))
        self.x = torch.randn(16, 3, generator=g, dtype=F64).to(dtype)
        self.y = torch.tanh(self.x.to(F64) @ torch.randn(4, 3, generator=g, dtype=F64).T + 0.1).to(dtype)
        self.target = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=F64).to(dtype)

    @property
    def params(self):
        return [self.w, self.b, self.v]

    def loss(self) -> torch.Tensor:
        pred = torch.tanh(self.x @ self.w.T + self.b)
        return ((pred - self.y) ** 2).float().mean() + 0.5 * ((self.v - self.target) ** 2).float().sum()


def train(opt, model, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model.loss()
        loss.backward()
        opt.step()
    return model.loss().item()


# ----------------------------------------------------------------------------- parameters without gradient


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("foreach", [True, False])
def test_parameter_without_gradient_is_skipped_and_the_others_step_as_without_it(cls, foreach) -> None:
    with_frozen, alone = Quad(), Quad()
    frozen = torch.nn.Parameter(torch.full((5,), 3.0, dtype=F64))
    opt = cls([{"params": with_frozen.params[:2] + [frozen]}, {"params": [with_frozen.v]}], foreach=foreach)
    ref = cls([{"params": alone.params[:2]}, {"params": [alone.v]}], foreach=foreach)
    train(opt, with_frozen, 30)
    train(ref, alone, 30)
    assert torch.equal(frozen, torch.full((5,), 3.0, dtype=F64)) and frozen.grad is None
    assert "displacement" not in opt.state[frozen]
    for a, b in zip(with_frozen.params, alone.params):  # the frozen tensor counts nowhere
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_references_crash_on_a_parameter_without_gradient() -> None:
    dog = pytest.importorskip("dog")
    dowg = pytest.importorskip("dowg")
    for ref_cls, error in ((dog.DoG, AttributeError), (dog.LDoG, TypeError), (dowg.DoWG, TypeError)):
        model = Quad()
        frozen = torch.nn.Parameter(torch.ones(3, dtype=F64))
        opt = ref_cls(model.params + [frozen])
        model.loss().backward()
        with pytest.raises(error):
            opt.step()


@pytest.mark.parametrize("cls", ALL)
def test_a_parameter_that_gets_a_gradient_later_starts_from_there(cls) -> None:
    model = Quad()
    late = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=F64))
    opt = cls(model.params + [late])
    train(opt, model, 5)
    assert torch.equal(late, torch.tensor([2.0, -1.0], dtype=F64))
    for _ in range(40):
        opt.zero_grad()
        (model.loss() + ((late - 0.5) ** 2).sum()).backward()
        opt.step()
    assert ((late - 0.5) ** 2).sum() < 2.0 * 4.5  # it moved toward 0.5 (started at 4.5 away)
    state = opt.state[late]["displacement"]
    torch.testing.assert_close(late.detach() - state, torch.tensor([2.0, -1.0], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("first_bad", [0, 5], ids=["first-step", "joining-late"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("cls", ALL)
def test_a_tensor_first_stepped_at_a_skipped_step_starts_as_if_at_the_next(cls, foreach, first_bad) -> None:
    """A NaN step that is the first one for a tensor (the very first step, or a parameter that
    gets its first gradient then) creates its state but must change nothing: the run equals the
    one that never called that step. The case that needs care: that tensor's r_eps (from x_0)
    must still reach r̄, since at the next step it is no longer new."""
    def run(skip: bool):
        model = Quad()
        late = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=F64))
        opt = cls([{"params": model.params[:2] + [late]}, {"params": [model.v]}], foreach=foreach)
        for step in range(10):
            opt.zero_grad(set_to_none=True)
            loss = model.loss() + (((late - 0.5) ** 2).sum() if step >= first_bad else 0.0)
            loss.backward()
            if step == first_bad:
                if skip:
                    continue
                (late.grad if late.grad is not None else model.w.grad)[0] = float("nan")
            opt.step()
        return model.params + [late], opt

    (ref, ref_opt), (ps, opt) = run(True), run(False)
    for a, b in zip(ref, ps):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    for a, b in zip(ref_opt.param_groups, opt.param_groups):
        for key in cls._GROUP_TENSOR_KEYS + ("effective_lr",):
            assert torch.equal(a[key], b[key]), (key, a[key], b[key])
    assert opt.skipped_steps() == [1, 1]


# ----------------------------------------------------------------------------- the state: plain torch


@pytest.mark.parametrize("cls", ALL)
def test_state_is_plain_torch_and_x0_is_recoverable(cls) -> None:
    model = Quad()
    x0 = [p.detach().clone() for p in model.params]
    opt = cls([{"params": model.params[:2]}, {"params": [model.v], "lr": 0.5}])
    train(opt, model, 25)
    sd = opt.state_dict()
    for i, p in enumerate(model.params):
        disp = sd["state"][i]["displacement"]
        assert disp.dtype == p.dtype and disp.shape == p.shape
        # x_0 = x - (x - x_0): the starting point, to rounding
        torch.testing.assert_close(p.detach() - disp, x0[i], rtol=0, atol=1e-12)
    for group in sd["param_groups"]:  # only numbers and small tensors of statistics
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                assert value.dim() <= 1 and value.numel() <= 3, key
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", ALL)
def test_resume_with_groups_frozen_params_and_weight_decay_is_bit_exact(cls) -> None:
    def build(model, frozen):
        return cls([{"params": model.params[:2] + [frozen], "weight_decay": 0.01}, {"params": [model.v], "lr": 0.7}])

    full, frozen_full = Quad(), torch.nn.Parameter(torch.ones(2, dtype=F64))
    train(build(full, frozen_full), full, 10)
    part, frozen_part = Quad(), torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = build(part, frozen_part)
    train(opt, part, 6)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(part, frozen_part)
    resumed.load_state_dict(torch.load(buffer, weights_only=True, map_location="cpu"))
    train(resumed, part, 4)
    for a, b in zip(full.params, part.params):
        assert torch.equal(a, b)


def test_a_state_dict_taken_earlier_is_not_changed_by_later_steps() -> None:
    model = Quad()
    opt = DoG(model.params)
    train(opt, model, 3)
    sd = opt.state_dict()
    rbar, grad_sum = sd["param_groups"][0]["rbar"].clone(), sd["param_groups"][0]["grad_sq_sum"].clone()
    train(opt, model, 3)
    assert torch.equal(sd["param_groups"][0]["rbar"], rbar)
    assert torch.equal(sd["param_groups"][0]["grad_sq_sum"], grad_sum)


# ----------------------------------------------------------------------------- lr, init_eta, groups


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_lr_multiplies_init_eta_too(cls) -> None:
    moves = []
    for lr in (1.0, 0.25):
        model = Quad()
        start = model.w.detach().clone()
        opt = cls(model.params, lr=lr, init_eta=1e-2)
        model.loss().backward()
        grad = model.w.grad.clone()
        opt.step()
        torch.testing.assert_close(model.w - start, -lr * 1e-2 * grad, rtol=1e-12, atol=1e-16)
        moves.append(model.w.detach() - start)
    torch.testing.assert_close(moves[1], 0.25 * moves[0], rtol=1e-12, atol=1e-16)


def test_lr_zero_is_allowed_where_the_reference_refuses_it() -> None:
    dog = pytest.importorskip("dog")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        dog.DoG(Quad().params, lr=0.0)
    for cls in ALL:
        model = Quad()
        before = [p.detach().clone() for p in model.params]
        train(cls(model.params, lr=0.0), model, 3)
        assert all(torch.equal(a, b) for a, b in zip(model.params, before))


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_init_eta_is_kept_until_the_group_moves(cls) -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    opt = cls([w], init_eta=0.1)
    w.grad = torch.zeros(2, dtype=F64)  # a zero first gradient: nothing moves
    opt.step()
    assert torch.equal(w, torch.tensor([1.0, 2.0], dtype=F64))
    w.grad = torch.tensor([1.0, 0.0], dtype=F64)
    opt.step()  # still init_eta (the reference would now divide a zero distance: step 0 forever)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 2.0], dtype=F64), rtol=0, atol=1e-15)
    assert float(opt.param_groups[0]["effective_lr"]) == pytest.approx(0.1, rel=1e-12)


def test_dog_groups_are_independent() -> None:
    together, alone = Quad(), Quad()
    opt = DoG([{"params": together.params[:2]}, {"params": [together.v], "lr": 0.3}])
    train(opt, together, 20)
    alone_opt = DoG(alone.params[:2])
    for _ in range(20):
        alone_opt.zero_grad()
        alone.loss().backward()
        alone_opt.step()
    torch.testing.assert_close(together.w, alone.w, rtol=1e-13, atol=0)
    torch.testing.assert_close(together.b, alone.b, rtol=1e-13, atol=1e-16)


def test_dowg_is_global_over_groups() -> None:
    """Scaling the second group's gradient changes the first group's steps (one shared v)."""
    def first_group_after(scale):
        a = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=F64))
        b = torch.nn.Parameter(torch.tensor([2.0], dtype=F64))
        opt = DoWG([{"params": [a]}, {"params": [b], "lr": 0.5}])
        for _ in range(3):
            opt.zero_grad()
            ((a ** 2).sum() + scale * (b ** 2).sum()).backward()
            opt.step()
        groups = opt.param_groups
        assert groups[0]["rbar_sq"] is groups[1]["rbar_sq"] and groups[0]["v"] is groups[1]["v"]
        assert float(groups[1]["effective_lr"]) == pytest.approx(0.5 * float(groups[0]["effective_lr"]), rel=1e-12)
        return a.detach().clone()

    assert not torch.allclose(first_group_after(1.0), first_group_after(10.0))


@pytest.mark.parametrize("cls", ALL)
def test_published_step_size_is_the_formula(cls) -> None:
    model = Quad()
    opt = cls([{"params": model.params[:2]}, {"params": [model.v], "lr": 0.5}])
    train(opt, model, 7)
    opt.zero_grad()
    model.loss().backward()
    grads = [[p.grad.clone() for p in group["params"]] for group in opt.param_groups]
    before = [p.detach().clone() for p in model.params]
    opt.step()
    moved = [p.detach() - b for p, b in zip(model.params, before)]
    for group, group_grads in zip(opt.param_groups, grads):
        if cls is DoWG:
            expected = group["lr"] * group["rbar_sq"] / (group["v"].sqrt() + group["eps"])
        else:
            expected = group["lr"] * group["rbar"] / group["grad_sq_sum"].sqrt()
            if cls is LDoG:  # the SGD step size that moves as far: ||update|| / ||g||
                sq = torch.stack([(g ** 2).sum() for g in group_grads])
                expected = ((expected ** 2 * sq).sum() / sq.sum()).sqrt()
        torch.testing.assert_close(group["effective_lr"], expected, rtol=1e-12, atol=0)
    # ... which is ||x_{t+1} - x_t|| / ||g|| for every method
    for group, group_grads, delta in ((opt.param_groups[0], grads[0], moved[:2]), (opt.param_groups[1], grads[1], moved[2:])):
        norm = lambda ts: torch.sqrt(sum((t ** 2).sum() for t in ts))  # noqa: E731
        torch.testing.assert_close(group["effective_lr"], norm(delta) / norm(group_grads), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- gradients, dtypes, edge cases


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("foreach", [True, False])
def test_weight_decay_leaves_the_gradient_alone(cls, foreach) -> None:
    model = Quad()
    opt = cls(model.params, weight_decay=0.1, foreach=foreach)
    model.loss().backward()
    grads = [p.grad.clone() for p in model.params]
    opt.step()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.params, grads))


@pytest.mark.parametrize("cls", ALL)
def test_bfloat16_trains_like_float64(cls) -> None:
    """With ``reps_rel=1e-6`` (given: the bfloat16 default is 1e-3) the first DoG steps are ~1e-6
    of the weights, far below a bfloat16 ulp (~4e-3): the weights do not move at first, but the
    displacement does, so the step size grows until they do. (A distance re-read from bfloat16
    weights would stay 0 and DoG would never move.)"""
    kwargs = {} if cls is DoWG else {"reps_rel": 1e-6}
    model = Quad(torch.bfloat16)
    opt = cls(model.params, **kwargs)
    w0 = model.w.detach().clone()
    opt.zero_grad()
    model.loss().backward()
    opt.step()
    if cls is not DoWG:  # DoWG's first step is absolute (eps = 1e-4) and may move bf16 weights
        assert torch.equal(model.w, w0)  # rounded away...
        assert opt.state[model.w]["displacement"].abs().sum() > 0  # ...but counted
    end = train(opt, model, 99)
    reference = Quad(F64)
    end64 = train(cls(reference.params, **kwargs), reference, 100)
    assert end < 0.05 * Quad(F64).loss().item()
    assert end == pytest.approx(end64, rel=0.1, abs=2e-3), (end, end64)
    for p in model.params:
        assert p.dtype == torch.bfloat16 and opt.state[p]["displacement"].dtype == torch.bfloat16
    key = "rbar_sq" if cls is DoWG else "rbar"
    assert opt.param_groups[0][key].dtype == torch.float32


def _first_rbar(cls, groups, **kwargs) -> list[torch.Tensor]:
    """r̄ of each group after one step from x_0 with gradients of ones (r̄ = r_eps then)."""
    params = [p for group in groups for p in group["params"]]
    opt = cls(groups, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(group["reps_rel"] == kwargs.get("reps_rel") for group in opt.param_groups)  # None is kept
    return [group["rbar"].double() for group in opt.param_groups]


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_reps_rel_default_follows_the_parameters_dtype(cls) -> None:
    """reps_rel=None: 1e-6 (the reference's) for 32- and 64-bit parameters, 1e-3 for a group with
    a 16-bit parameter, where 1e-6 of the weights rounds away; a number is used as given."""
    def param(dtype, values=(3.0, -4.0)):  # ||x_0|| = 5: r_eps = reps_rel * 6
        return torch.nn.Parameter(torch.tensor(values, dtype=dtype))

    def expect(reps_rel, dtype, n=1):
        return torch.full((n,) if cls is LDoG else (), reps_rel * 6.0, dtype=dtype).double()

    for dtype, reps_rel in [(F64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 1e-3), (torch.float16, 1e-3)]:
        stat = F64 if dtype == F64 else torch.float32
        rbar, = _first_rbar(cls, [{"params": [param(dtype)]}])
        assert torch.equal(rbar, expect(reps_rel, stat)), (dtype, rbar)
        rbar, = _first_rbar(cls, [{"params": [param(dtype)]}], reps_rel=1e-6)  # as given, at any precision
        assert torch.equal(rbar, expect(1e-6, stat)), (dtype, rbar)
    # the group decides: a 16-bit parameter makes it 1e-3 for the whole group; other groups keep 1e-6
    mixed, plain = _first_rbar(cls, [{"params": [param(torch.float32), param(torch.bfloat16)]},
                                     {"params": [param(torch.float32)]}])
    if cls is DoG:  # ||x_0|| over the group: sqrt(50)
        assert float(mixed) == pytest.approx(1e-3 * (1.0 + 50 ** 0.5), rel=1e-6)
    else:
        assert torch.equal(mixed, expect(1e-3, torch.float32, 2))
    assert torch.equal(plain, expect(1e-6, torch.float32))


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("dtype, reps_rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_the_default_reps_rel_runs_as_the_number(cls, dtype, reps_rel) -> None:
    runs = []
    for kwargs in ({}, {"reps_rel": reps_rel}):
        model = Quad(dtype)
        train(cls(model.params, **kwargs), model, 10)
        runs.append([p.detach().clone() for p in model.params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_reps_rel_none_is_allowed_and_bad_values_are_refused() -> None:
    model = Quad()
    assert DoG(model.params).defaults["reps_rel"] is None
    assert LDoG(model.params, reps_rel=1e-4).defaults["reps_rel"] == 1e-4
    for bad in (0.0, -1e-6, float("nan"), float("inf"), "1e-6", True):
        with pytest.raises(tuneless.InvalidArgumentError,
                           match=r"^DoG: reps_rel = .* is invalid; allowed: 0 < reps_rel"):
            DoG(model.params, reps_rel=bad)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_growing_sums_are_float64(cls, dtype) -> None:
    """G (DoG, L-DoG) and v (DoWG) grow with every step: float64 whatever the parameters' dtype;
    r̄ and the step sizes stay in the statistics dtype (float32 here)."""
    model = Quad(dtype)
    opt = cls(model.params)
    train(opt, model, 3)
    group = opt.param_groups[0]
    sum_key, rbar_key = ("v", "rbar_sq") if cls is DoWG else ("grad_sq_sum", "rbar")
    assert group[sum_key].dtype == F64
    assert group[rbar_key].dtype == torch.float32 and group["effective_lr"].dtype == torch.float32
    if cls is not DoWG:
        assert group["eta"].dtype == torch.float32


@pytest.mark.parametrize("cls", ALL)
def test_an_aged_sum_still_takes_its_increments(cls) -> None:
    """float32 parameters: after the sums are scaled as by 10^7 steps, one more step adds what
    the formula says (float32 sums rounded the increment to a multiple of their ulp, ~the
    increment itself). tests/test_long_runs.py checks DoG and L-DoG over the contract rows."""
    model = Quad(torch.float32)
    opt = cls(model.params)
    train(opt, model, 3)
    group = opt.param_groups[0]
    key = "v" if cls is DoWG else "grad_sq_sum"
    aged = group[key] * (10**7 / 3)
    for g in opt.param_groups:  # DoWG: one shared v
        g[key] = aged
    opt.zero_grad()
    model.loss().backward()
    grads = [p.grad.double() for p in model.params]
    opt.step()
    if cls is DoG:
        expected = sum((g * g).sum() for g in grads)
    elif cls is LDoG:
        expected = torch.stack([(g * g).sum() for g in grads])
    else:  # v_t = v_{t-1} + r̄_t² ||g_t||²
        expected = group["rbar_sq"].double() * sum((g * g).sum() for g in grads)
    torch.testing.assert_close(group[key] - aged, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cls", ALL)
def test_a_float32_sum_from_an_older_checkpoint_is_taken_over(cls) -> None:
    """Checkpoints written before the sums were float64 hold them in float32: the run resumes
    and the sum is float64 from the next step on."""
    key = "v" if cls is DoWG else "grad_sq_sum"
    full, part = Quad(torch.float32), Quad(torch.float32)
    train(cls(full.params), full, 6)
    opt = cls(part.params)
    train(opt, part, 3)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group[key] = group[key].float()
    resumed = cls(part.params)
    resumed.load_state_dict(sd)
    train(resumed, part, 3)
    assert all(group[key].dtype == F64 for group in resumed.param_groups)
    for a, b in zip(full.params, part.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_mixed_dtypes_in_a_group_agree_between_implementations(cls) -> None:
    results = []
    for foreach in (True, False):
        model = Quad()
        with torch.no_grad():
            model.b.data = model.b.data.float()
        opt = cls(model.params, weight_decay=0.01, foreach=foreach)
        train(opt, model, 15)
        results.append([p.detach().double() for p in model.params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_zero_gradient_with_eps_zero_gives_a_zero_step_not_nan(cls) -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    opt = cls([w], eps=0.0)
    w.grad = torch.zeros(2, dtype=F64)
    opt.step()
    assert torch.equal(w, torch.tensor([1.0, 2.0], dtype=F64))
    assert float(opt.param_groups[0]["effective_lr"]) == 0.0


@pytest.mark.parametrize("cls", ALL)
def test_no_host_sync_with_frozen_params_weight_decay_and_groups(cls) -> None:
    for foreach in (True, False):
        model = Quad()
        frozen = torch.nn.Parameter(torch.ones(3, dtype=F64))
        opt = cls([{"params": model.params[:2] + [frozen], "weight_decay": 0.01}, {"params": [model.v], "lr": 0.5}],
                  foreach=foreach)
        train(opt, model, 1)
        opt.zero_grad()
        model.loss().backward()
        with SyncCounter() as counter:
            opt.step()
        assert counter.count == 0, f"{cls.__name__} foreach={foreach}: {counter.count} syncs"


@pytest.mark.parametrize("cls", ALL)
def test_one_reduction_of_a_fixed_length_per_step(cls) -> None:
    """Whichever gradients exist, a step reduces one vector whose length depends only on the groups."""
    model = Quad()
    opt = cls([{"params": model.params[:2]}, {"params": [model.v]}])
    lengths = []
    original = opt._global_sum

    def recording(partial):
        lengths.append(partial.numel())
        return original(partial)

    opt._global_sum = recording
    train(opt, model, 2)  # all gradients
    opt.zero_grad(set_to_none=True)
    model.v.grad = torch.ones_like(model.v)  # only the second group
    opt.step()
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradient at all
    assert len(lengths) == 4 and len(set(lengths)) == 1, lengths


def test_dowg_step_takes_a_closure_and_loss() -> None:
    dowg = pytest.importorskip("dowg")
    model = Quad()
    with pytest.raises(TypeError):
        dowg.DoWG(model.params).step(lambda: model.loss())  # the reference takes no closure
    opt = DoWG(model.params)

    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    loss = closure()
    assert opt.step(loss=loss) is loss


def test_registry_names() -> None:
    model = Quad()
    assert isinstance(tuneless.create("dog", model.params), DoG)
    assert isinstance(tuneless.create("ldog:reps_rel=1e-4", model.params), LDoG)
    assert isinstance(tuneless.create("dowg", model.params), DoWG)
    assert {"dog", "ldog", "dowg"} <= set(tuneless.learning_rate_free())


# ----------------------------------------------------------------------------- the averager


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)).double()


def _fit(net, opt, averager, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g, dtype=F64)
        opt.zero_grad()
        (net(x) ** 2).mean().backward()
        opt.step()
        averager.update()


@pytest.mark.parametrize("foreach", [True, False])
def test_averager_is_the_weighted_mean_of_iterates(foreach) -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    gamma = 2.0
    avg = PolynomialDecayAverager([w], gamma=gamma, foreach=foreach)
    values = [torch.randn(3, dtype=F64) for _ in range(6)]
    for value in values:
        with torch.no_grad():
            w.copy_(value)
        avg.update()
    # closed form: weights proportional to prod_{s>t} (1 - w_s) * w_t
    weights = []
    for t in range(1, 7):
        wt = (gamma + 1) / (t + gamma)
        for s in range(t + 1, 7):
            wt *= 1 - (gamma + 1) / (s + gamma)
        weights.append(wt)
    expected = sum(wt * v for wt, v in zip(weights, values))
    torch.testing.assert_close(avg.averages[0], expected, rtol=1e-12, atol=1e-14)
    assert sum(weights) == pytest.approx(1.0)


def test_average_parameters_swaps_in_and_back_exactly_even_on_error() -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)  # torch's optimizer: the averager works with any
    avg = PolynomialDecayAverager(net)
    _fit(net, opt, avg, 10)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    averages = [a.clone() for a in avg.averages]
    with avg.average_parameters():
        inside = net.state_dict()
        for name, a in zip(avg.names, averages):
            assert torch.equal(inside[name], a) and not torch.equal(inside[name], own[name])
        for misuse in (avg.update, avg.state_dict, avg.copy_to, lambda: avg.averages):
            with pytest.raises(RuntimeError, match="inside average_parameters"):
                misuse()
        assert torch.equal(inside["1.num_batches_tracked"], own["1.num_batches_tracked"])  # ints untouched
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):
        with avg.average_parameters():
            raise RuntimeError("boom")
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())


def test_averager_keeps_only_the_averaged_tensors() -> None:
    net = _net()
    net[0].weight.requires_grad_(False)  # frozen: not averaged
    avg = PolynomialDecayAverager(net)
    assert "0.weight" not in avg.names
    assert avg.names == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "1.running_mean", "1.running_var"]
    assert not any(isinstance(v, torch.nn.Module) for v in vars(avg).values())  # no copy of the module
    assert PolynomialDecayAverager(net, buffers=False).names == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


def test_averager_resumes_bit_exactly() -> None:
    net_a, net_b = _net(), _net()
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.1)
    avg_a = PolynomialDecayAverager(net_a)
    _fit(net_a, opt_a, avg_a, 12)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1)
    avg_b = PolynomialDecayAverager(net_b)
    _fit(net_b, opt_b, avg_b, 12)
    # a fresh averager loads the state of avg_b after 12 updates and continues on net_b
    buffer = io.BytesIO()
    torch.save(avg_b.state_dict(), buffer)
    buffer.seek(0)
    restored = PolynomialDecayAverager(net_b, gamma=1.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.gamma == 8.0 and restored.t == 13
    _fit(net_a, opt_a, avg_a, 5, seed=1)
    _fit(net_b, opt_b, restored, 5, seed=1)
    for a, b in zip(avg_a.averages, restored.averages):
        assert torch.equal(a, b)


def test_averager_with_dog_param_groups_and_bfloat16() -> None:
    model = Quad(torch.bfloat16)
    opt = DoG([{"params": model.params[:2]}, {"params": [model.v]}])
    avg = PolynomialDecayAverager(opt.param_groups)
    for _ in range(60):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        avg.update()
    assert all(a.dtype == torch.bfloat16 for a in avg.averages)
    last = model.loss().item()
    with torch.no_grad(), avg.average_parameters():
        averaged = model.loss().item()
    assert averaged < Quad(torch.bfloat16).loss().item() and abs(averaged - last) < 1.0


def test_averager_errors() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(tuneless.InvalidArgumentError,
                       match=r"^PolynomialDecayAverager: gamma = -1\.0 is invalid; allowed: 0 <= gamma "
                             r"\(recommended: 8\.0\)$"):
        PolynomialDecayAverager([w], gamma=-1.0)
    avg = PolynomialDecayAverager([w])
    with pytest.raises(RuntimeError, match=r"no average yet; call update\(\)"):
        with avg.average_parameters():
            pass
    with pytest.raises(tuneless.InvalidArgumentError, match=r"tensor '0' = torch.int64 is invalid"):
        PolynomialDecayAverager([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="nothing to average"):
        PolynomialDecayAverager(torch.nn.Linear(2, 2).requires_grad_(False), buffers=False)
    with pytest.raises(KeyError, match="missing"):
        avg.update()
        PolynomialDecayAverager([w, torch.nn.Parameter(torch.zeros(1))]).load_state_dict(avg.state_dict())


def test_averager_reset_and_copy_to() -> None:
    w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    avg = PolynomialDecayAverager([w], gamma=0.0)
    for value in (1.0, 3.0):
        with torch.no_grad():
            w.fill_(value)
        avg.update()
    assert avg.averages[0].tolist() == [2.0, 2.0]
    avg.reset()
    with torch.no_grad():
        w.fill_(10.0)
    avg.update()  # after reset the average restarts at the current point
    assert avg.averages[0].tolist() == [10.0, 10.0]
    with torch.no_grad():
        w.fill_(0.0)
    avg.copy_to()
    assert w.tolist() == [10.0, 10.0]
