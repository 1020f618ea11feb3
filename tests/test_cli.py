"""Tests for detection/cli.py: the ``lungdet`` dispatcher (usage, unknown subcommands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lungdet.detection.cli import main as cli_main

SUBCOMMANDS = ("demo", "synth", "eda", "convert", "train", "cv", "predict", "score", "tune", "visualize", "export", "pacs", "serve")


def test_no_arguments_prints_usage(capsys) -> None:
    assert cli_main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: lungdet SUBCOMMAND [options]")
    listed = [line.split()[0] for line in printed.split("subcommands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(SUBCOMMANDS)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage(capsys, flag: str) -> None:
    assert cli_main([flag]) == 0
    assert "convert" in capsys.readouterr().out


@pytest.mark.parametrize(("typo", "suggestion"), [("covnert", "convert"), ("scroe", "score"), ("trian", "train")])
def test_unknown_subcommand_suggests_the_closest(capsys, typo: str, suggestion: str) -> None:
    assert cli_main([typo, "--out", "x"]) == 2
    captured = capsys.readouterr()
    assert f"lungdet: unknown subcommand '{typo}'. Did you mean '{suggestion}'?" in captured.err
    assert "usage: lungdet" in captured.err
    assert captured.out == ""


def test_unknown_subcommand_without_a_close_match(capsys) -> None:
    assert cli_main(["xyzzy"]) == 2
    error = capsys.readouterr().err
    assert "unknown subcommand 'xyzzy'." in error
    assert "Did you mean" not in error


def test_subcommand_argument_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["convert", "--dicom-dir", "x"])
    assert caught.value.code == 2
    assert "the following arguments are required: --labels, --out" in capsys.readouterr().err


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "lungdet"
    if not script.exists():
        pytest.skip(f"no console script at {script}; install the package with pip install -e .")
    finished = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0
    assert all(name in finished.stdout for name in SUBCOMMANDS)
    typo = subprocess.run([str(script), "covnert"], capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2
    assert "Did you mean 'convert'" in typo.stderr


def test_overrides_may_follow_flags(monkeypatch):
    """KEY=VALUE overrides and flags intermix: `train optim.lr=0.1 --fold 2 seed=3` reaches main as one list."""
    import lungdet.detection.train as train_module
    seen = {}
    monkeypatch.setattr(train_module, "main", lambda args: seen.update(vars(args)) or 0)
    from lungdet.detection.cli import main as cli_main

    assert cli_main(["train", "--data", "d", "--out", "o", "optim.lr=0.1", "--fold", "2", "seed=3"]) == 0
    assert seen["overrides"] == ["optim.lr=0.1", "seed=3"] and seen["fold"] == 2


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """lungdet score | head -1: the reader leaves early; no traceback, the usual status for SIGPIPE."""
    import subprocess
    import sys

    (tmp_path / "labels.csv").write_text("patientId,x,y,width,height,Target\np1,,,,,0\n")
    (tmp_path / "s.csv").write_text("patientId,PredictionString\np1,\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "lungdet", "score", "--submission", str(tmp_path / "s.csv"), "--labels", str(tmp_path / "labels.csv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the command has printed anything: its first write meets a closed pipe
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 141
    assert b"Traceback" not in errors
