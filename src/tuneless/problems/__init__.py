"""Problems with a known minimum or a fixed budget, shared by the race and the benchmark.

Analytic functions are in :mod:`.analytic`; small learning tasks in :mod:`.learning`; the
``transformers`` language model ``transformer_lm`` in :mod:`.transformer_lm`; the BatchNorm
ResNet ``resnet_digits`` and the fine-tuning task ``finetune_digits`` in :mod:`.vision`; ``transformed``
(another problem with the loss the optimizer sees scaled or shifted) in :mod:`.transformed`.
"""

from __future__ import annotations

from .._validate import unknown_name_message
from ..errors import UnknownNameError
from ..registry import check_kwargs
from ..spec import Spec, parse_spec
from .analytic import AnalyticFunction, Beale, Quadratic, Rastrigin, Rosenbrock, RosenbrockND
from .base import Problem, ProblemInstance
from .learning import LEARNING_PROBLEMS
from .transformed import Transformed
from .transformer_lm import TransformerLM
from .vision import FinetuneDigits, ResNetDigits

__all__ = ["Problem", "ProblemInstance", "AnalyticFunction", "Rosenbrock", "RosenbrockND", "Beale",
           "Quadratic", "Rastrigin", "PROBLEMS", "get_problem", "available_problems"]

#: Every problem class, by registry name.
PROBLEMS: dict[str, type[Problem]] = {cls.name: cls for cls in (Rosenbrock, RosenbrockND, Beale, Quadratic, Rastrigin,
                                                                *LEARNING_PROBLEMS, TransformerLM, ResNetDigits,
                                                                FinetuneDigits, Transformed)}


def available_problems(kind: str | None = None) -> list[str]:
    return sorted(n for n, c in PROBLEMS.items() if kind is None or c.kind == kind)


def get_problem(spec: str | Spec) -> Problem:
    """The problem named by ``spec`` (``"rosenbrock"``, ``"quadratic:condition=1e4"``)."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    cls = PROBLEMS.get(parsed.name.lower())
    if cls is None:
        raise UnknownNameError(unknown_name_message("problem", parsed.name, PROBLEMS, ", ".join(sorted(PROBLEMS))))
    check_kwargs(f"problem {cls.name!r}", cls.__init__, parsed.kwargs, skip=1)
    return cls(**parsed.kwargs)
