"""The import layers: every module's imports, read with ``ast``, run one way, from the command down to the shared base.

A module may import its own package and the layers below it, never one above, never a peer in its
own layer (``server`` and ``pacs`` are two deployments on the same stages), and no two modules may
import each other even through others. Imports inside functions count: a lazy import is still a
dependency, and the circles this test was written against (the scorer and its page, predict and
detect) ran through lazy ones. The next change that breaks the order fails here with both names.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# What the wheel installs, and from which folders: the one source for the module list below.
SETUPTOOLS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

# Bottom to top. Each entry is a layer: its name, and the units in it (a package, or for the root
# package the modules directly in lungdet/). A module belongs to the longest unit it starts with.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the shared base: errors, boxes, atomic writes, typed configs, argparse types", ("lungdet",)),
    ("read and convert", ("lungdet.data_tools",)),
    ("the submission format, post-processing, tuning, the metric", ("lungdet.submission",)),
    ("pictures and reports, drawn from boxes and labels (no torch)", ("lungdet.show",)),
    ("models, training, cv, prediction, export", ("lungdet.detection",)),
    ("deployments on the stages: the page and API, the PACS node", ("lungdet.server", "lungdet.pacs")),
    ("the command", ("lungdet.cli",)),
    ("python -m lungdet", ("lungdet.__main__",)),
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the lungdet module imported
    line: int


def unit_of(module: str) -> str | None:
    """The unit of LAYERS ``module`` belongs to: the longest one it starts with; None for a module outside every layer."""
    units = [
        unit for _, layer_units in LAYERS for unit in layer_units if module == unit or module.startswith(unit + ".")
    ]
    return max(units, key=len) if units else None


def layer_of(unit: str) -> int:
    return next(index for index, (_, units) in enumerate(LAYERS) if unit in units)


def package_modules() -> dict[str, Path]:
    """``{module name: file}`` for every module the wheel installs: pyproject.toml's packages, each in its folder (lungdet/<stage> links to <stage>/)."""
    modules: dict[str, Path] = {}
    for package in SETUPTOOLS["packages"]:
        folder = REPO_ROOT.joinpath(*package.split("."))
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def read_imports(module: str, source: str, known: Mapping[str, object], *, is_package: bool = False) -> list[Import]:
    """Every lungdet module ``source`` imports, at any depth of the file; ``from a import b`` is ``a.b`` when that is a module."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                Import(module, alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "lungdet"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "lungdet":
                continue
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found += [Import(module, name, node.lineno) for name in submodules] or [Import(module, target, node.lineno)]
    return [item for item in found if item.target != module]


def all_imports(modules: Mapping[str, Path]) -> list[Import]:
    return [
        item
        for module, path in modules.items()
        for item in read_imports(module, path.read_text(encoding="utf-8"), modules, is_package=path.stem == "__init__")
    ]


def layer_violations(imports: list[Import]) -> list[str]:
    """One line per import that runs upward, or sideways to a peer, naming both modules and both layers."""
    problems = []
    for item in imports:
        source_unit, target_unit = unit_of(item.source), unit_of(item.target)
        if source_unit is None or target_unit is None or source_unit == target_unit:
            continue
        source_layer, target_layer = layer_of(source_unit), layer_of(target_unit)
        if target_layer > source_layer:
            problems.append(
                f"{item.source} (line {item.line}) imports {item.target}: upward, from layer {source_layer} "
                f"'{LAYERS[source_layer][0]}' to layer {target_layer} '{LAYERS[target_layer][0]}'"
            )
        elif target_layer == source_layer:
            problems.append(
                f"{item.source} (line {item.line}) imports {item.target}: {source_unit} and {target_unit} are peers in one layer"
            )
    return problems


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The circles among modules: every strongly connected group of more than one (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        graph.setdefault(item.source, set()).add(item.target)
        graph.setdefault(item.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph[node]):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# --- the code as it is ----------------------------------------------------------------------------


MODULES = package_modules()
IMPORTS = all_imports(MODULES)


def test_every_module_has_a_layer() -> None:
    outside = [module for module in MODULES if unit_of(module) is None]
    assert not outside, f"modules in no layer of tests/test_layers.py's LAYERS (add their package there): {outside}"
    # The stages are all here, so an empty module list cannot pass the other tests.
    assert {
        "lungdet.errors",
        "lungdet.data_tools.dicom_io",
        "lungdet.submission.score",
        "lungdet.show.score_report",
        "lungdet.detection.predict",
        "lungdet.server.app",
        "lungdet.pacs.node",
        "lungdet.cli",
    } <= set(MODULES)
    assert len(IMPORTS) > 200


def test_imports_only_run_down_the_layers() -> None:
    problems = layer_violations(IMPORTS)
    assert not problems, (
        "imports against the layers (bottom to top: "
        + " < ".join(" | ".join(units) for _, units in LAYERS)
        + "):\n"
        + "\n".join(problems)
    )


def test_no_module_imports_itself_back_through_others() -> None:
    cycles = import_cycles(IMPORTS)
    assert not cycles, "import circles (move what both sides need into one module both import):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


# Inside the detection layer, inference stands apart from training: what predict, serve, pacs and
# export load must reach none of these (tests/detection/test_runtime.py checks the same at run time).
INFERENCE_ENTRY_POINTS = (
    "lungdet.detection.predict",
    "lungdet.detection.detector",
    "lungdet.detection.export",
    "lungdet.server.app",
    "lungdet.server.cli",
    "lungdet.pacs.cli",
    "lungdet.pacs.node",
)
TRAINING_MODULES = (
    "lungdet.detection.train",
    "lungdet.detection.engine",
    "lungdet.detection.distributed",
    "lungdet.detection.data",
    "lungdet.detection.augment",
    "lungdet.data_tools.to_coco",
)


def reachable(start: str, imports: list[Import]) -> dict[str, str]:
    """``{module: the module that first imported it}`` for everything ``start`` loads, at any depth."""
    graph: dict[str, list[str]] = {}
    for item in imports:
        graph.setdefault(item.source, []).append(item.target)
    found = {start: ""}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for target in sorted(graph.get(module, [])):
            if target not in found:
                found[target] = module
                queue.append(target)
    return found


def test_inference_loads_nothing_of_training() -> None:
    assert set(INFERENCE_ENTRY_POINTS + TRAINING_MODULES) <= set(MODULES)
    problems = []
    for entry in INFERENCE_ENTRY_POINTS:
        loaded = reachable(entry, IMPORTS)
        for module in TRAINING_MODULES:
            if module in loaded:
                chain = [module]
                while loaded[chain[-1]]:
                    chain.append(loaded[chain[-1]])
                problems.append(" <- ".join(chain))
    assert not problems, "inference reaches training (move what both need to detection/runtime.py):\n" + "\n".join(
        problems
    )


def test_reachable_follows_imports_at_any_depth() -> None:
    imports = [Import("a", "b", 1), Import("b", "c", 1), Import("x", "a", 1)]
    assert reachable("a", imports) == {"a": "", "b": "a", "c": "b"}


def dcmread_uses(source: str) -> list[int]:
    """Lines of ``source`` that reach pydicom's file parser: ``pydicom.dcmread(...)``, ``from pydicom import dcmread``, ``read_file``."""
    parsers = {"dcmread", "read_file"}
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in parsers:
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("pydicom")
            and parsers & {alias.name for alias in node.names}
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_every_dicom_is_parsed_by_the_one_reader() -> None:
    """data_tools/dicom_io.py alone calls pydicom's parser: its checks (truncation, empty files, decompression bombs) then hold everywhere."""
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for module, path in MODULES.items()
        if module != "lungdet.data_tools.dicom_io"
        for line in dcmread_uses(path.read_text(encoding="utf-8"))
    ]
    assert not found, (
        "pydicom parsing outside data_tools/dicom_io.py (use read_dataset, read_dataset_bytes or read_dicom there):\n"
        + "\n".join(found)
    )
    assert dcmread_uses(MODULES["lungdet.data_tools.dicom_io"].read_text(encoding="utf-8"))


def test_dcmread_uses_finds_each_way_of_calling_the_parser() -> None:
    source = "import pydicom\nfrom pydicom import dcmread\npydicom.dcmread(path)\npydicom.filereader.read_file(path)\nread_dataset(path)\n"
    assert dcmread_uses(source) == [2, 3, 4]


# The only modules that may locate files by their own path: package data that ships in the wheel.
PACKAGE_DATA_FINDERS = {
    "lungdet.detection.config": "configs/, the YAML configs (lungdet.configs in a wheel)",
    "lungdet.server.app": "static/, the page's files",
}


def test_no_module_finds_the_repository_through_its_own_path() -> None:
    """``Path(__file__)`` is the checkout in a clone but site-packages in a wheel: data beside the clone is found from the current folder."""
    users = {
        module
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Name) and node.id == "__file__"
    }
    assert users == set(PACKAGE_DATA_FINDERS), (
        f"__file__ outside the package-data finders: {sorted(users - set(PACKAGE_DATA_FINDERS))}"
    )


def test_nothing_imports_a_stage_by_its_folder_name() -> None:
    """``import detection`` works only in a checkout, and would collide with other packages; the installed name is lungdet.detection."""
    folders = {package.removeprefix("lungdet.") for package in SETUPTOOLS["packages"] if package != "lungdet"}
    files = [
        *MODULES.values(),
        *sorted((REPO_ROOT / "tests").rglob("*.py")),
        *sorted((REPO_ROOT / "benchmarks").glob("*.py")),
    ]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found += [
                f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {name}"
                for name in names
                if name.split(".")[0] in folders
            ]
    assert not found, "imports by folder name; use lungdet.<stage>:\n" + "\n".join(found)


def test_tests_mirror_the_packages() -> None:
    """tests/<stage>/ for each stage package, tests/ itself for the root package, and no folder for a package that is not there."""
    stages = {package.removeprefix("lungdet.") for package in SETUPTOOLS["packages"] if package != "lungdet"} - {
        "configs"
    }
    folders = {path.name for path in (REPO_ROOT / "tests").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == stages


# --- the checker itself, on modules written here -------------------------------------------------


KNOWN = {
    "lungdet.errors",
    "lungdet.submission.score",
    "lungdet.show.score_report",
    "lungdet.server.app",
    "lungdet.pacs.node",
    "lungdet.show",
}


def check(sources: Mapping[str, str]) -> tuple[list[str], list[list[str]]]:
    imports = [
        item for module, source in sources.items() for item in read_imports(module, source, KNOWN | set(sources))
    ]
    return layer_violations(imports), import_cycles(imports)


def test_an_upward_import_fails_with_both_names_and_layers() -> None:
    problems, _ = check(
        {"lungdet.submission.score": "def page():\n    from lungdet.show.score_report import write_score_report\n"}
    )
    assert problems == [
        "lungdet.submission.score (line 2) imports lungdet.show.score_report: upward, from layer 2 "
        f"'{LAYERS[2][0]}' to layer 3 '{LAYERS[3][0]}'"
    ]


@pytest.mark.parametrize(
    "source",
    [
        "from lungdet.show import score_report\n",
        "import lungdet.show.score_report as page\n",
        "from ..show.score_report import x\n",
    ],
)
def test_every_spelling_of_an_import_is_read(source: str) -> None:
    problems, _ = check({"lungdet.submission.score": source})
    assert len(problems) == 1 and "imports lungdet.show.score_report: upward" in problems[0]


def test_a_downward_import_and_one_within_a_package_pass() -> None:
    problems, cycles = check(
        {
            "lungdet.show.score_report": "from lungdet.submission.score import score_dataset\nfrom lungdet.errors import LungdetError\n"
        }
    )
    assert (problems, cycles) == ([], [])


def test_peers_in_one_layer_may_not_import_each_other() -> None:
    problems, _ = check({"lungdet.pacs.node": "from lungdet.server.app import create_app\n"})
    assert problems == [
        "lungdet.pacs.node (line 1) imports lungdet.server.app: lungdet.pacs and lungdet.server are peers in one layer"
    ]


def test_a_circle_inside_one_package_is_found() -> None:
    _, cycles = check(
        {
            "lungdet.detection.predict": "def f():\n    from lungdet.detection.detect import g\n",
            "lungdet.detection.detect": "from lungdet.detection.util import h\n",
            "lungdet.detection.util": "from lungdet.detection.predict import Detector\n",
        }
    )
    assert cycles == [["lungdet.detection.detect", "lungdet.detection.predict", "lungdet.detection.util"]]


def undocumented(source: str) -> list[str]:
    """Public functions, classes and methods of ``source`` (names not starting with '_') that have no docstring."""
    missing = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            if not ast.get_docstring(node):
                missing.append(node.name)
            if isinstance(node, ast.ClassDef):
                missing += [
                    f"{node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                    and not item.name.startswith("_")
                    and not ast.get_docstring(item)
                ]
    return missing


def test_every_public_function_and_class_has_a_docstring() -> None:
    found = [
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for module, path in MODULES.items()
        for name in undocumented(path.read_text(encoding="utf-8"))
    ]
    assert not found, (
        "public names without a docstring (say what they take and give, with shapes and units):\n" + "\n".join(found)
    )


def test_undocumented_sees_functions_classes_and_methods() -> None:
    source = 'def f():\n    pass\n\n\ndef _private():\n    pass\n\n\nclass C:\n    """Doc."""\n\n    def m(self):\n        pass\n\n    def _n(self):\n        pass\n'
    assert undocumented(source) == ["f", "C.m"]
