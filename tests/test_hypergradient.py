"""SGD-HD and Adam-HD: against a plain re-derivation from the paper, and their own behaviour.

No PyPI reference exists (gbaydin/hypergradient-descent is on GitHub only), so the parity
target is a straightforward per-step loop written here from the paper's equations
(Baydin et al., ICLR 2018, arXiv:1703.04782), one flat vector per param group:

    alpha_t = max(0, alpha_{t-1} + beta * lr * <g_t, d_{t-1}>),   x_{t+1} = x_t - lr * alpha_t * d_t
"""

from __future__ import annotations

import math

import pytest
import torch

import tuneless
from tuneless import SGDHD, AdamHD

STEPS = 120


class Problem:
    """Logistic regression with a hidden tanh layer: four tensors, two param groups (float64)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(48, 5, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] - 0.5 * self.x[:, 1] + 0.3 * torch.randn(48, generator=g, dtype=torch.float64) > 0)

    @staticmethod
    def params() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(2)
        return [torch.nn.Parameter(0.5 * torch.randn(6, 5, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(torch.zeros(6, dtype=torch.float64)),
                torch.nn.Parameter(0.5 * torch.randn(6, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(torch.zeros((), dtype=torch.float64))]

    def loss(self, ps) -> torch.Tensor:
        logits = torch.tanh(self.x @ ps[0].T + ps[1]) @ ps[2] + ps[3]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, self.y.to(torch.float64))

    def grads(self, ps) -> list[torch.Tensor]:
        ps = [p.detach().requires_grad_(True) for p in ps]
        return list(torch.autograd.grad(self.loss(ps), ps))


GROUPS = [[0, 1], [2, 3]]  # indices of the parameters in each group


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def rederived_sgd_hd(problem, steps, lrs, init_lr, beta, momentum=0.0, nesterov=False, weight_decay=0.0):
    """SGD-HD / SGDN-HD from the paper, per group, on flat vectors."""
    xs = [p.detach().clone() for p in Problem.params()]
    alpha = [init_lr for _ in GROUPS]
    d_prev = [torch.zeros(sum(xs[i].numel() for i in idx), dtype=torch.float64) for idx in GROUPS]
    buf = [torch.zeros_like(d) for d in d_prev]
    for _ in range(steps):
        grads = problem.grads(xs)
        for k, idx in enumerate(GROUPS):
            x = flat([xs[i] for i in idx])
            g = flat([grads[i] for i in idx]) + weight_decay * x
            alpha[k] = max(0.0, alpha[k] + beta * lrs[k] * float(g @ d_prev[k]))
            if momentum:
                buf[k] = momentum * buf[k] + g
                d = g + momentum * buf[k] if nesterov else buf[k]
            else:
                d = g
            x = x - lrs[k] * alpha[k] * d
            d_prev[k] = d
            for i, t in zip(idx, unflat(x, [xs[i] for i in idx])):
                xs[i] = t
    return xs, alpha


def rederived_adam_hd(problem, steps, lrs, init_lr, beta, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Adam-HD from the paper (Adam's bias-corrected direction), per group, on flat vectors."""
    b1, b2 = betas
    xs = [p.detach().clone() for p in Problem.params()]
    alpha = [init_lr for _ in GROUPS]
    m = [torch.zeros(sum(xs[i].numel() for i in idx), dtype=torch.float64) for idx in GROUPS]
    v = [torch.zeros_like(a) for a in m]
    for t in range(1, steps + 1):
        grads = problem.grads(xs)
        for k, idx in enumerate(GROUPS):
            x = flat([xs[i] for i in idx])
            g = flat([grads[i] for i in idx]) + weight_decay * x
            if t > 1:
                d_prev = (m[k] / (1 - b1 ** (t - 1))) / (torch.sqrt(v[k] / (1 - b2 ** (t - 1))) + eps)
                alpha[k] = max(0.0, alpha[k] + beta * lrs[k] * float(g @ d_prev))
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            d = (m[k] / (1 - b1 ** t)) / (torch.sqrt(v[k] / (1 - b2 ** t)) + eps)
            x = x - lrs[k] * alpha[k] * d
            for i, tt in zip(idx, unflat(x, [xs[i] for i in idx])):
                xs[i] = tt
    return xs, alpha


def run(cls, problem, steps, lrs, **kwargs):
    ps = Problem.params()
    opt = cls([{"params": [ps[i] for i in idx], "lr": lr} for idx, lr in zip(GROUPS, lrs)], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(ps).backward()
        opt.step()
    return ps, opt


SGD_CASES = [
    pytest.param(dict(init_lr=0.05, hypergrad_lr=0.02), id="plain"),
    pytest.param(dict(init_lr=0.05, hypergrad_lr=0.02, momentum=0.9), id="momentum"),
    pytest.param(dict(init_lr=0.05, hypergrad_lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.01), id="nesterov-wd"),
]


@pytest.mark.parametrize("kwargs", SGD_CASES)
@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_hd_matches_the_rederivation(kwargs, foreach) -> None:
    problem, lrs = Problem(), [1.0, 0.5]
    ps, opt = run(SGDHD, problem, STEPS, lrs, foreach=foreach, **kwargs)
    xs, alpha = rederived_sgd_hd(problem, STEPS, lrs, kwargs["init_lr"], kwargs["hypergrad_lr"],
                                 kwargs.get("momentum", 0.0), kwargs.get("nesterov", False),
                                 kwargs.get("weight_decay", 0.0))
    for p, x in zip(ps, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-13)
    for group, a, lr in zip(opt.param_groups, alpha, lrs):
        torch.testing.assert_close(group["learned_lr"], torch.tensor(a, dtype=torch.float64), rtol=1e-10, atol=0.0)
        torch.testing.assert_close(group["effective_lr"], lr * group["learned_lr"])
    assert alpha[0] != kwargs["init_lr"]  # the rate did move


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kwargs", [dict(init_lr=0.01, hypergrad_lr=1e-4),
                                    dict(init_lr=0.01, hypergrad_lr=1e-4, betas=(0.8, 0.99), weight_decay=0.01)])
def test_adam_hd_matches_the_rederivation(kwargs, foreach) -> None:
    problem, lrs = Problem(), [1.0, 0.5]
    ps, opt = run(AdamHD, problem, STEPS, lrs, foreach=foreach, **kwargs)
    xs, alpha = rederived_adam_hd(problem, STEPS, lrs, kwargs["init_lr"], kwargs["hypergrad_lr"],
                                  kwargs.get("betas", (0.9, 0.999)), weight_decay=kwargs.get("weight_decay", 0.0))
    for p, x in zip(ps, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-13)
    for group, a in zip(opt.param_groups, alpha):
        torch.testing.assert_close(group["learned_lr"], torch.tensor(a, dtype=torch.float64), rtol=1e-10, atol=0.0)
    assert alpha[0] != kwargs["init_lr"]


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (SGDHD, torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    (SGDHD, torch.optim.SGD, dict()),
    (AdamHD, torch.optim.Adam, dict(betas=(0.8, 0.99), weight_decay=0.01)),
])
def test_without_hypergradient_it_is_torchs_optimizer(ours, theirs, kwargs) -> None:
    problem = Problem()
    a, b = Problem.params(), Problem.params()
    opt_a = ours(a, init_lr=0.03, hypergrad_lr=0.0, **kwargs)
    opt_b = theirs(b, lr=0.03, **kwargs)
    for _ in range(30):
        for ps, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            problem.loss(ps).backward()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def quadratic_run(cls, init_lr, steps, **kwargs):
    """f(x) = 0.5 * sum(c_i x_i^2) with curvatures up to 4: stable for SGD while lr < 0.5."""
    x = torch.nn.Parameter(torch.linspace(-1.0, 2.0, 8, dtype=torch.float64))
    curv = torch.linspace(1.0, 4.0, 8, dtype=torch.float64)
    opt = cls([x], init_lr=init_lr, **kwargs)
    rates = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (curv * x ** 2).sum()).backward()
        opt.step()
        rates.append(float(opt.param_groups[0]["learned_lr"]))
    return rates, x


def test_rate_moves_in_the_right_direction_on_a_quadratic() -> None:
    # too small: consecutive gradients agree, the rate grows
    rates, _ = quadratic_run(SGDHD, 1e-3, 10, hypergrad_lr=1e-3)
    assert all(b > a for a, b in zip(rates[1:], rates[2:]))
    # too large (beyond 2 / max curvature = 0.5): gradients flip sign, the rate shrinks
    rates, x = quadratic_run(SGDHD, 0.6, 30, hypergrad_lr=1e-3)
    assert rates[-1] < 0.5 and rates[1] < 0.6
    assert float((x.detach() ** 2).sum()) < 1.0
    # Adam-HD: the same from a small rate
    rates, _ = quadratic_run(AdamHD, 1e-3, 10, hypergrad_lr=1e-3)
    assert rates[-1] > rates[1] > 1e-3


def test_rate_never_goes_negative_and_recovers() -> None:
    """On f = x^2 / 2 from x = 1 with alpha_0 = 1.9, x overshoots to -0.9; with beta = 10 the
    unclipped rule gives alpha = 1.9 + 10 * <g_2, g_1> = 1.9 - 9 = -7.1 (then climbs the loss)."""
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = SGDHD([x], init_lr=1.9, hypergrad_lr=10.0)
    rates, xs = [], []
    for t in range(4):
        opt.zero_grad()
        (0.5 * x ** 2).sum().backward()
        opt.step()
        rates.append(float(opt.param_groups[0]["learned_lr"]))
        xs.append(x.item())
        if t == 1:
            opt.param_groups[0]["hypergrad_lr"] = 0.1
    assert rates[1] == 0.0  # clamped, where the reference would hold -7.1
    assert xs[0] == pytest.approx(-0.9) and xs[1] == xs[0]  # it did not move at the clamped step
    assert 0.0 < rates[2] < rates[3]  # it grows back: consecutive gradients agree
    assert abs(xs[3]) < abs(xs[2]) < 0.9


def test_each_group_learns_its_own_rate() -> None:
    """Groups are independent: a steep and a flat group end with rates 10x apart, and the steep
    group's trajectory is exactly the one it has when optimized alone."""
    def make():
        return (torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64)),
                torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64)))

    a, b = make()
    opt = SGDHD([{"params": [a], "hypergrad_lr": 1e-4}, {"params": [b], "hypergrad_lr": 1.0}], init_lr=0.01)
    alone, _ = make()
    opt_alone = SGDHD([alone], init_lr=0.01, hypergrad_lr=1e-4)
    for _ in range(60):
        opt.zero_grad()
        (5.0 * (a ** 2).sum() + 0.05 * (b ** 2).sum()).backward()
        opt.step()
        opt_alone.zero_grad()
        (5.0 * (alone ** 2).sum()).backward()
        opt_alone.step()
        assert torch.equal(a, alone)
    rate_a, rate_b = (float(g["learned_lr"]) for g in opt.param_groups)
    assert rate_b > 10 * rate_a
    assert 0.01 < rate_a < 2 / 10.0  # grew, and stayed below the steep group's stability limit
    assert float(b.detach().norm()) < 1e-2  # from 4: the flat group converged too


def test_lr_zero_freezes_the_group_and_its_rate() -> None:
    problem = Problem()
    ps = Problem.params()
    opt = AdamHD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0}], init_lr=0.01, hypergrad_lr=1e-3)
    frozen = [p.detach().clone() for p in ps[2:]]
    for _ in range(10):
        opt.zero_grad()
        problem.loss(ps).backward()
        opt.step()
    assert all(torch.equal(p.detach(), f) for p, f in zip(ps[2:], frozen))
    assert float(opt.param_groups[1]["learned_lr"]) == 0.01
    assert float(opt.param_groups[0]["learned_lr"]) != 0.01
    assert float(opt.param_groups[1]["effective_lr"]) == 0.0


def test_registry_and_flags() -> None:
    ps = Problem.params()
    opt = tuneless.create("sgd_hd:init_lr=0.1,momentum=0.9", ps)
    assert isinstance(opt, SGDHD) and opt.param_groups[0]["init_lr"] == 0.1
    assert isinstance(tuneless.create("adam_hd", Problem.params()), AdamHD)
    assert not SGDHD.learning_rate_free and not AdamHD.learning_rate_free
    assert "sgd_hd" not in tuneless.learning_rate_free()
    assert math.isclose(AdamHD(Problem.params()).param_groups[0]["hypergrad_lr"], 1e-7)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("cls, kwargs", [(SGDHD, dict(momentum=0.9, nesterov=True)), (AdamHD, dict())])
def test_a_skipped_step_keeps_the_lr_of_the_last_step_taken(cls, kwargs, tensor_lr) -> None:
    """The hypergradient is taken through the lr of the last step taken: when a scheduler
    changes the lr at every step, a step skipped for a NaN gradient must not record its own lr
    (nor count, nor move the rate): the run equals the one that never called that step."""
    problem = Problem()

    def run(skip: bool):
        ps = Problem.params()
        lr0 = torch.tensor(1.0, dtype=torch.float64) if tensor_lr else 1.0
        opt = cls([{"params": ps[:2], "lr": lr0}, {"params": ps[2:]}], init_lr=0.02, hypergrad_lr=1e-3, **kwargs)
        for step in range(8):
            lr = 1.0 - 0.1 * step
            if tensor_lr:
                opt.param_groups[0]["lr"].fill_(lr)
            else:
                opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            problem.loss(ps).backward()
            if step == 4:
                if skip:
                    continue
                ps[0].grad[0, 0] = float("nan")
            opt.step()
        return ps, opt

    (ref, ref_opt), (ps, opt) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(ref, ps))
    for a, b in zip(ref_opt.param_groups, opt.param_groups):
        for key in ("learned_lr", "hd_step", "hd_prev_lr", "effective_lr"):
            assert torch.equal(a[key], b[key]), (key, a[key], b[key])
    assert opt.skipped_steps() == [1, 1] and int(opt.param_groups[0]["hd_step"]) == 7


def test_a_checkpoint_with_a_number_step_count_resumes() -> None:
    """Checkpoints of earlier versions hold ``hd_step`` as an int and ``hd_prev_lr`` as a float:
    loaded, they continue exactly as the run that was not interrupted."""
    problem = Problem()
    full, part = Problem.params(), Problem.params()
    opt_full, opt_part = (AdamHD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], init_lr=0.01, hypergrad_lr=1e-3)
                          for ps in (full, part))
    for step in range(6):
        for ps, opt in ((full, opt_full), (part, opt_part)):
            if step >= 3 and opt is opt_part:
                continue
            opt.zero_grad()
            problem.loss(ps).backward()
            opt.step()
    saved = opt_part.state_dict()
    for group in saved["param_groups"]:  # the earlier format
        group["hd_step"], group["hd_prev_lr"] = int(group["hd_step"]), float(group["hd_prev_lr"])
    resumed = AdamHD([{"params": part[:2]}, {"params": part[2:], "lr": 0.5}], init_lr=0.01, hypergrad_lr=1e-3)
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.zero_grad()
        problem.loss(part).backward()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(full, part))
    assert all(torch.equal(a["learned_lr"], b["learned_lr"]) for a, b in zip(opt_full.param_groups, resumed.param_groups))
    assert [int(g["hd_step"]) for g in resumed.param_groups] == [6, 6]
