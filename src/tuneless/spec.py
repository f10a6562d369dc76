"""Spec strings: a name and keyword arguments in one string, for the CLI and the benchmark.

Grammar::

    spec      := name [":" key "=" value ("," key "=" value)*]
    run spec  := optimizer-spec ["@" scheduler-spec]

Values are Python literals (``1e-3``, ``(0.9, 0.999)``, ``True``, ``None``, ``'text'``);
``true``/``false``/``none`` are accepted too, and anything else is taken as a bare string.
Commas inside brackets do not split. Examples: ``prodigy``, ``polyak:f_star=0``,
``adam:lr=1e-3,betas=(0.9,0.99)@cosine``, ``torch.optim.Adagrad:lr=0.1``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

__all__ = ["Spec", "RunSpec", "parse_spec", "parse_run_spec", "format_value"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced brackets in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise SpecError(f"unbalanced brackets or quotes in {text!r}")
    parts.append("".join(cur))
    return parts


def _parse_value(text: str) -> Any:
    low = text.strip()
    lowered = {"true": True, "false": False, "none": None, "inf": float("inf"), "-inf": float("-inf")}
    if low.lower() in lowered:
        return lowered[low.lower()]
    try:
        return ast.literal_eval(low)
    except (ValueError, SyntaxError):
        return low


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Spec:
    """A parsed ``name:key=value,...`` string."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in self.kwargs.items())


def parse_spec(text: str) -> Spec:
    """Parse ``name[:key=value,...]``; raise :class:`SpecError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty spec {text!r}; expected name[:key=value,...], e.g. 'prodigy' or 'adam:lr=1e-3'")
    text = text.strip()
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise SpecError(f"bad name {name!r} in spec {text!r}; expected name[:key=value,...]")
    kwargs: dict[str, Any] = {}
    if sep:
        if not rest.strip():
            raise SpecError(f"spec {text!r} has ':' but no key=value after it")
        for item in _split_top_level(rest, ","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not _KEY.match(key) or not value.strip():
                raise SpecError(f"bad argument {item.strip()!r} in spec {text!r}; expected key=value")
            if key in kwargs:
                raise SpecError(f"argument {key!r} given twice in spec {text!r}")
            kwargs[key] = _parse_value(value)
    return Spec(name, kwargs)


@dataclass(frozen=True)
class RunSpec:
    """An optimizer spec with an optional lr scheduler spec (``adam:lr=1e-3@cosine``)."""

    optimizer: Spec
    scheduler: Spec | None = None

    def __str__(self) -> str:
        return str(self.optimizer) + ("" if self.scheduler is None else "@" + str(self.scheduler))


def parse_run_spec(text: str) -> RunSpec:
    if not isinstance(text, str):
        raise SpecError(f"spec must be a string; got {type(text).__name__}")
    parts = _split_top_level(text, "@")
    if len(parts) > 2:
        raise SpecError(f"spec {text!r} has more than one '@'; expected optimizer[@scheduler]")
    opt = parse_spec(parts[0])
    sched = parse_spec(parts[1]) if len(parts) == 2 else None
    return RunSpec(opt, sched)
