#!/usr/bin/env python
"""The summary table of a ``tuneless bench`` store: per method, its AlgoPerf score (the
normalised area under its performance profile, tau up to 4), the problems on which it reached
the oracle's target, its geometric-mean gap to the oracle, its within-1.1x and within-2x counts
and its diverged runs; methods ranked by the score.

It reads only what a slim copy of a store keeps (``default_ablation.py --export``: runs and
evaluation curves), so the stored ``benchmarks/results/bench-full.sqlite`` renders the same
table as the store it was copied from. ``tuneless report --db`` renders everything else.

Example::

    python benchmarks/bench_summary.py benchmarks/results/bench-full.sqlite
    python benchmarks/bench_summary.py benchmarks/results/bench-full.sqlite --view train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneless.bench import compute_results
from tuneless.bench.store import ResultStore


def summary(db: Path, view: str = "target") -> str:
    with ResultStore(db, create=False) as store:
        records = list(store.records(curves=True))
    results = compute_results(records, view=view)
    lines = ["| method | AlgoPerf score | reached target | gap (geo-mean) | within 1.1x | within 2x | diverged runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ranked = sorted(results.summaries, key=lambda s: -(s.algoperf_score or 0.0))
    for s in ranked:
        score = "—" if s.algoperf_score is None else f"{s.algoperf_score:.3f}"
        lines.append(f"| {s.method} | {score} | {s.reached}/{s.profile_problems} | {s.geo_gap:.2f}x | "
                     f"{s.within_1_1}/{s.problems} | {s.within_2}/{s.problems} | {s.diverged} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path, help="a results store (tuneless bench --db)")
    ap.add_argument("--view", choices=("target", "train"), default="target",
                    help="'target' (each problem's target metric, the headline) or 'train' (final training loss)")
    args = ap.parse_args(argv)
    if not args.db.is_file():
        ap.error(f"db: {str(args.db)!r} is not a file")
    print(summary(args.db, args.view))
    return 0


if __name__ == "__main__":
    sys.exit(main())
