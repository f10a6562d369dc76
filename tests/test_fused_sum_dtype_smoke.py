"""benchmarks/fused_sum_dtype.py runs (a smoke run on the small sets) and says what it measured;
its bad input is refused by name."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("fused_sum_dtype", ROOT / "benchmarks" / "fused_sum_dtype.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_times_both_kernels_and_puts_the_current_one_back(capsys):
    from tuneless.optim import default

    current = default._fused_statistics
    assert _script().main(["--quick", "--sets", "few-large", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert default._fused_statistics is current
    for label in ("float64 sums (before)", "float32 sums, float64 flag (now)"):
        assert re.search(rf"  {re.escape(label)}: [0-9.]+ ms a step", out)
    assert re.search(r"the step with float64 sums takes [0-9.]+x the time of the current one", out)


@pytest.mark.parametrize("argv, message", [(["--sets", "huge"], "--sets: unknown parameter set"),
                                           (["--reps", "0"], "--reps must be at least 1")])
def test_bad_input_is_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        _script().main(argv)
    assert message in capsys.readouterr().err
