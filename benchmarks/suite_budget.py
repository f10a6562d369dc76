#!/usr/bin/env python
"""How long a benchmark preset takes on this machine, projected from runs already stored.

A preset's sweep is its method runs (every default method on every problem and seed) and its
oracle runs (Adam and SGD with momentum over a learning-rate grid, widened where the best point
is at an end). Each of those runs that a store already holds (matched by its key: problem,
spec, seed, steps) brings its measured ``wall_seconds`` (the whole run: building the problem,
training, evaluating); the oracle's runs are the ones the stores hold for that problem, seed and
budget (the grid as it was really widened). A run no store holds is estimated by the median of
the stored runs of its problem and budget, and counted apart.

The projection packs the runs onto ``--workers`` processes, longest first (LPT: never more than
4/3 of the best packing): a lower bound of a sweep's time as it ignores the process start-ups
and the oracle's widening rounds, which wait for the first grid. Runs timed beside other work
were slower than they would be alone, which pushes the other way. It is an estimate; time the
real sweep when it matters (``time tuneless bench quick``).

Example::

    python benchmarks/suite_budget.py full --workers 2 \\
        --db benchmarks/results/default-design.sqlite --db benchmarks/results/default-heldout.sqlite
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tuneless.bench.oracle import initial_grid
from tuneless.bench.store import ResultStore, RunRecord
from tuneless.bench.suite import PRESETS, build_suite


@dataclass
class ProblemBudget:
    problem: str
    steps: int
    seeds: int
    method_runs: int
    oracle_runs: int
    estimated_runs: int  # runs no store holds (timed by the median of the problem's stored runs)
    seconds: float       # the problem's runs, summed


def lpt_makespan(durations: Iterable[float], workers: int) -> float:
    """The time ``workers`` processes take for jobs of ``durations``, each next longest job given
    to the least loaded process (longest-processing-time first)."""
    if workers < 1:
        raise ValueError(f"workers = {workers!r} is invalid; allowed: an integer >= 1")
    loads = [0.0] * workers
    heapq.heapify(loads)
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


def project(preset: str, records: Sequence[RunRecord]) -> tuple[list[ProblemBudget], list[float]]:
    """Per problem of ``preset``: its runs and their summed time; and every run's duration."""
    suite = build_suite(preset)
    by_key = {r.key: r for r in records if r.status in ("ok", "diverged")}
    budgets, durations = [], []
    all_tasks = suite.method_tasks()
    for problem, steps in suite.problems:
        seeds = suite.seeds_for(problem)
        same = [r.wall_seconds for r in by_key.values() if r.problem == problem and r.steps == steps]
        median = statistics.median(same) if same else float("nan")
        tasks = [t for t in all_tasks if t.problem == problem]
        times, estimated = [], 0
        for t in tasks:
            r = by_key.get(t.key)
            if r is None:
                estimated += 1
            times.append(r.wall_seconds if r is not None else median)
        oracle = [r.wall_seconds for r in by_key.values()
                  if r.role == "oracle" and r.problem == problem and r.steps == steps and r.seed in seeds]
        if not oracle:  # the initial grid, estimated
            count = sum(len(initial_grid(base, suite.grid)) for base in suite.bases) * len(seeds)
            oracle, estimated = [median] * count, estimated + count
        budgets.append(ProblemBudget(problem, steps, len(seeds), len(tasks), len(oracle), estimated,
                                     sum(times) + sum(oracle)))
        durations.extend(times + oracle)
    return budgets, durations


def markdown(preset: str, budgets: list[ProblemBudget], durations: list[float], workers: int,
             dbs: list[str]) -> str:
    total = sum(durations)
    lines = [f"Preset `{preset}`: {len(durations)} runs, {total / 60:.1f} min of runs in all; "
             f"on {workers} worker(s), packed longest first: **{lpt_makespan(durations, workers) / 60:.1f} min** "
             f"(stores: {', '.join(dbs)}).", "",
             "| problem | steps | seeds | method runs | oracle runs | estimated runs | minutes of runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for b in sorted(budgets, key=lambda b: -b.seconds):
        lines.append(f"| {b.problem} | {b.steps} | {b.seeds} | {b.method_runs} | {b.oracle_runs} | "
                     f"{b.estimated_runs} | {b.seconds / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=list(PRESETS))
    ap.add_argument("--db", action="append", required=True, help="a results store (repeat for several)")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers: {args.workers} is invalid; allowed: an integer >= 1")
    records: list[RunRecord] = []
    for db in args.db:
        if not Path(db).is_file():
            ap.error(f"--db: {db!r} is not a file")
        records.extend(ResultStore(db, create=False).records(curves=False))
    budgets, durations = project(args.preset, records)
    text = markdown(args.preset, budgets, durations, args.workers, args.db)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
