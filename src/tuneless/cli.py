"""The ``tuneless`` command: ``race``, ``list``, ``bench`` and ``report``.

Nothing below this module imports it: it only parses arguments, calls the library, prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import InvalidArgumentError, SpecError, UnknownArgumentError, UnknownNameError

USER_ERRORS = (UnknownNameError, UnknownArgumentError, SpecError, InvalidArgumentError, ValueError)


class Progress:
    """One status line per run on stderr: rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.current = None
        self.t0 = time.perf_counter()

    def __call__(self, i: int, n: int, spec: str, step: int, steps: int) -> None:
        if self.current is not None and self.current != i:
            self._finish()
        if self.current != i:
            self.t0 = time.perf_counter()
        self.current = i
        self.last = (i, n, spec, step, steps)
        if self.tty:
            self.stream.write(f"\r[{i + 1:2d}/{n}] {spec:32s} {step:6d}/{steps} steps  "
                              f"{time.perf_counter() - self.t0:5.1f}s")
            self.stream.flush()

    def _finish(self) -> None:
        i, n, spec, step, steps = self.last
        line = f"[{i + 1:2d}/{n}] {spec:32s} {step:6d}/{steps} steps  {time.perf_counter() - self.t0:5.1f}s"
        self.stream.write(("\r" + line + "\n") if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.current is not None:
            self._finish()
            self.current = None


def _parse_start(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"--start = {text!r} is invalid; allowed: comma-separated numbers, e.g. --start=-1.5,2")


def cmd_race(args: argparse.Namespace) -> int:
    from .race import run_race
    from .report.race import plot_race, race_table

    progress = Progress()
    result = run_race(args.function, args.optimizers, steps=args.steps, start=_parse_start(args.start),
                      progress=progress)
    progress.close()
    print(race_table(result))
    if not args.no_plot:
        out = Path(args.out or f"out/race-{result.function.name}.png")
        plot_race(result, out)
        print(f"\npicture written to {out.resolve()}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .problems import PROBLEMS
    from .registry import _scheduler_entries, available, entry

    what = args.what
    if what in ("optimizers", "all"):
        print("optimizers (learning-rate-free marked *):")
        for name in available():
            e = entry(name)
            print(f"  {'*' if e.learning_rate_free else ' '} {name:18s} {e.summary}")
    if what in ("problems", "all"):
        print("problems:")
        for name, cls in sorted(PROBLEMS.items()):
            print(f"    {name:18s} [{cls.kind}] {cls.description}")
    if what in ("schedulers", "all"):
        print("lr schedulers (after '@' in a spec):")
        for name, e in sorted(_scheduler_entries().items()):
            print(f"    {name:18s} {e.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneless",
        description="Training without choosing a learning rate: learning-rate-free optimizers, raced and benchmarked.",
    )
    parser.add_argument("--version", action="version", version=f"tuneless {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    race = sub.add_parser(
        "race", help="race optimizers on an analytic function (default: rosenbrock)",
        description="Run every optimizer spec from the function's standard start; print a table and write a PNG "
                    "(trajectories on log-spaced contours next to error-versus-step and step-size curves).",
    )
    race.add_argument("function", nargs="?", default="rosenbrock",
                      help="analytic function spec: rosenbrock, rosenbrock_nd:dim=10, beale, quadratic:condition=1e4, rastrigin")
    race.add_argument("--steps", type=int, default=None, help="steps per method (default: the function's budget)")
    race.add_argument("--start", default=None, help="start point, comma-separated; negative values as --start=-1.5,2")
    race.add_argument("--optimizers", nargs="+", default=None, metavar="SPEC",
                      help="optimizer specs such as 'sgd@loss_proportional' 'adam:lr=1e-2@cosine' 'prodigy' "
                           "(default: the baselines and every learning-rate-free optimizer)")
    race.add_argument("--out", default=None, help="PNG path (default: out/race-FUNCTION.png)")
    race.add_argument("--no-plot", action="store_true", help="print the table only")
    race.set_defaults(func=cmd_race)

    lst = sub.add_parser("list", help="list optimizers, problems and lr schedulers")
    lst.add_argument("what", nargs="?", default="all", choices=["all", "optimizers", "problems", "schedulers"])
    lst.set_defaults(func=cmd_list)

    from .cli_bench import add_bench_commands  # tuneless bench, tuneless report

    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"tuneless {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
