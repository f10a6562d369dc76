"""The race's table and picture: made from a :class:`tuneless.race.RaceResult`, nothing else.

The picture puts the trajectories on log-spaced contours of the function (2-D functions) next
to the error-versus-step curves, and the learned step size of each method below them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..race import THRESHOLD, RaceResult

__all__ = ["race_rows", "race_table", "plot_race"]


def race_rows(result: RaceResult) -> list[dict]:
    """One row per method: final error, distance to the minimizer, steps to THRESHOLD, last step size."""
    rows = []
    for tr in result.traces:
        reached = tr.steps_to(THRESHOLD)
        rows.append({
            "method": tr.spec,
            "final_error": tr.final.get("error", math.nan),
            "distance": tr.final.get("distance", math.nan),
            "steps_to_threshold": reached,
            "last_step_size": float(tr.step_size[-1]) if tr.step_size.size else math.nan,
            "status": "error: " + tr.error if tr.error else ("diverged" if tr.diverged else "ok"),
        })
    return rows


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.2e}"


def race_table(result: RaceResult) -> str:
    """A markdown table of :func:`race_rows`, best first (by steps to the threshold, then error)."""
    rows = race_rows(result)
    rows.sort(key=lambda r: (r["steps_to_threshold"] is None, r["steps_to_threshold"] or 0,
                             r["final_error"] if math.isfinite(r["final_error"]) else math.inf))
    head = (f"| method | final error | distance to minimizer | steps to error <= {THRESHOLD:g} | "
            f"last step size | status |")
    lines = [head, "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        steps = str(r["steps_to_threshold"]) if r["steps_to_threshold"] is not None else "never"
        lines.append(f"| {r['method']} | {_fmt(r['final_error'])} | {_fmt(r['distance'])} | {steps} | "
                     f"{_fmt(r['last_step_size'])} | {r['status']} |")
    return "\n".join(lines)


def _is_naive(spec: str) -> bool:
    return "loss_proportional" in spec


def _color(spec: str, default):
    return "red" if _is_naive(spec) else default


def _width(spec: str) -> float:
    return 2.6 if _is_naive(spec) else 1.3


def plot_race(result: RaceResult, path: str | Path, *, title: str | None = None) -> Path:
    """Write the race picture (PNG) to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import LogNorm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fn = result.function
    two_d = fn.dim == 2
    fig = plt.figure(figsize=(16, 7.5) if two_d else (11, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2 if two_d else 1, width_ratios=[1.1, 1] if two_d else None)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(result.traces), 2)))
    styles = ["-", "--", "-.", ":"]
    if two_d:
        ax = fig.add_subplot(grid[:, 0])
        (x0, x1), (y0, y1) = fn.bounds
        xs, ys = np.linspace(x0, x1, 400), np.linspace(y0, y1, 400)
        xx, yy = np.meshgrid(xs, ys)
        pts = torch.tensor(np.stack([xx, yy], -1), dtype=torch.float64)
        zz = (fn.value(pts) - fn.min_value).numpy()
        zz = np.maximum(zz, 1e-6)
        levels = np.logspace(np.log10(max(zz.min(), 1e-6)), np.log10(zz.max()), 30)
        ax.contourf(xx, yy, zz, levels=levels, norm=LogNorm(), cmap="Greys", alpha=0.3)
        ax.contour(xx, yy, zz, levels=levels, norm=LogNorm(), colors="grey", linewidths=0.3)
        for i, tr in enumerate(result.traces):
            if tr.positions is None:
                continue
            pos = tr.positions
            ax.plot(pos[:, 0], pos[:, 1], styles[i % 4], color=_color(tr.spec, colors[i]), lw=_width(tr.spec),
                    label=tr.spec)
            ax.plot(pos[-1, 0], pos[-1, 1], "o", color=_color(tr.spec, colors[i]), ms=4)
        star = fn.minimizer()
        ax.plot(star[0], star[1], "*", color="gold", ms=16, mec="black", label="minimum")
        ax.plot(result.start[0], result.start[1], "s", color="black", ms=6, label="start")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{fn.name}: trajectories on log-spaced contours of f - f*")
        ax.legend(fontsize=7, loc="lower right")
    ax_err = fig.add_subplot(grid[0, 1] if two_d else grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 1] if two_d else grid[1, 0], sharex=ax_err)
    for i, tr in enumerate(result.traces):
        err = np.maximum(tr.series("error"), 1e-32)
        steps = np.arange(1, err.size + 1)
        ax_err.plot(steps, err, styles[i % 4], color=_color(tr.spec, colors[i]), lw=_width(tr.spec), label=tr.spec)
        lr = tr.step_size
        ax_lr.plot(np.arange(1, lr.size + 1), np.where(lr > 0, lr, np.nan), styles[i % 4],
                   color=_color(tr.spec, colors[i]), lw=_width(tr.spec) * 0.8)
    ax_err.axhline(THRESHOLD, color="black", lw=0.8, ls=":")
    ax_err.set_yscale("log")
    starts = [float(tr.series("error")[0]) for tr in result.traces if tr.loss.size and np.isfinite(tr.loss[0])]
    if starts:  # a diverged run must not squash everyone else's curve
        ax_err.set_ylim(1e-32, 1e3 * max(max(starts), 1e-30))
    ax_err.set_xscale("log")
    ax_err.set_ylabel("f(x_t) - f*")
    ax_err.set_title("error versus step (dotted: the 1e-6 finish line)")
    ax_err.legend(fontsize=7, ncol=2)
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("step size (learned, or lr)")
    ax_lr.set_title("step size each method applied")
    fig.suptitle(title or f"The {fn.name} race: {result.steps} steps from {tuple(result.start)}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
