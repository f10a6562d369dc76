"""How much the default's fused step pays for summing its statistics in float64 (CPU).

``Tuneless(fused=True)`` runs two compiled kernels per group of tensors: a read-only statistics
kernel (five sums) and the update. Until 2026-12-04 the statistics kernel accumulated all five
sums in float64; now the four statistics are accumulated in the compute dtype (float32 for
float32 parameters, as the unfused path's BLAS dots are) and only the sum of the gradients, which
decides a non-finite step, stays in float64. This script times the whole fused step with each
kernel, interleaved in one process on step_speed.py's parameter sets, and the statistics kernel's
share of the step.

    python benchmarks/fused_sum_dtype.py                 # both sets (about 2 minutes, compiles included)
    python benchmarks/fused_sum_dtype.py --sets few-large --reps 5

Both kernels compile at their first step (a C++ compiler is needed); the printed times are
medians over the repetitions after three warm-up steps, one torch thread.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_speed  # noqa: E402  (the parameter sets)

import tuneless  # noqa: E402
from tuneless.optim import default as default_module  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="many-small,few-large", help="comma-separated parameter sets of step_speed.py")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions of 2 steps per kernel (default 9)")
    ap.add_argument("--quick", action="store_true", help="step_speed.py's small parameter sets (a smoke run)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    sets = step_speed.param_sets(quick=args.quick)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in sets]
    if unknown:
        ap.error(f"--sets: unknown parameter set(s) {unknown}; known: {sorted(sets)}")
    torch.set_num_threads(1)
    current = default_module._fused_statistics
    kernels = {  # the statistics kernel's four sums in float64 (as before), or in the compute dtype (now)
        "float64 sums (before)": functools.partial(current, stat_dtype=torch.float64),
        "float32 sums, float64 flag (now)": current,
    }
    loss = torch.tensor(1.0)
    for name in names:
        shapes = sets[name]
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        numel = sum(p.numel() for p in params)
        opt = tuneless.Tuneless(params, fused=True)
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for label, kernel in kernels.items():  # compile and warm each
            default_module._fused_statistics = kernel
            start = time.perf_counter()
            for _ in range(3):
                opt.step(loss=loss)
            print(f"[{name}] {label}: compiled and warmed in {time.perf_counter() - start:.0f} s", flush=True)
        for _ in range(args.reps):
            for label, kernel in kernels.items():
                default_module._fused_statistics = kernel
                start = time.perf_counter()
                opt.step(loss=loss)
                opt.step(loss=loss)
                times[label].append((time.perf_counter() - start) / 2)
        default_module._fused_statistics = current
        before, now = (statistics.median(t) for t in times.values())
        print(f"{name} ({len(params)} tensors, {numel / 1e6:.2f} M floats), median of {args.reps} x 2 steps:")
        for label, t in times.items():
            m = statistics.median(t)
            print(f"  {label}: {m * 1e3:.1f} ms a step ({m * 1e9 / numel:.2f} ns a parameter)")
        print(f"  the step with float64 sums takes {before / now:.2f}x the time of the current one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
