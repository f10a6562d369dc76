"""A non-finite step is skipped: the run equals the run in which that step was never taken.

For every row of the contract table (every configuration, the fused rows included), every
registered tuneless optimizer at its defaults, and the wrappers over bases tuneless does not own
(torch's SGD and Adam), three cases at step ``BAD`` of ``STEPS``:

* ``nan_grad``: one element of one gradient is NaN;
* ``inf_grad``: one element of one gradient is +inf (and, in another element, -inf);
* ``inf_loss``: the loss handed to the step is +inf (for the methods that take the loss).

The reference run takes the same minibatches and simply does not call ``step()`` at ``BAD``.
Parameters must be equal bit for bit, and ``state_dict()`` too, except each group's
``skipped_steps`` counter, which must read 1 (0 in the reference). With ``skip_nonfinite=False``
the NaN propagates, as in torch.optim.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any

import pytest
import torch

import tuneless
from tests.optim_db import FUSED_DB, OPTIM_DB
from tests.test_resume import Tiny, assert_same_state
from tuneless.optim.base import SKIPPED_STEPS_KEY, TunelessOptimizer

STEPS, BAD = 10, 4
CASES = ("nan_grad", "inf_grad", "inf_loss")


def _requires_loss(opt: torch.optim.Optimizer) -> bool:
    inner = getattr(opt, "base_optimizer", None) or getattr(opt, "base", None)
    return bool(getattr(opt, "requires_loss", False) or getattr(inner, "requires_loss", False))


def _inject(model: Tiny, case: str) -> None:
    if case == "nan_grad":
        model.w.grad[1, 2] = float("nan")
    elif case == "inf_grad":
        model.w.grad[0, 1] = float("inf")
        model.v.grad[1, 0] = float("-inf")


def run(build: Any, case: str | None, skip_step: bool = False) -> tuple[Tiny, torch.optim.Optimizer]:
    """``STEPS`` steps; at ``BAD``, inject ``case`` (None: a clean step), or take no step (``skip_step``)."""
    model = Tiny()
    opt = build(model.groups)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(step)
        loss.backward()
        if step == BAD:
            if skip_step:
                continue
            if case == "inf_loss":
                loss = loss.detach() + float("inf")
            else:
                _inject(model, case)
        opt.step(loss=loss)
    return model, opt


def _without_counters(state: dict[str, Any]) -> dict[str, Any]:
    state = copy.copy(state)
    state["param_groups"] = [{k: v for k, v in g.items() if k != SKIPPED_STEPS_KEY} for g in state["param_groups"]]
    return state


def check_skipped(build: Any, case: str, name: str) -> None:
    reference, ref_opt = run(build, None, skip_step=True)
    assert case != "inf_loss" or _requires_loss(ref_opt), f"{name} does not take the loss"
    model, opt = run(build, case)
    for i, (a, b) in enumerate(zip(reference.params, model.params)):
        assert torch.isfinite(a).all(), f"{name}: the reference run is not finite"
        assert torch.equal(a, b), (f"{name}, {case} at step {BAD + 1}: parameter {i} differs from the run without "
                                   f"that step by up to {float((a - b).abs().max().detach()):.3g}")
    assert_same_state(_without_counters(ref_opt.state_dict()), _without_counters(opt.state_dict()),
                      f"{name}, {case} at step {BAD + 1}")
    counters = [int(g[SKIPPED_STEPS_KEY]) for g in opt.param_groups]
    assert counters == [1] * len(opt.param_groups), f"{name}: skipped_steps {counters}, expected 1 in every group"
    assert [int(g[SKIPPED_STEPS_KEY]) for g in ref_opt.param_groups] == [0] * len(ref_opt.param_groups)


def _marks(info: Any) -> tuple:
    return (pytest.mark.slow,) if info.fused else ()


def _configs(info: Any) -> list[dict[str, Any]]:
    """A row's configurations, and its first one on the per-parameter path (``foreach=False``)."""
    if info.fused:
        return [info.kwargs]
    configs = [info.kwargs] + info.extra_kwargs
    if "foreach" in inspect.signature(info.cls).parameters and "foreach" not in info.kwargs:
        configs.append({**info.kwargs, "foreach": False})
    return configs


def _cases(loss_based: bool) -> tuple[str, ...]:
    return CASES if loss_based else CASES[:2]


ROW_CASES = [
    pytest.param((lambda params, info=info, kw=kw: info.build(params, **kw)), case, f"{info.name}{kw}",
                 id=f"{info.name}-{i}-{case}", marks=_marks(info))
    for info in OPTIM_DB + FUSED_DB
    for i, kw in enumerate(_configs(info))
    for case in _cases(info.requires_loss)
]
REGISTRY_CASES = [
    pytest.param((lambda params, name=name: tuneless.create(name, params)), case, name, id=f"{name}-{case}")
    for name in tuneless.available(source="tuneless")
    for case in _cases(bool(getattr(tuneless.registry.entry(name).factory, "requires_loss", False)))
]
FOREIGN_BASES = {
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
}
WRAPPED_CASES = [
    pytest.param((lambda p, b=base, w=wrapper: w(b(p))), case, f"{wrapper.__name__}({name})",
                 id=f"{wrapper.__name__}({name})-{case}")
    for wrapper in (tuneless.Mechanic, tuneless.ScheduleFree)
    for name, base in FOREIGN_BASES.items()
    for case in ("nan_grad", "inf_grad")
]


@pytest.mark.parametrize("build, case, name", ROW_CASES)
def test_every_row_skips_a_nonfinite_step(build, case, name) -> None:
    check_skipped(build, case, name)


@pytest.mark.parametrize("build, case, name", REGISTRY_CASES)
def test_every_registered_optimizer_skips_a_nonfinite_step_at_its_defaults(build, case, name) -> None:
    check_skipped(build, case, name)


@pytest.mark.parametrize("build, case, name", WRAPPED_CASES)
def test_wrappers_over_torch_optimizers_skip_a_nonfinite_step(build, case, name) -> None:
    check_skipped(build, case, name)


@pytest.mark.parametrize("name", tuneless.available(source="tuneless"))
def test_opting_out_propagates_the_nan_as_torch_optim_does(name) -> None:
    model, opt = run(lambda params: tuneless.create(name, params, skip_nonfinite=False), "nan_grad")
    assert SKIPPED_STEPS_KEY not in opt.param_groups[0], f"{name}: counted skipped steps with skipping off"
    values = [p.detach() for p in model.params] + [
        t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert not all(bool(torch.isfinite(t).all()) for t in values), (
        f"{name} with skip_nonfinite=False: a NaN gradient left everything finite (it must propagate)")


@pytest.mark.parametrize("name", tuneless.available(source="tuneless"))
def test_skip_nonfinite_must_be_a_bool(name) -> None:
    with pytest.raises(tuneless.InvalidArgumentError, match="skip_nonfinite"):
        tuneless.create(name, Tiny().params, skip_nonfinite="yes")


def test_the_flag_is_one_read_of_the_gradients_and_no_host_sync() -> None:
    from tuneless._host_reads import HostReadCounter

    model = Tiny()
    opt = tuneless.Prodigy(model.params)
    for step in range(3):
        opt.zero_grad()
        model.loss(step).backward()
        with HostReadCounter() as reads:
            opt.step()
    assert reads.count == 0, reads.describe() if hasattr(reads, "describe") else reads.count
    assert isinstance(opt.param_groups[0][SKIPPED_STEPS_KEY], torch.Tensor)
    assert opt.skipped_steps() == [0]



#: fused methods whose read-only first kernel decides finiteness, and how many of 4 steps still
#: read the gradients for the flag (AdamHD's dot exists from its second step on)
RIDERS = {"Prodigy": (lambda params, fused: tuneless.Prodigy(params, fused=fused), 0),
          "AdamHD": (lambda params, fused: tuneless.AdamHD(params, fused=fused, weight_decay=0.01), 1),
          "Mechanic(SGD)": (lambda params, fused: tuneless.Mechanic(torch.optim.SGD(params, lr=0.1, momentum=0.9),
                                                                    fused=fused), 0),
          "Tuneless": (lambda params, fused: tuneless.Tuneless(params, fused=fused, weight_decay=0.01), 0)}


@pytest.mark.slow
@pytest.mark.parametrize("rider", list(RIDERS))
@pytest.mark.parametrize("case", ["finite", "nan_grad", "inf_grad"])
def test_fused_steps_decide_from_their_own_sums_without_a_read_of_their_own(monkeypatch, case: str, rider: str) -> None:
    """Prodigy (every group fused) takes the flag from its read-only estimate kernels'
    ||s_new||_1, AdamHD from its dot kernels' <g, m / (sqrt(v) + eps)>, Mechanic from its
    statistics' <Delta, g>, Tuneless from its statistics kernel's sum of g (issue 16: "ride on
    sums every method already takes"): the scope's own
    read of the gradients (nonfinite_count) is not called, and the step skips or not exactly as
    the vectorized path, which does read them."""
    make, fused_reads = RIDERS[rider]
    import tuneless.optim._batched as batched

    real = batched.nonfinite_count
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "nonfinite_count", counting)
    finals = {}
    for fused in (True, False):
        calls.clear()
        model = Tiny()
        opt = make(model.params, fused)
        for step in range(4):
            opt.zero_grad()
            loss = model.loss(step)
            loss.backward()
            if step == 2 and case != "finite":
                model.params[0].grad.view(-1)[0] = float("nan") if case == "nan_grad" else float("inf")
            opt.step(loss=loss) if opt.requires_loss else opt.step()
        assert len(calls) == (fused_reads if fused else 4), f"fused={fused}: {len(calls)} reads of the gradients"
        assert opt.skipped_steps() == [0 if case == "finite" else 1]
        assert all(torch.isfinite(p).all() for p in model.params)
        finals[fused] = [p.detach().clone() for p in model.params]
    for a, b in zip(finals[True], finals[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)



GRAD_CASES = [
    pytest.param((lambda params, info=info, kw=kw: info.build(params, **kw)), f"{info.name}{kw}",
                 id=f"{info.name}-{i}")
    for info in OPTIM_DB
    for i, kw in enumerate(_configs(info))
] + [pytest.param(build, name, id=name) for build, _, name in
     ((p.values[0], None, p.values[2]) for p in WRAPPED_CASES if p.values[1] == "nan_grad")]


@pytest.mark.parametrize("build, name", GRAD_CASES)
def test_a_step_never_changes_the_gradients(build, name: str) -> None:
    """On the CPU paths a finite step computes from the gradients themselves (no copy: the
    flag is read where it lies, ``known_finite``), so nothing may write into them; nor into
    those of a step that is not finite. Every row and path, wrappers over torch optimizers too."""
    from tuneless.optim import _batched as batched

    for context in (lambda: contextlib.nullcontext(), batched.device_paths_on_cpu):
        model = Tiny()
        with context():
            opt = build(model.groups)
            for step in range(4):
                opt.zero_grad(set_to_none=True)
                loss = model.loss(step)
                loss.backward()
                if step == 2:
                    _inject(model, "nan_grad")
                before = [p.grad.clone() for p in model.params if p.grad is not None]
                opt.step(loss=loss)
                after = [p.grad for p in model.params if p.grad is not None]
                for a, b in zip(before, after):
                    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), f"{name}: step {step} wrote into a gradient"
                    assert torch.equal(a.isnan(), b.isnan()), f"{name}: step {step} wrote into a gradient"


FIRST_STEP_BUILDS = {
    **{name: (lambda params, name=name: tuneless.create(name, params)) for name in ("prodigy", "tuneless", "cocob", "dog")},
    # state a torch optimizer creates at a bad first step is set back to its start (zeros)
    "Mechanic(Adam)": lambda params: tuneless.Mechanic(torch.optim.Adam(params, lr=0.01)),
    "Mechanic(SGD-momentum)": lambda params: tuneless.Mechanic(torch.optim.SGD(params, lr=0.1, momentum=0.9)),
    "ScheduleFree(Adam)": lambda params: tuneless.ScheduleFree(torch.optim.Adam(params, lr=0.01)),
}


@pytest.mark.parametrize("name", list(FIRST_STEP_BUILDS))
def test_a_skipped_first_step_moves_nothing_and_the_next_step_is_a_first_step(name: str) -> None:
    """A NaN at the very first step (before any state exists): the run equals the one that starts a step later."""
    build = FIRST_STEP_BUILDS[name]
    clean = Tiny()
    ref = build(clean.groups)
    bad = Tiny()
    opt = build(bad.groups)
    for step in range(6):
        for model, o in ((clean, ref), (bad, opt)):
            o.zero_grad()
            loss = model.loss(step)
            loss.backward()
            if step == 0:
                if o is ref:
                    continue
                model.w.grad[0, 0] = float("nan")
            o.step(loss=loss)
    for a, b in zip(clean.params, bad.params):
        assert torch.isfinite(b).all(), f"{name}: a NaN first step left non-finite parameters"
        assert torch.equal(a, b), f"{name}: a NaN first step changed the run"
    assert opt.skipped_steps() == [1, 1]
    assert isinstance(opt, TunelessOptimizer)


def test_known_finite_reads_the_flag_only_on_the_cpu_paths_and_is_the_one_exempted_read() -> None:
    from tests.test_contract import SyncCounter
    from tuneless.optim import _batched as batched
    from tuneless.optim.base import known_finite, known_true

    with SyncCounter() as counter:
        assert known_finite(torch.tensor(True)) and not known_finite(torch.tensor(False)) and not known_finite(None)
    assert (counter.count, counter.exempted) == (0, 2), counter.sites
    with SyncCounter() as counter:  # (the read is known_true's, which known_finite calls)
        assert known_true(torch.tensor(True)) and not known_true(torch.tensor(False)) and not known_true(None)
    assert (counter.count, counter.exempted) == (0, 2), counter.sites
    with batched.device_paths_on_cpu(), SyncCounter() as counter:
        assert not known_finite(torch.tensor(True)) and not known_true(torch.tensor(True))  # never read there
    assert (counter.count, counter.exempted) == (0, 0)
    with SyncCounter() as counter:
        bool(torch.tensor(True))  # the same read anywhere else is counted
    assert counter.count == 1


#: loss-based optimizers, wrappers among them, whose step decides finiteness on the loss
MEAN_LOSS_CASES = {
    "Polyak": lambda params: tuneless.Polyak(params),
    "Tuneless": lambda params: tuneless.Tuneless(params),
    "Tuneless(fused)": lambda params: tuneless.Tuneless(params, fused=True),
    "ScheduleFree(MoMo)": lambda params: tuneless.ScheduleFree(tuneless.Momo(params), r=0.0),
    "Mechanic(Polyak)": lambda params: tuneless.Mechanic(tuneless.Polyak(params)),
}


@pytest.mark.parametrize("name", list(MEAN_LOSS_CASES))
def test_the_decision_takes_the_ranks_mean_loss(monkeypatch, name: str) -> None:
    """Under DDP one rank's loss may be infinite while the averaged gradients are finite: every
    rank must skip that step, so the decision takes the ranks' mean loss, wrappers included (they
    used to decide on their own rank's loss, then hand it to the base, which averaged it). Simulated
    in one process: at step 2 the mean over the "ranks" (tuneless.distributed.average_loss) is
    infinite while this process's loss and gradients are finite. Exactly one averaging per step."""
    import tuneless.distributed as dist

    real = dist.average_loss
    calls: list[int] = []

    def mean_over_ranks(optimizer, loss):
        calls.append(step)
        return loss + float("inf") if step == 2 else real(optimizer, loss)

    monkeypatch.setattr(dist, "average_loss", mean_over_ranks)
    model = Tiny()
    opt = MEAN_LOSS_CASES[name](model.params)
    for step in range(4):
        opt.zero_grad()
        loss = model.loss(step)
        loss.backward()
        before = [p.detach().clone() for p in model.params]
        opt.step(loss=loss.detach())
        if step == 2:
            assert all(torch.equal(a, p) for a, p in zip(before, model.params)), f"{name}: the step moved"
    assert sum(opt.skipped_steps()) == len(opt.param_groups), f"{name}: skipped {opt.skipped_steps()}"
    assert calls == [0, 1, 2, 3], f"{name}: averaged the loss at steps {calls}"
    assert all(torch.isfinite(p).all() for p in model.params)
