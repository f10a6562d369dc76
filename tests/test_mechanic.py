"""Mechanic-specific behaviour (the generic contract is in test_contract.py)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import tuneless
from tuneless import COCOB, LossRequiredError, Mechanic, Polyak


def make_params():
    g = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))]


def loss_of(ps):
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return ((ps[0] @ target - 1.0) ** 2).sum() + ((ps[1] - 0.3) ** 2).sum() + 2.0 * ((ps[2] - target) ** 2).sum()


def step(opt, ps, **kwargs):
    opt.zero_grad()
    loss = loss_of(ps)
    loss.backward()
    opt.step(**kwargs)
    return loss.detach()


def reference_points(opt: Mechanic) -> dict:
    """x - S * Delta for every parameter with state: the reference point the parameters imply."""
    scale = opt.param_groups[0]["mechanic_s"].sum()
    return {p: (p.detach() - scale * state["mechanic_delta"]).clone() for p, state in opt.state.items()}


REUSE = pytest.mark.parametrize("reuse_buffer", [False, True], ids=["buffer-per-step", "buffer-reused"])


def assert_reference_points(opt: Mechanic, expected: dict) -> None:
    """The tuned parameters sit at x_ref + S * Delta with x_ref where it was (``expected``)."""
    now = reference_points(opt)
    for p, x_ref in expected.items():
        torch.testing.assert_close(now[p], x_ref, rtol=1e-12, atol=1e-13)


class Boom(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_grad_mode_is_restored_when_the_base_step_raises(grad_enabled) -> None:
    ps = make_params()
    opt = Mechanic(Boom(ps, lr=1.0))
    loss_of(ps).backward()
    with torch.set_grad_enabled(grad_enabled):
        with pytest.raises(RuntimeError, match="boom"):
            opt.step()
        assert torch.is_grad_enabled() is grad_enabled


@REUSE
def test_a_base_step_that_raises_changes_nothing_of_mechanics(reuse_buffer) -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps, lr=1.0), reuse_buffer=reuse_buffer)
    for _ in range(3):
        step(opt, ps)
    saved = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in ps]
    opt.base_optimizer.step = lambda closure=None: (_ for _ in ()).throw(RuntimeError("boom"))
    loss_of(ps).backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    after = opt.state_dict()
    for key, entry in saved["state"].items():
        assert entry.keys() == after["state"][key].keys() == {"mechanic_delta"}
        assert torch.equal(after["state"][key]["mechanic_delta"], entry["mechanic_delta"])
    for k in ("mechanic_s", "mechanic_max_product", "mechanic_sum_sq", "mechanic_reward"):
        assert torch.equal(after["param_groups"][0][k], saved["param_groups"][0][k])
    assert after["param_groups"][0]["mechanic_step"] == saved["param_groups"][0]["mechanic_step"] == 3
    assert all(torch.equal(p, q) for p, q in zip(ps, params))


def test_base_runs_in_the_callers_grad_mode() -> None:
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(torch.is_grad_enabled())
            return super().step(closure)

    ps = make_params()
    opt = Mechanic(Spy(ps, lr=1.0))
    step(opt, ps)
    with torch.no_grad():
        opt.step()
    assert seen == [True, False]
    assert torch.is_grad_enabled()


@REUSE
def test_several_groups_with_their_own_base_lr_share_one_scale(reuse_buffer) -> None:
    ps = make_params()
    base = torch.optim.SGD([{"params": ps[:2], "lr": 1.0}, {"params": ps[2:], "lr": 0.1}], lr=1.0)
    opt = Mechanic(base, reuse_buffer=reuse_buffer)
    assert opt.param_groups is base.param_groups
    first = loss_of(ps).item()
    start = {p: p.detach().clone() for p in ps}
    for _ in range(60):
        step(opt, ps)
        assert_reference_points(opt, start)
    assert loss_of(ps).item() < 0.5 * first
    scale = opt.param_groups[0]["mechanic_s"].sum()
    for group in opt.param_groups:
        torch.testing.assert_close(group["effective_lr"], scale * group["lr"])


@REUSE
def test_frozen_group_and_missing_gradients_stay_put_and_resume_smoothly(reuse_buffer) -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=1.0), reuse_buffer=reuse_buffer)
    start = {p: p.detach().clone() for p in ps}
    for _ in range(15):
        step(opt, ps)
    assert_reference_points(opt, start)
    # group 1 frozen by lr = 0; ps[1] gets no gradient for a few steps
    opt.param_groups[1]["lr"] = 0.0
    held = [p.detach().clone() for p in ps]
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        ps[1].grad = None
        opt.step()
        assert torch.equal(ps[1].detach(), held[1])
        assert torch.equal(ps[2].detach(), held[2])
        assert_reference_points(opt, {ps[0]: start[ps[0]]})
    assert not torch.equal(ps[0].detach(), held[0])
    assert not torch.equal(reference_points(opt)[ps[2]], start[ps[2]])  # the scale changed under it
    # back on: they take part again, from where they are, around their new reference points
    opt.param_groups[1]["lr"] = 1.0
    moved = reference_points(opt)
    for _ in range(3):
        step(opt, ps)
        assert_reference_points(opt, moved)
    assert not torch.equal(ps[2].detach(), held[2])


@REUSE
def test_a_change_between_steps(reuse_buffer) -> None:
    """Weights changed between two steps (loaded, edited) stay changed: the reference point moves
    with them (the change is not read as part of the next base update, which would rescale it)."""
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps, lr=1.0), reuse_buffer=reuse_buffer)
    for _ in range(5):
        step(opt, ps)
    refs = reference_points(opt)
    with torch.no_grad():
        ps[0].add_(0.25)
    for _ in range(3):
        step(opt, ps)
    torch.testing.assert_close(reference_points(opt)[ps[0]], refs[ps[0]] + 0.25, rtol=1e-12, atol=1e-13)
    assert_reference_points(opt, {ps[1]: refs[ps[1]], ps[2]: refs[ps[2]]})


def test_registry_and_spec_string_bases() -> None:
    opt = tuneless.create("mechanic", make_params())
    assert isinstance(opt, Mechanic) and isinstance(opt.base_optimizer, torch.optim.Adam)
    assert opt.base_optimizer.param_groups[0]["lr"] == 1.0
    opt = tuneless.create("mechanic:base='sgd:lr=1.0,momentum=0.9'", make_params())
    assert isinstance(opt.base_optimizer, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    opt = Mechanic(make_params(), "prodigy" if "prodigy" in tuneless.available() else "polyak")
    assert isinstance(opt.base_optimizer, tuneless.TunelessOptimizer)
    with pytest.raises(tuneless.InvalidArgumentError, match="not itself a Mechanic"):
        Mechanic(Mechanic(torch.optim.SGD(make_params(), lr=1.0)))
    with pytest.raises(tuneless.InvalidArgumentError, match="a spec string"):
        Mechanic(make_params(), base=torch.optim.SGD)
    assert "mechanic" in tuneless.learning_rate_free()


def test_tuneless_base_gets_the_loss_and_its_step_size_is_scaled() -> None:
    ps = make_params()
    opt = Mechanic(Polyak(ps, f_star=0.0))
    with pytest.raises(LossRequiredError):
        loss_of(ps).backward()
        opt.step()
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        polyak_step = (loss.detach() / sum((p.grad ** 2).sum() for p in ps))
        opt.step(loss=loss)
        scale = opt.param_groups[0]["mechanic_s"].sum()
        torch.testing.assert_close(opt.param_groups[0]["effective_lr"], scale * polyak_step)


class SkipsNonFinite(torch.optim.SGD):
    """A base that skips a step whose gradients are not finite (as loss-scaling loops do)."""

    def step(self, closure=None):
        if all(torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"] if p.grad is not None):
            return super().step(closure)
        return None


def test_non_finite_statistics_do_not_poison_the_scale() -> None:
    """A step whose gradient is infinite, with Mechanic's own skip off: the base skips it, and
    Mechanic's tuner takes h = 0."""
    ps = make_params()
    opt = Mechanic(SkipsNonFinite(ps, lr=1.0), skip_nonfinite=False)
    start = {p: p.detach().clone() for p in ps}
    for _ in range(5):
        step(opt, ps)
    opt.zero_grad()
    loss_of(ps).backward()
    ps[0].grad[0, 0] = float("inf")
    opt.step()
    assert torch.isfinite(opt.param_groups[0]["mechanic_s"]).all()
    assert_reference_points(opt, start)
    for _ in range(3):
        step(opt, ps)
    assert all(torch.isfinite(p).all() for p in ps)
    assert torch.isfinite(opt.param_groups[0]["mechanic_s"]).all()


def test_closure_is_evaluated_once_per_step_for_a_torch_base() -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps, lr=1.0))
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        return loss

    for _ in range(3):
        returned = opt.step(closure)
    assert calls == 3 and isinstance(returned, torch.Tensor)


def test_groups_stay_shared_after_load_deepcopy_pickle_and_add_param_group() -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps[:2], lr=1.0, momentum=0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        step(opt, ps)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5  # the scheduler reached the base
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = Mechanic(torch.optim.SGD(ps[:2], lr=1.0, momentum=0.9))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for clone in (fresh, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups is clone.base_optimizer.param_groups
        assert clone.param_groups[0]["lr"] == 0.5
        assert "mechanic_s" in clone.param_groups[0]
    opt.add_param_group({"params": [ps[2]], "lr": 0.25})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["mechanic_s"] is opt.param_groups[0]["mechanic_s"]
    refs = {**reference_points(opt), ps[2]: ps[2].detach().clone()}
    for _ in range(3):
        step(opt, ps)
        assert_reference_points(opt, refs)
    assert opt.param_groups[1]["mechanic_s"] is opt.param_groups[0]["mechanic_s"]


@REUSE
def test_state_dict_has_the_standard_layout_and_accepts_a_base_checkpoint(reuse_buffer) -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps, lr=1.0, momentum=0.9), reuse_buffer=reuse_buffer)
    for _ in range(3):
        step(opt, ps)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"][0]) == {"momentum_buffer", "mechanic_delta"}  # a reused copy buffer is not saved
    assert ("mechanic_copy" in opt.state[ps[0]]) is reuse_buffer
    # a checkpoint of the base alone: the base keeps its state, Mechanic starts afresh from here
    base = torch.optim.SGD(ps, lr=1.0, momentum=0.9)
    step(base, ps)
    fresh = Mechanic(torch.optim.SGD(ps, lr=1.0, momentum=0.9), reuse_buffer=reuse_buffer)
    fresh.load_state_dict(base.state_dict())
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    assert torch.equal(fresh.base_optimizer.state[ps[0]]["momentum_buffer"], base.state[ps[0]]["momentum_buffer"])
    assert len(fresh.state) == 0
    before = {p: p.detach().clone() for p in ps}
    step(fresh, ps)
    assert_reference_points(fresh, before)


def test_the_copy_buffer_reused_or_not_gives_the_same_run() -> None:
    """reuse_buffer only says where x_t is copied: the runs are identical, bit for bit; the
    default reuses it on the CPU."""
    runs = []
    for reuse in (True, False, None):
        ps = make_params()
        opt = Mechanic(torch.optim.Adam(ps, lr=1.0), reuse_buffer=reuse)
        for _ in range(6):
            step(opt, ps)
        assert all(("mechanic_copy" in opt.state[p]) is (reuse is not False) for p in ps)
        runs.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*runs))
    with pytest.raises(tuneless.InvalidArgumentError, match="reuse_buffer = 1 is invalid; allowed: True or False"):
        Mechanic(torch.optim.SGD(make_params(), lr=1.0), reuse_buffer=1)


def test_loads_a_checkpoint_that_still_stores_x_ref() -> None:
    """Checkpoints written before x_ref became implied (it is redundant there: x = x_ref + S Delta)
    load, without it, and resume as the same checkpoint without it does."""
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps, lr=1.0, momentum=0.9))
    start = {p: p.detach().clone() for p in ps}
    for _ in range(3):
        step(opt, ps)
    sd = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(sd)
    for i, p in enumerate(ps):
        old["state"][i]["mechanic_x_ref"] = start[p]
    saved = [p.detach().clone() for p in ps]
    finals = []
    for checkpoint in (sd, old):
        with torch.no_grad():
            for p, q in zip(ps, saved):
                p.copy_(q)
        fresh = Mechanic(torch.optim.SGD(ps, lr=1.0, momentum=0.9))
        fresh.load_state_dict(checkpoint)
        assert all(set(fresh.state[p]) == {"mechanic_delta"} for p in ps)
        assert all("mechanic_x_ref" not in fresh.base_optimizer.state[p] for p in ps)
        for _ in range(2):
            step(fresh, ps)
        finals.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


# ----------------------------------------------------------------------------- the non-finite skip

SKIP_BASES = {
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "COCOB": lambda ps: COCOB(ps),
    "Polyak": lambda ps: Polyak(ps, f_star=0.0, max_step=1.0),
}


def _run_ending_with(make, bad: str | None, steps: int = 4):
    """``steps`` clean steps, then one more: with ``bad`` ('nan', 'inf_loss') injected, or none."""
    ps = make_params()
    opt = make(ps)
    for _ in range(steps):
        _step_with_loss(opt, ps)
    if bad is not None:
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        if bad == "nan":
            ps[1].grad[2] = float("nan")
        else:
            loss = loss.detach() + float("inf")
        opt.step(loss=loss)
    return ps, opt


def _step_with_loss(opt, ps):
    opt.zero_grad()
    loss = loss_of(ps)
    loss.backward()
    opt.step(loss=loss)


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "per-parameter"])
@pytest.mark.parametrize("base", list(SKIP_BASES))
def test_a_skipped_step_leaves_everything_as_it_was_the_published_step_size_included(base, foreach) -> None:
    """The bad step is the last one, so that what it published is compared too (later steps
    overwrite it): on the base's shared groups a gated tuneless base keeps Mechanic's product
    S x its step size, which Mechanic must not scale again."""
    def make(ps):
        return Mechanic(SKIP_BASES[base](ps), foreach=foreach)

    ref_ps, ref = _run_ending_with(make, None)
    cases = ["nan", "inf_loss"] if base == "Polyak" else ["nan"]
    for case in cases:
        ps, opt = _run_ending_with(make, case)
        assert all(torch.equal(a, b) for a, b in zip(ref_ps, ps)), case
        assert opt.skipped_steps() == [1]
        mine, theirs = opt.state_dict(), ref.state_dict()
        assert mine["state"].keys() == theirs["state"].keys()
        for key, entry in theirs["state"].items():
            for name, value in entry.items():
                assert torch.equal(mine["state"][key][name], value), (case, key, name)
        for name, value in theirs["param_groups"][0].items():
            if name != "skipped_steps":
                same = torch.equal(mine["param_groups"][0][name], value) if isinstance(value, torch.Tensor) \
                    else mine["param_groups"][0][name] == value
                assert same, (case, name, mine["param_groups"][0][name], value)


def test_a_skipped_step_puts_back_a_frozen_group_of_a_torch_base() -> None:
    """A group frozen by lr = 0 is not Mechanic's to move, but torch's SGD writes 0 x NaN into it:
    it is put back from the snapshot (the tuned parameters, from Mechanic's copy of x_t)."""
    ps = make_params()
    opt = Mechanic(torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0}], lr=1.0, momentum=0.9))
    for _ in range(3):
        step(opt, ps)
    held = [p.detach().clone() for p in ps]
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(ps).backward()
    ps[2].grad[0] = float("nan")
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, held))
    after = opt.state_dict()
    for key, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), (key, name)
    assert opt.skipped_steps() == [1, 1]


def test_the_wrappers_setting_decides_for_a_tuneless_base() -> None:
    # the base opted out, Mechanic did not: the step is skipped, base included
    ps = make_params()
    opt = Mechanic(COCOB(ps, skip_nonfinite=False))
    for _ in range(3):
        step(opt, ps)
    held = [p.detach().clone() for p in ps]
    opt.zero_grad()
    loss_of(ps).backward()
    ps[0].grad[1, 1] = float("nan")
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, held)) and opt.skipped_steps() == [1]
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values())
    assert all(torch.isfinite(t).all() for s in opt.base_optimizer.state.values() for t in s.values())
    # Mechanic opted out, the base did not: the NaN goes through (as torch.optim), nothing is counted
    ps = make_params()
    opt = Mechanic(COCOB(ps), skip_nonfinite=False)
    step(opt, ps)
    opt.zero_grad()
    loss_of(ps).backward()
    ps[0].grad[1, 1] = float("nan")
    opt.step()
    assert not torch.isfinite(ps[0]).all()
    assert "skipped_steps" not in opt.param_groups[0]
    assert opt.base_optimizer.skip_nonfinite is True  # its own setting is left as it was


def test_skip_nonfinite_is_one_setting_for_every_group() -> None:
    ps = make_params()
    opt = Mechanic(torch.optim.SGD(ps[:2], lr=1.0))
    with pytest.raises(ValueError, match="skip_nonfinite=False"):
        opt.add_param_group({"params": [ps[2]], "skip_nonfinite": False})
    opt.add_param_group({"params": [ps[2]], "skip_nonfinite": True})
    assert all("skip_nonfinite" not in g for g in opt.param_groups)
    assert opt.skip_nonfinite is True and opt.state_dict()["param_groups"][1].get("skip_nonfinite") is None
    with pytest.raises(tuneless.InvalidArgumentError, match="skip_nonfinite"):
        Mechanic(torch.optim.SGD(make_params(), lr=1.0), skip_nonfinite=1)


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu() -> None:
    """Mechanic's default base (torch's Adam, built from a spec) keeps its step counters on the
    GPU there (``capturable=True``, docs/gpu.md); a checkpoint saved so, loaded into a Mechanic on
    the CPU, where torch's capturable path refuses CPU tensors, resumes: the setting and the
    counters follow the parameters, and the run equals the uninterrupted one."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    def step(opt, net):
        opt.zero_grad()
        net(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()

    net = model()
    opt = tuneless.Mechanic(net.parameters())
    for _ in range(3):
        step(opt, net)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(net.state_dict())
    for _ in range(2):
        step(opt, net)
    for group in saved["param_groups"]:
        assert group["capturable"] is False
        group["capturable"] = True  # as saved on a GPU
    resumed = model()
    resumed.load_state_dict(weights)
    opt2 = tuneless.Mechanic(resumed.parameters())
    opt2.load_state_dict(saved)
    assert all(g["capturable"] is False for g in opt2.base_optimizer.param_groups)
    for _ in range(2):
        step(opt2, resumed)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
