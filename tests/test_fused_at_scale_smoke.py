"""Smoke test of benchmarks/fused_at_scale.py (the GPU check's first timed stage) on the CPU,
on tiny sizes and on its uncompiled case only (the compiled cases cost a compile each): the
table, the reference row and its ratios, and the refusal of bad arguments. Never timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fused_at_scale.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_the_vectorized_case_and_the_reference_make_a_table(tmp_path) -> None:
    out = tmp_path / "scale.md"
    done = _run("--device", "cpu", "--optimizers", "adam_hd,tuneless", "--cases", "vectorized", "--numel", "2000",
                "--tensors", "3", "--steps", "2", "--timeout", "200", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "(cpu; 3 tensors of about 2,000 floats, median of 2 steps, 200 s per case)" in text
    assert re.search(r"Reference: torch\.optim\.AdamW\(foreach=True\), [0-9.]+ ms; the ratios are to it\.", text)
    assert "| optimizer | vectorized |" in text
    for name in ("adam_hd", "tuneless"):
        assert re.search(rf"\| {name} \| [0-9.]+ ms \([0-9.]+x\) \|", text), text


@pytest.mark.parametrize("args, message", [
    (("--cases", "vectorised"), "--cases = 'vectorised': 'vectorised' is not one of small first, large first, vectorized"),
    (("--timeout", "5"), "--timeout = 5.0: must be more than 10 seconds"),
    (("--optimizers", "adam_hd,"), "--optimizers = 'adam_hd,': an empty name"),
])
def test_bad_arguments_are_refused_by_name(args, message) -> None:
    done = _run("--device", "cpu", *args, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
