"""The sweep: every method and the oracle's grid on every problem and seed, resumable.

The driver keeps the executor busy with ready tasks, writes each result the moment it
arrives (unless the worker already did), and widens an oracle grid as soon as all of its
points have finished (:func:`tuneless.bench.oracle.widen`), on either view's score (the problem's
target metric and the training loss: each view picks its own oracle). Tasks already in the store are
skipped, so a sweep that was killed resumes where it stopped; a task whose worker process
died is retried once, then recorded as a failed run. Every task carries the cache folder
``<the store's folder>/cache`` (``$TUNELESS_CACHE_DIR`` of its run: pretrained checkpoints).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, TextIO

from .executors import Executor, Outcome, failed_record
from .metrics import TRAIN_LOSS, Metric, seed_score
from .oracle import OracleBase, initial_grid, lr_value, oracle_spec, widen
from .store import ResultStore, RunRecord
from .suite import Suite, Task

__all__ = ["run_sweep", "SweepStats", "Progress", "plan_oracle_tasks"]

MAX_ATTEMPTS = 2


@dataclass
class SweepStats:
    planned: int = 0
    skipped: int = 0
    executed: int = 0
    failed: int = 0
    diverged: int = 0
    widened: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)


class Progress:
    """A progress bar with a time estimate on ``stream`` (redrawn in place on a terminal)."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 28, every: float = 10.0) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width, self.every = width, every
        self.total = self.done = self.skipped = 0
        self.t0 = time.perf_counter()
        self._last_print = -math.inf
        self._last_len = 0
        self._t_first = self.t0

    def start(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped
        self.t0 = time.perf_counter()
        if skipped:
            self.stream.write(f"resuming: {skipped} of {total} runs already in the store\n")
            self.stream.flush()

    def update(self, label: str, *, total: int | None = None, skipped: int | None = None) -> None:
        """One more run finished; ``total``/``skipped`` follow the plan as the oracle's grids widen."""
        self.done += 1
        if self.done == 1:
            self._t_first = time.perf_counter()
        if total is not None:
            self.total = total
        if skipped is not None:
            self.skipped = skipped
        self._render(label)

    def _render(self, label: str, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and not self.tty and now - self._last_print < self.every:
            return
        self._last_print = now
        finished = self.done + self.skipped
        frac = finished / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = now - self.t0
        remaining = self.total - finished
        if self.done >= 3 and remaining:
            # the rate since the first result: the start-up (workers importing torch) is not a run
            rate = (now - self._t_first) / (self.done - 1)
            eta = f"~{_fmt_time(rate * remaining)} left"
        elif remaining:
            eta = "estimating time left"
        else:
            eta = "done"
        text = (f"[{'#' * fill}{'.' * (self.width - fill)}] {finished}/{self.total} runs  "
                f"{_fmt_time(elapsed)} elapsed  {eta}  {label}")
        if self.tty:
            text = text[:max(40, _columns() - 1)]
            pad = max(0, self._last_len - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._last_len = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._render("", final=True)


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((100, 20)).columns


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


@dataclass
class _Group:
    """The grid of one oracle base on one problem: indices, and which runs are still out."""

    problem: str
    steps: int
    base: OracleBase
    grid: list[int]
    waiting: set[str] = field(default_factory=set)
    rounds: int = 0


def plan_oracle_tasks(suite: Suite, problem: str, steps: int, base: OracleBase, ks: list[int]) -> list[Task]:
    """The oracle runs of ``base`` at grid indices ``ks`` on ``problem`` (every seed of the suite)."""
    tasks = []
    for k in ks:
        lr = lr_value(k, suite.grid.points_per_decade)
        for s in suite.seeds_for(problem):
            tasks.append(suite.task(problem, oracle_spec(base, lr), s, steps, role="oracle", base=base.name, lr=lr))
    return tasks


def run_sweep(suite: Suite, store: ResultStore, executor: Executor, *, progress: Progress | None = None,
              retry_failed: bool = False, on_record: Callable[[RunRecord], None] | None = None) -> SweepStats:
    """Run every task of ``suite`` that the store does not hold yet; returns counts."""
    stats = SweepStats()
    t0 = time.perf_counter()
    done: dict[str, RunRecord] = {r.key: r for r in store.records(curves=False)}
    if retry_failed:
        done = {k: r for k, r in done.items() if r.status != "failed"}
    ppd = suite.grid.points_per_decade
    ready: deque[Task] = deque()
    groups: list[_Group] = []
    planned: set[str] = set()
    cache_dir = str(store.path.resolve().parent / "cache")

    def plan(task: Task, urgent: bool = False) -> None:
        if task.key in planned:
            return
        task = replace(task, cache_dir=cache_dir)
        planned.add(task.key)
        stats.planned += 1
        if task.key in done:
            stats.skipped += 1
        elif urgent:  # a widened grid point: others wait on it, so it runs next
            ready.appendleft(task)
        else:
            ready.append(task)

    for problem, steps in suite.problems:
        for base in suite.bases:
            group = _Group(problem, steps, base, initial_grid(base, suite.grid))
            for task in plan_oracle_tasks(suite, problem, steps, base, group.grid):
                plan(task)
                group.waiting.add(task.key)
            groups.append(group)
    for task in suite.method_tasks():
        plan(task)

    def check_groups() -> None:
        """Widen every grid whose points have all finished and whose best point is at an end (in either view)."""
        for g in groups:
            g.waiting = {k for k in g.waiting if k not in done}
            while not g.waiting:
                new_set: set[int] = set()
                for metric in _view_metrics(g.problem):
                    scores = {}
                    for k in g.grid:
                        lr = lr_value(k, ppd)
                        keys = [suite.task(g.problem, oracle_spec(g.base, lr), s, g.steps).key
                                for s in suite.seeds_for(g.problem)]
                        scores[k] = seed_score([done[key] for key in keys], metric)
                    new_set |= set(widen(g.grid, scores, suite.grid))
                new = sorted(new_set)
                if not new:
                    break
                g.rounds += 1
                stats.widened += 1
                g.grid = sorted(set(g.grid) | set(new))
                for task in plan_oracle_tasks(suite, g.problem, g.steps, g.base, new):
                    plan(task, urgent=True)
                    if task.key not in done:
                        g.waiting.add(task.key)

    attempts: dict[str, int] = {}
    check_groups()
    if progress is not None:
        progress.start(stats.planned, stats.skipped)
    try:
        while ready or executor.in_flight():
            while ready and executor.in_flight() < executor.capacity:
                executor.submit(ready.popleft())
            for outcome in executor.wait():
                record = _settle(outcome, store, attempts, ready, stats)
                if record is None:
                    continue
                done[record.key] = record
                stats.executed += 1
                stats.failed += record.status == "failed"
                stats.diverged += record.status == "diverged"
                if on_record is not None:
                    on_record(record)
                if progress is not None:
                    progress.update(f"{record.spec} on {record.problem}: {record.status}",
                                    total=stats.planned, skipped=stats.skipped)
            check_groups()
    finally:
        stats.seconds = time.perf_counter() - t0
        if progress is not None:
            progress.finish()
    return stats


def _view_metrics(problem: str) -> tuple[Metric, ...]:
    """The metrics of both views on ``problem``: its target metric and the training loss."""
    from ..problems import get_problem

    p = get_problem(problem)
    target = Metric(p.target_metric, bool(p.target_higher_is_better))
    return (target,) if target == TRAIN_LOSS else (target, TRAIN_LOSS)


def _settle(outcome: Outcome, store: ResultStore, attempts: dict[str, int], ready: deque[Task],
            stats: SweepStats) -> RunRecord | None:
    """Store an outcome's record (unless the worker did); requeue or fail a crashed task."""
    task = outcome.task
    record = outcome.record
    if record is None:
        attempts[task.key] = attempts.get(task.key, 0) + 1
        stats.crashes.append(f"{task.label()}: {outcome.crash}")
        if attempts[task.key] < MAX_ATTEMPTS:
            ready.appendleft(task)
            return None
        record = failed_record(task, f"worker crashed {MAX_ATTEMPTS} times: {outcome.crash}")
        store.write(record, replace=True)
        return record
    if not outcome.stored:
        store.write(record, replace=True)
    return record
