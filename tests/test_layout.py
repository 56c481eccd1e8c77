"""Specification of the layout: imports go one way, from the stage scripts on top down to
the command-line edge and model.py at the bottom, with no cycle.

Read from the source (every import statement, in functions too), not by importing.
"""
import ast

import pytest

from conftest import REPO

STAGES = ["split_dataset", "train", "pruner", "knowledge_distillation", "test", "export", "sweep"]
SHARED = ["cli", "cpu", "model", "checkpoints", "distributed", "data", "measure", "training", "deploy",
          "experiment"]


def imports_of(module):
    """The pipeline's own modules that REPO/<module>.py imports, anywhere in the file."""
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(STAGES + SHARED)


def reachable(module):
    """Every pipeline module that importing `module` imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        for name in imports_of(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_every_pipeline_module_is_listed_here():
    found = {path.stem for path in REPO.glob("*.py")}
    assert found == set(STAGES + SHARED)


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_never_import_a_stage_script(module):
    assert not reachable(module) & set(STAGES)


@pytest.mark.parametrize("module", STAGES + SHARED)
def test_no_module_imports_itself_through_others(module):
    assert module not in reachable(module)


@pytest.mark.parametrize("module", ["cli", "cpu", "model"])
def test_the_bottom_layer_imports_nothing_of_the_pipeline(module):
    assert imports_of(module) == set()


def test_reading_pictures_does_not_import_the_training_loop_or_nni_helpers():
    assert reachable("data") <= {"cli", "distributed"}
