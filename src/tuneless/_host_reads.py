"""Counting the reads of tensor values on the host (private; used by the tests and the step-speed benchmark).

On a GPU every read of a tensor's value by the host (``t.item()``, ``bool(t)``, a 0-d tensor
passed where torch wants a Python number) waits for the device: a device-to-host
synchronization. On the CPU nothing waits, so the reads must be counted to be seen.
:class:`HostReadCounter` counts them at two levels:

* **Python**: ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
  ``tolist`` and ``numpy`` called from Python;
* **aten**: the operators that read a value inside torch, seen by a ``TorchDispatchMode``:
  ``aten._local_scalar_dense`` (what ``item`` and every Tensor-to-Scalar conversion run: a 0-d
  tensor given to a ``Scalar`` overload such as ``torch._foreach_add_(tensors, t)``), and the
  operators whose result depends on values on the host (``equal``, ``is_nonzero``,
  ``nonzero``, ``masked_select``, the ``unique`` family, ``repeat_interleave`` without
  ``output_size``, indexing with a boolean mask).

A read is counted once (an aten read made inside a counted Python-level one is part of it).

**Exemption, narrow and explicit.** torch.optim's own optimizers (Adam, SGD, ...) keep their
``step`` counter on the CPU by design when neither ``capturable`` nor ``fused``, and read it
in their step: no device synchronization even with parameters on a GPU. Such a read is
exempted (counted in :attr:`HostReadCounter.exempted`) when the code that made it, the
innermost frame outside torch's own machinery, is in ``torch/optim/``. A read made by any
other code, even when called from a torch.optim step, is counted, with one exception in
tuneless: ``tuneless.optim.base.known_true``, which reads a flag (a step's finiteness, through
``known_finite``) on the CPU paths only (a CPU tensor: its value is in host memory) and never on
a GPU.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReadCounter", "PYTHON_READS", "ATEN_READS"]

#: Tensor methods that read values on the host.
PYTHON_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")

_aten = torch.ops.aten

#: Operator packets whose every overload reads values on the host.
ATEN_READS = (
    _aten._local_scalar_dense, _aten.equal, _aten.is_nonzero, _aten.item, _aten.nonzero, _aten.masked_select,
    _aten._unique, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive, _aten.allclose,
)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_THIS_FILE = os.path.abspath(__file__)
#: tuneless's one exempted read: ``tuneless.optim.base.known_true``, the CPU paths' read of a
#: flag such as a step's finiteness (in host memory: nothing waits), never made on a GPU
_BASE_FILE = os.path.join(os.path.dirname(_THIS_FILE), "optim", "base.py")


def _reads_on_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    packet = func.overloadpacket
    if packet in ATEN_READS:
        return True
    if packet is _aten.repeat_interleave:  # the output size comes from the repeats' values
        return isinstance(args[0] if args else kwargs.get("repeats"), Tensor) and kwargs.get("output_size") is None \
            and (len(args) < 4 or args[3] is None)
    if packet is _aten.index:  # a boolean mask: its nonzero positions are read
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices)
    return False


def _reader() -> tuple[str, bool]:
    """(file:line of the code that made the read, whether it is torch.optim's own code): the
    innermost frame outside this module and outside torch's machinery (torch/ but not torch/optim/)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != _THIS_FILE and (not name.startswith(_TORCH_DIR) or name.startswith(_TORCH_OPTIM_DIR)):
            exempt = name.startswith(_TORCH_OPTIM_DIR) or (name == _BASE_FILE and frame.f_code.co_name == "known_true")
            return f"{name}:{frame.f_lineno}", exempt
        frame = frame.f_back
    return "<unknown>", False


class _AtenReads(TorchDispatchMode):
    def __init__(self, counter: "HostReadCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.counter._python_depth == 0 and _reads_on_host(func, args, kwargs):
            self.counter._record("aten", str(func))
        return func(*args, **kwargs)


class HostReadCounter:
    """Counts host reads of tensor values while active (``with HostReadCounter() as c: ...``).

    Attributes:
        count: reads counted (Python-level plus aten-level ones not inside a Python-level one).
        python, aten: the two parts of ``count``.
        exempted: reads made by torch.optim's own code (not in ``count``).
        sites: one ``"level what at file:line"`` per counted read, for messages.
    """

    def __init__(self) -> None:
        self.count = self.python = self.aten = self.exempted = 0
        self.sites: list[str] = []
        self._python_depth = 0

    def _record(self, level: str, what: str) -> None:
        site, torch_optim = _reader()
        if torch_optim:
            self.exempted += 1
            return
        self.count += 1
        setattr(self, level, getattr(self, level) + 1)
        self.sites.append(f"{level} {what} at {site}")

    def __enter__(self) -> "HostReadCounter":
        self.saved = {n: getattr(Tensor, n) for n in PYTHON_READS}
        for name, fn in self.saved.items():
            def counted(t: Tensor, *a: Any, _fn: Callable[..., Any] = fn, _name: str = name, **k: Any) -> Any:
                if self._python_depth == 0:
                    self._record("python", f"Tensor.{_name}")
                self._python_depth += 1
                try:
                    return _fn(t, *a, **k)
                finally:
                    self._python_depth -= 1

            setattr(Tensor, name, counted)
        self._mode = _AtenReads(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for name, fn in self.saved.items():
            setattr(Tensor, name, fn)
