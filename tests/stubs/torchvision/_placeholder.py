"""Placeholders for the names timm's modules import from torchvision at import time but the
tests never use (datasets, transforms): a class whose attributes are placeholders too, and which
raises when it is used."""

from __future__ import annotations

from typing import Any


class _Meta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{cls.__qualname__}.{name}")


def placeholder(qualname: str) -> type:
    def unusable(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{qualname}: a test stand-in for torchvision (tests/stubs), not the real thing")

    return _Meta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__init__": unusable})


def module_getattr(module_name: str):
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{module_name}.{name}")

    return __getattr__
