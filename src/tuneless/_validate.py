"""One set of argument checks, with one message format.

Every message names the argument, the value received and what is allowed, and, where the
paper recommends a value, that value::

    InvalidArgumentError: Prodigy: d0 = -1.0 is invalid; allowed: 0 < d0 (recommended: 1e-6)

Unknown keyword arguments are refused with the closest valid name (see
:func:`refuse_unknown_kwargs`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from numbers import Real
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor

from .errors import InvalidArgumentError, UnknownArgumentError

__all__ = [
    "check_range",
    "check_lr",
    "check_bool",
    "check_betas",
    "check_optional_range",
    "check_choice",
    "close_matches",
    "refuse_unknown_kwargs",
    "unknown_name_message",
    "unknown_kwarg_message",
    "fail",
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return repr(value) if isinstance(value, str) else str(value)


def fail(owner: str, name: str, value: Any, allowed: str, recommended: Any = None) -> None:
    """Raise the one message format: ``owner: name = value is invalid; allowed: ...``."""
    msg = f"{owner}: {name} = {_fmt(value)} is invalid; allowed: {allowed}"
    if recommended is not None:
        msg += f" (recommended: {_fmt(recommended)})"
    raise InvalidArgumentError(msg)


def check_range(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    inclusive: str = "[]",
    recommended: Any = None,
    integer: bool = False,
) -> float:
    """Check ``low (<|<=) value (<|<=) high``; ``inclusive`` is ``"[]"``, ``"[)"``, ``"(]"`` or ``"()"``.

    ``None`` bounds are open. Booleans and non-finite values (unless a bound is infinite on that
    side) are refused. Returns the value, unchanged.
    """
    lo_inc, hi_inc = inclusive[0] == "[", inclusive[1] == "]"
    parts = []
    if low is not None:
        parts.append(f"{low:g} {'<=' if lo_inc else '<'} {name}")
    if high is not None:
        hi = f"{high:g}"
        parts.append(f"{name} {'<=' if hi_inc else '<'} {hi}")
    allowed = " and ".join(parts) if parts else "a real number"
    if integer:
        allowed = f"an integer with {allowed}" if parts else "an integer"
    ok_type = isinstance(value, Real) and not isinstance(value, bool)
    if ok_type and integer:
        ok_type = isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    if not ok_type:
        fail(owner, name, value, allowed, recommended)
    v = float(value)
    if math.isnan(v):
        fail(owner, name, value, allowed, recommended)
    if low is not None and (v < low or (v == low and not lo_inc)):
        fail(owner, name, value, allowed, recommended)
    if high is not None and (v > high or (v == high and not hi_inc)):
        fail(owner, name, value, allowed, recommended)
    if math.isinf(v) and not ((v > 0 and high is not None and math.isinf(high)) or (v < 0 and low is not None and math.isinf(low))):
        fail(owner, name, value, allowed + " (finite)", recommended)
    return value


def check_lr(owner: str, value: Any, recommended: Any = None, *, name: str = "lr") -> Any:
    """A learning rate: a real number ``>= 0``, or, as torch.optim accepts, a floating-point
    tensor holding one such number (0-d, or one element: returned as a 0-d view of it, so that a
    scheduler filling it in place still drives it). Its value is read here, once: construction,
    not a step. Returns the number unchanged, or the tensor."""
    if not isinstance(value, Tensor):
        return check_range(owner, name, value, 0.0, None, inclusive="[)", recommended=recommended)
    allowed = f"0 <= {name}: a number, or a floating-point tensor with one element"
    if not value.is_floating_point() or value.is_complex() or value.numel() != 1:
        fail(owner, name, value, allowed, recommended)
    number = float(value.detach().reshape(()).cpu())
    if not (math.isfinite(number) and number >= 0):
        fail(owner, name, value, allowed + " (finite)", recommended)
    return value if value.dim() == 0 else value.view(())


def check_optional_range(owner: str, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """Like :func:`check_range`, but ``None`` is also allowed."""
    if value is None:
        return None
    return check_range(owner, name, value, *args, **kwargs)


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(owner, name, value, "True or False")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        fail(owner, name, value, "one of " + ", ".join(_fmt(c) for c in choices))
    return value


def check_betas(owner: str, name: str, value: Any, count: int = 2, recommended: Any = None) -> tuple:
    """A tuple of ``count`` floats, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        fail(owner, name, value, f"a tuple of {count} numbers in [0, 1)", recommended)
    for i, b in enumerate(value):
        check_range(owner, f"{name}[{i}]", b, 0.0, 1.0, inclusive="[)", recommended=None if recommended is None else recommended[i])
    return tuple(value)


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Close matches of ``name`` among ``candidates`` (case-insensitive), best first."""
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hits = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    return [lower[h] for h in hits]


def unknown_name_message(kind: str, name: str, candidates: Iterable[str], available: str) -> str:
    """``unknown KIND 'name'; did you mean 'x'? Available: ...`` (the suggestions are close matches)."""
    hints = close_matches(name, candidates)
    msg = f"unknown {kind} {name!r}"
    msg += f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else "."
    return msg + f" Available: {available}."


def unknown_kwarg_message(owner: str, key: str, valid: Sequence[str]) -> str:
    """``OWNER got an unknown keyword argument 'k'; did you mean 'x'? Valid arguments: ...``."""
    hint = close_matches(key, valid, n=1)
    msg = f"{owner} got an unknown keyword argument {key!r}"
    msg += f"; did you mean {hint[0]!r}?" if hint else "."
    return msg + " Valid arguments: " + ", ".join(valid) + "."


def refuse_unknown_kwargs(init: Callable) -> Callable:
    """Wrap an ``__init__`` so that an unknown keyword argument is refused with a suggestion.

    Python already refuses unknown keywords, but without saying what was meant; a misspelt
    hyperparameter in a tool meant to run without tuning must never pass unnoticed.
    """
    sig = inspect.signature(init)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return init
    valid = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise UnknownArgumentError(
                unknown_kwarg_message(type(self).__name__, unknown[0], [v for v in valid if v != "params"]))
        return init(self, *args, **kwargs)

    wrapper.__tuneless_checked__ = True  # type: ignore[attr-defined]
    return wrapper
