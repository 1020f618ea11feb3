"""Tests for lungdet/cli.py: the ``lungdet`` dispatcher (usage, unknown subcommands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lungdet.cli import main as cli_main

SUBCOMMANDS = (
    "demo",
    "synth",
    "eda",
    "convert",
    "pretrain",
    "train",
    "cv",
    "predict",
    "score",
    "tune",
    "visualize",
    "export",
    "pacs",
    "serve",
)


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


@pytest.mark.parametrize("subcommand", ["predict", "serve", "pacs", "pretrain", "export"])
def test_every_device_flag_refuses_a_typo_before_anything_loads(capsys, subcommand: str) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main([subcommand, "--device", "gpu"])
    assert caught.value.code == 2
    assert "argument --device: expected auto, cpu, cuda or cuda:N (N a GPU index), got 'gpu'" in capsys.readouterr().err


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
    from lungdet.cli import main as cli_main

    assert cli_main(["train", "--data", "d", "--out", "o", "optim.lr=0.1", "--fold", "2", "seed=3"]) == 0
    assert seen["overrides"] == ["optim.lr=0.1", "seed=3"] and seen["fold"] == 2


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """lungdet score | head -1: the reader leaves early; no traceback, the usual status for SIGPIPE."""
    import subprocess
    import sys

    (tmp_path / "labels.csv").write_text("patientId,x,y,width,height,Target\np1,,,,,0\n")
    (tmp_path / "s.csv").write_text("patientId,PredictionString\np1,\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungdet",
            "score",
            "--submission",
            str(tmp_path / "s.csv"),
            "--labels",
            str(tmp_path / "labels.csv"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the command has printed anything: its first write meets a closed pipe
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 141
    assert b"Traceback" not in errors


def test_score_tune_and_the_score_page_import_no_torch(tmp_path: Path) -> None:
    """lungdet score (with its page) and lungdet tune run where torch is not installed: the command imports only their stages."""
    from lungdet.submission.prediction_string import Prediction
    from lungdet.submission.raw_predictions import RawPrediction, write_raw_predictions

    (tmp_path / "labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,100,100,200,300,1\np2,,,,,0\np3,500,200,150,250,1\np4,,,,,0\n"
    )
    (tmp_path / "s.csv").write_text(
        "patientId,PredictionString\np1,0.9 110 100 200 300\np2,0.3 40 40 80 80\np3,\np4,\n"
    )
    rows = [
        RawPrediction("p1", "m0", "plain", 1024, 1024, Prediction.from_arrays([0.9], [[110, 100, 200, 300]]), None, 0),
        RawPrediction("p2", "m0", "plain", 1024, 1024, Prediction.from_arrays([0.3], [[40, 40, 80, 80]]), None, 1),
        RawPrediction("p3", "m0", "plain", 1024, 1024, Prediction.from_arrays([0.6], [[510, 190, 150, 250]]), None, 0),
        RawPrediction("p4", "m0", "plain", 1024, 1024, Prediction.empty(), None, 1),
    ]
    write_raw_predictions(tmp_path / "oof.csv", rows)
    files = {name: str(tmp_path / name) for name in ("labels.csv", "s.csv", "oof.csv", "page.html", "pp.yaml")}
    script = (
        "import sys\n"
        "from lungdet.cli import main\n"
        f"score = main(['score', '--submission', {files['s.csv']!r}, '--labels', {files['labels.csv']!r}, '--html', {files['page.html']!r}, '--bootstrap', '50'])\n"
        f"tune = main(['tune', '--oof', {files['oof.csv']!r}, '--labels', {files['labels.csv']!r}, '--out', {files['pp.yaml']!r}, '--no-progress'])\n"
        "print('RESULT', score, tune, sorted(name for name in ('torch', 'torchvision', 'lungdet.detection') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "RESULT 0 0 []"
    assert (tmp_path / "page.html").stat().st_size > 10_000 and (tmp_path / "pp.yaml").is_file()
