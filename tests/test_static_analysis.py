"""Static analysis follows every ``lungdet.*`` import to its file: jedi (editors' completion and go-to) and pyright (Pylance).

The stage folders stay at the top of the repository; ``lungdet/<stage>`` are symbolic links to them,
so that a tool reading the checkout finds ``lungdet.detection.config`` at ``lungdet/detection/config.py``
without running the editable install's import hook (which tools never run). Each test imports one
public name from every module of every stage and asks the tool where it is defined.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jedi
import pytest

from tests.conftest import skip_or_fail
from tests.test_layers import MODULES, REPO_ROOT

PYRIGHT_VERSION = "1.1.414"
PYRIGHT = Path.home() / ".cache" / "lungdet" / "pyright" / "node_modules" / ".bin" / "pyright"


def first_public_name(path: Path) -> str | None:
    """The first function or class a module defines at its top level, not starting with '_'."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            return node.name
    return None


# (module, name, file) for every stage module that defines a public function or class.
TARGETS = [
    (module, name, path)
    for module, path in sorted(MODULES.items())
    if module.count(".") == 2 and (name := first_public_name(path)) is not None
]


def probe_source() -> str:
    return "".join(f"from {module} import {name}\n" for module, name, _ in TARGETS)


def test_every_stage_has_modules_to_resolve() -> None:
    stages = {module.split(".")[1] for module, _, _ in TARGETS}
    assert stages == {"data_tools", "submission", "show", "detection", "server", "pacs"}
    assert len(TARGETS) > 50


def test_jedi_finds_every_name_in_its_file(tmp_path: Path) -> None:
    project = jedi.Project(REPO_ROOT, smart_sys_path=False, added_sys_path=[str(REPO_ROOT)])
    script = jedi.Script(probe_source(), path=tmp_path / "probe.py", project=project)
    missed = []
    for line, (module, name, path) in enumerate(TARGETS, start=1):
        column = len(f"from {module} import ")
        found = script.goto(line, column, follow_imports=True)
        if [Path(definition.module_path).resolve() for definition in found] != [path.resolve()]:
            missed.append(f"{module}.{name}: {[str(definition.module_path) for definition in found]}")
    assert not missed, "jedi could not follow these to their files:\n" + "\n".join(missed)


def pyright_command() -> list[str]:
    found = os.environ.get("LUNGDET_PYRIGHT") or (str(PYRIGHT) if PYRIGHT.exists() else shutil.which("pyright"))
    if not found:
        skip_or_fail(
            f"pyright not found at {PYRIGHT}: npm install --prefix ~/.cache/lungdet/pyright pyright@{PYRIGHT_VERSION} (.ci/run does)"
        )
    return [found]


def test_pyright_resolves_every_import(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(probe_source(), encoding="utf-8")
    config = {"include": ["probe.py"], "extraPaths": [str(REPO_ROOT)], "typeCheckingMode": "basic"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config), encoding="utf-8")
    done = subprocess.run(
        [*pyright_command(), "--outputjson", "-p", str(tmp_path / "pyrightconfig.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    problems = [
        f"line {item['range']['start']['line'] + 1}: {item['message']}"
        for item in report["generalDiagnostics"]
        if item.get("rule") in ("reportMissingImports", "reportAttributeAccessIssue")
    ]
    assert report["summary"]["filesAnalyzed"] == 1
    assert not problems, "pyright could not resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize("stage", ["data_tools", "detection", "server"])
def test_a_stage_imported_by_its_folder_name_says_how_to_import_it(stage: str) -> None:
    """From the repository root ``import detection`` would find the folder itself and load every module a second time."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {stage}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"ImportError: '{stage}' is lungdet's {stage}/ folder; import it as lungdet.{stage}" in done.stderr
