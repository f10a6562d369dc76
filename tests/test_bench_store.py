"""The SQLite results store: atomic rows, versioned schema, concurrent writers, export."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import sqlite3

import numpy as np
import pytest

from tuneless.bench.store import APPLICATION_ID, SCHEMA_VERSION, ResultStore, RunRecord, StoreError, StoreVersionError


def record(key: str = "k", status: str = "ok", **kw) -> RunRecord:
    base = dict(key=key, problem="rosenbrock", kind="analytic", spec="polyak", role="method", seed=0, steps=3,
                status=status, final={"loss": 0.5, "error": 0.5}, steps_done=3, train_seconds=0.1,
                wall_seconds=0.2, initial_loss=24.2, min_value=0.0, loss=np.array([24.2, 3.0, 0.5]),
                step_size=np.array([1e-3, 2e-3, 3e-3]), positions=np.array([[-1.2, 1.0], [0.0, 0.5], [1.0, 1.0],
                                                                             [1.0, 1.0]]))
    base.update(kw)
    return RunRecord(**base)


def test_round_trip_with_curves_and_non_finite_values(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.write(record())
        assert store.write(record("d", "diverged", final={"loss": math.inf, "error": math.nan},
                                  loss=np.array([1.0, math.inf])))
        a, d = store.records()
    assert a.final == {"loss": 0.5, "error": 0.5}
    np.testing.assert_allclose(a.loss, [24.2, 3.0, 0.5], rtol=1e-7)
    np.testing.assert_array_equal(a.positions, [[-1.2, 1.0], [0.0, 0.5], [1.0, 1.0], [1.0, 1.0]])
    assert d.status == "diverged" and d.final["loss"] == math.inf and math.isnan(d.final["error"])
    assert d.loss[1] == math.inf and d.positions is not None


def test_wal_mode_and_schema_marks(tmp_path):
    path = tmp_path / "s.sqlite"
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()


def test_newer_schema_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "new.sqlite"
    with ResultStore(path) as store:
        store.write(record())
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreVersionError, match=rf"schema version {SCHEMA_VERSION + 1}, written by a newer tuneless; "
                                                rf"this tuneless reads schema versions up to {SCHEMA_VERSION}"):
        ResultStore(path)


def test_foreign_sqlite_and_garbage_files_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a tuneless results store"):
        ResultStore(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a tuneless results store"):
        ResultStore(junk)
    with pytest.raises(StoreError, match="no results store"):
        ResultStore(tmp_path / "missing.sqlite", create=False)


def test_a_key_is_written_once_and_only_failures_are_replaced(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.write(record("a", final={"loss": 1.0}))
        assert not store.write(record("a", final={"loss": 2.0}))
        assert not store.write(record("a", final={"loss": 3.0}), replace=True)  # an ok run is never replaced
        assert store.write(record("f", "failed", final={}, error="RuntimeError: boom"))
        assert store.write(record("f", final={"loss": 4.0}), replace=True)
        by_key = {r.key: r for r in store.records(curves=False)}
    assert by_key["a"].final["loss"] == 1.0
    assert by_key["f"].status == "ok" and by_key["f"].final["loss"] == 4.0


def test_invalid_status_is_refused(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store, pytest.raises(ValueError, match="status"):
        store.write(record(status="finished"))


def _writer(path: str, worker: int, n: int) -> None:
    with ResultStore(path) as store:
        for i in range(n):
            store.write(record(f"shared-{i}", final={"loss": float(i)}))  # every worker writes these
            store.write(record(f"own-{worker}-{i}", final={"loss": float(i)}))


def test_concurrent_writers_from_several_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ResultStore(path).close()
    # fork: the writers only touch SQLite, and starting them must not cost a fresh interpreter each
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    with ResultStore(path) as store:
        keys = [r.key for r in store.records(curves=False)]
        ok = store._conn.execute("PRAGMA integrity_check").fetchone()[0]
    assert ok == "ok"
    assert len(keys) == len(set(keys)) == 25 + 4 * 25


def test_export_csv_and_json(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        store.write(record("a", final={"loss": 0.5, "test_accuracy": 0.9}))
        store.write(record("b", "diverged", final={"loss": math.inf}))
        assert store.export_csv(tmp_path / "out.csv") == 2
        assert store.export_json(tmp_path / "out.json", curves=True) == 2
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [r["key"] for r in rows] == ["a", "b"]
    assert rows[0]["final_test_accuracy"] == "0.9" and rows[1]["status"] == "diverged"
    data = json.load(open(tmp_path / "out.json"))  # strict JSON: no NaN/Infinity tokens
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["runs"][1]["final_loss"] == "inf"
    assert len(data["runs"][0]["loss_curve"]) == 3
