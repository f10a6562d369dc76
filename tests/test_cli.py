"""The tuneless command line: race and list, as a user types them."""

from __future__ import annotations

import subprocess
import sys

from tuneless.cli import main


def test_race_prints_the_table_and_the_picture_path(tmp_path, capsys) -> None:
    out = tmp_path / "race.png"
    code = main(["race", "rosenbrock", "--steps", "200", "--optimizers", "polyak", "sgd@loss_proportional",
                 "--out", str(out), "--start=-1.5,2"])
    captured = capsys.readouterr()
    assert code == 0
    assert "| polyak |" in captured.out and "| sgd@loss_proportional |" in captured.out
    assert f"picture written to {out.resolve()}" in captured.out
    assert out.exists()
    assert "[ 1/2] polyak" in captured.err and "[ 2/2] sgd@loss_proportional" in captured.err  # progress


def test_race_no_plot(tmp_path, capsys) -> None:
    assert main(["race", "beale", "--steps", "20", "--optimizers", "adam", "--no-plot"]) == 0
    assert "picture written" not in capsys.readouterr().out


def test_bad_input_gives_a_clear_error_and_exit_code_2(capsys) -> None:
    assert main(["race", "banana", "--steps", "5"]) == 2
    assert "tuneless race: error: unknown problem 'banana'" in capsys.readouterr().err
    assert main(["race", "--optimizers", "adamm", "--steps", "5"]) == 2
    assert "did you mean 'adam'" in capsys.readouterr().err
    assert main(["race", "--start=a,b", "--steps", "5"]) == 2
    assert "--start = 'a,b' is invalid" in capsys.readouterr().err
    assert main(["race", "--optimizers", "polyak:fstar=0", "--steps", "5"]) == 2
    assert "did you mean 'f_star'" in capsys.readouterr().err


def test_list(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "* polyak" in out and "rosenbrock" in out and "loss_proportional" in out


def test_console_script_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "tuneless.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("tuneless ")
