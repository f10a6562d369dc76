"""What a benchmark sweep runs: the presets, the methods, and one task per run.

A :class:`Suite` is a list of problems with their step budgets, the seeds, the methods (run
spec strings) and the oracle's grid. :func:`build_suite` resolves a preset and the command
line's overrides into one, checking every name and spec *before* anything runs, so that a
typo fails at once with the closest matches instead of after an hour of sweeping.

Presets:

* ``quick``: seven problems (the banana, two convex and four nonconvex learning tasks) on
  short budgets, one seed, two grid points per decade: minutes on a 2-core CPU.
* ``full``: every registered problem at its default budget, three seeds, three grid points
  per decade.
* ``medium``: the heavier workloads at sizes meant for a GPU or a larger machine (the medium
  transformer LM and BatchNorm ResNet, fine-tuning, the long run) at their default budgets,
  three seeds, two grid points per decade.

Every run of a suite uses the suite's ``device`` and ``autocast`` dtype (CPU and none by
default); they are part of each run's key, so runs made on different hardware never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .._validate import unknown_name_message
from ..errors import SpecError, UnknownNameError
from ..problems import PROBLEMS, Problem, get_problem
from ..registry import create, create_scheduler, entry, methods_at_defaults, scheduler_entry
from ..run import AUTOCAST_DTYPES, EVAL_POINTS
from ..spec import parse_run_spec
from .oracle import BASES, GridConfig, OracleBase

__all__ = ["Suite", "Task", "PRESETS", "BASELINE_METHODS", "default_methods", "build_suite", "canonical_spec",
           "problem_dtype", "BenchInputError"]

#: untuned references run next to the learning-rate-free methods: Adam at its default lr
BASELINE_METHODS: tuple[str, ...] = ("adam@cosine",)


class BenchInputError(ValueError):
    """A bad benchmark request (preset, seeds, steps, workers...)."""


def default_methods() -> list[str]:
    """Every learning-rate-free optimizer in the registry and every anchor (MoMo-Adam), at their
    defaults, then the untuned baselines."""
    return methods_at_defaults() + list(BASELINE_METHODS)


@dataclass(frozen=True)
class Task:
    """One run: a method or an oracle grid point, on one problem, one seed, one budget."""

    problem: str
    spec: str
    seed: int
    steps: int
    role: str = "method"
    base: str | None = None
    lr: float | None = None
    #: the torch device, and the forward pass's autocast dtype ("bfloat16"; None: no autocast)
    device: str = "cpu"
    autocast: str | None = None
    #: evenly spaced evaluations during the run (not part of the key: they do not change the run)
    eval_points: int = field(default=EVAL_POINTS, compare=False)
    #: $TUNELESS_CACHE_DIR for the run (pretrained checkpoints); set by the sweep, not part of the key
    cache_dir: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        key = f"{self.problem}|{self.spec}|seed={self.seed}|steps={self.steps}"
        if self.device != "cpu":
            key += f"|device={self.device}"
        if self.autocast is not None:
            key += f"|autocast={self.autocast}"
        return key

    def label(self) -> str:
        return f"{self.spec} on {self.problem} (seed {self.seed})"


@dataclass
class Suite:
    """A resolved sweep; see the module docstring."""

    name: str
    #: (canonical problem spec, steps)
    problems: list[tuple[str, int]]
    seeds: list[int]
    #: canonical run specs
    methods: list[str]
    grid: GridConfig = field(default_factory=GridConfig)
    bases: tuple[OracleBase, ...] = BASES
    device: str = "cpu"
    autocast: str | None = None
    eval_points: int = EVAL_POINTS

    @property
    def hardware(self) -> str:
        """As :attr:`RunRecord.hardware`: ``cpu``, ``cuda bfloat16``..."""
        return self.device + ("" if self.autocast is None else f" {self.autocast}")

    def task(self, problem: str, spec: str, seed: int, steps: int, **kw) -> Task:
        """A task of this suite (its device, autocast dtype and evaluation points)."""
        return Task(problem, spec, seed, steps, device=self.device, autocast=self.autocast,
                    eval_points=self.eval_points, **kw)

    def seeds_for(self, problem: str) -> list[int]:
        """The seeds of ``problem``: analytic functions are deterministic, so only the first seed."""
        return self.seeds[:1] if get_problem(problem).kind == "analytic" else list(self.seeds)

    def method_tasks(self) -> list[Task]:
        return [self.task(p, m, s, n) for p, n in self.problems for m in self.methods for s in self.seeds_for(p)]


#: preset name -> (problems with budgets (None: the problem's default), seeds, grid)
PRESETS: dict[str, tuple[tuple[tuple[str, int | None], ...], tuple[int, ...], GridConfig]] = {
    "quick": (
        (("rosenbrock", 1500), ("logreg_digits", 300), ("mlp_digits", 300), ("cnn_digits", 250),
         ("char_lm", 300), ("least_squares", 400), ("matrix_factorization", 600)),
        (0,),
        GridConfig(points_per_decade=2),
    ),
    "full": (
        (),  # every registered problem at its default budget
        (0, 1, 2),
        GridConfig(points_per_decade=3),
    ),
    "medium": (
        (("transformer_lm:size=medium", None), ("resnet_digits:size=medium", None), ("finetune_digits", None),
         ("mlp_digits_long", None)),
        (0, 1, 2),
        GridConfig(points_per_decade=2),
    ),
}


def canonical_spec(text: str) -> str:
    """Parse, check names and arguments, and return the canonical run spec string.

    Builds the optimizer (and scheduler) on a dummy parameter so that invalid values are
    refused now, with the optimizer's own message, rather than inside every run.
    """
    spec = parse_run_spec(text)
    e = entry(spec.optimizer.name)
    name = e.name if "." not in spec.optimizer.name else spec.optimizer.name
    spec = replace(spec, optimizer=replace(spec.optimizer, name=name))
    if spec.scheduler is not None:
        se = scheduler_entry(spec.scheduler.name)
        if "." not in spec.scheduler.name:
            spec = replace(spec, scheduler=replace(spec.scheduler, name=se.name))
    probe = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = create(spec.optimizer, [probe])
        if spec.scheduler is not None:
            create_scheduler(spec.scheduler, opt, total_steps=10)
    except (UnknownNameError, SpecError, TypeError, ValueError) as exc:
        raise type(exc)(f"in spec {text!r}: {exc}") from exc
    return str(spec)


def problem_dtype(problem: Problem) -> torch.dtype:
    """The dtype the benchmark runs ``problem`` in: float64 for analytic functions, else its own."""
    if problem.kind == "analytic":
        return torch.float64
    return getattr(problem, "bench_dtype", torch.float32)


def _resolve_problem(text: str) -> Problem:
    return get_problem(text)


def build_suite(preset: str = "quick", *, problems: Sequence[str] | None = None,
                optimizers: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                steps: int | None = None, points_per_decade: int | None = None, device: str = "cpu",
                autocast: str | None = None, eval_points: int = EVAL_POINTS) -> Suite:
    """Resolve ``preset`` and the overrides into a checked :class:`Suite`.

    ``problems`` may name problems outside the preset (they run at their default budget);
    ``steps`` replaces every budget; ``optimizers`` replaces the methods (spec strings);
    ``device`` ("cpu", "cuda", "cuda:1"...) and ``autocast`` ("bfloat16", "float16" or None) say
    where and how every run computes; ``eval_points`` how many evaluations each run makes.
    """
    if preset not in PRESETS:
        raise UnknownNameError(unknown_name_message("suite preset", preset, PRESETS, ", ".join(PRESETS)))
    preset_problems, preset_seeds, grid = PRESETS[preset]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise BenchInputError(f"steps = {steps!r} is invalid; allowed: an integer >= 1")
    try:
        device = str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise BenchInputError(f"device = {device!r} is invalid; allowed: a torch device such as 'cpu', 'cuda' "
                              f"or 'cuda:1' ({exc})") from None
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise BenchInputError(f"autocast = {autocast!r} is invalid; allowed: None or one of "
                              f"{', '.join(map(repr, AUTOCAST_DTYPES))}")
    if isinstance(eval_points, bool) or not isinstance(eval_points, int) or eval_points < 0:
        raise BenchInputError(f"eval_points = {eval_points!r} is invalid; allowed: an integer >= 0")
    budgets = {get_problem(p).spec(): n for p, n in preset_problems}
    if problems is None:
        names = [p for p, _ in preset_problems] or [n for n, c in PROBLEMS.items() if getattr(c, "in_presets", True)]
    else:
        names = list(problems)
        if not names:
            raise BenchInputError("--problems is empty; name at least one problem")
    resolved: list[tuple[str, int]] = []
    for text in names:
        prob = _resolve_problem(text)
        n = (budgets.get(prob.spec()) or prob.default_steps) if steps is None else steps
        if (prob.spec(), n) not in resolved:
            resolved.append((prob.spec(), int(n)))
    seed_list = list(preset_seeds if seeds is None else seeds)
    if not seed_list:
        raise BenchInputError("--seeds is empty; give at least one seed")
    for s in seed_list:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise BenchInputError(f"seed = {s!r} is invalid; allowed: an integer >= 0")
    seed_list = sorted(set(seed_list))
    specs = default_methods() if optimizers is None else list(optimizers)
    if not specs:
        raise BenchInputError("--optimizers is empty; give at least one spec (e.g. prodigy) or leave it out")
    methods: list[str] = []
    for text in specs:
        canon = canonical_spec(text)
        if canon not in methods:
            methods.append(canon)
    if points_per_decade is not None:
        grid = replace(grid, points_per_decade=points_per_decade)
    return Suite(preset, resolved, seed_list, methods, grid, device=device, autocast=autocast,
                 eval_points=eval_points)

