"""The contract every optimizer keeps: each generic test runs over every row of OPTIM_DB."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import re
from typing import Any, Callable

import pytest
import torch

from tests.device import TEST_DEVICE
from tests.optim_db import FUSED_DB, OPTIM_DB, OptimizerInfo, _compiler_failure
from tuneless import STEP_SIZE_KEY, InvalidArgumentError, LossRequiredError, SparseGradientError, UnknownArgumentError
from tuneless._host_reads import HostReadCounter
from tuneless.optim import _batched as batched
from tuneless.optim import _fused
from tuneless.optim.base import TunelessOptimizer

def _marks(info: OptimizerInfo) -> tuple:
    """Fused rows compile (tens of seconds per kernel and dtype on 2 cores, once per process):
    marked slow, so that ``-m "not slow"`` leaves them out."""
    return (pytest.mark.slow,) if info.fused else ()


ROWS = [pytest.param(info, id=info.name, marks=_marks(info)) for info in OPTIM_DB + FUSED_DB]
CONFIGS = [
    pytest.param(info, kw, id=f"{info.name}-{i}", marks=_marks(info))
    for info in OPTIM_DB + FUSED_DB
    for i, kw in enumerate([info.kwargs] + info.extra_kwargs)
]
#: Without the fused rows: the tests of the vectorized path's variants (cache blocks, the other
#: devices' branch), which the compiled kernels do not take.
UNFUSED_CONFIGS = [c for c in CONFIGS if not c.values[0].fused]


@pytest.fixture(autouse=True)
def _fused_rows_ran_compiled(request):
    """After a test of a fused row: every kernel compiled and ran compiled (none fell back to
    the uncompiled function, none ran out of variants), so the row tested the kernels."""
    yield
    callspec = getattr(request.node, "callspec", None)
    info = callspec.params.get("info") if callspec is not None else None
    if isinstance(info, OptimizerInfo) and info.fused and _compiler_failure() is None:
        fallen = [k.per_tensor.__name__ for k in _fused.KERNELS
                  if k.per_tensor.__module__.startswith("tuneless.") and (k.failed or k._warned)]
        assert not fallen, f"{info.name}: fused kernels ran uncompiled: {fallen}"


# ----------------------------------------------------------------------------- a small model


class Model:
    """Three tensors of different shapes; a smooth, non-convex loss whose minimum is 0."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        on = dict(device=TEST_DEVICE, dtype=dtype)
        self.w = torch.nn.Parameter((0.5 * torch.randn(4, 3, generator=g, dtype=torch.float64)).to(**on))
        self.b = torch.nn.Parameter(torch.zeros(4, **on))
        self.v = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64).to(**on))
        x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        w_true = torch.randn(4, 3, generator=g, dtype=torch.float64)
        self.x = x.to(**on)
        self.y = torch.tanh(x.to(dtype).to(torch.float64) @ w_true.T + 0.1).to(**on)  # realizable: min 0
        self.v_target = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=torch.float64).to(**on)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.w, self.b, self.v]

    def loss(self) -> torch.Tensor:
        pred = torch.tanh(self.x @ self.w.T + self.b)
        return ((pred - self.y) ** 2).mean() + 0.5 * ((self.v - self.v_target) ** 2).sum()

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def step(opt: torch.optim.Optimizer, model: Model) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = model.loss()
    loss.backward()
    if isinstance(opt, TunelessOptimizer) or getattr(opt, "accepts_loss", False):
        opt.step(loss=loss)
    else:
        opt.step()
    return loss.detach()


def run(info: OptimizerInfo, steps: int, dtype=torch.float64, groups=None, **overrides):
    model = Model(dtype)
    params = model.params if groups is None else groups(model)
    opt = info.build(params, **overrides)
    losses = [step(opt, model) for _ in range(steps)]
    return model, opt, losses


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("info", ROWS)
def test_bad_arguments_raise_the_stated_error(info: OptimizerInfo) -> None:
    assert info.error_inputs, f"{info.name}: the table must list at least one invalid configuration"
    for case in info.error_inputs:
        with pytest.raises(case.error, match=case.match):
            info.build(Model().params, **case.kwargs)


@pytest.mark.parametrize("info", ROWS)
def test_unknown_keyword_is_refused_with_a_suggestion(info: OptimizerInfo) -> None:
    assert info.misspelt is not None
    with pytest.raises(UnknownArgumentError, match=r"unknown keyword argument .*did you mean"):
        info.build(Model().params, **{info.misspelt: 0.1})


# ----------------------------------------------------------------------------- stepping


@pytest.mark.parametrize("info, kwargs", CONFIGS)
def test_a_few_steps_go_downhill(info: OptimizerInfo, kwargs) -> None:
    model = Model()
    opt = info.build(model.params, **kwargs)
    first = model.loss().item()
    for _ in range(info.downhill_steps):
        step(opt, model)
    with torch.no_grad(), opt.evaluation_point() if hasattr(opt, "evaluation_point") else contextlib.nullcontext():
        last = model.loss().item()
    assert last < first, f"{info.name}{kwargs}: loss went from {first} to {last}"


@pytest.mark.parametrize("info", ROWS)
def test_loss_requirement(info: OptimizerInfo) -> None:
    model = Model()
    opt = info.build(model.params)
    model.loss().backward()
    if info.requires_loss:
        with pytest.raises(LossRequiredError, match=r"step\(loss=loss\)"):
            opt.step()
    else:
        opt.step()  # no loss needed
    # a closure works for everyone and its loss is returned
    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert isinstance(returned, torch.Tensor) and returned.numel() == 1


@pytest.mark.parametrize("info, kwargs", CONFIGS)
def test_vectorized_matches_per_parameter_path(info: OptimizerInfo, kwargs) -> None:
    """The vectorized path (a fused row: the compiled kernels) against the per-parameter path."""
    m1, _, _ = run(info, 12, **{**kwargs, "foreach": True})
    m2, _, _ = run(info, 12, **{**kwargs, "foreach": False, **({"fused": False} if info.fused else {})})
    for a, b in zip(m1.params, m2.params):
        torch.testing.assert_close(a, b, rtol=info.foreach_rtol, atol=1e-12)


@pytest.mark.parametrize("info, kwargs", UNFUSED_CONFIGS)
def test_vectorized_matches_per_parameter_path_with_cache_blocks_cut_small(info: OptimizerInfo, kwargs,
                                                                          monkeypatch) -> None:
    """The same with the CPU's cache-sized blocks and dot chunks made tiny, so that the blocked
    passes and the chunked dot products cut tensors (w: 12 floats) and pack the others."""
    monkeypatch.setattr(batched, "CPU_BLOCK_NUMEL", 5)
    monkeypatch.setattr(batched, "CPU_DOT_NUMEL", 5)
    monkeypatch.setattr(batched, "CPU_DOT_MIN_NUMEL", 5)
    m1, _, _ = run(info, 12, **{**kwargs, "foreach": True})
    m2, _, _ = run(info, 12, **{**kwargs, "foreach": False})
    for a, b in zip(m1.params, m2.params):
        torch.testing.assert_close(a, b, rtol=info.foreach_rtol, atol=1e-12)


@pytest.mark.parametrize("info, kwargs", UNFUSED_CONFIGS)
def test_other_devices_path_matches_the_cpu_path(info: OptimizerInfo, kwargs) -> None:
    """The vectorized path written for GPUs and other devices (batched multi-tensor reductions
    over whole lists, no blocks or scratch), run on the CPU under the private switch, agrees
    with the CPU's vectorized path and with the per-parameter path."""
    with batched.device_paths_on_cpu():
        m1, o1, _ = run(info, 12, **{**kwargs, "foreach": True})
    m2, o2, _ = run(info, 12, **{**kwargs, "foreach": True})
    m3, o3, _ = run(info, 12, **{**kwargs, "foreach": False})
    for a, b, c in zip(m1.params, m2.params, m3.params):
        torch.testing.assert_close(a, b, rtol=info.foreach_rtol, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=info.foreach_rtol, atol=1e-12)
    # the learned scalars too (d, Mechanic's tuner, ...): early on some barely move the parameters
    for other in (o2, o3):
        for g1, g2 in zip(o1.param_groups, other.param_groups):
            for key, value in g1.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, g2[key], rtol=info.foreach_rtol, atol=1e-15, msg=lambda m: f"{key}: {m}")


def test_the_switch_selects_the_other_devices_path() -> None:
    """Under the switch the CPU's blocks, scratch and chunked dots are off (one block for a list
    larger than a block, no chunked dot), and they are back after it."""
    big = [torch.zeros(batched.CPU_BLOCK_NUMEL), torch.zeros(3)]
    assert len(batched.cache_blocks(big)) == 2 and batched.cpu_paths(torch.device("cpu"))
    with batched.device_paths_on_cpu():
        assert not batched.cpu_paths(torch.device("cpu"))
        assert len(batched.cache_blocks(big)) == 1
        assert batched.chunked_dots([big, big], [(0, 1)], torch.float32, batched.Scratch()) is None
    assert batched.cpu_paths(torch.device("cpu"))


@pytest.mark.parametrize("info, kwargs", CONFIGS)
def test_resume_from_checkpoint_is_bit_exact(info: OptimizerInfo, kwargs) -> None:
    k, n = 4, 4
    full, _, _ = run(info, k + n, **kwargs)
    model = Model()
    opt = info.build(model.params, **kwargs)
    for _ in range(k):
        step(opt, model)
    buffer = io.BytesIO()
    torch.save({"model": model.snapshot(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Model()
    with torch.no_grad():
        for p, s in zip(resumed.params, saved["model"]):
            p.copy_(s)
    opt2 = info.build(resumed.params, **kwargs)
    opt2.load_state_dict(saved["optim"])
    for _ in range(n):
        step(opt2, resumed)
    for a, b in zip(full.params, resumed.params):
        assert torch.equal(a, b), f"{info.name}: resumed trajectory differs from the uninterrupted one"


@pytest.mark.parametrize("info", ROWS)
def test_state_dict_round_trip(info: OptimizerInfo) -> None:
    _, opt, _ = run(info, 3)
    sd = opt.state_dict()
    model = Model()
    opt2 = info.build(model.params)
    opt2.load_state_dict(copy.deepcopy(sd))
    sd2 = opt2.state_dict()
    assert _flatten(sd) == _flatten(sd2)


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = (tuple(obj.shape), obj.dtype, obj.detach().cpu().to(torch.float64).flatten().tolist())
    else:
        out[prefix] = obj
    return out


# ----------------------------------------------------------------------------- groups, lr, schedulers


def _two_groups(lr_a: float, lr_b: float):
    def groups(model: Model):
        return [{"params": [model.w, model.b], "lr": lr_a}, {"params": [model.v], "lr": lr_b}]

    return groups


@pytest.mark.parametrize("info", ROWS)
def test_param_groups_with_different_lr(info: OptimizerInfo) -> None:
    base = Model().snapshot()
    # a group with lr = 0 does not move; the other does
    model, opt, _ = run(info, 3, groups=_two_groups(1.0, 0.0))
    assert not torch.equal(model.w, base[0])
    assert torch.equal(model.v, base[2]), f"{info.name}: a group with lr=0 moved"
    assert len(opt.param_groups) == 2
    if info.lr_is_multiplier:
        # the first step of a group scales exactly with its lr
        m1, _, _ = run(info, 1, groups=_two_groups(1.0, 1.0))
        m2, _, _ = run(info, 1, groups=_two_groups(1.0, 0.25))
        d1 = m1.v - base[2]
        d2 = m2.v - base[2]
        torch.testing.assert_close(d2, 0.25 * d1, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("info", ROWS)
def test_lr_scheduler_changes_the_step(info: OptimizerInfo) -> None:
    model = Model()
    opt = info.build(model.params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 3 else 0.0)
    for _ in range(3):
        step(opt, model)
        sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = model.snapshot()
    for _ in range(2):
        step(opt, model)
        sched.step()
    for a, b in zip(model.params, frozen):
        assert torch.equal(a, b), f"{info.name}: lr scheduled to 0 still moved the parameters"


# ----------------------------------------------------------------------------- a tensor lr


def _lr_pair(info: OptimizerInfo, kwargs) -> tuple[torch.Tensor, float]:
    """``torch.tensor(<the configuration's lr>)`` (float32, as users write it) and the float it
    holds (the float run compares with that float, e.g. float32(0.05), not 0.05)."""
    lr = torch.tensor(info.float_lr(kwargs))
    return lr, float(lr)


@pytest.mark.parametrize("info, kwargs", CONFIGS)
def test_tensor_lr_follows_the_float_lr_trajectory(info: OptimizerInfo, kwargs) -> None:
    """``lr=torch.tensor(x)`` trains exactly as ``lr=x`` on every path (bit for bit), the tensor
    stays the group's lr (schedulers fill it in place), and no step reads it on the host."""
    for name, path, context in _paths(info, kwargs):
        lr, lr_float = _lr_pair(info, kwargs)
        with context():
            m1, _, _ = run(info, 4, **{**path, "lr": lr_float})
            model = Model()
            opt = info.build(model.params, **{**path, "lr": lr})
            step(opt, model)  # state initialization may read values once
            with SyncCounter() as counter:
                for _ in range(3):
                    step(opt, model)
        assert counter.count == 0, f"{info.name} {path} ({name}): host reads with a tensor lr: {counter.sites}"
        assert any(g["lr"] is lr for g in opt.param_groups), f"{info.name}: the tensor lr was replaced"
        for a, b in zip(m1.params, model.params):
            if info.tensor_lr_exact:
                assert torch.equal(a, b), f"{info.name} {path} ({name}): tensor lr and float lr differ by {(a - b).abs().max()}"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("info", ROWS)
def test_lr_scheduler_drives_a_tensor_lr(info: OptimizerInfo) -> None:
    """A scheduler fills a tensor lr in place; the run follows the float-lr run under the same
    schedule, and a tensor lr scheduled to 0 stops the parameters (a number lr of 0 freezes the
    group, statistics included; a tensor lr is never read, so its group takes steps of size 0:
    see ``OptimizerInfo.tensor_lr_zero_stops``)."""
    factors = [1.0, 0.5, 0.25, 0.0, 0.0]
    models = []
    for lr in _lr_pair(info, info.kwargs):
        model = Model()
        opt = info.build(model.params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factors[min(t, len(factors) - 1)])
        for _ in range(3):
            before = model.snapshot()
            step(opt, model)
            sched.step()
        last_move = max((a - b).abs().max().item() for a, b in zip(model.params, before))  # at lr x 0.25
        assert all(g["lr"] == 0.0 for g in opt.param_groups)
        if isinstance(lr, torch.Tensor):
            assert any(g["lr"] is lr for g in opt.param_groups) and lr.item() == 0.0
        frozen, moves = model.snapshot(), []
        for _ in range(2):
            before = model.snapshot()
            step(opt, model)
            sched.step()
            moves.append(max((a - b).abs().max().item() for a, b in zip(model.params, before)))
        if not isinstance(lr, torch.Tensor):
            for a, b in zip(model.params, frozen):
                assert torch.equal(a, b), f"{info.name}: lr scheduled to 0 still moved the parameters"
        elif info.tensor_lr_zero_stops:  # up to one rounding of Schedule-Free's y -> z -> y round trip
            assert max(moves) <= 1e-15, f"{info.name}: a tensor lr scheduled to 0 still moved the parameters: {moves}"
        else:  # coasting on lr-scaled statistics: bounded by the last steps taken (a known limitation)
            assert max(moves) < 3 * last_move, f"{info.name}: with a tensor lr of 0: steps {moves}, before {last_move}"
        models.append((model, frozen))
    (_, float_run), (_, tensor_run) = models
    for a, b in zip(float_run, tensor_run):  # until the lr reached 0
        if info.tensor_lr_exact:
            assert torch.equal(a, b), f"{info.name}: scheduled tensor lr and float lr differ by {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("info", [r for r in ROWS if r.values[0].factory is None and not r.values[0].fused])
def test_tensor_lr_is_checked_at_construction(info: OptimizerInfo) -> None:
    """A bad tensor lr is refused with the usual message; a one-element tensor is accepted."""
    bad = [(torch.tensor(-1.0), r"lr = tensor\(-1\.\) is invalid; allowed: 0 <= lr"),
           (torch.tensor(float("nan")), r"lr = tensor\(nan\) is invalid"),
           (torch.ones(2), r"lr = tensor\(\[1\., 1\.\]\) is invalid; allowed: .*one element"),
           (torch.tensor(1), r"lr = tensor\(1\) is invalid; allowed: .*floating-point")]
    for lr, match in bad:
        with pytest.raises(InvalidArgumentError, match=match):
            info.build(Model().params, lr=lr)
    lr, lr_float = _lr_pair(info, info.kwargs)
    m1, _, _ = run(info, 2, lr=lr.reshape(1))
    m2, _, _ = run(info, 2, lr=lr_float)
    for a, b in zip(m1.params, m2.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if info.tensor_lr_exact else 1e-12)


# ----------------------------------------------------------------------------- dtypes, frozen params, grads


#: Every row in three dtypes; a fused row in float64 and bfloat16 only (each dtype compiles its
#: kernels anew, tens of seconds on 2 cores; bfloat16's kernels take float32 coefficients, so
#: they cover float32 arithmetic too).
DTYPE_CASES = [pytest.param(row.values[0], dtype, id=f"{row.id}-{str(dtype).split('.')[1]}", marks=row.marks)
               for row in ROWS for dtype in (torch.float64, torch.float32, torch.bfloat16)
               if not (row.values[0].fused and dtype is torch.float32)]


@pytest.mark.parametrize("info, dtype", DTYPE_CASES)
def test_dtype_is_kept(info: OptimizerInfo, dtype) -> None:
    if dtype is torch.bfloat16 and not info.supports_bf16:
        pytest.fail(f"{info.name} must support bfloat16")
    model, opt, losses = run(info, 5, dtype=dtype)
    for p in model.params:
        assert p.dtype == dtype
        assert torch.isfinite(p.float()).all()
    # sums that grow for as long as training runs may be kept in float64 (declared by the class)
    wide = {k for o in (opt, getattr(opt, "base_optimizer", None)) for k in getattr(type(o), "_float64_state", ())}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                expected = torch.float64 if key in wide else dtype
                assert value.dtype == expected, f"{info.name}: state {key!r} is {value.dtype} for {dtype} params"


@pytest.mark.parametrize("info", ROWS)
def test_parameter_without_gradient_is_untouched(info: OptimizerInfo) -> None:
    model = Model()
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = info.build(model.params + [frozen])
    for _ in range(4):
        step(opt, model)  # `frozen` never gets a gradient
    assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    assert frozen.grad is None


@pytest.mark.parametrize("info", ROWS)
def test_gradient_is_not_modified(info: OptimizerInfo) -> None:
    model = Model()
    opt = info.build(model.params)
    for _ in range(3):
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        grads = [p.grad.clone() for p in model.params]
        opt.step(loss=loss) if isinstance(opt, TunelessOptimizer) else opt.step()
        for p, g in zip(model.params, grads):
            assert torch.equal(p.grad, g), f"{info.name} modified p.grad"


@pytest.mark.parametrize("info", ROWS)
def test_sparse_gradient_is_refused(info: OptimizerInfo) -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = info.build([p])
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.0, 2.0], dtype=torch.float64), (4,))
    with pytest.raises(SparseGradientError, match="sparse"):
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("info", ROWS)
def test_step_size_is_published_on_the_device(info: OptimizerInfo) -> None:
    model, opt, _ = run(info, 2, groups=_two_groups(1.0, 0.5))
    for group in opt.param_groups:
        value = group[STEP_SIZE_KEY]
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert value.device == model.w.device
        assert torch.isfinite(value) and value >= 0
    assert len(opt.effective_lrs()) == 2


# ----------------------------------------------------------------------------- copying


@pytest.mark.parametrize("info", ROWS)
def test_deepcopy_and_pickle(info: OptimizerInfo) -> None:
    """A copy of (model, optimizer), by deepcopy or pickle, holds the same state and, stepped,
    follows the original's trajectory exactly (its state is its own: stepping it leaves the
    original as it was)."""
    model, opt, _ = run(info, 2)
    clones = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    before = model.snapshot()
    for clone_model, clone in clones:
        assert type(clone) is type(opt)
        assert _flatten(clone.state_dict()) == _flatten(opt.state_dict())
        for _ in range(3):
            step(clone, clone_model)
        for a, b in zip(model.params, before):
            assert torch.equal(a, b), f"{info.name}: stepping a copy moved the original"
    for _ in range(3):
        step(opt, model)
    assert any(not torch.equal(a, start) for a, start in zip(model.params, before)), f"{info.name} did not move"
    for clone_model, _ in clones:
        for a, b in zip(model.params, clone_model.params):
            assert torch.equal(a, b), f"{info.name}: the copy's trajectory differs from the original's"


# ----------------------------------------------------------------------------- host syncs


class SyncCounter(HostReadCounter):
    """Counts host reads of tensor values: Python-level ones (item, bool, float, int, index,
    tolist, numpy) and those torch makes inside an op (``aten._local_scalar_dense``: a 0-d tensor
    given to a Scalar overload; ``aten.equal``, ``nonzero``, ...), seen by a TorchDispatchMode.
    Reads by torch.optim's own code (its CPU step counters) are exempted by where they come
    from; see :mod:`tuneless._host_reads`."""


def _paths(info: OptimizerInfo, kwargs) -> list[tuple[str, dict, Callable[[], Any]]]:
    """The implementations of a configuration, as (name, kwargs, context to run it in): the
    vectorized path (the CPU's, and the one written for other devices, forced on the CPU) and
    the per-parameter path; for a fused row, the compiled kernels."""
    if info.fused:
        return [("fused", kwargs, contextlib.nullcontext)]
    return [("vectorized", {**kwargs, "foreach": True}, contextlib.nullcontext),
            ("vectorized, other devices' path", {**kwargs, "foreach": True}, batched.device_paths_on_cpu),
            ("per-parameter", {**kwargs, "foreach": False}, contextlib.nullcontext)]


@pytest.mark.parametrize("info, kwargs", CONFIGS)
def test_a_step_makes_no_host_sync(info: OptimizerInfo, kwargs) -> None:
    """From the second step on (the first may read values while it creates the state), no step
    reads a tensor value on the host, on any path; nor do Schedule-Free's switches to the
    evaluation point and back."""
    for name, path, context in _paths(info, kwargs):
        model = Model()
        with context():
            opt = info.build(model.params, **path)
            step(opt, model)  # state initialization may read values once
            with SyncCounter() as counter:
                for _ in range(2):
                    step(opt, model)  # zero_grad, forward, backward and the step
            assert counter.count == 0, f"{info.name} {path} ({name}): {counter.count} host reads in two steps: {counter.sites}"
            if callable(getattr(opt, "eval", None)):  # Schedule-Free: both modes
                with SyncCounter() as counter:
                    with opt.evaluation_point():
                        pass
                    opt.eval()
                    opt.train()
                assert counter.count == 0, f"{info.name} {path} ({name}): host reads switching modes: {counter.sites}"


def test_sync_counter_counts_python_and_aten_reads() -> None:
    with SyncCounter() as counter:
        float(torch.tensor(1.0))                                 # Python: one read (its aten read is part of it)
        bool(torch.tensor(True))                                 # Python
        torch._foreach_add_([torch.zeros(2)], torch.tensor(1.0))  # a 0-d tensor as a Scalar: aten
        torch.zeros(2).lerp_(torch.ones(2), torch.tensor(0.5))   # Tensor overload: no read
        torch.equal(torch.zeros(2), torch.ones(2))               # aten.equal
    assert (counter.python, counter.aten, counter.count) == (2, 2, 4), counter.sites


def test_sync_counter_exempts_only_torch_optim_own_reads() -> None:
    """torch's Adam (for-loop) reads its CPU step counter in its step: exempted. The same read
    made by other code called from inside a torch.optim step is counted."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], foreach=False)
    p.grad = torch.ones(3)
    opt.step()
    with SyncCounter() as counter:
        opt.step()
    assert counter.count == 0 and counter.exempted > 0

    class Reads(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            self.param_groups[0]["params"][0].sum().item()  # made here, not in torch/optim
            return super().step(closure)

    opt = Reads([p], lr=0.1)
    with SyncCounter() as counter:
        opt.step()
    assert counter.count == 1 and counter.sites[0].startswith("python Tensor.item at " + __file__)
