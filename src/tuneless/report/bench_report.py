"""The benchmark's report, made from the results store only: a markdown table and an HTML file.

* :func:`markdown_report` gives the tables printed in the terminal, in the headline view (each
  problem's target metric: held-out loss for learning problems): one line per method (the
  AlgoPerf score, problems where it reached the oracle's target, the geometric-mean gap to the
  oracle, problems within 1.1x and 2x, divergences, failures, steps to 1.1x, time per run, the
  oracle's runs against one), the gap per problem; then the second view (the final training
  loss): its per-method line and gap per problem.
* :func:`write_html` writes one self-contained HTML file (images embedded as base64 PNG, no
  scripts, nothing fetched): the same tables, the performance profile (rho_m(tau) of every
  method), a heat-map of the gaps (methods x problems), the training-loss, step-size and
  evaluation curves per problem, the trajectories on the banana (2-D analytic problems), the
  oracle's learning-rate grids, and every failure's message.

Both take the results of :func:`~tuneless.bench.metrics.compute_results` in the headline view
and, optionally, in the training-loss view (``train=``).

Plots use matplotlib's object API with the Agg canvas: no pyplot state, no window opened.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bench.metrics import (R_MAX, BenchResults, Cell, MethodSummary, ProblemOracle, compute_results, score_curve,
                             floor_of)
from ..bench.store import ResultStore, RunRecord
from ..bench.suite import BASELINE_METHODS

__all__ = ["markdown_report", "write_html", "load_results", "format_gap"]

#: the explanation printed under the headline tables
LEGEND = (
    "Each problem is scored by its target metric (the row 'scored on'): the held-out loss for learning "
    "problems, the objective for analytic functions and the two learning problems whose minimum is known. "
    "gap = a method's final value over the oracle's (geometric mean over seeds; 1.00x matches the "
    "oracle, below 1 beats it). For problems marked † the minimum is known (0): the gap is of the error and "
    "is shown as log10 (+2.0 = a hundred times the oracle's error); an error a million times below the start "
    "counts as solved (a tie). The oracle is the best of Adam and SGD "
    "with momentum, each cosine-annealed to 0, over a learning-rate grid widened until the best point is "
    "inside it, chosen on the same metric. A diverged or failed run is scored at its start. "
    "AlgoPerf score: the normalised area under the performance profile over tau in [1, 4], where a "
    "method's time on a problem is the fraction of the budget it needs to reach the oracle's final value "
    "(first of the evaluations at the start, at evenly spaced steps (every 5% of the budget by default) and at "
    "the end; median over seeds, a miss "
    "counts as infinite) over the fastest method's time: 1 = fastest to the target everywhere, 0 = never "
    "within 4x of the fastest. 'reached': problems where it reached the target. 'steps to 1.1x': median "
    "fraction of the budget for the training loss to come within 1.1x of the oracle's final training loss."
)
#: the explanation printed under the second view's tables
LEGEND_TRAIN = (
    "Second view: every problem scored by its final training loss (at the evaluation point), the oracle "
    "chosen on it; otherwise as above. A training loss far below the oracle's with a worse held-out loss "
    "is overfitting, not a better optimizer."
)


def load_results(db: str | Path, *, problems: Sequence[str] | None = None,
                 view: str = "target") -> tuple[BenchResults, list[RunRecord]]:
    """Read the store at ``db`` and compute the results in ``view`` (optionally for some problems only)."""
    with ResultStore(db, create=False) as store:
        records = store.records(curves=True)
    if problems is not None:
        wanted = set(problems)
        records = [r for r in records if r.problem in wanted or r.problem.split(":")[0] in wanted]
    return compute_results(records, view=view), records


# ---------------------------------------------------------------------------- formatting


def format_gap(cell: Cell, log: bool) -> str:
    """A cell of the gap table: ``1.05x``, ``+2.1`` (log10, minimum known), ``div``, ``fail`` or ``—``."""
    if cell.status == "missing":
        return "—"
    if cell.ratio is None:
        return {"diverged": "div", "failed": "fail"}.get(cell.status, "n/a")
    text = f"{cell.log_gap:+.1f}" if log else _ratio(cell.ratio)
    if cell.status == "diverged":
        text = "div " + text if cell.diverged == cell.seeds else text + " (div)"
    elif cell.status == "failed":
        text = "fail" if cell.failed == cell.seeds else text + " (fail)"
    return text


def _ratio(r: float) -> str:
    if not math.isfinite(r):
        return "inf"
    if r >= 100:
        return f"{r:.3g}x".replace("e+0", "e").replace("e+", "e")
    return f"{r:.2f}x"


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, fmt)


def _fraction(x: float | None) -> str:
    if x is None:
        return "—"
    return "never" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _method_label(method: str) -> str:
    return method + (" (untuned)" if method in BASELINE_METHODS else "")


def _sorted_summaries(results: BenchResults) -> list[MethodSummary]:
    def key(s: MethodSummary) -> tuple:
        score = -s.algoperf_score if s.algoperf_score is not None and results.view == "target" else 0.0
        return (s.method in BASELINE_METHODS, score, -s.within_1_1,
                math.inf if math.isnan(s.geo_gap) else s.geo_gap, s.method)

    return sorted(results.summaries, key=key)


def _oracle_label(o: ProblemOracle) -> str:
    if o.spec is None:
        return "none" if not o.total_runs else "all failed"
    return f"{o.base} {o.lr:.3g}"


def _table(headers: list[str], rows: list[list[str]], align: str) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def summary_rows(results: BenchResults, *, scores: bool = True) -> tuple[list[str], list[list[str]], str]:
    """The per-method table; ``scores`` adds the AlgoPerf score and the targets reached first."""
    headers = (["method"] + (["AlgoPerf score", "reached target"] if scores else [])
               + ["gap (geo-mean)", "within 1.1x", "within 2x", "diverged", "failed", "steps to 1.1x",
                  "s/run", "runs (oracle vs 1)"])
    rows = []
    for s in _sorted_summaries(results):
        first = [_method_label(s.method)]
        if scores:
            first += [_num(s.algoperf_score, ".3f"),
                      f"{s.reached}/{s.profile_problems}" if s.profile_problems else "—"]
        rows.append(first + [
            _ratio(s.geo_gap) if not math.isnan(s.geo_gap) else "—",
            f"{s.within_1_1}/{s.problems}", f"{s.within_2}/{s.problems}", str(s.diverged), str(s.failed),
            "—" if s.median_steps_fraction is None else f"{100 * s.median_steps_fraction:.0f}%",
            _num(s.train_seconds, ".2f"), f"{_num(s.oracle_runs, '.3g')} vs 1",
        ])
    return headers, rows, "l" + "r" * (len(headers) - 1)


def gap_rows(results: BenchResults) -> tuple[list[str], list[list[str]], str]:
    headers = ["method"] + [o.label + (" †" if o.min_known else "") for o in results.oracles]
    rows = [["scored on"] + [str(o.metric) for o in results.oracles],
            ["oracle (base, lr)"] + [_oracle_label(o) for o in results.oracles],
            ["oracle final value"] + [_num(o.final_value) for o in results.oracles]]
    for s in _sorted_summaries(results):
        rows.append([_method_label(s.method)] + [format_gap(results.cell(s.method, o.label), o.min_known)
                                                 for o in results.oracles])
    return headers, rows, "l" + "r" * len(results.oracles)


def markdown_report(results: BenchResults, *, title: str = "tuneless bench", train: BenchResults | None = None) -> str:
    """The terminal report: the per-method table, the per-problem gap table, the legend (the
    headline view), then the same two tables in the training-loss view ``train`` if given."""
    if not results.oracles:
        return f"## {title}\n\nThe store holds no runs yet."
    seeds = sorted({s for o in results.oracles for s in o.seeds})
    edge = [f"{o.label} ({', '.join(o.at_edge)})" for o in results.oracles if o.at_edge]
    parts = [
        f"## {title}: learning-rate-free methods against an oracle-tuned baseline",
        "",
        f"{len(results.oracles)} problems, {len(results.methods)} methods, seeds {', '.join(map(str, seeds)) or '—'}.",
        "",
        _table(*summary_rows(results)),
        "",
        "### Gap to the oracle, per problem",
        "",
        _table(*gap_rows(results)),
        "",
        LEGEND,
    ]
    if train is not None and train.oracles:
        parts += ["", "### Second view: the final training loss", "", _table(*summary_rows(train, scores=False)),
                  "", _table(*gap_rows(train)), "", LEGEND_TRAIN]
    if edge:
        parts += ["", "Warning: the oracle's best point is still at an end of its grid (widening limit reached) on "
                  + "; ".join(edge) + "."]
    failures = [c for c in results.cells.values() if c.failed]
    if failures:
        parts += ["", f"{sum(c.failed for c in failures)} failed runs; their errors are in the HTML report."]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {m: cmap(i % 20) for i, m in enumerate(methods)}


def heatmap_png(results: BenchResults) -> str:
    """log10 gap (methods x problems), diverging colours centred on the oracle."""
    summaries = _sorted_summaries(results)
    methods = [s.method for s in summaries]
    labels = [o.label for o in results.oracles]
    data = np.full((len(methods), len(labels)), np.nan)
    text = [["" for _ in labels] for _ in methods]
    for i, m in enumerate(methods):
        for j, o in enumerate(results.oracles):
            c = results.cell(m, o.label)
            if c.log_gap is not None:
                data[i, j] = c.log_gap
            text[i][j] = format_gap(c, o.min_known).replace(" (div)", "*").replace(" (fail)", "!")
    fig = _figure(1.3 + 0.95 * len(labels), 1.2 + 0.36 * len(methods))
    ax = fig.add_subplot(1, 1, 1)
    vmax = 2.0
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn_r"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.clip(data, -vmax, vmax), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(labels)), [lab + (" †" if o.min_known else "") for lab, o in zip(labels, results.oracles)],
                  rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), [_method_label(m) for m in methods], fontsize=8)
    for i in range(len(methods)):
        for j in range(len(labels)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6.5)
    cb = fig.colorbar(im, ax=ax, fraction=0.03)
    cb.set_label("log10 gap to the oracle (0 = oracle)", fontsize=8)
    ax.set_title("Gap to the oracle-tuned baseline", fontsize=10)
    return _png(fig)


def profile_png(results: BenchResults, colors: dict[str, Any]) -> str | None:
    """rho_m(tau) of every method over tau in [1, R_MAX]; None when no problem has a known time."""
    methods = [s for s in _sorted_summaries(results) if s.profile_problems]
    if not methods:
        return None
    taus = np.linspace(1.0, R_MAX, 601)
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(methods):
        rho = results.rho(s.method, taus)
        # a tiny offset per method keeps identical profiles visible
        ax.plot(taus, rho + 0.004 * (i - len(methods) / 2), color=colors[s.method], lw=1.4,
                label=f"{_method_label(s.method)} ({_num(s.algoperf_score, '.3f')})",
                drawstyle="steps-post")
    n = methods[0].profile_problems
    ax.set_xlim(1.0, R_MAX)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("tau (time to target over the fastest method's)")
    ax.set_ylabel(f"fraction of the {n} problems")
    ax.grid(alpha=0.3)
    ax.set_title("Performance profile: rho(tau) = problems reached within tau x the fastest (AlgoPerf score)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _by_seed(records: list[RunRecord], seed: int) -> list[RunRecord]:
    return [r for r in records if r.seed == seed]


def curves_png(results: BenchResults, oracle: ProblemOracle, colors: dict[str, Any]) -> str:
    """Training-loss (or error), step-size and evaluation curves (the view's metric, with the
    oracle's target) of every method on one problem, first seed."""
    fig = _figure(15, 3.6)
    ax_loss = fig.add_subplot(1, 3, 1)
    ax_step = fig.add_subplot(1, 3, 2)
    ax_eval = fig.add_subplot(1, 3, 3)
    seed = oracle.seeds[0] if oracle.seeds else 0
    lines = []
    for s in _sorted_summaries(results):
        c = results.cells.get((s.method, oracle.label))
        if c is None:
            continue
        for r in _by_seed(c.records, seed):
            lines.append((s.method, r, colors[s.method], "-"))
    for r in oracle.records:
        if r.seed == seed:
            lines.append((f"oracle: {r.spec}", r, "black", "--"))
    for label, r, color, style in lines:
        if r.loss.size == 0:
            continue
        y = score_curve(r)
        x = np.arange(1, y.size + 1)
        ax_loss.plot(x, np.where(y > 0, y, np.nan), color=color, ls=style, lw=1.1, label=label)
        ss = r.step_size
        if ss.size:
            ax_step.plot(np.arange(1, ss.size + 1), np.where(ss > 0, ss, np.nan), color=color, ls=style, lw=1.1)
    metric = oracle.metric
    for label, r, color, style in lines:
        values = r.eval_curves.get(metric.name)
        if values is None or not values.size or r.eval_steps.size != values.size:
            continue
        floor = floor_of(r, metric=metric)
        y = np.array([max(metric.raw(float(v), r.min_value), floor) for v in values])
        ax_eval.plot(r.eval_steps, np.where((y > 0) & np.isfinite(y), y, np.nan), color=color, ls=style, lw=1.1,
                     marker=".", ms=3)
    if math.isfinite(oracle.target):
        ax_eval.axhline(oracle.target, color="black", lw=0.8, ls=":")
    what = "error (loss - minimum)" if oracle.min_known else "training loss"
    if oracle.kind != "analytic":
        what += f", trailing mean over {max(1, oracle.steps // 50)} steps"
    eval_label = f"{metric} at the evaluation points" + (" (minus the minimum)" if oracle.min_known else "")
    for ax, ylabel in ((ax_loss, what), (ax_step, "step size (effective lr)"), (ax_eval, eval_label)):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    ax_loss.set_title(f"{oracle.label}: training curves (seed {seed})", fontsize=9)
    ax_step.set_title("learned step size", fontsize=9)
    ax_eval.set_title("evaluations (dotted: the oracle's target)", fontsize=9)
    ax_eval.legend(*ax_loss.get_legend_handles_labels(), fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def trajectories_png(results: BenchResults, oracle: ProblemOracle, colors: dict[str, Any]) -> str | None:
    """The paths of every method (first seed) on the contours of a 2-D analytic problem."""
    from ..problems import AnalyticFunction, get_problem

    try:
        problem = get_problem(oracle.problem)
    except Exception:
        return None
    if not isinstance(problem, AnalyticFunction) or problem.dim != 2:
        return None
    import torch

    seed = oracle.seeds[0] if oracle.seeds else 0
    paths = []
    for s in _sorted_summaries(results):
        c = results.cells.get((s.method, oracle.label))
        for r in _by_seed(c.records, seed) if c is not None else []:
            if r.positions is not None:
                paths.append((s.method, r.positions, colors[s.method], "-"))
    for r in oracle.records:
        if r.seed == seed and r.positions is not None:
            paths.append((f"oracle: {r.spec}", r.positions, "black", "--"))
    if not paths:
        return None
    (x0, x1), (y0, y1) = problem.bounds
    gx, gy = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    with torch.no_grad():
        z = problem.value(torch.tensor(np.stack([gx, gy], -1), dtype=torch.float64)).numpy()
    z = z - (problem.min_value or 0.0)
    fig = _figure(8.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    levels = np.logspace(math.log10(max(z.min(), 1e-3)), math.log10(z.max()), 25)
    ax.contour(gx, gy, np.maximum(z, 1e-3), levels=levels, colors="#bbbbbb", linewidths=0.6)
    for label, pos, color, style in paths:
        pos = pos[np.all(np.isfinite(pos), axis=1)]
        ax.plot(pos[:, 0], pos[:, 1], color=color, ls=style, lw=1.0, label=label)
    start = paths[0][1][0]
    ax.plot(*start, "ko", ms=5)
    ax.plot(*problem.minimizer(), "r*", ms=12)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(f"Trajectories on {oracle.label} (start o, minimum *)", fontsize=10)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def grids_png(results: BenchResults) -> str | None:
    """Each problem's oracle grid: score against learning rate, one line per base."""
    oracles = [o for o in results.oracles if o.grids]
    if not oracles:
        return None
    cols = min(4, len(oracles))
    rows = int(math.ceil(len(oracles) / cols))
    fig = _figure(3.2 * cols, 2.5 * rows)
    for i, o in enumerate(oracles):
        ax = fig.add_subplot(rows, cols, i + 1)
        for base, pts in sorted(o.grids.items()):
            lrs = [p[0] for p in pts]
            vals = [p[1] if math.isfinite(p[1]) else np.nan for p in pts]
            ax.plot(lrs, vals, "o-", ms=3, lw=1, label=base)
            div = [lr for lr, v in pts if not math.isfinite(v)]
            if div:
                finite = [v for v in vals if not np.isnan(v)]
                ax.plot(div, [max(finite) if finite else 1.0] * len(div), "x", color="red", ms=4)
        if o.lr is not None:
            ax.axvline(o.lr, color="black", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(o.label + (" †" if o.min_known else ""), fontsize=8)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle("Oracle grids: final score against learning rate (x = diverged, dotted = the oracle)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; }
.note { color: #555; font-size: 13px; max-width: 1000px; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def _html_table(headers: list[str], rows: list[list[str]], colors: list[list[str | None]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            bg = colors[i][j] if colors else None
            style = f' style="background:{bg}"' if bg else ""
            cells.append(f"<td{style}>{html.escape(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _gap_color(cell: Cell) -> str | None:
    if cell.log_gap is None:
        return "#eeeeee" if cell.status != "missing" else None
    t = max(-1.0, min(1.0, cell.log_gap / 2.0))
    if t <= 0:
        return f"rgba(40,160,70,{0.15 + 0.5 * -t:.2f})"
    return f"rgba(220,60,40,{0.1 + 0.6 * t:.2f})"


def write_html(results: BenchResults, path: str | Path, *, store_path: str | Path | None = None,
               records: Sequence[RunRecord] = (), train: BenchResults | None = None) -> Path:
    """Write the self-contained HTML report to ``path`` and return it: the headline view
    ``results``, and the training-loss view ``train`` as a second table when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = _colors([s.method for s in _sorted_summaries(results)])
    versions = sorted({f"{k} {v}" for r in records for k, v in r.versions.items()})
    body = [f"<h1>tuneless bench: learning-rate-free methods against an oracle-tuned baseline</h1>",
            f"<p class=note>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))}"
            + (f" from <code>{html.escape(str(store_path))}</code>" if store_path else "")
            + (f"; runs made with {html.escape(', '.join(versions))}" if versions else "") + ".</p>"]
    if not results.oracles:
        body.append("<p>The store holds no runs yet.</p>")
    else:
        body += ["<h2>Per method</h2>", _html_table(*summary_rows(results)[:2]),
                 f"<p class=note>{html.escape(LEGEND)}</p>"]
        body.append("<h2>performance profile</h2>")
        profile = profile_png(results, colors)
        if profile:
            body.append(_img(profile, "performance profile"))
            trows = []
            for s in _sorted_summaries(results):
                trows.append([_method_label(s.method)] + [_fraction(results.cell(s.method, o.label).time_to_target)
                                                          for o in results.oracles if math.isfinite(o.target)])
            body.append(_html_table(["time to target"] + [o.label for o in results.oracles
                                                          if math.isfinite(o.target)], trows))
            body.append("<p class=note>Time to target: the fraction of the budget at which a method's "
                        "evaluations first reach the oracle's final value (median over seeds; never: a majority of "
                        "the seeds missed it). rho(tau): the fraction of problems on which a method reached the "
                        "target within tau times the fastest method's time.</p>")
        else:
            body.append("<p>No run in this store has evaluation curves (a store written before schema version 2): "
                        "no time to target.</p>")
        headers, rows, _ = gap_rows(results)
        cell_colors: list[list[str | None]] = [[None] * len(headers) for _ in range(3)]  # the 3 oracle rows
        for s in _sorted_summaries(results):
            cell_colors.append([None] + [_gap_color(results.cell(s.method, o.label)) for o in results.oracles])
        body += ["<h2>Gap to the oracle, per problem</h2>", _img(heatmap_png(results), "gap heat-map"),
                 _html_table(headers, rows, cell_colors)]
        if train is not None and train.oracles:
            headers_t, rows_t, _ = gap_rows(train)
            colors_t: list[list[str | None]] = [[None] * len(headers_t) for _ in range(3)]
            for s in _sorted_summaries(train):
                colors_t.append([None] + [_gap_color(train.cell(s.method, o.label)) for o in train.oracles])
            body += ["<h2>Second view: the final training loss</h2>",
                     _html_table(*summary_rows(train, scores=False)[:2]),
                     _html_table(headers_t, rows_t, colors_t), f"<p class=note>{html.escape(LEGEND_TRAIN)}</p>"]
        body.append("<h2>The oracle</h2>")
        orows = []
        for o in results.oracles:
            test = ", ".join(f"{k} {v:.4g}" for k, v in o.test.items() if math.isfinite(v))
            orows.append([o.label, str(o.metric), o.spec or "—", _num(o.target), _fraction(o.time_to_target),
                          _num(o.final_loss), test or "—",
                          _num(o.runs_per_seed, ".3g"), ", ".join(o.at_edge) or "no",
                          "—" if o.steps_to is None else str(o.steps_to), _num(o.seconds, ".1f")])
        body.append(_html_table(["problem", "scored on", "oracle", "target (score)", "its time to target",
                                 "final training loss", "held-out", "runs per seed",
                                 "best at grid end", "steps to 1.1x", "seconds (all runs)"], orows))
        grid = grids_png(results)
        if grid:
            body.append(_img(grid, "oracle grids"))
        for o in results.oracles:
            traj = trajectories_png(results, o, colors)
            if traj:
                body += [f"<h2>Trajectories on {html.escape(o.label)}</h2>", _img(traj, f"trajectories {o.label}")]
        body.append("<h2>Curves per problem</h2>")
        for o in results.oracles:
            body += [f"<h3>{html.escape(o.label)}</h3>", _img(curves_png(results, o, colors), f"curves {o.label}")]
            trows = []
            for s in _sorted_summaries(results):
                c = results.cells.get((s.method, o.label))
                if c is None:
                    continue
                test = ", ".join(f"{k} {v:.4g}" for k, v in c.test.items() if math.isfinite(v))
                trows.append([_method_label(s.method), c.status, _num(c.final_value), format_gap(c, o.min_known),
                              _fraction(c.time_to_target), _num(c.final_loss),
                              "—" if c.steps_to is None else str(c.steps_to), test or "—", _num(c.train_seconds, ".2f")])
            body.append(_html_table(["method", "status", f"final {o.metric.name}", "gap", "time to target",
                                     "final training loss", "steps to 1.1x", "held-out", "s/run"], trows))
        failures = [(c.method, c.problem, e) for c in results.cells.values() for e in c.errors]
        if failures:
            body.append("<h2>Failures</h2>")
            body.append(_html_table(["method", "problem", "error"], [[m, p, e] for m, p, e in failures]))
    doc = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>tuneless bench report</title>"
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
