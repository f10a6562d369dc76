"""Fused steps (``fused=True``): one compiled single-pass kernel per group of tensors.

The fused kernels are the per-parameter functions compiled; these tests check that they give
the per-parameter path's results (to float reassociation), with the padding of a last group,
non-contiguous tensors, several param groups and dtypes, without host syncs, and that a
failed compilation falls back with a warning. Compiling takes seconds per configuration, so the
configurations are few. Where torch.compile cannot compile a CPU kernel (no C++ compiler), the
tests of compiled kernels skip and say so: they would compare the fallback with itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.device import TEST_DEVICE
from tests.optim_db import require_working_compiler
from tests.test_contract import SyncCounter
from tuneless import (COCOB, AdamHD, DAdaptAdaGrad, DAdaptAdam, InvalidArgumentError, Mechanic, Prodigy, ScheduleFreeAdamW,
                      ScheduleFree, ScheduleFreeProdigy, ScheduleFreeSGD, Tuneless)
from tuneless.optim import _fused
from tuneless.optim._fused import GROUP_SIZE, FusedKernel, size_class


def _axpy_kernel(x, g, a, sum_dtype):
    """x += a * g; returns <g, x> (new x) and sum |g|."""
    x.add_(g * a)
    return (g * x).sum(dtype=sum_dtype), g.abs().sum(dtype=sum_dtype)


def _lists(n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(i % 4 + 2, i % 3 + 2, generator=gen, dtype=dtype) for i in range(n)]
    gs = [torch.randn(x.shape, generator=gen, dtype=dtype) for x in xs]
    xs.append(torch.randn(3, 5, generator=gen, dtype=dtype).t())  # not contiguous
    gs.append(torch.randn(5, 3, generator=gen, dtype=dtype))
    return xs, gs


def test_grouped_kernel_matches_the_loop_with_padding_and_a_non_contiguous_tensor(compiles) -> None:
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    xs, gs = _lists(GROUP_SIZE + 3)  # one full group, a padded one, and the non-contiguous tensor
    expected_x = [x + 0.5 * g for x, g in zip(xs, gs)]
    expected = [sum((g * x).sum() for g, x in zip(gs, expected_x)), sum(g.abs().sum() for g in gs)]
    for _ in range(2):  # the padding is zeroed again before each use
        ys = [x.clone() for x in xs]
        sums = kernel([ys, gs], (torch.tensor(0.5, dtype=torch.float64), torch.float64), sum_dtype=torch.float64,
                      device=torch.device("cpu"))
        for y, e in zip(ys, expected_x):
            torch.testing.assert_close(y, e, rtol=1e-14, atol=1e-14)
        for got, want in zip(sums, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not kernel._failed


def test_a_failed_compilation_warns_once_and_gives_the_same_results(monkeypatch) -> None:
    monkeypatch.setattr(_fused, "_WARNED_REASONS", set())
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(kernel, "_compiled_grouped", lambda key: broken)
    xs, gs = _lists(5)
    ys = [x.clone() for x in xs]
    with pytest.warns(RuntimeWarning, match="running it uncompiled"):
        kernel([ys, gs], (torch.tensor(2.0, dtype=torch.float64), torch.float64), sum_dtype=torch.float64, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        kernel([ys, gs], (torch.tensor(2.0, dtype=torch.float64), torch.float64), sum_dtype=torch.float64, device=torch.device("cpu"))
    for y, x, g in zip(ys, xs, gs):
        torch.testing.assert_close(y, x + 4.0 * g, rtol=1e-14, atol=1e-14)


def test_an_optimizer_with_two_kernels_warns_once_when_compiling_fails(monkeypatch) -> None:
    """Without a compiler every kernel fails alike: Prodigy (an estimate kernel and a step
    kernel) warns once, not once per kernel, and gives the per-parameter path's results."""
    monkeypatch.setattr(_fused, "_WARNED_REASONS", set())
    for kernel in _fused.KERNELS:  # the module-level kernels' flags, restored after the test
        for name, fresh in (("_failed", False), ("_warned", False), ("_variants", {})):
            monkeypatch.setattr(kernel, name, fresh)

    def no_compiler(self, key):
        raise RuntimeError("no C++ compiler (simulated for every kernel)")

    monkeypatch.setattr(FusedKernel, "_compiled_grouped", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, opt = _train(Prodigy, {"fused": True}, steps=3)
    messages = [str(w.message) for w in caught if "uncompiled" in str(w.message)]
    assert len(messages) == 1, messages
    assert sum(k.failed for k in _fused.KERNELS if k.per_tensor.__module__ == "tuneless.optim.prodigy") >= 2
    loop, _ = _train(Prodigy, {"foreach": False}, steps=3)
    for x, y in zip(fused, loop):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_each_dtype_gets_a_variant_of_its_own(compiles) -> None:
    """Variants run without Dynamo's guards: the kernel's own key must tell float64 from float32."""
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    for dtype in (torch.float64, torch.float32, torch.float64):
        xs, gs = _lists(GROUP_SIZE, dtype=dtype)
        ys = [x.clone() for x in xs]
        sums = kernel([ys, gs], (torch.tensor(0.5, dtype=dtype), dtype), sum_dtype=dtype, device=torch.device("cpu"))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for y, x, g in zip(ys, xs, gs):
            assert y.dtype == dtype
            torch.testing.assert_close(y, x + 0.5 * g, **tol)
        torch.testing.assert_close(sums[1], sum(g.abs().sum() for g in gs), **tol)
    assert len(kernel._variants) == 2 and not kernel.failed


def test_size_classes_span_a_factor_of_16() -> None:
    assert [size_class(n) for n in (0, 1, 2, 8, 9, 128, 129, 2048, 2049, 2**23, 2**23 + 1)] == \
        [0, 0, 0, 0, 1, 1, 2, 2, 3, 5, 6]


def test_a_kernel_is_not_reused_across_size_classes_and_groups_share_a_class(monkeypatch) -> None:
    """Inductor tunes a kernel for the sizes it first sees; reused on tensors 10^5 times larger it
    was 1600x slower on an H200 (docs/gpu.md). So the size classes are part of the key, and the
    rows are sorted by class before grouping so that a model of mixed sizes compiles a few
    variants, each for groups of one class (here no real compile: the key is what is tested)."""
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    built: list[tuple] = []
    monkeypatch.setattr(kernel, "_compiled_grouped", lambda key: built.append(key) or kernel._grouped)
    gen = torch.Generator().manual_seed(0)

    def run(sizes):
        xs = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        gs = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        ys = [x.clone() for x in xs]
        sums = kernel([ys, gs], (torch.tensor(0.5, dtype=torch.float64), torch.float64), sum_dtype=torch.float64,
                      device=torch.device("cpu"))
        for y, x, g in zip(ys, xs, gs):
            torch.testing.assert_close(y, x + 0.5 * g, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(sums[1], sum(g.abs().sum() for g in gs), rtol=1e-12, atol=0)

    run([3, 5, 7])
    assert [key[-1] for key in built] == [(0,) * GROUP_SIZE]
    run([3, 5, 7])  # the same classes: reused
    run([100_000, 100_007])  # 10^4 times larger: a variant of its own
    assert len(built) == 2 and built[1][-1] == (size_class(100_000),) * 2 + (0,) * (GROUP_SIZE - 2)
    # interleaved small and large tensors: grouped by class, largest first, not in the lists' order
    built.clear()
    run([3, 5000] * 20)
    big, small = size_class(5000), size_class(3)
    # (the last group, 8 small tensors and 8 of padding, reuses the first variant)
    assert [key[-1] for key in built] == [(big,) * 16, (big,) * 4 + (small,) * 12]
    assert len(kernel._variants) == 4


def test_variants_beyond_the_limit_run_uncompiled_with_one_warning(monkeypatch) -> None:
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    monkeypatch.setattr(_fused, "MAX_VARIANTS", 1)
    monkeypatch.setattr(kernel, "_compiled_grouped", lambda key: kernel._grouped)  # no real compiling
    xs, gs = _lists(3)
    kernel([xs, gs], (torch.tensor(1.0, dtype=torch.float64), torch.float64), sum_dtype=torch.float64,
           device=torch.device("cpu"))
    ys = [x.clone() for x in xs]
    with pytest.warns(RuntimeWarning, match="more than 1 variants"):
        kernel([ys, gs], (torch.tensor(2.0, dtype=torch.float32), torch.float64), sum_dtype=torch.float64,
               device=torch.device("cpu"))
    for y, x, g in zip(ys, xs, gs):
        torch.testing.assert_close(y, x + 2.0 * g, rtol=1e-14, atol=1e-14)
    assert len(kernel._variants) == 1


def _quadratic_model(n=GROUP_SIZE + 5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(i % 5 + 1, i % 4 + 2, generator=gen, dtype=dtype).to(TEST_DEVICE))
              for i in range(n)]
    params.append(torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=dtype).to(TEST_DEVICE).t()))  # not contiguous
    params.append(torch.nn.Parameter(torch.zeros(7, dtype=dtype, device=TEST_DEVICE)))  # starts at 0 (Prodigy: a 0-d x0)
    params.append(torch.nn.Parameter(torch.tensor(0.7, dtype=dtype, device=TEST_DEVICE)))  # 0-d and 1-element: run uncompiled
    params.append(torch.nn.Parameter(torch.tensor([-0.3], dtype=dtype, device=TEST_DEVICE)))
    weights = [1.0 + (i % 3) for i in range(len(params))]

    def loss():
        return sum(w * ((p - 0.25) ** 2).sum() for w, p in zip(weights, params))

    return params, loss


def _train(cls, kwargs, steps=25, dtype=torch.float64, second_lr=0.5):
    params, loss = _quadratic_model(dtype=dtype)
    opt = cls([{"params": params[:9]}, {"params": params[9:], "lr": second_lr}], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step(loss=value.detach()) if getattr(opt, "requires_loss", False) else opt.step()
    return [p.detach().clone() for p in params], opt


FUSED_CONFIGS = [
    (DAdaptAdam, dict(weight_decay=0.01, decouple=True, use_bias_correction=True)),
    (DAdaptAdam, dict(weight_decay=0.01)),
    (DAdaptAdaGrad, dict(momentum=0.5, weight_decay=0.01)),
    (Prodigy, dict(weight_decay=0.01, use_bias_correction=True)),
    (Prodigy, dict(betas=(0.0, 0.999), weight_decay=0.01, decouple=False, safeguard_warmup=True)),
    (COCOB, dict(weight_decay=0.01)),
    (ScheduleFreeAdamW, dict(lr=0.05, weight_decay=0.01, warmup_steps=3)),
    (ScheduleFreeSGD, dict(lr=0.05, weight_decay=0.01)),
    (AdamHD, dict(init_lr=0.01, hypergrad_lr=1e-4, weight_decay=0.01)),
    (Mechanic, dict(base="adam:lr=0.1")),
    (Mechanic, dict(base="adam:lr=0.1", reuse_buffer=False)),
    (ScheduleFreeProdigy, dict(weight_decay=0.01)),
    (Tuneless, dict(weight_decay=0.01)),
]


@pytest.fixture
def compiles() -> None:
    """For the tests of compiled kernels: skip, with the reason, where torch.compile cannot
    compile a CPU kernel (the uncompiled fallback would be compared with itself: nothing checked)."""
    require_working_compiler()


@pytest.mark.parametrize("cls, kwargs", FUSED_CONFIGS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_fused_step_matches_the_per_parameter_path(cls, kwargs, compiles) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, a = _train(cls, {**kwargs, "fused": True})
    fallbacks = [str(w.message) for w in caught if "uncompiled" in str(w.message)]
    assert not fallbacks, fallbacks  # the kernels must have compiled: a fallback here is a bug
    assert not [k.per_tensor.__name__ for k in _fused.KERNELS if k.failed and k.per_tensor is not _axpy_kernel]
    loop, b = _train(cls, {**kwargs, "foreach": False})
    for x, y, start in zip(fused, loop, _quadratic_model()[0]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        assert not torch.equal(x, start.detach())  # every parameter moved
    if "learned_lr" in a.param_groups[0]:  # the hypergradient moved the rate the same way
        torch.testing.assert_close(a.param_groups[1]["learned_lr"], b.param_groups[1]["learned_lr"], rtol=1e-10, atol=0)
        assert float(a.param_groups[1]["learned_lr"]) != 0.01
    if "d" in a.param_groups[0]:
        torch.testing.assert_close(a.param_groups[0]["d"], b.param_groups[0]["d"], rtol=1e-10, atol=0)
        assert float(a.param_groups[0]["d"]) > 1e-6  # d moved: the sums were right


@pytest.mark.parametrize("cls, kwargs", FUSED_CONFIGS[:1], ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_fused_step_makes_no_host_sync(cls, kwargs, compiles) -> None:
    params, loss = _quadratic_model()
    opt = cls(params, **kwargs, fused=True)
    for _ in range(2):
        opt.zero_grad()
        loss().backward()
        opt.step()
    opt.zero_grad()
    loss().backward()
    with SyncCounter() as counter:
        opt.step()
    assert counter.count == 0


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptAdaGrad, Prodigy, COCOB, ScheduleFreeAdamW, ScheduleFreeSGD, AdamHD,
                                 Mechanic, ScheduleFreeProdigy, Tuneless])
def test_fused_must_be_a_bool(cls) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"^{cls.__name__}: fused = 'yes' is invalid; allowed: True or False$"):
        cls([torch.nn.Parameter(torch.zeros(2))], fused="yes")


def test_one_compiled_call_per_group_of_tensors(monkeypatch) -> None:
    """19 contiguous tensors make two calls (16, then 3 padded to 16); a non-contiguous one none."""
    kernel = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    calls = []

    def counted(tensors, scalars, key):
        calls.append(len(tensors))
        return kernel._grouped(*tensors, *scalars)

    monkeypatch.setattr(kernel, "_run_group", counted)
    xs, gs = _lists(19)  # plus one non-contiguous tensor, run uncompiled on its own
    kernel([xs, gs], (torch.tensor(1.0, dtype=torch.float64), torch.float64), sum_dtype=torch.float64,
           device=torch.device("cpu"))
    assert calls == [2 * GROUP_SIZE, 2 * GROUP_SIZE]


def test_every_kernel_compiles_under_a_code_object_of_its_own() -> None:
    """torch.compile caches graphs per code object (at most 8): kernels must not share one."""
    first = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    second = FusedKernel(_axpy_kernel, num_tensors=2, num_sums=2)
    assert first._grouped.__code__ is not second._grouped.__code__
    assert first._grouped.__name__ == "fused_axpy_kernel"


def test_fused_prodigy_with_a_group_at_lr_0_keeps_it_still_and_its_moments_moving(compiles) -> None:
    """The fused Prodigy updates the moments in its step kernel: a group with lr = 0 still gets them."""
    fused, a = _train(Prodigy, {"fused": True}, steps=6, second_lr=0.0)
    loop, b = _train(Prodigy, {"foreach": False}, steps=6, second_lr=0.0)
    start = _quadratic_model()[0]
    for i, (x, y, x0) in enumerate(zip(fused, loop, start)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        assert torch.equal(x, x0.detach()) == (i >= 9)  # only the second group stayed
    for p, q in zip(a.param_groups[1]["params"], b.param_groups[1]["params"]):
        torch.testing.assert_close(a.state[p]["grad_sq_avg"], b.state[q]["grad_sq_avg"], rtol=1e-10, atol=0)
        assert float(a.state[p]["grad_sq_avg"].abs().sum()) > 0


def test_fused_schedule_free_wrapper_over_a_torch_optimizer_matches_the_loop(compiles) -> None:
    """The wrapper's own passes compiled, with the decay at y taken at a plain float step size."""
    def train(**kwargs):
        params, loss = _quadratic_model()
        opt = ScheduleFree(torch.optim.SGD(params, lr=0.05), momentum=0.8, weight_decay_at_y=0.01, **kwargs)
        for _ in range(15):
            opt.zero_grad()
            loss().backward()
            opt.step()
        return [p.detach().clone() for p in params], opt

    fused, a = train(fused=True)
    loop, b = train(foreach=False)
    for x, y, start in zip(fused, loop, _quadratic_model()[0]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        assert not torch.equal(x, start.detach())
    with a.evaluation_point(), b.evaluation_point():  # the averages agree too
        for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


#: bfloat16 compiles each kernel anew (about 30 s a configuration), so a few: the kernels that
#: interpolate with a tensor weight (Schedule-Free) or mix 16-bit and float32 state (COCOB, Adam-HD).
BF16_CONFIGS = [c for c in FUSED_CONFIGS if c[0] in (ScheduleFreeAdamW, ScheduleFreeProdigy, COCOB, AdamHD, Tuneless)]


@pytest.mark.parametrize("cls, kwargs", BF16_CONFIGS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_fused_step_keeps_bfloat16_parameters_and_matches_the_loop(cls, kwargs, compiles) -> None:
    """16-bit parameters compile (coefficients in float32; a tensor lerp weight once made the
    Schedule-Free kernel fail to compile, then fail uncompiled) and agree with the per-parameter
    path relative to how far the parameters moved: both moved, and the fused run is within 10%
    of the loop's displacement from the start (measured: 0.3-1.1% between the loop and the
    vectorized path after 20 steps; Schedule-Free Prodigy moves only ~7e-5 in that time, so an
    absolute tolerance would pass a kernel that did nothing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, _ = _train(cls, {**kwargs, "fused": True}, steps=20, dtype=torch.bfloat16)
    assert not [str(w.message) for w in caught if "uncompiled" in str(w.message)]
    loop, _ = _train(cls, {**kwargs, "foreach": False}, steps=20, dtype=torch.bfloat16)
    start = [p.detach() for p in _quadratic_model(dtype=torch.bfloat16)[0]]
    for x in fused:
        assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()

    def flat(tensors):
        return torch.cat([t.float().flatten() for t in tensors])

    moved_loop = (flat(loop) - flat(start)).norm()
    moved_fused = (flat(fused) - flat(start)).norm()
    assert moved_loop > 0 and moved_fused > 0, "the parameters did not move"
    gap = (flat(fused) - flat(loop)).norm()
    assert gap <= 0.1 * moved_loop, f"fused and loop differ by {gap:.3g}, {gap / moved_loop:.1%} of the loop's displacement"


@pytest.mark.slow
@pytest.mark.parametrize("cls, kwargs", [(Tuneless, dict(weight_decay=0.01)), (AdamHD, dict(weight_decay=0.01)),
                                         (COCOB, dict())], ids=lambda v: getattr(v, "__name__", None) or "")
def test_a_kernel_compiled_on_small_tensors_is_right_on_large_ones(cls, kwargs, compiles) -> None:
    """The kernels compile once for dynamic sizes and run without Dynamo's guards (the class
    does its own): a kernel first compiled on tensors of a few elements must give the
    vectorized path's result on tensors 10^4 times larger (on the H200 the first fused step
    timed at 144 M floats, after a compile on a small problem, did not finish: docs/gpu.md)."""

    def train(sizes, fused, steps):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(TEST_DEVICE)) for n in sizes]
        start = [p.detach().clone() for p in params]
        opt = cls(params, fused=fused, **kwargs)
        for step in range(steps):
            opt.zero_grad()
            loss = sum(((p - 0.5) ** 2).sum() * (1 + i % 3) for i, p in enumerate(params)) / sum(sizes)
            loss.backward()
            opt.step(loss=loss.detach()) if getattr(opt, "requires_loss", False) else opt.step()
        return [p.detach() for p in params], start

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train([6, 9, 12], True, 2)  # compiles, on small sizes
        large = [65_536 + 7 * i for i in range(GROUP_SIZE + 3)]
        fused, start = train(large, True, 4)
    assert not [str(w.message) for w in caught if "uncompiled" in str(w.message)]
    vectorized, _ = train(large, False, 4)
    for a, b, x0 in zip(fused, vectorized, start):
        moved = float((b - x0).abs().max())
        assert moved > 0, "the vectorized run did not move"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * moved)
