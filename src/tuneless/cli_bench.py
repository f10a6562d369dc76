"""The benchmark's commands: ``tuneless bench`` and ``tuneless report``.

:func:`add_bench_commands` adds both to the ``tuneless`` command's subparsers (see
:mod:`tuneless.cli`); ``python -m tuneless.cli_bench`` runs them on their own. This module only
parses arguments, calls the library and prints: tables to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["add_bench_commands", "cmd_bench", "cmd_report", "main"]


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _fail(command: str, exc: BaseException) -> int:
    print(f"tuneless {command}: error: {exc}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a suite into the store, then print the table and write the HTML report."""
    from .bench import BenchInputError, Progress, StoreError, build_suite, run_bench
    from .errors import InvalidArgumentError, SpecError, UnknownArgumentError, UnknownNameError

    try:
        if args.workers < 1:
            raise BenchInputError(f"--workers = {args.workers} is invalid; allowed: an integer >= 1")
        if args.address is not None and args.backend != "ray":
            raise BenchInputError("--address is only for --backend ray")
        suite = build_suite(args.preset, problems=args.problems, optimizers=args.optimizers, seeds=args.seeds,
                            steps=args.steps, device=args.device,
                            autocast=None if args.dtype == "float32" else args.dtype, eval_points=args.eval_points)
        db = Path(args.db or f"out/bench-{suite.name}.sqlite")
        print(f"tuneless bench {suite.name}: {len(suite.problems)} problems x {len(suite.methods)} methods x "
              f"{len(suite.seeds)} seeds, plus the oracle's grids; store {db}; "
              f"{args.workers} worker(s) on {args.backend}; device {suite.device}"
              + (f", forward pass autocast to {suite.autocast}" if suite.autocast else ""), file=sys.stderr)
        stats = run_bench(suite, str(db), backend=args.backend, workers=args.workers, address=args.address,
                          progress=None if args.quiet else Progress(), retry_failed=args.retry_failed)
    except (StoreError, BenchInputError, UnknownNameError, UnknownArgumentError, SpecError, InvalidArgumentError,
            ImportError, ConnectionError) as exc:  # ConnectionError: a Ray address that does not answer
        return _fail("bench", exc)
    print(f"{stats.executed} runs made, {stats.skipped} reused from the store, {stats.failed} failed, "
          f"{stats.diverged} diverged, {stats.widened} grid widenings, in {stats.seconds:.0f}s", file=sys.stderr)
    for crash in stats.crashes:
        print(f"worker crash: {crash}", file=sys.stderr)
    return _report(db, None if args.no_report else Path(args.out or db.with_suffix(".html")),
                   budgets=suite.problems, methods=suite.methods, hardware=suite.hardware, command="bench")


def cmd_report(args: argparse.Namespace) -> int:
    """Print the table of a store, write its HTML report, export CSV/JSON."""
    from .bench import ResultStore, StoreError

    db = Path(args.db)
    try:
        if not db.exists():
            raise StoreError(f"no results store at {str(db)!r}; run `tuneless bench --db {db}` first")
        with ResultStore(db, create=False) as store:
            if args.csv:
                n = store.export_csv(args.csv)
                print(f"{n} runs exported to {Path(args.csv).resolve()}", file=sys.stderr)
            if args.json:
                n = store.export_json(args.json, curves=args.curves)
                print(f"{n} runs exported to {Path(args.json).resolve()}", file=sys.stderr)
    except (StoreError, OSError) as exc:
        return _fail("report", exc)
    return _report(db, None if args.no_html else Path(args.out or db.with_suffix(".html")),
                   problems=args.problems, command="report")


def _report(db: Path, html_path: Path | None, *, problems: Sequence[str] | None = None,
            budgets: Sequence[tuple[str, int]] | None = None, methods: Sequence[str] | None = None,
            hardware: str | None = None, command: str) -> int:
    from .bench import StoreError, compute_results
    from .bench.store import ResultStore
    from .report.bench_report import markdown_report, write_html

    try:
        with ResultStore(db, create=False) as store:
            records = store.records(curves=True)
    except StoreError as exc:
        return _fail(command, exc)
    if problems is not None:
        wanted = set(problems)
        records = [r for r in records if r.problem in wanted or r.problem.split(":")[0] in wanted]
    if budgets is not None:
        pairs = set(budgets)
        records = [r for r in records if (r.problem, r.steps) in pairs]
    if methods is not None:
        keep = set(methods)
        records = [r for r in records if r.role == "oracle" or r.spec in keep]
    if hardware is not None:
        records = [r for r in records if r.hardware == hardware]
    results = compute_results(records, methods=methods, view="target")
    train = compute_results(records, methods=methods, view="train")
    print(markdown_report(results, train=train))
    if html_path is not None:
        out = write_html(results, html_path, store_path=db, records=records, train=train)
        print(f"\nreport written to {out.resolve()}")
    print(f"results store: {db.resolve()}")
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and ``report`` to the ``tuneless`` command (each sets ``func``)."""
    from .bench.suite import PRESETS
    from .run import AUTOCAST_DTYPES, EVAL_POINTS

    bench = subparsers.add_parser(
        "bench", help="benchmark learning-rate-free methods against an oracle-tuned baseline",
        description="Run every learning-rate-free optimizer and an oracle (Adam and SGD with momentum, cosine to 0, "
                    "over a widened learning-rate grid) on a suite of problems; store every run in SQLite "
                    "(resumable), print the table and write an HTML report.",
    )
    bench.add_argument("preset", nargs="?", default="quick", choices=list(PRESETS),
                       help="suite preset: quick (minutes on 2 cores), full (every problem), or medium (heavier "
                            "workloads sized for a GPU or a larger machine) (default: quick)")
    bench.add_argument("--problems", nargs="+", default=None, metavar="PROBLEM",
                       help="problem specs to run instead of the preset's (see `tuneless list problems`)")
    bench.add_argument("--optimizers", nargs="+", default=None, metavar="SPEC",
                       help="method specs such as 'prodigy' 'dog:reps_rel=1e-4' 'adam:lr=1e-3@cosine' "
                            "(default: every learning-rate-free optimizer, and Adam at its default lr)")
    bench.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                       help="seeds (default: quick 0; full 0 1 2)")
    bench.add_argument("--steps", type=int, default=None, help="one step budget for every problem (default: the preset's)")
    bench.add_argument("--db", default=None, help="results store (default: out/bench-PRESET.sqlite)")
    bench.add_argument("--workers", type=int, default=_default_workers(),
                       help="parallel runs (default: the CPUs available; 1 runs in this process)")
    bench.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local process pool, or Ray (pip install 'tuneless[ray]')")
    bench.add_argument("--address", default=None,
                       help="Ray cluster address ('auto', 'host:port', 'ray://host:10001'); default: a local Ray")
    bench.add_argument("--device", default="cpu",
                       help="torch device of every run: cpu (the default, the tested path) or cuda, cuda:1... "
                            "(CUDA is untested)")
    bench.add_argument("--dtype", default="float32", choices=["float32", *AUTOCAST_DTYPES],
                       help="float32 (the default): no autocast; bfloat16 or float16: the forward pass runs under "
                            "torch.autocast in that dtype, parameters stay float32 (on CUDA: untested)")
    bench.add_argument("--eval-points", type=int, default=EVAL_POINTS,
                       help=f"evaluations per run besides the start, evenly spaced (default: {EVAL_POINTS}; the "
                            "time to target is read from them)")
    bench.add_argument("--out", default=None, help="HTML report path (default: the store's path with .html)")
    bench.add_argument("--no-report", action="store_true", help="print the table only, write no HTML")
    bench.add_argument("--retry-failed", action="store_true", help="run again the runs stored as failed")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)

    report = subparsers.add_parser(
        "report", help="tables and HTML report of a benchmark store; CSV/JSON export",
        description="Print the markdown tables of a results store (the headline on each problem's target metric, "
                    "then the training loss) and write a self-contained HTML report (performance profile, gap "
                    "heat-map, loss, step-size and evaluation curves, banana trajectories, oracle grids).",
    )
    report.add_argument("--db", default="out/bench-quick.sqlite", help="results store (default: out/bench-quick.sqlite)")
    report.add_argument("--out", default=None, help="HTML report path (default: the store's path with .html)")
    report.add_argument("--no-html", action="store_true", help="print the table only")
    report.add_argument("--problems", nargs="+", default=None, metavar="PROBLEM", help="only these problems")
    report.add_argument("--csv", default=None, metavar="PATH", help="export every run's numbers as CSV")
    report.add_argument("--json", default=None, metavar="PATH", help="export every run as JSON")
    report.add_argument("--curves", action="store_true", help="include the curves in the JSON export")
    report.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneless", description="tuneless benchmark commands")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError) as exc:  # user errors not caught by the commands
        return _fail(args.command, exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
