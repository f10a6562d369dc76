"""The held-out loss at a minimum of each classification problem's training objective, against
the oracle's: can an optimizer that minimizes the objective it is given be within 1.1x of the
oracle on that problem at all?

    python benchmarks/objective_minimum.py [--problems logreg_wine ...] [--seeds 0 1 2]

For each problem and seed, the problem is built as the benchmark builds it (the seed's
initialisation), in float64, and its whole training objective (the mean cross-entropy over the
training set plus its L2 term: what every minibatch loss estimates) is minimized by full-batch
L-BFGS with a strong-Wolfe line search until the gradient's norm is below ``--tolerance``. The
held-out loss there (the benchmark's target metric, with the L2 term as the benchmark adds it)
is divided by the oracle's score, read from the stored runs of ``--design-db`` and
``--held-out-db`` (the oracle: Adam and SGD with momentum, cosine-annealed, the best learning
rate chosen on the held-out loss itself). The default's own gap is printed next to it.

Logistic regression with an L2 term is strictly convex: its minimum is the same from every
seed, and a ratio above 1.1 there means that every optimizer that converges ends more than
1.1x from the oracle, whose advantage is to stop short of the minimum (its small learning rate
acts as early stopping). An MLP has many minima: the minimum found depends on the start, and
its ratio says what one minimum near that start gives, not what every one does.

This is a diagnostic of the problems, run after the default was frozen; nothing in the
default's design depends on it (docs/default.md, "Where the default loses").
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from default_ablation import DESIGN_PROBLEMS, HELD_OUT_PROBLEMS  # noqa: E402

#: the benchmark's classification problems on scikit-learn's bundled sets
PROBLEMS: tuple[str, ...] = ("logreg_digits", "logreg_wine", "logreg_breast_cancer", "mlp_digits", "mlp_wine",
                             "mlp_breast_cancer")
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Minimum:
    problem: str
    seed: int
    objective: float
    grad_norm: float
    held_out_loss: float
    iterations: int


def minimize(problem: str, seed: int, *, tolerance: float = 1e-8, max_iter: int = 20000) -> Minimum:
    """Full-batch L-BFGS on ``problem``'s training objective from ``seed``'s initialisation, in
    float64, until the gradient's norm is at most ``tolerance`` (or ``max_iter`` iterations)."""
    from tuneless.problems import get_problem
    from tuneless.problems.learning import LearningInstance

    instance = get_problem(problem).instantiate(seed, dtype=torch.float64)
    if not isinstance(instance, LearningInstance) or not instance.classify:
        raise ValueError(f"problem = {problem!r} is invalid; allowed: a classification problem of the benchmark "
                         f"({', '.join(PROBLEMS)})")
    params = [p for p in instance.params if p.requires_grad]

    def objective() -> torch.Tensor:
        value = instance.loss_fn(instance.model(instance.x_train), instance.y_train)
        return value + instance.regularizer() if instance.regularizer is not None else value

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=500, tolerance_grad=tolerance / 10, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    def grad_norm() -> float:
        opt.zero_grad()
        objective().backward()
        return float(torch.cat([p.grad.reshape(-1) for p in params]).norm())

    iterations = 0
    norm = grad_norm()
    while norm > tolerance and iterations < max_iter:
        opt.step(closure)
        done = opt.state[params[0]]["n_iter"]  # L-BFGS keeps its count with the first parameter
        if done == iterations:  # no progress left (the line search found no decrease)
            break
        iterations = done
        norm = grad_norm()
    with torch.no_grad():
        value = float(objective())
        held_out = instance.evaluate()["test_loss"]
    return Minimum(problem, seed, value, norm, held_out, iterations)


def stored_scores(design_db: Path, held_out_db: Path, method: str = "tuneless") -> dict[str, tuple[float, float]]:
    """problem -> (the oracle's score, ``method``'s score) on the target metric, from the stores."""
    from tuneless.bench import compute_results
    from tuneless.bench.store import ResultStore

    out: dict[str, tuple[float, float]] = {}
    for db in (design_db, held_out_db):
        if not db.exists():
            raise FileNotFoundError(f"--design-db/--held-out-db = {str(db)!r} does not exist; allowed: a store "
                                    "written by benchmarks/default_ablation.py")
        with ResultStore(db, create=False) as store:
            records = list(store.records(curves=False))
        results = compute_results(records, methods=[method])
        for oracle in results.oracles:
            cell = results.cells.get((method, oracle.problem))
            out[oracle.problem] = (oracle.score, cell.score if cell is not None else math.nan)
    return out


def table(minima: list[Minimum], scores: dict[str, tuple[float, float]]) -> str:
    lines = ["| problem | set | seed | objective at the minimum | gradient norm | held-out loss there | "
             "oracle's held-out loss | minimum / oracle | tuneless / oracle |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in minima:
        oracle, default = scores.get(m.problem, (math.nan, math.nan))
        where = "design" if m.problem in DESIGN_PROBLEMS else "held-out" if m.problem in HELD_OUT_PROBLEMS else "-"
        lines.append(f"| {m.problem} | {where} | {m.seed} | {m.objective:.5f} | {m.grad_norm:.1e} | "
                     f"{m.held_out_loss:.4f} | {oracle:.4f} | {m.held_out_loss / oracle:.2f} | {default / oracle:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), metavar="PROBLEM")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tolerance", type=float, default=1e-8, help="stop when the gradient's norm is below this")
    parser.add_argument("--design-db", type=Path, default=RESULTS / "default-design.sqlite")
    parser.add_argument("--held-out-db", type=Path, default=RESULTS / "default-heldout.sqlite")
    args = parser.parse_args(argv)
    bad = [p for p in args.problems if p not in PROBLEMS]
    if bad:
        parser.error(f"--problems {' '.join(bad)} is invalid; allowed: {', '.join(PROBLEMS)}")
    if not args.tolerance > 0:
        parser.error(f"--tolerance = {args.tolerance} is invalid; allowed: a number > 0")
    try:
        scores = stored_scores(args.design_db, args.held_out_db)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)
    minima = []
    for problem in args.problems:
        for seed in args.seeds:
            minima.append(minimize(problem, seed, tolerance=args.tolerance))
            m = minima[-1]
            print(f"{problem} seed {seed}: objective {m.objective:.6g}, gradient norm {m.grad_norm:.1e} "
                  f"after {m.iterations} L-BFGS iterations", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, float64, full-batch L-BFGS (strong Wolfe), gradient norm <= {args.tolerance:g}\n")
    print(table(minima, scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
