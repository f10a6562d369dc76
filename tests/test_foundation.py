"""Validators, spec strings, the registry, schedulers, problems and batched reductions."""

from __future__ import annotations

import math

import pytest
import torch

import tuneless
from tuneless import InvalidArgumentError, LossProportionalLR, SpecError, UnknownArgumentError, UnknownNameError
from tuneless import _validate as v
from tuneless.optim import _batched as b
from tuneless.problems import available_problems, get_problem
from tuneless.spec import parse_run_spec, parse_spec

# ----------------------------------------------------------------------------- validators


def test_check_range_message_format() -> None:
    with pytest.raises(InvalidArgumentError, match=r"^X: d0 = -1.0 is invalid; allowed: 0 < d0 \(recommended: 1e-06\)$"):
        v.check_range("X", "d0", -1.0, 0.0, None, inclusive="()", recommended=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"allowed: 0 <= beta and beta < 1"):
        v.check_range("X", "beta", 1.0, 0.0, 1.0, inclusive="[)")
    for bad in (True, "1", None, float("nan")):
        with pytest.raises(InvalidArgumentError):
            v.check_range("X", "a", bad, 0.0, 1.0)
    with pytest.raises(InvalidArgumentError, match="finite"):
        v.check_range("X", "a", math.inf, 0.0, None)
    assert v.check_range("X", "a", math.inf, 0.0, math.inf) == math.inf
    with pytest.raises(InvalidArgumentError, match="an integer"):
        v.check_range("X", "n", 2.5, 1, None, integer=True)
    assert v.check_range("X", "n", 3, 1, None, integer=True) == 3


def test_betas_and_choice() -> None:
    assert v.check_betas("X", "betas", (0.9, 0.999)) == (0.9, 0.999)
    with pytest.raises(InvalidArgumentError, match=r"betas\[1\] = 1.0 is invalid"):
        v.check_betas("X", "betas", (0.9, 1.0))
    with pytest.raises(InvalidArgumentError, match="a tuple of 2 numbers"):
        v.check_betas("X", "betas", 0.9)
    with pytest.raises(InvalidArgumentError, match="one of 'a', 'b'"):
        v.check_choice("X", "mode", "c", ["a", "b"])


# ----------------------------------------------------------------------------- spec strings


def test_parse_specs() -> None:
    s = parse_spec("adam:lr=1e-3,betas=(0.9, 0.99),amsgrad=true,foreach=None")
    assert s.name == "adam" and s.kwargs == {"lr": 1e-3, "betas": (0.9, 0.99), "amsgrad": True, "foreach": None}
    assert str(parse_spec("polyak:f_star=0")) == "polyak:f_star=0"
    r = parse_run_spec("adam:lr=0.01@cosine:eta_min=1e-5")
    assert r.optimizer.name == "adam" and r.scheduler.name == "cosine" and r.scheduler.kwargs == {"eta_min": 1e-5}
    assert str(r) == "adam:lr=0.01@cosine:eta_min=1e-05"
    assert parse_spec("torch.optim.Adagrad").name == "torch.optim.Adagrad"
    assert parse_spec("x:name=hello").kwargs == {"name": "hello"}


@pytest.mark.parametrize("bad, message", [
    ("", "empty spec"), ("adam:", "no key=value"), ("adam:lr", "expected key=value"),
    ("adam:lr=1,lr=2", "given twice"), ("ad am", "bad name"), ("adam:betas=(0.9", "unbalanced"),
    ("a@b@c", "more than one '@'"), ("adam:=3", "expected key=value"),
])
def test_malformed_specs(bad, message) -> None:
    with pytest.raises(SpecError, match=message):
        parse_run_spec(bad)


# ----------------------------------------------------------------------------- registry


def test_create_torch_and_tuneless_by_name() -> None:
    p = [torch.nn.Parameter(torch.ones(2))]
    assert type(tuneless.create("adam:lr=1e-3", p)) is torch.optim.Adam
    assert type(tuneless.create("ADAGRAD", p)) is torch.optim.Adagrad
    assert type(tuneless.create("torch.optim.RMSprop", p)) is torch.optim.RMSprop
    opt = tuneless.create("sgd", p, lr=0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    assert {"sgd", "adam", "adamw", "adagrad", "rmsprop", "polyak"} <= set(tuneless.available())
    assert tuneless.available() == sorted(tuneless.available())


def test_registry_errors() -> None:
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(UnknownNameError, match="unknown optimizer 'adma'; did you mean 'adam'"):
        tuneless.create("adma", p)
    with pytest.raises(UnknownArgumentError, match="Adam got an unknown keyword argument 'betass'; did you mean 'betas'"):
        tuneless.create("adam", p, betass=(0.9, 0.9))
    with pytest.raises(UnknownNameError, match="unknown optimizer 'torch.optim.Nope'"):
        tuneless.create("torch.optim.Nope", p)
    with pytest.raises(UnknownNameError, match="unknown optimizer 'os.system'"):
        tuneless.create("os.system", p)


def test_schedulers_by_name() -> None:
    p = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(p, lr=1.0)
    sched, entry = tuneless.create_scheduler("cosine", opt, total_steps=10)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and sched.T_max == 10 and not entry.takes_loss
    _, entry = tuneless.create_scheduler("plateau", torch.optim.SGD(p, lr=1.0))
    assert entry.takes_loss
    with pytest.raises(ValueError, match="needs T_max"):
        tuneless.create_scheduler("cosine", torch.optim.SGD(p, lr=1.0))
    with pytest.raises(UnknownArgumentError, match="did you mean 'eta_min'"):
        tuneless.create_scheduler("cosine:eta_mn=0", torch.optim.SGD(p, lr=1.0), total_steps=5)


# ----------------------------------------------------------------------------- the naive scheduler


def test_loss_proportional_lr() -> None:
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = LossProportionalLR(opt)
    for loss in (4.0, 2.0, 1.0):
        opt.step()
        sched.step(torch.tensor(loss))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 1.0 / 4.0)
    opt.step()
    sched.step(float("nan"))
    assert opt.param_groups[0]["lr"] == 0.0  # min_factor
    opt2 = torch.optim.SGD([p], lr=0.1)
    s2 = LossProportionalLR(opt2, reference_loss=1.0, max_factor=2.0)
    opt2.step()
    s2.step(5.0)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2)
    with pytest.raises(InvalidArgumentError, match="min_factor = 2.0 is invalid"):
        LossProportionalLR(opt2, min_factor=2.0, max_factor=1.0)


# ----------------------------------------------------------------------------- problems


@pytest.mark.parametrize("name", available_problems("analytic"))
def test_analytic_minimum_is_the_minimum(name) -> None:
    problem = get_problem(name)
    x_star = torch.tensor(problem.minimizer(), dtype=torch.float64, requires_grad=True)
    value = problem.value(x_star)
    assert float(value.detach()) == pytest.approx(problem.min_value, abs=1e-12)
    (grad,) = torch.autograd.grad(value, x_star)
    assert float(grad.norm()) < 1e-9
    start = torch.tensor(problem.standard_start(), dtype=torch.float64)
    assert float(problem.value(start)) > problem.min_value + 1e-3
    inst = problem.instantiate(dtype=torch.float64)
    ev = inst.evaluate()
    assert ev["error"] > 0 and ev["distance"] > 0


def test_quadratic_condition_number_and_offset() -> None:
    q = get_problem("quadratic:dim=6,condition=1e4,offset=2.5")
    eig = torch.linalg.eigvalsh(q.matrix)
    assert float(eig.max() / eig.min()) == pytest.approx(1e4, rel=1e-8)
    assert q.min_value == 2.5
    assert get_problem(q.spec()).spec() == q.spec()
    with pytest.raises(InvalidArgumentError, match="condition = 0.5 is invalid"):
        get_problem("quadratic:condition=0.5")
    with pytest.raises(UnknownArgumentError, match="did you mean 'condition'"):
        get_problem("quadratic:conditon=10")


# ----------------------------------------------------------------------------- batched reductions


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Sums of a few dozen terms in another order: rounding of the dtype, not more. bfloat16's
    loops sum in bfloat16 itself (8 bits of mantissa), the batched versions in float32."""
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def test_dots_without_foreach_mm_are_the_same_products(monkeypatch) -> None:
    """torch 2.11 (the GPU machine's, docs/gpu.md) has no ``torch._foreach_mm``: the batched dot
    and DoG's weight-decay dots fall back to one ``torch.mm`` a pair, with the same results."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 4), (5,), (0,), (2, 2, 2)]]
    ys = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 4), (5,), (0,), (2, 2, 2)]]
    dev = torch.device("cpu")

    def dog_run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).double()
        opt = tuneless.DoG(model.parameters(), weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 4, dtype=torch.float64)).pow(2).sum().backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    dot, dog = b.total_dot(xs, ys, torch.float64, dev), dog_run()
    monkeypatch.setattr(b, "_FOREACH_MM", None)
    monkeypatch.delattr(torch, "_foreach_mm")
    torch.testing.assert_close(b.total_dot(xs, ys, torch.float64, dev), dot, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dot, b.total_dot_loop(xs, ys, torch.float64, dev), rtol=1e-12, atol=1e-12)
    for a, c in zip(dog_run(), dog):
        torch.testing.assert_close(a, c, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batched_reductions_match_their_loops(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*s, generator=g).to(dtype) for s in [(3, 4), (5,), (0,), (2, 2, 2)]]
    ys = [torch.randn(*s, generator=g).to(dtype) for s in [(3, 4), (5,), (0,), (2, 2, 2)]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _tolerance(dtype)
    dev = torch.device("cpu")
    torch.testing.assert_close(b.total_sum_of_squares(xs, acc, dev), b.total_sum_of_squares_loop(xs, acc, dev), **tol)
    torch.testing.assert_close(b.total_abs_sum(xs, acc, dev), b.total_abs_sum_loop(xs, acc, dev), **tol)
    torch.testing.assert_close(b.total_dot(xs, ys, acc, dev), b.total_dot_loop(xs, ys, acc, dev), **tol)
    assert float(b.total_dot([], [], acc, dev)) == 0.0
    zs = [x.clone() for x in xs]
    b.add_scaled_(zs, ys, torch.tensor(-0.5, dtype=dtype))
    for z, x, y in zip(zs, xs, ys):
        torch.testing.assert_close(z, x - 0.5 * y, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scratch_sums_match_their_loops_block_by_block(dtype, monkeypatch) -> None:
    """The flat scratch reductions equal the loops over any blocking, reuse one buffer per slot,
    and leave their inputs as they were."""
    monkeypatch.setattr(b, "CPU_BLOCK_NUMEL", 16)
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (0,), (2, 2, 2), (40,), (7, 3)]
    xs = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    ys = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    xs.append(torch.randn(6, 5, generator=g).to(dtype).t())  # not contiguous: a block of its own
    ys.append(torch.randn(5, 6, generator=g).to(dtype))
    before = [x.clone() for x in xs]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _tolerance(dtype)
    dev = torch.device("cpu")
    scratch = b.Scratch()
    blocks = b.cache_blocks(xs, ys)
    assert all(sum(t.numel() for t in xb) <= 16 for xb, _ in blocks if xb[0].is_contiguous())
    assert any(not xb[0].is_contiguous() for xb, _ in blocks)
    for slot in (0, 1):
        dot = sum(b.flat_dot(xb, yb, scratch, acc, slot=slot) for xb, yb in blocks)
        l1 = sum(b.flat_abs_sum(xb, scratch, acc, slot=slot) for xb, _ in blocks)
        sq = sum(b.flat_sum_of_squares(xb, scratch, acc, slot=slot) for xb, _ in blocks)
        torch.testing.assert_close(dot, b.total_dot_loop(xs, ys, acc, dev), **tol)
        torch.testing.assert_close(l1, b.total_abs_sum_loop(xs, acc, dev), **tol)
        torch.testing.assert_close(sq, b.total_sum_of_squares_loop(xs, acc, dev), **tol)
    assert all(torch.equal(x, y) for x, y in zip(xs, before))
    # one reused buffer per slot (and a temporary for the block too large to cut)
    flat_a, _ = scratch.views(blocks[0][0])
    flat_b, _ = scratch.views(blocks[0][0])
    flat_c, _ = scratch.views(blocks[0][0], slot=1)
    assert flat_a.data_ptr() == flat_b.data_ptr() != flat_c.data_ptr()
    assert flat_a.dtype == (dtype if dtype != torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_dots_match_their_loops_and_refuse_what_they_cannot_take(dtype, monkeypatch) -> None:
    """Large tensors cut into chunks, small ones packed into the scratch (in blocks), all pairs
    at once: the same sums as the loops; None for a tensor off the sum dtype or not contiguous."""
    monkeypatch.setattr(b, "CPU_BLOCK_NUMEL", 16)
    monkeypatch.setattr(b, "CPU_DOT_NUMEL", 8)
    monkeypatch.setattr(b, "CPU_DOT_MIN_NUMEL", 6)
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,), (0,), (2, 2), (40,), (7, 3), (1,), (3,), (4,), (2, 3)]
    xs, ys, zs = ([torch.randn(*s, generator=g, dtype=dtype) for s in shapes] for _ in range(3))
    before = [t.clone() for t in (*xs, *ys, *zs)]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    dev = torch.device("cpu")
    scratch = b.Scratch()
    for _ in range(2):  # the scratch's cached views serve the second call
        got = b.chunked_dots((xs, ys, zs), ((0, 1), (1, 2), (0, 0), (2, 2)), dtype, scratch)
        want = torch.stack([b.total_dot_loop(xs, ys, dtype, dev), b.total_dot_loop(ys, zs, dtype, dev),
                            b.total_sum_of_squares_loop(xs, dtype, dev), b.total_sum_of_squares_loop(zs, dtype, dev)])
        assert got is not None and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
    assert all(torch.equal(t, u) for t, u in zip((*xs, *ys, *zs), before))
    other = torch.float32 if dtype == torch.float64 else torch.float64
    assert b.chunked_dots((xs, ys), ((0, 1),), other, scratch) is None  # would need a cast
    assert b.chunked_dots(([x.to(torch.bfloat16) for x in xs], ys), ((0, 1),), dtype, scratch) is None
    transposed = [*xs[:-1], torch.randn(3, 2, generator=g, dtype=dtype).t()]
    assert b.chunked_dots((transposed, ys), ((0, 1),), dtype, scratch) is None
    assert b.chunked_dots(([], []), ((0, 1),), dtype, scratch) is None
    empty = [torch.zeros(0, dtype=dtype), torch.zeros(0, 3, dtype=dtype)]
    assert torch.equal(b.chunked_dots((empty, empty), ((0, 1), (1, 1)), dtype, scratch), torch.zeros(2, dtype=dtype))


def test_cache_blocks_keep_one_dtype_and_device_per_block(monkeypatch) -> None:
    """A block never mixes dtypes or devices (``meta`` stands in for a second device here: it is
    one block per dtype, uncut, as a GPU would be); every tensor lands in exactly one block."""
    monkeypatch.setattr(b, "CPU_BLOCK_NUMEL", 16)
    xs = [torch.zeros(10), torch.zeros(10, device="meta"), torch.zeros(30, dtype=torch.float64),
          torch.zeros(12), torch.zeros(5, device="meta"), torch.zeros(4, device="meta", dtype=torch.float64)]
    ys = [torch.zeros_like(x) for x in xs]
    blocks = b.cache_blocks(xs, ys)
    for xb, yb in blocks:
        assert len({(t.dtype, t.device) for t in (*xb, *yb)}) == 1
    meta = [xb for xb, _ in blocks if xb[0].device.type == "meta"]
    assert sorted(len(xb) for xb in meta) == [1, 2]  # float32: both tensors, uncut; float64: one
    cpu_numel = sum(t.numel() for xb, _ in blocks if xb[0].device.type == "cpu" for t in xb)
    assert cpu_numel == 10 + 30 + 12 and all(sum(t.numel() for t in xb) <= 16 for xb, _ in blocks
                                             if xb[0].device.type == "cpu")
