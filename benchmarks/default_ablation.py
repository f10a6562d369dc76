"""The ablation behind the default optimizer, ``tuneless.Tuneless`` (see ``docs/default.md``).

Runs each variant of the default (one ingredient switched at a time, through the unregistered
``tuneless.optim.default.TunelessScheduleFreeVariant`` and ``TunelessVariant``) and the anchors it must beat, with the benchmark's
own machinery (``tuneless bench``: the same oracle, store and scoring), on the DESIGN problems
only, then prints the ablation table. The held-out problems are run only with ``--held-out``,
once the design is frozen, and are reported in a table of their own.

    python benchmarks/default_ablation.py                    # design set, seeds 0 1 2
    python benchmarks/default_ablation.py --seeds 0          # a quicker screen
    python benchmarks/default_ablation.py --held-out         # the frozen default on the held-out set
    python benchmarks/default_ablation.py --render           # re-print from the store, run nothing
    python benchmarks/default_ablation.py --catalogue --db DESIGN_DB --held-out-db HELD_OUT_DB
                                                             # every registered optimizer, both sets
    python benchmarks/default_ablation.py --robustness       # the loss seen by the optimizer x1e-3, x1e3, +1
    python benchmarks/default_ablation.py --render --db benchmarks/results/default-design.sqlite
                                                             # the tables of docs/default.md, from the stored runs
    python benchmarks/default_ablation.py --spread --db benchmarks/results/default-heldout.sqlite
                                                             # the default's gap on each seed
    python benchmarks/default_ablation.py --headline benchmarks/results/default-design.sqlite \
        benchmarks/results/default-heldout.sqlite          # the README's table

The store (``out/default-ablation.sqlite`` by default) is resumable: an interrupted run
continues where it stopped, and runs already stored (the oracle's included) are reused.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

#: The split, fixed before the first experiment (docs/default.md, "The split"): the design set
#: is where choices are made; the held-out set is never used to choose anything.
DESIGN_PROBLEMS: tuple[str, ...] = (
    "rosenbrock", "beale", "quadratic", "rastrigin", "logreg_digits", "logreg_wine", "mlp_digits", "mlp_wine",
    "cnn_digits", "char_lm", "least_squares", "mlp_digits_smooth", "finetune_digits",
)
HELD_OUT_PROBLEMS: tuple[str, ...] = (
    "rosenbrock_nd", "logreg_breast_cancer", "mlp_breast_cancer", "matrix_factorization", "transformer_lm",
    "resnet_digits", "mlp_digits_long",
)

_VARIANT = "tuneless.optim.default.TunelessVariant"
_SF_VARIANT = "tuneless.optim.default.TunelessScheduleFreeVariant"
#: the default's level, spelled out in the variants (whose own default is the fixed level)
_LEVEL = "bound='capped_level'"

#: name -> (spec, what it tests). The first row is the default itself; each other row changes
#: one ingredient of it (the Schedule-Free variant with r=8 and the capped level is the default, spelled out).
VARIANTS: dict[str, tuple[str, str]] = {
    "tuneless (default)": ("tuneless", "Schedule-Free (r=8) around the soft-capped Polyak step aimed at the capped level, "
                                       "d started at tau_1"),
    "no averaging": (f"{_VARIANT}:{_LEVEL}", "the same step with Adam's momentum (beta1 0.9) instead of averaging"),
    "no averaging, Polyak step alone": (f"{_VARIANT}:step_rule='polyak',{_LEVEL}", "MoMo-Adam's model with no cap"),
    "averaging r=0": (f"{_SF_VARIANT}:{_LEVEL}", "Schedule-Free's own weights (all iterates, weighted by step size)"),
    "averaging r=2": (f"{_SF_VARIANT}:r=2.0,{_LEVEL}", "polynomial weights (t+1)^2"),
    "base momentum 0.9": (f"{_SF_VARIANT}:r=8.0,beta1=0.9,{_LEVEL}", "Adam's first moment kept inside the average"),
    "hard minimum": (f"{_SF_VARIANT}:r=8.0,combine='hard',{_LEVEL}", "min(tau, d) instead of 1/(1/tau + 1/d)"),
    "no cap (Polyak step alone)": (f"{_SF_VARIANT}:r=8.0,step_rule='polyak',{_LEVEL}", "no distance estimate"),
    "no error (distance alone)": (f"{_SF_VARIANT}:r=8.0,step_rule='distance',{_LEVEL}", "no Polyak step: Prodigy-like"),
    "tiny start": (f"{_SF_VARIANT}:r=8.0,start='tiny',{_LEVEL}", "d starts at Prodigy's 1e-6"),
    "fixed level (the default until 2026-12-04)": (f"{_SF_VARIANT}:r=8.0",
                                                   "the Polyak step aims at lower_bound itself, always"),
    "target level": (f"{_SF_VARIANT}:r=8.0,bound='target_level'",
                     "the level rises towards the best loss seen on every miss, not only while the cap decides "
                     "(Polyak's method for an unknown minimum)"),
    "target level, no cap": (f"{_SF_VARIANT}:r=8.0,step_rule='polyak',bound='target_level'",
                             "the target level with the Polyak step alone: no distance estimate"),
    "learned lower bound (MoMo*)": (f"{_SF_VARIANT}:r=8.0,bound='momo_star'",
                                    "the Polyak step aims at a level learned online (MoMo*'s rule), not at lower_bound"),
}

#: the anchors the default is compared with (registered methods at their defaults)
ANCHORS: tuple[str, ...] = ("momo", "momo_star", "prodigy", "sf_prodigy", "mechanic", "dowg", "cocob")


def _available(problems: tuple[str, ...]) -> list[str]:
    from tuneless.problems import PROBLEMS

    return [p for p in problems if p in PROBLEMS]


def _anchors() -> list[str]:
    from tuneless.registry import available

    names = set(available())
    extra = [a for a in ("momo_adam", "sf_plus") if a in names]
    return [a for a in ANCHORS if a in names] + extra


def _catalogue() -> list[str]:
    """Every registered tuneless optimizer at its defaults (the learning-rate-free ones, the
    anchors, and the methods that take a learning rate, at their default one), and torch's
    Adam at its default lr: the field the default must lead."""
    from tuneless.registry import available, methods_at_defaults

    names = list(methods_at_defaults())
    names += [n for n in available(source="tuneless") if n not in names]
    return names + ["adam"]


def run_sweep(problems: list[str], specs: list[str], seeds: list[int], db: Path, workers: int | None) -> None:
    cmd = [sys.executable, "-m", "tuneless.cli", "bench", "full", "--problems", *problems,
           "--optimizers", *specs, "--seeds", *map(str, seeds), "--db", str(db), "--no-report"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def render(db: Path, problems: list[str], labels: dict[str, str]) -> str:
    """The ablation table from the store: one row per variant or anchor."""
    from tuneless.bench import compute_results
    from tuneless.bench.store import ResultStore

    with ResultStore(db, create=False) as store:
        records = [r for r in store.records(curves=True) if r.problem.split(":")[0] in problems]
    results = compute_results(records, methods=list(labels))
    lines = ["| variant | spec | gap (geo-mean) | within 1.1x | within 2x | diverged | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for summary in results.summaries:
        name = labels.get(summary.method, summary.method)
        lines.append(f"| {name} | `{summary.method}` | {summary.geo_gap:.2f}x | "
                     f"{summary.within_1_1}/{summary.problems} | {summary.within_2}/{summary.problems} | "
                     f"{summary.diverged} | {summary.failed} |")
    return "\n".join(lines)


#: the robustness conditions: (label, scale, shift) of the loss the optimizer sees
LOSS_TRANSFORMS: tuple[tuple[str, float, float], ...] = (("x1e-3", 1e-3, 0.0), ("x1e3", 1e3, 0.0), ("+1", 1.0, 1.0))
#: the methods of the robustness table: the default and the loss-based anchors (and Prodigy, which reads no loss)
ROBUSTNESS_METHODS: tuple[str, ...] = ("tuneless", "momo", "momo_adam", "sf_plus", "prodigy",
                                       f"{_SF_VARIANT}:r=8.0,step_rule='polyak',{_LEVEL}",
                                       f"{_SF_VARIANT}:r=8.0",
                                       f"{_SF_VARIANT}:r=8.0,step_rule='polyak'",
                                       f"{_SF_VARIANT}:r=8.0,bound='target_level'",
                                       f"{_SF_VARIANT}:r=8.0,step_rule='polyak',bound='target_level'",
                                       f"{_SF_VARIANT}:r=8.0,bound='momo_star'")


def robustness(db: Path, workers: int | None, render_only: bool) -> str:
    """The quick suite, then each method again with the loss it sees transformed (the problem
    ``transformed``), each run scored against the untransformed problem's oracle: evaluation is
    the inner problem's, so the transformed runs are relabelled as runs of the inner problem."""
    import dataclasses
    from concurrent.futures import ProcessPoolExecutor

    from tuneless.bench import compute_results
    from tuneless.bench.executors import execute_task
    from tuneless.bench.store import ResultStore
    from tuneless.bench.suite import PRESETS, Task
    from tuneless.registry import available

    from tuneless.bench.suite import canonical_spec

    names = set(available())
    methods = [canonical_spec(m) for m in ROBUSTNESS_METHODS if m in names or "." in m.split(":")[0]]
    problems = PRESETS["quick"][0]
    if not render_only:
        cmd = [sys.executable, "-m", "tuneless.cli", "bench", "quick", "--optimizers", *methods, "--db", str(db),
               "--no-report"] + (["--workers", str(workers)] if workers else [])
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        tasks = [Task(f"transformed:problem={p!r},scale={scale!r},shift={shift!r}", m, 0, steps)
                 for label, scale, shift in LOSS_TRANSFORMS for p, steps in problems for m in methods]
        with ResultStore(db) as store:
            done = store.keys()
            todo = [t for t in tasks if t.key not in done]
            print(f"robustness: {len(todo)} transformed runs to make ({len(tasks) - len(todo)} stored)", flush=True)
            with ProcessPoolExecutor(max_workers=workers or 2) as pool:
                for i, record in enumerate(pool.map(execute_task, todo), 1):
                    store.write(record)
                    print(f"  [{i}/{len(todo)}] {record.spec} on {record.problem}: {record.status}", flush=True)
    from tuneless.problems import get_problem

    with ResultStore(db, create=False) as store:
        records = list(store.records(curves=True))
    relabelled, labels = [], {}
    for r in records:
        if r.problem.startswith("transformed:"):
            t = get_problem(r.problem)
            label = next(lab for lab, sc, sh in LOSS_TRANSFORMS if (sc, sh) == (t.scale, t.shift))
            name = f"{r.spec} [{label}]"
            # the training losses it recorded are the transformed ones: undo the transform, so that
            # the start (and the solved floor of a known minimum) is the inner problem's
            initial = None if r.initial_loss is None else (r.initial_loss - t.shift) / t.scale
            relabelled.append(dataclasses.replace(r, problem=t.inner.spec(), spec=name, key=f"{r.key}|{label}",
                                                  initial_loss=initial, loss=(r.loss - t.shift) / t.scale))
        else:
            relabelled.append(r)
    results = compute_results(relabelled, methods=None)
    lines = ["| method | loss as is | loss x 1e-3 | loss x 1e3 | loss + 1 |", "|---|---:|---:|---:|---:|"]
    by_name = {s.method: s for s in results.summaries}
    for m in methods:
        cells = []
        for name in [m] + [f"{m} [{label}]" for label, _, _ in LOSS_TRANSFORMS]:
            sm = by_name.get(name)
            cells.append("—" if sm is None else f"{sm.within_1_1}/{sm.problems} (geo {sm.geo_gap:.2f}x)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(design_db: Path, held_out_db: Path, view: str = "target") -> str:
    """The README's table: the default and the anchors on the design and the held-out problems,
    each set scored with its own oracle runs (one store each), then both together. ``view``:
    "target" (the headline: each problem's target metric, the held-out loss of learning tasks) or
    "train" (the second view: the final training loss, the oracle chosen on it)."""
    from tuneless.bench import compute_results
    from tuneless.bench.store import ResultStore

    methods = ["tuneless"] + [m for m in _catalogue() if m != "tuneless"]
    summaries = {}
    for name, db, problems in (("design", design_db, DESIGN_PROBLEMS), ("held-out", held_out_db, HELD_OUT_PROBLEMS)):
        with ResultStore(db, create=False) as store:
            records = [r for r in store.records(curves=True) if r.problem.split(":")[0] in problems]
        summaries[name] = {sm.method: sm for sm in compute_results(records, methods=methods, view=view).summaries}
    lines = ["| method | within 1.1x: design | held-out | all | within 2x: all | diverged runs | gap (geo-mean, all) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for m in methods:
        d, h = summaries["design"].get(m), summaries["held-out"].get(m)
        if d is None or h is None or not h.problems:
            continue
        n = d.problems + h.problems
        geo = math.exp((d.problems * math.log(d.geo_gap) + h.problems * math.log(h.geo_gap)) / n)
        rows.append((d.within_1_1 + h.within_1_1, -geo, f"| {m} | {d.within_1_1}/{d.problems} | {h.within_1_1}/{h.problems} | "
                     f"{d.within_1_1 + h.within_1_1}/{n} | {d.within_2 + h.within_2}/{n} | "
                     f"{d.diverged + h.diverged} | {geo:.2f}x |"))
    lines += [r[2] for r in sorted(rows, reverse=True)]
    return "\n".join(lines)


def spread(db: Path, method: str = "tuneless") -> str:
    """``method``'s gap on each seed (its run's score over the oracle's score, the geometric mean
    over seeds), per learning problem of the store: the spread behind the tables' geometric means."""
    from tuneless.bench import compute_results
    from tuneless.bench.metrics import metric_of, run_score
    from tuneless.bench.store import ResultStore

    with ResultStore(db, create=False) as store:
        records = list(store.records(curves=True))
    oracles = {o.label: o for o in compute_results(records, methods=[method]).oracles}
    lines = [f"| problem | {method}: gap on seeds 0, 1, 2 |", "|---|---|"]
    for label, oracle in oracles.items():
        runs = sorted((r for r in records if r.spec == method and r.problem.split(":")[0] == label
                       and r.kind == "learning"), key=lambda r: r.seed)
        if len(runs) > 1 and not oracle.min_known:  # (a known minimum: solved or not, see the tables)
            gaps = ", ".join(f"{run_score(r, penalize=True, metric=metric_of(r)) / oracle.score:.3g}" for r in runs)
            lines.append(f"| {label} | {gaps} |")
    return "\n".join(lines)


def export(db: Path, path: Path) -> None:
    """A copy of the store small enough to keep in the repository: every run and its evaluation
    curves, without the per-step loss and step-size curves (the tables here do not use them)."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    with sqlite3.connect(db) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
        dst.execute("UPDATE runs SET loss_curve = NULL, step_size_curve = NULL, positions = NULL")
        dst.commit()
        dst.execute("PRAGMA journal_mode = DELETE")
    with sqlite3.connect(path) as dst:
        dst.execute("VACUUM")
    print(f"exported {db} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--db", type=Path, default=Path("out/default-ablation.sqlite"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--held-out", action="store_true", help="run the default and the anchors on the held-out set")
    parser.add_argument("--render", action="store_true", help="print the table from the store; run nothing")
    parser.add_argument("--robustness", action="store_true",
                        help="the quick suite with the loss the optimizer sees scaled by 1e-3 and 1e3 and shifted by 1")
    parser.add_argument("--export", type=Path, default=None,
                        help="write a slim copy of the store (no per-step curves) to this path, e.g. under "
                             "benchmarks/results/, and render from it with --render --db PATH")
    parser.add_argument("--spread", action="store_true",
                        help="print the default's gap on each seed of each learning problem of --db; run nothing")
    parser.add_argument("--catalogue", action="store_true",
                        help="run every registered optimizer at its defaults (and Adam) on the design set into --db, "
                             "and on the held-out set into --held-out-db: the runs behind --headline")
    parser.add_argument("--held-out-db", type=Path, default=Path("out/ablation-heldout.sqlite"))
    parser.add_argument("--headline", nargs=2, type=Path, metavar=("DESIGN_DB", "HELD_OUT_DB"), default=None,
                        help="print the README's table from a design-set store and a held-out store")
    parser.add_argument("--view", choices=("target", "train"), default="target",
                        help="with --headline: 'target' (each problem's target metric, the README's table) or "
                             "'train' (the final training loss: the second view)")
    args = parser.parse_args(argv)
    if args.catalogue:
        from tuneless.bench.suite import canonical_spec

        specs = [canonical_spec(m) for m in _catalogue()]
        for problems, db in ((DESIGN_PROBLEMS, args.db), (HELD_OUT_PROBLEMS, args.held_out_db)):
            db.parent.mkdir(parents=True, exist_ok=True)
            run_sweep(_available(problems), specs, args.seeds, db, args.workers)
        return 0
    if args.spread:
        print(spread(args.db))
        return 0
    if args.headline is not None:
        print(headline(*args.headline, view=args.view))
        return 0
    if args.export is not None:
        export(args.db, args.export)
        return 0
    if args.robustness:
        db = args.db if args.db != Path("out/default-ablation.sqlite") else Path("out/default-robustness.sqlite")
        db.parent.mkdir(parents=True, exist_ok=True)
        print(robustness(db, args.workers, args.render))
        return 0
    problems = _available(HELD_OUT_PROBLEMS if args.held_out else DESIGN_PROBLEMS)
    variants = {"tuneless": "tuneless (default)"} if args.held_out else {s: n for n, (s, _) in VARIANTS.items()}
    labels = {**variants, **{a: a for a in _anchors()}}
    from tuneless.bench.suite import canonical_spec

    labels = {canonical_spec(s): n for s, n in labels.items()}
    if not args.render:
        args.db.parent.mkdir(parents=True, exist_ok=True)
        run_sweep(problems, list(labels), args.seeds, args.db, args.workers)
    print(f"\n{'held-out' if args.held_out else 'design'} problems ({len(problems)}): {', '.join(problems)}\n")
    print(render(args.db, problems, labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
