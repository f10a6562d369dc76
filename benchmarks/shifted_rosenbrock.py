"""Rosenbrock from (-1.2, 1), with the loss as is and shifted by +1, for the default (its Polyak
step aims at a level that starts at lower_bound = 0 and rises only while the distance estimate
caps the step: the capped level) and for three of the ablation's levels: the fixed level (the
bound itself: the default until 2026-12-04), a target level that rises towards the best loss
seen on every miss, and a lower bound learned online (MoMo*'s rule): the numbers behind
docs/default.md's reading of the shifted loss (float64, deterministic, a few seconds on a CPU).

    python benchmarks/shifted_rosenbrock.py [--steps 3000]

For each run it prints, at a few steps, the loss minus its minimum at the point where the
gradient is taken, the error at the average (the point evaluated), the step size and the
distance estimate d, and at the end the level the Polyak step aimed at.
"""

from __future__ import annotations

import argparse

import torch

import tuneless
from tuneless.optim.default import TunelessScheduleFreeVariant


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def run(bound: str, shift: float, steps: int) -> list[str]:
    """``bound``: "default" (``tuneless.Tuneless``: the capped level), or one of the ablation's
    variants: "fixed" (the Polyak step aims at the bound itself: the default until 2026-12-04),
    "target_level" or "momo_star"."""
    x = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    opt = tuneless.Tuneless([x]) if bound == "default" else TunelessScheduleFreeVariant([x], r=8.0, bound=bound)
    marks = sorted({m for m in (10, 100, 300, 1000, 2000, steps) if m <= steps})
    lines = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = rosenbrock(x) + shift
        loss.backward()
        opt.step(loss=loss.detach())
        if t in marks:
            group = opt.base.param_groups[0]
            with opt.evaluation_point():
                error = float(rosenbrock(x.detach()))
            lines.append(f"  step {t:5d}: f - f* at y {float(loss.detach()) - shift:9.2e}, error at the average "
                         f"{error:9.2e}, step size {float(group[tuneless.STEP_SIZE_KEY]):8.2e}, "
                         f"d {float(group['distance']):8.2e}")
    group = opt.base.param_groups[0]
    level = group.get("lower_bound_estimate", group.get("level_aimed"))
    aimed = 0.0 if level is None else float(level)
    lines.append(f"  level aimed at, at the end: {aimed:.4g} (the minimum is {shift:g})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps = {args.steps}: must be at least 1")
    for bound, name in (("default", "Tuneless (its capped level, which starts at lower_bound = 0)"),
                        ("fixed", "fixed level (lower_bound = 0; the default until 2026-12-04)"),
                        ("target_level", "target level (starts at lower_bound = 0)"),
                        ("momo_star", "learned lower bound (MoMo*'s rule)")):
        for shift in (0.0, 1.0):
            print(f"{name}, loss {'+ 1' if shift else 'as is'}:")
            print("\n".join(run(bound, shift, args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
