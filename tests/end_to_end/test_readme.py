"""Specification of README.md's own code: the "From Python" example runs as it stands.

It is taken from the README (the first python block after its "## From Python"
heading) and run in a folder holding a dataset and a dense model (conftest's
narrow_teacher), as a notebook user would run it.
"""
import os
import re
import shutil
import subprocess
import sys

import torch

from helpers import REPO


def from_python_example():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## From Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_from_python_example_prunes_distils_and_compares(narrow_teacher, tmp_path):
    shutil.copytree(narrow_teacher / "dataset", tmp_path / "dataset")
    shutil.copy2(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    code = from_python_example()
    assert 10 <= len([line for line in code.splitlines() if line.strip()]) <= 25
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^[\d,]+ -> [\d,]+ parameters$", proc.stdout, re.MULTILINE), proc.stdout
    for name in ("dense", "student"):
        assert re.search(rf"^{name}: [\d.]+%, [\d.]+ ms at batch 1$", proc.stdout,
                         re.MULTILINE), proc.stdout
    for name, kind in (("pruned.pth", "pruned"), ("student.pth", "finetuned")):
        checkpoint = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert checkpoint["kind"] == kind
    assert (tmp_path / "student.history.json").is_file()
