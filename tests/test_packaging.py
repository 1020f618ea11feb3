"""lungdet installs one import name, ``lungdet``; its stages are ``lungdet.<stage>``, never top-level names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("data_tools", "submission", "show", "detection", "server", "pacs")
# Runs outside the checkout, so the current directory cannot lend the top-level folders as imports.
PROBE = (
    "import importlib, importlib.util, sys\n"
    "sys.path[:0] = sys.argv[2:]\n"
    "stages = sys.argv[1].split(',')\n"
    "[importlib.import_module('lungdet.' + stage) for stage in stages]\n"
    "print(' '.join(stage for stage in stages if importlib.util.find_spec(stage) is not None) or 'none')\n"
)


def probe(*python: str, cwd: Path, site: Path | None = None) -> str:
    """Import every stage as lungdet.<stage>; the stages also importable top-level, or 'none'."""
    done = subprocess.run(
        [*python, "-c", PROBE, ",".join(STAGES), *([str(site)] if site else [])],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_editable_install_imports_every_stage_under_lungdet_only(tmp_path: Path) -> None:
    assert probe(sys.executable, cwd=tmp_path) == "none"


def test_python_m_lungdet_is_the_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lungdet", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: lungdet SUBCOMMAND [options]")


def copy_package_sources(destination: Path) -> Path:
    """What a wheel is built from, copied: an in-tree build would reuse (and leave) the checkout's build/ folder."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    for folder in ("lungdet", *STAGES, "configs"):
        # symlinks=True: lungdet/<stage> stay links to the copied folders, as in the checkout.
        shutil.copytree(
            REPO / folder, destination / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    return destination


def test_the_built_wheel_holds_one_top_level_package_with_every_stage(tmp_path: Path) -> None:
    source = copy_package_sources(tmp_path / "source")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheel"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{built.stderr[-2000:]}")
    (wheel,) = (tmp_path / "wheel").glob("lungdet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"lungdet"}
    assert {f"lungdet/{stage}/__init__.py" for stage in STAGES} <= set(names)
    assert "lungdet/server/static/index.html" in names
    # The pages' templates and their one stylesheet, which show/pages.py loads as package data.
    templates = {f"lungdet/show/templates/{path.name}" for path in (REPO / "show" / "templates").iterdir()}
    assert "lungdet/show/templates/lungdet.css" in templates and templates <= set(names)
    # The shipped configs, one level above detection/config.py as in the checkout (its CONFIGS_DIR).
    shipped = {Path(name).name for name in names if name.startswith("lungdet/configs/")}
    assert (
        shipped == {path.name for path in (REPO / "configs").glob("*.yaml")} and "lungdet/detection/config.py" in names
    )
    # -S: no site-packages, so neither the editable install nor anything else answers for the wheel's files.
    assert probe(sys.executable, "-S", cwd=tmp_path, site=tmp_path / "site") == "none"
