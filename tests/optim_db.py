"""The table of optimizer descriptions every generic test is parametrized over.

One :class:`OptimizerInfo` per optimizer configuration. Rows live in ``tests/optim_rows/``,
one module per family, each exporting ``ROWS``; this module collects them all. Adding an
optimizer = adding one row.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch


@dataclass
class ErrorInput:
    """Constructor kwargs that must fail with ``error`` whose message matches ``match``."""

    kwargs: dict[str, Any]
    error: type[BaseException]
    match: str


@dataclass
class OptimizerInfo:
    """How to build and test one optimizer.

    Attributes:
        cls: the optimizer class (or the wrapper class for wrappers).
        kwargs: a valid configuration; ``extra_kwargs`` are further valid ones, each tested too.
        error_inputs: invalid configurations with the expected error.
        factory: builds the optimizer from (params, **kwargs); default ``cls(params, **kwargs)``.
            Wrappers (Mechanic, Schedule-Free wrapper) build their base optimizer here.
        misspelt: a keyword that must be refused with a suggestion (``None``: skip only when
            the class takes ``**kwargs`` by design, never for tuneless classes).
        global_step_size: the step size comes from statistics over all parameters.
        lr_is_multiplier: the step of a group scales exactly with its ``lr`` at the first step.
        supports_bf16: runs on bfloat16 parameters.
        downhill_steps: steps after which the test loss must be lower than at the start.
        id: test id (defaults to the class name).
    """

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra_kwargs: list[dict[str, Any]] = field(default_factory=list)
    error_inputs: list[ErrorInput] = field(default_factory=list)
    factory: Callable[..., torch.optim.Optimizer] | None = None
    misspelt: str | None = "weight_decy"
    global_step_size: bool = True
    lr_is_multiplier: bool = True
    supports_bf16: bool = True
    downhill_steps: int = 20
    foreach_rtol: float = 1e-9
    id: str | None = None
    #: the optimizer needs the loss at every step (None: the class's ``requires_loss``; wrappers
    #: built over a loss-based base need it too)
    loss_based: bool | None = None
    #: all-reduces of statistics per step under sharding, at most (a wrapper over a base that
    #: reduces its own statistics makes one more)
    statistics_collectives: int = 1
    #: of those, how many come before the loss's all-reduce (a wrapper that reads its statistics
    #: before running a loss-based base)
    statistics_before_loss: int = 0
    #: with ``lr=torch.tensor(x)`` the step runs the same operations as with ``lr=x`` (bit-for-bit
    #: equal trajectories); False: other operations (tensor operands instead of ``alpha=`` numbers),
    #: equal to 1e-12 in float64
    tensor_lr_exact: bool = True
    #: a tensor lr scheduled to 0 stops the parameters (up to one rounding); False: they coast on
    #: statistics that hold lr-scaled steps (D-Adaptation's momentum and dual averaging: a known
    #: limitation, the update is not gated on the device yet), by steps like the last ones taken
    tensor_lr_zero_stops: bool = True
    #: the row runs the compiled kernels (``fused=True``; rows of :data:`FUSED_DB`): building
    #: it skips the test, with the reason, where torch.compile cannot compile for the CPU
    fused: bool = False

    def build(self, params: Any, **overrides: Any) -> torch.optim.Optimizer:
        kwargs = {**self.kwargs, **overrides}
        if self.fused and kwargs.get("fused", True):
            require_working_compiler()
        if self.factory is not None:
            return self.factory(params, **kwargs)
        return self.cls(params, **kwargs)

    def float_lr(self, kwargs: dict[str, Any]) -> float:
        """The lr a configuration runs with: its own, else the default of the factory (a
        wrapper's: its base's lr) or of the class."""
        if "lr" in kwargs:
            return kwargs["lr"]
        param = inspect.signature(self.factory or self.cls).parameters.get("lr")
        if param is None or not isinstance(param.default, (int, float)):
            raise TypeError(f"{self.name}: the factory must take lr (with a default) for the tensor-lr tests")
        return float(param.default)

    @property
    def name(self) -> str:
        return self.id or self.cls.__name__

    @property
    def requires_loss(self) -> bool:
        if self.loss_based is not None:
            return self.loss_based
        return bool(getattr(self.cls, "requires_loss", False))


def _collect() -> list[OptimizerInfo]:
    from tests import optim_rows

    rows: list[OptimizerInfo] = []
    for mod in sorted(pkgutil.iter_modules(optim_rows.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tests.optim_rows.{mod.name}")
        rows.extend(module.ROWS)
    return rows


OPTIM_DB: list[OptimizerInfo] = _collect()


@functools.cache
def _compiler_failure() -> str | None:
    """Why torch.compile cannot compile a CPU kernel in this process (None: it can): a tiny
    function compiled once, as the fused kernels are (Inductor's C++ code needs a compiler)."""
    def axpy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + y

    from tests.device import TEST_DEVICE

    try:
        out = torch.compile(axpy, fullgraph=True)(torch.ones(3, device=TEST_DEVICE), torch.ones(3, device=TEST_DEVICE))
    except Exception as error:  # noqa: BLE001 - any failure: the fused rows cannot run compiled
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None if torch.equal(out.cpu(), torch.full((3,), 3.0)) else "the compiled test kernel gave a wrong result"


def require_working_compiler() -> None:
    """Skip the calling test, saying why, where torch.compile cannot compile for the CPU: the
    fused rows would run their uncompiled fallback and check nothing about the kernels."""
    failure = _compiler_failure()
    if failure is not None:
        pytest.skip(f"fused row: torch.compile cannot compile a CPU kernel here ({failure}); the compiled "
                    "kernels are untested")


def _fused_rows(rows: list[OptimizerInfo]) -> list[OptimizerInfo]:
    """One fused row per optimizer class that takes ``fused``: its first row with ``fused=True``,
    without the extra configurations (each compiles kernels of its own: tens of seconds on 2
    cores). Prodigy's first row has ``slice_p = 1``, the one it compiles for."""
    out, seen = [], set()
    for info in rows:
        if info.cls in seen or "fused" not in inspect.signature(info.cls).parameters:
            continue
        if info.kwargs.get("slice_p", 1) != 1:
            continue
        seen.add(info.cls)
        out.append(dataclasses.replace(info, kwargs={**info.kwargs, "fused": True}, extra_kwargs=[],
                                       id=f"{info.name}-fused", fused=True))
    return out


#: The fused axis of the contract table: the compiled kernels under every generic test. Kept
#: out of :data:`OPTIM_DB`, which other suites iterate without compiling.
FUSED_DB: list[OptimizerInfo] = _fused_rows(OPTIM_DB)
