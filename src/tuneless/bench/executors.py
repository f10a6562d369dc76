"""Where runs execute: in this process, in a local process pool, or on a Ray cluster.

Every executor calls the same :func:`execute_task` (one thread for torch, the problem's
dtype, the task's seed, device and autocast dtype), so the same task gives the same numbers on
each of them. The task carries the cache folder of pretrained checkpoints
(``$TUNELESS_CACHE_DIR``, set for the run's duration), so that Ray workers, which do not
inherit the driver's environment, get it too. Local
pool workers write their result to the store themselves, the moment a run ends, so that
nothing finished is lost if the sweep's driver is killed; Ray workers may run on other
machines, so their results travel back and the driver writes them.

An executor has a ``capacity`` (how many tasks to keep in flight), ``submit(task)`` and
``wait()``, which returns at least one :class:`Outcome` while tasks are in flight. An
infrastructure failure (a worker process that died) comes back as an outcome with
``crash`` set; the sweep retries such a task once, then records it as a failed run.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .store import ResultStore, RunRecord, _now, _versions
from .suite import Task, problem_dtype

__all__ = ["execute_task", "Outcome", "Executor", "InlineExecutor", "LocalExecutor", "RayExecutor", "make_executor"]


#: the environment variable that tells problems where to cache pretrained checkpoints
CACHE_ENV = "TUNELESS_CACHE_DIR"


def execute_task(task: Task) -> RunRecord:
    """Run one task and return its record; never raises for a failure of the run itself."""
    import torch

    from ..problems import get_problem
    from ..run import AUTOCAST_DTYPES, run

    previous_cache = os.environ.get(CACHE_ENV)
    if task.cache_dir is not None:
        os.environ[CACHE_ENV] = task.cache_dir
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run: parallelism is across runs, and results do not depend on it
    t0 = time.perf_counter()
    kind, min_value = "unknown", None
    try:
        problem = get_problem(task.problem)
        kind, min_value = problem.kind, problem.min_value
        trace = run(problem, task.spec, steps=task.steps, seed=task.seed, dtype=problem_dtype(problem),
                    device=task.device, autocast=None if task.autocast is None else AUTOCAST_DTYPES[task.autocast],
                    eval_points=task.eval_points)
        status = "failed" if trace.error else ("diverged" if trace.diverged else "ok")
        positions = trace.positions if trace.positions is not None and trace.positions.shape[-1] == 2 else None
        return RunRecord(
            key=task.key, problem=task.problem, kind=kind, spec=task.spec, role=task.role, base=task.base,
            lr=task.lr, seed=task.seed, steps=task.steps, status=status, final=dict(trace.final),
            steps_done=int(trace.loss.size), train_seconds=trace.seconds, wall_seconds=time.perf_counter() - t0,
            initial_loss=float(trace.loss[0]) if trace.loss.size else None,
            min_value=None if min_value is None else float(min_value), error=trace.error,
            loss=trace.loss, step_size=trace.step_size, positions=positions, versions=_versions(),
            created_at=_now(), device=task.device, autocast=task.autocast,
            target_metric=problem.target_metric, target_higher=bool(problem.target_higher_is_better),
            eval_steps=trace.eval_steps, eval_curves=dict(trace.eval_metrics),
        )
    except Exception as exc:  # any failure of the run is recorded, never raised into the sweep
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" (at {os.path.basename(last.filename)}:{last.lineno})" if last else ""
        return failed_record(task, f"{type(exc).__name__}: {exc}{where}", kind=kind, min_value=min_value,
                             wall_seconds=time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous_threads)
        if task.cache_dir is not None:
            if previous_cache is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = previous_cache


def failed_record(task: Task, error: str, *, kind: str = "unknown", min_value: float | None = None,
                  wall_seconds: float = 0.0) -> RunRecord:
    return RunRecord(
        key=task.key, problem=task.problem, kind=kind, spec=task.spec, role=task.role, base=task.base, lr=task.lr,
        seed=task.seed, steps=task.steps, status="failed", final={}, steps_done=0, train_seconds=0.0,
        wall_seconds=wall_seconds, min_value=None if min_value is None else float(min_value), error=error,
        loss=np.zeros(0), step_size=np.zeros(0), versions=_versions(), created_at=_now(), device=task.device,
        autocast=task.autocast,
    )


@dataclass
class Outcome:
    task: Task
    #: the run's record (None when the worker died)
    record: RunRecord | None
    #: True when the record is already in the store (written by the worker)
    stored: bool = False
    #: what went wrong with the infrastructure (a dead worker), else None
    crash: str | None = None


class Executor(ABC):
    #: how many tasks to keep in flight
    capacity: int = 1
    name: str = "executor"

    @abstractmethod
    def submit(self, task: Task) -> None: ...

    @abstractmethod
    def wait(self) -> list[Outcome]:
        """Block until at least one task has finished; [] if none is in flight."""

    @abstractmethod
    def in_flight(self) -> int: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs each task in this process, one at a time (``--workers 1``)."""

    name = "inline"

    def __init__(self) -> None:
        self.capacity = 1
        self._queue: list[Task] = []

    def submit(self, task: Task) -> None:
        self._queue.append(task)

    def wait(self) -> list[Outcome]:
        if not self._queue:
            return []
        task = self._queue.pop(0)
        return [Outcome(task, execute_task(task))]

    def in_flight(self) -> int:
        return len(self._queue)


# ---------------------------------------------------------------------------- local process pool

_WORKER_STORES: dict[str, ResultStore] = {}


def _pool_execute(task: Task, db_path: str | None) -> tuple[RunRecord, bool]:
    """In a pool worker: run, then write the record to the store right away."""
    record = execute_task(task)
    if db_path is None:
        return record, False
    store = _WORKER_STORES.get(db_path)
    if store is None:
        store = _WORKER_STORES[db_path] = ResultStore(db_path)
    store.write(record, replace=True)
    return record, True


def _pool_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class LocalExecutor(Executor):
    """A pool of ``workers`` processes on this machine (started with ``spawn``)."""

    name = "local"

    def __init__(self, workers: int, db_path: str | os.PathLike | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers = {workers!r} is invalid; allowed: an integer >= 1")
        self.capacity = workers
        self.db_path = None if db_path is None else str(db_path)
        self._futures: dict[cf.Future, Task] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.capacity, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_pool_init)

    def submit(self, task: Task) -> None:
        self._futures[self._pool.submit(_pool_execute, task, self.db_path)] = task

    def wait(self) -> list[Outcome]:
        if not self._futures:
            return []
        done, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
        out, broken = [], False
        for fut in done:
            task = self._futures.pop(fut)
            try:
                record, stored = fut.result()
                out.append(Outcome(task, record, stored=stored))
            except cf.process.BrokenProcessPool as exc:
                broken = True
                out.append(Outcome(task, None, crash=f"worker process died ({exc})"))
            except Exception as exc:  # e.g. the store refused the write
                out.append(Outcome(task, None, crash=f"{type(exc).__name__}: {exc}"))
        if broken:  # every other future of the dead pool fails too: collect them, start a new pool
            for fut, task in list(self._futures.items()):
                try:
                    record, stored = fut.result()
                    out.append(Outcome(task, record, stored=stored))
                except Exception as exc:
                    out.append(Outcome(task, None, crash=f"worker process died ({type(exc).__name__})"))
            self._futures.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return out

    def in_flight(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- Ray


def _ray_execute(task: Task) -> RunRecord:
    return execute_task(task)


class RayExecutor(Executor):
    """Runs tasks as Ray tasks (one CPU each) on the cluster at ``address``.

    ``address=None`` starts a local Ray instance with ``workers`` CPUs (and stops it on
    ``close``); otherwise it connects to a running cluster (``"auto"``, ``"host:port"``, or
    ``"ray://host:10001"`` with ``ray[client]``), whose nodes must have tuneless installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError("--backend ray needs Ray: pip install 'tuneless[ray]'") from exc
        self._ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if address is None:
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
            else:
                kwargs["address"] = address
            ray.init(**kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, 2 * cpus)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_execute)
        self._refs: dict[Any, Task] = {}

    def submit(self, task: Task) -> None:
        self._refs[self._remote.remote(task)] = task

    def wait(self) -> list[Outcome]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=1)
        out = []
        for ref in ready:
            task = self._refs.pop(ref)
            try:
                out.append(Outcome(task, self._ray.get(ref)))
            except Exception as exc:  # the worker died or the task could not run
                out.append(Outcome(task, None, crash=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        return out

    def in_flight(self) -> int:
        return len(self._refs)

    def close(self) -> None:
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - best effort
                pass
        self._refs.clear()
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(backend: str = "local", *, workers: int = 1, address: str | None = None,
                  db_path: str | os.PathLike | None = None) -> Executor:
    """The executor for ``backend`` ("local" or "ray"); ``workers=1`` locally runs in this process."""
    if backend == "local":
        if address is not None:
            raise ValueError("--address is only for --backend ray")
        return InlineExecutor() if workers == 1 else LocalExecutor(workers, db_path)
    if backend == "ray":
        return RayExecutor(address, workers)
    raise ValueError(f"backend = {backend!r} is invalid; allowed: 'local' or 'ray'")
