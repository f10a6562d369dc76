"""The results store: one SQLite file, WAL mode, a versioned schema, one row per finished run.

Why SQLite: one file to copy, readable by anything, transactions that make a run's row appear
whole or not at all, and several processes can write to it at once (WAL mode lets readers and
one writer proceed together; writers wait for each other up to ``timeout`` seconds).

Guarantees:

* **Atomic runs.** A run is one ``INSERT`` in its own transaction, written when the run ends
  (curves included), with ``synchronous=FULL``: a process killed at any moment (``kill -9``)
  leaves every committed run intact and no half-written one.
* **Resumable sweeps.** Each run has a unique ``key`` (problem, spec, seed, steps, and the
  device and autocast dtype when they are not the CPU's defaults); a sweep
  skips the keys already stored. A second writer of the same key is ignored (the result is
  deterministic), except that ``replace=True`` overwrites a stored failure on a retry.
* **Versioned schema.** ``PRAGMA application_id`` marks the file as a tuneless store and
  ``PRAGMA user_version`` holds the schema version. A store written by a newer tuneless is
  refused with :class:`StoreVersionError`; an older one is migrated in place when opened
  (:data:`MIGRATIONS`: version 1 gains the hardware, target-metric and evaluation-curve columns,
  empty for its old runs, which then report with no evaluation curves).

Curves are stored as zlib-compressed little-endian float32 arrays (``loss``, ``step_size``),
float64 (``positions`` of 2-D analytic problems, for the banana plot), int64 (``eval_steps``),
and zlib-compressed JSON for the evaluation curves (metric name -> one value per evaluation step).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["ResultStore", "RunRecord", "StoreError", "StoreVersionError", "SCHEMA_VERSION", "APPLICATION_ID",
           "MIGRATIONS", "encode_array", "decode_array", "encode_curves", "decode_curves"]

#: version of the schema this tuneless writes and reads
SCHEMA_VERSION = 2
#: marks a SQLite file as a tuneless results store ("TnLs")
APPLICATION_ID = 0x546E4C73

STATUSES = ("ok", "diverged", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY,
    key             TEXT NOT NULL UNIQUE,     -- problem|spec|seed|steps: what makes a run
    problem         TEXT NOT NULL,            -- problem spec string
    kind            TEXT NOT NULL,            -- "analytic" or "learning"
    spec            TEXT NOT NULL,            -- run spec string (optimizer[@scheduler])
    role            TEXT NOT NULL,            -- "method" or "oracle"
    base            TEXT,                     -- oracle runs: "adam" or "sgd"
    lr              REAL,                     -- oracle runs: the grid point
    seed            INTEGER NOT NULL,
    steps           INTEGER NOT NULL,         -- the budget
    status          TEXT NOT NULL CHECK (status IN ('ok', 'diverged', 'failed')),
    final_loss      REAL,                     -- training loss at the evaluation point
    initial_loss    REAL,                     -- training loss of the first step
    min_value       REAL,                     -- the problem's known minimum, or NULL
    final_json      TEXT NOT NULL,            -- every final metric (held-out loss, accuracy, ...)
    error           TEXT,                     -- the exception of a failed run
    steps_done      INTEGER NOT NULL,
    train_seconds   REAL NOT NULL,            -- the training loop
    wall_seconds    REAL NOT NULL,            -- the whole run (building the problem, evaluating)
    loss_curve      BLOB,                     -- float32 per step, zlib
    step_size_curve BLOB,                     -- float32 per step, zlib
    positions       BLOB,                     -- float64 (steps_done + 1, 2), zlib; 2-D analytic only
    positions_dim   INTEGER,
    versions_json   TEXT NOT NULL,            -- tuneless, torch, python versions that produced it
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_problem ON runs (problem, steps, role);
"""

#: version -> the statements that upgrade a store of that version to the next one
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE runs ADD COLUMN device TEXT NOT NULL DEFAULT 'cpu'",  # the run's torch device
        "ALTER TABLE runs ADD COLUMN autocast TEXT",           # the forward pass's autocast dtype, NULL: none
        "ALTER TABLE runs ADD COLUMN target_metric TEXT",      # the metric that scores the problem (NULL: v1 run)
        "ALTER TABLE runs ADD COLUMN target_higher INTEGER",   # 1 when a larger target metric is better
        "ALTER TABLE runs ADD COLUMN eval_steps BLOB",         # int64 per evaluation, zlib (0 = the start)
        "ALTER TABLE runs ADD COLUMN eval_curves BLOB",        # zlib JSON: metric -> one value per evaluation
    ),
}


class StoreError(RuntimeError):
    """The file is not a usable tuneless results store."""


class StoreVersionError(StoreError):
    """The store was written by a newer tuneless (a schema this version cannot read)."""


def encode_array(values: np.ndarray | None, dtype: str = "<f4") -> bytes | None:
    if values is None:
        return None
    with np.errstate(over="ignore"):  # a diverged curve's huge values become inf in float32, as they should
        data = np.ascontiguousarray(values, dtype=dtype)
    return zlib.compress(data.tobytes(), 6)


def decode_array(blob: bytes | None, dtype: str = "<f4") -> np.ndarray:
    if blob is None:
        return np.zeros(0)
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).astype(np.float64)


def encode_curves(curves: dict[str, np.ndarray]) -> bytes | None:
    """Evaluation curves (metric -> values) as zlib-compressed JSON (non-finite values as strings)."""
    if not curves:
        return None
    data = {k: [float(v) for v in np.asarray(vals, dtype=np.float64)] for k, vals in curves.items()}
    return zlib.compress(json.dumps(_clean(data)).encode("utf-8"), 6)


def decode_curves(blob: bytes | None) -> dict[str, np.ndarray]:
    if blob is None:
        return {}
    data = json.loads(zlib.decompress(blob).decode("utf-8"))
    return {k: np.array([float(v) for v in vals], dtype=np.float64) for k, vals in data.items()}


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _unclean(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    return value


@dataclass
class RunRecord:
    """One finished run, as written to and read from the store."""

    key: str
    problem: str
    kind: str
    spec: str
    role: str
    seed: int
    steps: int
    status: str
    final: dict[str, float]
    steps_done: int
    train_seconds: float
    wall_seconds: float
    base: str | None = None
    lr: float | None = None
    initial_loss: float | None = None
    min_value: float | None = None
    error: str | None = None
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_size: np.ndarray = field(default_factory=lambda: np.zeros(0))
    positions: np.ndarray | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    id: int | None = None
    #: the torch device the run used, and the dtype of its forward pass under autocast (None: none)
    device: str = "cpu"
    autocast: str | None = None
    #: the metric of ``final`` that scores the problem, and whether larger is better (None: a v1 run)
    target_metric: str | None = None
    target_higher: bool | None = None
    #: the steps after which the run was evaluated (0 = the start), and each metric there
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eval_curves: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def hardware(self) -> str:
        """``cpu``, ``cuda``, ``cuda bfloat16``...: runs of different hardware are never compared."""
        return self.device + ("" if self.autocast is None else f" {self.autocast}")

    @property
    def final_loss(self) -> float:
        value = self.final.get("loss", float("nan"))
        return float(value) if value is not None else float("nan")

    def scalars(self) -> dict[str, Any]:
        """The flat, curve-free view used by CSV/JSON export."""
        out = {"id": self.id, "key": self.key, "problem": self.problem, "kind": self.kind, "spec": self.spec,
               "role": self.role, "base": self.base, "lr": self.lr, "seed": self.seed, "steps": self.steps,
               "status": self.status, "final_loss": self.final_loss, "initial_loss": self.initial_loss,
               "min_value": self.min_value, "error": self.error, "steps_done": self.steps_done,
               "train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds,
               "created_at": self.created_at, "device": self.device, "autocast": self.autocast,
               "target_metric": self.target_metric}
        for k, v in self.final.items():
            if k != "loss":
                out[f"final_{k}"] = v
        for k, v in self.versions.items():
            out[f"version_{k}"] = v
        return out


_COLUMNS = ("key", "problem", "kind", "spec", "role", "base", "lr", "seed", "steps", "status", "final_loss",
            "initial_loss", "min_value", "final_json", "error", "steps_done", "train_seconds", "wall_seconds",
            "loss_curve", "step_size_curve", "positions", "positions_dim", "versions_json", "created_at",
            "device", "autocast", "target_metric", "target_higher", "eval_steps", "eval_curves")
#: the columns that hold curves (skipped by ``records(curves=False)``)
_CURVE_COLUMNS = ("loss_curve", "step_size_curve", "positions", "eval_steps", "eval_curves")


class ResultStore:
    """A tuneless results store at ``path`` (created if missing). One connection per process."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 120.0, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise StoreError(f"no results store at {str(self.path)!r}; run `tuneless bench --db {self.path}` first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = %d" % int(timeout * 1000))
            self._prepare()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            self.close()
            raise StoreError(f"{str(self.path)!r} is not a tuneless results store: {exc}") from exc

    # ------------------------------------------------------------------ schema

    def _prepare(self) -> None:
        c = self._conn
        app_id, version = self._ids()
        if version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"the results store {str(self.path)!r} has schema version {version}, written by a newer tuneless; "
                f"this tuneless reads schema versions up to {SCHEMA_VERSION}. Upgrade tuneless "
                f"(pip install -U tuneless) or use another --db.")
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{str(self.path)!r} is a SQLite file of another application (application_id {app_id:#x}); "
                             "use another --db.")
        if version == SCHEMA_VERSION and app_id == APPLICATION_ID:
            c.execute("PRAGMA synchronous = FULL")
            return
        if app_id == 0 and version == 0:
            tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables:
                raise StoreError(f"{str(self.path)!r} is a SQLite file with tables {tables} but not a tuneless results "
                                 "store; use another --db.")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":  # pragma: no cover - e.g. a network file system
            raise StoreError(f"cannot put {str(self.path)!r} in WAL mode (got {mode!r}); use a local file")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("BEGIN IMMEDIATE")
        try:
            app_id, version = self._ids()  # another process may have created it meanwhile
            if version < SCHEMA_VERSION:
                if version == 0:  # a new store: version 1's tables, then every migration
                    for statement in _SCHEMA.split(";\n"):
                        if statement.strip():
                            c.execute(statement)
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (_now(),))
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (_versions()["tuneless"],))
                    version = 1
                self._migrate(version)
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _ids(self) -> tuple[int, int]:
        app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        return int(app_id), int(version)

    def _migrate(self, version: int) -> None:
        """Upgrade schema ``version`` to :data:`SCHEMA_VERSION` in place (inside the caller's transaction)."""
        for v in range(version, SCHEMA_VERSION):
            if v not in MIGRATIONS:  # pragma: no cover - every version has one
                raise StoreError(f"no migration from schema version {v}")
            for statement in MIGRATIONS[v]:
                self._conn.execute(statement)
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"migrated_from_{v}", _now()))

    @property
    def schema_version(self) -> int:
        return self._ids()[1]

    # ------------------------------------------------------------------ writing

    def write(self, record: RunRecord, *, replace: bool = False) -> bool:
        """Write one finished run atomically; True if written (False: the key was already there).

        ``replace`` overwrites an existing row only if it is a failed run (a retry).
        """
        if record.status not in STATUSES:
            raise ValueError(f"status = {record.status!r} is invalid; allowed: one of {STATUSES}")
        row = (
            record.key, record.problem, record.kind, record.spec, record.role, record.base, record.lr, record.seed,
            record.steps, record.status, _real(record.final_loss), _real(record.initial_loss), record.min_value,
            json.dumps(_clean(record.final)), record.error, record.steps_done, record.train_seconds,
            record.wall_seconds, encode_array(record.loss), encode_array(record.step_size),
            encode_array(record.positions, "<f8") if record.positions is not None else None,
            None if record.positions is None else int(record.positions.shape[-1]),
            json.dumps(record.versions or _versions()), record.created_at or _now(),
            record.device, record.autocast, record.target_metric,
            None if record.target_higher is None else int(bool(record.target_higher)),
            encode_array(record.eval_steps, "<i8") if len(record.eval_steps) else None,
            encode_curves(record.eval_curves),
        )
        placeholders = ",".join("?" * len(_COLUMNS))
        c = self._conn
        for attempt in range(20):
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    if replace:
                        c.execute("DELETE FROM runs WHERE key = ? AND status = 'failed'", (record.key,))
                    cur = c.execute(f"INSERT OR IGNORE INTO runs ({','.join(_COLUMNS)}) VALUES ({placeholders})", row)
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
                return cur.rowcount == 1
            except sqlite3.OperationalError as exc:  # busy beyond the timeout: wait and retry
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise StoreError(f"could not write to {str(self.path)!r}: the store stayed locked")

    # ------------------------------------------------------------------ reading

    def keys(self, statuses: Iterable[str] = STATUSES) -> set[str]:
        marks = ",".join("?" * len(tuple(statuses)))
        return {r[0] for r in self._conn.execute(f"SELECT key FROM runs WHERE status IN ({marks})", tuple(statuses))}

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def records(self, *, curves: bool = True, problem: str | None = None, role: str | None = None,
                keys: Iterable[str] | None = None) -> list[RunRecord]:
        """Stored runs in insertion order; ``curves=False`` skips the arrays (fast)."""
        cols = "id, " + ", ".join(c for c in _COLUMNS if curves or c not in _CURVE_COLUMNS)
        where, args = [], []
        if problem is not None:
            where.append("problem = ?")
            args.append(problem)
        if role is not None:
            where.append("role = ?")
            args.append(role)
        sql = f"SELECT {cols} FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        cur = self._conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        wanted = None if keys is None else set(keys)
        out = []
        for row in cur:
            r = dict(zip(names, row))
            if wanted is not None and r["key"] not in wanted:
                continue
            out.append(_to_record(r))
        return out

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    # ------------------------------------------------------------------ export

    def export_csv(self, path: str | os.PathLike) -> int:
        """Every run as one CSV row (scalars and final metrics, no curves); returns the row count."""
        rows = [r.scalars() for r in self.records(curves=False)]
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields or ["key"])
            writer.writeheader()
            for r in rows:
                writer.writerow(r)
        return len(rows)

    def export_json(self, path: str | os.PathLike, *, curves: bool = False) -> int:
        """Every run as a JSON object (curves as lists when ``curves``); returns the run count."""
        out = []
        for rec in self.records(curves=curves):
            item = rec.scalars()
            if curves:
                item["loss_curve"] = rec.loss.tolist()
                item["step_size_curve"] = rec.step_size.tolist()
                item["positions"] = None if rec.positions is None else rec.positions.tolist()
                item["eval_steps"] = [int(s) for s in rec.eval_steps]
                item["eval_curves"] = {k: v.tolist() for k, v in rec.eval_curves.items()}
            out.append(_clean(item))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            json.dump({"schema_version": SCHEMA_VERSION, "store": str(self.path), "meta": self.meta(), "runs": out},
                      fh, indent=1)
        return len(out)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _real(value: float | None) -> float | None:
    """SQLite turns NaN into NULL; keep infinities, make NaN explicit NULL."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _to_record(r: dict[str, Any]) -> RunRecord:
    final = _unclean(json.loads(r["final_json"]))
    positions = None
    if r.get("positions") is not None:
        positions = decode_array(r["positions"], "<f8").reshape(-1, int(r["positions_dim"]))
    return RunRecord(
        id=r["id"], key=r["key"], problem=r["problem"], kind=r["kind"], spec=r["spec"], role=r["role"],
        base=r["base"], lr=r["lr"], seed=r["seed"], steps=r["steps"], status=r["status"], final=final,
        initial_loss=r["initial_loss"], min_value=r["min_value"], error=r["error"], steps_done=r["steps_done"],
        train_seconds=r["train_seconds"], wall_seconds=r["wall_seconds"],
        loss=decode_array(r.get("loss_curve")), step_size=decode_array(r.get("step_size_curve")),
        positions=positions, versions=json.loads(r["versions_json"]), created_at=r["created_at"],
        device=r["device"], autocast=r["autocast"], target_metric=r["target_metric"],
        target_higher=None if r["target_higher"] is None else bool(r["target_higher"]),
        eval_steps=(np.frombuffer(zlib.decompress(r["eval_steps"]), dtype="<i8").astype(np.int64)
                    if r.get("eval_steps") is not None else np.zeros(0, dtype=np.int64)),
        eval_curves=decode_curves(r.get("eval_curves")),
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict[str, str]:
    import platform

    import torch

    from .. import __version__

    return {"tuneless": __version__, "torch": torch.__version__, "python": platform.python_version()}
