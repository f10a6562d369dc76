"""Helpers shared by the benchmark tests: tiny suites that run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tuneless.bench import ResultStore, Suite
from tuneless.bench.oracle import GridConfig, OracleBase

ROOT = Path(__file__).resolve().parents[1]

#: narrow oracle grids (3 points each) so that a tiny sweep stays tiny
TINY_BASES = (
    OracleBase("adam", "adam:lr={lr}@cosine", -2.0, -1.0),
    OracleBase("sgd", "sgd:lr={lr},momentum=0.9@cosine", -2.0, -1.0),
)


def tiny_suite(problems=(("logreg_wine", 40), ("rosenbrock", 60)), methods=("polyak", "sps"), seeds=(0,),
               bases=TINY_BASES, grid=None) -> Suite:
    return Suite("test", [(p, n) for p, n in problems], list(seeds), list(methods),
                 grid or GridConfig(points_per_decade=2), bases)


def snapshot(db: str | Path) -> dict[str, tuple]:
    """key -> every stored column that a resumed sweep must leave untouched."""
    with ResultStore(db, create=False) as store:
        return {r.key: (r.id, r.created_at, r.status, repr(r.final), r.loss.tobytes(), r.step_size.tobytes())
                for r in store.records()}


def load_step_speed():
    """``benchmarks/step_speed.py`` as a module (not a package module: loaded from its path once)."""
    import importlib.util

    if "step_speed" in sys.modules:
        return sys.modules["step_speed"]
    spec = importlib.util.spec_from_file_location("step_speed", ROOT / "benchmarks" / "step_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_speed"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def cli(*args: str, **kwargs) -> subprocess.Popen:
    """Start ``python -m tuneless.cli_bench ARGS`` in its own process group."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tuneless.cli_bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
