#!/usr/bin/env python
"""What skipping non-finite steps costs: each optimizer's step with ``skip_nonfinite=True`` (the
default) against the same step with ``skip_nonfinite=False``, timed in the same repetitions.

For every registered tuneless optimizer at its defaults, on the vectorized path and, where the
class takes ``fused``, on the fused path (``fused=True``), over step_speed.py's two parameter sets
(192 transformer-shaped tensors, 9.5 M floats; 4 large tensors, 21 M floats): two optimizers over
two identical copies of the parameters (fixed random gradients), stepped alternately, ``--reps``
repetitions in an order rotated each time. The cost is the median over repetitions of the ratio
of the two step times taken in that repetition, minus 1. One thread, as step_speed.py.

What the check does per step (``TunelessOptimizer._skipping_nonfinite``): one sum per gradient
tensor (a read of the gradients); on the vectorized and per-parameter paths, copies of the
gradients that are zeros when the step is not finite (``torch.where``: a read and a write); on the
fused path the same select inside the kernel (no extra traffic); a few 0-d selects.

This is a benchmark, not a test: it asserts nothing about time. Examples::

    python benchmarks/nonfinite_cost.py --quick
    python benchmarks/nonfinite_cost.py --json benchmarks/results/nonfinite_cost.json \\
        --out benchmarks/results/nonfinite_cost.md
    python benchmarks/nonfinite_cost.py --only prodigy,tuneless --paths fused
    python benchmarks/nonfinite_cost.py --only mechanic --paths fused --reps 9 \\
        --update benchmarks/results/nonfinite_cost.json --out benchmarks/results/nonfinite_cost.md

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed as ss  # noqa: E402  (the parameter sets, parameters, step function, CPU name)

import tuneless  # noqa: E402
from tuneless import registry  # noqa: E402


def configs(only: list[str], paths: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for name in registry.available(source="tuneless"):
        if only and name not in only:
            continue
        factory = registry.entry(name).factory
        takes = inspect.signature(factory).parameters
        if "vectorized" in paths:
            out.append((name, "vectorized", {}))
        if "fused" in paths and "fused" in takes:
            out.append((name, "fused", {"fused": True}))
    return out


def time_pair(name: str, kwargs: dict[str, Any], shapes: ss.Shapes, reps: int, steps: int,
              warmup: int) -> dict[str, Any]:
    device = torch.device("cpu")
    on_params, off_params = ss.make_params(shapes, device), ss.make_params(shapes, device)
    on = tuneless.create(name, on_params, **kwargs)
    off = tuneless.create(name, off_params, **kwargs, skip_nonfinite=False)
    subjects = {"on": ss.step_function(on), "off": ss.step_function(off)}
    for _ in range(warmup):  # compiles the fused kernels, creates the state
        subjects["on"]()
        subjects["off"]()
    timed = ss.time_interleaved(subjects, reps, steps, device)
    ratios = [a / b for a, b in zip(timed.times["on"], timed.times["off"])]
    return dict(cost=statistics.median(ratios) - 1.0,
                cost_lo=sorted(ratios)[len(ratios) // 4] - 1.0, cost_hi=sorted(ratios)[(3 * len(ratios)) // 4] - 1.0,
                on_ms=1e3 * timed.median("on"), off_ms=1e3 * timed.median("off"))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Measured {meta['date']} on {meta['cpu']} ({meta['threads']} thread), torch {meta['torch']}, "
             f"{meta['reps']} repetitions of {meta['steps']} steps; median ratio of the step time with the check "
             "to the step time without it, minus 1 (interquartile range in brackets).", "",
             *[f"Measured again on {u['date']} ({u['reps']} repetitions, `{u['command']}`): {', '.join(u['rows'])}."
               for u in meta.get("updates", [])],
             *([""] if meta.get("updates") else []),
             "| optimizer | path | " + " | ".join(f"cost, {s}" for s in meta["sets"]) + " |",
             "|---|---|" + "---:|" * len(meta["sets"])]
    keyed: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["optimizer"], r["path"]), {})[r["set"]] = r
    for (name, path), by_set in keyed.items():
        cells = []
        for s in meta["sets"]:
            r = by_set.get(s)
            cells.append("" if r is None else f"{100 * r['cost']:+.1f}% [{100 * r['cost_lo']:+.1f}, {100 * r['cost_hi']:+.1f}]")
        lines.append(f"| {name} | {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small parameter sets, few repetitions")
    ap.add_argument("--only", default="", help="comma-separated registry names (default: every tuneless one)")
    ap.add_argument("--paths", default="vectorized,fused", help="'vectorized', 'fused', or both as 'vectorized,fused' (the default)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 15; 3 with --quick)")
    ap.add_argument("--steps-per-rep", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the run's metadata here")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--update", type=Path, default=None,
                    help="a stored JSON whose rows for the configurations run now are replaced (the others kept; "
                         "the file records which rows were measured again, when and by what command)")
    args = ap.parse_args(argv)
    if args.update is not None and args.json is not None:
        ap.error("--update writes the file it reads; --json would write a second one: give one of them")
    if args.update is not None and not args.update.is_file():
        ap.error(f"--update: {str(args.update)!r} is not a file (write one first with --json)")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    sets = ss.param_sets(args.quick)
    reps = args.reps or (3 if args.quick else 15)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in registry.available(source="tuneless")]
    if unknown:
        ap.error(f"--only: unknown optimizer(s) {unknown}; allowed: {registry.available(source='tuneless')}")
    paths = [p for p in args.paths.split(",") if p]
    if not set(paths) <= {"vectorized", "fused"}:
        ap.error(f"--paths: {args.paths!r}; allowed: vectorized, fused, or both comma-separated")
    rows = []
    todo = configs(only, paths)
    for i, (name, path, kwargs) in enumerate(todo):
        for set_name, shapes in sets.items():
            start = time.perf_counter()
            r = time_pair(name, kwargs, shapes, reps, args.steps_per_rep, warmup=2)
            rows.append(dict(optimizer=name, path=path, set=set_name, **r))
            print(f"[{i + 1}/{len(todo)}] {name} {path} {set_name}: {100 * r['cost']:+.1f}% "
                  f"({r['on_ms']:.1f} vs {r['off_ms']:.1f} ms, {time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    meta = dict(date=datetime.date.today().isoformat(), cpu=ss.cpu_model(), threads=1, torch=torch.__version__,
                python=platform.python_version(), reps=reps, steps=args.steps_per_rep, sets=list(sets),
                command=" ".join(["python", "benchmarks/nonfinite_cost.py", *(argv if argv is not None else sys.argv[1:])]))
    if args.update is not None:
        stored = json.loads(args.update.read_text())
        if stored["meta"]["sets"] != meta["sets"]:
            ap.error(f"--update: the file's parameter sets {stored['meta']['sets']} are not this run's {meta['sets']}")
        fresh = {(r["optimizer"], r["path"], r["set"]): r for r in rows}
        merged = [fresh.pop((r["optimizer"], r["path"], r["set"]), r) for r in stored["rows"]]
        merged.extend(fresh.values())
        updates = stored["meta"].setdefault("updates", [])
        updates.append(dict(date=meta["date"], reps=reps, command=meta["command"],
                            rows=sorted({f"{r['optimizer']} {r['path']}" for r in rows})))
        meta, rows = stored["meta"], merged
    table = markdown(rows, meta)
    print(table)
    out_json = args.json if args.json is not None else args.update
    if out_json is not None:
        out_json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
