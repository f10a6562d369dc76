"""The tuning-free benchmark: every method against an oracle-tuned baseline, stored, parallel.

Data flows one way: :mod:`~tuneless.bench.suite` says what to run, an executor from
:mod:`~tuneless.bench.executors` runs it, :mod:`~tuneless.bench.store` keeps every finished
run in one SQLite file, :mod:`~tuneless.bench.metrics` turns stored runs into gaps to the
oracle (:mod:`~tuneless.bench.oracle`) on each problem's target metric (held-out loss for learning
problems) and on the training loss, times to the oracle's target and a performance profile with
its AlgoPerf score, and :mod:`tuneless.report.bench_report` renders them.
:func:`run_bench` is the whole pipeline in one call.
"""

from __future__ import annotations

from .executors import InlineExecutor, LocalExecutor, RayExecutor, execute_task, make_executor
from .metrics import BenchResults, compute_results
from .oracle import BASES, GridConfig, widen
from .store import ResultStore, RunRecord, StoreError, StoreVersionError
from .suite import PRESETS, BenchInputError, Suite, Task, build_suite, default_methods
from .sweep import Progress, SweepStats, run_sweep

__all__ = [
    "run_bench", "build_suite", "Suite", "Task", "PRESETS", "default_methods", "BenchInputError",
    "ResultStore", "RunRecord", "StoreError", "StoreVersionError",
    "execute_task", "make_executor", "InlineExecutor", "LocalExecutor", "RayExecutor",
    "run_sweep", "SweepStats", "Progress", "compute_results", "BenchResults", "BASES", "GridConfig", "widen",
]


def run_bench(suite: Suite, db: str, *, backend: str = "local", workers: int = 1, address: str | None = None,
              progress: Progress | None = None, retry_failed: bool = False) -> SweepStats:
    """Run ``suite`` into the store at ``db`` on the chosen executor; returns the sweep's counts."""
    with ResultStore(db) as store:
        with make_executor(backend, workers=workers, address=address, db_path=db) as executor:
            return run_sweep(suite, store, executor, progress=progress, retry_failed=retry_failed)
