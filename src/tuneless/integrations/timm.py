"""timm (1.0) with tuneless optimizers: :func:`register` puts them into timm's optimizer factory.

::

    import timm.optim
    from tuneless.integrations.timm import register

    register()                                    # once, before creating optimizers
    opt = timm.optim.create_optimizer_v2(model, "tltuneless", lr=1.0)
    # timm's train script: --opt tlprodigy --lr 1.0 --sched none   (see the caveats below)

Names. timm's factory lowercases the name and keeps what follows the last underscore
(``lookahead_adamw`` -> Lookahead over ``adamw``), so ``sf_adamw`` would resolve to timm's own
``adamw``. Each tuneless method is registered as ``"tl"`` + its registry name without
underscores: ``tltuneless``, ``tlprodigy``, ``tlsfadamw``, ``tldadaptadam``, ``tlmomo``, ... (the
prefix avoids timm's own names; :func:`register` returns them all).

Arguments. timm always passes ``weight_decay`` (0 when it built the param groups itself, its
``weight_decay`` then set per group), ``foreach`` when given, ``momentum`` only to methods
registered with one, and ``eps``/``betas`` only to those that take them. A tuneless method without
``weight_decay`` (Polyak, SPS, Mechanic) accepts it when it is 0 and refuses it otherwise, also
when timm put it into the param groups it built from a model (where it would be ignored).

Caveats of timm's train script (``train.py``), not fixed by registering:

* it calls ``optimizer.step()`` with no loss: methods that take the loss (``tltuneless``,
  ``tlmomo``, ``tlpolyak``, ``tlsps``...) raise ``LossRequiredError`` there unless the loop
  calls ``optimizer.observe_loss(loss)`` after the backward pass (a one-line change);
* it computes ``lr`` from ``--lr-base`` and the batch size unless ``--lr`` is given: pass
  ``--lr 1.0`` (the multiplier of a learning-rate-free method) and ``--sched none``;
* it never calls ``optimizer.train()``/``eval()``: with Schedule-Free methods evaluate and save
  under :func:`tuneless.integrations.evaluation_mode`.

Mechanic has no ``lr`` (its base optimizer's is the one that counts): timm's ``lr=1.0`` is dropped
for it, any other value refused.

Tested (``tests/test_integrations.py``: every method built through ``create_optimizer_v2``, and
``examples/timm_train.py``) against timm 1.0.31 with a stand-in for torchvision, which timm
imports at import time but whose real package cannot be installed next to the torch pinned here
(``tests/stubs/torchvision``); timm's factory and models use nothing of it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["register", "timm_name"]

PREFIX = "tl"


def timm_name(registry_name: str, prefix: str = PREFIX) -> str:
    """The name under which :func:`register` puts a tuneless method into timm's factory."""
    return (prefix + registry_name).replace("_", "").lower()


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _factory(cls: type) -> Any:
    """``cls``, or for a class without ``weight_decay`` or ``lr``, a factory that drops what timm
    passes for them when it is neutral (``weight_decay=0``; ``lr=1.0``, the multiplier timm's
    train script is told to use) and passes any other value on, to be refused by the class with
    its valid arguments."""
    takes_decay, takes_lr = _accepts(cls, "weight_decay"), _accepts(cls, "lr")
    if takes_decay and takes_lr:
        return cls

    @functools.wraps(cls, updated=())
    def create(params: Any, *args: Any, **kwargs: Any) -> Any:
        if not takes_decay and not kwargs.get("weight_decay", 0.0):
            kwargs.pop("weight_decay", None)  # a decay other than 0 is refused by the class
        if not takes_lr and kwargs.get("lr", 1.0) == 1.0:
            kwargs.pop("lr", None)  # (Mechanic: its base's lr is the one that counts)
        params = list(params)
        for group in params:  # timm puts weight_decay into the groups it builds from a model
            if not takes_decay and isinstance(group, dict) and group.get("weight_decay", 0.0):
                raise ValueError(
                    f"{cls.__name__} has no weight decay, and timm asked for weight_decay="
                    f"{group['weight_decay']!r}: pass weight_decay=0 (--weight-decay 0)")
            if not takes_lr and isinstance(group, dict) and group.get("lr", 1.0) == 1.0:
                group.pop("lr", None)
        return cls(params, *args, **kwargs)

    return create


def register(prefix: str = PREFIX, registry: Any = None) -> list[str]:
    """Register every tuneless method in timm's optimizer factory; returns the timm names.

    Args:
        prefix: put before each registry name (underscores are dropped from the whole name,
            since timm's factory keeps only what follows the last one).
        registry: a ``timm.optim.OptimizerRegistry`` (default: timm's default registry, the one
            ``create_optimizer_v2`` uses).
    """
    if "_" in prefix:
        raise ValueError(f"register: prefix must not contain '_' (timm keeps what follows the last one); got {prefix!r}")
    from timm.optim import OptimInfo
    from timm.optim import _optim_factory

    from .. import registry as tuneless_registry

    target = registry if registry is not None else _optim_factory.default_registry
    names = []
    for registry_name in tuneless_registry.available(source="tuneless"):
        cls = tuneless_registry.entry(registry_name).factory
        name = timm_name(registry_name, prefix)
        target.register(OptimInfo(
            name=name, opt_class=_factory(cls), description=f"tuneless {registry_name}: {cls.__name__}",
            has_eps=_accepts(cls, "eps"), has_momentum=False, has_betas=_accepts(cls, "betas")))
        names.append(name)
    return names
