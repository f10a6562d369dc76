"""Complex parameters: trained as torch.optim trains them (as their real view,
``torch.view_as_real``), or refused at construction with a ComplexParameterError that names the
parameter; never a failure in the middle of a step.

Every row of the contract table is checked on a small complex least-squares problem: the
classes with ``supports_complex`` train it (the loss drops by a clear factor) along the same
trajectory as the real view of the same parameters, on the per-parameter and vectorized paths;
every other class refuses the complex parameter when it is built, or added by
``add_param_group``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.optim_db import OPTIM_DB, OptimizerInfo
from tuneless.errors import ComplexParameterError, InvalidArgumentError
from tuneless.optim.base import TunelessOptimizer


def _problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 4, dtype=torch.complex128, generator=g)
    b = a @ torch.randn(4, dtype=torch.complex128, generator=g)
    return a, b


def _supports_complex(info: OptimizerInfo) -> bool:
    return bool(getattr(info.cls, "supports_complex", False))


def _train(info: OptimizerInfo, as_complex: bool, steps: int, **overrides) -> tuple[torch.Tensor, float, float]:
    """(the parameter as its real view, first loss, last loss) after ``steps`` steps on
    |A w - b|^2 with w complex, or w given as its real view (w_r, used through view_as_complex)."""
    a, b = _problem()
    start = torch.full((4,), 0.1j, dtype=torch.complex128)
    w = torch.nn.Parameter(start.clone() if as_complex else torch.view_as_real(start).clone())
    opt = info.build([w], **overrides)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (a @ (w if as_complex else torch.view_as_complex(w)) - b).abs().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step(loss=loss) if isinstance(opt, TunelessOptimizer) else opt.step()
    real = torch.view_as_real(w.detach()) if as_complex else w.detach()
    return real, losses[0], losses[-1]


TRAINED = [pytest.param(info, id=info.name) for info in OPTIM_DB if _supports_complex(info)]
REFUSED = [pytest.param(info, id=info.name) for info in OPTIM_DB if not _supports_complex(info)]


def test_some_rows_train_complex_parameters() -> None:
    assert TRAINED, "no optimizer trains complex parameters"


@pytest.mark.parametrize("foreach", [False, True], ids=["per-parameter", "vectorized"])
@pytest.mark.parametrize("info", TRAINED)
def test_complex_parameters_train_as_their_real_view(info: OptimizerInfo, foreach: bool) -> None:
    as_complex, first, last = _train(info, True, 100, foreach=foreach)
    as_real, _, _ = _train(info, False, 100, foreach=foreach)
    assert last < first / 100, f"{info.name}: the complex least-squares loss went from {first} to {last}"
    torch.testing.assert_close(as_complex, as_real, rtol=0, atol=1e-12)


@pytest.mark.parametrize("info", REFUSED)
def test_complex_parameters_are_refused_at_construction(info: OptimizerInfo) -> None:
    real = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    cplx = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex128))
    with pytest.raises(ComplexParameterError, match=r"parameter 1 \(shape \(4,\), dtype torch.complex128\) is complex; "
                                                   r"allowed: real floating-point parameters") as error:
        info.build([real, cplx])
    assert isinstance(error.value, InvalidArgumentError) and "torch.view_as_complex" in str(error.value)
    # added later: refused too, and the optimizer is left as it was
    opt = info.build([real])
    with pytest.raises(ComplexParameterError, match=r"parameter 1 \(shape \(4,\), dtype torch.complex128\)"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1 and [p for g in opt.param_groups for p in g["params"]] == [real]


@pytest.mark.parametrize("info", TRAINED)
@pytest.mark.parametrize("where", ["real", "imaginary"])
def test_a_nan_in_a_complex_gradient_is_skipped(info: OptimizerInfo, where: str) -> None:
    """The non-finite check sees a complex gradient as its real view: a NaN in the imaginary
    part alone is a bad step too (a complex sum cast to a real dtype would drop it)."""
    from tuneless.optim import _batched as batched

    for context in (lambda: contextlib.nullcontext(), batched.device_paths_on_cpu):
        with context():
            p = torch.nn.Parameter(torch.tensor([1.0 + 2.0j, -0.5 + 0.25j]))
            opt = info.build([p])
            p.grad = torch.tensor([0.5 - 1.0j, 0.25 + 0.5j])
            opt.step()
            before = p.detach().clone()
            bad = complex(float("nan"), 0.0) if where == "real" else complex(0.0, float("nan"))
            p.grad = torch.tensor([bad, 0.25 + 0.5j])
            opt.step()
            assert torch.equal(p.detach(), before), f"{info.name}: NaN in the {where} part of a gradient was not skipped"
            assert opt.skipped_steps() == [1]
