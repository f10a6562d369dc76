"""Rastrigin from eight starting points: which runs reach the global minimum, the oracle's included.

The benchmark's ``rastrigin`` (2-D, 2000 steps) starts at (2.2, 2.2), next to the local minimum
at (2, 2) whose value is 7.96. Every learning-rate-free method with a distance cap, the default
included, stops there; the benchmark's oracle (the best of Adam and SGD-momentum over a grid of
cosine-annealed learning rates) reaches 1.3e-12 through one grid point. This script asks whether
either result belongs to the problem or to its starting point: it runs the oracle's whole grid,
widened as the benchmark widens it (``tuneless.bench.oracle``), and a few methods from the
standard start and seven others near it, and counts, for each, the starts from which the run
ends in the global minimum's basin (final loss below 1e-6; the local minima are at 0.99 and above).

    python benchmarks/rastrigin_starts.py            # about 3 minutes on one core
    python benchmarks/rastrigin_starts.py --out benchmarks/results/rastrigin_starts.md

The methods: the default; MoMo (the loss-based method with a fixed cap, lr = 1); Prodigy; and
two variants of the ablation without the distance cap (the Polyak step aimed at the bound, and
at the target level), the ones that solve the standard start.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

STARTS: tuple[tuple[float, float], ...] = ((2.2, 2.2), (2.1, 2.1), (2.3, 2.3), (2.2, 2.0), (2.15, 2.25), (1.8, 1.8),
                                           (2.4, 2.1), (3.2, 3.2))
_SF = "tuneless.optim.default.TunelessScheduleFreeVariant:r=8.0,"
METHODS: dict[str, str] = {
    "tuneless (default)": "tuneless",
    "momo": "momo",
    "prodigy": "prodigy",
    "no cap, fixed level": _SF + "step_rule='polyak'",
    "no cap, target level": _SF + "step_rule='polyak',bound='target_level'",
}
#: the global minimum's basin: below every local minimum's value (the lowest is 0.995)
SOLVED = 1e-6


def final_loss(spec: str, start: tuple[float, float]) -> float:
    from tuneless.bench.suite import problem_dtype
    from tuneless.problems import get_problem
    from tuneless.run import run

    problem = get_problem("rastrigin")
    trace = run(problem, spec, seed=0, start=list(start), dtype=problem_dtype(problem))  # as the benchmark runs it
    loss = trace.final.get("loss", math.inf)
    return loss if not trace.diverged and trace.error is None and math.isfinite(loss) else math.inf


def oracle(start: tuple[float, float]) -> tuple[float, str, int]:
    """The benchmark's oracle from ``start``: (best final loss, its spec, runs made)."""
    from tuneless.bench.oracle import BASES, initial_grid, lr_value, oracle_spec, widen
    from tuneless.bench.suite import PRESETS

    config = PRESETS["full"][2]  # the grid of `tuneless bench full`, whose store holds the rastrigin runs
    best, best_spec, runs = math.inf, "", 0
    for base in BASES:
        grid = initial_grid(base, config)
        scores: dict[int, float] = {}
        while True:
            for k in grid:
                if k not in scores:
                    spec = oracle_spec(base, lr_value(k, config.points_per_decade))
                    scores[k] = final_loss(spec, start)
                    runs += 1
                    if scores[k] < best:
                        best, best_spec = scores[k], spec
            new = widen(sorted(scores), scores, config)
            if not new:
                break
            grid = new
    return best, best_spec, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    rows = []
    for start in STARTS:
        best, spec, runs = oracle(start)
        finals = {name: final_loss(s, start) for name, s in METHODS.items()}
        rows.append((start, best, spec, runs, finals))
        print(f"start {start}: oracle {best:.3g} ({spec}, {runs} runs); "
              + ", ".join(f"{n} {f:.3g}" for n, f in finals.items()), flush=True)
    lines = [
        "# Rastrigin from eight starts",
        "",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; the benchmark's dtype; 2000 steps; seed 0",
        "- command: `python benchmarks/rastrigin_starts.py --out benchmarks/results/rastrigin_starts.md`",
        f"- run time: {time.perf_counter() - began:.0f} s",
        "",
        "Final loss from each start (the global minimum is 0; the local minima are at 0.99 and above). The "
        "oracle's column is the best final loss over its whole grid (Adam and SGD-momentum, cosine-annealed), "
        "with the learning rate that gave it.",
        "",
        "| start | oracle | oracle's run | " + " | ".join(METHODS) + " |",
        "|---|---:|---|" + "---:|" * len(METHODS),
    ]
    for start, best, spec, _, finals in rows:
        lines.append(f"| ({start[0]:g}, {start[1]:g}) | {best:.3g} | `{spec}` | "
                     + " | ".join(f"{finals[n]:.3g}" for n in METHODS) + " |")
    solved = [f"oracle {sum(r[1] < SOLVED for r in rows)}/{len(rows)}"]
    solved += [f"{n} {sum(r[4][n] < SOLVED for r in rows)}/{len(rows)}" for n in METHODS]
    lines += ["", f"Runs ending in the global minimum's basin (final loss < {SOLVED:g}): " + ", ".join(solved) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
