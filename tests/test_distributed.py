"""Sharded and data-parallel training: every rank takes the step one process would take.

Two CPU processes talk over gloo. They are started by the test itself, with
``torch.multiprocessing`` and the forkserver start method: ``torch`` is imported once per session
by the fork server, so a launch costs a fraction of a second and the checkpoint test can restart
in new processes. Every collective runs in a process group with a short timeout, so a rank that
skips a collective makes its optimizer's test fail with a timeout instead of blocking the suite;
each (optimizer, scenario) job runs in its own process group, so that one optimizer's hang does
not spoil the other results, and the whole launch is killed after ``JOB_TIMEOUT_S``.

For every row of the contract table (``tests/optim_db.py``: rows added later are covered without
editing this file; elementwise rows too, for the no-reduction claim) a small float64 model with
two param groups is trained for ``STEPS`` steps on 16 examples a step:

* ``fsdp``: FSDP2 (``fully_shard`` on a CPU device mesh), 8 examples per rank. Parameters and
  gradients are DTensor shards; on rank 1 three of the five shards are empty, and the parameter
  ``gate`` gets no gradient every third step. The trajectory must equal the one-process one.
* ``ddp``: DistributedDataParallel, 8 examples per rank, and nothing but building the
  optimizer (the ranks' losses are averaged by default). Both replicas must equal the
  one-process trajectory.
* ``ddp_opt_out`` (the rows whose step size comes from the loss): DDP with
  ``set_loss_group(opt, None)``, for ``OPT_OUT_STEPS`` steps, twice: each rank passing its own
  loss (kept: the replicas must differ, with no collective), and each rank passing the mean of
  the ranks' losses, averaged by the caller (then it must equal the one-process run).
* ``manual``: sharding by hand with :func:`tuneless.distributed.set_process_group` (as FSDP1
  with ``use_orig_params`` does): each rank keeps the gradients of the parameters it owns only.
  Rank 1 owns only ``gate``, so every third step it has *no gradient at all*, and must still
  enter the step's collective.
* ``resume``: the ``fsdp`` run saves a ``torch.distributed.checkpoint`` checkpoint (model and
  optimizer, param-group scalars included) before step ``SAVE_AT``, between steps, when there
  are no gradients. A second launch (new processes, new process group, a model initialised
  differently) loads it with ``get_state_dict`` / ``dcp.load`` / ``set_state_dict`` and continues:
  the continued trajectory must be bit-identical to the uninterrupted one.

The all-reduces each step makes are recorded: one for the statistics of a method whose step size
comes from them, none for an elementwise method, one of one number for the loss of a method that
takes it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import tuneless
import tuneless.distributed as td
from tests.optim_db import FUSED_DB, OPTIM_DB, OptimizerInfo
from tuneless.optim.base import TunelessOptimizer, local_tensor

pytestmark = pytest.mark.timeout(600)

WORLD = 2
STEPS = 50
SAVE_AT = 25
BATCH = 16  # examples per step, split evenly over the ranks
COLLECTIVE_TIMEOUT_S = 10.0  # a rank that waits this long for the other was left alone in a collective
JOB_TIMEOUT_S = 300.0
SCENARIOS = ("fsdp", "ddp", "manual")
NONFINITE_SCENARIOS = ("fsdp_nonfinite", "ddp_nonfinite")
OPT_OUT_STEPS = 5
NONFINITE_STEPS, NONFINITE_AT = 8, 3  # the non-finite scenarios: a NaN on rank 1 at this step
ROWS = {info.name: info for info in OPTIM_DB}
#: the default's compiled step (``fused=True``) under FSDP2 and DDP, against the same row's
#: one-process run unfused: its statistics and its non-finite flag come from the compiled
#: kernel's sums over each rank's shards, so they must be reduced as the unfused ones are (one
#: row: each rank compiles its kernels)
FUSED_ROWS = {info.name: info for info in FUSED_DB if info.name == "Tuneless-fused"}
FUSED_SCENARIOS = ("fsdp", "ddp", "fsdp_nonfinite", "ddp_nonfinite")
LOSS_BASED = [name for name, info in ROWS.items() if info.requires_loss]  # step size from the loss
RTOL, ATOL = 1e-8, 1e-9  # float64; a statistic not reduced over ranks is off by ~1e-2
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the model and data


class Net(torch.nn.Module):
    """A small float64 network of five tensors; three have fewer rows than there are ranks.

    ``gate`` enters the output only when ``use_gate``; on the other steps it has no gradient.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        f64 = dict(dtype=torch.float64)
        self.inp = torch.nn.Linear(3, 5, **f64)
        self.out = torch.nn.Linear(5, 1, **f64)
        self.gate = torch.nn.Parameter(torch.zeros(1, 3, **f64))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, **f64))

    def forward(self, x: torch.Tensor, use_gate: bool) -> torch.Tensor:
        y = self.out(torch.tanh(self.inp(x))).sum(-1)
        if use_gate:
            y = y + torch.tanh(x @ self.gate.T).sum(-1)
        return y

    def groups(self) -> list[dict[str, Any]]:
        """Two param groups: the shared scalars stay identical copies in both under sharding."""
        return [{"params": [self.inp.weight, self.inp.bias]},
                {"params": [self.out.weight, self.out.bias, self.gate]}]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ w + 0.1)


X, Y = _data()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The step's 16 examples (a fixed permutation per step) and whether ``gate`` is used."""
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(100 + step))[:BATCH]
    return X[idx], Y[idx], step % 3 != 2


def rank_rows(rank: int) -> slice:
    return slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)


def backward(model: torch.nn.Module, step: int, rows: slice) -> torch.Tensor:
    x, y, use_gate = batch(step)
    loss = ((model(x[rows], use_gate) - y[rows]) ** 2).mean()
    loss.backward()
    return loss.detach()


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter (a shard under FSDP2), by name."""
    return {name.removeprefix("module."): local_tensor(p).detach().clone() for name, p in model.named_parameters()}


def reference(info: OptimizerInfo) -> list[dict[str, torch.Tensor]]:
    """The one-process trajectory: every parameter after each step, 16 examples a step."""
    model = Net()
    opt = info.build(model.groups())
    traj = []
    for step in range(STEPS):
        loss = backward(model, step, slice(None))
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        traj.append(params_of(model))
    return traj


# ----------------------------------------------------------------------------- what runs on each rank


@contextlib.contextmanager
def counting_all_reduces(log: list[list[int]]):
    """Append to ``log`` the sizes of the ``torch.distributed.all_reduce`` calls made in the block."""
    import torch.distributed as dist

    original, calls = dist.all_reduce, []

    def counted(tensor, *args, **kwargs):
        # the non-finite flag (one int32 number) is recorded by name, statistics by their size
        calls.append("flag" if tensor.dtype == torch.int32 else tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original
        log.append(calls)


def _train(model, opt, steps, rows, by_hand=None):
    """Train over ``steps`` on ``rows`` of each batch; record this rank's parameters and all-reduces."""
    traj, collectives = [], []
    for step in steps:
        loss = backward(model, step, rows)
        if by_hand is not None:
            by_hand.drop_gradients_of_others()
        with counting_all_reduces(collectives):
            opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if by_hand is not None:
            by_hand.send_owned_parameters()
        traj.append(params_of(model))
    return dict(traj=traj, collectives=collectives)


def _fsdp_model(group, seed=0):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = Net(seed)
    # reshard_after_forward=False: one all-gather a step instead of two (the optimizer sees the same shards)
    fully_shard(model, mesh=DeviceMesh.from_group(group, "cpu"), reshard_after_forward=False)
    return model


def _checkpoint(out_dir: Path, info: OptimizerInfo) -> str:
    return str(out_dir / f"ckpt-{info.name}")


def _run_fsdp(info, group, rank, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp_model(group)
    opt = info.build(model.groups())
    first = _train(model, opt, range(SAVE_AT), rank_rows(rank))
    try:  # between steps: no gradients
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=_checkpoint(out_dir, info), process_group=group)
        save_error = None
    except BaseException:  # the resume test reports it; DCP raises on every rank, so training goes on
        save_error = traceback.format_exc(limit=-8)
    second = _train(model, opt, range(SAVE_AT, STEPS), rank_rows(rank))
    return dict(traj=first["traj"] + second["traj"], collectives=first["collectives"] + second["collectives"],
                save_error=save_error, state_numel=state_numel(model, opt))


def state_numel(model, opt) -> dict[str, dict[str, int]]:
    """Elements this rank holds of each state buffer, by parameter name and state key."""
    out = {}
    for name, p in model.named_parameters():
        entry = opt.state.get(p, {})
        out[name.removeprefix("module.")] = {key: local_tensor(value).numel() for key, value in entry.items()
                                             if isinstance(value, torch.Tensor)}
    return out


def _run_resume(info, group, rank, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model(group, seed=7)  # a different start: everything must come from the checkpoint
    opt = info.build(model.groups())
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=_checkpoint(out_dir, info), process_group=group)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return _train(model, opt, range(SAVE_AT, STEPS), rank_rows(rank))


def _run_ddp(info, group, rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(Net(), process_group=group, find_unused_parameters=True)  # gate: unused every third step
    opt = info.build(model.module.groups())  # nothing else: the ranks' losses are averaged by default
    return _train(model, opt, range(STEPS), rank_rows(rank))


def _run_ddp_opt_out(info, group, rank, out_dir):
    """DDP with the loss used as given: each rank's own loss, then the mean the caller took."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, caller_averages in (("own", False), ("caller_mean", True)):
        model = DDP(Net(), process_group=group, find_unused_parameters=True)
        opt = info.build(model.module.groups())
        td.set_loss_group(opt, None)
        traj, collectives = [], []
        for step in range(OPT_OUT_STEPS):
            loss = backward(model, step, rank_rows(rank))
            if caller_averages:
                dist.all_reduce(loss, group=group)
                loss = loss / dist.get_world_size(group)
            with counting_all_reduces(collectives):
                opt.step(loss=loss)
            opt.zero_grad(set_to_none=True)
            traj.append(params_of(model))
        out[name] = dict(traj=traj, collectives=collectives)
    return out


def _owner(name: str) -> int:
    """The rank that owns a parameter in the ``manual`` scenario: rank 1 owns only ``gate``."""
    return 1 if name == "gate" else 0


class _ByHand:
    """Sharding by hand: keep the gradients of owned parameters; after the step, owners send."""

    def __init__(self, model, rank, group):
        import torch.distributed as dist

        self.named, self.rank, self.group = list(model.named_parameters()), rank, group
        self.ranks = dist.get_process_group_ranks(group)

    def drop_gradients_of_others(self):
        for name, p in self.named:
            if _owner(name) != self.rank:
                p.grad = None

    def send_owned_parameters(self):
        import torch.distributed as dist

        for name, p in self.named:
            dist.broadcast(p.data, src=self.ranks[_owner(name)], group=self.group)


def _run_manual(info, group, rank, out_dir):
    model = Net()
    opt = info.build(model.groups())
    td.set_process_group(opt, group)
    # Every rank computes every gradient on all 16 examples, then keeps only its own.
    return _train(model, opt, range(STEPS), slice(None), by_hand=_ByHand(model, rank, group))


class _UnevenStatistics(TunelessOptimizer):
    """Breaks the collective contract on purpose: rank r sums a vector of r + 1 statistics."""

    registry_name = ""

    def __init__(self, params, lr: float = 1.0, *, foreach: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, foreach=foreach))

    def _update(self, loss):
        import torch.distributed as dist

        self._global_sum(torch.zeros(dist.get_rank() + 1, dtype=torch.float64))


def _run_checks(info, group, rank, out_dir):
    """Guards: the default loss group, mixed plain/sharded parameters, the collective-length check."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    # 1. Plain parameters on several processes: the loss group is the default one, with no
    #    warning; set_process_group(opt, None) keeps it; set_loss_group(opt, None) opts out.
    opt = tuneless.Polyak(Net().parameters())
    wrapped = tuneless.ScheduleFree(tuneless.Polyak(Net().parameters()))
    td.set_process_group(wrapped, None)
    opted_out = tuneless.Mechanic(tuneless.Polyak(Net().parameters()))
    td.set_loss_group(opted_out, None)
    out["loss_groups"] = [td.loss_group(opt) is dist.group.WORLD, td.loss_group(wrapped.base) is dist.group.WORLD,
                          td.loss_group(opted_out.base_optimizer) is None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(loss=backward(Net(), 0, rank_rows(rank)))
    out["warnings"] = [str(w.message) for w in caught]
    # 2. Only a submodule sharded: the root's plain parameters would be counted once per rank.
    model = Net()
    fully_shard(model.inp, mesh=DeviceMesh.from_group(group, "cpu"))
    opt = tuneless.Polyak(model.parameters())
    backward(model, 0, rank_rows(rank))
    try:
        opt.step(loss=1.0)
        out["mixed_error"] = None
    except ValueError as e:
        out["mixed_error"] = str(e)
    # 3. TUNELESS_CHECK_COLLECTIVES=1 turns a length mismatch into an error naming the optimizer.
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    opt = _UnevenStatistics([p])
    td.set_process_group(opt, group)
    os.environ["TUNELESS_CHECK_COLLECTIVES"] = "1"
    try:
        opt.step()
        out["length_error"] = None
    except RuntimeError as e:
        out["length_error"] = str(e)
    finally:
        del os.environ["TUNELESS_CHECK_COLLECTIVES"]
    return out


def _poison_local_shard(model) -> None:
    """A NaN in this rank's shard of the first parameter that has one (the other rank's shard is finite)."""
    for p in model.parameters():
        if p.grad is not None and local_tensor(p.grad).numel():
            local_tensor(p.grad).view(-1)[0] = float("nan")
            return
    raise AssertionError("no gradient shard on this rank")


def _run_nonfinite(info, group, rank, out_dir, sharded):
    """A NaN on rank 1 only at step NONFINITE_AT. FSDP2: in rank 1's gradient shard after the
    reduce-scatter (rank 0's shards are finite: the decision must be shared). DDP: in rank 1's
    loss before backward (the all-reduce spreads it, as a real NaN spreads)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _fsdp_model(group) if sharded else DDP(Net(), process_group=group, find_unused_parameters=True)
    opt = info.build((model if sharded else model.module).groups())
    traj = []
    for step in range(NONFINITE_STEPS):
        x, y, use_gate = batch(step)
        rows = rank_rows(rank)
        loss = ((model(x[rows], use_gate) - y[rows]) ** 2).mean()
        if step == NONFINITE_AT and rank == 1 and not sharded:
            loss = loss * float("nan")
        loss.backward()
        if step == NONFINITE_AT and rank == 1 and sharded:
            _poison_local_shard(model)
        opt.step(loss=loss.detach())
        opt.zero_grad(set_to_none=True)
        traj.append(params_of(model))
    return dict(traj=traj, skipped=opt.skipped_steps())


RUNNERS = {"fsdp": _run_fsdp, "ddp": _run_ddp, "manual": _run_manual, "resume": _run_resume, "checks": _run_checks,
           "ddp_opt_out": _run_ddp_opt_out,
           "fsdp_nonfinite": lambda *a: _run_nonfinite(*a, sharded=True),
           "ddp_nonfinite": lambda *a: _run_nonfinite(*a, sharded=False)}


def _worker(rank: int, world: int, init_file: str, out_dir: str, jobs: list[tuple[str, str]]) -> None:
    """One rank: run every (row, scenario) job in a process group of its own; save what it saw."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    out = Path(out_dir)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    store = dist.distributed_c10d._get_default_store()
    for i, (row, scenario) in enumerate(jobs):
        result: dict[str, Any]
        start = time.perf_counter()
        try:
            group = dist.new_group(backend="gloo", timeout=timeout)
            result = RUNNERS[scenario](ROWS.get(row) or FUSED_ROWS.get(row), group, rank, out)
            result["error"] = None  # the group is left alone: device meshes built on it are cached
        except BaseException:  # recorded for the test of this job (DCP raises BaseExceptions)
            result = dict(error=traceback.format_exc(limit=-8))
        result["seconds"] = time.perf_counter() - start
        torch.save(result, _result_file(out, row, scenario, rank))
        # Meet the other rank through the store, not a collective: one of them may have left a
        # collective of this job unmatched.
        store.set(f"job{i}/rank{rank}", "done")
        store.wait([f"job{i}/rank{r}" for r in range(world)], timedelta(seconds=3 * COLLECTIVE_TIMEOUT_S))


def launch(jobs: list[tuple[str, str]], out_dir: Path, timeout_s: float) -> str | None:
    """Run ``jobs`` on ``WORLD`` new processes; kill them after ``timeout_s``. None, or what went wrong."""
    import torch.multiprocessing as mp

    init_file = Path(tempfile.mkdtemp(dir=out_dir)) / "rendezvous"
    ctx = mp.start_processes(_worker, args=(WORLD, str(init_file), str(out_dir), jobs), nprocs=WORLD, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                return f"the processes were killed after {timeout_s:.0f} s"
    except Exception as e:  # a process died: the jobs it did not finish have no result file
        return f"a process failed: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return None


def _result_file(out_dir: Path, row: str, scenario: str, rank: int) -> Path:
    return out_dir / f"{row}--{scenario}--{rank}.pt"


def run_jobs(jobs: list[tuple[str, str]], out_dir: Path, timeout_s: float) -> None:
    """Run ``jobs``; when the processes die (a backend aborts on collectives left unmatched by
    another job), record the job they died in and go on with the rest in new processes."""
    deadline = time.monotonic() + timeout_s
    remaining = list(jobs)
    while remaining:
        problem = launch(remaining, out_dir, max(1.0, deadline - time.monotonic()))
        if problem is None:
            return
        unfinished = [(row, s) for row, s in remaining
                      if not all(_result_file(out_dir, row, s, r).exists() for r in range(WORLD))]
        if not unfinished:
            return
        row, scenario = unfinished[0]
        for r in range(WORLD):
            if not _result_file(out_dir, row, scenario, r).exists():
                torch.save(dict(error=f"the processes died in this job: {problem}"),
                           _result_file(out_dir, row, scenario, r))
        remaining = unfinished[1:] if time.monotonic() < deadline else []


# ----------------------------------------------------------------------------- running it once


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every row in every scenario (a first launch), then the restarts (a second launch)."""
    out = tmp_path_factory.mktemp("distributed")
    # The fork server imports these once; every launch forks it (fast, and safe: the server
    # itself never ran a parallel region).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "tuneless", "tests.test_distributed"])
    run_jobs([("-", "checks")] + [(row, s) for row in ROWS for s in SCENARIOS]
             + [(row, "ddp_opt_out") for row in LOSS_BASED]
             + [(row, s) for row in ROWS for s in NONFINITE_SCENARIOS], out, JOB_TIMEOUT_S)
    run_jobs([(row, "resume") for row in ROWS], out, JOB_TIMEOUT_S / 2)
    run_jobs([(row, s) for row in FUSED_ROWS for s in FUSED_SCENARIOS], out, JOB_TIMEOUT_S)  # compiles first
    loaded: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in ["-", *ROWS, *FUSED_ROWS]:
        for scenario in SCENARIOS + ("resume", "checks", "ddp_opt_out") + NONFINITE_SCENARIOS:
            for r in range(WORLD):
                f = _result_file(out, row, scenario, r)
                loaded[row, scenario, r] = (torch.load(f, weights_only=False) if f.exists()
                                            else dict(error="not run: the time for the distributed jobs ran out"))
    yield loaded
    shutil.rmtree(out, ignore_errors=True)


_REFERENCES: dict[str, list] = {}


def one_process(row: str) -> list[dict[str, torch.Tensor]]:
    if row not in _REFERENCES:
        _REFERENCES[row] = reference(ROWS[row])
    return _REFERENCES[row]


def job(results, row, scenario) -> list[dict[str, Any]]:
    """Both ranks' results of a job; fails the test with the ranks' errors if there are any."""
    res = [results[row, scenario, r] for r in range(WORLD)]
    errors = [f"rank {r}: {x['error']}" for r, x in enumerate(res) if x.get("error")]
    assert not errors, f"{row} under {scenario}:\n" + "\n".join(errors)
    return res


def full_trajectory(res: list[dict[str, Any]], sharded: bool) -> list[dict[str, torch.Tensor]]:
    """The full parameters after each step: FSDP2's dim-0 shards put back together in rank order."""
    if not sharded:
        return res[0]["traj"]
    return [{name: torch.cat([r["traj"][i][name] for r in res]) for name in res[0]["traj"][i]}
            for i in range(len(res[0]["traj"]))]


def assert_same_trajectory(actual, expected, what, rtol=RTOL, atol=ATOL):
    assert len(actual) == len(expected), f"{what}: {len(actual)} steps, expected {len(expected)}"
    for step, (a, e) in enumerate(zip(actual, expected)):
        for name in e:
            torch.testing.assert_close(a[name], e[name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what}: {name} after step {step + 1}: {m}")


ROW_PARAMS = [pytest.param(name, id=name) for name in ROWS]
# Elementwise methods: no statistic couples two coordinates. The names stand in for a row flag
# (``OptimizerInfo.elementwise``) until the table has one; ``global_step_size=False`` does not say
# it (L-DoG's per-tensor statistics need sums over shards too).
_ELEMENTWISE_NAMES = {"COCOB", "ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFree(torch.optim.SGD)"}
ELEMENTWISE = [pytest.param(info.name, id=info.name) for info in OPTIM_DB
               if getattr(info, "elementwise", info.name in _ELEMENTWISE_NAMES)]


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_fsdp2_trajectory_equals_one_process(results, row):
    res = job(results, row, "fsdp")
    assert_same_trajectory(full_trajectory(res, sharded=True), one_process(row), f"{row} under FSDP2")


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_ddp_trajectory_equals_one_process_on_every_rank(results, row):
    res = job(results, row, "ddp")
    for r in range(WORLD):
        assert_same_trajectory(res[r]["traj"], one_process(row), f"{row} under DDP, rank {r}")


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_rank_without_gradients_enters_the_collective_and_agrees(results, row):
    """Sharding by hand; rank 1 owns only ``gate`` and has no gradient at all every third step."""
    res = job(results, row, "manual")
    for r in range(WORLD):
        assert_same_trajectory(res[r]["traj"], one_process(row), f"{row} sharded by hand, rank {r}")


SLICED = [pytest.param(name, id=name) for name, info in ROWS.items() if info.kwargs.get("slice_p", 1) > 1]


@pytest.mark.parametrize("row", SLICED)
def test_sliced_estimate_buffers_stay_sliced_under_fsdp(results, row):
    """Prodigy's ``slice_p``: under FSDP2 each rank keeps about 1/slice_p of its shard in s and
    x0 (one zero-padded row per shard), not a full-size copy."""
    slice_p = ROWS[row].kwargs["slice_p"]
    for r, res in enumerate(job(results, row, "fsdp")):
        shard = res["traj"][-1]
        held = {key: sum(entry.get(key, 0) for entry in res["state_numel"].values()) for key in ("s", "x0")}
        total = sum(t.numel() for t in shard.values())
        for name, entry in res["state_numel"].items():
            full = one_process(row)[0][name]
            rows, inner = full.shape[0], full[0].numel() if full.dim() > 1 else 1
            width = -(-(-(-rows // WORLD) * inner) // slice_p)  # ceil(ceil(rows / WORLD) * inner / slice_p)
            for key in ("s", "x0"):
                assert entry[key] <= max(width, 1), f"rank {r}, {name}: {key} holds {entry[key]} > {width}"
        if r == 0:  # rank 0 holds the larger shards (rank 1's rows are few or none: padding dominates)
            for key, n in held.items():
                assert n * 2 < total, f"{row}, rank {r}: {key} holds {n} elements for a shard of {total}"


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_distributed_checkpoint_resume_is_identical_to_uninterrupted(results, row):
    saved = job(results, row, "fsdp")
    errors = [f"rank {r}: {x['save_error']}" for r, x in enumerate(saved) if x["save_error"]]
    assert not errors, f"{row}: saving the checkpoint failed:\n" + "\n".join(errors)
    uninterrupted = full_trajectory(saved, sharded=True)[SAVE_AT:]
    resumed = full_trajectory(job(results, row, "resume"), sharded=True)
    assert_same_trajectory(resumed, uninterrupted, f"{row} resumed from a checkpoint", rtol=0, atol=0)


# ----------------------------------------------------------------------------- what is communicated


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_collectives_per_step(results, row):
    """Under sharding: at most one all-reduce of statistics a step (one per optimizer, for a wrapper
    over a base that reduces its own), on every step and rank (the
    steps where ``gate`` or a whole rank has no gradient included), plus one of one number for
    the loss of a method that takes it, and one of one int32 number for the non-finite flag.
    Under DDP: only the loss (the gradients are already the same on every rank)."""
    info = ROWS[row]
    loss = [1] if info.requires_loss else []
    for scenario in ("fsdp", "manual", "ddp"):
        res = job(results, row, scenario)
        per_step = [r["collectives"] for r in res]
        assert per_step[0] == per_step[1], f"{row} under {scenario}: the ranks made different all-reduces"
        for step, calls in enumerate(per_step[0]):
            flags = calls.count("flag")
            assert flags == (0 if scenario == "ddp" else 1), f"{row} under {scenario}, step {step + 1}: {calls}"
            calls = [c for c in calls if c != "flag"]
            # the loss's all-reduce, after those of a wrapper that reads its statistics first
            at = info.statistics_before_loss if loss and scenario != "ddp" else 0
            assert calls[at:at + len(loss)] == loss, f"{row} under {scenario}, step {step + 1}: {calls}"
            statistics = calls[:at] + calls[at + len(loss):]
            if scenario == "ddp":
                assert statistics == [], f"{row} under DDP reduced statistics of replicated parameters: {calls}"
            else:
                assert len(statistics) <= info.statistics_collectives, f"{row} under {scenario}, step {step + 1}: {calls}"


def reference_skipping(info: OptimizerInfo) -> list[dict[str, torch.Tensor]]:
    """The one-process trajectory of the non-finite scenarios, with no step at NONFINITE_AT."""
    model = Net()
    opt = info.build(model.groups())
    traj = []
    for step in range(NONFINITE_STEPS):
        loss = backward(model, step, slice(None))
        if step != NONFINITE_AT:
            opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        traj.append(params_of(model))
    return traj


@pytest.mark.parametrize("scenario", NONFINITE_SCENARIOS)
@pytest.mark.parametrize("row", ROW_PARAMS)
def test_a_nan_on_one_rank_is_skipped_by_every_rank(results, row, scenario):
    """The decision is global: a NaN on rank 1 only (its gradient shard under FSDP2, its loss under
    DDP) makes both ranks skip the step, and the run equals the one-process run without that step."""
    res = job(results, row, scenario)
    assert [r["skipped"] for r in res] == [[1, 1], [1, 1]], f"{row} under {scenario}: skipped {[r['skipped'] for r in res]}"
    expected = reference_skipping(ROWS[row])
    got = full_trajectory(res, sharded=scenario.startswith("fsdp"))
    assert_same_trajectory(got, expected, f"{row} under {scenario}, NaN on rank 1 at step {NONFINITE_AT + 1}")


@pytest.mark.parametrize("row", list(FUSED_ROWS))
def test_the_compiled_default_sharded_or_replicated_equals_one_process(results, row):
    """``Tuneless(fused=True)`` under FSDP2 and DDP, with nothing but building it: the trajectory
    equals the one-process run of the unfused default (float64: the two paths differ by rounding
    only), and a NaN on rank 1 (its gradient shard under FSDP2, its loss under DDP) makes both
    ranks skip that step. A sum over shards left unreduced would be off by ~1e-2, a flag left
    unreduced would skip on one rank only."""
    unfused = row.removesuffix("-fused")
    res = job(results, row, "fsdp")
    assert_same_trajectory(full_trajectory(res, sharded=True), one_process(unfused), f"{row} under FSDP2")
    res = job(results, row, "ddp")
    for r in range(WORLD):
        assert_same_trajectory(res[r]["traj"], one_process(unfused), f"{row} under DDP, rank {r}")
    for scenario in ("fsdp_nonfinite", "ddp_nonfinite"):
        res = job(results, row, scenario)
        assert [r["skipped"] for r in res] == [[1, 1], [1, 1]], f"{row} under {scenario}: {[r['skipped'] for r in res]}"
        assert_same_trajectory(full_trajectory(res, sharded=scenario.startswith("fsdp")), reference_skipping(ROWS[unfused]),
                               f"{row} under {scenario}, NaN on rank 1 at step {NONFINITE_AT + 1}")


@pytest.mark.parametrize("row", [pytest.param(name, id=name) for name in LOSS_BASED])
def test_ddp_opt_out_uses_the_loss_as_given(results, row):
    """``set_loss_group(opt, None)`` under DDP: no collective. Each rank's own loss is kept, so the
    replicas differ (their losses do); the mean loss averaged by the caller gives the one-process run."""
    res = job(results, row, "ddp_opt_out")
    for r in res:
        for name in ("own", "caller_mean"):
            assert all(calls == [] for calls in r[name]["collectives"]), f"{row}, {name}: {r[name]['collectives']}"
    own = [r["own"]["traj"][-1] for r in res]
    gap = max(float((own[0][name] - own[1][name]).abs().max()) for name in own[0])
    # far above the tolerance the default's replicas meet (ATOL), though Mechanic's scale starts tiny
    assert gap > 100 * ATOL, f"{row}: with the loss used as given, the replicas took the same steps (gap {gap:.2e})"
    for r in range(WORLD):
        assert_same_trajectory(res[r]["caller_mean"]["traj"], one_process(row)[:OPT_OUT_STEPS],
                               f"{row} under DDP with the caller's mean loss, rank {r}")


@pytest.mark.parametrize("row", ELEMENTWISE)
def test_elementwise_methods_need_no_reduction(results, row):
    """COCOB-like rows (``global_step_size=False``): no all-reduce of statistics, and yet the same
    trajectory under FSDP2 as in one process (checked above). The one collective left under
    sharding is the non-finite flag's (one int32 number: a NaN in one rank's shard must stop
    every rank's step); none under DDP."""
    for scenario in SCENARIOS:
        flag = [] if scenario == "ddp" else ["flag"]
        for r in job(results, row, scenario):
            assert all(calls == flag for calls in r["collectives"]), f"{row} under {scenario}: {r['collectives']}"


def test_guards(results):
    for r in job(results, "-", "checks"):
        assert r["loss_groups"] == [True, True, True], r["loss_groups"]
        assert r["warnings"] == [], r["warnings"]
        assert r["mixed_error"] is not None and "are plain tensors while the others are DTensor shards" in r["mixed_error"]
        assert r["length_error"] is not None and "_UnevenStatistics: the ranks summed vectors of different lengths" \
            in r["length_error"]


# ----------------------------------------------------------------------------- in one process


def test_set_process_group_reaches_wrapped_optimizers():
    base = tuneless.DoG(Net().parameters())
    wrapper = tuneless.ScheduleFree(base)
    mechanic = tuneless.Mechanic(torch.optim.SGD(Net().parameters(), lr=1.0))
    shards, data = object(), object()
    td.set_process_group(wrapper, shards)
    td.set_process_group(mechanic, None, loss_group=data)
    assert td.reduction_group(wrapper) is shards and td.reduction_group(base) is shards
    assert td.loss_group(base) is shards  # default: the same group
    assert td.reduction_group(mechanic) is None and td.reduction_group(mechanic.base_optimizer) is None
    assert td.loss_group(mechanic.base_optimizer) is data
    td.set_loss_group(wrapper, None)  # the loss group alone: the statistics group stays as it was
    assert td.loss_group(base) is None and td.reduction_group(base) is shards
    polyak = tuneless.Polyak(Net().parameters())
    td.set_loss_group(polyak, data)
    assert td.loss_group(polyak) is data and td.reduction_group(polyak) is None


def test_plain_parameters_need_no_collective():
    opt = tuneless.DoG(Net().parameters())
    partial = torch.tensor([1.0, 2.0])
    assert td.reduction_group(opt) is None and td.loss_group(opt) is None
    assert td.global_sum(opt, partial) is partial
    loss = torch.tensor(3.0)
    assert td.average_loss(opt, loss) is loss


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_checkpoint_state_initialization_creates_the_real_layout_and_moves_nothing(row):
    """``get_optimizer_state_dict`` on a fresh optimizer (what a checkpoint is loaded into) must
    hold every key a trained optimizer holds, and must not move the parameters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    info = ROWS[row]
    trained_model = Net()
    trained = info.build(trained_model.groups())
    for step in range(3):
        trained.step(loss=backward(trained_model, step, slice(None)))
        trained.zero_grad(set_to_none=True)
    fresh_model = Net()
    before = params_of(fresh_model)
    fresh = info.build(fresh_model.groups())
    settings_before = [{k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
                       for g in fresh.param_groups]
    fresh_sd = get_optimizer_state_dict(fresh_model, fresh)
    trained_sd = get_optimizer_state_dict(trained_model, trained)
    for name, p in params_of(fresh_model).items():
        assert torch.equal(p, before[name]), f"{row}: the state initialization moved {name}"
    assert {k: sorted(v) for k, v in fresh_sd["state"].items()} == {k: sorted(v) for k, v in trained_sd["state"].items()}
    assert [sorted(g) for g in fresh_sd["param_groups"]] == [sorted(g) for g in trained_sd["param_groups"]]
    for group, settings in zip(fresh.param_groups, settings_before):
        assert {k: group[k] for k in settings} == settings, f"{row}: the state initialization changed a setting"


# ----------------------------------------------------------------------------- the example


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("ddp", [False, True], ids=["fsdp2", "ddp"])
def test_example_trains_under_torchrun(tmp_path, ddp):
    """``examples/train_distributed.py`` on 2 CPU processes (FSDP2 or DDP, gloo): trains, then saves
    a distributed checkpoint. Polyak: a method that needs the ranks' losses averaged; under DDP
    with nothing set up, the replicas stay identical."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "examples" / "train_distributed.py"),
           "--optimizer", "polyak", "--steps", "30", "--log-every", "29", "--checkpoint", str(tmp_path / "ckpt")]
    cmd += ["--ddp"] if ddp else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < 0.7 * losses[0], proc.stdout
    assert f"saved {tmp_path / 'ckpt'} at step 30" in proc.stdout
    assert (tmp_path / "ckpt" / ".metadata").exists()
    if ddp:
        drifts = [float(line.split("replica drift")[1]) for line in proc.stdout.splitlines() if line.startswith("step")]
        assert drifts == [0.0, 0.0], proc.stdout
