"""Specification of the photo command (tools/demo.py --photos DIR) end to end, on a tiny
folder with a tiny recipe: both of its endings, a pick within the budget and none, end with
exit 0, an int8 file that test.py reads, and RESULT.md that says which it was."""
import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import CLASSIFIER_WIDTH, IMAGE_SIZE, TOOLS, generate_demo, run_in_process, run_script

spec = importlib.util.spec_from_file_location("demo_photo", TOOLS / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

QUICK = ["--batch-size", "8", "--workers", "0"]
TEACHER = ["--image-size", str(IMAGE_SIZE), "--batch-norm", "--classifier-width",
           str(CLASSIFIER_WIDTH), "--epochs", "1", *QUICK]
SWEEP = ["--methods", "l1", "--sparsities", "0.5", "0.9", "--kd-epochs", "1", "1", "--mix",
         "mixup", "--target", "int8", "--repeats", "2", "--max-repeats", "3", *QUICK]


def tiny_recipe(monkeypatch):
    """The photo recipe at 32 px, one teacher epoch, two sparsities of one epoch each."""
    monkeypatch.setattr(demo, "TEACHER", TEACHER)
    monkeypatch.setattr(demo, "TEACHER_EPOCHS", 1)
    monkeypatch.setattr(demo, "SWEEP", SWEEP)
    monkeypatch.setattr(demo, "SPARSITIES", (0.5, 0.9))
    monkeypatch.setattr(demo, "KD_STAGES", (1, 1))
    monkeypatch.setattr(demo, "COMPARE", ["--repeats", "2", "--max-repeats", "3"])
    monkeypatch.setattr(demo, "speeds", lambda share, steps=3: (100 / share, 300 / share))


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """One photo run to its end with --max-drop 100 (every candidate within it)."""
    folder = tmp_path_factory.mktemp("photo_run")
    generate_demo(folder / "photos", per_class=10)
    with pytest.MonkeyPatch.context() as monkeypatch:
        tiny_recipe(monkeypatch)
        proc = run_in_process(demo, "--photos", "photos", "--workdir", "run", "--max-drop", "100",
                              cwd=folder)
    return folder, proc


def shipped_file(run):
    return run / json.loads((run / "run.json").read_text())["shipped"]


@pytest.mark.slow
def test_a_run_within_the_budget_ships_the_pick_and_says_so(photo_run):
    folder, proc = photo_run
    run = folder / "run"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    shipped = shipped_file(run)
    assert shipped.is_file() and ".over-budget" not in shipped.name
    page = (run / "RESULT.md").read_text()
    assert f"**Shipped: `{shipped.name}`**" in page and "met the budget" in page
    assert (run / "result.png").stat().st_size > 10_000
    for heading in ("## What went in", "## What came out", "## How it was chosen",
                    "## How long", "## Use it"):
        assert heading in page
    compared = json.loads((run / "compare.json").read_text())
    assert [row["path"] for row in compared][2] == shipped.name
    tested = run_script("test.py", "--weights", shipped.name, "--data", "dataset", cwd=run)
    assert tested.returncode == 0, tested.stderr


@pytest.mark.slow
def test_the_five_lines_of_python_on_the_page_classify_a_photo(photo_run):
    folder, _ = photo_run
    run = folder / "run"
    page = (run / "RESULT.md").read_text()
    code = page.split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) == 5
    answer = subprocess.run([sys.executable, "-c", code], cwd=run, capture_output=True,
                            text=True)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() in ("cat", "dog")


@pytest.mark.slow
def test_a_run_that_meets_no_budget_still_ships_a_file_named_so_and_exits_0(photo_run,
                                                                              monkeypatch,
                                                                              capfd):
    folder, _ = photo_run
    run = folder / "run"
    report = run / "sweep" / "sweep.json"
    rows = json.loads(report.read_text())
    for row in rows:  # the dense model right on every val picture, the students on none
        for figures in (row, row["pytorch"]):
            hits = figures["by_split"]["val"]["hits"]
            figures["by_split"]["val"]["hits"] = [int(row["kind"] == "dense")] * len(hits)
    report.write_text(json.dumps(rows))
    tiny_recipe(monkeypatch)
    proc = run_in_process(demo, "--photos", "photos", "--workdir", "run", "--max-drop", "0",
                          cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "decide again" in proc.stdout and "sweep.py --pick-again --max-drop 0" in proc.stdout
    assert "no setting is within 0 points" in capfd.readouterr().out  # (sweep.py's own words)
    shipped = shipped_file(run)
    assert shipped.name.endswith(".over-budget.int8.onnx") and shipped.is_file()
    assert len(list(run.glob("*.int8.onnx"))) == 1  # the earlier decision's copy is gone
    page = (run / "RESULT.md").read_text()
    assert f"**Shipped: `{shipped.name}`**" in page and "missed the budget" in page
    tested = run_script("test.py", "--weights", shipped.name, "--data", "dataset", cwd=run)
    assert tested.returncode == 0, tested.stderr
