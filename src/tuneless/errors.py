"""Dedicated exception types of tuneless.

Each one subclasses the built-in exception a caller would already catch (``ValueError``,
``TypeError``, ``RuntimeError``, ``KeyError``), so that generic handlers keep working while
tests and users can catch the precise failure.
"""

from __future__ import annotations

__all__ = [
    "InvalidArgumentError",
    "ComplexParameterError",
    "UnknownArgumentError",
    "UnknownNameError",
    "SpecError",
    "LossRequiredError",
    "SparseGradientError",
    "WrongModeError",
]


class InvalidArgumentError(ValueError):
    """A hyperparameter or argument has a value outside what is allowed."""


class ComplexParameterError(InvalidArgumentError):
    """A complex parameter given to an optimizer that does not train complex parameters (refused
    at construction, never in the middle of a step)."""


class UnknownArgumentError(TypeError):
    """A keyword argument that the callee does not take (never silently swallowed)."""


class UnknownNameError(KeyError):
    """A name (optimizer, problem, function) that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class SpecError(ValueError):
    """A malformed spec string such as ``"prodigy:d_coef"``."""


class LossRequiredError(RuntimeError):
    """An optimizer whose step size needs the loss got neither ``loss=`` nor a closure."""


class SparseGradientError(RuntimeError):
    """A parameter has a sparse gradient, which tuneless optimizers do not support."""


class WrongModeError(RuntimeError):
    """An operation was called in a mode that does not allow it (e.g. ``step`` in eval mode)."""
