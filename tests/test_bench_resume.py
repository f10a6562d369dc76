"""A sweep killed with SIGKILL mid-way resumes, skipping what finished and losing none of it."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest
import torch

from tests.bench_util import cli, snapshot
from tuneless.bench import InlineExecutor, ResultStore, build_suite, run_sweep

ARGS = ["--problems", "logreg_wine", "--optimizers", "polyak", "sps", "--steps", "100", "--seeds", "0"]


@pytest.mark.timeout(420)
def test_kill_9_mid_sweep_then_resume_loses_nothing(tmp_path):
    db = tmp_path / "resume.sqlite"
    proc = cli("bench", *ARGS, "--db", str(db), "--workers", "2", "--quiet", "--no-report")
    try:
        deadline = time.monotonic() + 300
        finished = 0
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
            if db.exists():
                try:
                    conn = sqlite3.connect(db, timeout=5)
                    finished = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
                    conn.close()
                except sqlite3.OperationalError:  # the schema is being created
                    finished = 0
            if finished >= 3:
                break
            time.sleep(0.2)
        assert finished >= 3, "the sweep wrote nothing in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool workers, mid-run
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    before = snapshot(db)
    assert len(before) >= 3

    suite = build_suite("quick", problems=["logreg_wine"], optimizers=["polyak", "sps"], steps=100, seeds=[0])
    torch_threads = torch.get_num_threads()
    with ResultStore(db) as store:
        stats = run_sweep(suite, store, InlineExecutor())
    assert torch.get_num_threads() == torch_threads
    after = snapshot(db)
    assert len(before) < stats.planned, "the kill must have landed mid-sweep"
    assert stats.skipped == len(before) and stats.executed == stats.planned - len(before)
    for key, row in before.items():
        assert after[key] == row, f"run {key} changed or vanished on resume"
    assert len(after) == stats.planned

    # everything is done now: another resume runs nothing
    with ResultStore(db) as store:
        again = run_sweep(suite, store, InlineExecutor())
    assert again.executed == 0 and again.skipped == stats.planned
