"""Specification of the layout: thin stage scripts on top, one package beside them holding
everything they share in sub-packages by idea, model.py the one model definition; imports
go one way, with no cycle.

Read from the source (every import statement, in functions too), not by importing.
"""
import ast
import re
import sys

import pytest

from helpers import REPO

STAGES = ["split_dataset", "train", "pruner", "knowledge_distillation", "test", "export", "sweep"]
# every module of the package, by its dotted name under compress (data.images, cli, ...)
PACKAGE = sorted(".".join(path.relative_to(REPO / "compress").with_suffix("").parts)
                 for path in (REPO / "compress").rglob("*.py") if path.stem != "__init__")
SUBPACKAGES = sorted(path.parent.name for path in (REPO / "compress").glob("*/__init__.py"))
MOST_LINES = 400


def source(name):
    """The path of a script, model.py, or compress.NAME (NAME dotted: compress.data.images)."""
    if name.startswith("compress."):
        return REPO / "compress" / (name.split(".", 1)[1].replace(".", "/") + ".py")
    return REPO / f"{name}.py"


def imports_of(name):
    """The pipeline's own modules (scripts, model, compress.NAME) that `name` imports."""
    tree = ast.parse(source(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from compress.data import images` imports the module compress.data.images
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    ours = set(STAGES) | {"model"} | {f"compress.{name}" for name in PACKAGE}
    return {name if name in ours else name.split(".")[0] for name in found} & ours


def reachable(name):
    """Every pipeline module that importing `name` imports, directly or not."""
    seen, todo = set(), [name]
    while todo:
        for found in imports_of(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


def test_the_top_level_holds_the_stage_scripts_and_model_py_only():
    assert {path.stem for path in REPO.glob("*.py")} == set(STAGES) | {"model"}


@pytest.mark.parametrize("module", PACKAGE)
def test_the_package_never_imports_a_script(module):
    assert not reachable(f"compress.{module}") & set(STAGES)


@pytest.mark.parametrize("script", STAGES)
def test_no_script_imports_another_script(script):
    assert not imports_of(script) & set(STAGES)


@pytest.mark.parametrize("module", [*STAGES, "model", *(f"compress.{m}" for m in PACKAGE)])
def test_no_module_imports_itself_through_others(module):
    assert module not in reachable(module)


def package_map():
    """The modules in the order compress/__init__.py's map lists them, a line each."""
    doc = ast.get_docstring(ast.parse((REPO / "compress" / "__init__.py").read_text()))
    return [line.split()[0] for line in doc.splitlines() if line.startswith("    ")]


def test_the_package_map_lists_every_module_once():
    assert sorted(package_map()) == PACKAGE


def test_the_architecture_pages_module_table_lists_every_module_in_the_maps_order():
    """(docs/architecture.md holds the table; the README links to it.)"""
    page = (REPO / "docs" / "architecture.md").read_text()
    listed = [match.replace("/", ".") for match in
              re.findall(r"^\| `compress/([\w/]+)\.py` \|", page, re.MULTILINE)]
    assert listed == package_map()


@pytest.mark.parametrize("module", PACKAGE)
def test_a_module_imports_only_those_above_it_in_the_map(module):
    order = package_map()
    above = {f"compress.{name}" for name in order[:order.index(module)]}
    assert imports_of(f"compress.{module}") - {"model"} <= above


@pytest.mark.parametrize("module", ["compress.cli", "compress.machine.cpu", "model"])
def test_the_bottom_layer_imports_nothing_of_the_pipeline(module):
    assert imports_of(module) == set()


def test_timing_imports_only_the_command_line_edge():
    """(Its plan is built from the flags there; it never needs a model of ours.)"""
    assert imports_of("compress.measure.timing") == {"compress.cli"}


def test_reading_pictures_does_not_import_the_training_loop_or_nni_helpers():
    assert reachable("compress.data.images") <= {"compress.cli", "compress.data.pictures",
                                                 "compress.machine.distributed",
                                                 "compress.machine.resources"}


@pytest.mark.parametrize("path", sorted({*REPO.glob("*.py"), *(REPO / "compress").rglob("*.py")}),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_script_or_module_of_the_package_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MOST_LINES


@pytest.mark.parametrize("module", PACKAGE)
def test_no_module_of_the_package_shadows_the_standard_library(module):
    assert module.rsplit(".", 1)[-1] not in sys.stdlib_module_names


@pytest.mark.parametrize("module", PACKAGE)
def test_the_packages_public_functions_say_what_they_take(module):
    """Type hints on every argument and a docstring, for each public function and method."""
    tree = ast.parse(source(f"compress.{module}").read_text())
    lacking = []
    for node in public_definitions(tree):
        if ast.get_docstring(node) is None and not is_short(node):
            lacking.append(f"{node.name}: no docstring")
        if isinstance(node, ast.FunctionDef):
            arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            unhinted = [a.arg for a in arguments
                        if a.annotation is None and a.arg not in ("self", "cls")]
            if unhinted:
                lacking.append(f"{node.name}: no type hint for {', '.join(unhinted)}")
    assert not lacking


def public_definitions(tree):
    """The module's public functions and classes, and the public methods of its classes (a
    function nested in another is private to it)."""
    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.ClassDef)) and not top.name.startswith("_"):
            yield top
            if isinstance(top, ast.ClassDef):
                yield from (node for node in top.body if isinstance(node, ast.FunctionDef)
                            and not node.name.startswith("_"))


def is_short(node):
    """A function of two lines or fewer explains itself by its name and hints."""
    return isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno <= 2
