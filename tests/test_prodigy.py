"""Prodigy: the deliberate differences from prodigyopt and the failures users hit, one test each."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tuneless import STEP_SIZE_KEY, InvalidArgumentError, Prodigy


def _quadratic_model(dtype=torch.float64, seed=0):
    """Three tensors (one starting at 0) and a smooth loss with minimum 0."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype)),
        torch.nn.Parameter(torch.zeros(4, dtype=dtype)),
        torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64).to(dtype)),
    ]
    targets = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) + 2 for p in params]

    def loss():
        return sum(((p - t) ** 2).sum() * (i + 1) for i, (p, t) in enumerate(zip(params, targets)))

    return params, loss


def _step(opt, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss.detach()


# ----------------------------------------------------------------------------- per-group lr and weight decay


def test_group_lr_multiplies_the_shared_d() -> None:
    params, loss_fn = _quadratic_model()
    opt = Prodigy([{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.25}])
    for _ in range(30):
        d_before = opt.param_groups[0].get("d", torch.tensor(1e-6, dtype=torch.float64)).clone()
        _step(opt, loss_fn)
        a, b = opt.param_groups
        assert torch.equal(a["d"], b["d"]) and torch.equal(a["d_max"], b["d_max"]), "d must be shared"
        torch.testing.assert_close(a[STEP_SIZE_KEY], d_before, rtol=1e-15, atol=0)
        torch.testing.assert_close(b[STEP_SIZE_KEY], 0.25 * d_before, rtol=1e-15, atol=0)
    assert float(opt.param_groups[0]["d"]) > 1e-3, "d should have grown"


def test_group_with_zero_lr_does_not_move_and_keeps_d_consistent() -> None:
    params, loss_fn = _quadratic_model()
    frozen_start = params[2].detach().clone()
    opt = Prodigy([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}])
    for _ in range(20):
        _step(opt, loss_fn)
    assert torch.equal(params[2], frozen_start)
    assert torch.equal(opt.param_groups[1][STEP_SIZE_KEY], torch.zeros((), dtype=torch.float64))
    # its moments follow the gradients (as torch.optim.Adam's do at lr = 0)
    assert opt.state[params[2]]["grad_sq_avg"].abs().sum() > 0


def test_all_lrs_zero_leaves_parameters_and_d_unchanged() -> None:
    params, loss_fn = _quadratic_model()
    opt = Prodigy(params)
    for _ in range(10):
        _step(opt, loss_fn)
    d = opt.param_groups[0]["d"].clone()
    snapshot = [p.detach().clone() for p in params]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for _ in range(5):
        _step(opt, loss_fn)
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot))
    # r and ||s||_1 both decay by beta3: d-hat, hence d, stays (up to rounding)
    assert float(opt.param_groups[0]["d"]) == pytest.approx(float(d), rel=1e-12, abs=0)


def test_weight_decay_is_per_group_and_applies_without_gradient_signal() -> None:
    """Zero gradients: ||s||_1 = 0, the reference returns early; here d stays d0 and decay applies."""
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Prodigy([{"params": [a], "weight_decay": 0.1}, {"params": [b]}])
    for _ in range(5):
        a.grad = torch.zeros_like(a)
        b.grad = torch.zeros_like(b)
        opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), (1 - 0.1 * 1e-6) ** 5, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    assert torch.equal(b, torch.ones(3, dtype=torch.float64))
    assert float(opt.param_groups[0]["d"]) == 1e-6 and torch.isfinite(opt.param_groups[0]["d_hat"])


def test_shared_hyperparameters_must_agree_across_groups() -> None:
    params, _ = _quadratic_model()
    with pytest.raises(InvalidArgumentError, match=r"d_coef = 2.0 in param group 1 differs from 1.0 in group 0"):
        Prodigy([{"params": params[:1]}, {"params": params[1:], "d_coef": 2.0}])
    with pytest.raises(InvalidArgumentError, match=r"weight_decay = -1.0 is invalid"):
        Prodigy([{"params": params[:1]}, {"params": params[1:], "weight_decay": -1.0}])
    Prodigy([{"params": params[:1], "eps": 1e-6, "weight_decay": 0.1, "decouple": False}, {"params": params[1:]}])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("foreach", [True, False])
def test_coupled_weight_decay_leaves_p_grad_alone(foreach) -> None:
    params, loss_fn = _quadratic_model()
    opt = Prodigy(params, weight_decay=0.5, decouple=False, foreach=foreach)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("foreach", [True, False])
def test_parameters_without_gradient(foreach) -> None:
    params, loss_fn = _quadratic_model()
    opt = Prodigy(params, foreach=foreach)
    opt.step()  # no gradient anywhere: nothing to do, no error
    assert len(opt.state) == 0
    for t in range(12):
        opt.zero_grad()
        loss_fn().backward()
        if t % 2:
            params[0].grad = None
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("foreach", [True, False])
def test_one_global_sum_per_step_always(foreach, monkeypatch) -> None:
    """Every step reaches the one reduction, even with no gradient at all or all lrs at 0."""
    params, loss_fn = _quadratic_model()
    opt = Prodigy([{"params": params[:2]}, {"params": params[2:]}], foreach=foreach)
    calls = []
    original = opt._global_sum
    monkeypatch.setattr(opt, "_global_sum", lambda t: calls.append(t.shape) or original(t))
    _step(opt, loss_fn)
    assert calls == [torch.Size([2])]
    opt.zero_grad(set_to_none=True)
    opt.step()  # this process has no gradient (another rank might): still reduces
    assert len(calls) == 2
    for group in opt.param_groups:
        group["lr"] = 0.0
    _step(opt, loss_fn)
    assert len(calls) == 3


# ----------------------------------------------------------------------------- d


def test_d_never_decreases_with_noisy_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64))
    opt = Prodigy([p], growth_rate=1.5)
    ds, d_hats = [], []
    for t in range(150):
        # a pull towards 0 plus noise that dominates later: d-hat falls and turns negative
        p.grad = 0.1 * p.detach() + torch.randn(50, generator=g, dtype=torch.float64)
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
        d_hats.append(float(opt.param_groups[0]["d_hat"]))
    assert all(b >= a for a, b in zip(ds, ds[1:])), "d decreased"
    assert ds[-1] > 1e-6
    assert min(d_hats[10:]) < ds[-1], "the test should include estimates below d"


@pytest.mark.parametrize("scale", [1e-30, 1e-40])
@pytest.mark.parametrize("foreach", [True, False])
def test_tiny_gradients_in_float32(scale, foreach) -> None:
    """||s||_1 and the numerator underflow: d stays finite and >= d0, no NaN anywhere."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 8, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]
    opt = Prodigy(params, foreach=foreach)
    for _ in range(30):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=g)
        opt.step()
        d = opt.param_groups[0]["d"]
        assert torch.isfinite(d) and d >= torch.tensor(1e-6)  # d0 in float32
        assert all(torch.isfinite(p).all() for p in params)
        for state in opt.state.values():
            assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_gradient_does_not_poison_d() -> None:
    params, loss_fn = _quadratic_model()
    opt = Prodigy(params)
    for _ in range(10):
        _step(opt, loss_fn)
    d = opt.param_groups[0]["d"].clone()
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(opt.param_groups[0]["d"], d)


def test_published_step_size_is_d_lr_and_bias_correction() -> None:
    params, loss_fn = _quadratic_model()
    beta1, beta2 = 0.9, 0.999
    opt = Prodigy(params, lr=0.5, use_bias_correction=True)
    d = 1e-6
    for k in range(10):
        _step(opt, loss_fn)
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
        assert float(opt.param_groups[0][STEP_SIZE_KEY]) == pytest.approx(d * 0.5 * bc, rel=1e-14)
        d = float(opt.param_groups[0]["d"])


# ----------------------------------------------------------------------------- dtypes and memory


@pytest.mark.parametrize("foreach", [True, False])
def test_bfloat16_parameters_train(foreach) -> None:
    params, loss_fn = _quadratic_model(torch.bfloat16)
    opt = Prodigy(params, foreach=foreach)
    first = float(loss_fn().detach())
    for _ in range(60):
        _step(opt, loss_fn)
    assert float(loss_fn()) < 0.5 * first
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in params)
    for state in opt.state.values():
        assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert opt.param_groups[0]["d"].dtype == torch.float32


def _bf16_quadratic(seed=0):
    """bfloat16 weights in [0.5, 1.5) (none near 0, where tiny updates are representable)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((0.5 + torch.rand(shape, generator=g)).to(torch.bfloat16)) for shape in ((8, 4), (6,))]
    targets = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]

    def loss():
        return sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(params, targets))

    return params, loss


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.float32,), 1e-6),
    ((torch.float64,), 1e-6),
    ((torch.float32, torch.float64), 1e-6),
    ((torch.bfloat16,), 1e-3),
    ((torch.float16,), 1e-3),
    ((torch.float32, torch.bfloat16), 1e-3),  # any 16-bit parameter of the optimizer
])
def test_default_d0_follows_the_parameters_dtype(dtypes, expected) -> None:
    params = [torch.nn.Parameter(torch.ones(3, dtype=dt)) for dt in dtypes]
    opt = Prodigy([{"params": [p]} for p in params])  # also across groups
    assert [group["d0"] for group in opt.param_groups] == [expected] * len(params)
    assert all(type(group["d0"]) is float for group in opt.param_groups)
    assert opt.defaults["d0"] is None
    for group in opt.param_groups:
        assert float(group["d"] if "d" in group else expected) == expected
    # a number is used as given, whatever the dtype
    assert Prodigy(params, d0=1e-5).param_groups[0]["d0"] == 1e-5
    assert Prodigy(params, d0=1e-6).param_groups[0]["d0"] == 1e-6


def test_d0_given_in_one_group_is_everyones_and_later_groups_take_group_0s() -> None:
    a, b, c = (torch.nn.Parameter(torch.ones(3, dtype=dt)) for dt in (torch.float32, torch.bfloat16, torch.float32))
    opt = Prodigy([{"params": [a]}, {"params": [b], "d0": 1e-4}])  # the other group's None takes it
    assert [group["d0"] for group in opt.param_groups] == [1e-4, 1e-4]
    opt = Prodigy([a])  # float32: 1e-6; a bfloat16 group added later does not change the shared start
    opt.add_param_group({"params": [b]})
    assert [group["d0"] for group in opt.param_groups] == [1e-6, 1e-6]
    with pytest.raises(InvalidArgumentError, match=r"d0 = 0.001 in param group 2 differs from 0.0001 in group 1"):
        Prodigy([{"params": [a]}, {"params": [b], "d0": 1e-4}, {"params": [c], "d0": 1e-3}])
    with pytest.raises(InvalidArgumentError, match=r"d0 = 0.001 in param group 1 differs from 1e-06 in group 0"):
        opt = Prodigy([a])
        opt.add_param_group({"params": [b], "d0": 1e-3})
    with pytest.raises(InvalidArgumentError, match=r"^Prodigy: d0 = 0.0 is invalid; allowed: 0 < d0"):
        Prodigy([b], d0=0.0)
    with pytest.raises(InvalidArgumentError, match=r"^Prodigy: d0 = -1.0 is invalid"):
        Prodigy([{"params": [a]}, {"params": [b], "d0": -1.0}])


def test_bfloat16_first_steps_round_away_with_d0_1e6_and_move_with_the_default() -> None:
    """With d0 = 1e-6 every update (~3e-6) is below bfloat16's spacing (2^-8 relative to the
    weight): x stays at x0, the numerator <g, x0 - x> stays 0 and d never grows. The default
    for bfloat16 parameters (1e-3) moves them from the first step."""
    params, loss_fn = _bf16_quadratic()
    start = [p.detach().clone() for p in params]
    opt = Prodigy(params, d0=1e-6)
    first = float(loss_fn().detach())
    for _ in range(20):
        _step(opt, loss_fn)
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert float(opt.param_groups[0]["d"]) == pytest.approx(1e-6) and float(loss_fn().detach()) == first

    params, loss_fn = _bf16_quadratic()
    opt = Prodigy(params)
    assert opt.param_groups[0]["d0"] == 1e-3
    for _ in range(20):
        _step(opt, loss_fn)
    assert float(opt.param_groups[0]["d"]) > 1e-2, "d should have grown"
    assert float(loss_fn().detach()) < 0.5 * first


def test_the_chosen_d0_round_trips_through_state_dict() -> None:
    """The checkpoint's d0 (a number in the param groups) is the one a resumed run uses, whatever
    the new optimizer chose: the resumed run equals the uninterrupted one."""
    params, loss_fn = _bf16_quadratic()
    opt = Prodigy(params)
    for _ in range(3):
        _step(opt, loss_fn)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["d0"] == 1e-3
    start = [p.detach().clone() for p in params]
    for _ in range(3):
        _step(opt, loss_fn)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    resumed = Prodigy(params, d0=1e-6)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["d0"] == 1e-3
    for _ in range(3):
        _step(resumed, loss_fn)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


def test_mixed_dtypes_in_one_group_foreach_matches_loop() -> None:
    def run(foreach):
        params, loss_fn = _quadratic_model()
        with torch.no_grad():
            params[1].data = params[1].data.float()
        opt = Prodigy(params, foreach=foreach)
        for _ in range(15):
            _step(opt, lambda: loss_fn().double())
        return params, opt

    (a, opt_a), (b, opt_b) = run(True), run(False)
    assert opt_a.state[a[1]]["grad_sq_avg"].dtype == torch.float32
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt_a.param_groups[0]["d"], opt_b.param_groups[0]["d"], rtol=1e-5, atol=0)


def test_float32_estimate_tracks_float64() -> None:
    """<g, x0 - x> through the difference: computed as <g, x0> - <g, x> instead, the cancellation
    (x - x0 is ~1e-6 of x early on) changed d by 13% here in float32; with it, 0.6%."""
    traces = {}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        x = torch.nn.Parameter(torch.randn(200_000, generator=g, dtype=torch.float64).to(dtype))
        target = torch.randn(200_000, generator=g, dtype=torch.float64).to(dtype)
        opt = Prodigy([x], weight_decay=0.1, decouple=False)
        traces[dtype] = []
        for _ in range(15):
            opt.zero_grad()
            ((x - target) ** 2).sum().backward()
            opt.step()
            traces[dtype].append(float(opt.param_groups[0]["d"]))
    assert traces[torch.float64][-1] > 0.1
    for a, b in zip(traces[torch.float32], traces[torch.float64]):
        assert a == pytest.approx(b, rel=0.02)


def test_slice_p_divides_the_memory_of_s_and_x0() -> None:
    for slice_p, expected in [(1, 1000), (3, 334), (11, 91)]:
        p = torch.nn.Parameter(torch.randn(10, 100))
        q = torch.nn.Parameter(torch.zeros(30))  # starts at 0: x0 is a 0-d tensor
        opt = Prodigy([p, q], slice_p=slice_p)
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
        state = opt.state[p]
        for key in ("s", "x0"):
            assert state[key].numel() == expected
            assert state[key].untyped_storage().nbytes() == expected * 4, f"{key} holds a larger storage"
        assert state["grad_avg"].shape == p.shape and state["grad_sq_avg"].shape == p.shape
        assert opt.state[q]["x0"].dim() == 0 and opt.state[q]["s"].numel() == math.ceil(30 / slice_p)


def test_state_is_no_larger_than_the_reference() -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    for kwargs in ({}, {"slice_p": 3}, {"betas": (0.0, 0.999)}):
        sizes = []
        for cls in (Prodigy, prodigyopt.Prodigy):
            params, loss_fn = _quadratic_model(torch.float32)
            opt = cls(params, **kwargs)
            _step(opt, loss_fn)
            sizes.append(sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))
        assert sizes[0] <= sizes[1], f"{kwargs}: {sizes[0]} state elements vs {sizes[1]} in prodigyopt"


@pytest.mark.parametrize("slice_p", [1, 3])
def test_cpu_chunks_split_large_tensors_and_match_the_loop(slice_p) -> None:
    """On the CPU the vectorized path works chunk by chunk (large tensors cut into flat pieces)."""
    from tuneless.optim import prodigy as module

    n = 3 * module._CPU_CHUNK // 2 + 7
    pieces = []

    def run(foreach):
        g = torch.Generator().manual_seed(0)
        big = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        small = torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
        # not contiguous: cannot be cut, goes whole (with a temporary instead of the reused buffer)
        strided = torch.nn.Parameter(torch.randn(600, 500, generator=g, dtype=torch.float64).t())
        targets = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in (big, small, strided)]
        opt = Prodigy([big, small, strided], foreach=foreach, slice_p=slice_p)
        original = module._Buffers._pieces
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module._Buffers, "_pieces", lambda self, *a: pieces.append(a) or original(self, *a))
            for _ in range(8):
                opt.zero_grad()
                sum(((p - t) ** 2).sum() for p, t in zip((big, small, strided), targets)).backward()
                opt.step()
        return big, small, strided, opt

    *a, opt = run(True)
    assert pieces and {a[1] for a in pieces} == {n}, "the large contiguous tensor (only) should have been cut"
    *b, _ = run(False)
    assert opt.state[a[0]]["s"].numel() == math.ceil(n / slice_p)
    assert float(opt.param_groups[0]["d"]) > 1e-4
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
