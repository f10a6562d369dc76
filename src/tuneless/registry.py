"""Optimizers and lr schedulers by name.

``tuneless.create(spec, params, **kwargs)`` builds a tuneless optimizer or one of torch's own
(used as they are, never rewritten) from a spec string such as ``"prodigy"``,
``"polyak:f_star=0"``, ``"adam:lr=1e-3"`` or ``"torch.optim.Adagrad"``. Lookup is
case-insensitive; an unknown name or keyword is answered with the closest matches.

The tuneless entries are derived from one source, :data:`tuneless.optim.OPTIMIZERS` (each
class carries its ``registry_name``); torch's entries are listed here.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._validate import unknown_kwarg_message, unknown_name_message
from .errors import UnknownArgumentError, UnknownNameError
from .spec import Spec, parse_spec

__all__ = ["create", "available", "entry", "OptimizerEntry", "create_scheduler", "available_schedulers",
           "SchedulerEntry", "learning_rate_free", "anchors", "methods_at_defaults"]


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    learning_rate_free: bool
    source: str  # "tuneless" or "torch"
    summary: str
    #: an anchor: not learning-rate-free (a tuned constant at its published default), yet run at
    #: its defaults by the benchmark, so that the default optimizer is compared with it
    anchor: bool = False


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def _tuneless_entries() -> dict[str, OptimizerEntry]:
    from .optim import OPTIMIZERS

    return {
        cls.registry_name: OptimizerEntry(cls.registry_name, cls, cls.learning_rate_free, "tuneless", _first_line(cls),
                                          anchor=bool(getattr(cls, "benchmark_anchor", False)))
        for cls in OPTIMIZERS
    }


_TORCH_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


def _torch_entries() -> dict[str, OptimizerEntry]:
    return {
        name: OptimizerEntry(name, getattr(torch.optim, cls), False, "torch", f"torch.optim.{cls} (used as it is)")
        for name, cls in _TORCH_NAMES.items()
    }


def _entries() -> dict[str, OptimizerEntry]:
    out = _torch_entries()
    out.update(_tuneless_entries())
    return out


def available(*, learning_rate_free: bool | None = None, source: str | None = None) -> list[str]:
    """Registered optimizer names, sorted; filter by learning-rate-free or by source."""
    return sorted(
        n for n, e in _entries().items()
        if (learning_rate_free is None or e.learning_rate_free == learning_rate_free)
        and (source is None or e.source == source)
    )


def learning_rate_free() -> list[str]:
    """The learning-rate-free tuneless optimizers, sorted."""
    return available(learning_rate_free=True)


def anchors() -> list[str]:
    """The anchors, sorted: tuneless optimizers that are not learning-rate-free (a class with
    ``benchmark_anchor = True``, e.g. MoMo-Adam's cap of 1e-2) but are run at their published
    defaults next to the learning-rate-free ones."""
    return sorted(n for n, e in _entries().items() if e.anchor and not e.learning_rate_free)


def methods_at_defaults() -> list[str]:
    """What the benchmark runs at its defaults: the learning-rate-free optimizers, then the anchors."""
    return learning_rate_free() + anchors()


def _resolve_dotted(name: str, module_prefix: str, base: type) -> Any:
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith(module_prefix.split(".")[0]):
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    obj = getattr(module, attr, None)
    if inspect.isclass(obj) and issubclass(obj, base):
        return obj
    return None


def entry(name: str) -> OptimizerEntry:
    """The registry entry of ``name`` (case-insensitive, or a dotted ``torch.optim.X`` path)."""
    entries = _entries()
    key = name.lower()
    if key in entries:
        return entries[key]
    if "." in name:
        cls = _resolve_dotted(name, "torch.optim", torch.optim.Optimizer)
        if cls is None:
            cls = _resolve_dotted(name, "tuneless.optim", torch.optim.Optimizer)
        if cls is not None:
            lr_free = bool(getattr(cls, "learning_rate_free", False))
            return OptimizerEntry(name, cls, lr_free, "tuneless" if lr_free else "torch", _first_line(cls))
    raise UnknownNameError(unknown_name_message(
        "optimizer", name, entries, f"{', '.join(sorted(entries))} (or a class path such as 'torch.optim.Adam')"))


def check_kwargs(owner: str, factory: Callable[..., Any], kwargs: dict[str, Any], skip: int = 1) -> None:
    """Refuse keyword arguments ``factory`` does not take, naming the closest valid one."""
    sig = inspect.signature(factory)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params[skip:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for k in kwargs:
        if k not in valid:
            raise UnknownArgumentError(unknown_kwarg_message(owner, k, valid))


def create(spec: str | Spec, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer named by ``spec`` over ``params``; ``kwargs`` override the spec's."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    e = entry(parsed.name)
    merged = {**parsed.kwargs, **kwargs}
    check_kwargs(e.factory.__name__, e.factory.__init__ if inspect.isclass(e.factory) else e.factory,
                 merged, skip=2 if inspect.isclass(e.factory) else 1)
    return e.factory(params, **merged)


# ---------------------------------------------------------------------------- lr schedulers


@dataclass(frozen=True)
class SchedulerEntry:
    name: str
    factory: Callable[..., Any]
    #: True when ``scheduler.step`` takes the loss (plateau, loss-proportional)
    takes_loss: bool
    #: argument that defaults to the run's number of steps (e.g. CosineAnnealingLR's T_max)
    horizon_arg: str | None
    summary: str


def _scheduler_entries() -> dict[str, SchedulerEntry]:
    from torch.optim import lr_scheduler as ls

    from .schedules import LossProportionalLR

    return {
        "cosine": SchedulerEntry("cosine", ls.CosineAnnealingLR, False, "T_max", "torch CosineAnnealingLR, T_max = steps"),
        "warm_restarts": SchedulerEntry("warm_restarts", ls.CosineAnnealingWarmRestarts, False, None,
                                        "torch CosineAnnealingWarmRestarts (give T_0)"),
        "plateau": SchedulerEntry("plateau", ls.ReduceLROnPlateau, True, None, "torch ReduceLROnPlateau on the loss"),
        "loss_proportional": SchedulerEntry("loss_proportional", LossProportionalLR, True, None,
                                            "lr proportional to the loss: the naive baseline that stalls"),
    }


def available_schedulers() -> list[str]:
    return sorted(_scheduler_entries())


def scheduler_entry(name: str) -> SchedulerEntry:
    entries = _scheduler_entries()
    if name.lower() in entries:
        return entries[name.lower()]
    if "." in name:
        cls = _resolve_dotted(name, "torch.optim", object)
        if cls is not None and hasattr(cls, "step"):
            takes_loss = "metrics" in inspect.signature(cls.step).parameters
            return SchedulerEntry(name, cls, takes_loss, None, _first_line(cls))
    raise UnknownNameError(unknown_name_message(
        "lr scheduler", name, entries, f"{', '.join(sorted(entries))} (or 'torch.optim.lr_scheduler.X')"))


def create_scheduler(spec: str | Spec, optimizer: torch.optim.Optimizer, total_steps: int | None = None,
                     **kwargs: Any) -> tuple[Any, SchedulerEntry]:
    """Build the lr scheduler named by ``spec``; returns it with its entry (``takes_loss``)."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    e = scheduler_entry(parsed.name)
    merged = {**parsed.kwargs, **kwargs}
    if e.horizon_arg and e.horizon_arg not in merged:
        if total_steps is None:
            raise ValueError(f"lr scheduler {e.name!r} needs {e.horizon_arg} (or the run's number of steps)")
        merged[e.horizon_arg] = total_steps
    check_kwargs(e.factory.__name__, e.factory.__init__, merged, skip=2)
    return e.factory(optimizer, **merged), e
